"""Attribution patching (Nanda 2023; Syed et al. 2023): :func:`attribution_patch` ->
:class:`PatchResult`.

Exact denoising patching of a cell runs the corrupt prompt with the clean activation written
there. Attribution patching estimates it to first order, for every cell at once:

    metric(corrupt, cell patched) ~= metric(corrupt) + (a_clean - a_corrupt) . d metric / d a

with the gradient taken on the corrupt run. One clean forward pass (to read ``a_clean``) and one
corrupt forward and backward pass per batch of prompt pairs give every site, position and head.
Noising is estimated the same way with the runs' roles swapped (``direction="noising"``: the
clean run's gradient, ``metric(clean) + (a_corrupt - a_clean) . d metric / d a``). Gradients come
from mechprobe's own hooks (:class:`mechprobe.core.Gradient`), so nothing is left on the
model or its parameters, even when the backward pass raises.

The estimate is a linear approximation: it is poor where the metric is far from linear in the
activation between the two runs, e.g. attention patterns that saturate (a softmax's gradient
vanishes where one key takes all the weight) and large early-layer states such as layer 0's MLP
output, whose change moves everything downstream. Compare it with :func:`patch` on a few cells
before trusting it on a model (``docs/causal.md`` has the comparison on SmolLM2).

Controls: ``n_random`` estimates per cell of the patch moved by the same distance
``||a_clean - a_corrupt||`` in a random direction, ``||delta|| u . grad`` (``u`` uniform on the
cell's unit sphere, for a pattern row among the edits that keep the row's sum; control ``j`` of a
pair drawn from ``(seed + j) % 2**32``, the pair's tokens and the cell, so the same whatever
other pairs and cells run beside it), and every value per prompt pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import numpy as np
import torch
from scipy import special
from torch import Tensor

from mechprobe.core import (
    Capture,
    Gradient,
    Layers,
    PositionSpec,
    Site,
    SiteKind,
    SiteLike,
    check_batch_size,
    check_heads_sum,
    check_int,
    check_seed,
    control_seed,
    differentiate,
    evaluates,
    gradients_enabled,
    intervene,
    keyed_seeds,
    keyed_uniforms,
    weighted_progress_bar,
)
from mechprobe.patching._activation import (
    Direction,
    NamedPositions,
    Prompts,
    SiteGroups,
    _columns,
    _labels,
    _result,
    named_indices,
    site_rows,
    token_pairs,
)
from mechprobe.patching._engine import backward_rows, control_key, hook_bytes, length_passes
from mechprobe.patching._metrics import MetricFn, PatchMetric, bind_metric, check_unpatched
from mechprobe.patching._result import PatchResult, pair_records

__all__ = ["attribution_patch"]


def _value_hook(site: Site) -> str:
    """The hook whose whole tensor holds the site's activation (``head_out``: the heads' z)."""
    if site.kind == "head_out":
        return f"blocks.{site.layer}.attn.hook_z"
    return site.hook_name


def _grad_hook(site: Site) -> str:
    """The hook whose gradient is the gradient with respect to the site's activation
    (``head_out``: the attention output, of which the head's write is one summand)."""
    return site.hook_name


def _at(site: Site, tensor: Tensor, index: Tensor, model: Any) -> Tensor:
    """A hook's activation (or gradient) of one prompt (batch axis dropped) at positions
    ``index``: ``[len(index), width]``, or ``[len(index), heads, width]`` for head kinds (a
    pattern's rows over all keys; ``head_out``: every head's write ``z @ W_O[head]``)."""
    if site.kind == "pattern":  # hooks see a pattern query-major: [query, head, key]
        return tensor[index]
    if site.kind == "head_out" and tensor.ndim == 3:  # z [pos, head, d_head] -> the writes
        w_o = model.blocks[site.layer].attn.W_O.detach().to(tensor.device, tensor.dtype)
        return torch.einsum("phd,hdm->phm", tensor[index], w_o)
    if site.kind == "head_out":  # the attention output's gradient, the same for every head
        return tensor[index][:, None, :]
    return tensor[index]


def _estimate(
    model: Any,
    site: Site,
    caps: dict[str, Capture],
    grads: dict[str, Gradient],
    row: int,
    src: Tensor,
    dst: Tensor,
    seeds: list[int],
    pair_tokens: list[Tensor],
) -> tuple[Tensor, list[Tensor]]:
    """``(delta . grad, [||delta|| u_j . grad])`` at every position (and head) of the site's
    hook in the pass's row ``row`` (one prompt pair): ``[positions]`` or ``[positions, heads]``,
    float64. Control ``j``'s direction ``u_j`` is uniform on the unit sphere of the cell's edits
    (for a pattern row, those that keep the row's sum), drawn for that cell alone
    (:func:`_random_projections`)."""
    a_clean = caps[_value_hook(site)].value
    a_run = grads[_value_hook(site)].value
    grad = grads[_grad_hook(site)].grad
    assert a_clean is not None and a_run is not None and grad is not None
    x_clean = _at(site, a_clean[row], src, model).double()
    x_run = _at(site, a_run[row], dst, model).double()
    g = _at(site, grad[row], dst, model).double()
    if site.kind == "pattern":  # prompts of different lengths: keys up to the position
        keys = min(x_clean.shape[-1], x_run.shape[-1])
        x_clean, x_run, g = x_clean[..., :keys], x_run[..., :keys], g[..., :keys]
    delta = x_clean - x_run
    g = g.expand_as(delta)
    estimate = (delta * g).sum(-1)
    # the controls' directions: every edit of the cell, or for a pattern row those that keep its
    # sum (the gradient projected there, one dimension fewer)
    g_edits = g
    dims = torch.full(delta.shape[:-1], float(delta.shape[-1]), dtype=torch.float64)
    if site.kind == "pattern":
        valid = (torch.arange(delta.shape[-1])[None, None] <= dst[:, None, None]).to(g.device)
        g_edits = g * valid
        g_edits = (g_edits - g_edits.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True)) * valid
        dims = (valid.sum(-1).double() - 1).expand(delta.shape[:-1]).cpu()
    scale = delta.norm(dim=-1) * g_edits.norm(dim=-1)
    randoms = [
        scale * _random_projections(site, dims, src, dst, seed, pair_tokens).to(g.device)
        for seed in seeds
    ]
    return estimate, randoms


def _random_projections(
    site: Site, dims: Tensor, src: Tensor, dst: Tensor, seed: int, pair_tokens: list[Tensor]
) -> Tensor:
    """``u . g / ||g||`` for ``u`` uniform on the unit sphere of ``dims`` dimensions, for every
    (position, head) cell of ``dims`` ``[positions(, heads)]``: ``z / sqrt(z^2 + c)`` with ``z``
    standard normal and ``c`` chi-squared with ``dims - 1`` degrees of freedom (a Gaussian
    vector's coordinate along ``g`` and the rest of its squared norm), so a cell costs three
    uniform draws, not a direction as wide as its activation. Each cell draws from the pair's
    tokens and its own key (:func:`control_key` of the site, with its head, at the run's position
    and the source's), as patching's controls do: a cell's control does not depend on the other
    cells estimated beside it (review 42a S1)."""
    heads = range(dims.shape[1]) if dims.ndim == 2 else [None]
    cells = [Site(site.kind, site.layer, head=h) for h in heads]
    keys = [
        control_key(cell, int(d), int(s))
        for d, s in zip(dst.tolist(), src.tolist(), strict=True)
        for cell in cells
    ]
    u = keyed_uniforms(keyed_seeds(seed, pair_tokens, keys), 3)
    z = np.sqrt(-2.0 * np.log1p(-u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])  # Box-Muller
    rest = dims.reshape(-1).numpy() - 1.0
    chi2 = np.zeros_like(z)
    more = rest > 0  # a one-dimensional sphere is {-1, 1}: z / |z|
    chi2[more] = 2.0 * special.gammaincinv(rest[more] / 2.0, u[more, 2])
    # dims 0 (a pattern row of one key: no edit keeps its sum) gives 0 through g = 0
    cos = z / np.sqrt(np.maximum(z * z + chi2, 1e-300))
    return torch.from_numpy(cos).reshape(dims.shape)


def _check_head_out(model: Any, site_list: list[Site], grads: dict[str, Gradient]) -> None:
    """Refuse ``head_out`` sites where the attention output is not the sum of the heads' writes
    (a norm between them), as the patching engine does."""
    for layer in sorted({s.layer for s in site_list if s.kind == "head_out"}):
        z = grads[f"blocks.{layer}.attn.hook_z"].value
        attn_out = grads[f"blocks.{layer}.hook_attn_out"].value
        assert z is not None and attn_out is not None
        check_heads_sum(model.blocks[layer].attn, z, attn_out, f"head_out at layer {layer}")


@evaluates
def attribution_patch(
    model: Any,
    clean: Prompts,
    corrupt: Prompts,
    sites: SiteKind | SiteLike | Sequence[SiteLike] | SiteGroups,
    positions: PositionSpec | NamedPositions | None,
    metric: PatchMetric | MetricFn,
    *,
    layers: Layers = "all",
    direction: Direction = "denoising",
    n_random: int = 3,
    batch_size: int | None = 32,
    memory_budget: int = 1 << 30,
    seed: int = 0,
    progress: bool = True,
) -> PatchResult:
    """Estimate denoising (or noising) patching of every (site, position) cell from gradients:
    one clean forward pass and one corrupt forward and backward pass per batch of prompt pairs,
    whatever the number of cells.

    Args:
        model: A TransformerLens model.
        clean: Clean prompt(s), as for :func:`patch`.
        corrupt: Corrupt prompt(s), as many as ``clean``.
        sites: As for :func:`patch`: kinds (every layer; head kinds every layer x head, key/value
            heads for ``k``/``v``), Sites or site hook names, or groups by name (a group's
            estimate is the sum of its sites', first order's estimate of patching them at once).
        positions: ``-1``, a list of ints (negative from each prompt's end), ``"all"``, or
            None: every position at once (the sum of the positions' estimates, first order's
            estimate of :func:`patch`'s ``positions=None``; each pair's prompts of one length),
            or positions by name as for :func:`patch` (``{"S2": [10, 12], "END": -1}``).
        metric: :func:`logit_diff`, :func:`answer_prob` or a callable of the last position's
            logits, as for :func:`patch`; it must be differentiable.
        layers: The layers a kind covers.
        direction: ``"denoising"`` (the default: gradients on the corrupt run, clean
            activations' change) or ``"noising"`` (gradients on the clean run, the corrupt
            activations' change), as :func:`patch`'s.
        n_random: Random controls per cell (the same distance in a random direction).
        batch_size: Prompt pairs per forward and backward pass (None: as many as can go
            together). Pairs run together where their clean prompts have one length and their
            corrupt prompts one length, so no pass is padded and every batch size gives the
            same numbers up to float rounding.
        memory_budget: Bytes one forward and backward pass may hold: the backward pass keeps
            every layer's activations of its rows, beside the captures and gradients of the
            sites and the vocabulary's logits, so long prompts run fewer pairs a pass
            (estimated per row from the model's widths; one pair always runs).
        seed: Seed of the random directions.
        progress: Show a progress bar over prompt pairs.

    Returns:
        A :class:`PatchResult` with ``direction="attribution"`` (``"attribution-noising"``):
        ``values`` are the estimated metric after patching each cell (``corrupt + estimate``;
        ``clean + estimate`` for noising), comparable with ``patch(..., direction=...)``.

    Raises:
        ValueError: As :func:`patch` for prompts, sites and positions (before any forward pass).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.attribution_patch(model, "Hi cat", "Hi bat", "mlp_out", -1,
        ...                            mp.logit_diff(1, 2), progress=False)
        >>> res.values.shape, res.direction
        ((3, 1), 'attribution')
    """
    if direction not in get_args(Direction):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    check_int(n_random, "n_random", 0)
    batch_size = check_batch_size(batch_size)
    check_int(memory_budget, "memory_budget", 1)
    seed = check_seed(seed)
    clean_ids, corrupt_ids = token_pairs(model, clean, corrupt)
    noising = direction == "noising"
    # the run whose activations are read, and the run that is differentiated (edited)
    src_ids, base_ids = (corrupt_ids, clean_ids) if noising else (clean_ids, corrupt_ids)
    n_pairs = len(clean_ids)
    rows = site_rows(model, sites, layers, "attribution_patch()")
    site_list = rows.sites
    # Columns of positions written together: one each, or every position with None, where the
    # estimates of a column's positions add up (first order).
    wanted, columns = _columns(
        positions, [len(t) for t in clean_ids], [len(t) for t in corrupt_ids]
    )
    together = wanted == [None]
    resolved = [[pos for column in pair_columns for pos in column] for pair_columns in columns]
    if any(s.kind == "pattern" for s in site_list):
        for i, pairs in enumerate(resolved):
            if any(ps != pb for ps, pb in pairs):
                raise ValueError(
                    f"Pattern cells need pair {i}'s prompts to have each position at the same "
                    "index (a pattern row is as long as its position); use prompts of equal "
                    "length, or other sites."
                )
    metric_fn, metric_name = bind_metric(model, metric, n_pairs)
    value_hooks = list(dict.fromkeys(_value_hook(s) for s in site_list))
    grad_hooks = list(dict.fromkeys(_grad_hook(s) for s in site_list))
    shape = (n_pairs, len(rows), len(wanted))
    per_pair, random = np.full(shape, np.nan), np.full((n_random, *shape), np.nan)
    clean_m, corrupt_m = np.full(n_pairs, np.nan), np.full(n_pairs, np.nan)
    seeds = [control_seed(seed, j) for j in range(n_random)]
    chunks = length_passes(
        [(len(a), len(b)) for a, b in zip(src_ids, base_ids, strict=True)],
        # the clean run's captures, and the Gradients' values, sums and gradients, a row each
        lambda width: min(
            batch_size or n_pairs,
            backward_rows(
                model, width, memory_budget, hook_bytes(model, value_hooks + grad_hooks, width, 4)
            ),
        ),
    )
    head_out_checked = False
    for chunk in weighted_progress_bar(
        chunks,
        weights=[len(c) * (len(src_ids[c[0]]) + 2 * len(base_ids[c[0]])) for c in chunks],
        counts=[len(c) for c in chunks],
        unit="pairs",
        progress=progress,
        desc="attribution",
    ):
        pair_index = torch.tensor(chunk)
        device = model.W_E.device
        caps = {name: Capture() for name in value_hooks}
        with torch.no_grad(), intervene(model, caps):
            logits = model(torch.stack([src_ids[i] for i in chunk]).to(device))
            src_ms = metric_fn(logits[:, -1], pair_index).double().cpu().numpy()
        check_unpatched(src_ms, "source")
        grads = {name: Gradient() for name in dict.fromkeys(value_hooks + grad_hooks)}
        # Gradients are needed even where the caller turned them off (set_grad_enabled(False),
        # inference_mode: tensors made there cannot be saved for backward, hence the clone).
        # Each row's metric depends on its own row only, so the sum's gradient is each pair's.
        with gradients_enabled():
            with intervene(model, grads):
                logits = model(torch.stack([base_ids[i] for i in chunk]).to(device).clone())
                out = metric_fn(logits[:, -1], pair_index)
            base_ms = out.detach().double().cpu().numpy()
            check_unpatched(base_ms, "base")
            if not out.requires_grad:
                raise ValueError(
                    f"The metric {metric_name!r} gave a value without a gradient: attribution "
                    "patching differentiates it, so compute it from the logits with torch "
                    "operations (no .item(), numpy or argmax)."
                )
            differentiate(out.sum(), list(grads.values()))
        if not head_out_checked:
            _check_head_out(model, site_list, grads)
            head_out_checked = True
        for row, i in enumerate(chunk):
            src_m, base_m = float(src_ms[row]), float(base_ms[row])
            clean_m[i], corrupt_m[i] = (base_m, src_m) if noising else (src_m, base_m)
            pair_tokens = [clean_ids[i], corrupt_ids[i]]
            # resolved pairs are (clean position, corrupt position): read at the source's
            src = torch.as_tensor([pb if noising else ps for ps, pb in resolved[i]])
            dst = torch.as_tensor([ps if noising else pb for ps, pb in resolved[i]])
            # One estimate per hook for all its heads and positions; sites pick their head.
            estimates: dict[tuple[str, str], np.ndarray] = {}
            for r, group in enumerate(rows.groups):
                # first order: the effects of a group's sites (and of positions together) add up
                change = np.zeros((1 + n_random, len(wanted)))
                for site in group:
                    key = (site.kind, _grad_hook(site))
                    if key not in estimates:
                        est, randoms = _estimate(
                            model, site, caps, grads, row, src, dst, seeds, pair_tokens
                        )
                        # [1 + n_random, positions(, heads)] in one transfer
                        estimates[key] = torch.stack([est, *randoms]).cpu().numpy()
                    values = estimates[key]
                    head = () if site.head is None else (slice(None), site.head)
                    picked = values[(slice(None), *head)]  # [1 + n_random, positions]
                    if together:
                        picked = picked.sum(axis=1, keepdims=True)
                    change += picked
                per_pair[i, r] = base_m + change[0]
                random[:, i, r] = base_m + change[1:]
    return _result(
        model,
        rows,
        wanted,
        per_pair,
        random,
        clean_m,
        corrupt_m,
        metric_name,
        "attribution-noising" if noising else "attribution",
        seed,
        labels=_labels(model, clean_ids, corrupt_ids, wanted),
        # columns were resolved on (clean, corrupt) whatever the direction
        records=pair_records(model, clean_ids, corrupt_ids, metric)
        | named_indices(wanted, [[c[0] for c in cs] for cs in columns], False),
    )
