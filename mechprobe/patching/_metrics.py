"""Metrics for activation patching: functions of the last position's next-token logits.

:func:`logit_diff` and :func:`answer_prob` build a :class:`PatchMetric`; :func:`bind_metric` turns it
(or a user callable) into ``fn(logits [rows, vocab], pair [rows]) -> [rows]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor

from mechprobe.core import (
    as_int,
    evaluates,
    model_adapter,
    run,
    token_texts,
    warn_unspaced,
)

__all__ = [
    "MetricFn",
    "PatchMetric",
    "answer_prob",
    "bind_metric",
    "check_unpatched",
    "logit_diff",
    "metric_title",
    "metric_token_ids",
]

MetricFn: TypeAlias = Callable[..., Tensor]


@dataclass(frozen=True)
class PatchMetric:
    """A metric of the last position's next-token logits; build it with :func:`logit_diff` or
    :func:`answer_prob`. Answers are one string or token id for every pair, or one per pair, and
    must be single tokens (the metric reads one next-token logit; no teacher forcing).

    Attributes:
        name: ``"logit_diff"`` or ``"answer_prob"``: what is read.
        answer: The answer(s) as given: a string or token id for every pair, or a list (or
            1-d array or tensor) of them, one per pair.
        wrong: The wrong answer(s) of a logit difference, in the same forms (None for
            ``answer_prob``).

    Example:
        >>> import torch, mechprobe as mp
        >>> metric = mp.logit_diff(1, 2)  # token ids, or single-token strings
        >>> fn = metric.bind(mp.tiny_model(), n_pairs=1)
        >>> logits = torch.zeros(1, 8); logits[0, 1] = 2.0  # [rows, vocab] at the last position
        >>> metric.name, float(fn(logits, torch.tensor([0]))[0])
        ('logit_diff', 2.0)
    """

    name: Literal["logit_diff", "answer_prob"]
    answer: Any
    wrong: Any = None

    def bind(self, model: Any, n_pairs: int) -> Callable[[Tensor, Tensor], Tensor]:
        """``fn(logits [rows, vocab], pair [rows]) -> [rows]`` with the answers tokenised.

        Args:
            model: The model whose tokenizer reads string answers (and whose vocabulary bounds
                token ids).
            n_pairs: The number of prompt pairs: per-pair answers must have as many entries.

        Returns:
            ``fn(logits, pair)``: for ``[rows, vocab]`` next-token logits and each row's pair
            index ``[rows]``, the metric per row, ``[rows]`` (a logit difference, or a
            probability from a float32 softmax).

        Raises:
            ValueError: An answer is several tokens, a token id is outside the vocabulary, the
                number of per-pair answers is not ``n_pairs``, or a logit difference's answer
                and wrong answer are the same token.
            TypeError: An answer is neither a string nor a token id.
        """
        if self.name == "logit_diff":
            ans, wrong = _pair_ids(model, self.answer, self.wrong, n_pairs)
        else:
            ans = wrong = _answer_ids(model, self.answer, n_pairs, "answer")

        def fn(logits: Tensor, pair: Tensor) -> Tensor:
            rows, pair = torch.arange(len(pair), device=logits.device), pair.to(logits.device)
            right = ans.to(logits.device)[pair]
            if self.name == "answer_prob":
                return logits.float().softmax(-1)[rows, right]
            return logits[rows, right] - logits[rows, wrong.to(logits.device)[pair]]

        return fn

    @evaluates
    def evaluate(
        self,
        model: Any,
        prompts: str | Sequence[str],
        *,
        batch_size: int | None = 32,
        progress: bool = True,
    ) -> np.ndarray:
        """``[prompts]`` the metric on the model's own next-token logits after each prompt's
        last real token, one pair per prompt (a check, before patching, that the model solves the
        clean prompts and not the corrupt ones).

        Args:
            model: A TransformerLens model.
            prompts: One prompt or a list; per-pair answers are matched to them in order.
            batch_size: Prompts per forward pass (None: all at once).
            progress: Show a progress bar.

        Returns:
            ``[n_prompts]`` float64 array: the metric after each prompt.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> mp.logit_diff(1, 2).evaluate(model, ["Hi cat", "A dog"]).shape
            (2,)
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("evaluate takes a prompt or a non-empty list of prompts (strings).")
        fn = self.bind(model, len(texts))  # answers checked before the model runs
        out = run(model, texts, logit_positions=-1, batch_size=batch_size, progress=progress)
        logits = torch.as_tensor(out.logits)[:, -1]
        return fn(logits, torch.arange(len(texts))).double().cpu().numpy()


def logit_diff(answer: Any, wrong: Any) -> PatchMetric:
    """Logit of ``answer`` minus logit of ``wrong`` at the last position.

    Args:
        answer: The right answer: one single-token string (``" Paris"``, with its leading space)
            or token id for every prompt pair, or a list (or 1-d array or tensor) of them, one
            per pair.
        wrong: The wrong answer, in the same forms; never the same token as ``answer``.

    Returns:
        A :class:`PatchMetric` for ``metric=`` of the patching functions; its answers are
        tokenised and checked when it is bound to a model (an answer of several tokens, or a
        pair whose two answers are one token, is refused there).

    Example:
        >>> logit_diff(" Paris", " Warsaw").name
        'logit_diff'
    """
    return PatchMetric("logit_diff", answer, wrong)


def answer_prob(answer: Any) -> PatchMetric:
    """Probability of ``answer`` as the next token after the last position.

    Args:
        answer: One single-token string (``" Paris"``, with its leading space) or token id for
            every prompt pair, or a list (or 1-d array or tensor) of them, one per pair.

    Returns:
        A :class:`PatchMetric` for ``metric=`` of the patching functions (the softmax over the
        vocabulary, in float32, read at the answer's token); its answers are tokenised and
        checked when it is bound to a model.

    Example:
        >>> answer_prob([" Paris", " Warsaw"]).name
        'answer_prob'
    """
    return PatchMetric("answer_prob", answer)


def metric_title(name: str, answers: Sequence[str] = (), wrongs: Sequence[str] = ()) -> str:
    """What a figure says was measured: the metric with its tokens where every pair shares them,
    as :func:`mechprobe.direct_logit_attribution`'s figures say it, else ``answer``/``wrong``;
    a metric function (or a result saved without its tokens) keeps its name.

    Example:
        >>> metric_title("logit_diff", [" Paris"], [" Rome"])
        "logit[' Paris'] - logit[' Rome']"
        >>> metric_title("answer_prob", [" Paris", " Rome"]), metric_title("my_metric")
        ('p(answer)', 'my_metric')
    """

    def token(tokens: Sequence[str], word: str) -> str:
        return repr(tokens[0]) if len(set(tokens)) == 1 else word

    if name == "logit_diff" and answers and wrongs:
        return f"logit[{token(answers, 'answer')}] - logit[{token(wrongs, 'wrong')}]"
    if name == "answer_prob" and answers:
        return f"p({token(answers, 'answer')})"
    return name


def _pair_ids(
    model: Any, answer: Any, wrong: Any, n_pairs: int, *, check_space: bool = True
) -> tuple[Tensor, Tensor]:
    """A logit difference's ``(answer, wrong)`` token ids ``[pairs]``, never the same token."""
    ans, other = (
        _answer_ids(model, answer, n_pairs, "answer", check_space=check_space),
        _answer_ids(model, wrong, n_pairs, "wrong", check_space=check_space),
    )
    same = (ans == other).nonzero().flatten().tolist()
    if same:  # the difference would be 0 there whatever the model did
        token = int(ans[same[0]])
        raise ValueError(
            f"logit_diff: answer and wrong are the same token "
            f"({token_texts(model.tokenizer, [token])[0]!r}, "
            f"id {token}) for pair(s) {same[:10]}: pass a different wrong answer."
        )
    return ans, other


def _answer_ids(
    model: Any, value: Any, n_pairs: int, what: str, *, check_space: bool = True
) -> Tensor:
    single = isinstance(value, str) or as_int(value) is not None
    if not single and not isinstance(value, (list, tuple, np.ndarray, Tensor)):
        raise TypeError(
            f"{what} must be a string, a token id, or one of those per pair, got {value!r}: "
            "answers are strings or token ids."
        )
    values = [value] * n_pairs if single else list(value)
    if len(values) != n_pairs:
        raise ValueError(
            f"{what} has {len(values)} entries for {n_pairs} prompt pairs: pass one per pair, "
            "or a single one for all."
        )
    ids = []
    vocab = model_adapter(model).d_vocab  # the logits' width (d_vocab_out where it differs)
    for v in values:
        token = as_int(v)
        if token is not None and not 0 <= token < vocab:
            raise ValueError(
                f"{what} token id {token} is outside the vocabulary (0..{vocab - 1}): pass a "
                "token id of this model, or the answer as a string."
            )
        if token is None and not isinstance(v, str):
            raise TypeError(f"{what} entries must be strings or token ids, got {v!r}.")
        toks = (
            [token]
            if token is not None
            else model.tokenizer(v, add_special_tokens=False)["input_ids"]
        )
        if len(toks) != 1:
            raise ValueError(
                f"{what} {v!r} is {len(toks)} tokens {toks}: patching metrics read one next-token "
                f"logit, so pass a single-token answer (e.g. its first token "
                f"{token_texts(model.tokenizer, toks[:1])[0]!r}, id {int(toks[0])}) or a token id."
            )
        ids.append(int(toks[0]))
    if check_space:
        warn_unspaced(model, [v for v in values if isinstance(v, str)], what)
    return torch.as_tensor(ids, dtype=torch.long)


def metric_token_ids(
    model: Any, metric: Any, n_pairs: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per pair, the token ids a :class:`PatchMetric` reads, ``(answers, wrong)`` (``wrong`` empty
    for ``answer_prob``; both empty for a metric function, whose tokens no one can read off), for
    a result to record what it measured.

    Example:
        >>> import mechprobe as mp
        >>> metric_token_ids(mp.tiny_model(), logit_diff(5, 6), 2)
        ((5, 5), (6, 6))
    """
    if not isinstance(metric, PatchMetric):
        return (), ()
    if metric.name == "logit_diff":
        # Read once more for the record: the binding already warned of what is worth a word.
        ans, wrong = _pair_ids(model, metric.answer, metric.wrong, n_pairs, check_space=False)
        return tuple(ans.tolist()), tuple(wrong.tolist())
    ans = _answer_ids(model, metric.answer, n_pairs, "answer", check_space=False)
    return tuple(ans.tolist()), ()


def check_unpatched(values: Any, kind: str) -> None:
    """Refuse a non-finite metric on an unpatched run, the same way in every patching function.

    Args:
        values: The metric on the unpatched run(s): a number, an array or a tensor.
        kind: Which run it was, e.g. ``"source"``, ``"base"``, ``"clean"``.

    Raises:
        ValueError: Some value is NaN or infinite (every cell's recovery would be NaN).

    Example:
        >>> check_unpatched(torch.tensor([1.0, 2.0]), "base")
        >>> try:
        ...     check_unpatched(float("nan"), "base")
        ... except ValueError as error:
        ...     str(error)[:46]
        'The metric gave nan on an unpatched (base) run'
    """
    flat = torch.as_tensor(values).detach().double().cpu().flatten()
    bad = flat[~torch.isfinite(flat)]
    if len(bad):
        # A non-finite metric on an unpatched run made every cell's recovery NaN, silently.
        raise ValueError(
            f"The metric gave {bad[0].item()} on an unpatched ({kind}) run: make it finite "
            "on the model's own logits (a log of 0, or a division by 0?)."
        )


def bind_metric(model: Any, metric: Any, n_pairs: int) -> tuple[Callable[..., Tensor], str]:
    """``(fn(logits [rows, vocab], pair [rows]) -> [rows], name)`` for a metric or a callable.

    A callable taking two positional arguments receives each row's pair index as the second.

    Example:
        >>> import mechprobe as mp
        >>> fn, name = bind_metric(mp.tiny_model(), logit_diff(1, 2), n_pairs=1)
        >>> name, tuple(fn(torch.zeros(4, 259), torch.zeros(4, dtype=torch.long)).shape)
        ('logit_diff', (4,))
    """
    if isinstance(metric, PatchMetric):
        return metric.bind(model, n_pairs), metric.name
    if not callable(metric):
        raise TypeError(
            f"metric must be logit_diff(...), answer_prob(...) or a callable "
            f"fn(logits [rows, vocab]) -> [rows], got {type(metric).__name__}."
        )
    try:
        params = inspect.signature(metric).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: assume fn(logits)
        params = inspect.Signature().parameters.values()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    n_args = sum(p.kind in positional and p.default is p.empty for p in params)
    takes_pair = n_args >= 2 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)

    def fn(logits: Tensor, pair: Tensor) -> Tensor:
        try:
            out = metric(logits, pair) if takes_pair else metric(logits)
        except IndexError as error:
            # TransformerLens's patching functions pass [batch, seq, vocab]: a ported metric
            # indexes lg[:, -1, a] and failed with a bare "too many indices".
            raise IndexError(
                f"The metric raised IndexError ({error}). It receives the last position's logits, "
                f"shape [rows, vocab] (here {tuple(logits.shape)}), not [batch, seq, vocab] as "
                "TransformerLens's patching functions pass: write lg[:, a] - lg[:, w], not "
                "lg[:, -1, a] - lg[:, -1, w]."
            ) from error
        if out is None:  # torch said "Could not infer dtype of NoneType"
            raise TypeError(
                "The metric returned None: return one float per row, shape [rows] (e.g. "
                "return lg[:, a] - lg[:, w]; is a return statement missing?)."
            )
        out = torch.as_tensor(out)
        # An int metric (an argmax by mistake) was averaged into mean token ids ("clean 134");
        # a bool one is a hit rate, which averages to a share.
        if not (out.is_floating_point() or out.dtype == torch.bool):
            raise TypeError(
                f"The metric returned {out.dtype} values: return float scores, e.g. a logit "
                "difference (an argmax's token ids average to nothing meaningful; "
                "attribution_patch refuses it too)."
            )
        # Checked here, for every analysis: attribution patching summed a scalar metric over
        # its one row and went on, where patch refused the same metric.
        shape = tuple(out.shape)
        if shape != (logits.shape[0],):
            raise ValueError(
                f"metric returned shape {shape} for {logits.shape[0]} rows of logits: "
                "return one value per row, shape [rows] (lg[:, a] - lg[:, w], not a sum or mean)."
            )
        return out

    return fn, getattr(metric, "__name__", "metric")
