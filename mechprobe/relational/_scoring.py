"""Scoring a relational task: greedy first-token accuracy and the teacher-forced answer log-prob.

Answers are often several tokens (``" Buenos Aires"``), so two numbers are kept per item: whether
the greedy next token after the prompt is the answer's first token (the accuracy Merullo et al.
report), and the log-probability of the whole answer under teacher forcing (prompt and answer are
tokenised separately and concatenated, see :func:`mechprobe.tokenize_with_targets`).

One teacher-forced pass also yields every activation an analysis needs at the prompt's last
position, so scoring, early decoding and the o-vector share a single forward pass over the items
(:func:`mechprobe.task_pass`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechprobe.core import (
    Result,
    Site,
    SiteKind,
    check_finite,
    evaluates,
    literal,
    model_adapter,
    progress_bar,
    run,
    target_rank,
    tokenize_with_targets,
    top1_hit,
)
from mechprobe.relational._figure import axes_for
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["TaskScore", "score_task"]


@dataclass(frozen=True, eq=False, repr=False)
class TaskScore(Result, format="mechprobe.TaskScore", version=2, html_figure=True):
    """Per-item scores of a task (ranks are 0-based: rank 0 is the model's top token).

    Attributes:
        task: Task name.
        inputs: The items' inputs.
        answers: The expected continuations, with the leading space.
        answer_ids: The answers' token ids.
        predicted: ``[item]`` greedy token id at the prompt's last position.
        first_rank: ``[item]`` rank of the answer's first token there.
        logprob: ``[item]`` teacher-forced log-probability of the whole answer (natural log).
        exact: ``[item]`` every answer token is the greedy choice under teacher forcing (alone:
            a tie for first is a miss, as for ``correct``).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        at_top: ``[item]`` the answer's first token has the largest logit, alone or tied (None
            in files saved before it was kept).

    Example:
        >>> import mechprobe as mp
        >>> score = mp.score_task(mp.tiny_model(), mp.load_task("capitals").subset(4))
        >>> score.accuracy, len(score.to_frame())
        (0.0, 4)
        >>> score
        TaskScore(capitals: 4 items, accuracy 0.00, exact 0.00, mean log p -49.84)
    """

    task: str
    inputs: tuple[str, ...]
    answers: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    predicted: Int[np.ndarray, " item"]
    first_rank: Int[np.ndarray, " item"]
    logprob: Float[np.ndarray, " item"]
    exact: Bool[np.ndarray, " item"]
    model_name: str = ""
    model_dtype: str = ""
    at_top: Bool[np.ndarray, " item"] | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def correct(self) -> Bool[np.ndarray, " item"]:
        """``[item]`` the answer's first token alone has the largest logit (``first_rank`` 0:
        a tie for first is no hit)."""
        return np.asarray(self.first_rank == 0)

    @property
    def tied(self) -> Bool[np.ndarray, " item"]:
        """``[item]`` the answer's first token shares the largest logit with another token: not
        :attr:`correct`, though no token is above it. Common in bfloat16, rare in float32.
        (Files saved before ``at_top`` was kept see only the ties the answer's id wins, where
        it is the greedy choice.)"""
        if self.at_top is None:
            first = np.asarray([ids[0] for ids in self.answer_ids])
            return np.asarray((self.first_rank > 0) & (self.predicted == first))
        return np.asarray((self.first_rank > 0) & self.at_top)

    @property
    def accuracy(self) -> float:
        """Fraction of items whose answer's first token alone has the largest logit."""
        return float(self.correct.mean())

    @property
    def exact_accuracy(self) -> float:
        """Fraction of items whose whole answer is greedy under teacher forcing."""
        return float(self.exact.mean())

    @property
    def mean_logprob(self) -> float:
        """Mean teacher-forced log-probability of the whole answer."""
        return float(self.logprob.mean())

    def to_frame(self) -> pd.DataFrame:
        """One row per item: input, answer, n_tokens, correct, exact, first_rank, logprob."""
        return pd.DataFrame(
            {
                "item": np.arange(len(self)),
                "input": list(self.inputs),
                "answer": list(self.answers),
                "n_tokens": [len(ids) for ids in self.answer_ids],
                "correct": self.correct,
                "exact": self.exact,
                "first_rank": self.first_rank,
                "logprob": self.logprob,
            }
        )

    def summary(self) -> pd.DataFrame:
        """One row: task, n_items, accuracy (greedy first token), exact_accuracy, mean_logprob,
        median_first_rank, and tied_first (items whose answer ties for the top logit, counted as
        misses: a bfloat16 model's rounding makes them)."""
        return pd.DataFrame(
            {
                "task": [self.task],
                "n_items": [len(self)],
                "accuracy": [self.accuracy],
                "exact_accuracy": [self.exact_accuracy],
                "mean_logprob": [self.mean_logprob],
                "median_first_rank": [float(np.median(self.first_rank))],
                "tied_first": [int(self.tied.sum())],
            }
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Histogram of the answers' log-probabilities, correct and wrong items apart (into
        ``ax`` when given).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        fig, ax = axes_for(ax, (6, 3.5), "TaskScore.plot")
        bins = np.linspace(min(self.logprob.min(), -1e-3), 0, 31).tolist()
        for mask, label in [(self.correct, "first token correct"), (~self.correct, "wrong")]:
            if mask.any():
                ax.hist(self.logprob[mask], bins=bins, alpha=0.6, label=f"{label} ({mask.sum()})")
        ax.set_xlabel("teacher-forced log p(answer)")
        ax.set_ylabel("items")
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts (ticks read 0.5, 1.5)
        ax.set_title(literal(f"{self.task}: accuracy {self.accuracy:.0%}"))
        ax.legend()
        return fig

    def _describe(self) -> str:
        return (
            f"{self.task}: {len(self)} items, accuracy {self.accuracy:.2f}, exact "
            f"{self.exact_accuracy:.2f}, mean log p {self.mean_logprob:.2f}"
        )


@dataclass(frozen=True, eq=False)
class _Pass:
    """What one teacher-forced pass yields: the score and activations at the prompt's last token."""

    score: TaskScore
    captures: dict[str, Float[Tensor, "item layer d"]] = field(default_factory=dict)


def _forced_pass(
    model: Any,
    task: Task,
    *,
    kinds: Sequence[SiteKind] = (),
    batch_size: int | None = 32,
    progress: bool = True,
) -> _Pass:
    """Score ``task`` and capture ``kinds`` (e.g. ``resid_post``) at every layer, last prompt token.

    Items are grouped by answer length so that every group reads its predictions at the same
    positions counted from the end (the prediction of answer token ``j`` of an ``L``-token answer
    sits at ``-(L + 1) + j``); captures are taken at ``-(L + 1)``, the prompt's last token, which
    sees exactly what a forward pass over the prompt alone sees (attention is causal).
    """
    prompts, answers = task.prompts(), task.answers()
    batch, _, length = tokenize_with_targets(model, prompts, answers)
    n, n_layers = len(prompts), int(model.cfg.n_layers)
    predicted = np.zeros(n, dtype=np.int64)
    first_rank = np.zeros(n, dtype=np.int64)
    at_top = np.zeros(n, dtype=bool)
    logprob = np.zeros(n, dtype=np.float64)
    exact = np.zeros(n, dtype=bool)
    answer_ids: list[tuple[int, ...]] = [()] * n
    captures: dict[str, Tensor] = {}
    groups = sorted({int(v) for v in length.tolist()})
    for size in progress_bar(groups, progress=progress, desc=f"{task.name}: scoring"):
        rows = (length == size).nonzero().flatten().tolist()
        sub = batch.select(rows)
        sites = [
            Site(kind, layer, positions=-(size + 1)) for kind in kinds for layer in range(n_layers)
        ]
        out = run(
            model,
            sub,
            capture=sites,
            logit_positions=list(range(-(size + 1), -1)),
            batch_size=batch_size,
            progress=False,
        )
        logits = out.logits.float()  # [rows, size, vocab]
        # A NaN logit compares false with everything: it would count as rank 0, a perfect hit.
        check_finite(logits, f"The model's logit tensor on {task.name!r}")
        targets = sub.tokens[torch.arange(len(sub))[:, None], sub.positions(list(range(-size, 0)))]
        targets = targets.to(logits.device)
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        first = logits[:, 0]
        target_logit = first.gather(-1, targets[:, :1])
        index = np.asarray(rows)
        predicted[index] = first.argmax(-1).cpu().numpy()
        first_rank[index] = target_rank(first, target_logit)[:, 0].cpu().numpy()
        # argmax picks the lowest id among tied maxima: a tie is the answer's logit at the top.
        at_top[index] = (target_logit[:, 0] == first.max(-1).values).cpu().numpy()
        logprob[index] = logp.sum(-1).double().cpu().numpy()
        exact[index] = top1_hit(logits, targets).all(-1).cpu().numpy()
        for i, row in enumerate(rows):
            answer_ids[row] = tuple(int(t) for t in targets[i].tolist())
        for kind in kinds:
            part = torch.stack([out[s][:, 0] for s in sites if s.kind == kind], dim=1)
            if kind not in captures:
                captures[kind] = part.new_zeros((n, n_layers, part.shape[-1]))
            captures[kind][torch.as_tensor(index)] = part
    score = TaskScore(
        task=task.name,
        inputs=tuple(task.inputs()),
        answers=tuple(answers),
        answer_ids=tuple(answer_ids),
        predicted=predicted,
        first_rank=first_rank,
        logprob=logprob,
        exact=exact,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        at_top=at_top,
    )
    return _Pass(score=score, captures=captures)


@evaluates
def score_task(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    batch_size: int | None = 32,
    progress: bool = True,
) -> TaskScore:
    """Score every item of ``task``: greedy first-token accuracy and the whole answer's log-prob.

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file (all its shots are used; call
            ``task.with_shots(k)`` for fewer).
        batch_size: Rows per forward pass.
        progress: Show a progress bar.

    Returns:
        A :class:`TaskScore` with one entry per item: ``predicted``, ``first_rank``,
        ``logprob`` and ``exact`` are ``[n_items]`` arrays (``accuracy`` their first-token
        accuracy).

    Example:
        >>> import mechprobe as mp
        >>> score = mp.score_task(mp.tiny_model(), mp.load_task("capitals").subset(3))
        >>> score.first_rank.shape, bool((score.logprob < 0).all())
        ((3,), True)
    """
    return _forced_pass(model, as_task(task), batch_size=batch_size, progress=progress).score
