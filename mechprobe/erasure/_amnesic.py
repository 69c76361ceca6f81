"""Amnesic probing (Elazar et al. 2021): erase a concept inside the model and measure what it loses.

:func:`amnesic` hooks a fitted :class:`~mechprobe.Eraser` (INLP, LEACE, ...) in at one site
through :class:`~mechprobe.Project` and :func:`~mechprobe.intervene`, so the layers above run
on the erased activations, and compares the model with and without it:

- on text: next-token accuracy, mean loss, and ``KL(p_orig || p_erased)`` averaged over tokens;
- on a relational :class:`~mechprobe.Task`: greedy first-token accuracy (and the first answer
  token's log-probability, and the KL at the prompt's last token);
- *information*: linear (and MLP) probe accuracy for the concept, at the erased site and at later
  layers, re-collected with the eraser hooked in. A linear probe at the erased site should
  fall to the majority baseline; later layers, or an MLP, may recover it.

Every number is measured beside the same number for ``n_random`` random erasers of the same
rank (mean and spread over seeds) and a dropout control (the same number of coordinates zeroed):
an erasure matters only as far as it hurts more than deleting random directions. The difference
is the *selectivity* (:meth:`AmnesicResult.selectivity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal, get_args

import torch

from mechprobe.core import (
    HEAD_KINDS,
    Batch,
    Capture,
    Layers,
    Site,
    SiteKind,
    SiteLike,
    block_of,
    check_batch_size,
    check_int,
    check_seed,
    control_seed,
    evaluates,
    forward,
    intervene,
    model_adapter,
    resolve_layers,
    resolve_site,
    warn,
    width,
    writer_positions,
)
from mechprobe.erasure._eraser import Eraser, dropout_projection, random_projection
from mechprobe.erasure._information import ProbeData, check_probe_data, information_measures
from mechprobe.erasure._metrics import (
    Condition,
    ErasePositions,
    task_measures,
    text_measures,
)
from mechprobe.erasure._result import AmnesicMeasure, AmnesicResult
from mechprobe.tasks import Task, load_task

__all__ = ["amnesic", "control_projections"]


def control_projections(
    eraser: Eraser,
    n_random: int = 3,
    *,
    dropout: bool = True,
    random_directions: Literal["sphere", "cube"] = "sphere",
    seed: int = 0,
) -> list[Condition]:
    """The erasure and its controls of equal rank: ``erased``, ``random`` x n_random, ``dropout``.

    Random control ``i`` is ``random_projection(dim, n_removed, random_directions=...,
    seed=seed + i)`` (``"sphere"``: uniform subspaces; ``"cube"``: Elazar et al.'s draw; modulo
    ``2**32``: :func:`mechprobe.core.control_seed`, so every seed works here); the dropout
    control zeroes ``n_removed`` coordinates drawn with ``seed``. An affine erasure's controls
    share its centre: where the eraser keeps a mean in place (LEACE, ``x' = mean + P (x -
    mean)``), its controls move the random directions (coordinates) to that mean's value rather
    than to zero, so they differ from it only in which directions they remove. (Zeroing them
    also moved the residual stream's large mean, a harsher control than the erasure.)

    Args:
        eraser: The fitted erasure (its ``dim``, ``n_removed`` and centre set the controls').
        n_random: Random controls of equal rank.
        dropout: Add the dropout control (``n_removed`` coordinates).
        random_directions: ``"sphere"`` (uniform subspaces) or ``"cube"`` (Elazar et al.'s).
        seed: Seed of the controls.

    Returns:
        ``Condition``s (``name``, ``eraser``, ``seed``): ``erased``, then ``random`` x
        ``n_random`` (seeds ``control_seed(seed, i)``), then ``dropout`` if asked.

    Example:
        >>> import mechprobe as mp
        >>> conds = control_projections(mp.random_projection(8, 3, seed=9), n_random=2)
        >>> [(c.name, c.seed, c.eraser.n_removed) for c in conds]
        [('erased', None, 3), ('random', 0, 3), ('random', 1, 3), ('dropout', 0, 3)]
    """
    n_random = check_int(n_random, "n_random", 0)
    seed = check_seed(seed)
    dim, k = eraser.dim, eraser.n_removed
    seeds = [control_seed(seed, i) for i in range(n_random)]

    def centred(control: Eraser) -> Eraser:
        mean = eraser.mean
        return control if mean is None else replace(control, mean=mean.to(control.removed))

    out = [Condition("erased", eraser)]
    out += [
        Condition(
            "random",
            centred(random_projection(dim, k, random_directions=random_directions, seed=s)),
            s,
        )
        for s in seeds
    ]
    if dropout:
        out.append(Condition("dropout", centred(dropout_projection(dim, k, seed=seed)), seed))
    return out


@evaluates
def amnesic(
    model: Any,
    site: SiteLike,
    eraser: Eraser,
    *,
    text: Sequence[str] | None = None,
    task: Task | str | None = None,
    probe: ProbeData | None = None,
    probe_layers: Layers | None = None,
    positions: ErasePositions = "all",
    n_random: int = 3,
    dropout: bool = True,
    random_directions: Literal["sphere", "cube"] = "sphere",
    mlp: bool = True,
    probe_folds: int | None = None,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
) -> AmnesicResult:
    """Erase with ``eraser`` at ``site`` inside the model and measure the loss against random controls.

    Args:
        model: A TransformerLens model.
        site: Where to erase (a :class:`Site` or hook name), e.g. ``Site("resid_post", 20)``.
        eraser: A fitted :class:`Eraser` of the site's width (``inlp``, ``leace``, ...).
        text: Texts for the language-modelling measures (next-token accuracy, loss, KL).
        task: A relational task (or its name) for task accuracy, e.g. ``"capitals"``.
        probe: Labelled data for the *information* measures: a :class:`~mechprobe.ProbingDataset`,
            a :class:`Task` (labelled by input) or ``(texts, labels)`` (last token). Probes
            (:func:`mechprobe.probe_layers`) train on a stratified 75% and are scored on the rest.
        probe_layers: Layers whose activations (the erased site's kind) are probed after erasure
            (an int, ints, or ``"all"``: the erased layer and every later one); default: the
            erased layer and up to four later ones, the last layer included.
        positions: Token positions to erase: ``"all"`` (default), or an int or ints (``-1``:
            each prompt's last real token). Word-level probing data needs ``"all"``.
        n_random: Random-direction controls of the same rank (seeds ``seed .. seed+n_random-1``,
            modulo ``2**32``).
        dropout: Also run the dropout control.
        random_directions: How the random controls' directions are drawn: ``"sphere"``
            (default: uniform subspaces) or ``"cube"`` (Elazar et al.'s code: entries uniform in
            ``[-0.5, 0.5]``), see :func:`mechprobe.random_projection`.
        mlp: Also fit an MLP probe (intact and erased only): a nonlinear probe can often still
            read what a linear erasure removed.
        probe_folds: Score probes by stratified k-fold cross-validation instead of one 75/25
            split (steadier on small probing data, ``k`` times the fitting).
        seed: Seed of the controls and of the probes' train/test split.
        batch_size: Prompts per forward pass (None: all at once).
        progress: Show progress bars (``MECHPROBE_PROGRESS=0`` silences them).

    Returns:
        :class:`AmnesicResult` with one :class:`AmnesicMeasure` per number.

    Raises:
        ValueError: Before any forward pass: an eraser of another width, nothing to measure, a
            Site that carries its own positions (pass ``positions=`` here), bad positions, or
            ``probe_layers`` empty, out of range or below the erased layer.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> eraser = mp.random_projection(64, 4, seed=1)
        >>> r = amnesic(model, mp.Site("resid_post", 1), eraser, text=["Hello there", "Hi you"],
        ...             n_random=2, progress=False)
        >>> r.mean_std("lm_kl", "erased")[0] > 0, len(r.values("lm_kl", "random"))
        (True, 2)
    """
    if isinstance(site, str) and site in get_args(SiteKind):
        # resolve_site read it as an unknown hook name, listing the very kind it refused.
        raise ValueError(
            f"amnesic erases at one site: {site!r} is a kind without its layer; pass "
            f"Site({site!r}, layer) or that site's hook name (a sweep over layers is "
            "mp.layer_sweep)."
        )
    hook, parsed = resolve_site(model, site)
    # What the eraser is hooked on: the hook name, or for a head the Site itself (a head shares its
    # layer's hook with the others; keyed by the name, every head was erased).
    target: SiteLike = hook
    if parsed is not None and parsed.head is not None:
        target = replace(parsed, positions=None)
    if not isinstance(eraser, Eraser):
        raise TypeError(
            f"eraser must be a mechprobe Eraser, got {type(eraser).__name__}; fit one with "
            "mp.inlp(X, y) or mp.leace(X, y) on activations of this site."
        )
    site_width = width(model, parsed) or _hook_width(model, hook)
    if site_width is not None and eraser.dim != site_width:
        raise ValueError(
            f"The eraser acts on {eraser.dim}-dim vectors but {hook} has width "
            f"{site_width}: fit it on activations of this site."
        )
    if text is None and task is None and probe is None:
        raise ValueError("Nothing to measure: pass text=[...], task='capitals' and/or probe=data.")
    batch_size = check_batch_size(batch_size)
    seed = check_seed(seed)
    if isinstance(site, Site) and site.positions is not None:
        raise ValueError(
            f"{site} carries positions={site.positions!r}; amnesic() takes positions= itself: "
            f"pass Site({site.kind!r}, {site.layer}) and positions={site.positions!r}."
        )
    positions = writer_positions(positions, "amnesic")
    if isinstance(text, str):
        text = [text]
    adapter = model_adapter(model)
    device, dtype = adapter.device, adapter.dtype
    # Cast once for the model, so no forward pass casts a factor again; a 16-bit model's erasers
    # stay float32 (Eraser.apply computes there and rounds once).
    dtype = torch.promote_types(dtype, torch.float32)
    controls = [
        Condition(c.name, c.eraser.to(device, dtype) if c.eraser else None, c.seed)
        for c in control_projections(
            eraser, n_random, dropout=dropout, random_directions=random_directions, seed=seed
        )
    ]
    conditions = [Condition("intact", None), *controls]
    sites, probe_hook = [], None
    if probe is not None:  # checked here, before any forward pass (review 42a F2)
        layer = parsed.layer if parsed is not None else None
        # A head's site has no whole-layer activation of its kind to probe (Site("head_out", l)
        # without a head is refused): probe the residual stream it writes to, as for "head".
        head_site = parsed is not None and parsed.kind in HEAD_KINDS
        kind = parsed.kind if parsed is not None and not head_site else "resid_post"
        sites = _probe_sites(model, hook, kind, layer, probe_layers)
        # The probe that reports the erased site itself: a head's is its layer's residual stream.
        if head_site and layer is not None:
            probe_hook = resolve_site(model, Site(kind, layer))[0]
        else:
            probe_hook = hook
        check_probe_data(probe)
        if probe_hook not in sites:
            # Review 43a S2: the headline's probe accuracies were None without a word.
            warn(
                f"probe_layers leaves out the erased site ({probe_hook}): the probe accuracy "
                "there before and after erasure (headline(), selectivity(), the sweep's probe "
                f"panel) is not measured; add layer {layer} to probe_layers to measure it.",
                UserWarning,
            )
    measures: list[AmnesicMeasure] = []
    counts: dict[str, int] = {}
    kw: dict[str, Any] = {"positions": positions, "batch_size": batch_size, "progress": progress}
    if text is not None:
        found, text_counts = text_measures(model, target, text, conditions, **kw)
        counts.update(text_counts)
        measures += found
    if task is not None:
        task_obj = load_task(task) if isinstance(task, str) else task
        if not isinstance(task_obj, Task):
            raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}.")
        measures += task_measures(model, target, task_obj, conditions, **kw)
        counts["task_items"] = len(task_obj)
    majority = None
    if probe is not None:
        info = information_measures(
            model,
            target,
            probe,
            [c for c in conditions if c.name != "dropout"],
            sites=sites,
            mlp=mlp,
            folds=probe_folds,
            seed=seed,
            **kw,
        )
        measures += info.measures
        majority = info.majority_baseline
        counts["probe_examples"] = info.n_examples
    return AmnesicResult(
        site=hook if target == hook else str(target),
        layer=parsed.layer if parsed is not None else block_of(hook),
        positions=positions if isinstance(positions, (int, str)) else tuple(positions),
        method=eraser.method,
        n_removed=eraser.n_removed,
        dim=eraser.dim,
        measures=tuple(measures),
        majority_baseline=majority,
        counts=counts,
        seed=seed,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        probe_hook=probe_hook,
    )


def _probe_sites(
    model: Any, hook: str, kind: str, layer: int | None, probe_layers: Layers | None
) -> list[str]:
    """Hook names to probe: the erased site first, then the chosen later layers of its kind.

    Raises:
        TypeError, ValueError: ``probe_layers`` is not a layer, layers or ``"all"`` (the erased
            layer and every later one), or holds a layer below the erased one.
    """
    n_layers = int(model.cfg.n_layers)
    if probe_layers is None:
        if layer is None:
            return [hook]
        later = list(range(layer + 1, n_layers))
        step = max(1, -(-len(later) // 4))
        chosen = later[::-1][::step][::-1]  # evenly spaced, always ending at the last layer
        probe_layers = [layer, *chosen]
    elif isinstance(probe_layers, str) and probe_layers == "all" and layer is not None:
        probe_layers = range(layer, n_layers)
    try:
        resolved = resolve_layers(model, probe_layers)
    except (TypeError, ValueError) as err:
        raise type(err)(f"probe_layers: {err}") from None
    names = [hook] if layer is None else []
    for lay in resolved:
        if layer is not None and lay < layer:
            raise ValueError(
                f"probe_layers holds layer {lay}, below the erased layer {layer}: an erasure "
                "cannot change earlier layers; pass layers >= the erased one."
            )
        names.append(resolve_site(model, Site(kind, lay))[0])  # type: ignore[arg-type]
    return list(dict.fromkeys(names))


def _hook_width(model: Any, hook: str) -> int | None:
    """Last-dimension width of any hook's activation, read off a one-token forward pass.

    A hook name that is not a site kind (``blocks.1.mlp.hook_post``: d_mlp wide) has no width in
    the config that fits every model; assuming d_model refused the right eraser and let a
    d_model-wide one fail mid-run. None where the hook does not fire.
    """
    one = torch.zeros((1, 1), dtype=torch.long)
    batch = Batch(one, torch.ones_like(one), "right", ("",))
    capture = Capture()
    with torch.no_grad(), intervene(model, {hook: capture}):
        forward(model, batch)
    return None if capture.value is None else int(capture.value.shape[-1])
