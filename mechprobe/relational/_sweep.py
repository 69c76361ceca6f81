"""Sweeping the o-vector intervention over layer ranges and scales: a grid and its heatmap.

Merullo et al. fixed one range (GPT-2 medium: layers 18-23) and scale 1, noting that a single
layer needs 2-4x; reviewers asked for a principled choice. :func:`ovector_sweep` measures the
whole grid for the o-vector and its controls on the same contexts, so the choice can be read off
a figure instead of tuned by hand (and a random direction's grid sits beside it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from mechprobe.core import Positions, first_token_ids, tokenize
from mechprobe.relational._intervention import Mode, _evaluate, _layers, _spec, _vector
from mechprobe.relational._ovector import OVector

__all__ = ["SweepResult", "ovector_sweep"]

_METRICS = ("top1", "mrr", "mean_rank", "no_effect")


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Metrics of each vector for every (layer range, scale) cell, and the intact baseline.

    Attributes:
        layer_ranges: ``(start, stop)`` pairs, half-open (``(18, 24)`` edits layers 18-23).
        scales: The scales tried.
        conditions: The vectors' names.
        top1: ``[condition, range, scale]`` fraction of contexts whose top token is the answer.
        mrr: ``[condition, range, scale]`` mean reciprocal rank of the answer.
        mean_rank: ``[condition, range, scale]`` mean 0-based rank of the answer.
        no_effect: ``[condition, range, scale]`` fraction of contexts whose top token is unchanged.
        before: Intact-model metrics (``top1``, ``mrr``, ``mean_rank``).
        mode: ``"replace"`` or ``"add"``.
        n_contexts: Number of contexts.
    """

    layer_ranges: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    conditions: tuple[str, ...]
    top1: Float[np.ndarray, "condition range scale"]
    mrr: Float[np.ndarray, "condition range scale"]
    mean_rank: Float[np.ndarray, "condition range scale"]
    no_effect: Float[np.ndarray, "condition range scale"]
    before: dict[str, float]
    mode: str
    n_contexts: int

    def best(
        self, condition: str = "ovector", metric: str = "top1"
    ) -> tuple[tuple[int, int], float]:
        """The (layer range, scale) cell where ``condition`` scores highest on ``metric``."""
        grid = self._grid(condition, metric)
        r, s = np.unravel_index(
            int(np.argmax(-grid if metric == "mean_rank" else grid)), grid.shape
        )
        return self.layer_ranges[int(r)], self.scales[int(s)]

    def _grid(self, condition: str, metric: str) -> np.ndarray:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
        if condition not in self.conditions:
            raise KeyError(f"No condition {condition!r}; conditions: {list(self.conditions)}.")
        return np.asarray(getattr(self, metric)[self.conditions.index(condition)])

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: condition, start, stop, scale and the four metrics."""
        rows = []
        for c, name in enumerate(self.conditions):
            for r, (start, stop) in enumerate(self.layer_ranges):
                for s, scale in enumerate(self.scales):
                    rows.append(
                        {"condition": name, "start": start, "stop": stop, "scale": scale}
                        | {m: float(getattr(self, m)[c, r, s]) for m in _METRICS}
                    )
        return pd.DataFrame(rows)

    def plot(self, metric: str = "top1") -> Figure:
        """One heatmap per condition: layer ranges down, scales across, cells annotated."""
        n = len(self.conditions)
        fig = Figure(
            figsize=(2.2 * n + 1.6, 0.28 * len(self.layer_ranges) + 1.6), layout="constrained"
        )
        vmax = max(float(np.nanmax(getattr(self, metric))), self.before.get(metric, 0.0), 1e-9)
        labels = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in self.layer_ranges]
        cmap = "viridis_r" if metric == "mean_rank" else "viridis"
        axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
        image = None
        for ax, name in zip(axes, self.conditions, strict=True):
            grid = self._grid(name, metric)
            image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax)
            ax.set_xticks(range(len(self.scales)), [f"{s:g}" for s in self.scales])
            ax.set_yticks(range(len(self.layer_ranges)), labels, fontsize=7)
            ax.set_xlabel("scale")
            ax.set_title(name, fontsize=9)
            for (r, s), v in np.ndenumerate(grid):
                text = f"{v:.0f}" if metric == "mean_rank" else f"{v:.2f}"
                light = v < 0.6 * vmax if metric != "mean_rank" else v > 0.4 * vmax
                ax.text(s, r, text, ha="center", va="center", fontsize=6,
                        color="white" if light else "black")  # fmt: skip
        axes[0].set_ylabel("FFN layers written")
        if image is not None:
            fig.colorbar(image, ax=list(axes), shrink=0.8, label=metric)
        fig.suptitle(
            f"{metric} of the answer after {self.mode} ({self.n_contexts} contexts); intact: "
            f"{self.before.get(metric, float('nan')):.2f}",
            fontsize=9,
        )
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_dict`)."""
        return {
            "layer_ranges": [list(r) for r in self.layer_ranges],
            "scales": list(self.scales),
            "conditions": list(self.conditions),
            **{m: getattr(self, m).tolist() for m in _METRICS},
            "before": self.before,
            "mode": self.mode,
            "n_contexts": self.n_contexts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepResult:
        """Rebuild a sweep from :meth:`to_dict`'s output."""
        return cls(
            layer_ranges=tuple((int(a), int(b)) for a, b in data["layer_ranges"]),
            scales=tuple(float(s) for s in data["scales"]),
            conditions=tuple(data["conditions"]),
            **{m: np.asarray(data[m], dtype=np.float64) for m in _METRICS},
            before={k: float(v) for k, v in data["before"].items()},
            mode=str(data["mode"]),
            n_contexts=int(data["n_contexts"]),
        )


def ovector_sweep(
    model: Any,
    vectors: Mapping[str, OVector | torch.Tensor | np.ndarray],
    contexts: Sequence[str],
    targets: Sequence[str],
    *,
    layer_ranges: Sequence[tuple[int, int]],
    scales: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    mode: Mode = "replace",
    positions: Positions = None,
    batch_size: int | None = 32,
    progress: bool = False,
) -> SweepResult:
    """The o-vector intervention at every (layer range, scale) cell, each vector on the same contexts.

    Costs one forward pass over the contexts per cell and vector, plus one intact pass.

    Args:
        model: A TransformerLens model.
        vectors: ``{name: vector}``, e.g. the o-vector and a random control.
        contexts: Contexts to score (see :func:`mechprobe.intervention_contexts`).
        targets: The answer for each context.
        layer_ranges: Half-open ``(start, stop)`` layer ranges, e.g. ``[(s, n_layers) for s in
            range(20, 30)]``.
        scales: Scales to try.
        mode: ``"replace"`` or ``"add"`` (see :func:`mechprobe.ovector_intervention`).
        positions: Positions to edit (None: all).
        batch_size: Rows per forward pass.
        progress: Show a progress bar over cells.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> ctx = mp.intervention_contexts([" Poland", " Chile"])
        >>> grid = mp.ovector_sweep(model, {"ovector": torch.randn(64)}, ctx, [" Warsaw", " Santiago"],
        ...                         layer_ranges=[(1, 3), (2, 3)], scales=[1.0, 2.0])
        >>> grid.top1.shape
        (1, 2, 2)
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}.")
    if len(contexts) != len(targets) or not contexts:
        raise ValueError("Pass one target per context, at least one context.")
    if not layer_ranges or not scales:
        raise ValueError("layer_ranges and scales must both be non-empty.")
    width = int(model.cfg.d_model)
    vecs = {name: _vector(v, name, width) for name, v in vectors.items()}
    ranges = []
    for start, stop in layer_ranges:
        if not start < stop:
            raise ValueError(f"Layer range ({start}, {stop}) is empty: use start < stop.")
        _layers(model, range(start, stop))
        ranges.append((int(start), int(stop)))
    batch = tokenize(model, list(contexts))
    target_ids = torch.as_tensor(first_token_ids(model, list(targets)))
    no_args = torch.full((len(contexts),), -1)
    rank0, _, top0 = _evaluate(model, batch, target_ids, no_args, None, batch_size)
    shape = (len(vecs), len(ranges), len(scales))
    grids = {m: np.zeros(shape) for m in _METRICS}
    cells = [
        (c, r, s) for c in range(len(vecs)) for r in range(len(ranges)) for s in range(len(scales))
    ]
    names = list(vecs)
    for c, r, s in tqdm(cells, disable=not progress, desc="sweep"):
        spec = _spec(vecs[names[c]], range(*ranges[r]), float(scales[s]), mode, positions)
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
    return SweepResult(
        layer_ranges=tuple(ranges),
        scales=tuple(float(s) for s in scales),
        conditions=tuple(names),
        **grids,
        before=before,
        mode=mode,
        n_contexts=len(contexts),
    )
