"""Removing FFNs top-down: abstractive tasks should suffer much more than extractive ones.

Merullo et al. remove the FFN (MLP) blocks of the top sixth, third, ... of the network and plot
the accuracy of an abstractive task (the answer must be recalled) beside its extractive version
(the answer is in the prompt). :func:`ffn_ablation` measures both curves; nothing is assumed.

Step ``k`` of ``parts`` ablates the top ``round(k * n_layers / parts)`` layers (half rounded up),
so with 30 layers and sixths: none, 25-29, 20-29, ..., 0-29. ``"zero"`` sets the FFN output to 0;
``"mean"`` sets it to its mean over the task's prompts (every real token but the first, BOS,
whose FFN outputs are outliers in many models), computed in the intact pass. Both act at every
position unless ``positions`` says otherwise (Merullo et al. replaced the whole FFN).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from mechprobe.core import (
    Ablate,
    Batch,
    Intervention,
    InterventionSpec,
    Positions,
    Site,
    first_token_ids,
    forward,
    intervene,
    run,
    tokenize,
)
from mechprobe.tasks import Task, as_task

__all__ = ["AblationResult", "ffn_ablation"]

Method = Literal["zero", "mean"]


@dataclass(frozen=True, eq=False)
class AblationResult:
    """First-token accuracy of each task as FFNs are removed top-down.

    Attributes:
        tasks: Task names.
        kinds: Their kinds (``abstractive`` / ``extractive``).
        n_items: Items per task.
        removed: Per step, the layers whose FFN was ablated (step 0: none).
        accuracy: ``[task, step]`` greedy first-token accuracy.
        predicted: Per task, ``[step, item]`` the greedy token ids.
        method: ``"zero"`` or ``"mean"``.
        parts: Number of steps after the intact one (6: sixths).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.ffn_ablation(mp.tiny_model(), [mp.load_task("capitals").subset(3)], parts=3)
        >>> res.accuracy.shape, res.removed[-1]
        ((1, 4), (0, 1, 2))
    """

    tasks: tuple[str, ...]
    kinds: tuple[str, ...]
    n_items: tuple[int, ...]
    removed: tuple[tuple[int, ...], ...]
    accuracy: Float[np.ndarray, "task step"]
    predicted: tuple[Int[np.ndarray, "step item"], ...]
    method: str
    parts: int

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
        """Tidy rows: task, kind, step, n_removed, first_removed, accuracy, relative."""
        rel = self.relative()
        rows = []
        for t, name in enumerate(self.tasks):
            for k, layers in enumerate(self.removed):
                rows.append(
                    {
                        "task": name,
                        "kind": self.kinds[t],
                        "step": k,
                        "n_removed": len(layers),
                        "first_removed": min(layers) if layers else None,
                        "accuracy": float(self.accuracy[t, k]),
                        "relative": float(rel[t, k]),
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, relative: bool = False) -> Figure:
        """Accuracy (or accuracy relative to intact) against the fraction of FFNs removed."""
        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.add_subplot()
        values = self.relative() if relative else self.accuracy
        x = self.fraction_removed
        for t, name in enumerate(self.tasks):
            style = "o-" if self.kinds[t] == "abstractive" else "s--"
            ax.plot(x, values[t], style, label=f"{name} ({self.kinds[t]})")
        ticks = [f"{k}/{self.parts}" for k in range(self.parts + 1)]
        ax.set_xticks(x, ticks)
        ax.set_xlabel("FFNs removed, top-down (fraction of layers)")
        ax.set_ylabel("accuracy / intact" if relative else "first-token accuracy")
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
        ax.set_ylim(0, max(1.05, top + 0.05))
        ax.set_title(f"{self.method}-ablating FFN outputs at every position", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_dict`)."""
        return {
            "tasks": list(self.tasks),
            "kinds": list(self.kinds),
            "n_items": list(self.n_items),
            "removed": [list(r) for r in self.removed],
            "accuracy": self.accuracy.tolist(),
            "predicted": [p.tolist() for p in self.predicted],
            "method": self.method,
            "parts": self.parts,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblationResult:
        """Rebuild a result from :meth:`to_dict`'s output."""
        return cls(
            tasks=tuple(data["tasks"]),
            kinds=tuple(data["kinds"]),
            n_items=tuple(int(n) for n in data["n_items"]),
            removed=tuple(tuple(int(x) for x in r) for r in data["removed"]),
            accuracy=np.asarray(data["accuracy"], dtype=np.float64),
            predicted=tuple(np.asarray(p, dtype=np.int64) for p in data["predicted"]),
            method=str(data["method"]),
            parts=int(data["parts"]),
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
    model: Any, batch: Batch, want_means: bool, batch_size: int | None
) -> tuple[Tensor, Tensor | None]:
    """Last-token logits argmax and, for mean-ablation, each layer's mean FFN output."""
    n_layers = int(model.cfg.n_layers)
    sums = [_MaskedSum() for _ in range(n_layers)] if want_means else []
    spec: InterventionSpec = {Site("mlp_out", layer): acc for layer, acc in enumerate(sums)}
    preds = []
    with torch.no_grad():
        for _, chunk in batch.chunks(batch_size):
            mask = chunk.attention_mask.clone()
            if getattr(model.cfg, "default_prepend_bos", True):
                mask[torch.arange(len(chunk)), chunk.offset] = 0  # leave BOS out of the mean
            for acc in sums:
                acc.mask = mask
            with intervene(model, spec, batch=chunk):
                logits = forward(model, chunk)
            preds.append(logits[torch.arange(len(chunk)), chunk.last_index].argmax(-1))
    means = None
    if want_means:
        if any(acc.total is None or acc.count == 0 for acc in sums):
            raise ValueError("No real tokens to average over: the prompts are only BOS.")
        means = torch.stack(
            [(acc.total / acc.count).float() for acc in sums if acc.total is not None]
        )
    return torch.cat(preds), means


def ffn_ablation(
    model: Any,
    tasks: Task | str | os.PathLike[str] | Sequence[Task | str | os.PathLike[str]],
    *,
    parts: int = 6,
    method: Method = "zero",
    positions: Positions = None,
    batch_size: int | None = 32,
    progress: bool = False,
) -> AblationResult:
    """Accuracy of each task with the FFNs of the top 0, 1/parts, ..., all layers ablated.

    Args:
        model: A TransformerLens model.
        tasks: One or more tasks (e.g. an abstractive task and its extractive version).
        parts: Steps (6: sixths, as Merullo et al.).
        method: ``"zero"`` or ``"mean"`` (see the module docstring).
        positions: Positions to ablate (None: every position).
        batch_size: Rows per forward pass.
        progress: Show a progress bar over tasks and steps.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.ffn_ablation(mp.tiny_model(), mp.load_task("capitals").subset(3), parts=3)
        >>> [len(r) for r in res.removed]
        [0, 1, 2, 3]
    """
    if method not in ("zero", "mean"):
        raise ValueError(f"method must be 'zero' or 'mean', got {method!r}.")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be a positive int (6 for sixths), got {parts!r}.")
    items = [tasks] if isinstance(tasks, (Task, str, os.PathLike)) else list(tasks)
    task_list = [as_task(t) for t in items]
    if not task_list:
        raise ValueError("No tasks given: pass at least one task.")
    n_layers = int(model.cfg.n_layers)
    removed = _removed(n_layers, parts)
    acc = np.zeros((len(task_list), parts + 1))
    predicted = []
    bar = tqdm(total=len(task_list) * (parts + 1), disable=not progress, desc="ffn ablation")
    for t, task in enumerate(task_list):
        batch = tokenize(model, task.prompts())
        first = torch.as_tensor(first_token_ids(model, task.answers()))
        preds, means = _intact_pass(model, batch, method == "mean", batch_size)
        steps = [preds]
        bar.update(1)
        for k in range(1, parts + 1):
            spec: InterventionSpec = {
                Site("mlp_out", layer): Ablate(
                    method, mean=None if means is None else means[layer], positions=positions
                )
                for layer in removed[k]
            }
            out = run(model, batch, spec, logit_positions=-1, batch_size=batch_size)
            steps.append(out.logits[:, 0].argmax(-1))
            bar.update(1)
        stacked = torch.stack(steps)  # [step, item]
        acc[t] = (stacked == first).float().mean(1).numpy()
        predicted.append(stacked.numpy())
    bar.close()
    return AblationResult(
        tasks=tuple(t.name for t in task_list),
        kinds=tuple(t.kind for t in task_list),
        n_items=tuple(len(t) for t in task_list),
        removed=tuple(removed),
        accuracy=acc,
        predicted=tuple(predicted),
        method=method,
        parts=parts,
    )
