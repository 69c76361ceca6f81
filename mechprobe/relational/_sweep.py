"""Sweeping the o-vector intervention over layer sets and scales: a grid, its heatmap, a tuned rerun.

Merullo et al. fixed one range (GPT-2 medium: layers 18-23) and scale 1, noting that a single
layer needs 2-4x; reviewers asked for a principled choice. :func:`ovector_sweep` measures the
whole grid for the o-vector and its controls on the same contexts, so the choice can be read off
a figure instead of tuned by hand (and a random direction's grid sits beside it).
:func:`tuned_intervention` makes that choice honestly: it picks the best cell on some contexts
(the in-domain ones) and reruns every vector there on all of them, so the others (held-out) judge
the choice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from mechprobe.core import (
    Layers,
    Result,
    check_choice,
    check_int,
    evaluates,
    first_token_ids,
    literal,
    model_adapter,
    positions_text,
    progress_bar,
    tokenize,
)
from mechprobe.relational._deprecated import half_open_pairs, renamed_keywords
from mechprobe.relational._figure import axes_for
from mechprobe.relational._intervention import (
    Mode,
    OVectorEffect,
    WriterPositions,
    _evaluate,
    _layers,
    _pairs,
    _positions,
    _scales,
    _span,
    _spec,
    _unambiguous,
    _vectors,
    ovector_intervention,
    warn_unspaced,
)
from mechprobe.relational._ovector import OVector

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OVectorSweep", "ovector_sweep", "tuned_intervention"]

_METRICS = ("top1", "mrr", "mean_rank", "no_effect")
# Metrics where a lower value means the vector moved the answer more (a rank, a no-effect rate).
_LOWER_IS_BETTER = ("mean_rank", "no_effect")


@dataclass(frozen=True, eq=False, repr=False)
class OVectorSweep(Result, format="mechprobe.OVectorSweep", version=1, html_figure=True):
    """Metrics of each vector for every (layer set, scale) cell, and the intact baseline.

    Formerly ``SweepResult``, whose cells were ``layer_ranges`` (half-open ``(start, stop)``
    pairs); a cell's layers are now listed.

    Attributes:
        layers: The layer set of each row of the grid, e.g. ``(18, 19, 20, 21, 22, 23)``.
        scales: The scales tried.
        conditions: The vectors' names.
        top1: ``[condition, layer set, scale]`` fraction of contexts whose top token is the answer.
        mrr: ``[condition, layer set, scale]`` mean reciprocal rank of the answer.
        mean_rank: ``[condition, layer set, scale]`` mean 0-based rank of the answer.
        no_effect: ``[condition, layer set, scale]`` fraction of contexts whose top token is
            unchanged.
        before: Intact-model metrics (``top1``, ``mrr``, ``mean_rank``, ``no_effect``).
        mode: ``"replace"`` or ``"add"``.
        n_contexts: Number of contexts.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        positions: The positions edited (``"all"``, an int or several); None in files saved
            before results recorded them.

    Example:
        >>> import torch, mechprobe as mp
        >>> ctx = mp.random_word_contexts([" Poland", " Chile"])
        >>> grid = mp.ovector_sweep(mp.tiny_model(), {"ovector": torch.ones(64)}, ctx,
        ...                         [" Warsaw", " Santiago"], layers=[range(1, 3), 2])
        >>> grid.layers, grid.top1.shape
        (((1, 2), (2,)), (1, 2, 4))
    """

    layers: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]
    conditions: tuple[str, ...]
    top1: Float[np.ndarray, "condition layers scale"]
    mrr: Float[np.ndarray, "condition layers scale"]
    mean_rank: Float[np.ndarray, "condition layers scale"]
    no_effect: Float[np.ndarray, "condition layers scale"]
    before: dict[str, float]
    mode: str
    n_contexts: int
    model_name: str = ""
    model_dtype: str = ""
    positions: str | int | tuple[int, ...] | None = None

    def best(
        self, condition: str = "ovector", metric: str = "mrr"
    ) -> tuple[tuple[int, ...], float]:
        """The (layer set, scale) cell where ``condition`` scores best on ``metric``: highest,
        lowest for ``mean_rank`` and ``no_effect`` (the first such cell on ties).

        ``metric`` defaults to ``"mrr"``, the metric the repr, :func:`tuned_intervention` and
        :func:`mechprobe.relational_analysis` choose cells by (top-1 ties at 0 on most cells
        of a weak vector, where the first cell would win by order alone).

        Args:
            condition: The vector's name, one of :attr:`conditions`.
            metric: ``"mrr"``, ``"top1"``, ``"mean_rank"`` or ``"no_effect"``.

        Returns:
            ``(layers, scale)``: the cell's layer set and scale.

        Raises:
            KeyError: No such condition.
            ValueError: An unknown ``metric``.
        """
        grid = self._grid(condition, metric)
        r, s = np.unravel_index(
            int(np.argmax(-grid if metric in _LOWER_IS_BETTER else grid)), grid.shape
        )
        return self.layers[int(r)], self.scales[int(s)]

    def _grid(self, condition: str, metric: str) -> np.ndarray:
        check_choice(metric, "metric", _METRICS)
        if condition not in self.conditions:
            raise KeyError(f"No condition {condition!r}; conditions: {list(self.conditions)}.")
        return np.asarray(getattr(self, metric)[self.conditions.index(condition)])

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: condition, layers (``"24-29"``), start and stop (the layer set's span,
        half-open), scale, mode and positions (how and where the vector was written: two sweeps'
        frames concatenate and still tell apart) and the four metrics."""
        rows = []
        for c, name in enumerate(self.conditions):
            for r, cell in enumerate(self.layers):
                for s, scale in enumerate(self.scales):
                    rows.append(
                        {
                            "condition": name,
                            "layers": _span(cell),
                            "start": cell[0],
                            "stop": cell[-1] + 1,
                            "scale": scale,
                            "mode": self.mode,
                            "positions": positions_text(self.positions),
                        }
                        | {m: float(getattr(self, m)[c, r, s]) for m in _METRICS}
                    )
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """Each condition's best cell by MRR (layers, scale and its four metrics), then the intact
        model's metrics."""
        rows = []
        for c, name in enumerate(self.conditions):
            cell, scale = self.best(name, "mrr")
            r, s = self.layers.index(cell), self.scales.index(scale)
            rows.append(
                {"condition": name, "layers": _span(cell), "scale": scale}
                | {m: float(getattr(self, m)[c, r, s]) for m in _METRICS}
            )
        rows.append({"condition": "intact", "layers": "", "scale": float("nan")} | self.before)
        return pd.DataFrame(rows)

    def plot(
        self, ax: Axes | None = None, *, metric: str = "top1", condition: str | None = None
    ) -> Figure:
        """One heatmap per condition: layer sets down, scales across, cells annotated.

        Given ``ax`` (or ``condition``), only that condition's heatmap (default: the first
        condition) is drawn, into ``ax`` or a new figure.

        Args:
            ax: Draw one condition's heatmap into these axes (default: a new figure).
            metric: ``"top1"``, ``"mrr"``, ``"mean_rank"`` or ``"no_effect"``.
            condition: The condition drawn alone (None: every condition, or with ``ax`` the first).

        Returns:
            The figure drawn into (``ax``'s, when given), with its colour bar.
        """
        check_choice(metric, "metric", _METRICS)
        # Rates on their whole range: scaled to the data, a top-1 rate of 0.08 was as bright as
        # 1.0 would be (and an all-zero sweep got a colour bar from 0 to 1e-9).
        vmax = 1.0
        if metric == "mean_rank":
            vmax = max(float(np.nanmax(self.mean_rank)), self.before.get(metric, 0.0), 1.0)
        if ax is not None or condition is not None:
            name = condition if condition is not None else self.conditions[0]
            fig, one = axes_for(ax, (3.8, 0.28 * len(self.layers) + 1.6), "OVectorSweep.plot")
            image = self._heatmap(one, name, metric, vmax)
            one.set_ylabel("FFN layers written")
            fig.colorbar(image, ax=one, shrink=0.8, label=literal(metric))
            return fig
        from matplotlib.figure import Figure

        n = len(self.conditions)
        fig = Figure(figsize=(2.2 * n + 1.6, 0.28 * len(self.layers) + 1.6), layout="constrained")
        axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
        image = None
        for panel, name in zip(axes, self.conditions, strict=True):
            image = self._heatmap(panel, name, metric, vmax)
        axes[0].set_ylabel("FFN layers written")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label=metric)
        fig.suptitle(
            f"{metric} of the answer after {self.mode} ({self.n_contexts} contexts); intact: "
            f"{self.before.get(metric, float('nan')):.2f}",
            fontsize=9,
        )
        return fig

    def _heatmap(self, ax: Axes, name: str, metric: str, vmax: float) -> Any:
        grid = self._grid(name, metric)
        lower = metric in _LOWER_IS_BETTER  # drawn reversed: a bright cell is a better one
        cmap = "viridis_r" if lower else "viridis"
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
        ax.set_xticks(range(len(self.scales)), [f"{s:g}" for s in self.scales])
        ax.set_yticks(range(len(self.layers)), [_span(c) for c in self.layers], fontsize=7)
        ax.set_xlabel("scale")
        ax.set_title(literal(name), fontsize=9)
        for (r, s), v in np.ndenumerate(grid):
            text = f"{v:.0f}" if metric == "mean_rank" else f"{v:.2f}"
            light = v > 0.4 * vmax if lower else v < 0.6 * vmax
            ax.text(s, r, text, ha="center", va="center", fontsize=6,
                    color="white" if light else "black")  # fmt: skip
        return image

    def _describe(self) -> str:
        words = (
            f"{len(self.conditions)} conditions x {len(self.layers)} layer sets x "
            f"{len(self.scales)} scales on {self.n_contexts} contexts"
        )
        if not self.conditions:
            return words
        name = self.conditions[0]
        cell, scale = self.best(name, "mrr")
        mrr = self.mrr[0, self.layers.index(cell), self.scales.index(scale)]
        return f"{words}; {name} best MRR {mrr:.2f} at layers {_span(cell)} x{scale:g}"


@renamed_keywords(layer_ranges=("layers", half_open_pairs))
@evaluates
def ovector_sweep(
    model: Any,
    vectors: Mapping[str, OVector | torch.Tensor | np.ndarray],
    contexts: Sequence[str],
    targets: Sequence[str],
    *,
    layers: Sequence[Layers],
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    mode: Mode = "replace",
    positions: WriterPositions = "all",
    batch_size: int | None = 32,
    progress: bool = True,
) -> OVectorSweep:
    """The o-vector intervention at every (layer set, scale) cell, each vector on the same contexts.

    Costs one forward pass over the contexts per cell and vector, plus one intact pass.

    The grid varies where the vectors are written and how much; where an o-vector is *read* is
    a vector of its own: pass one per read layer, e.g. ``{f"o@{l}": mp.fit_ovector(passes, l)
    for l in (24, 26, 28)}``, and each gets its own ``[layer set, scale]`` grid.

    Args:
        model: A TransformerLens model.
        vectors: ``{name: vector}`` (each an :class:`OVector` or a ``[d_model]`` tensor or
            array), e.g. the o-vector and a random control, or o-vectors read at several layers.
        contexts: Contexts to score (see :func:`mechprobe.random_word_contexts`).
        targets: The answer for each context.
        layers: One layer set per row of the grid; each is an int, a range, a list of ints or
            ``"all"``, e.g. ``[range(s, n_layers) for s in range(20, 30)]``. (A tuple such as
            ``(18, 24)`` is refused as ambiguous: say ``range(18, 24)`` or ``[18, 24]``. The old
            ``layer_ranges=`` of ``(start, stop)`` pairs still works for one release.)
        scales: Scales to try (finite).
        mode: ``"replace"`` or ``"add"`` (see :func:`mechprobe.ovector_intervention`).
        positions: Positions to edit: ``"all"``, an int or a list of ints.
        batch_size: Rows per forward pass.
        progress: Show a progress bar over cells (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        An :class:`OVectorSweep`: ``top1``, ``mrr``, ``mean_rank`` and ``no_effect`` are
        ``[n_vectors, n_layer_sets, n_scales]`` grids (vectors in the order of ``vectors``), and
        ``before`` holds the intact model's numbers.

    Raises:
        ValueError: ``layers`` is not a non-empty list of layer sets, or a layer set is
            ambiguous; as :func:`mechprobe.ovector_intervention` for the vectors, scales,
            contexts and targets.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> ctx = mp.random_word_contexts([" Poland", " Chile"])
        >>> grid = mp.ovector_sweep(model, {"ovector": torch.randn(64)}, ctx, [" Warsaw", " Santiago"],
        ...                         layers=[range(1, 3), range(2, 3)], scales=[1.0, 2.0])
        >>> grid.top1.shape
        (1, 2, 2)
    """
    check_choice(mode, "mode", ("replace", "add"))
    contexts, targets = _pairs(contexts, targets)
    if isinstance(layers, (str, int, range)) or not list(layers):
        raise ValueError(
            f"layers is a list of layer sets, one per row of the grid (e.g. [range(18, 24), "
            f"range(20, 24), 23]), not {layers!r}."
        )
    vecs = _vectors(vectors, model)
    scale_tuple = _scales(scales, "scales")
    where = _positions(positions, "ovector_sweep")
    cells = tuple(_layers(model, _unambiguous(cell, "A sweep's layer set")) for cell in layers)
    batch = tokenize(model, contexts)
    warn_unspaced(targets, "targets")
    target_ids = torch.as_tensor(first_token_ids(model, targets))
    no_args = torch.full((len(contexts),), -1)
    rank0, _, top0 = _evaluate(model, batch, target_ids, no_args, None, batch_size)
    shape = (len(vecs), len(cells), len(scale_tuple))
    grids = {m: np.zeros(shape) for m in _METRICS}
    grid_cells = [
        (c, r, s) for c in range(len(vecs)) for r in range(len(cells)) for s in range(shape[2])
    ]
    names = list(vecs)
    for c, r, s in progress_bar(grid_cells, progress=progress, desc="sweep"):
        spec = _spec(vecs[names[c]], cells[r], scale_tuple[s], mode, where)
        rank, _, top = _evaluate(model, batch, target_ids, no_args, spec, batch_size)
        grids["top1"][c, r, s] = np.mean(rank == 0)
        grids["mrr"][c, r, s] = np.mean(1.0 / (rank + 1.0))
        grids["mean_rank"][c, r, s] = np.mean(rank)
        grids["no_effect"][c, r, s] = np.mean(top == top0)
    before = {
        "top1": float(np.mean(rank0 == 0)),
        "mrr": float(np.mean(1.0 / (rank0 + 1.0))),
        "mean_rank": float(np.mean(rank0)),
        "no_effect": 1.0,
    }
    return OVectorSweep(
        layers=cells,
        scales=scale_tuple,
        conditions=tuple(names),
        **grids,
        before=before,
        mode=mode,
        n_contexts=len(contexts),
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        positions=where,
    )


@evaluates
def tuned_intervention(
    model: Any,
    vectors: Mapping[str, OVector | torch.Tensor | np.ndarray],
    contexts: Sequence[str],
    targets: Sequence[str],
    *,
    layers: Sequence[Layers],
    scales: Sequence[float] = (1.0, 2.0, 4.0),
    choose_on: Sequence[int] | None = None,
    swept: Sequence[str] | None = None,
    condition: str = "ovector",
    metric: str = "mrr",
    mode: Mode = "replace",
    positions: WriterPositions = "all",
    arguments: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int | None = 32,
    progress: bool = True,
) -> tuple[OVectorSweep, OVectorEffect]:
    """Choose the (layer set, scale) cell on some contexts, then rerun every vector there on all.

    The sweep (:func:`ovector_sweep`) runs ``swept`` vectors on the contexts ``choose_on``; the cell
    where ``condition`` scores best on ``metric`` is then used by :func:`ovector_intervention`
    for every vector on every context, so the contexts left out of the choice (e.g. held-out
    arguments) judge it.

    Args:
        model: A TransformerLens model.
        vectors: ``{name: vector}`` (each an :class:`OVector` or a ``[d_model]`` tensor or
            array): the o-vector and its controls.
        contexts: Contexts to score (see :func:`mechprobe.random_word_contexts`).
        targets: The answer for each context.
        layers: The layer sets of the sweep (see :func:`ovector_sweep`).
        scales: The scales of the sweep.
        choose_on: Indices of the contexts the cell is chosen on, or a boolean mask over them
            (None: all of them).
        swept: The vectors swept (None: all; the analysis sweeps the o-vector and one random
            control).
        condition: The vector whose best cell is chosen.
        metric: ``"mrr"``, ``"top1"``, ``"mean_rank"`` or ``"no_effect"``.
        mode: ``"replace"`` or ``"add"``.
        positions: Positions to edit: ``"all"``, an int or a list of ints.
        arguments: Optional arguments of the contexts (their ranks are reported).
        groups: Optional label per context (e.g. ``"in_domain"`` / ``"held_out"``).
        batch_size: Rows per forward pass.
        progress: Show progress bars (``MECHPROBE_PROGRESS=0`` silences them).

    Returns:
        ``(sweep, effect)``: the :class:`OVectorSweep` of the ``swept`` vectors on the
        ``choose_on`` contexts (grids ``[n_swept, n_layer_sets, n_scales]``), and the
        :class:`OVectorEffect` of every vector on every context at the cell where
        ``condition`` scored best (its ``layers`` and ``scale``).

    Example:
        >>> import torch, mechprobe as mp
        >>> ctx = mp.random_word_contexts([" Poland", " Chile"])
        >>> grid, tuned = mp.tuned_intervention(
        ...     mp.tiny_model(), {"ovector": torch.ones(64)}, ctx, [" Warsaw", " Santiago"],
        ...     layers=[range(1, 3), 2], scales=[1.0], choose_on=[0])
        >>> grid.n_contexts, tuned.layers == grid.best("ovector", "mrr")[0]
        (1, True)
    """
    check_choice(metric, "metric", _METRICS)
    names = list(vectors) if swept is None else list(swept)
    missing = [n for n in [*names, condition] if n not in vectors]
    if missing:
        raise ValueError(f"No vector named {missing}; vectors: {list(vectors)}.")
    if condition not in names:  # its best cell is read off the sweep
        raise ValueError(
            f"condition {condition!r} is not swept (swept={names}): add it to swept, or choose "
            "the condition among them."
        )
    contexts, targets = _pairs(contexts, targets)
    pick = list(range(len(contexts))) if choose_on is None else _picked(choose_on, len(contexts))
    if not pick:
        raise ValueError("choose_on is empty: give the contexts the cell is chosen on.")
    sweep = ovector_sweep(
        model,
        {n: vectors[n] for n in names},
        [contexts[i] for i in pick],
        [targets[i] for i in pick],
        layers=layers,
        scales=scales,
        mode=mode,
        positions=positions,
        batch_size=batch_size,
        progress=progress,
    )
    cell, scale = sweep.best(condition, metric)
    effect = ovector_intervention(
        model,
        vectors,
        contexts,
        targets,
        layers=list(cell),
        scale=scale,
        mode=mode,
        positions=positions,
        arguments=arguments,
        groups=groups,
        batch_size=batch_size,
        progress=progress,
    )
    return sweep, effect


def _picked(choose_on: Any, n: int) -> list[int]:
    """Context indices from ``choose_on``: a boolean mask over the ``n`` contexts, or indices
    (each once, in range; a 0/1 integer array is indices, not a mask)."""
    chosen = np.asarray(choose_on)
    if chosen.dtype == bool:
        if chosen.shape != (n,):
            raise ValueError(f"choose_on is a mask of {chosen.shape}; there are {n} contexts.")
        return np.flatnonzero(chosen).tolist()
    index = [check_int(i, "choose_on", -n, n - 1) % n for i in chosen.ravel()]
    if len(set(index)) != len(index):
        raise ValueError(
            "choose_on repeats a context: pass each index once, or a boolean mask (a 0/1 integer "
            "array is read as indices)."
        )
    return index
