"""Head scores: how much of each head's attention goes where a kind of head looks.

A kind of head is defined by the keys it should attend to from each query (its *targets*):

- ``previous_token``: the token just before the query;
- ``duplicate_token``: earlier occurrences of the query's own token;
- ``induction``: the tokens that *followed* earlier occurrences of the query's token (the
  ``[A][B] ... [A] -> [B]`` head of Elhage et al. 2021 and Olsson et al. 2022).

A head's score is the attention it pays to the targets, averaged over the queries that have any
(each real query with targets counts once, over every prompt): 1 for a head that looks nowhere
else, and for a head that spreads its attention evenly over the keys it can see (the causal
keys, within the window on a sliding-window layer), the ``chance`` recorded beside it. Targets are always strictly earlier keys, and never a BOS token the model
prepends: many heads park their attention there (a sink), which says nothing about the kind.

Without prompts, the scores are read on Olsson et al.'s repeated random tokens: ``BOS`` then
``seq_len`` distinct tokens drawn from the vocabulary (special tokens left out) and the same
tokens again. There every query of the second half has one duplicate and one induction target
(the token ``seq_len - 1`` back), so the scores are the usual ones over the queries that have
targets: the mean attention on the diagonal ``seq_len`` back (duplicate) and ``seq_len - 1`` back
(induction) over queries ``seq_len + 1`` to ``2 seq_len``, and one back over queries 2 to
``2 seq_len`` (previous token). A plain ``pattern.diagonal(offset=1 - seq_len).mean()`` also
averages queries whose stripe entry is BOS or the first token, so it differs slightly. On natural
text the same definitions apply wherever tokens repeat.

TransformerLens's ``detect_head`` divides by every query's attention instead of the queries that
have targets: its scores are these times the share of queries with targets (they fall with the
number of queries that cannot score), and its induction targets include the query itself where a
token repeats at once. The tests check both relations on its own function.

One forward pass per ``batch_size`` prompts; each layer's pattern is reduced to per-head sums in
its hook, never kept (a layer of 32 prompts of 512 tokens would be 300 MB for SmolLM2).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from einops import einsum
from torch import Tensor

from mechprobe.core import (
    Batch,
    Intervention,
    InterventionSpec,
    Layers,
    Result,
    check_batch_size,
    check_int,
    check_seed,
    evaluates,
    figure_of,
    head_column,
    keyed_seed,
    literal,
    model_adapter,
    progress_bar,
    resolve_layers,
    run,
    tokenize,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["HeadScoreResult", "head_scores"]

#: ``tokens [seq] -> targets [seq (query), seq (key)]``: True where the query should attend.
TargetRule = Callable[[Tensor], Tensor]


def _previous_token(tokens: Tensor) -> Tensor:
    n = len(tokens)
    return torch.eye(n, dtype=torch.bool).roll(-1, dims=1).tril(-1)


def _duplicate_token(tokens: Tensor) -> Tensor:
    return (tokens[:, None] == tokens[None, :]).tril(-1)


def _induction(tokens: Tensor) -> Tensor:
    # key k follows an earlier occurrence of the query's token: tokens[k - 1] == tokens[q], k < q
    same = tokens[:, None] == tokens[None, :]  # [q, k]
    follows = torch.zeros_like(same)
    follows[:, 1:] = same[:, :-1]
    return follows.tril(-1)


KINDS: dict[str, TargetRule] = {
    "previous_token": _previous_token,
    "duplicate_token": _duplicate_token,
    "induction": _induction,
}


@dataclass(frozen=True, eq=False, repr=False)
class HeadScoreResult(Result, format="mechprobe.HeadScoreResult", version=2, html_figure=True):
    """Each head's share of attention on each kind's targets (module docstring).

    Attributes:
        kinds: The kinds scored (``"previous_token"``, ``"duplicate_token"``, ``"induction"``, or
            the names of rules passed in).
        layers: The layers scored.
        scores: ``[kinds, layers, heads]`` attention on the targets, averaged over every query
            that has one (NaN where no query of any prompt has one).
        per_prompt: ``[kinds, prompts, layers, heads]`` the same per prompt (NaN where a prompt
            has no query with targets).
        counts: ``[kinds, prompts]`` the queries with targets in each prompt.
        chance: ``[kinds, layers]`` the score of a head that attends evenly to every real key
            it can see (up to the query, BOS and the query included; on a sliding-window layer
            only the last ``window`` of them), over the same queries.
        prompts: The prompts (the random token sequences decoded, when none were given).
        tokens: Per prompt, ``[n]`` the token ids scored (BOS included where prepended).
        source: ``"repeated random tokens"`` or ``"prompts"``.
        seq_len: The length of each random half (0 for prompts).
        seed: The seed of the random tokens.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
        >>> res.scores.shape, res.kinds
        ((3, 3, 4), ('previous_token', 'duplicate_token', 'induction'))
    """

    kinds: tuple[str, ...]
    layers: tuple[int, ...]
    scores: np.ndarray
    per_prompt: np.ndarray
    counts: np.ndarray
    chance: np.ndarray
    prompts: tuple[str, ...]
    tokens: tuple[np.ndarray, ...]
    source: str
    seq_len: int = 0
    seed: int = 0
    model_name: str = ""
    model_dtype: str = ""

    def _kind_index(self, kind: str | None) -> int:
        if kind is None:
            return 0
        if kind not in self.kinds:
            raise ValueError(f"kind {kind!r} was not scored; scored: {list(self.kinds)}.")
        return self.kinds.index(kind)

    def top(self, kind: str | None = None, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` heads with the highest score of ``kind`` (the first kind by default), as
        ``(layer, head, score)``, best first.

        Args:
            kind: A kind scored (None: the first).
            k: Heads returned (at least 1).

        Returns:
            Up to ``k`` tuples ``(layer, head, score)``, best first (heads of NaN score last).

        Raises:
            ValueError: ``kind`` was not scored.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
            >>> len(res.top("induction", k=3))
            3
        """
        check_int(k, "k", 1)
        grid = self.scores[self._kind_index(kind)]
        flat = np.where(np.isnan(grid), -np.inf, grid).reshape(-1)
        order = np.argsort(-flat, kind="stable")[:k]
        n_heads = grid.shape[1]
        return [
            (self.layers[i // n_heads], int(i % n_heads), float(grid.reshape(-1)[i])) for i in order
        ]

    def to_frame(self) -> pd.DataFrame:
        """One row per kind of head (``head_kind``: ``kind`` in frames is a site kind), layer
        and head: the score, its spread over prompts, the queries it averages and the chance
        level of the kind at the head's layer.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
            >>> list(res.to_frame().columns)
            ['head_kind', 'layer', 'head', 'score', 'spread', 'queries', 'chance']
        """
        n_kinds, n_layers, n_heads = self.scores.shape
        k, li, h = np.meshgrid(
            np.arange(n_kinds), np.arange(n_layers), np.arange(n_heads), indexing="ij"
        )
        # The sample SD (ddof=1) over the prompts with targets, as every spread; over fewer than
        # two it is undefined (it read 0), NaN below without numpy's warning.
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore", RuntimeWarning)
            std = (
                np.nanstd(self.per_prompt, axis=1, ddof=1)
                if self.per_prompt.shape[1]
                else self.scores
            )
        std = np.where(np.isfinite(self.per_prompt).sum(1) < 2, np.nan, std)
        return pd.DataFrame(
            {
                "head_kind": np.asarray(self.kinds, dtype=object)[k.reshape(-1)],
                "layer": np.asarray(self.layers)[li.reshape(-1)],
                "head": head_column(h.reshape(-1)),
                "score": self.scores.reshape(-1),
                "spread": np.asarray(std).reshape(-1),
                "queries": self.counts.sum(1)[k.reshape(-1)],
                "chance": self.chance[k.reshape(-1), li.reshape(-1)],
            }
        )

    def summary(self, top: int = 5) -> pd.DataFrame:
        """The ``top`` heads of each kind (``head_kind``) by score, with the chance level at their
        layer.

        Args:
            top: Heads per kind (at least 1).

        Returns:
            A frame of ``top`` rows per kind: ``head_kind``, ``layer``, ``head``, ``score`` and
            ``chance``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
            >>> len(res.summary(top=2))
            6
        """
        check_int(top, "top", 1)
        rows = [
            {
                "head_kind": kind,
                "layer": layer,
                "head": head,
                "score": score,
                "chance": self.chance[i, self.layers.index(layer)],
            }
            for i, kind in enumerate(self.kinds)
            for layer, head, score in self.top(kind, top)
        ]
        frame = pd.DataFrame(rows, columns=["head_kind", "layer", "head", "score", "chance"])
        return frame.astype({"head": "Int64"})

    def plot(self, ax: Axes | None = None, *, kind: str | None = None) -> Figure:
        """Layer x head maps of the scores, from 0 to 1: one panel per kind, or ``kind``'s alone
        (the first kind when ``ax`` is given and ``kind`` is not).

        Args:
            ax: Draw one kind's map into these axes (default: a new figure).
            kind: The kind drawn alone (None: every kind, or with ``ax`` the first).

        Returns:
            The figure drawn into (``ax``'s, when given), with one colour bar.

        Raises:
            ValueError: ``kind`` was not scored.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
            >>> len(res.plot().axes), len(res.plot(kind="induction").axes)
            (4, 2)
        """
        kinds = list(self.kinds) if kind is None else [self.kinds[self._kind_index(kind)]]
        if ax is not None:
            kinds = kinds[:1]
            fig, axes = figure_of(ax), [ax]
        else:
            from matplotlib.figure import Figure

            height = max(3.0, 0.18 * len(self.layers) + 1.2)
            fig = Figure(figsize=(3.6 * len(kinds), height), layout="constrained")
            axes = list(fig.subplots(1, len(kinds), squeeze=False)[0])
        image = None
        for axis, name in zip(axes, kinds, strict=True):
            i = self.kinds.index(name)
            image = axis.imshow(self.scores[i], cmap="Blues", vmin=0, vmax=1, aspect="auto")
            step = max(1, len(self.layers) // 10)
            ticks = list(range(0, len(self.layers), step))
            axis.set_yticks(ticks, labels=[str(self.layers[t]) for t in ticks])
            n_heads = self.scores.shape[2]
            axis.set_xticks(range(0, n_heads, 1 if n_heads <= 16 else 4))
            axis.set_xlabel("head")
            axis.set_ylabel("layer")
            low, high = float(self.chance[i].min()), float(self.chance[i].max())
            chance = f"{low:.2g}" if f"{low:.2g}" == f"{high:.2g}" else f"{low:.2g}-{high:.2g}"
            axis.set_title(literal(f"{name.replace('_', ' ')} (chance {chance})"))
        if image is not None:  # one scale (0 to 1) for every panel: one colour bar
            fig.colorbar(image, ax=axes, label="attention on targets")
        return fig

    def _describe(self) -> str:
        best = []
        for kind in self.kinds:
            top = self.top(kind, 1)
            if top and np.isfinite(top[0][2]):
                layer, head, score = top[0]
                best.append(f"{kind} L{layer}H{head} {score:.2f}")
        what = (
            f"{len(self.prompts)} {self.source}"
            if self.seq_len == 0
            else (f"{len(self.prompts)} x {self.seq_len} repeated random tokens")
        )
        # Three kinds at most: a repr stays one short line with many kinds of one's own (353
        # characters with eight, review 21b); summary() lists them all.
        shown = ", ".join(best[:3]) + (f", +{len(best) - 3} kinds" if len(best) > 3 else "")
        return f"{len(self.layers)} layers x {self.scores.shape[2]} heads on {what}; best: " + (
            shown or "none"
        )


@evaluates
def head_scores(
    model: Any,
    prompts: str | Sequence[str] | Batch | None = None,
    *,
    kinds: Sequence[str] | Mapping[str, TargetRule] = tuple(KINDS),
    layers: Layers = "all",
    seq_len: int = 50,
    n_prompts: int = 10,
    batch_size: int | None = 32,
    progress: bool = True,
    seed: int = 0,
) -> HeadScoreResult:
    """Score every head as a previous-token, duplicate-token and induction head: the share of its
    attention on each kind's targets (module docstring), on repeated random tokens or on prompts.

    Args:
        model: A TransformerLens model.
        prompts: None (the default) for Olsson et al.'s repeated random tokens, else one prompt,
            a list of prompts or a :class:`Batch`: the kinds are scored wherever their targets
            occur (a prompt that repeats no token has no duplicate or induction targets).
        kinds: Names among ``"previous_token"``, ``"duplicate_token"`` and ``"induction"``, or
            a mapping ``{name: rule}`` of your own, a rule taking a prompt's token ids ``[seq]``
            (BOS included where the model prepends one) to a boolean ``[seq, seq]`` matrix of
            targets, True at ``[query, key]`` for keys before the query. BOS is never a target,
            for rules of one's own too: attention parked on it says nothing about a head's
            kind (so a rule marking only BOS, an "attention sink", has no targets).
        layers: The layers whose heads are scored.
        seq_len: Tokens in each half of a random sequence (``2 * seq_len + 1`` tokens with BOS),
            at least 2 (with 1, a query's induction target would be itself).
        n_prompts: Random sequences (ignored with prompts).
        batch_size: Prompts per forward pass (None: all at once).
        progress: Show a progress bar over batches.
        seed: Seed of the random tokens (sequence ``i`` from ``seed`` and ``i``, so the first
            sequences do not change with ``n_prompts``).

    Returns:
        A :class:`HeadScoreResult`.

    Raises:
        ValueError: An unknown kind; a rule's targets not a ``[seq, seq]`` boolean matrix with
            keys before their query; a ``seq_len`` the vocabulary cannot draw distinct tokens
            for, or longer than the model's context; no query of any prompt has targets of a
            kind.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.head_scores(mp.tiny_model(), seq_len=8, n_prompts=2, progress=False)
        >>> layer, head, score = res.top("induction", k=1)[0]
        >>> 0.0 <= score <= 1.0
        True
    """
    rules = _rules(kinds)
    seed = check_seed(seed)
    chosen = resolve_layers(model, layers)
    if prompts is None:
        batch = _repeated_random_tokens(
            model, check_int(seq_len, "seq_len", 2), check_int(n_prompts, "n_prompts", 1), seed
        )
        source, half = "repeated random tokens", int(seq_len)
    else:
        batch = prompts if isinstance(prompts, Batch) else tokenize(model, prompts)
        source, half = "prompts", 0
    check_batch_size(batch_size)
    bos = model_adapter(model).prepended_bos
    n_heads = model_adapter(model).n_heads
    names = list(rules)
    sums = np.zeros((len(names), len(batch), len(chosen), n_heads))
    counts = np.zeros((len(names), len(batch)), dtype=np.int64)
    chance = np.zeros((len(names), len(chosen)))
    windows = [model_adapter(model).attention_window(layer) for layer in chosen]
    chunks = list(batch.chunks(batch_size))
    for rows, chunk in progress_bar(chunks, progress=progress, desc="head scores"):
        targets = _targets(chunk, rules, bos)  # [kinds, rows, q, k]
        scorers = {layer: _Scorer(targets) for layer in chosen}
        spec: InterventionSpec = {f"blocks.{i}.attn.hook_pattern": s for i, s in scorers.items()}
        run(model, chunk, spec, logit_positions=-1, batch_size=None, progress=False)
        for j, layer in enumerate(chosen):
            total = scorers[layer].total
            assert total is not None, f"layer {layer}'s pattern hook did not fire"
            sums[:, rows, j] = total.numpy()
        counts[:, rows] = targets.any(-1).sum(-1).numpy()
        for window in set(windows):  # one pass per kind of layer (full, sliding)
            even = _uniform(targets, chunk.attention_mask, window).numpy()
            chance[:, [w == window for w in windows]] += even[:, None]
    empty = [name for name, n in zip(names, counts.sum(1), strict=True) if n == 0]
    if empty:
        raise ValueError(_no_targets(empty, source, bos is not None))
    with np.errstate(invalid="ignore", divide="ignore"):  # a prompt without targets: NaN
        per_prompt = sums / counts[:, :, None, None]
    scores = sums.sum(1) / counts.sum(1)[:, None, None]
    ids = tuple(
        batch.tokens[i][batch.attention_mask[i].bool()].numpy().astype(np.int64)
        for i in range(len(batch))
    )
    given = prompts is not None and all(batch.prompts)
    texts = tuple(batch.prompts) if given else tuple(_text(model, row.tolist()) for row in ids)
    return HeadScoreResult(
        kinds=tuple(names),
        layers=tuple(chosen),
        scores=scores,
        per_prompt=per_prompt,
        counts=counts,
        chance=chance / counts.sum(1)[:, None],
        prompts=texts,
        tokens=ids,
        source=source,
        seq_len=half,
        seed=seed,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


class _Scorer(Intervention):
    """Reads one layer's pattern (query-major ``[rows, q, head, k]``) and keeps, per kind, row
    and head, the attention summed over each query's targets and over the queries."""

    def __init__(self, targets: Tensor) -> None:
        super().__init__(positions=None)
        self.targets = targets
        self.total: Tensor | None = None

    def edit(self, selected: Tensor, hook: Any) -> None:
        on = self.targets.to(selected.device, torch.float64)
        self.total = einsum(selected.double(), on, "b q h k, c b q k -> c b h").cpu()
        return None


def _rules(kinds: Sequence[str] | Mapping[str, TargetRule]) -> dict[str, TargetRule]:
    if isinstance(kinds, Mapping):
        rules = dict(kinds)
        bad = [
            name for name, rule in rules.items() if not isinstance(name, str) or not callable(rule)
        ]
        if bad:
            raise TypeError(
                f"kinds as a mapping takes {{name: rule}} with a callable rule (tokens [seq] -> "
                f"targets [seq, seq]); not for {bad}."
            )
    else:
        if isinstance(kinds, str):
            kinds = [kinds]
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise ValueError(
                f"Unknown head kind(s) {unknown}: use {list(KINDS)}, or pass {{name: rule}} with "
                "a rule of your own (tokens [seq] -> boolean targets [seq, seq])."
            )
        rules = {k: KINDS[k] for k in dict.fromkeys(kinds)}
    if not rules:
        raise ValueError(f"kinds is empty: name at least one of {list(KINDS)}.")
    return rules


def _no_targets(empty: list[str], source: str, bos: bool) -> str:
    """Why no query had targets of the ``empty`` kinds, and what to pass instead."""
    where = "repeated random tokens" if source != "prompts" else "any prompt"
    why = []
    if any(name in ("duplicate_token", "induction") for name in empty):
        why.append("duplicate and induction targets need a repeated token")
    if bos and any(name not in KINDS for name in empty):
        why.append("BOS is never a target, in rules of one's own too")
    fix = "pass prompts that have them"
    if source == "prompts" and all(name in KINDS for name in empty):
        fix += ", or prompts=None for repeated random tokens"
    elif source != "prompts":
        fix = "check the rule on the tokens it is given, or pass prompts"
    because = f" ({'; '.join(why)})" if why else ""
    return f"No query of {where} has {' or '.join(empty)} targets{because}: {fix}."


def _targets(chunk: Batch, rules: Mapping[str, TargetRule], bos: int | None) -> Tensor:
    """``[kinds, rows, q, k]`` the targets of each kind in the chunk's padded layout: each rule
    applied to a row's real tokens, BOS (where prepended) never a target."""
    rows, seq = chunk.tokens.shape
    out = torch.zeros(len(rules), rows, seq, seq, dtype=torch.bool)
    for r in range(rows):
        where = torch.nonzero(chunk.attention_mask[r]).flatten()
        tokens = chunk.tokens[r, where]
        for c, (name, rule) in enumerate(rules.items()):
            mask = torch.as_tensor(rule(tokens.clone()))
            n = len(tokens)
            if mask.shape != (n, n) or mask.dtype != torch.bool:
                raise ValueError(
                    f"Kind {name!r}: its rule must give a boolean [{n}, {n}] matrix for {n} "
                    f"tokens, got {mask.dtype} {tuple(mask.shape)}."
                )
            if bool(mask.triu().any()):
                raise ValueError(
                    f"Kind {name!r}: its rule marks a key at or after its query; targets must be "
                    "earlier keys (a causal head cannot attend later, and itself says nothing)."
                )
            if bos is not None and int(tokens[0]) == bos:
                mask = mask.clone()
                mask[:, 0] = False
            out[c, r, where[:, None], where[None, :]] = mask
    return out


def _uniform(targets: Tensor, attention_mask: Tensor, window: int | None) -> Tensor:
    """``[kinds]`` the summed score of even attention over each query's real keys up to itself
    (the last ``window`` of them on a sliding-window layer)."""
    real = attention_mask.bool()
    seq = real.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    if window is not None:
        causal &= torch.ones(seq, seq, dtype=torch.bool).triu(1 - window)
        # Padding stands on one side of a row's tokens, so the window's positions are its keys.
    keys = real[:, None, :] & causal
    # A target outside the window gets nothing from a head that cannot see it.
    share = (targets & keys).sum(-1) / keys.sum(-1).clamp(min=1)  # [kinds, rows, q]
    return share.double().sum((1, 2))


def _text(model: Any, ids: list[int]) -> str:
    """A row of token ids as text (the ids themselves for a model without a tokenizer)."""
    tokenizer = getattr(model, "tokenizer", None)
    return " ".join(map(str, ids)) if tokenizer is None else str(tokenizer.decode(ids))


def _repeated_random_tokens(model: Any, seq_len: int, n_prompts: int, seed: int) -> Batch:
    """``n_prompts`` rows of BOS (where the model prepends one), ``seq_len`` distinct tokens
    drawn from the vocabulary without its special tokens, and the same tokens again."""
    adapter = model_adapter(model)
    vocab = int(model.cfg.d_vocab)
    special = set(getattr(getattr(model, "tokenizer", None), "all_special_ids", None) or [])
    pool = np.asarray([t for t in range(vocab) if t not in special])
    if seq_len > len(pool):
        raise ValueError(
            f"seq_len={seq_len} distinct tokens cannot be drawn from a vocabulary of "
            f"{len(pool)} ordinary tokens: lower seq_len."
        )
    bos = model_adapter(model).prepended_bos
    length = 2 * seq_len + (bos is not None)
    n_ctx = adapter.n_ctx
    if n_ctx is not None and length > int(n_ctx):
        raise ValueError(
            f"2 x seq_len={seq_len}{' + BOS' if bos is not None else ''} = {length} tokens exceed "
            f"the model's context of {int(n_ctx)}: lower seq_len to {(int(n_ctx) - 1) // 2}."
        )
    rows = []
    for i in range(n_prompts):
        rng = np.random.default_rng(keyed_seed(seed, [[i]], b"head scores"))
        half = rng.choice(pool, size=seq_len, replace=False).tolist()
        rows.append(([bos] if bos is not None else []) + half + half)
    return Batch.from_tokens(torch.tensor(rows))
