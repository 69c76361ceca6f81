"""Word2vec-style arithmetic in a model's own token spaces (Merullo et al.'s static baseline).

Two questions about the embedding (``model.W_E``, [vocab, d_model]) and unembedding
(``model.W_U``, [d_model, vocab]; its columns are the token vectors) matrices:

- :func:`analogy`: which tokens are nearest to ``a - b + c`` (``"Warsaw" - "Poland" + "France"``)?
- :func:`offset_accuracy`: does the *mean* answer-minus-argument offset of a task, fitted on some
  items, carry held-out arguments to their answers (nearest-neighbour top-1 / top-5)? The baseline
  is the argument's own nearest neighbour without the offset.

Conventions (the same in both): a word is looked up as the **first token** of ``" " + word`` (a
string that already starts with whitespace is used as is), because answers follow ``"A:"`` with a
space and many capitals are several tokens; pass an ``int`` for a token id. Every token vector is
scaled to unit length before any arithmetic (gensim's 3CosAdd), and similarity is the cosine. On
models with tied embeddings (SmolLM2, the tiny test models) the two spaces coincide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    Result,
    check_finite,
    check_seed,
    evaluates,
    literal,
    target_rank,
    token_texts,
    warn,
)
from mechprobe.relational._figure import axes_for
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AnalogyResult", "analogy", "offset_accuracy"]

Space = Literal["embed", "unembed"]
Candidates = Literal["vocab", "answers"]


def _unit_vectors(model: Any, space: Space) -> Float[Tensor, "vocab d_model"]:
    """The token vectors of ``space``, one row per token, scaled to unit length (float32)."""
    if space == "embed":
        matrix = model.W_E
    elif space == "unembed":
        matrix = model.W_U.T  # [d_model, vocab] -> one row per token
    else:
        raise ValueError(
            f"space must be 'embed' (model.W_E) or 'unembed' (model.W_U), got {space!r}."
        )
    matrix = matrix.detach().float()
    # A NaN entry would make every cosine with that token NaN, and a NaN never ranks above anyone.
    check_finite(matrix, f"The model's {'W_E' if space == 'embed' else 'W_U'}")
    return matrix / matrix.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _word_tokens(model: Any, words: Sequence[str | int]) -> list[list[int]]:
    """All tokens of ``" " + word`` for each word (an int is taken as a one-token word)."""
    vocab = int(model.W_E.shape[0])
    rows: list[list[int]] = [[] for _ in words]
    texts: list[tuple[int, str]] = []
    for i, word in enumerate(words):
        if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
            if not 0 <= int(word) < vocab:
                raise ValueError(f"Token id {word} is outside the vocabulary [0, {vocab}).")
            rows[i] = [int(word)]
        elif isinstance(word, str) and word.strip():
            texts.append((i, word if word[0].isspace() else " " + word))
        else:
            raise TypeError(f"Expected a non-empty word or an int token id, got {word!r}.")
    if texts:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("This model has no tokenizer; pass token ids (ints) instead of words.")
        encoded = tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
        for (i, _), row in zip(texts, encoded, strict=True):
            rows[i] = [int(t) for t in row]
    return rows


def _token_ids(model: Any, words: Sequence[str | int]) -> list[int]:
    """First token of ``" " + word`` for each word (ints are taken as token ids)."""
    return [row[0] for row in _word_tokens(model, words)]


def _decode(model: Any, token: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return token_texts(tokenizer, [token])[0] if tokenizer is not None else f"<{token}>"


@evaluates
def analogy(
    model: Any,
    a: str | int,
    b: str | int,
    c: str | int,
    *,
    space: Space = "embed",
    top_k: int = 10,
    exclude_inputs: bool = True,
) -> list[tuple[str, float]]:
    """The ``top_k`` tokens nearest to ``a - b + c`` by cosine: ``a`` is to ``b`` as ? is to ``c``.

    Each word is the first token of ``" " + word`` (see the module docstring); the three vectors
    are unit-normalised before the arithmetic. With ``exclude_inputs`` the three input tokens are
    left out of the ranking, as in word2vec evaluations (otherwise ``c`` usually wins).

    Args:
        model: A TransformerLens model (``W_E``, ``W_U``, ``tokenizer``).
        a, b, c: Words or token ids; the query is ``a - b + c``.
        space: ``"embed"`` (rows of ``W_E``) or ``"unembed"`` (columns of ``W_U``).
        top_k: How many neighbours to return.
        exclude_inputs: Leave the three input tokens out.

    Returns:
        ``[(decoded token, cosine), ...]``, best first.

    Example:
        >>> import mechprobe as mp
        >>> len(mp.analogy(mp.tiny_model(), 80, 81, 82, top_k=3))
        3
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
    unit = _unit_vectors(model, space)
    ia, ib, ic = _token_ids(model, [a, b, c])
    query = unit[ia] - unit[ib] + unit[ic]
    scores = unit @ (query / query.norm().clamp_min(1e-12))
    if exclude_inputs:
        scores[[ia, ib, ic]] = -torch.inf
    k = min(top_k, int(torch.isfinite(scores).sum()))
    values, indices = scores.topk(k)
    return [(_decode(model, int(i)), float(v)) for v, i in zip(values, indices, strict=True)]


@dataclass(frozen=True, repr=False)
class AnalogyResult(Result, format="mechprobe.AnalogyResult", version=2):
    """Nearest-neighbour accuracy of a task's mean offset, per evaluated item.

    Ranks are 0-based among the candidates, the item's own argument token excluded (rank 0 means
    the answer's first token is the nearest neighbour).

    Attributes:
        task: Task name.
        space: ``"embed"`` or ``"unembed"``.
        candidates: ``"vocab"`` (the whole vocabulary) or ``"answers"`` (the task's answer tokens).
        held_out: Whether evaluated items were left out of the offset's fit.
        n_fit: Items the offset was averaged over.
        n_dropped: Items left out because argument and answer share their first token (or, with
            ``single_token``, because one of them is several tokens).
        n_duplicates: Items left out because an earlier item has the same (argument token,
            answer token) pair; the fit and evaluation run over distinct pairs.
        offset_norm: Length of the mean offset (unit token vectors, so comparable across tasks).
        arguments, answers: Decoded first tokens of each evaluated item.
        offset_ranks: Rank of the answer nearest to ``argument + offset``.
        baseline_ranks: Rank of the answer nearest to the argument alone.
        offset_predictions, baseline_predictions: The top-1 token of each.
        seed: The seed the call took (None in files saved before results recorded it).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.offset_accuracy(mp.load_model(), "capitals")  # doctest: +SKIP
        >>> res.to_frame().columns[:3].tolist()  # doctest: +SKIP
    """

    task: str
    space: str
    candidates: str
    held_out: bool
    n_fit: int
    n_dropped: int
    n_duplicates: int
    offset_norm: float
    arguments: tuple[str, ...]
    answers: tuple[str, ...]
    offset_ranks: tuple[int, ...]
    baseline_ranks: tuple[int, ...]
    offset_predictions: tuple[str, ...]
    baseline_predictions: tuple[str, ...]
    seed: int | None = None
    model_name: str = ""
    model_dtype: str = ""

    def _rate(self, ranks: tuple[int, ...], k: int) -> float:
        return float(np.mean(np.asarray(ranks) < k))

    @property
    def top1(self) -> float:
        """Share of items whose answer is the nearest neighbour of ``argument + offset``."""
        return self._rate(self.offset_ranks, 1)

    @property
    def top5(self) -> float:
        """Share of items whose answer is among the 5 nearest to ``argument + offset``."""
        return self._rate(self.offset_ranks, 5)

    @property
    def baseline_top1(self) -> float:
        """Share of items whose answer is the argument's own nearest neighbour."""
        return self._rate(self.baseline_ranks, 1)

    @property
    def baseline_top5(self) -> float:
        """Share of items whose answer is among the argument's 5 nearest neighbours."""
        return self._rate(self.baseline_ranks, 5)

    def metrics(self) -> dict[str, Any]:
        """Headline numbers as a flat dict (rates, mean reciprocal ranks, counts): the one row of
        :meth:`summary`."""
        return {
            "task": self.task,
            "space": self.space,
            "candidates": self.candidates,
            "held_out": self.held_out,
            "n_fit": self.n_fit,
            "n_eval": len(self.answers),
            "n_dropped": self.n_dropped,
            "n_duplicates": self.n_duplicates,
            "top1": self.top1,
            "top5": self.top5,
            "baseline_top1": self.baseline_top1,
            "baseline_top5": self.baseline_top5,
            "mrr": float(np.mean(1.0 / (1.0 + np.asarray(self.offset_ranks)))),
            "baseline_mrr": float(np.mean(1.0 / (1.0 + np.asarray(self.baseline_ranks)))),
            "offset_norm": self.offset_norm,
        }

    def summary(self) -> pd.DataFrame:
        """The headline numbers as a one-row DataFrame (:meth:`metrics` as a dict)."""
        return pd.DataFrame([self.metrics()])

    def to_frame(self) -> pd.DataFrame:
        """One row per evaluated item and condition (``"offset"`` or ``"baseline"``): tidy. The
        ``argument_token`` and ``answer_token`` columns are the first tokens scored, not the
        task's words."""
        rows = []
        for method, ranks, preds in (
            ("offset", self.offset_ranks, self.offset_predictions),
            ("baseline", self.baseline_ranks, self.baseline_predictions),
        ):
            for i, (arg, ans) in enumerate(zip(self.arguments, self.answers, strict=True)):
                rows.append(
                    {
                        "task": self.task,
                        "space": self.space,
                        "item": i,
                        # first tokens, as scored ("Maur" -> "Nou"): named so, not as words
                        "argument_token": arg,
                        "answer_token": ans,
                        "condition": method,
                        "rank": ranks[i],
                        "prediction": preds[i],
                        "correct": ranks[i] == 0,
                    }
                )
        return pd.DataFrame(rows)

    def plot(self, ax: Axes | None = None) -> Figure:
        """Bars of top-1 and top-5 accuracy, offset against baseline (into ``ax`` when given).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        fig, ax = axes_for(ax, (4.5, 3.2), "AnalogyResult.plot")
        x = np.arange(2)
        ax.bar(x - 0.2, [self.top1, self.top5], 0.4, label="argument + mean offset")
        ax.bar(x + 0.2, [self.baseline_top1, self.baseline_top5], 0.4, label="argument alone")
        ax.set_xticks(x, ["top-1", "top-5"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("nearest-neighbour accuracy")
        split = "held-out" if self.held_out else "in-sample"
        ax.set_title(literal(f"{self.task}: {self.space} space, {split}, n={len(self.answers)}"))
        ax.legend(fontsize="small")
        return fig

    def _describe(self) -> str:
        split = "held-out" if self.held_out else "in-sample"
        return (
            f"{self.task}, {self.space} space, {split}: {len(self.answers)} items, top-1 "
            f"{self.top1:.2f} (argument alone {self.baseline_top1:.2f})"
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Deprecated: call :meth:`save` (``.json`` or ``.npz``).

        Args:
            path: As for :meth:`save`.

        Returns:
            The path written.
        """
        warn(
            "AnalogyResult.to_json(path) is deprecated and will be removed in the next release; "
            "call .save(path) (and AnalogyResult.load(path)).",
            DeprecationWarning,
        )
        return self.save(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> AnalogyResult:
        """Deprecated: call :meth:`load`; also reads the untagged files of earlier releases.

        Args:
            path: A file :meth:`save` or the old ``to_json`` wrote.

        Returns:
            The :class:`AnalogyResult`.
        """
        warn(
            "AnalogyResult.from_json(path) is deprecated and will be removed in the next "
            "release; call AnalogyResult.load(path).",
            DeprecationWarning,
        )
        data: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
        if "format" in data:
            return cls.load(path)
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**fields)


def _ranks(scores: Float[Tensor, "n vocab"], answers: Tensor) -> tuple[list[int], list[int]]:
    """0-based rank of each row's answer (ties count against it) and each row's top token."""
    ranks = target_rank(scores, scores.gather(1, answers[:, None]))[:, 0]
    return ranks.tolist(), scores.argmax(dim=1).tolist()


@evaluates
def offset_accuracy(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    space: Space = "embed",
    held_out: bool = True,
    test_size: float | int = 0.25,
    seed: int = 0,
    candidates: Candidates = "vocab",
    single_token: bool = False,
) -> AnalogyResult:
    """How often ``argument + mean(answer - argument)`` has the answer as nearest neighbour.

    The offset is the mean, over the fit items, of the unit answer vector minus the unit argument
    vector (first tokens of :meth:`Task.arguments` and :meth:`Task.answers`). Each evaluated item
    is scored by cosine against every candidate token except its own argument token. Items whose
    argument and answer share their first token (" Mexico" / " Mexico City") are dropped first,
    since excluding the argument would exclude the answer; then items repeating an earlier
    item's (argument, answer) token pair, so that held-out pairs are really unseen.

    Args:
        model: A TransformerLens model (``W_E``, ``W_U``, ``tokenizer``).
        task: The relational task (a Task, a built-in name or a file).
        space: ``"embed"`` or ``"unembed"``.
        held_out: Fit on a train split of the distinct pairs and evaluate on the rest
            (``Task.split(test_size, seed=seed)`` of the remaining items);
            ``False`` fits and evaluates on all items (optimistic: each item is in its own offset).
        test_size: Fraction or count of evaluated items when ``held_out``.
        seed: Seed of the split.
        candidates: ``"vocab"`` ranks against the whole vocabulary; ``"answers"`` only against the
            task's answer tokens (a much easier, closed-set question).
        single_token: Keep only items whose argument and answer are each one token (many
            capitals are several tokens, and their first token, " Y" for " Yerevan", is a poor
            stand-in for the word). Left-out items count in ``n_dropped``.

    Returns:
        An :class:`AnalogyResult`.

    Example:
        The offset needs whole-word tokens: on SmolLM2, ``mp.offset_accuracy(mp.load_model(),
        "capitals")``. The tiny test model's byte-level tokenizer gives every word the same first
        token (the space), so it has no offset to measure; any object with ``W_E``, ``W_U`` and a
        tokenizer will do, here four planted pairs, each capital its country moved by one offset:

        >>> import types, torch, mechprobe as mp
        >>> class Words:  # a word-level tokenizer: each " word" is one token
        ...     vocab = [" France", " Paris", " Italy", " Rome", " Spain", " Madrid", " Peru", " Lima"]
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [[self.vocab.index(t)] for t in texts]}
        ...     def decode(self, ids):
        ...         return "".join(self.vocab[i] for i in ids)
        >>> country = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
        >>> W_E = torch.stack([country, country + 5.0], 1).flatten(0, 1)  # rows: country, capital
        >>> model = types.SimpleNamespace(tokenizer=Words(), W_E=W_E, W_U=W_E.T)
        >>> pairs = [["France", "Paris"], ["Italy", "Rome"], ["Spain", "Madrid"], ["Peru", "Lima"]]
        >>> task = mp.Task.from_dict(
        ...     {"name": "toy", "kind": "abstractive", "template": "{input}", "shots": [], "items": pairs}
        ... )
        >>> res = mp.offset_accuracy(model, task, held_out=False)
        >>> res.offset_predictions, res.baseline_predictions
        ((' Paris', ' Rome', ' Madrid', ' Lima'), (' Italy', ' Spain', ' Italy', ' Lima'))
        >>> res
        AnalogyResult(toy, embed space, in-sample: 4 items, top-1 1.00 (argument alone 0.25))
    """

    seed = check_seed(seed)
    if candidates not in ("vocab", "answers"):
        raise ValueError(f"candidates must be 'vocab' or 'answers', got {candidates!r}.")
    task = as_task(task)
    unit = _unit_vectors(model, space)
    arg_rows = _word_tokens(model, task.arguments())
    ans_rows = _word_tokens(model, task.answers())
    arg_ids, ans_ids = [r[0] for r in arg_rows], [r[0] for r in ans_rows]
    usable = [
        i
        for i in range(len(task))
        if arg_ids[i] != ans_ids[i]
        and (not single_token or len(arg_rows[i]) == len(ans_rows[i]) == 1)
    ]
    # Token arithmetic sees token pairs, not sentences: 200 colour questions are 13 pairs, and a
    # repeated pair on both sides of the split would not be held out.
    first: dict[tuple[int, int], int] = {}
    for i in usable:
        first.setdefault((arg_ids[i], ans_ids[i]), i)
    keep = sorted(first.values())
    if len(keep) < (3 if held_out else 2):
        raise ValueError(
            f"Only {len(keep)} distinct token pairs among {len(task)} items of task "
            f"{task.name!r} have an answer whose first token differs from the argument's"
            + (" and are single tokens" if single_token else "")
            + "; the offset needs more. A task whose arguments equal its answers (such as "
            "colors_extractive) has no offset to measure; otherwise use a model whose tokenizer "
            "has whole-word tokens" + (", or single_token=False." if single_token else ".")
        )
    kept = task.subset(keep)
    index = {item: i for item, i in zip(kept.items, keep, strict=True)}
    if held_out:
        fit_task, eval_task = kept.split(test_size, seed=seed)
    else:
        fit_task = eval_task = kept
    fit = torch.as_tensor([index[item] for item in fit_task.items], device=unit.device)
    ev = torch.as_tensor([index[item] for item in eval_task.items], device=unit.device)
    args = torch.as_tensor(arg_ids, device=unit.device)
    answers = torch.as_tensor(ans_ids, device=unit.device)
    offset = (unit[answers[fit]] - unit[args[fit]]).mean(dim=0)

    def scores(queries: Tensor) -> Tensor:
        out = (queries / queries.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ unit.T
        if candidates == "answers":
            allowed = torch.zeros(out.shape[1], dtype=torch.bool, device=out.device)
            allowed[answers[keep]] = True
            out[:, ~allowed] = -torch.inf
        out[torch.arange(len(ev), device=out.device), args[ev]] = -torch.inf
        return out

    target = answers[ev]
    offset_ranks, offset_top = _ranks(scores(unit[args[ev]] + offset), target)
    base_ranks, base_top = _ranks(scores(unit[args[ev]].clone()), target)
    return AnalogyResult(
        task=task.name,
        space=space,
        candidates=candidates,
        held_out=held_out,
        n_fit=len(fit),
        n_dropped=len(task) - len(usable),
        n_duplicates=len(usable) - len(keep),
        offset_norm=float(offset.norm()),
        arguments=tuple(_decode(model, int(t)) for t in args[ev]),
        answers=tuple(_decode(model, int(t)) for t in answers[ev]),
        offset_ranks=tuple(int(r) for r in offset_ranks),
        baseline_ranks=tuple(int(r) for r in base_ranks),
        offset_predictions=tuple(_decode(model, int(t)) for t in offset_top),
        baseline_predictions=tuple(_decode(model, int(t)) for t in base_top),
        seed=seed,
        # Read from cfg where there is one: the offset needs only the embedding and tokenizer.
        model_name=str(getattr(getattr(model, "cfg", None), "model_name", "")),
        model_dtype=str(model.W_E.dtype).removeprefix("torch."),
    )
