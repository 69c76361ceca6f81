"""Removing FFNs top-down: abstractive tasks should suffer much more than extractive ones.

Merullo et al. remove the FFN (MLP) blocks of the top sixth, third, ... of the network and plot
the accuracy of an abstractive task (the answer must be recalled) beside its extractive version
(the answer is in the prompt). :func:`ffn_ablation` measures both curves; nothing is assumed.

Step ``k`` of ``parts`` ablates the top ``round(k * n_layers / parts)`` layers (half rounded up),
so with 30 layers and sixths: none, 25-29, 20-29, ..., 0-29. ``"zero"`` sets the FFN output to 0;
``"mean"`` sets it to its mean over the task's prompts (every real token but the first, BOS,
whose FFN outputs are outliers in many models; never a pad), computed in the intact pass and
handed to :class:`mechprobe.Ablate` explicitly, so it depends on neither the padding nor
``batch_size``. Both act at every position unless ``positions`` says otherwise (Merullo et al.
replaced the whole FFN).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechprobe.core import (
    Ablate,
    Batch,
    Intervention,
    InterventionSpec,
    Result,
    Site,
    check_choice,
    check_finite,
    check_int,
    evaluates,
    first_token_ids,
    forward,
    intervene,
    literal,
    model_adapter,
    positions_text,
    progress_bar,
    run,
    tokenize,
    top1_hit,
)
from mechprobe.relational._figure import axes_for
from mechprobe.relational._intervention import WriterPositions, _core_positions, _positions
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AblationMethod", "AblationResult", "ffn_ablation"]

#: How an FFN output is removed: set to zero, or to its mean over the task's real tokens.
AblationMethod = Literal["zero", "mean"]


@dataclass(frozen=True, eq=False, repr=False)
class AblationResult(Result, format="mechprobe.AblationResult", version=1, html_figure=True):
    """First-token accuracy of each task as FFNs are removed top-down.

    Attributes:
        tasks: Task names.
        kinds: Their kinds (``abstractive`` / ``extractive``).
        n_items: Items per task.
        removed: Per step, the layers whose FFN was ablated (step 0: none).
        accuracy: ``[task, step]`` greedy first-token accuracy (a tie for first is a miss, so
            it can differ from ``predicted == answer`` on tied logits).
        predicted: Per task, ``[step, item]`` the greedy token ids.
        method: ``"zero"`` or ``"mean"``.
        parts: Number of steps after the intact one (6: sixths).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        positions: The positions ablated (``"all"``, an int or several); None in files saved
            before results recorded them.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.ffn_ablation(mp.tiny_model(), [mp.load_task("capitals").subset(3)], parts=3)
        >>> res.accuracy.shape, res.removed[-1]
        ((1, 4), (0, 1, 2))
        >>> res
        AblationResult(1 task(s) x 4 steps (zero, thirds); capitals: 0.00 intact -> 0.00 all removed)
    """

    tasks: tuple[str, ...]
    kinds: tuple[str, ...]
    n_items: tuple[int, ...]
    removed: tuple[tuple[int, ...], ...]
    accuracy: Float[np.ndarray, "task step"]
    predicted: tuple[Int[np.ndarray, "step item"], ...]
    method: str
    parts: int
    model_name: str = ""
    model_dtype: str = ""
    positions: str | int | tuple[int, ...] | None = None

    @property
    def fraction_removed(self) -> Float[np.ndarray, " step"]:
        """Fraction of layers whose FFN is ablated at each step."""
        n = max(len(self.removed[-1]), 1)
        return np.asarray([len(r) / n for r in self.removed])

    def relative(self) -> Float[np.ndarray, "task step"]:
        """Accuracy divided by the intact accuracy (NaN where that is 0)."""
        base = self.accuracy[:, :1]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(base > 0, self.accuracy / np.where(base > 0, base, 1), np.nan)

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: task, task_kind (``"extractive"`` or ``"abstractive"``; ``kind`` in frames
        is a site kind), positions (ablated: ``"all"``, ``"-1"``), step, ``n_layers_removed``
        (the top FFN layers ablated; an eraser's ``n_removed`` counts directions),
        first_removed, accuracy, relative."""
        rel = self.relative()
        rows = []
        for t, name in enumerate(self.tasks):
            for k, layers in enumerate(self.removed):
                rows.append(
                    {
                        "task": name,
                        "task_kind": self.kinds[t],
                        "positions": positions_text(self.positions),
                        "step": k,
                        "n_layers_removed": len(layers),
                        "first_removed": min(layers) if layers else None,
                        "accuracy": float(self.accuracy[t, k]),
                        "relative": float(rel[t, k]),
                    }
                )
        frame = pd.DataFrame(rows)
        if len(frame):  # a layer index: an integer, <NA> at the intact step
            frame["first_removed"] = frame["first_removed"].astype("Int64")
        return frame

    def summary(self) -> pd.DataFrame:
        """One row per task: its kind (``task_kind``), positions, items, and accuracy at each step (columns ``removed 0``,
        ``removed 5``, ...: the number of top layers whose FFN was ablated; steps that round to the
        same layers, with more parts than layers, share one column)."""
        rows = []
        for t, name in enumerate(self.tasks):
            row: dict[str, Any] = {
                "task": name,
                "task_kind": self.kinds[t],
                "positions": positions_text(self.positions),
                "n_items": self.n_items[t],
            }
            for k, layers in enumerate(self.removed):
                row[f"removed {len(layers)}"] = float(self.accuracy[t, k])
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self, ax: Axes | None = None, *, relative: bool = False) -> Figure:
        """Accuracy (or accuracy relative to intact) against the fraction of FFNs removed (into
        ``ax`` when given).

        Args:
            ax: Draw into these axes (default: a new figure).
            relative: Draw the accuracy relative to the intact model's (:meth:`relative`).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        fig, ax = axes_for(ax, (5.5, 3.6), "AblationResult.plot")
        values = self.relative() if relative else self.accuracy
        x = self.fraction_removed
        # Offset a little and see-through: tasks at the same accuracy (often 0) hid each other.
        step = float(np.min(np.diff(x))) if len(x) > 1 else 1.0
        for t, name in enumerate(self.tasks):
            style = "o-" if self.kinds[t] == "abstractive" else "s--"
            shift = (t - (len(self.tasks) - 1) / 2) * 0.04 * step
            missing = (
                " (intact 0: not drawn)" if relative and not np.isfinite(values[t]).any() else ""
            )
            ax.plot(
                x + shift,
                values[t],
                style,
                alpha=0.8,
                label=literal(f"{name} ({self.kinds[t]}){missing}"),
            )
        ticks = [f"{k}/{self.parts}" for k in range(self.parts + 1)]
        ax.set_xticks(x, ticks)
        ax.set_xlabel("FFNs removed, top-down (fraction of layers)")
        ax.set_ylabel("accuracy / intact" if relative else "first-token accuracy")
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        ax.set_ylim(0, max(1.05, top + 0.05))
        # The title said "at every position" for positions=-1 too.
        where = {None: "", "all": " at every position"}.get(
            positions_text(self.positions), f" at positions {positions_text(self.positions)}"
        )
        ax.set_title(f"{self.method}-ablating FFN outputs{where}", fontsize=9)
        ax.legend(fontsize=8)
        return fig

    def _describe(self) -> str:
        parts = {2: "halves", 3: "thirds", 4: "quarters", 6: "sixths"}.get(
            self.parts, f"{self.parts} parts"
        )
        where = positions_text(self.positions)
        at = "" if where in (None, "all") else f", positions {where}"
        head = f"{len(self.tasks)} task(s) x {len(self.removed)} steps ({self.method}, {parts}{at})"
        if not self.tasks:
            return head
        return (
            f"{head}; {self.tasks[0]}: {self.accuracy[0, 0]:.2f} intact -> "
            f"{self.accuracy[0, -1]:.2f} all removed"
        )


class _MaskedSum(Intervention):
    """Accumulate the sum and count of an activation over the real tokens of each chunk."""

    def __init__(self) -> None:
        super().__init__(None)
        self.mask: Tensor | None = None
        self.total: Tensor | None = None
        self.count = 0

    def edit(self, selected: Tensor, hook: Any) -> None:
        assert self.mask is not None
        m = self.mask.to(selected.device, selected.dtype)[..., None]
        part = (selected * m).sum(dim=(0, 1)).double()
        self.total = part if self.total is None else self.total + part
        self.count += int(self.mask.sum())
        return None


def _removed(n_layers: int, parts: int) -> list[tuple[int, ...]]:
    counts = [int(np.floor(k * n_layers / parts + 0.5)) for k in range(parts + 1)]
    return [tuple(range(n_layers - c, n_layers)) for c in counts]


def _intact_pass(
    model: Any, batch: Batch, first: Tensor, want_means: bool, batch_size: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Last-token logits argmax, whether the answer's first token ``first`` alone tops them,
    and, for mean-ablation, each layer's mean FFN output."""
    n_layers = int(model.cfg.n_layers)
    sums = [_MaskedSum() for _ in range(n_layers)] if want_means else []
    spec: InterventionSpec = {Site("mlp_out", layer): acc for layer, acc in enumerate(sums)}
    preds, hits = [], []
    with torch.no_grad():
        for chunk_rows, chunk in batch.chunks(batch_size):
            mask = chunk.attention_mask.clone()
            if getattr(model.cfg, "default_prepend_bos", True):
                mask[torch.arange(len(chunk)), chunk.offset] = 0  # leave BOS out of the mean
            for acc in sums:
                acc.mask = mask
            with intervene(model, spec, batch=chunk):
                logits = forward(model, chunk)
            last = logits[torch.arange(len(chunk)), chunk.last_index]
            check_finite(last, "The intact model's logit tensor at the prompts' last token")
            preds.append(last.argmax(-1))
            hits.append(top1_hit(last, first[chunk_rows]))
    means = None
    if want_means:
        if any(acc.total is None or acc.count == 0 for acc in sums):
            raise ValueError("No real tokens to average over: the prompts are only BOS.")
        means = torch.stack(
            [(acc.total / acc.count).float() for acc in sums if acc.total is not None]
        )
    return torch.cat(preds), torch.cat(hits).cpu(), means


@evaluates
def ffn_ablation(
    model: Any,
    tasks: Task | str | os.PathLike[str] | Sequence[Task | str | os.PathLike[str]],
    *,
    parts: int = 6,
    method: AblationMethod = "zero",
    positions: WriterPositions = "all",
    batch_size: int | None = 32,
    progress: bool = True,
) -> AblationResult:
    """Accuracy of each task with the FFNs of the top 0, 1/parts, ..., all layers ablated.

    Args:
        model: A TransformerLens model.
        tasks: One or more tasks (e.g. an abstractive task and its extractive version).
        parts: Steps (6: sixths, as Merullo et al.).
        method: ``"zero"`` or ``"mean"`` (see the module docstring).
        positions: Positions to ablate: ``"all"`` (as in the paper), an int (``-1``: each
            prompt's last token) or a list of ints.
        batch_size: Rows per forward pass.
        progress: Show a progress bar over tasks and steps (``MECHPROBE_PROGRESS=0`` silences
            it).

    Returns:
        An :class:`AblationResult`: ``accuracy`` is ``[n_tasks, parts + 1]`` (step 0 intact,
        the last with every FFN ablated), ``removed`` the layers ablated at each step.

    Raises:
        ValueError: No task, or an unknown ``method``.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.ffn_ablation(mp.tiny_model(), mp.load_task("capitals").subset(3), parts=3)
        >>> [len(r) for r in res.removed]
        [0, 1, 2, 3]
    """
    check_choice(method, "method", ("zero", "mean"))
    parts = check_int(parts, "parts (6 for sixths)", 1)
    where = _positions(positions, "ffn_ablation")
    at = _core_positions(where)
    items = [tasks] if isinstance(tasks, (Task, str, os.PathLike)) else list(tasks)
    task_list = [as_task(t) for t in items]
    if not task_list:
        raise ValueError("No tasks given: pass at least one task.")
    n_layers = int(model.cfg.n_layers)
    removed = _removed(n_layers, parts)
    acc = np.zeros((len(task_list), parts + 1))
    predicted = []
    steps = [(t, k) for t in range(len(task_list)) for k in range(parts + 1)]
    batch, first, means, preds, hits = None, None, None, [], []
    for t, k in progress_bar(steps, progress=progress, desc="ffn ablation"):
        task = task_list[t]
        if k == 0:  # a new task: its intact pass (and, for "mean", its means)
            batch = tokenize(model, task.prompts())
            first = torch.as_tensor(first_token_ids(model, task.answers()))
            intact, hit, means = _intact_pass(model, batch, first, method == "mean", batch_size)
            preds, hits = [intact], [hit]
        elif removed[k] == removed[k - 1]:
            # More parts than layers: this step rounds to the previous one's layers.
            preds.append(preds[-1])
            hits.append(hits[-1])
        else:
            assert batch is not None
            # Each mean is handed over explicitly: Ablate never averages a batch (or its pads).
            spec: InterventionSpec = {
                Site("mlp_out", layer): Ablate(
                    method, mean=None if means is None else means[layer], positions=at
                )
                for layer in removed[k]
            }
            out = run(model, batch, spec, logit_positions=-1, batch_size=batch_size, progress=False)
            logits = out.logits[:, 0]
            check_finite(
                logits, f"The logit tensor of {task.name!r} with {len(removed[k])} FFNs ablated"
            )
            preds.append(logits.argmax(-1))
            assert first is not None  # set by the task's intact pass (k == 0)
            hits.append(top1_hit(logits, first).cpu())  # a tie for first is no hit
        if k == parts:
            stacked = torch.stack(preds).cpu()  # [step, item]
            acc[t] = torch.stack(hits).float().mean(1).numpy()
            predicted.append(stacked.cpu().numpy())
    return AblationResult(
        tasks=tuple(t.name for t in task_list),
        kinds=tuple(t.kind for t in task_list),
        n_items=tuple(len(t) for t in task_list),
        removed=tuple(removed),
        accuracy=acc,
        predicted=tuple(predicted),
        method=method,
        parts=parts,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        positions=where,
    )
