"""Activation patching, batched over cells: :func:`patch` -> :class:`PatchResult`.

A *cell* is one site (an activation kind at one layer, or one attention head) at one token
position. Patching a cell runs one prompt, writes at that cell only the activation the other prompt
had there, and reads a metric from the next-token logits at the last token.
``direction="denoising"`` (the default, as in TransformerLens's ``get_act_patch_*``) runs the
corrupt prompt and writes clean activations; ``"noising"`` runs the clean prompt and writes corrupt
ones.

How cells share forward passes: a patch at position ``p`` changes nothing before ``p``, so all
cells of a prompt pair share one copy of the unpatched run and each cell only adds its suffix
``p .. end`` to the same row, as a segment that attends (through a 4D attention mask, with the
original position ids) to the shared run's positions ``< p`` and causally to itself. The source
prompt rides in the same forward pass, so its activation at each hook is copied into the cells at
that very hook call. ``mlp_out`` at every layer at the last position is one forward pass over
``2 * seq + n_layers`` tokens instead of ``n_layers`` passes over ``seq``. Layers below a cell's
layer are still computed: the bridge's ``start_at_layer`` runs blocks ``0 .. l-1`` anyway (it only
swaps the residual in at block ``l``), so it would save nothing. A model whose attention ignores
custom masks is detected once and patched with one row per cell instead (``packed=False``).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    Batch,
    Capture,
    Intervention,
    Layers,
    PositionSpec,
    Site,
    SiteKind,
    SiteLike,
    expand_sites,
    intervene,
    model_adapter,
    position_list,
    progress_bar,
    readout,
    tokenize,
)
from mechprobe.patching._metrics import MetricFn, PatchMetric, answer_prob, bind_metric, logit_diff
from mechprobe.patching._result import PatchResult

__all__ = ["PatchMetric", "PatchResult", "answer_prob", "logit_diff", "patch"]

Direction: TypeAlias = Literal["denoising", "noising"]
Prompts: TypeAlias = str | Sequence[str] | Batch | Tensor


@dataclass(frozen=True)
class _Cell:
    pair: int
    row: int  # result row (site)
    col: int  # result column (position)
    hook: str
    head: int  # -1: not a head site
    p_src: int
    p_base: int


class _Writer(Intervention):
    """Copy activations inside one batch: ``act[dst_row, dst_idx(, head)] = act[src...]``."""

    def __init__(self, moves: Tensor) -> None:
        super().__init__(positions=None)
        self.moves = moves  # [n, 5]: dst_row, dst_idx, src_row, src_idx, head

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        dr, di, sr, si, head = self.moves.to(selected.device).unbind(1)
        out = selected.clone()  # the source rows are read from the unedited activation
        if selected.ndim == 4:  # hook_z: [batch, pos, head, d_head]
            out[dr, di, head] = selected[sr, si, head]
        else:
            out[dr, di] = selected[sr, si]
        return out


class _Rows:
    """The rows of one forward pass, built from segments of the pairs' token sequences."""

    def __init__(self) -> None:
        self.tokens: list[list[int]] = []
        self.pos: list[list[int]] = []
        self.seg: list[list[int]] = []
        self.parent: list[int] = []  # per segment: the segment it sees before its start, or -2
        self.start: list[int] = []
        self.moves: dict[str, list[tuple[int, int, int, int, int]]] = {}
        self.reads: list[tuple[int, int, int]] = []  # (row, index, pair)

    def new_row(self) -> int:
        for rows in (self.tokens, self.pos, self.seg):
            rows.append([])
        return len(self.tokens) - 1

    def add(self, row: int, ids: Tensor, start: int, parent: int) -> tuple[int, int]:
        """Append ``ids[start:]`` (positions ``start..``) to ``row``: (offset, segment id)."""
        offset, sid, n = len(self.tokens[row]), len(self.parent), len(ids) - start
        self.parent.append(parent)
        self.start.append(start)
        self.tokens[row] += ids[start:].tolist()
        self.pos[row] += range(start, len(ids))
        self.seg[row] += [sid] * n
        return offset, sid

    def inputs(self, packed: bool, device: Any) -> dict[str, Tensor]:
        width = max(len(t) for t in self.tokens)

        def pad(rows: list[list[int]], fill: int) -> Tensor:
            return torch.as_tensor([r + [fill] * (width - len(r)) for r in rows], device=device)

        tokens, pos, seg = pad(self.tokens, 0), pad(self.pos, 0), pad(self.seg, -1)
        if not packed:  # one segment per row, right-padded: a plain padding mask
            return {"input": tokens, "attention_mask": (seg >= 0).long()}
        parent = torch.as_tensor([*self.parent, -2], device=device)[seg]  # seg -1 -> -2
        start = torch.as_tensor([*self.start, 0], device=device)[seg]
        sq, sk = seg[:, :, None], seg[:, None, :]
        pq, pk = pos[:, :, None], pos[:, None, :]
        allowed = ((sk == sq) & (pk <= pq)) | (
            (sk == parent[:, :, None]) & (pk < start[:, :, None])
        )
        allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself
        return {"input": tokens, "attention_mask": allowed[:, None], "position_ids": pos}


def _forward_reads(model: Any, rows: _Rows, packed: bool) -> Float[Tensor, "reads vocab"]:
    """Run the rows with their moves; logits at the read positions only."""
    adapter = model_adapter(model)
    inputs = rows.inputs(packed, adapter.device)
    last = adapter.final_hook
    final = Capture()
    spec: dict[SiteLike, list[Intervention]] = {last: []}
    for hook, moves in rows.moves.items():
        spec.setdefault(hook, []).append(_Writer(torch.as_tensor(moves, dtype=torch.long)))
    spec[last].append(final)  # after any write at that same hook
    with torch.no_grad(), intervene(model, spec):
        adapter.forward(
            inputs["input"],
            inputs["attention_mask"],
            position_ids=inputs.get("position_ids"),
            logits_to_keep=1 if packed else None,  # logits come from the captured residual
        )
        assert final.value is not None
        r, i, _ = torch.as_tensor(rows.reads, device=final.value.device).unbind(1)
        return readout(model, final.value[r, i])


_PACKING: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def _packing_works(model: Any) -> bool:
    """Once per model: does a packed segment reproduce the unpacked run (masks, position ids)?"""
    if not model_adapter(model).packs_rows:  # e.g. a HookedTransformer: [batch, pos] masks only
        return False
    if model not in _PACKING:
        ids, rows = torch.arange(3, 11), _Rows()
        row = rows.new_row()
        _, sid = rows.add(row, ids, 0, -2)
        offset, _ = rows.add(row, ids, 3, sid)
        rows.reads = [(row, 7, 0), (row, offset + 4, 0)]
        try:
            logits = _forward_reads(model, rows, packed=True)
            scale = float(logits.abs().max()) + 1.0
            _PACKING[model] = bool((logits[0] - logits[1]).abs().max() <= 1e-4 * scale)
        except (TypeError, ValueError, RuntimeError):
            _PACKING[model] = False
    return _PACKING[model]


def _sites(model: Any, sites: Any, layers: Layers) -> list[Site]:
    found = expand_sites(model, sites, layers=layers)
    for site in found:
        if site.positions is not None:
            raise ValueError(f"{site} carries positions: pass positions= to patch() instead.")
    return found


def _token_rows(model: Any, prompts: Prompts, what: str) -> list[Tensor]:
    if isinstance(prompts, Tensor):
        if prompts.ndim not in (1, 2) or prompts.is_floating_point():
            raise ValueError(f"{what} tokens must be integer ids [seq] or [pairs, seq] (unpadded).")
        return list(prompts.long().reshape(-1, prompts.shape[-1]).cpu())
    batch = prompts if isinstance(prompts, Batch) else tokenize(model, prompts)
    return [
        t[m.bool()] for t, m in zip(batch.tokens.cpu(), batch.attention_mask.cpu(), strict=True)
    ]


def _positions(
    spec: Any, src: list[int], base: list[int]
) -> tuple[list[int], list[list[tuple[int, int]]]]:
    """Requested positions and, per pair, ``[(p_src, p_base)]`` in each unpadded sequence."""
    if isinstance(spec, str):
        lengths = set(src) | set(base)
        if spec != "all":
            raise ValueError(f"positions must be an int, a list of ints or 'all', not {spec!r}.")
        if len(lengths) != 1:
            raise ValueError(
                f"positions={spec!r} needs every clean and corrupt prompt to have the same token "
                f"length (got {sorted(lengths)}): pick prompts that tokenise to equally many "
                "tokens, or patch positions counted from the end, e.g. positions=[-3, -2, -1]."
            )
        spec = list(range(lengths.pop()))
    wanted = position_list(spec)
    resolved = []
    for i, (s, b) in enumerate(zip(src, base, strict=True)):
        pairs = [(p + s if p < 0 else p, p + b if p < 0 else p) for p in wanted]
        for p, (ps, pb) in zip(wanted, pairs, strict=True):
            if not (0 <= ps < s and 0 <= pb < b):
                raise ValueError(
                    f"Position {p} is outside pair {i}, whose prompts have {s} and {b} tokens: "
                    f"use positions within -{min(s, b)}..{min(s, b) - 1}."
                )
        resolved.append(pairs)
    return wanted, resolved


def _layout(
    cells: list[_Cell], src: list[Tensor], base: list[Tensor], packed: bool
) -> tuple[_Rows, list[Any]]:
    """Rows for one forward pass: per pair its source and base run, then one segment per cell.

    Returns the rows and, parallel to ``rows.reads``, what each read is: ``"src"``, ``"base"`` or
    the cell.
    """
    rows, keys = _Rows(), list[Any]()
    by_pair: dict[int, list[_Cell]] = {}
    for cell in cells:
        by_pair.setdefault(cell.pair, []).append(cell)
    for i, group in by_pair.items():
        s_ids, b_ids = src[i], base[i]
        row_cap = max(_ROW_TOKENS, 3 * len(b_ids))  # bounds the [L, L] attention per row
        r = rows.new_row()
        s_off, _ = rows.add(r, s_ids, 0, -2)
        rb = r if packed else rows.new_row()
        b_off, b_sid = rows.add(rb, b_ids, 0, -2)
        rows.reads += [(r, s_off + len(s_ids) - 1, i), (rb, b_off + len(b_ids) - 1, i)]
        keys += ["src", "base"]
        in_row = 0
        for cell in group:
            start = cell.p_base if packed else 0  # unpacked: a full copy, patched inline
            n = len(b_ids) - start
            if not packed or (in_row and len(rows.tokens[rb]) + n > row_cap):
                rb, in_row = rows.new_row(), 0
                if packed:
                    _, b_sid = rows.add(rb, b_ids, 0, -2)
            off, _ = rows.add(rb, b_ids, start, b_sid if packed else -2)
            in_row += 1
            move = (rb, off + cell.p_base - start, r, s_off + cell.p_src, cell.head)
            rows.moves.setdefault(cell.hook, []).append(move)
            rows.reads.append((rb, off + n - 1, i))
            keys.append(cell)
    return rows, keys


_ROW_TOKENS = 512


def patch(
    model: Any,
    clean: Prompts,
    corrupt: Prompts,
    sites: SiteKind | SiteLike | Sequence[SiteLike],
    positions: PositionSpec,
    metric: PatchMetric | MetricFn,
    *,
    layers: Layers = "all",
    direction: Direction = "denoising",
    cells_per_batch: int = 256,
    packed: bool | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch every (site, position) cell, many cells per forward pass.

    Args:
        model: A ``TransformerBridge`` or ``HookedTransformer`` (whose forward takes no packed
            rows: it runs with ``packed=False``, the same numbers).
        clean: Clean prompt(s): a string, a list (one per pair), a :class:`Batch`, or unpadded token
            ids ``[seq]`` / ``[pairs, seq]``.
        corrupt: Corrupt prompt(s), as many as ``clean``.
        sites: A kind (``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``,
            ``"mlp_out"``: every layer; ``"head"``: every layer x head), or Site(s) / hook names.
        layers: The layers a kind in ``sites`` covers (int, range, list or ``"all"``).
        positions: ``-1`` (last token of each prompt), a list of ints (negative from the end), or
            ``"all"`` (every clean and corrupt prompt must then have the same token length).
        metric: :func:`logit_diff`, :func:`answer_prob`, or a callable ``fn(logits [rows, vocab])
            -> [rows]`` of the last position's logits (``fn(logits, pair)`` receives each row's
            pair index too). With several pairs, results are averaged over pairs (``per_pair``
            keeps them) and recovery is normalised on the averages.
        direction: ``"denoising"`` runs corrupt and writes clean activations (TransformerLens's
            ``get_act_patch_*`` convention); ``"noising"`` runs clean and writes corrupt ones.
        cells_per_batch: Cells per forward pass; memory grows with it times the prompt length.
        packed: Share each pair's unpatched prefix between cells (None: when the model supports
            it, checked once); False runs one full row per cell.
        progress: Show a progress bar over forward passes.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.patch(model, "Hi cat", "Hi bat", "mlp_out", -1, mp.logit_diff(1, 2))
        >>> res.values.shape
        (3, 1)
    """
    if direction not in get_args(Direction):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    if (
        isinstance(cells_per_batch, bool)
        or not isinstance(cells_per_batch, int)
        or cells_per_batch < 1
    ):
        raise ValueError(f"cells_per_batch must be a positive int, got {cells_per_batch!r}.")
    clean_ids, corrupt_ids = (
        _token_rows(model, clean, "clean"),
        _token_rows(model, corrupt, "corrupt"),
    )
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"Got {len(clean_ids)} clean and {len(corrupt_ids)} corrupt prompts: pass one corrupt "
            "prompt per clean prompt."
        )
    n_pairs = len(clean_ids)
    src, base = (clean_ids, corrupt_ids) if direction == "denoising" else (corrupt_ids, clean_ids)
    site_list = _sites(model, sites, layers)
    wanted, resolved = _positions(positions, [len(t) for t in src], [len(t) for t in base])
    metric_fn, metric_name = bind_metric(model, metric, n_pairs)
    if packed is None:
        packed = _packing_works(model)
    elif packed and not _packing_works(model):
        raise ValueError(
            "packed=True, but this model cannot run packed rows (a HookedTransformer takes "
            "[batch, pos] attention masks only; some bridges ignore custom masks or position "
            "ids): pass packed=False (one row per cell; the same numbers)."
        )
    cells = [
        _Cell(i, r, c, site.hook_name, -1 if site.head is None else site.head, ps, pb)
        for i, pairs in enumerate(resolved)
        for r, site in enumerate(site_list)
        for c, (ps, pb) in enumerate(pairs)
    ]
    per_pair = np.full((n_pairs, len(site_list), len(wanted)), np.nan)
    baseline = {"src": np.full(n_pairs, np.nan), "base": np.full(n_pairs, np.nan)}
    chunks = [cells[k : k + cells_per_batch] for k in range(0, len(cells), cells_per_batch)]
    for chunk in progress_bar(chunks, progress=progress, desc="patch"):
        rows, keys = _layout(chunk, src, base, packed)
        logits = _forward_reads(model, rows, packed)
        pair = torch.as_tensor([p for _, _, p in rows.reads], device=logits.device)
        values = torch.as_tensor(metric_fn(logits, pair)).detach()
        if values.shape != (len(keys),):
            raise ValueError(
                f"metric returned shape {tuple(values.shape)} for {len(keys)} rows of logits: "
                "return one value per row, shape [rows]."
            )
        for key, value, i in zip(keys, values.double().cpu().tolist(), pair.tolist(), strict=True):
            if isinstance(key, _Cell):
                per_pair[i, key.row, key.col] = value
            elif np.isnan(baseline[key][i]):
                baseline[key][i] = value
    clean_m, corrupt_m = (baseline["src"], baseline["base"])[
        :: 1 if direction == "denoising" else -1
    ]
    values_mean = per_pair.mean(axis=0)
    scale = float(np.mean(clean_m) - np.mean(corrupt_m))
    if abs(scale) <= 1e-5 * max(1.0, float(np.abs(clean_m).max()), float(np.abs(corrupt_m).max())):
        warnings.warn(
            f"The clean and corrupt runs give the same {metric_name} ({np.mean(clean_m):.4g}), so "
            "normalised recovery is undefined (NaN): use a corrupt prompt that changes the answer.",
            stacklevel=2,
        )
        normalised = np.full_like(values_mean, np.nan)
    else:
        normalised = (values_mean - np.mean(corrupt_m)) / scale
    return PatchResult(
        values=values_mean,
        per_pair=per_pair,
        normalised=normalised,
        clean=clean_m,
        corrupt=corrupt_m,
        sites=tuple(str(s) for s in site_list),
        kinds=tuple(s.kind for s in site_list),
        layers=tuple(s.layer for s in site_list),
        heads=tuple(s.head for s in site_list),
        positions=tuple(wanted),
        position_labels=_labels(model, clean_ids[0], corrupt_ids[0], wanted),
        metric=metric_name,
        direction=direction,
    )


def _labels(model: Any, clean: Tensor, corrupt: Tensor, wanted: list[int]) -> tuple[str, ...]:
    out = []
    for p in wanted:
        a = model.tokenizer.decode([int(clean[p])])
        b = model.tokenizer.decode([int(corrupt[p])])
        out.append(a if a == b else f"{a}/{b}")
    return tuple(out)
