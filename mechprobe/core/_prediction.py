"""What the model predicts after each prompt, and how it scores given answers:
:func:`predict` -> :class:`Predictions`.

The first look at a model on a prompt (TransformerLens's ``utils.test_prompt``, made a batched,
saved result): the ``top_k`` most probable next tokens with their probabilities and the
distribution's entropy, and for each answer given (one per prompt, or several candidates per
prompt) its rank and probability as the next token and, by teacher forcing, the log-probability of
the whole answer and whether greedy decoding would produce it (every token ranked first, ties
counting against it as in every rank mechprobe reports).

Answers follow their prompt as in every analysis here: tokenised on their own, leading space
included, and appended to the prompt's tokens (" Paris", not "Paris", after "The capital of France
is"; a warning says so when a bare answer is a token of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from mechprobe.core._adapter import model_adapter, token_texts
from mechprobe.core._batching import (
    Batch,
    _check_prompts,
    tokenize,
    tokenize_with_targets,
    warn_unspaced,
)
from mechprobe.core._eval_mode import evaluates
from mechprobe.core._readout import target_rank
from mechprobe.core._results import Result, literal, new_axes, token_label
from mechprobe.core._runner import run
from mechprobe.core._validation import check_finite, check_int

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Predictions", "predict"]


@dataclass(frozen=True, eq=False, repr=False)
class Predictions(Result, format="mechprobe.Predictions", version=1):
    """The next-token distribution after each prompt, and given answers scored in it.

    Attributes:
        prompts: The prompts.
        top_ids: ``[prompts, top_k]`` the most probable next tokens, most probable first.
        top_probs: ``[prompts, top_k]`` their probabilities.
        entropy: ``[prompts]`` the next-token distribution's entropy, in nats.
        answer_prompt: ``[answers]`` the prompt each answer was scored after.
        answers: Each answer's text.
        answer_ids: Each answer's token ids (leading space included).
        first_rank: ``[answers]`` the rank of the answer's first token as the next token (0: the
            most probable; ties count against it).
        first_prob: ``[answers]`` that token's probability.
        logprob: ``[answers]`` the log-probability of the whole answer (teacher forcing).
        token_ranks: Per answer, the rank of each of its tokens where it is predicted.
        greedy: ``[answers]`` whether greedy decoding produces the answer (every rank 0).
        token_text: The text of every token id in ``top_ids`` and ``answer_ids``.
        model_name: The model's name, for the record.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.predict(mp.tiny_model(), ["Hi", "A cat"], answers=[" there", " sat"],
        ...                  top_k=3, progress=False)
        >>> res.top_ids.shape, res.answers, bool(res.logprob[0] < 0)
        ((2, 3), (' there', ' sat'), True)
    """

    prompts: tuple[str, ...]
    top_ids: np.ndarray
    top_probs: np.ndarray
    entropy: np.ndarray
    answer_prompt: np.ndarray
    answers: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    first_rank: np.ndarray
    first_prob: np.ndarray
    logprob: np.ndarray
    token_ranks: tuple[tuple[int, ...], ...]
    greedy: np.ndarray
    token_text: dict[int, str]
    model_name: str = ""

    def _text(self, token_id: int) -> str:
        return self.token_text.get(int(token_id), f"<{int(token_id)}>")

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and rank of its ``top_k`` next tokens: ``prompt``, ``prompt_text``,
        ``rank``, ``token``, ``token_id``, ``prob``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", top_k=2, progress=False)
            >>> res.to_frame()[["prompt", "rank"]].values.tolist()
            [[0, 0], [0, 1]]
        """
        n, k = self.top_ids.shape
        prompt = np.repeat(np.arange(n), k)
        ids = self.top_ids.reshape(-1)
        return pd.DataFrame(
            {
                "prompt": prompt,
                "prompt_text": [self.prompts[p] for p in prompt],
                "rank": np.tile(np.arange(k), n),
                "token": [self._text(i) for i in ids],
                "token_id": ids.astype(np.int64),
                "prob": self.top_probs.reshape(-1).astype(np.float64),
            }
        )

    def answers_frame(self) -> pd.DataFrame:
        """One row per answer: ``prompt``, ``prompt_text``, ``answer``, ``n_tokens``,
        ``first_rank``, ``first_prob``, ``logprob``, ``greedy``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", answers=[[" a", " b"]], progress=False)
            >>> res.answers_frame()["answer"].tolist()
            [' a', ' b']
        """
        return pd.DataFrame(
            {
                "prompt": self.answer_prompt.astype(np.int64),
                "prompt_text": [self.prompts[p] for p in self.answer_prompt],
                "answer": list(self.answers),
                "n_tokens": [len(ids) for ids in self.answer_ids],
                "first_rank": self.first_rank.astype(np.int64),
                "first_prob": self.first_prob.astype(np.float64),
                "logprob": self.logprob.astype(np.float64),
                "greedy": self.greedy.astype(bool),
            },
            columns=[
                "prompt",
                "prompt_text",
                "answer",
                "n_tokens",
                "first_rank",
                "first_prob",
                "logprob",
                "greedy",
            ],
        )

    def summary(self) -> pd.DataFrame:
        """Per prompt: the top token and its probability, the entropy, and with answers the
        most probable one (by ``logprob``) with its first token's rank and ``greedy``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), ["Hi", "Yo"], answers=[" a", " b"],
            ...                  progress=False)
            >>> res.summary().columns.tolist()[:4]
            ['prompt', 'prompt_text', 'top1_token', 'top1_prob']
        """
        rows = []
        for p, prompt in enumerate(self.prompts):
            row: dict[str, Any] = {
                "prompt": p,
                "prompt_text": prompt,
                "top1_token": self._text(self.top_ids[p, 0]),
                "top1_prob": float(self.top_probs[p, 0]),
                "entropy": float(self.entropy[p]),
            }
            mine = np.flatnonzero(self.answer_prompt == p)
            if len(self.answers):
                best = mine[np.argmax(self.logprob[mine])] if len(mine) else None
                row["best_answer"] = None if best is None else self.answers[best]
                row["first_rank"] = None if best is None else int(self.first_rank[best])
                row["logprob"] = np.nan if best is None else float(self.logprob[best])
                row["greedy"] = None if best is None else bool(self.greedy[best])
            rows.append(row)
        frame = pd.DataFrame(rows)
        if "first_rank" in frame:
            frame["first_rank"] = frame["first_rank"].astype("Int64")
        return frame

    def plot(self, ax: Axes | None = None, *, prompt: int = 0) -> Figure:
        """One prompt's ``top_k`` next tokens as bars of probability, its answers' first tokens
        in orange where they are among them.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", answers=" a", top_k=4, progress=False)
            >>> len(res.plot().axes[0].patches)
            4
        """
        p = check_int(prompt, "prompt")
        if not -len(self.prompts) <= p < len(self.prompts):
            raise ValueError(
                f"prompt must index one of the {len(self.prompts)} prompts, got {prompt}."
            )
        p %= len(self.prompts)
        k = self.top_ids.shape[1]
        fig, ax = new_axes(ax, (5.0, 0.3 * k + 1.2))
        firsts = {self.answer_ids[a][0] for a in np.flatnonzero(self.answer_prompt == p)}
        colours = ["tab:orange" if int(i) in firsts else "tab:blue" for i in self.top_ids[p]]
        ax.barh(range(k), self.top_probs[p], color=colours)
        ax.set_yticks(
            range(k), labels=[literal(token_label(self._text(i), 16)) for i in self.top_ids[p]]
        )
        ax.invert_yaxis()
        ax.set_xlabel("next-token probability")
        ax.set_title(literal(token_label(self.prompts[p], 60, tail=True)), fontsize=9)
        return fig

    def _describe(self) -> str:
        hit = (
            f"; {int(self.greedy.sum())} of {len(self.answers)} answers greedy"
            if len(self.answers)
            else ""
        )
        top = token_label(self._text(self.top_ids[0, 0]), 16) if len(self.prompts) else ""
        return f"{len(self.prompts)} prompts, top-{self.top_ids.shape[1]}; first: {top!r}{hit}"


def _answer_lists(answers: Any, n: int) -> list[list[str]]:
    """``answers`` as one list of candidate strings per prompt."""
    if answers is None:
        return [[] for _ in range(n)]
    if isinstance(answers, str):
        if n != 1:
            raise ValueError(
                f"One answer string for {n} prompts: pass one answer per prompt (a list), or "
                "a list of candidates per prompt."
            )
        return [[answers]]
    listed = list(answers)
    if len(listed) != n:
        raise ValueError(
            f"Got {n} prompts and {len(listed)} answers: pass one answer (or one list of "
            "candidates) per prompt."
        )
    out = []
    for i, item in enumerate(listed):
        candidates = [item] if isinstance(item, str) else list(item)
        bad = [c for c in candidates if not isinstance(c, str) or not c]
        if bad or not candidates:
            raise ValueError(
                f"Answers of prompt {i} must be non-empty strings, got {item!r}: pass text that "
                "follows the prompt (' Paris')."
            )
        out.append(candidates)
    return out


@evaluates
def predict(
    model: Any,
    prompts: str | Sequence[str] | Batch,
    answers: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    top_k: int = 10,
    batch_size: int | None = 32,
    progress: bool = True,
) -> Predictions:
    """The ``top_k`` next tokens after each prompt, and each given answer scored there (module
    docstring).

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts, or a :class:`Batch` (without answers).
        answers: None; one answer per prompt (a string for one prompt); or a list of candidate
            answers per prompt. Each is scored by teacher forcing after its prompt.
        top_k: How many of the most probable next tokens to keep.
        batch_size: Rows per forward pass (None: all at once).
        progress: Show a progress bar over batches.

    Returns:
        A :class:`Predictions`.

    Raises:
        ValueError: Answers not one (or one list) per prompt, an empty answer, ``top_k`` below 1,
            answers with a :class:`Batch`, non-finite logits.

    Warns:
        UserWarning: An answer without a leading space that is a token of its own (the word
            after a space is another token).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.predict(mp.tiny_model(), "The cat", answers=[[" sat", " ran"]],
        ...                  progress=False)
        >>> res.answers_frame()[["answer", "n_tokens"]].values.tolist()
        [[' sat', 4], [' ran', 4]]
    """
    k = check_int(top_k, "top_k", 1)
    if isinstance(prompts, Batch):
        if answers is not None:
            raise ValueError(
                "answers are appended to prompt text: pass the prompts as strings with answers "
                "(a Batch of token ids takes none)."
            )
        batch, texts = prompts, list(prompts.prompts or [""] * len(prompts))
    else:
        texts = _check_prompts(prompts)
        batch = tokenize(model, texts)
    per_prompt = _answer_lists(answers, len(batch))
    flat = [(p, a) for p, candidates in enumerate(per_prompt) for a in candidates]
    warn_unspaced(model, [a for _, a in flat], "Answer")

    out = run(model, batch, logit_positions=-1, batch_size=batch_size, progress=progress)
    logits = out.logits[:, 0].double()
    check_finite(logits, "The model's next-token logits")
    logp = logits.log_softmax(-1)
    k = min(k, logp.shape[-1])
    top = logp.topk(k, dim=-1)
    entropy = torch.special.entr(logp.exp()).sum(-1)

    m = len(flat)
    first_rank, first_prob = np.zeros(m, np.int64), np.zeros(m)
    logprob, greedy = np.zeros(m), np.zeros(m, bool)
    answer_ids: list[tuple[int, ...]] = [()] * m
    token_ranks: list[tuple[int, ...]] = [()] * m
    if flat:
        scored = _score_answers(
            model, [texts[p] for p, _ in flat], [a for _, a in flat], batch_size
        )
        for i, (ids, ranks, lp) in enumerate(scored):
            answer_ids[i], token_ranks[i] = ids, ranks
            first_rank[i], first_prob[i] = ranks[0], float(np.exp(lp[0]))
            logprob[i], greedy[i] = float(lp.sum()), all(r == 0 for r in ranks)
    seen = {int(i) for i in top.indices.reshape(-1).tolist()}
    seen |= {i for ids in answer_ids for i in ids}
    tokenizer = model_adapter(model).tokenizer
    ordered = sorted(seen)
    names = token_texts(tokenizer, ordered) if tokenizer is not None else [str(i) for i in ordered]
    return Predictions(
        prompts=tuple(texts),
        top_ids=top.indices.cpu().numpy().astype(np.int64),
        top_probs=top.values.exp().float().cpu().numpy(),
        entropy=entropy.cpu().numpy(),
        answer_prompt=np.asarray([p for p, _ in flat], dtype=np.int64),
        answers=tuple(a for _, a in flat),
        answer_ids=tuple(answer_ids),
        first_rank=first_rank,
        first_prob=first_prob,
        logprob=logprob,
        token_ranks=tuple(token_ranks),
        greedy=greedy,
        token_text=dict(zip(ordered, names, strict=True)),
        model_name=model_adapter(model).name,
    )


def _score_answers(
    model: Any, prompts: list[str], answers: list[str], batch_size: int | None
) -> list[tuple[tuple[int, ...], tuple[int, ...], np.ndarray]]:
    """Per (prompt, answer) row: the answer's token ids, each token's rank where it is
    predicted, and each token's log-probability (teacher forcing). Rows are grouped by the
    answer's length, so that a group reads its predictions at the same positions from the end."""
    batch, _, length = tokenize_with_targets(model, prompts, answers)
    out: list[Any] = [None] * len(prompts)
    for size in sorted({int(v) for v in length.tolist()}):
        rows = (length == size).nonzero().flatten().tolist()
        sub = batch.select(rows)
        logits = run(
            model,
            sub,
            logit_positions=list(range(-(size + 1), -1)),
            batch_size=batch_size,
            progress=False,
        ).logits.double()  # [rows, size, vocab]: the prediction of answer token j at j
        check_finite(logits, "The model's logits over the answers")
        targets = sub.tokens[torch.arange(len(sub))[:, None], sub.positions(list(range(-size, 0)))]
        targets = targets.to(logits.device)
        picked = logits.gather(-1, targets[..., None])
        ranks = target_rank(logits, picked)[..., 0]
        lp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
        for i, row in enumerate(rows):
            out[row] = (
                tuple(int(t) for t in targets[i].tolist()),
                tuple(int(r) for r in ranks[i].tolist()),
                lp[i].cpu().numpy(),
            )
    return out
