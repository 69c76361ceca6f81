"""What the model predicts after each prompt, and how it scores given answers:
:func:`predict` -> :class:`Predictions`.

The first look at a model on a prompt (TransformerLens's ``utils.test_prompt``, made a batched,
saved result): the ``top_k`` most probable next tokens with their probabilities and the
distribution's entropy, and for each answer given (one per prompt, or several candidates per
prompt) its rank, logit and probability as the next token and, by teacher forcing, the
log-probability of the whole answer and whether greedy decoding would produce it.

Ranks count ties against the answer, as every rank mechprobe reports (a tie for first is no
evidence for it); ``greedy`` is what :func:`mechprobe.generate` does, each token the argmax (the
lowest id among tied maxima), so the two agree on a bfloat16 model, whose logits tie often.

Answers follow their prompt as in every analysis here: tokenised on their own, leading space
included, and appended to the prompt's tokens (" Paris", not "Paris", after "The capital of France
is"; a warning says so when a bare answer is a token of its own, and when a prompt ends in a space,
the trap of ``test_prompt``). An answer's numbers are those of its own tokenisation: text the model
generated as other tokens (two "\\n" where the tokenizer writes one "\\n\\n") is scored as the
tokenizer writes it; pass the :class:`GenerationResult` itself to score the tokens generated.

One forward pass over the prompts gives the top tokens and every one-token answer; each
multi-token answer is one more row (prompt and answer), run ``batch_size`` rows at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechprobe.core._adapter import model_adapter, token_texts
from mechprobe.core._batching import (
    Batch,
    _check_prompts,
    check_token_ids,
    pad_id,
    pad_rows,
    tokenize,
    warn_unspaced,
)
from mechprobe.core._eval_mode import evaluates
from mechprobe.core._generation import GenerationResult
from mechprobe.core._progress import progress_bar
from mechprobe.core._readout import target_rank
from mechprobe.core._results import Result, literal, new_axes, token_label
from mechprobe.core._runner import run
from mechprobe.core._validation import check_bool, check_finite, check_int
from mechprobe.core._warning import warn

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
        top_logits: ``[prompts, top_k]`` their logits.
        entropy: ``[prompts]`` the next-token distribution's entropy, in nats.
        answer_prompt: ``[answers]`` the prompt each answer was scored after.
        candidate: ``[answers]`` the answer's index among its prompt's candidates.
        answers: Each answer's text.
        answer_ids: Each answer's token ids (leading space included).
        first_rank: ``[answers]`` the rank of the answer's first token as the next token (0: the
            most probable; ties count against it).
        first_prob: ``[answers]`` that token's probability.
        first_logit: ``[answers]`` that token's logit.
        logprob: ``[answers]`` the log-probability of the whole answer (teacher forcing).
        token_ranks: Per answer, the rank of each of its tokens where it is predicted.
        token_logprobs: Per answer, each of its tokens' log-probability.
        token_top1: Per answer, the most probable token where each of its tokens is predicted
            (what the model would have said instead; the answer's own token where it is greedy).
        token_top1_logprobs: Their log-probabilities.
        token_top_ids: Per answer, the ``top_k`` most probable tokens where each of its tokens
            is predicted (``test_prompt``'s list after each answer token; ties in id order, so
            the first is ``token_top1``'s).
        token_top_logprobs: Their log-probabilities.
        prompt_ids: Each prompt's tokens as the model read them (BOS included where prepended).
        token_logits: Per answer, each of its tokens' logit where it is predicted (what
            ``test_prompt`` prints beside the rank; ``first_logit`` is the first's).
        greedy: ``[answers]`` whether greedy decoding produces the answer's tokens (each the
            argmax, the lowest id among tied maxima, as :func:`mechprobe.generate` picks).
        token_text: The text of every token id in ``top_ids`` and ``answer_ids``.
        model_name: The model's name, for the record.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

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
    top_logits: np.ndarray
    entropy: np.ndarray
    answer_prompt: np.ndarray
    candidate: np.ndarray
    answers: tuple[str, ...]
    answer_ids: tuple[tuple[int, ...], ...]
    first_rank: np.ndarray
    first_prob: np.ndarray
    first_logit: np.ndarray
    logprob: np.ndarray
    token_ranks: tuple[tuple[int, ...], ...]
    token_logprobs: tuple[tuple[float, ...], ...]
    token_top1: tuple[tuple[int, ...], ...]
    token_top1_logprobs: tuple[tuple[float, ...], ...]
    greedy: np.ndarray
    token_text: dict[int, str]
    model_name: str = ""
    model_dtype: str = ""
    # Added after the format's first files: empty where a file predates them.
    token_top_ids: tuple[tuple[tuple[int, ...], ...], ...] = ()
    token_top_logprobs: tuple[tuple[tuple[float, ...], ...], ...] = ()
    prompt_ids: tuple[tuple[int, ...], ...] = ()
    token_logits: tuple[tuple[float, ...], ...] = ()

    def _text(self, token_id: int) -> str:
        return self.token_text.get(int(token_id), f"<{int(token_id)}>")

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and rank of its ``top_k`` next tokens: ``prompt``, ``prompt_text``,
        ``rank``, ``decoded_token``, ``decoded_token_id``, ``prob``, ``logit`` (named as the
        lens's ``top_frame``: ``token`` is an input token).

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
                "decoded_token": [self._text(i) for i in ids],
                "decoded_token_id": ids.astype(np.int64),
                "prob": self.top_probs.reshape(-1).astype(np.float64),
                "logit": self.top_logits.reshape(-1).astype(np.float64),
            }
        )

    def answers_frame(self) -> pd.DataFrame:
        """One row per answer: ``prompt``, ``prompt_text``, ``candidate`` (its index among the
        prompt's), ``answer``, ``n_tokens``, ``first_rank``, ``first_prob``, ``first_logit``,
        ``logprob``, ``greedy``. A pivot on ``prompt`` and ``candidate`` compares candidates.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", answers=[[" a", " b"]], progress=False)
            >>> res.answers_frame()["answer"].tolist()
            [' a', ' b']
        """
        return pd.DataFrame(
            {
                "prompt": pd.Series(self.answer_prompt, dtype=np.int64),
                "prompt_text": pd.Series(
                    [self.prompts[p] for p in self.answer_prompt], dtype=object
                ),
                "candidate": pd.Series(self.candidate, dtype=np.int64),
                "answer": pd.Series(list(self.answers), dtype=object),
                "n_tokens": pd.Series([len(ids) for ids in self.answer_ids], dtype=np.int64),
                "first_rank": pd.Series(self.first_rank, dtype=np.int64),
                "first_prob": pd.Series(self.first_prob, dtype=np.float64),
                "first_logit": pd.Series(self.first_logit, dtype=np.float64),
                "logprob": pd.Series(self.logprob, dtype=np.float64),
                "greedy": pd.Series(self.greedy, dtype=bool),
            }
        )

    def tokens_frame(self) -> pd.DataFrame:
        """One row per answer token, as ``test_prompt`` prints them: ``prompt``, ``candidate``,
        ``answer``, ``step`` (0: the first token), ``token``, ``token_id``, its ``rank``,
        ``prob``, ``logprob`` and ``logit`` where it is predicted (NaN in a file saved before
        logits were kept), and the most probable token there
        (``top1_token``, ``top1_prob``).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", " ab", progress=False)
            >>> res.tokens_frame()[["step", "token"]].values.tolist()
            [[0, ' '], [1, 'a'], [2, 'b']]
        """
        rows = [
            {
                "prompt": int(self.answer_prompt[a]),
                "candidate": int(self.candidate[a]),
                "answer": self.answers[a],
                "step": j,
                "token": self._text(t),
                "token_id": int(t),
                "rank": int(self.token_ranks[a][j]),
                "prob": float(np.exp(self.token_logprobs[a][j])),
                "logprob": float(self.token_logprobs[a][j]),
                "logit": float(self.token_logits[a][j]) if self.token_logits else np.nan,
                "top1_token": self._text(self.token_top1[a][j]),
                "top1_prob": float(np.exp(self.token_top1_logprobs[a][j])),
            }
            for a in range(len(self.answers))
            for j, t in enumerate(self.answer_ids[a])
        ]
        columns = ["prompt", "candidate", "answer", "step", "token", "token_id", "rank", "prob"]
        columns += ["logprob", "logit", "top1_token", "top1_prob"]
        return pd.DataFrame(rows, columns=columns)

    def logit_diff(self, answer: int = 0, wrong: int = 1) -> np.ndarray:
        """``[prompts]`` the first-token logit of candidate ``answer`` minus that of candidate
        ``wrong`` after each prompt (the metric of :func:`mechprobe.logit_diff`; NaN where a
        prompt has no such candidates), as :meth:`mechprobe.LensResult.logit_diff` takes slots.

        Args:
            answer: The candidate answer's slot among each prompt's answers (0: the first).
            wrong: The wrong candidate's slot (1: the second); not ``answer``.

        Returns:
            ``[n_prompts]`` float array of logit differences (NaN where a prompt lacks either
            candidate).

        Raises:
            ValueError: ``answer`` and ``wrong`` are the same slot.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", ["a", "b"], progress=False)
            >>> bool(res.logit_diff()[0] == res.first_logit[0] - res.first_logit[1])
            True
        """
        answer, wrong = check_int(answer, "answer", 0), check_int(wrong, "wrong", 0)
        if answer == wrong:
            raise ValueError(f"answer and wrong are the same candidate ({answer}).")
        out = np.full(len(self.prompts), np.nan)
        for p in range(len(self.prompts)):
            mine = self.answer_prompt == p
            a = np.flatnonzero(mine & (self.candidate == answer))
            w = np.flatnonzero(mine & (self.candidate == wrong))
            if len(a) and len(w):
                out[p] = self.first_logit[a[0]] - self.first_logit[w[0]]
        return out

    def summary(self) -> pd.DataFrame:
        """Per prompt: the top token (whitespace shown, as the lens's summary shows it) and its
        probability, the entropy, and with answers the most probable one by total ``logprob``
        (so a shorter candidate is favoured: compare per token with :meth:`answers_frame`),
        with its first token's rank and ``greedy``.

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
                "top1_token": token_label(self._text(self.top_ids[p, 0]), 40),
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
        """One prompt's most probable next tokens (the first 30 of ``top_k``) as bars of
        probability, its answers' first tokens in orange where they are among them (the title
        names the others' ranks).

        Args:
            ax: Draw into these axes (default: a new figure).
            prompt: The prompt drawn (its index; negative counts from the end).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: ``prompt`` indexes no prompt.

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
        k = min(self.top_ids.shape[1], 30)
        fig, ax = new_axes(ax, (5.0, 0.3 * k + 1.2))
        mine = np.flatnonzero(self.answer_prompt == p)
        firsts = {self.answer_ids[a][0] for a in mine}
        colours = ["tab:orange" if int(i) in firsts else "tab:blue" for i in self.top_ids[p]]
        ax.barh(range(k), self.top_probs[p, :k], color=colours[:k])
        ax.set_yticks(
            range(k), labels=[literal(token_label(self._text(i), 16)) for i in self.top_ids[p, :k]]
        )
        ax.invert_yaxis()
        ax.set_xlabel("next-token probability")
        shown = set(self.top_ids[p, :k].tolist())
        away = [
            f"{token_label(self.answers[a], 12)!r} rank {int(self.first_rank[a])}"
            for a in mine
            if self.answer_ids[a][0] not in shown
        ]
        title = token_label(self.prompts[p], 60, tail=True)
        if away:
            title += "\nnot shown: " + ", ".join(away[:4]) + (" ..." if len(away) > 4 else "")
        ax.set_title(literal(title), fontsize=9)
        return fig

    def report(self, prompt: int | None = None, *, k: int = 10, alternatives: int = 3) -> str:
        """The printed view ``test_prompt`` gives, for one prompt or all: the prompt's tokens,
        the ``k`` most probable next tokens with probability and logit, then each answer's
        tokens with the rank and probability each gets where it is predicted and the most
        probable tokens there.

        Args:
            prompt: One prompt's index (negative from the end), or None for every prompt.
            k: How many next tokens to list (at most the ``top_k`` predicted).
            alternatives: How many of the most probable tokens to list at each answer token
                (at most ``top_k``; 0: only the top one, where it is not the answer's).

        Returns:
            Plain text, to ``print``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.predict(mp.tiny_model(), "Hi", " ab", top_k=3, progress=False)
            >>> lines = res.report(k=2, alternatives=0).splitlines()  # print(...) to read it
            >>> lines[0], len(lines)  # prompt, its tokens, header, 2 tokens, answer, 3 tokens
            ("Prompt 0: 'Hi'", 9)
        """
        k = check_int(k, "k", 1)
        alternatives = check_int(alternatives, "alternatives", 0)
        n = len(self.prompts)
        if prompt is not None:
            p = check_int(prompt, "prompt")
            if not -n <= p < n:
                raise ValueError(f"prompt must index one of the {n} prompts, got {prompt}.")
        chosen = range(n) if prompt is None else [p % n]
        width = max([len(_quoted(self._text(i), 24)) for i in self.top_ids.flat] + [10])
        lines: list[str] = []
        for p in chosen:
            lines.append(f"Prompt {p}: {_quoted(self.prompts[p], 70, tail=True)}")
            if self.prompt_ids:  # a file saved before they were kept has none
                ids = self.prompt_ids[p]
                shown = " ".join(_quoted(self._text(i), 16) for i in ids[-40:])
                lines.append(f"  tokens ({len(ids)}): {'… ' if len(ids) > 40 else ''}{shown}")
            head = f"  {'next token':<{width + 3}} {'prob':>7} {'logit':>8}"
            lines.append(f"{head}   (entropy {self.entropy[p]:.2f} nats)")
            for r in range(min(k, self.top_ids.shape[1])):
                token = _quoted(self._text(self.top_ids[p, r]), 24)
                lines.append(
                    f"  {r:<2} {token:<{width}} {_percent(float(self.top_probs[p, r])):>7} "
                    f"{self.top_logits[p, r]:>8.2f}"
                )
            for a in np.flatnonzero(self.answer_prompt == p):
                n_tok = len(self.answer_ids[a])
                lines.append(
                    f"  answer {_quoted(self.answers[a], 40)}: {n_tok} token"
                    f"{'s' if n_tok != 1 else ''}, logprob {self.logprob[a]:.3f}, "
                    f"greedy: {'yes' if self.greedy[a] else 'no'}"
                )
                for j, t in enumerate(self.answer_ids[a]):
                    top = self.token_top1[a][j]
                    listed = alternatives and self.token_top_ids
                    instead = (
                        ""
                        if top == t or (listed and j > 0)
                        else f"  (top: {_quoted(self._text(top), 24)} "
                        f"{_percent(np.exp(self.token_top1_logprobs[a][j]))})"
                    )
                    rank = self.token_ranks[a][j]
                    # ties count against the answer: say so where the top token ties with it
                    tied = rank > 0 and self.token_top1_logprobs[a][j] == self.token_logprobs[a][j]
                    logit = f"  logit {self.token_logits[a][j]:.2f}" if self.token_logits else ""
                    lines.append(
                        f"    step {j} {_quoted(self._text(t), 24)}  rank {rank}"
                        f"{' (tied with the top)' if tied else ''}{logit}  prob "
                        f"{_percent(np.exp(self.token_logprobs[a][j]))}{instead}"
                    )
                    if listed and j > 0:  # step 0's are the next tokens listed above
                        pairs = zip(
                            self.token_top_ids[a][j][:alternatives],
                            self.token_top_logprobs[a][j][:alternatives],
                            strict=True,
                        )
                        top_k = ", ".join(
                            f"{_quoted(self._text(i), 16)} {_percent(np.exp(v))}" for i, v in pairs
                        )
                        lines.append(f"      top: {top_k}")
        return "\n".join(lines)

    def _describe(self) -> str:
        hit = (
            f"; {int(self.greedy.sum())} of {len(self.answers)} answers greedy"
            if len(self.answers)
            else ""
        )
        top = token_label(self._text(self.top_ids[0, 0]), 16) if len(self.prompts) else ""
        return f"{len(self.prompts)} prompts, top-{self.top_ids.shape[1]}; first: {top!r}{hit}"


def _quoted(text: str, width: int, *, tail: bool = False) -> str:
    """Text as the report prints it: Python's quoting (a quote or backslash in a token escaped,
    ``'\\n'`` a newline), cut to ``width`` characters with an ellipsis (keeping the end when
    ``tail``)."""
    if len(text) > width:
        text = "…" + text[1 - width :] if tail else text[: width - 1] + "…"
    return repr(text)


def _percent(p: float) -> str:
    """A probability as the report prints it: a percentage, or ``1.2e-05`` below 0.01%."""
    return f"{p:.2%}" if p >= 1e-4 else f"{p:.1e}"


def _answer_lists(answers: Any, n: int, one_prompt: bool) -> list[list[str]]:
    """``answers`` as one list of candidate strings per prompt (a list of strings after one
    prompt given as a string: its candidates, as ``test_prompt`` takes them)."""
    if answers is None:
        return [[] for _ in range(n)]
    if isinstance(answers, str):
        if n != 1:
            raise ValueError(
                f"One answer string for {n} prompts: pass one answer per prompt (a list), or "
                "a list of candidates per prompt."
            )
        answers = [answers]
    if not _is_list(answers):
        raise TypeError(
            f"answers must be a string, a list of strings or a list of lists, got "
            f"{type(answers).__name__} (a set or dict has no order to keep)."
        )
    listed = list(answers)
    if one_prompt and len(listed) > 1 and all(isinstance(a, str) for a in listed):
        listed = [listed]  # one prompt's candidates
    if len(listed) != n:
        raise ValueError(
            f"Got {n} prompts and {len(listed)} answers: pass one answer (or one list of "
            "candidates) per prompt."
        )
    out = []
    for i, item in enumerate(listed):
        candidates = [item] if isinstance(item, str) else list(item) if _is_list(item) else None
        if not candidates or any(not isinstance(c, str) or not c for c in candidates):
            raise ValueError(
                f"Answers of prompt {i} must be non-empty strings (or a list of them), got "
                f"{item!r}: pass text that follows the prompt (' Paris')."
            )
        out.append(candidates)
    return out


def _is_list(value: Any) -> bool:
    """An ordered sequence of answers: a list, tuple, numpy array or pandas Series."""
    return isinstance(value, (list, tuple, np.ndarray, pd.Series))


@evaluates
def predict(
    model: Any,
    prompts: str | Sequence[str] | Batch,
    answers: str | Sequence[str] | Sequence[Sequence[str]] | None = None,
    *,
    top_k: int = 10,
    prepend_bos: bool | None = None,
    batch_size: int | None = 32,
    progress: bool = True,
) -> Predictions:
    """The ``top_k`` next tokens after each prompt, and each given answer scored there (module
    docstring).

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts, or a :class:`Batch` (without answers).
        answers: None; one answer per prompt (a string for one prompt); or a list of candidate
            answers per prompt (after one prompt given as a string, a list of strings is its
            candidates, as ``test_prompt`` takes them). Each is scored by teacher forcing
            after its prompt. Or a :class:`GenerationResult` of these prompts: each completion
            scored as the tokens it was generated as.
        top_k: How many of the most probable next tokens to keep.
        prepend_bos: Prepend BOS to each prompt (None: as the model does by default, as
            :func:`mechprobe.tokenize`); ``False`` for text that must start as written (a
            chat template with its own start token). Answers follow the prompt's tokens
            either way.
        batch_size: Rows per forward pass (None: all at once).
        progress: Show a progress bar over batches.

    Returns:
        A :class:`Predictions`.

    Raises:
        ValueError: Answers not one (or one list) per prompt, an empty answer, ``top_k`` below 1,
            answers with a :class:`Batch`, a prompt with an answer longer than the context
            (before any forward pass), non-finite logits.
        TypeError: Answers that are not strings or ordered lists of them.

    Warns:
        UserWarning: An answer without a leading space that is a token of its own (the word
            after a space is another token); a prompt with answers that ends in a space (the
            answer's own space then follows it).

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
        if prepend_bos is not None:
            raise ValueError(
                "prepend_bos applies to prompt text: a Batch of token ids already has (or "
                "lacks) its BOS; tokenize with mp.tokenize(model, prompts, prepend_bos=...)."
            )
        check_token_ids(model, prompts.tokens)
        batch = prompts
        texts = [
            prompts.prompts[i] if prompts.prompts and prompts.prompts[i] else _decoded(model, row)
            for i, row in enumerate(_real_rows(prompts))
        ]
    else:
        texts = _check_prompts(prompts)
        bos = None if prepend_bos is None else check_bool(prepend_bos, "prepend_bos")
        _warn_doubled_bos(model, texts, bos)
        batch = tokenize(model, texts, prepend_bos=bos)
    given: list[list[tuple[int, ...]]] | None = None
    if isinstance(answers, GenerationResult):
        per_prompt, given = _generated(answers, texts)
    else:
        per_prompt = _answer_lists(answers, len(batch), isinstance(prompts, str))
    flat = [(p, c, a) for p, candidates in enumerate(per_prompt) for c, a in enumerate(candidates)]
    spaced = [  # a generation's tokens followed its prompt as they are: nothing to say
        p
        for p, candidates in enumerate(per_prompt)
        if candidates and given is None and texts[p][-1:].isspace()
    ]
    if spaced:
        warn(
            f"Prompts {spaced[:5]} end in whitespace and have answers: an answer's own leading "
            "space then follows it (two spaces), and a bare answer is scored after a space "
            "token the model rarely sees there. End the prompt without it and give answers "
            "their leading space (' Paris')."
        )
    if given is None:  # a generation's tokens are what they are
        warn_unspaced(model, [a for p, _, a in flat if p not in spaced], "Answer")
    rows = _answer_rows(model, batch, per_prompt, given)  # checks the context before any pass

    out = run(model, batch, logit_positions=-1, batch_size=batch_size, progress=progress)
    logits = out.logits[:, 0].float()
    check_finite(logits, "The model's next-token logits")
    logp = logits.log_softmax(-1)
    k = min(k, logp.shape[-1])
    top_idx = _top_in_id_order(logp, k)  # [prompts, k]
    entropy = torch.special.entr(logp.double().exp()).sum(-1)

    m = len(flat)
    found: dict[int, _Scored] = {}
    long = [i for i, (_, _, ids) in enumerate(rows) if len(ids) > 1]
    for i, (p, _, ids) in enumerate(rows):
        if len(ids) == 1:  # read off the prompts' own pass: it is this prediction
            found[i] = _scores(logits[p : p + 1, None], torch.tensor([[ids[0]]]), k)
    if long:
        scored_long = _score_answers(model, [rows[i] for i in long], k, batch_size, progress)
        found.update(zip(long, scored_long, strict=True))
    scored = [found[i] for i in range(m)]
    first_rank, first_prob, first_logit = np.zeros(m, np.int64), np.zeros(m), np.zeros(m)
    logprob, greedy = np.zeros(m), np.zeros(m, bool)
    for i, one in enumerate(scored):
        first_rank[i], first_prob[i] = one.ranks[0], np.exp(one.logprobs[0])
        first_logit[i], logprob[i], greedy[i] = one.first_logit, sum(one.logprobs), one.greedy
    answer_ids = [ids for _, _, ids in rows]
    seen = {int(i) for i in top_idx.reshape(-1).tolist()}
    seen |= {i for ids in answer_ids for i in ids} | {i for one in scored for i in one.top1}
    seen |= {i for one in scored for row in one.top_ids for i in row}
    prompt_ids = _real_rows(batch)
    seen |= {i for row in prompt_ids for i in row}
    tokenizer = model_adapter(model).tokenizer
    ordered = sorted(seen)
    names = token_texts(tokenizer, ordered) if tokenizer is not None else [str(i) for i in ordered]
    return Predictions(
        prompts=tuple(texts),
        top_ids=top_idx.cpu().numpy().astype(np.int64),
        top_probs=logp.gather(-1, top_idx).exp().cpu().numpy(),
        top_logits=logits.gather(-1, top_idx).cpu().numpy(),
        entropy=entropy.cpu().numpy(),
        answer_prompt=np.asarray([p for p, _, _ in flat], dtype=np.int64),
        candidate=np.asarray([c for _, c, _ in flat], dtype=np.int64),
        answers=tuple(a for _, _, a in flat),
        answer_ids=tuple(answer_ids),
        first_rank=first_rank,
        first_prob=first_prob,
        first_logit=first_logit,
        logprob=logprob,
        token_ranks=tuple(one.ranks for one in scored),
        token_logprobs=tuple(one.logprobs for one in scored),
        token_top1=tuple(one.top1 for one in scored),
        token_top1_logprobs=tuple(one.top1_logprobs for one in scored),
        token_top_ids=tuple(one.top_ids for one in scored),
        token_top_logprobs=tuple(one.top_logprobs for one in scored),
        prompt_ids=tuple(tuple(int(t) for t in row) for row in prompt_ids),
        token_logits=tuple(one.logits for one in scored),
        greedy=greedy,
        token_text=dict(zip(ordered, names, strict=True)),
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def _warn_doubled_bos(model: Any, texts: Sequence[str], prepend_bos: bool | None) -> None:
    """A chat template's text starts with the BOS token's own text (SmolLM2's
    ``<|im_start|>``): with a BOS prepended too, the model reads it twice."""
    adapter = model_adapter(model)
    tokenizer = adapter.tokenizer
    bos_text = getattr(tokenizer, "bos_token", None)
    prepends = adapter.prepend_bos if prepend_bos is None else prepend_bos
    if not prepends or not isinstance(bos_text, str) or not bos_text:
        return
    doubled = [i for i, text in enumerate(texts) if text.startswith(bos_text)]
    if doubled:
        warn(
            f"Prompts {doubled[:5]} start with {bos_text!r}, the BOS token, and a BOS is "
            "prepended too, so the model reads it twice: pass prepend_bos=False (mechprobe predict: "
            "--no-bos)."
        )


def _real_rows(batch: Batch) -> list[list[int]]:
    """Each row's own token ids, padding taken out."""
    return [batch.tokens[i][batch.attention_mask[i].bool()].tolist() for i in range(len(batch))]


def _decoded(model: Any, ids: Any) -> str:
    tokenizer = model_adapter(model).tokenizer
    return "" if tokenizer is None else str(tokenizer.decode([int(i) for i in ids]))


def _generated(
    generation: GenerationResult, texts: list[str]
) -> tuple[list[list[str]], list[list[tuple[int, ...]]]]:
    """A generation's completions as answers: per prompt its text (the tokens decoded alone,
    joined) and its token ids as generated (text re-encoded can be other tokens: two "\\n"
    generated are one "\\n\\n" token written)."""
    if tuple(generation.prompts) != tuple(texts):
        raise ValueError(
            "answers is a GenerationResult of other prompts: pass its own, "
            "predict(model, generation.prompts, generation)."
        )
    empty = [i for i, row in enumerate(generation.tokens) if len(row) == 0]
    if empty:
        raise ValueError(f"The generation has no tokens for prompts {empty}: nothing to score.")
    if generation.interventions:
        warn(
            f"The generation ran with interventions ({'; '.join(generation.interventions)}); "
            "predict scores its tokens on the model as it is, without them."
        )
    texts_of = [["".join(strings)] for strings in generation.token_strings]
    ids_of = [[tuple(int(t) for t in row)] for row in generation.tokens]
    return texts_of, ids_of


def _answer_rows(
    model: Any,
    batch: Batch,
    per_prompt: list[list[str]],
    given: list[list[tuple[int, ...]]] | None = None,
) -> list[tuple[int, list[int], tuple[int, ...]]]:
    """Per answer, ``(prompt, the prompt's token ids, the answer's token ids)`` (``given``: the
    ids as they are, else the answer tokenised); a prompt and answer longer than the model's
    context is refused here, before any forward pass, by prompt and answer."""
    tokenizer = model_adapter(model).tokenizer
    n_ctx = model_adapter(model).n_ctx
    prompt_rows = _real_rows(batch)
    out = []
    for p, candidates in enumerate(per_prompt):
        if not candidates:
            continue
        encoded = (
            given[p]
            if given is not None
            else tokenizer(list(candidates), add_special_tokens=False)["input_ids"]
        )
        for answer, ids in zip(candidates, encoded, strict=True):
            if not ids:
                raise ValueError(f"Answer {answer!r} of prompt {p} tokenises to nothing.")
            total = len(prompt_rows[p]) + len(ids)
            if n_ctx is not None and total > int(n_ctx):
                raise ValueError(
                    f"Prompt {p} with its answer {token_label(answer, 30)!r} is {total} tokens, "
                    f"longer than the model's context of {int(n_ctx)}: shorten the prompt or "
                    "the answer."
                )
            out.append((p, [int(t) for t in prompt_rows[p]], tuple(int(t) for t in ids)))
    return out


class _Scored(NamedTuple):
    """One answer's numbers (:func:`_scores`)."""

    ranks: tuple[int, ...]
    logprobs: tuple[float, ...]
    first_logit: float
    greedy: bool
    top1: tuple[int, ...]
    top1_logprobs: tuple[float, ...]
    top_ids: tuple[tuple[int, ...], ...]
    top_logprobs: tuple[tuple[float, ...], ...]
    logits: tuple[float, ...]


def _scores(logits: Tensor, targets: Tensor, k: int) -> _Scored:
    """One answer's numbers from ``logits [1, size, vocab]`` at its predictions and ``targets
    [1, size]``: each token's rank (ties against it) and log-probability, the first token's
    logit, whether each token is the argmax (the lowest id among tied maxima, as greedy decoding
    picks), that argmax with its log-probability at each step, and the ``k`` most probable
    tokens there (tied ones in id order, the argmax first)."""
    logits = logits.float()[0]  # [size, vocab]
    targets = targets.to(logits.device)[0]
    picked = logits.gather(-1, targets[:, None])  # [size, 1]
    ranks = target_rank(logits, picked)[:, 0]
    norm = logits.logsumexp(-1)
    top1 = logits.argmax(-1)
    order = _top_in_id_order(logits, k)  # [size, k]
    top_logp = logits.gather(-1, order) - norm[:, None]
    return _Scored(
        ranks=tuple(int(r) for r in ranks.tolist()),
        logprobs=tuple(float(v) for v in (picked[:, 0] - norm).double().tolist()),
        first_logit=float(picked[0, 0]),
        greedy=bool((top1 == targets).all()),
        top1=tuple(int(t) for t in top1.tolist()),
        top1_logprobs=tuple(float(v) for v in (logits.max(-1).values - norm).double().tolist()),
        top_ids=tuple(tuple(int(t) for t in row) for row in order.tolist()),
        top_logprobs=tuple(tuple(float(v) for v in row) for row in top_logp.double().tolist()),
        logits=tuple(float(v) for v in picked[:, 0].tolist()),
    )


def _top_in_id_order(scores: Tensor, k: int) -> Tensor:
    """``[rows, k]`` the ids of each row's ``k`` largest ``scores [rows, vocab]``, largest first
    and tied ones in id order, as greedy decoding's argmax (the lowest id) breaks a tie.

    ``topk`` orders ties as it likes (bfloat16 logits tie often: a report said ``' sailed'`` was
    first where ``generate`` said ``'s``); a sort of the whole vocabulary at every answer token
    was 17% of ``predict``'s time. So: ``topk``, then a stable sort of the tokens at or above
    each row's k-th value (more than k where the k-th value ties).
    """
    kth = scores.topk(k, dim=-1).values[:, -1:]  # [rows, 1]
    out = torch.empty((scores.shape[0], k), dtype=torch.long, device=scores.device)
    for r in range(scores.shape[0]):
        ids = torch.nonzero(scores[r] >= kth[r]).flatten()  # ascending ids
        order = torch.sort(scores[r, ids], descending=True, stable=True).indices[:k]
        out[r] = ids[order]
    return out


def _score_answers(
    model: Any,
    rows: list[tuple[int, list[int], tuple[int, ...]]],
    k: int,
    batch_size: int | None,
    progress: bool,
) -> list[_Scored]:
    """Each multi-token answer scored by teacher forcing: its prompt and answer run as one row,
    rows grouped by the answer's length (a group reads its predictions at the same positions from
    the end) and run ``batch_size`` at a time, each chunk's logits reduced before the next."""
    out: list[Any] = [None] * len(rows)
    sizes = sorted({len(ids) for _, _, ids in rows})
    step = batch_size or len(rows)
    chunks = [
        [i for i, (_, _, ids) in enumerate(rows) if len(ids) == size][start : start + step]
        for size in sizes
        for start in range(0, sum(len(ids) == size for _, _, ids in rows), step)
    ]
    pad = pad_id(model)
    for chunk in progress_bar(chunks, progress=progress, desc="answers"):
        size = len(rows[chunk[0]][2])
        joined = [rows[i][1] + list(rows[i][2]) for i in chunk]
        batch = pad_rows(joined, pad, "right", [""] * len(chunk))
        logits = run(
            model,
            batch,
            logit_positions=list(range(-(size + 1), -1)),
            batch_size=None,
            progress=False,
        ).logits  # [rows, size, vocab]: the prediction of answer token j at j
        check_finite(logits, "The model's logits over the answers")
        for r, i in enumerate(chunk):
            targets = torch.tensor([rows[i][2]])
            out[i] = _scores(logits[r : r + 1], targets, k)
    return out
