"""Scoring a relational task: greedy first-token accuracy and the teacher-forced answer log-prob.

Answers are often several tokens (``" Buenos Aires"``), so two numbers are kept per item: whether
the greedy next token after the prompt is the answer's first token (the accuracy Merullo et al.
report), and the log-probability of the whole answer under teacher forcing (prompt and answer are
tokenised separately and concatenated, see :func:`mechprobe.tokenize_with_targets`).

One teacher-forced pass also yields every activation an analysis needs at the prompt's last
position (the private :func:`_forced_pass`), so scoring, early decoding and o-vector extraction
share a single forward pass over the items.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from mechprobe.core import Site, SiteKind, run, tokenize_with_targets
from mechprobe.tasks import Task, as_task

__all__ = ["TaskScore", "score_task"]


@dataclass(frozen=True, eq=False)
class TaskScore:
    """Per-item scores of a task (ranks are 0-based: rank 0 is the model's top token).

    Attributes:
        task: Task name.
        inputs: The items' inputs.
        answers: The expected continuations, with the leading space.
        answer_ids: The answers' token ids.
        predicted: ``[item]`` greedy token id at the prompt's last position.
        first_rank: ``[item]`` rank of the answer's first token there.
        logprob: ``[item]`` teacher-forced log-probability of the whole answer (natural log).
        exact: ``[item]`` every answer token is the greedy choice under teacher forcing.

    Example:
        >>> import mechprobe as mp
        >>> score = mp.score_task(mp.tiny_model(), mp.load_task("capitals").subset(4))
        >>> score.accuracy, len(score.to_frame())
        (0.0, 4)
    """

    task: str
    inputs: tuple[str, ...]
    answers: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    predicted: Int[np.ndarray, " item"]
    first_rank: Int[np.ndarray, " item"]
    logprob: Float[np.ndarray, " item"]
    exact: Bool[np.ndarray, " item"]

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def correct(self) -> Bool[np.ndarray, " item"]:
        """``[item]`` the greedy first token is the answer's first token."""
        first = np.array([ids[0] for ids in self.answer_ids], dtype=np.int64)
        return np.asarray(self.predicted == first)

    @property
    def accuracy(self) -> float:
        """Fraction of items whose greedy first token is the answer's first token."""
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

    def plot(self) -> Figure:
        """Histogram of the answers' log-probabilities, correct and wrong items apart."""
        fig = Figure(figsize=(6, 3.5))
        ax = fig.add_subplot()
        bins = np.linspace(min(self.logprob.min(), -1e-3), 0, 31).tolist()
        for mask, label in [(self.correct, "first token correct"), (~self.correct, "wrong")]:
            if mask.any():
                ax.hist(self.logprob[mask], bins=bins, alpha=0.6, label=f"{label} ({mask.sum()})")
        ax.set_xlabel("teacher-forced log p(answer)")
        ax.set_ylabel("items")
        ax.set_title(f"{self.task}: accuracy {self.accuracy:.0%}")
        ax.legend()
        fig.tight_layout()
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_dict`)."""
        return {
            "task": self.task,
            "inputs": list(self.inputs),
            "answers": list(self.answers),
            "answer_ids": [list(ids) for ids in self.answer_ids],
            "predicted": self.predicted.tolist(),
            "first_rank": self.first_rank.tolist(),
            "logprob": self.logprob.tolist(),
            "exact": self.exact.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskScore:
        """Rebuild a score from :meth:`to_dict`'s output."""
        return cls(
            task=data["task"],
            inputs=tuple(data["inputs"]),
            answers=tuple(data["answers"]),
            answer_ids=tuple(tuple(int(i) for i in ids) for ids in data["answer_ids"]),
            predicted=np.asarray(data["predicted"], dtype=np.int64),
            first_rank=np.asarray(data["first_rank"], dtype=np.int64),
            logprob=np.asarray(data["logprob"], dtype=np.float64),
            exact=np.asarray(data["exact"], dtype=bool),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the score as JSON and return the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict()) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TaskScore:
        """Read a score written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


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
    progress: bool = False,
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
    logprob = np.zeros(n, dtype=np.float64)
    exact = np.zeros(n, dtype=bool)
    answer_ids: list[tuple[int, ...]] = [()] * n
    captures: dict[str, Tensor] = {}
    groups = sorted({int(v) for v in length.tolist()})
    for size in tqdm(groups, disable=not progress, desc=f"{task.name}: scoring"):
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
        )
        logits = out.logits.float()  # [rows, size, vocab]
        targets = sub.tokens[torch.arange(len(sub))[:, None], sub.positions(list(range(-size, 0)))]
        logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        first = logits[:, 0]
        target_logit = first.gather(-1, targets[:, :1])
        index = np.asarray(rows)
        predicted[index] = first.argmax(-1).numpy()
        first_rank[index] = (first > target_logit).sum(-1).numpy()
        logprob[index] = logp.sum(-1).double().numpy()
        exact[index] = (logits.argmax(-1) == targets).all(-1).numpy()
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
    )
    return _Pass(score=score, captures=captures)


def score_task(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    batch_size: int | None = 32,
    progress: bool = False,
) -> TaskScore:
    """Score every item of ``task``: greedy first-token accuracy and the whole answer's log-prob.

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file (all its shots are used; call
            ``task.with_shots(k)`` for fewer).
        batch_size: Rows per forward pass.
        progress: Show a progress bar.

    Example:
        >>> import mechprobe as mp
        >>> score = mp.score_task(mp.tiny_model(), mp.load_task("capitals").subset(3))
        >>> score.first_rank.shape, bool((score.logprob < 0).all())
        ((3,), True)
    """
    return _forced_pass(model, as_task(task), batch_size=batch_size, progress=progress).score
