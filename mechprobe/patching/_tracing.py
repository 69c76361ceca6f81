"""Causal tracing with noise (Meng et al. 2022, "Locating and editing factual associations in
GPT", ROME): :func:`causal_trace` -> :class:`TraceResult`.

The subject's token embeddings are corrupted with Gaussian noise of 3x the standard deviation of
the subjects' embeddings (as ROME), which makes the model lose the fact; then each state (the
residual stream after a layer, an MLP's output or an attention layer's output) at each position is
restored alone from the clean run, and the *indirect effect* of that state is how much of the
answer's probability the restoration brings back: ``IE = p(answer | corrupted, state restored) -
p(answer | corrupted)``, averaged over noise samples and prompts. ROME's window restoration
restores the MLP (or attention) outputs of ``window`` consecutive layers around each layer at
once (``layer - window // 2 .. layer + (window - 1) // 2``), which shows where the fact is
recalled even when no single layer carries it.

Positions before the subject see no noise, so restoring them changes nothing: they are not run
and hold the corrupted run's value exactly. Every (state, position, noise sample) is a cell of
the batched engine, so all of them share forward passes: a noised run of each prompt and sample is
computed once and each restoration adds only the tokens from its position on.

Controls: ``n_random`` restorations per cell move the corrupted state by the same distance as the
real restoration, ``||clean - corrupted||``, in a random direction (control ``j`` in noise sample
``j mod n_noise``), and the spread over prompts is kept.

Prompts of different lengths are compared on ROME's token categories: first, middle and last
subject token, the first token after the subject, further tokens, and the last token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechprobe.core import (
    Capture,
    Layers,
    Result,
    Site,
    StopForward,
    check_float,
    check_int,
    check_seed,
    control_seed,
    evaluates,
    expand_sites,
    figure_of,
    intervene,
    keyed_seed,
    literal,
    model_adapter,
    readout,
    token_label,
    token_texts,
    tokenize,
    warn,
)
from mechprobe.patching._activation import _check_common
from mechprobe.patching._engine import (
    ADD,
    COPY,
    RANDOM,
    Base,
    Cell,
    Edit,
    Plan,
    run_plan,
    site_edit,
    unit_vectors,
)
from mechprobe.patching._metrics import (
    MetricFn,
    PatchMetric,
    answer_prob,
    bind_metric,
    metric_title,
)
from mechprobe.patching._result import joined_model_record

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class TaskLike(Protocol):
    """What causal tracing reads from a :class:`mechprobe.Task`."""

    def prompts(self) -> list[str]: ...
    def inputs(self) -> list[str]: ...
    def answers(self) -> list[str]: ...


__all__ = [
    "CATEGORIES",
    "TRACE_KINDS",
    "TraceResult",
    "causal_trace",
    "subject_span",
    "trace_noise",
    "trace_noise_level",
]

#: The site kinds ``causal_trace`` restores: states of the residual stream and the writes into it
#: (every kind that is not one head's; heads are patched with ``patch``).
TRACE_KINDS: tuple[str, ...] = (
    "resid_pre",
    "resid_mid",
    "mlp_in",
    "resid_post",
    "mlp_out",
    "attn_out",
)
#: ROME's token categories (the averaged causal-trace figures of Meng et al.).
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def subject_span(model: Any, prompt: str, subject: str) -> tuple[int, int]:
    """``(start, stop)``: the token positions of the last occurrence of ``subject`` in ``prompt``,
    counted as :func:`mechprobe.tokenize` counts them (BOS included).

    The last, because in a few-shot prompt that is the query's; ROME's code (``find_token_range``)
    takes the first, which differs only where the subject occurs twice.

    Raises:
        ValueError: ``subject`` is not in ``prompt``.

    Example:
        >>> from mechprobe.core import tiny_model
        >>> subject_span(tiny_model(), "The capital of Peru is", "Peru")
        (16, 20)
    """
    at = prompt.rfind(subject)
    if not subject or at < 0:
        raise ValueError(
            f"The subject {subject!r} is not in the prompt {prompt!r}: pass the words of the "
            "prompt whose embeddings are to be corrupted."
        )
    end = at + len(subject)
    before, after = prompt[at - 1 : at], prompt[end : end + 1]
    if (before.isalnum() and subject[0].isalnum()) or (after.isalnum() and subject[-1].isalnum()):
        # ROME's code matches a substring too; tracing "cat" in "concatenate" corrupts part of
        # another word (review 26b L6).
        start, stop = at, end
        while start > 0 and prompt[start - 1].isalnum():
            start -= 1
        while stop < len(prompt) and prompt[stop].isalnum():
            stop += 1
        warn(
            f"The subject {subject!r} is part of the word {prompt[start:stop]!r} of the prompt (a "
            "substring is matched, as in ROME's code): pass the whole word if you mean it."
        )
    encoded = model.tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    bos = int(tokenize(model, [prompt]).lengths[0]) - len(encoded["input_ids"])
    inside = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > at]
    if not inside:
        raise ValueError(f"The subject {subject!r} covers no token of {prompt!r}.")
    return inside[0] + bos, inside[-1] + 1 + bos


def trace_noise(
    prompt: Sequence[int] | Tensor,
    n_noise: int,
    n_tokens: int,
    d_model: int,
    level: float,
    *,
    seed: int = 0,
) -> Tensor:
    """``[n_noise, n_tokens, d_model]``: the noise :func:`causal_trace` adds to the subject
    embeddings of the prompt with token ids ``prompt`` (BOS included, as ``model.to_tokens``
    gives them), ``level * N(0, 1)`` from a generator seeded with ``seed`` and a hash of those
    ids, so a loop written by hand can reproduce it. Keyed by the prompt, not by its place in the
    list: a prompt's trace is the same whichever prompts it is traced beside and in what order
    (the noise *level*, by default, is still measured over all the prompts' subjects, as ROME).

    Args:
        prompt: One prompt's token ids, a 1-d list, array or tensor of integers (BOS included,
            e.g. ``model.to_tokens(prompt)[0]``): the noise's key, not its index in a list.
        n_noise: Noise samples (``causal_trace``'s ``n_noise``).
        n_tokens: The number of subject tokens the noise covers: the length ``stop - start`` of
            the subject's token span in the prompt (one row of noise per subject token).
        d_model: The model's residual width (``model.cfg.d_model``).
        level: The noise's standard deviation (e.g. :func:`trace_noise_level`'s), at least 0.
        seed: The seed ``causal_trace`` was given.

    Returns:
        ``[n_noise, n_tokens, d_model]`` float32 tensor: sample ``k``'s noise for the subject's
        ``q``-th token is ``[k, q]``.

    Raises:
        TypeError: ``prompt`` is an index, a batch, or ids that are not integers.

    Example:
        >>> tuple(trace_noise([1, 45, 67], 10, 2, 64, 1.0, seed=0).shape)
        (10, 2, 64)
    """
    if isinstance(prompt, (int, np.integer)):
        raise TypeError(
            "trace_noise takes the prompt's token ids (e.g. model.to_tokens(prompt)[0]), not its "
            "index: the noise is keyed by the prompt itself, so that it does not depend on the "
            "prompt's place in the list."
        )
    ids = prompt if isinstance(prompt, Tensor) else np.asarray(prompt)
    integral = (
        not ids.is_floating_point() and not ids.is_complex()
        if isinstance(ids, Tensor)
        else (ids.dtype.kind in "iu")
    )
    if ids.ndim != 1 or not integral or ids.dtype in (torch.bool, np.bool_):
        # Float ids hash like ints ([1.0, 2.0] gave [1, 2]'s noise) and a batch of one row like
        # its row: either is a mistake to name, not to read (review 26b L5).
        raise TypeError(
            "trace_noise takes one prompt's token ids, a 1-d list or tensor of integers (e.g. "
            f"model.to_tokens(prompt)[0]), got {ids.ndim}-d {ids.dtype}."
        )
    shape = (
        check_int(n_noise, "n_noise", 1),
        check_int(n_tokens, "n_tokens", 0),
        check_int(d_model, "d_model", 1),
    )
    level = check_float(level, "level", 0.0)
    # causal_trace checks its seed: the noise it claims to reproduce must take the same seeds.
    gen = torch.Generator().manual_seed(keyed_seed(check_seed(seed), [prompt]))
    # float32 draws whatever torch's default dtype, so the noise (and every trace) is the same.
    return torch.randn(shape, generator=gen, dtype=torch.float32) * level


@evaluates
def trace_noise_level(model: Any, subjects: str | Sequence[str], *, factor: float = 3.0) -> float:
    """ROME's noise level for a model: ``factor`` (3) times the standard deviation of the token
    embeddings (``hook_embed``, where :func:`causal_trace` adds its noise) of ``subjects``, each
    tokenized alone without BOS, as ROME's ``collect_embedding_std`` over every subject of its
    known-facts dataset. Pass it as ``causal_trace(..., noise=level)`` to trace with one level
    per model, as ROME's figures do, rather than the default level of each call's own subjects
    in their prompts.

    Args:
        model: A TransformerLens model.
        subjects: The subjects (e.g. every item's argument of a task: ``[i.argument.strip()
            for i in task.items]``).
        factor: The multiple of the standard deviation (ROME: 3).

    Returns:
        The noise level: ``factor`` times the standard deviation over every entry of the
        subjects' token embeddings.

    Raises:
        ValueError: No subject (or one that is not a string), or a subject with no token.

    Example:
        >>> import mechprobe as mp
        >>> level = mp.trace_noise_level(mp.tiny_model(), ["France", "Japan"])
        >>> level > 0
        True
    """
    items = [subjects] if isinstance(subjects, str) else list(subjects)
    if not items or not all(isinstance(s, str) for s in items):
        raise ValueError(
            "trace_noise_level takes subjects as a non-empty list of strings, e.g. "
            "['France', 'Japan']."
        )
    factor = check_float(factor, "factor", 0.0, low_open=True)
    ids = [model.to_tokens(s, prepend_bos=False)[0] for s in items]
    empty = [s for s, t in zip(items, ids, strict=True) if len(t) == 0]
    if empty:
        raise ValueError(f"The subject(s) {empty[:3]} have no token: drop them.")
    # A token's embedding does not depend on its neighbours: the subjects run as rows of up to
    # 256 tokens, the forward ended once the embeddings are read.
    flat = torch.cat(ids)
    rows = []
    for start in range(0, len(flat), 256):
        read: list[Tensor] = []

        def stop(act: Tensor, hook: Any, read: list[Tensor] = read) -> None:
            read.append(act.detach().clone())
            raise StopForward

        chunk = flat[start : start + 256]
        spec: dict[Any, Any] = {"hook_embed": stop}  # a TransformerLens hook function
        with torch.no_grad(), contextlib.suppress(StopForward), intervene(model, spec):
            model(chunk[None].to(model.W_E.device))
        rows.append(read[0][0].reshape(-1))
    return factor * float(torch.cat(rows).double().std())


def _answer_tokens(model: Any, answer: Any) -> list[int]:
    """The tokens of ``answer``: a string's (its first is traced, as ROME) or one token id."""
    if isinstance(answer, str):
        tokens = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ValueError(f"The answer {answer!r} tokenises to nothing.")
        return [int(t) for t in tokens]
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)):
        raise TypeError(
            f"answers takes strings or token ids, got {type(answer).__name__} {answer!r}."
        )
    return [check_int(answer, "an answer's token id", 0, int(model.cfg.d_vocab) - 1)]


def _categories(start: int, stop: int, length: int) -> list[list[str]]:
    """ROME's categories of each position (several where they coincide, none before the
    subject)."""
    out: list[list[str]] = []
    for p in range(length):
        names = []
        if p == start:
            names.append(CATEGORIES[0])
        if start < p < stop - 1:
            names.append(CATEGORIES[1])
        if p == stop - 1:
            names.append(CATEGORIES[2])
        if p == stop:
            names.append(CATEGORIES[3])
        if stop < p < length - 1:
            names.append(CATEGORIES[4])
        if p == length - 1:
            names.append(CATEGORIES[5])
        out.append(names)
    return out


def _members(start: int, stop: int, length: int) -> dict[int, list[int]]:
    """The positions of each category (its index in :data:`CATEGORIES`) that a prompt has."""
    members: dict[int, list[int]] = {}
    for p, names in enumerate(_categories(start, stop, length)):
        for name in names:
            members.setdefault(CATEGORIES.index(name), []).append(p)
    return members


@dataclass(frozen=True, eq=False, repr=False)
class TraceResult(Result, format="mechprobe.TraceResult", version=1, html_figure=True):
    """Causal tracing with noise: the answer's metric with each state restored.

    Attributes:
        scores: Per prompt ``[kinds, layers, positions]``: the metric with that state restored
            (window restoration for ``mlp_out``/``attn_out``), mean over noise samples.
        noise_sd: Per prompt, the same shape: the standard deviation over noise samples.
        random: Per prompt ``[kinds, layers, positions]``: the mean metric of the random controls
            (the state moved by the restoration's distance in random directions); NaN without.
        clean: ``[prompts]`` the clean run's metric.
        corrupted: ``[prompts, n_noise]`` the metric with the subject noised, per noise sample.
        kinds: The state kinds traced.
        layers: The layers traced (window centres for ``mlp_out``/``attn_out``).
        subjects: Per prompt ``(start, stop)`` of the subject's tokens.
        tokens: Per prompt, its tokens as strings.
        answers: Per prompt, the answer given (the clean top token's text by default); empty
            with a ``metric``.
        answer_ids: Per prompt, the token id whose probability was traced (an answer's first
            token, as ROME); None with a ``metric`` (or a result saved before it was recorded).
        noise_level: The noise's standard deviation (3 x the subjects' embedding SD by default).
        window: Layers restored together for ``mlp_out``/``attn_out``.
        metric: The metric's name.
        seed: Seed of the noise and of the random directions.
        n_random: Random controls per cell (None: a result saved before it was recorded).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.causal_trace(mp.tiny_model(), "The cat sat on the", "cat", sites="mlp_out",
        ...                       n_noise=2, progress=False)
        >>> res.scores[0].shape, type(res.plot()).__name__  # [kinds, layers, positions]
        ((1, 3, 19), 'Figure')
    """

    scores: tuple[np.ndarray, ...]
    noise_sd: tuple[np.ndarray, ...]
    random: tuple[np.ndarray, ...]
    clean: np.ndarray
    corrupted: np.ndarray
    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    subjects: tuple[tuple[int, int], ...]
    tokens: tuple[tuple[str, ...], ...]
    answers: tuple[str, ...]
    noise_level: float
    window: int
    metric: str
    seed: int = 0
    n_random: int | None = None
    answer_ids: tuple[int, ...] | None = None
    model_name: str = ""
    model_dtype: str = ""

    @property
    def n_noise(self) -> int:
        """Noise samples per prompt."""
        return int(self.corrupted.shape[1])

    @classmethod
    def concat(cls, results: Sequence[TraceResult]) -> TraceResult:
        """Join traces of different prompts (split over jobs, or extended later) into the trace
        of one run over all of them, prompts in order.

        A prompt's noise and random controls are keyed by the seed and its tokens, so the joined
        trace equals one run over every prompt (up to float rounding of the batching) when the
        parts used the same noise level. The default level is 3 x the standard deviation of the
        *call's own* subjects' embeddings, so it differs between parts: pass the same ``noise=``
        to every part (e.g. the level of a first run, ``first.noise_level``).

        Args:
            results: Traces of one analysis on different prompts, in the order joined.

        Returns:
            One :class:`TraceResult` over every prompt (``clean`` and ``corrupted`` concatenated,
            per-prompt fields joined in order).

        Raises:
            TypeError: ``results`` is empty or holds other types.
            ValueError: The parts differ in kinds, layers, noise level, window, metric, seed,
                noise samples or random controls per prompt (the message names the field).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> kw = dict(sites="mlp_out", n_noise=2, noise=0.5, progress=False)
            >>> parts = [mp.causal_trace(model, p, s, **kw) for p, s in [("A cat sat", "cat"),
            ...                                                          ("A dog ran", "dog")]]
            >>> len(mp.TraceResult.concat(parts).scores)
            2
        """
        parts = list(results)
        if not parts or not all(type(r) is cls for r in parts):
            got = sorted({type(r).__name__ for r in parts}) or ["nothing"]
            raise TypeError(f"TraceResult.concat takes TraceResults; got {', '.join(got)}.")
        first = parts[0]
        compared = ("kinds", "layers", "noise_level", "window", "metric", "seed", "n_noise")
        for name in (*compared, "n_random"):
            for i, part in enumerate(parts[1:], 1):
                if getattr(part, name) != getattr(first, name):
                    hint = (
                        " (the default noise level comes from each call's own subjects: pass "
                        "the same noise= to every part)"
                        if name == "noise_level"
                        else ""
                    )
                    raise ValueError(
                        f"Cannot join: part {i} has {name}={getattr(part, name)!r}, part 0 "
                        f"{getattr(first, name)!r}; join traces of the same analysis run on "
                        f"different prompts{hint}."
                    )
        per_prompt = ("scores", "noise_sd", "random", "subjects", "tokens", "answers")
        joined: dict[str, Any] = {
            name: tuple(item for part in parts for item in getattr(part, name))
            for name in per_prompt
        }
        for name in ("clean", "corrupted"):
            joined[name] = np.concatenate([getattr(part, name) for part in parts], axis=0)
        scored = [part.answer_ids for part in parts]
        joined["answer_ids"] = (
            None if any(i is None for i in scored) else tuple(a for i in scored for a in i or ())
        )
        same = ("kinds", "layers", "noise_level", "window", "metric", "seed", "n_random")
        joined["model_name"] = joined_model_record(parts, "model_name")
        joined["model_dtype"] = joined_model_record(parts, "model_dtype")
        return cls(**joined, **{name: getattr(first, name) for name in same})

    def indirect_effect(self, prompt: int) -> np.ndarray:
        """``[kinds, layers, positions]`` of one prompt: score minus the corrupted metric.

        Args:
            prompt: The prompt's index.

        Returns:
            ``[n_kinds, n_layers, n_positions]`` float array.
        """
        return self.scores[prompt] - float(self.corrupted[prompt].mean())

    def random_effect(self, prompt: int) -> np.ndarray:
        """The random controls' indirect effect, same shape (NaN without controls).

        Args:
            prompt: The prompt's index.

        Returns:
            ``[n_kinds, n_layers, n_positions]`` float array.
        """
        return self.random[prompt] - float(self.corrupted[prompt].mean())

    def by_category(
        self, random: bool = False, *, pool: Literal["prompt", "token"] = "prompt"
    ) -> np.ndarray:
        """``[kinds, layers, 6]`` indirect effect averaged over prompts per ROME token category
        (:data:`CATEGORIES`), or the random controls' with ``random=True``; NaN where no prompt
        has the category.

        ``pool="prompt"`` (what :meth:`summary` and :meth:`plot` show): each prompt's positions
        of a category are averaged first, so its middle-subject or further tokens count once
        however many there are; then the prompts that have the category are averaged.
        ``pool="token"`` is ROME's averaging (``read_knowlege`` in its
        ``average_causal_effects`` notebook): the scores at every token of the category, pooled
        over prompts, minus the corrupted metric averaged over all prompts, so a prompt with more
        such tokens weighs more. The two agree on the four one-token categories wherever every
        prompt has them, and differ on middle-subject and further tokens. (ROME's averaged
        heat maps also clip the result at 0; these values keep their sign.)

        Args:
            random: Average the random controls' effects instead of the restorations'.
            pool: ``"prompt"`` (each prompt's category mean first) or ``"token"`` (ROME's).

        Returns:
            ``[n_kinds, n_layers, 6]`` float array, its last axis in the order of
            :data:`CATEGORIES`.

        Raises:
            ValueError: An unknown ``pool``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.causal_trace(mp.tiny_model(), ["The cat sat", "A big red dog ran"],
            ...                       ["cat", "big red dog"], sites="mlp_out", n_noise=2, window=1)
            >>> res.by_category(pool="token").shape
            (1, 3, 6)
        """
        if pool == "prompt":
            means, has = self._per_prompt(random)
            count = has.sum(0)
            total = np.where(has[:, None, None, :], means, 0.0).sum(0)
        elif pool == "token":
            shape = (len(self.kinds), len(self.layers), len(CATEGORIES))
            total, count = np.zeros(shape), np.zeros(len(CATEGORIES))
            for i, (start, stop) in enumerate(self.subjects):
                values = self.random[i] if random else self.scores[i]
                for c, positions in _members(start, stop, values.shape[-1]).items():
                    total[..., c] += values[..., positions].sum(-1)
                    count[c] += len(positions)
            low = np.mean([corrupted.mean() for corrupted in self.corrupted])
            total -= low * count  # ROME subtracts one mean corrupted score from pooled scores
        else:
            raise ValueError(f"pool must be 'prompt' or 'token' (ROME's averaging), got {pool!r}.")
        with np.errstate(invalid="ignore", divide="ignore"):
            return total / count

    def _per_prompt(self, random: bool) -> tuple[np.ndarray, np.ndarray]:
        """``([prompts, kinds, layers, 6], [prompts, 6])``: each prompt's indirect effect averaged
        over its positions of each category, and whether it has the category."""
        shape = (len(self.subjects), len(self.kinds), len(self.layers), len(CATEGORIES))
        means, has = np.full(shape, np.nan), np.zeros((shape[0], shape[-1]), dtype=bool)
        for i, (start, stop) in enumerate(self.subjects):
            effect = self.random_effect(i) if random else self.indirect_effect(i)
            for c, positions in _members(start, stop, effect.shape[-1]).items():
                means[i, ..., c] = effect[..., positions].mean(-1)
                has[i, c] = True
        return means, has

    @property
    def corrupt(self) -> np.ndarray:
        """``[prompts, n_noise]`` the corrupted runs' metric under the name
        :class:`mechprobe.PatchResult` gives it (the field is :attr:`corrupted`, ROME's word)."""
        return self.corrupted

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, site and position: site (``"mlp_out@5"``, the window's centre),
        kind, layer, token, category (ROME's, ``""`` before the subject), value (the metric with
        the clean state restored: ROME's score), effect (its indirect effect: value minus the
        corrupted run's metric), its standard deviation over noise samples (noise_std), the random controls' effect, metric.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.causal_trace(mp.tiny_model(), ["The cat sat"], ["cat"], sites="mlp_out",
            ...                       n_noise=2, n_random=1, window=1)
            >>> list(res.to_frame().columns)[:5]
            ['prompt', 'site', 'kind', 'layer', 'position']
        """
        frames = []
        for i, (start, stop) in enumerate(self.subjects):
            n_pos = self.scores[i].shape[-1]
            cats = [" / ".join(c) for c in _categories(start, stop, n_pos)]
            k, layer, pos = np.meshgrid(
                np.arange(len(self.kinds)),
                np.arange(len(self.layers)),
                np.arange(n_pos),
                indexing="ij",
            )
            frames.append(
                pd.DataFrame(
                    {
                        "prompt": i,
                        "site": [
                            f"{self.kinds[a]}@{self.layers[b]}"
                            for a, b in zip(k.ravel(), layer.ravel(), strict=True)
                        ],
                        "kind": np.asarray(self.kinds)[k.ravel()],
                        "layer": np.asarray(self.layers)[layer.ravel()],
                        "position": pos.ravel(),
                        "token": np.asarray(self.tokens[i])[pos.ravel()],
                        "category": np.asarray(cats)[pos.ravel()],
                        "value": self.scores[i].ravel(),
                        "effect": self.indirect_effect(i).ravel(),
                        "noise_std": self.noise_sd[i].ravel(),
                        "random_effect": self.random_effect(i).ravel(),
                        "metric": self.metric,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """Per kind: the (layer, category) of the largest average indirect effect (``effect``,
        as :meth:`by_category`), its standard deviation over the prompts that have the category
        (``spread``), the random controls' effect there, and the clean and corrupt metrics.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.causal_trace(mp.tiny_model(), ["The cat sat"], ["cat"], sites="mlp_out",
            ...                       n_noise=2, n_random=1, window=1)
            >>> list(res.summary().columns)[:3]
            ['kind', 'layer', 'category']
        """
        effect, control = self.by_category(), self.by_category(random=True)
        means, has = self._per_prompt(random=False)
        rows = []
        for k, kind in enumerate(self.kinds):
            grid = np.nan_to_num(effect[k], nan=-np.inf)
            layer, c = np.unravel_index(int(np.argmax(grid)), grid.shape)
            spread = means[has[:, c], k, layer, c]  # over the prompts that have the category
            rows.append(
                {
                    "kind": kind,
                    "layer": self.layers[layer],
                    "category": CATEGORIES[c],
                    "effect": float(effect[k, layer, c]),
                    # undefined over one prompt: NaN, not 0 ("perfectly consistent")
                    "spread": float(np.std(spread, ddof=1)) if len(spread) > 1 else float("nan"),
                    "random_effect": float(control[k, layer, c]),
                    "clean": float(np.mean(self.clean)),
                    "corrupt": float(np.mean(self.corrupted)),
                }
            )
        return pd.DataFrame(rows)

    def _describe(self) -> str:
        return (
            f"{len(self.scores)} prompt(s), {len(self.kinds)} kind(s) x {len(self.layers)} "
            f"layers, {self.n_noise} noise sample(s), window {self.window}; {self.metric} clean "
            f"{float(np.mean(self.clean)):.3g}, corrupted {float(np.mean(self.corrupted)):.3g}"
        )

    def plot(
        self, ax: Axes | None = None, *, kind: str | None = None, shared: bool = True
    ) -> Figure:
        """ROME's heatmaps: indirect effect over layers x token categories (averaged over
        prompts), or layers x tokens for a single prompt; one panel per kind, or ``kind``'s alone
        (the first kind when ``ax`` is given and ``kind`` is not).

        Args:
            ax: Draw one kind into these axes (default: a new figure).
            kind: The state kind to draw (default: every kind traced).
            shared: One colour scale for every panel, so that kinds compare by colour (ROME's
                figure gives each its own: ``shared=False``). Negative effects (restoring hurt)
                are drawn in a second colour, not clipped to white.

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: ``kind`` was not traced.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.causal_trace(mp.tiny_model(), ["The cat sat"], ["cat"], sites="mlp_out",
            ...                       n_noise=2, n_random=1, window=1)
            >>> len(res.plot().axes)
            2
        """
        from matplotlib import colormaps
        from matplotlib.colors import Normalize, TwoSlopeNorm

        if kind is not None and kind not in self.kinds:
            raise ValueError(f"kind {kind!r} was not traced; traced: {list(self.kinds)}.")
        kinds = [kind] if kind is not None else list(self.kinds)
        if ax is not None:
            kinds = kinds[:1]
        single = len(self.scores) == 1
        if ax is None:
            from matplotlib.figure import Figure

            height = 0.3 * (len(self.tokens[0]) if single else len(CATEGORIES)) + 1.5
            fig = Figure(figsize=(1.6 + 3.4 * len(kinds), max(3.0, height)), layout="constrained")
            axes = list(fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0])
        else:
            fig, axes = figure_of(ax), [ax]
        data = self.indirect_effect(0) if single else self.by_category()
        labels = list(self.tokens[0]) if single else list(CATEGORIES)
        if single:
            start, stop = self.subjects[0]
            # tokens made visible (a space's row had a blank label, a newline broke its line)
            labels = [
                literal(token_label(t, 16)) + ("*" if start <= p < stop else "")
                for p, t in enumerate(labels)
            ]
        grids = {name: data[self.kinds.index(name)].T for name in kinds}  # [rows, layers]

        def norm(values: np.ndarray) -> Normalize:
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            if low >= 0 and high <= 0:  # all zero: a colour bar from 0 to 1e-12 said nothing
                high = 1.0
            high = max(high, 1e-12)
            if low < 0:
                # Restoring hurt somewhere: a diverging scale centred at 0, as deep for -x as for
                # x (with vmin at the minimum, a -0.002 cell was as dark as a 0.69 one).
                reach = max(high, -low)
                return TwoSlopeNorm(vcenter=0.0, vmin=-reach, vmax=reach)
            return Normalize(vmin=0.0, vmax=high)

        common = norm(np.stack(list(grids.values()))) if shared else None
        # About six layer ticks a panel: 15 two-digit labels ran together in a 4-inch panel.
        step = max(1, -(-len(self.layers) // 6))
        ticks = list(range(0, len(self.layers), step))
        image = None
        # The answer traced, where every prompt shares it: "answer_prob" named no token.
        measured = metric_title(self.metric, [a for a in self.answers if a])
        for axis, name in zip(axes, kinds, strict=True):
            scale = common if common is not None else norm(grids[name])
            name_of_map = "PuOr" if isinstance(scale, TwoSlopeNorm) else "Purples"
            # An empty category (no middle subject token in one- or two-token subjects) is
            # grey, not white as an effect of 0.
            cmap = colormaps[name_of_map].with_extremes(bad="0.85")
            image = axis.imshow(grids[name], cmap=cmap, norm=scale, aspect="auto")
            axis.set_yticks(range(len(labels)), labels=labels)
            axis.set_xticks(ticks, labels=[str(self.layers[t]) for t in ticks])
            axis.set_xlabel("layer" + (f" (window {self.window})" if self._windowed(name) else ""))
            axis.set_title(f"restoring {name}")
            if common is None:
                fig.colorbar(image, ax=axis, label=literal(f"indirect effect on {measured}"))
        if common is not None and image is not None:
            fig.colorbar(image, ax=axes, label=literal(f"indirect effect on {measured}"))
        if ax is None:
            clean, corrupted = float(np.mean(self.clean)), float(np.mean(self.corrupted))
            star = "; * marks the noised subject's tokens" if single else ""
            if not single and bool(np.isnan(np.stack(list(grids.values()))).any()):
                star = "; grey: no such token in any prompt"
            # two lines: on one, a one-panel figure cut it at both sides
            fig.suptitle(
                literal(f"{measured}: clean {clean:.3g}, subject noised {corrupted:.3g}\n")
                + f"{len(self.scores)} prompt(s) x {self.n_noise} noise samples{star}",
                fontsize=9,
            )
        return fig

    def _windowed(self, kind: str) -> bool:
        return self.window > 1 and kind in ("mlp_out", "attn_out")


def _embedding_sd(model: Any, ids: list[Tensor], spans: list[tuple[int, int]]) -> float:
    """ROME's noise scale: the standard deviation of the subjects' token embeddings."""
    rows = []
    for t, (a, b) in zip(ids, spans, strict=True):
        cap = Capture(positions=list(range(a, b)))
        # A whole forward pass: hook_embed fires inside the model's forward (a HookedTransformer's
        # embed module alone does not run it).
        with torch.no_grad(), intervene(model, {"hook_embed": cap}):
            model(t[None].to(model.W_E.device))
        assert cap.value is not None
        rows.append(cap.value[0].reshape(-1))
    return float(torch.cat(rows).double().std())


def _argument_in(prompt: str, argument: str, given: str) -> str:
    """The subject for a task item: its argument (``argument`` has a leading space) as the word
    whose last occurrence is noised, the bare word where that is the spaced one (so the space's
    token stays clean, as when a user passes the word); the spaced one where the bare word also
    ends inside a later word ("red" in "colored"); the item's input (``given``) where the prompt
    does not hold the argument ("go" for "went")."""
    word = argument.lstrip()
    if argument in prompt:
        return word if prompt.rfind(word) == prompt.rfind(argument) + 1 else argument
    return word if word in prompt else given


@evaluates
def causal_trace(
    model: Any,
    prompts: str | Sequence[str] | TaskLike,
    subjects: str | Sequence[str] | None = None,
    *,
    answers: str | int | Sequence[str | int] | None = None,
    metric: PatchMetric | MetricFn | None = None,
    sites: str | Sequence[str] = ("resid_post", "mlp_out", "attn_out"),
    layers: Layers = "all",
    window: int = 10,
    n_noise: int = 10,
    noise: float | None = None,
    n_random: int = 3,
    seed: int = 0,
    cells_per_batch: int = 256,
    memory_budget: int = 1 << 30,
    packed: bool | None = None,
    progress: bool = True,
) -> TraceResult:
    """Trace where a fact is recalled: corrupt the subject with noise, restore each state.

    Args:
        model: A TransformerLens model.
        prompts: A prompt, a list of prompts, or a :class:`mechprobe.Task` (its prompts, with each
            item's argument as the subject, its last occurrence in the prompt, and its answer as
            the answer). Every item is traced, answered or not; ROME averages the facts the
            model knows, ``task.subset(np.flatnonzero(mp.score_task(model, task).correct))``.
        subjects: The subject's words in each prompt (their last occurrence is noised); taken
            from the task when ``prompts`` is one.
        answers: The answer whose first token's probability is traced (default: the clean
            model's own top token, as ROME; a longer answer warns, naming the token traced): one
            string or token id for every prompt, or one per prompt; taken from the task when
            ``prompts`` is one. The ids traced are the result's ``answer_ids``.
        metric: Instead of the answer's probability: a :func:`mechprobe.logit_diff` or a callable
            of the last position's logits, as for :func:`mechprobe.patch`.
        sites: State kinds to restore: ``"resid_post"`` (ROME's hidden states), ``"mlp_out"``,
            ``"attn_out"`` (also ``"resid_pre"``, ``"resid_mid"`` and ``"mlp_in"``, what an MLP
            alone reads; states, like the residual stream, are restored one layer at a time).
        layers: Layers traced (window centres for ``mlp_out``/``attn_out``).
        window: Layers restored together for ``mlp_out`` and ``attn_out`` (ROME: 10; 1 restores
            one layer). Residual-stream states are always restored one layer at a time.
        n_noise: Noise samples per prompt (ROME: 10).
        noise: The noise's standard deviation (default: 3 x the standard deviation of the
            token embeddings of this call's subjects, in their prompts). ROME's level is one
            constant per model, 3 x the standard deviation over the embeddings of every subject
            of its dataset (:func:`trace_noise_level`): pass such a level to compare with its
            figures, or to trace parts of a task at one level (as :meth:`TraceResult.concat`
            requires).
        n_random: Random controls per cell: the state moved by the restoration's distance in a
            random direction (seeds ``seed, seed + 1, ...``, modulo ``2**32``; control ``j`` in noise
            sample ``j mod n_noise``).
        seed: Seed of the noise (:func:`trace_noise`) and of the random directions.
        cells_per_batch: Restorations per forward pass, at most (256, as in every patching
            function).
        memory_budget: As for :func:`mechprobe.patch`: passes take fewer restorations on long
            prompts, so memory stays near it.
        packed: Share each noised run's prefix between its restorations (None: when the model
            supports it).
        progress: Show a progress bar.

    Returns:
        A :class:`TraceResult`.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.causal_trace(mp.tiny_model(), "The cat sat on the", "cat", sites="mlp_out",
        ...                       n_noise=2, n_random=1, window=1)
        >>> res.scores[0].shape  # [kinds, layers, positions]
        (1, 3, 19)
    """
    if answers is not None and metric is not None:  # the answers would be recorded, unscored
        raise ValueError(
            "Pass answers= (each scored by its first token's probability) or metric=, not both."
        )
    if not isinstance(prompts, (str, list, tuple)) and hasattr(prompts, "inputs"):  # a Task
        if subjects is not None or answers is not None:
            raise ValueError(
                "prompts is a Task: its items give the subjects and answers; do not pass them too."
            )
        task: Any = prompts
        task_prompts: list[str] = task.prompts()
        # A metric of the caller's scores the runs: then the task's answers are not recorded.
        prompts, answers = task_prompts, (task.answers() if metric is None else None)
        # The subject is the item's argument (the country, the colour, the verb), not its whole
        # input: an extractive item's input is a sentence and a question.
        subjects = [
            _argument_in(prompt, arg, given)
            for arg, given, prompt in zip(
                task.arguments(), task.inputs(), task_prompts, strict=True
            )
        ]
    if isinstance(prompts, (np.ndarray, pd.Series)):  # string arrays, as every prompts= takes
        prompts = prompts.tolist()
    if not isinstance(prompts, (str, list, tuple)):
        raise TypeError(
            f"prompts takes a string, a list of strings or a Task, got {type(prompts).__name__}."
        )
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if subjects is None:
        raise ValueError("Pass subjects=: the words of each prompt whose embeddings are noised.")
    subject_list = [subjects] if isinstance(subjects, str) else list(subjects)
    if len(subject_list) != len(prompt_list):
        raise ValueError(
            f"Got {len(prompt_list)} prompts and {len(subject_list)} subjects: pass one per prompt."
        )
    cells_per_batch, memory_budget, seed = _check_common(
        cells_per_batch, memory_budget, n_random, seed
    )
    check_int(window, "window", 1)
    check_int(n_noise, "n_noise", 1)
    if noise is not None:
        noise = check_float(noise, "noise", 0.0, low_open=True)
    # A Site or None is named in the error below, not iterated.
    listed = isinstance(sites, Sequence) and not isinstance(sites, str)
    site_kinds: list[Any] = list(sites) if listed else [sites]
    if any(not isinstance(k, str) or k not in TRACE_KINDS for k in site_kinds):
        raise ValueError(
            f"sites takes state kinds here ({', '.join(TRACE_KINDS)}), got {sites!r}; pick the "
            "layers with layers=."
        )
    expanded = expand_sites(model, site_kinds, layers=layers, kinds=TRACE_KINDS, what="sites")
    kinds = list(dict.fromkeys(s.kind for s in expanded))
    layer_list = list(dict.fromkeys(s.layer for s in expanded))
    n_layers = int(model.cfg.n_layers)
    batch = tokenize(model, prompt_list)
    ids = [t[m.bool()] for t, m in zip(batch.tokens, batch.attention_mask, strict=True)]
    spans = [subject_span(model, p, s) for p, s in zip(prompt_list, subject_list, strict=True)]
    level = 3.0 * _embedding_sd(model, ids, spans) if noise is None else float(noise)
    if answers is None and metric is None:
        with torch.no_grad():
            final = Capture(positions=-1)
            last = f"blocks.{n_layers - 1}.hook_resid_post"
            top = []
            for t in ids:
                with intervene(model, {last: final}):
                    model(t[None].to(model.W_E.device))
                assert final.value is not None
                top.append(int(readout(model, final.value[0, -1]).argmax()))
        answers = top  # ids: a decoded token need not encode back to itself
    if metric is None:
        # One answer (a string or a token id) is every prompt's answer.
        listed = isinstance(answers, (Sequence, np.ndarray)) and not isinstance(answers, str)
        given: list[Any] = list(cast(Sequence[Any], answers)) if listed else [answers] * len(ids)
        if len(given) != len(ids):
            raise ValueError(
                f"Got {len(given)} answers for {len(ids)} prompts: pass one answer per prompt, "
                "or a single one for all of them."
            )
        tokens = [_answer_tokens(model, a) for a in given]
        longer = [
            f"{a!r} -> {token_texts(model.tokenizer, t[:1])[0]!r}"
            for a, t in zip(given, tokens, strict=True)
            if len(t) > 1
        ]
        if longer:
            warn(
                f"causal_trace traces an answer's first token, as ROME: "
                f"{', '.join(dict.fromkeys(longer))}. To choose the token, pass token ids as "
                "answers= (for a Task, with its prompts and subjects).",
            )
        answer_ids = tuple(t[0] for t in tokens)
        answer_labels = [
            token_texts(model.tokenizer, [a])[0] if isinstance(a, (int, np.integer)) else a
            for a in given
        ]
        metric = answer_prob(list(answer_ids))
    else:
        answer_ids, answer_labels = None, [""] * len(ids)
    metric_fn, metric_name = bind_metric(model, metric, len(ids))

    d_model = int(model.cfg.d_model)
    plan = Plan(sources=list(ids), source_groups=list(range(len(ids))))
    for i, (t, (a, b)) in enumerate(zip(ids, spans, strict=True)):
        samples = trace_noise(t, n_noise, b - a, d_model, level, seed=seed)
        for k in range(n_noise):
            edits = tuple(
                Edit("hook_embed", "vector", a + q, ADD, payload=samples[k, q])
                for q in range(b - a)
            )
            plan.bases.append(Base(t, i, edits))

    def restored(kind: str, layer: int) -> list[int]:
        if kind not in ("mlp_out", "attn_out") or window == 1:
            return [layer]
        return list(
            range(max(0, layer - window // 2), min(n_layers, layer + (window - 1) // 2 + 1))
        )

    grid = [
        (i, k, li, p)
        for i, (t, (a, _)) in enumerate(zip(ids, spans, strict=True))
        for k in range(len(kinds))
        for li in range(len(layer_list))
        for p in range(a, len(t))
    ]
    for j in range(-1, n_random):
        for i, k, li, p in grid:
            sites_here = [Site(kinds[k], x) for x in restored(kinds[k], layer_list[li])]
            if j < 0:
                for sample in range(n_noise):
                    edits = tuple(site_edit(s, p, COPY, source_position=p) for s in sites_here)
                    plan.cells.append(Cell((j, i, k, li, p), i * n_noise + sample, edits, i))
                continue
            where = (str(kinds[k]), int(layer_list[li]), p)
            units = _units(control_seed(seed, j), ids[i], where, len(sites_here), d_model)
            edits = tuple(
                site_edit(s, p, RANDOM, source_position=p, payload=u)
                for s, u in zip(sites_here, units, strict=True)
            )
            plan.cells.append(Cell((j, i, k, li, p), i * n_noise + j % n_noise, edits, i))
    got = run_plan(
        model,
        plan,
        metric_fn,
        packed=packed,
        cells_per_batch=cells_per_batch,
        memory_budget=memory_budget,
        progress=progress,
        desc="trace",
    )
    corrupted = got.bases.cpu().numpy().reshape(len(ids), n_noise)
    shape = [(len(kinds), len(layer_list), len(t)) for t in ids]
    sums = [np.zeros(s) for s in shape]
    squares = [np.zeros(s) for s in shape]
    random = [np.zeros(s) for s in shape]
    for i, (a, _) in enumerate(spans):  # before the subject nothing differs: the corrupted run
        sums[i][..., :a] = corrupted[i].sum()
        squares[i][..., :a] = (corrupted[i] ** 2).sum()
        random[i][..., :a] = float(corrupted[i].mean()) * n_random
    for cell, value in zip(plan.cells, got.cells.tolist(), strict=True):
        j, i, k, li, p = cell.key
        if j < 0:
            sums[i][k, li, p] += value
            squares[i][k, li, p] += value * value
        else:
            random[i][k, li, p] += value
    scores = tuple(s / n_noise for s in sums)
    sd = tuple(
        np.sqrt(np.maximum(q / n_noise - m * m, 0.0)) for q, m in zip(squares, scores, strict=True)
    )
    controls = tuple(r / n_random if n_random else np.full(r.shape, np.nan) for r in random)
    return TraceResult(
        scores=scores,
        noise_sd=sd,
        random=controls,
        clean=got.sources.cpu().numpy(),
        corrupted=corrupted,
        kinds=tuple(kinds),
        layers=tuple(layer_list),
        subjects=tuple(spans),
        tokens=tuple(tuple(token_texts(model.tokenizer, t)) for t in ids),
        answers=tuple(answer_labels),
        answer_ids=answer_ids,
        noise_level=level,
        window=int(window),
        metric=metric_name,
        seed=seed,
        n_random=int(n_random),
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def _units(
    seed: int, prompt: Tensor, cell: tuple[str, int, int], count: int, width: int
) -> list[Tensor]:
    """The random directions of one control cell, drawn from ``seed``, the prompt's token ids
    and the cell ``(kind, layer, position)``: the same whatever the chunking, the prompt's place
    in the list or the other prompts and layers traced beside it."""
    return unit_vectors(keyed_seed(seed, [prompt], repr(cell).encode()), [width] * count)
