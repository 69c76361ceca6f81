"""Attention patterns of chosen heads, with their tokens: :func:`attention_patterns` ->
:class:`AttentionPatterns`.

Once a score, a patch or a function vector has named a head, the next look is at where it attends:
an induction head's stripe, a name mover's look from the last token at a name, a head parked on the
first token. TransformerLens users cache every layer's pattern (``run_with_cache``) and draw it
with CircuitsVis; here only the chosen heads are kept, each prompt cut to its own tokens (padding
taken out, whichever side it stood on), and the result draws the maps with the tokens on their
axes, tabulates every weight, and sums up where each head looks.

A pattern is what the model computed: each query's softmax over the keys it may see (the causal
keys, the last ``window`` of them on a sliding-window layer), so each row sums to 1 and weights on
later keys are 0. :meth:`AttentionPatterns.summary` averages, per head, the weight on the first
token (BOS where the model prepends one: the "attention sink" many heads park on), on the query's
own token and the entropy of the row, over every query but the first (whose only key is itself)
of every prompt; and the weight on the previous token over the queries whose previous token is not
a prepended BOS (from query 2 where BOS leads the prompt), as :func:`mechprobe.head_scores` counts
previous-token heads: a head parked on BOS is no previous-token head at query 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from torch import Tensor

from mechprobe.core import (
    Batch,
    Intervention,
    Layers,
    Result,
    Site,
    SiteLike,
    StopForward,
    as_int,
    check_batch_size,
    check_float,
    check_int,
    check_positions,
    check_token_ids,
    evaluates,
    expand_sites,
    figure_of,
    forward,
    head_column,
    intervene,
    literal,
    model_adapter,
    new_axes,
    progress_bar,
    token_label,
    token_texts,
    tokenize,
    warn,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AttentionPatterns", "attention_patterns"]

#: Patterns a result may hold at most (float32, ``prompts x heads x kept queries x longest
#: prompt``): beyond it the call refuses before running, naming what to cut (every head of
#: SmolLM2 on 32 prompts of 512 tokens would be 8.4 GiB). Each layer's rows are written into the
#: result inside its hook, so the call holds the result and one pass's activations besides.
MAX_BYTES = 4 * 2**30
# to_frame warns above this many rows (a row per head, query and key).
FRAME_ROWS = 2_000_000


@dataclass(frozen=True, eq=False, repr=False)
class AttentionPatterns(Result, format="mechprobe.AttentionPatterns", version=1, html_figure=True):
    """The attention patterns of chosen heads on prompts (module docstring).

    Attributes:
        sites: The heads, as ``pattern`` sites' labels (``"pattern@9, head 3"``), in the order
            of ``patterns``' second axis.
        layers: Each head's layer.
        heads: Each head's index in its layer (a query head on grouped-query models).
        patterns: ``[prompts, heads, query, key]`` float32 weights over each prompt's own tokens
            (position 0 its first token, BOS included where prepended), a row per kept query
            (``queries``); NaN past a prompt's length and its kept queries.
        lengths: Each prompt's number of tokens.
        prompts: The prompts (token ids as text where a :class:`Batch` carried none).
        tokens: Per prompt, each token's text.
        bos: Per prompt, whether its first token is a BOS the model prepended (empty in a result
            that did not record it: then no query's previous token counts as BOS).
        model_name: The model's name, for the record.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        windows: Per head, its layer's attention window (a query sees the last ``window``
            keys), 0 where it sees every earlier key (empty in a result that did not record it:
            then every head counts as seeing them all).
        queries: Per prompt, the query positions kept, in the order of ``patterns``' third
            axis (every position with ``positions="all"``; empty in a result that did not
            record it: then every query was kept).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.attention_patterns(mp.tiny_model(), ["One two", "Three"], layers=[1],
        ...                             progress=False)
        >>> res.patterns.shape[:2], res.sites[0]
        ((2, 4), 'pattern@1, head 0')
    """

    sites: tuple[str, ...]
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    patterns: np.ndarray
    lengths: tuple[int, ...]
    prompts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    bos: tuple[bool, ...] = ()
    model_name: str = ""
    model_dtype: str = ""
    windows: tuple[int, ...] = ()
    queries: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        # A file whose queries disagree with its patterns loaded, and summary() then failed
        # with an IndexError (review 41a's S1): say what is wrong when it is built.
        if self.queries:
            if len(self.queries) != len(self.lengths):
                raise ValueError(
                    f"queries lists {len(self.queries)} prompts, lengths "
                    f"{len(self.lengths)}: one tuple of query positions per prompt (or none)."
                )
            rows = self.patterns.shape[2] if self.patterns.ndim == 4 else 0
            for p, (kept, n) in enumerate(zip(self.queries, self.lengths, strict=True)):
                ordered = all(a < b for a, b in pairwise(kept))
                if not ordered or any(not 0 <= q < n for q in kept) or len(kept) > rows:
                    raise ValueError(
                        f"queries[{p}] = {kept} is not a set of positions of prompt {p}: they "
                        f"must ascend, each once, below its {n} tokens, at most {rows} (the "
                        "patterns' query rows). Was the file edited?"
                    )
        super().__post_init__()

    def _queries(self, prompt: int) -> tuple[int, ...]:
        """The query positions prompt ``prompt`` kept (every one in an older result)."""
        return self.queries[prompt] if self.queries else tuple(range(self.lengths[prompt]))

    def _every_query(self) -> bool:
        """Whether every query of every prompt was kept (``positions="all"``)."""
        return all(self._queries(p) == tuple(range(n)) for p, n in enumerate(self.lengths))

    def _row(self, prompt: int, query: int, what: str = "query") -> tuple[int, int]:
        """``(row, position)``: where query ``query`` (negative from the prompt's end) sits
        among prompt ``prompt``'s kept rows, or an error naming those kept."""
        n = self.lengths[prompt]
        if not -n <= query < n:
            raise ValueError(
                f"{what} {query} is outside prompt {prompt}'s {n} tokens: pass -1 (its last "
                f"token) or a position below {n}."
            )
        position = query % n
        kept = self._queries(prompt)
        if position not in kept:
            shown = ", ".join(map(str, kept[:8])) + (", ..." if len(kept) > 8 else "")
            raise ValueError(
                f"{what} {query} (position {position} of prompt {prompt}) was not kept: the "
                f"result holds queries {shown} of it. Pass one of them, or run "
                "attention_patterns with positions= naming it (or 'all')."
            )
        return kept.index(position), position

    def _index(self, site: SiteLike | tuple[int, ...]) -> int:
        label = str(_as_site(site, "site"))
        if label not in self.sites:
            shown = ", ".join(self.sites[:4]) + (", ..." if len(self.sites) > 4 else "")
            raise ValueError(
                f"{label!r} is not among this result's heads ({shown}): pass one of its "
                "sites, or run attention_patterns with that head."
            )
        return self.sites.index(label)

    def _prompt(self, prompt: int) -> int:
        index = check_int(prompt, "prompt")
        if not -len(self.prompts) <= index < len(self.prompts):
            raise ValueError(
                f"prompt must index one of the {len(self.prompts)} prompts, got {prompt}."
            )
        return index % len(self.prompts)

    def pattern(self, site: SiteLike | tuple[int, ...], prompt: int = 0) -> np.ndarray:
        """``[query, key]`` one head's weights on one prompt's tokens (a copy), a row per kept
        query (every query by default; ``queries[prompt]`` where ``positions=`` chose some);
        ``site`` as :func:`attention_patterns` takes one (a label, a Site, a ``(layer, head)``
        pair).

        Args:
            site: One of this result's heads: a label (``"pattern@2, head 1"``), a Site, or a
                ``(layer, head)`` pair.
            prompt: The prompt's index (negative counts from the end).

        Returns:
            ``[n_kept_queries, n_tokens]`` float32 array: the head's weight of each key from each
            kept query (0 at keys after the query).

        Raises:
            ValueError: ``prompt`` indexes no prompt, or ``site`` is not one of the result's heads.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.attention_patterns(mp.tiny_model(), "One two", progress=False)
            >>> w = res.pattern("pattern@2, head 1")
            >>> w.shape == (res.lengths[0], res.lengths[0]), bool(abs(w.sum(1) - 1).max() < 1e-5)
            (True, True)
        """
        p = self._prompt(prompt)
        n, rows = self.lengths[p], len(self._queries(p))
        return np.array(self.patterns[p, self._index(site), :rows, :n])

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, head, kept query and key up to the query (``key_position <=
        query_position``; on a sliding-window layer the keys before the window too, at weight
        0): the weight, with both tokens. Rows grow with heads x tokens squared: choose heads
        (``sites=``) or queries (``positions=``) first for long prompts.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.attention_patterns(mp.tiny_model(), "Hi", layers=[0], progress=False)
            >>> list(res.to_frame().columns)[:6]
            ['prompt', 'site', 'kind', 'layer', 'head', 'query_position']
        """
        kept = [np.asarray(self._queries(p), dtype=np.int64) for p in range(len(self.lengths))]
        rows = len(self.sites) * sum(int((q + 1).sum()) for q in kept)
        if rows > FRAME_ROWS:
            # 270 heads on four 152-token prompts made 12.5M rows (gigabytes in pandas) without a
            # word where the user wanted a few heads.
            warn(
                f"to_frame: {rows:,} rows ({len(self.sites)} heads x every query and key): "
                "choose heads first (attention_patterns(..., sites=[...]), or res.summary() to "
                "find them) or queries (positions=[...]), or read res.pattern(site) and "
                "res.top_keys()."
            )
        parts = []
        for p, queries in enumerate(kept):
            # each kept query's row, repeated once per key up to the query
            row = np.repeat(np.arange(len(queries)), queries + 1)
            q = queries[row]
            k = np.concatenate([np.arange(n + 1) for n in queries]) if len(q) else q
            tokens = np.asarray(self.tokens[p], dtype=object)
            for e in range(len(self.sites)):
                parts.append(
                    pd.DataFrame(
                        {
                            "prompt": p,
                            "site": self.sites[e],
                            "kind": "pattern",
                            "layer": self.layers[e],
                            "head": self.heads[e],
                            "query_position": q,
                            "key_position": k,
                            "query_token": tokens[q],
                            "key_token": tokens[k],
                            "weight": self.patterns[p, e, row, k].astype(np.float64),
                        }
                    )
                )
        columns = ["prompt", "site", "kind", "layer", "head", "query_position", "key_position"]
        columns += ["query_token", "key_token", "weight"]
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        frame["layer"] = frame["layer"].astype("Int64")
        frame["head"] = head_column(frame["head"].to_numpy())
        return frame[columns]

    def summary(self) -> pd.DataFrame:
        """Per head, the mean weight on the first token (``first_token``), the previous token
        and the query's own token, and the mean entropy of a query's weights in nats (it grows
        with the keys a query sees: compare heads on the same prompts) and divided by that of
        a uniform spread over the keys the query sees (``normalised_entropy``: 0 on one key, 1
        spread evenly over all, comparable across prompt lengths; on a sliding-window layer the
        last ``window`` keys), over every kept query but position 0 (which sees itself alone);
        ``previous_token`` also leaves out position 1 after a prepended BOS (module docstring).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.attention_patterns(mp.tiny_model(), "One two three", progress=False)
            >>> res.summary().columns.tolist()[3:]
            ['first_token', 'previous_token', 'own_token', 'entropy', 'normalised_entropy']
        """
        sums = np.zeros((len(self.sites), 5))
        # each head's window, or no limit (query q sees its q + 1 keys)
        limit = self.windows or (0,) * len(self.sites)
        windows = np.array([w if w > 0 else np.iinfo(np.int64).max for w in limit])
        count = previous = 0
        for p, n in enumerate(self.lengths):
            kept = np.asarray(self._queries(p), dtype=np.int64)
            rows = np.flatnonzero(kept >= 1)  # every kept query but the first token
            if not len(rows):
                continue
            q = kept[rows]
            w = self.patterns[p][:, rows, :n].astype(np.float64)  # [heads, queries, keys]
            at = np.arange(len(q))
            sums[:, 0] += w[:, :, 0].sum(1)
            # query 1's previous token is the first: a prepended BOS there says nothing
            after = at[q >= 2] if self.bos and self.bos[p] else at
            sums[:, 1] += w[:, after, q[after] - 1].sum(1)
            sums[:, 2] += w[:, at, q].sum(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                entropy = -np.where(w > 0, w * np.log(w), 0.0).sum(2)  # [heads, queries]
            sums[:, 3] += entropy.sum(1)
            seen = np.minimum(q[None, :] + 1, windows[:, None])  # [heads, queries] keys seen
            sums[:, 4] += (entropy / np.log(seen)).sum(1)
            count += len(q)
            previous += len(after)
        if not count:
            warn(
                "No query but each prompt's first token (one-token prompts, or positions= kept "
                "only position 0), which sees itself alone: the summary is NaN."
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            means = sums / np.array([count, previous, count, count, count], dtype=np.float64)
        frame = pd.DataFrame(
            {
                "site": list(self.sites),
                "layer": pd.array(self.layers, dtype="Int64"),
                "head": head_column(np.asarray(self.heads)),
                "first_token": means[:, 0],
                "previous_token": means[:, 1],
                "own_token": means[:, 2],
                "entropy": means[:, 3],
                "normalised_entropy": means[:, 4],
            }
        )
        return frame

    def top_keys(self, query: int = -1, k: int = 3) -> pd.DataFrame:
        """The ``k`` keys each head weighs most from one query position of each prompt (``-1``:
        its last token, the one that predicts), heaviest first. The query must be kept in every
        prompt (with ``positions=`` chosen, among ``queries``), or this raises saying which
        were.

        Args:
            query: The query position (negative counts back from each prompt's last token).
            k: Keys kept per head and prompt (at least 1).

        Returns:
            A frame of up to ``k`` rows per prompt and head (fewer where a query has fewer
            keys): ``prompt``, ``site``, ``layer``, ``head``, ``query_position``,
            ``query_token``, ``rank``, ``key_position``, ``key_token`` and ``weight``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.attention_patterns(mp.tiny_model(), "One two three", layers=[2],
            ...                             progress=False)
            >>> top = res.top_keys(k=2)
            >>> len(top), list(top.columns)[-4:]
            (8, ['rank', 'key_position', 'key_token', 'weight'])
        """
        query = check_int(query, "query")
        k = check_int(k, "k", 1)
        rows = []
        for p in range(len(self.lengths)):
            row, q = self._row(p, query)
            for e, site in enumerate(self.sites):
                w = self.patterns[p, e, row, : q + 1].astype(np.float64)
                for rank, key in enumerate(np.argsort(-w, kind="stable")[:k]):
                    rows.append(
                        {
                            "prompt": p,
                            "site": site,
                            "layer": self.layers[e],
                            "head": self.heads[e],
                            "query_position": q,
                            "query_token": self.tokens[p][q],
                            "rank": rank,
                            "key_position": int(key),
                            "key_token": self.tokens[p][int(key)],
                            "weight": float(w[key]),
                        }
                    )
        frame = pd.DataFrame(rows)
        frame["layer"] = frame["layer"].astype("Int64")
        frame["head"] = head_column(frame["head"].to_numpy())
        return frame

    def plot(
        self,
        ax: Axes | None = None,
        *,
        prompt: int = 0,
        sites: SiteLike | Sequence[SiteLike] | None = None,
        max_panels: int = 12,
        vmax: float | None = 1.0,
        query: int | None = None,
    ) -> Figure:
        """Query x key maps of one prompt, its tokens on the axes (with their positions where
        labels are thinned out; a row per kept query where ``positions=`` chose some, labelled
        with its position), keys after the query in grey: one panel per head (the first
        ``max_panels`` of ``sites``, every head by default), or one head into ``ax``. With
        ``query``, one map instead: that query's weights, a row per head (every head of
        ``sites``), so that one sees which heads look where from, say, the last token.

        Args:
            ax: Axes to draw one head into (then ``sites`` names one head, or the first is drawn).
            prompt: Which prompt.
            sites: The heads to draw (as :func:`attention_patterns` takes them).
            max_panels: At most this many panels (a warning says what was left out).
            vmax: The colour scale's top: 1.0 (the default, one scale for every head), or None
                for each panel's own largest weight (a head spread over a long prompt is
                near-white on the 0-1 scale).
            query: A query position (``-1``: the prompt's last token) for the heads x keys map.

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.attention_patterns(mp.tiny_model(), "One two", layers=[1], progress=False)
            >>> len(res.plot().axes), len(res.plot(sites="pattern@1, head 2").axes)
            (5, 2)
            >>> res.plot(query=-1).axes[0].get_images()[0].get_array().shape  # 4 heads x 8 keys
            (4, 8)
        """
        if query is not None:
            return self._draw_query(ax, prompt, sites, query, vmax)
        return self._draw(ax, prompt, sites, max_panels, vmax, quiet=False)

    def _draw_query(
        self, ax: Axes | None, prompt: int, sites: Any, query: int, vmax: float | None
    ) -> Figure:
        p = self._prompt(prompt)
        row, q = self._row(p, check_int(query, "query"))
        if vmax is not None:
            vmax = check_float(vmax, "vmax", low=0.0, low_open=True)
        chosen = list(range(len(self.sites))) if sites is None else self._chosen(sites)
        weights = self.patterns[p, chosen, row, : q + 1]  # [heads, keys up to the query]
        fig, ax = new_axes(
            ax, (max(4.0, 0.28 * (q + 1) + 2.5), min(max(2.5, 0.2 * len(chosen) + 1.5), 14.0))
        )
        top = vmax if vmax is not None else max(float(weights.max()), 1e-12)
        image = ax.imshow(weights, cmap="Blues", vmin=0, vmax=top, aspect="auto")
        step = max(1, -(-(q + 1) // 40))
        keys = list(range(0, q + 1, step))
        labels = [
            token_label(self.tokens[p][k], 10)
            if step == 1
            else f"{k} {token_label(self.tokens[p][k], 10)}"
            for k in keys
        ]
        ax.set_xticks(keys, labels=[literal(t) for t in labels], rotation=90)
        rows = max(1, -(-len(chosen) // 40))
        ax.set_yticks(
            range(0, len(chosen), rows),
            labels=[f"L{self.layers[e]}H{self.heads[e]}" for e in chosen][::rows],
        )
        ax.tick_params(labelsize=7)
        ax.set_xlabel("key")
        ax.set_ylabel("head")
        ax.set_title(
            literal(f"from query {q} ({token_label(self.tokens[p][q], 16)!r}), prompt {p}"),
            fontsize=9,
        )
        fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
        return fig

    def _chosen(self, sites: Any) -> list[int]:
        """The indices of ``sites`` (one site or a list of them) among this result's heads."""
        listed = [sites] if _is_one_site(sites) else list(sites)
        if not listed:
            raise ValueError("sites is empty: name a head to draw, or pass None for all.")
        return [self._index(s) for s in listed]

    def _html_plot(self) -> Figure:
        # The notebook view draws the first 12 heads without a warning (its line above the table
        # says how many the result holds; plot(sites=...) draws others).
        return self._draw(None, 0, None, 12, 1.0, quiet=True)

    def _draw(
        self,
        ax: Axes | None,
        prompt: int,
        sites: Any,
        max_panels: int,
        vmax: float | None,
        *,
        quiet: bool,
    ) -> Figure:
        p = self._prompt(prompt)
        check_int(max_panels, "max_panels", 1)
        if vmax is not None:
            vmax = check_float(vmax, "vmax", low=0.0, low_open=True)
        chosen = list(range(len(self.sites))) if sites is None else self._chosen(sites)
        if ax is not None:
            if sites is not None and len(chosen) > 1:
                raise ValueError(
                    f"ax takes one head, got {len(chosen)}: pass one site with ax, or no ax "
                    "for one panel per head."
                )
            chosen = chosen[:1]
        elif len(chosen) > max_panels:
            if not quiet:
                warn(
                    f"Drawing the first {max_panels} of {len(chosen)} heads: pass sites=[...] "
                    "to choose, or a larger max_panels."
                )
            chosen = chosen[:max_panels]
        n = self.lengths[p]
        kept = self._queries(p)
        every = kept == tuple(range(n))
        step = max(1, -(-n // 30))  # at most about 30 token labels per axis
        # thinned out, a label says its position too: a repeated word is at several rows
        labels = [
            token_label(t, 10) if step == 1 else f"{i} {token_label(t, 10)}"
            for i, t in enumerate(self.tokens[p])
        ]
        if ax is not None:
            fig, axes = figure_of(ax), [ax]
        else:
            from matplotlib.figure import Figure

            cols = min(len(chosen), 4)
            rows = -(-len(chosen) // cols)
            side = min(max(2.6, 0.22 * n + 1.0), 6.0)
            # kept queries draw a band of rows at a readable height, not a square's sliver
            high = side if every else min(max(1.4, 0.25 * len(kept) + 1.0), 6.0)
            fig = Figure(figsize=(side * cols + 1.0, high * rows), layout="constrained")
            axes = list(fig.subplots(rows, cols, squeeze=False).reshape(-1))
            for spare in axes[len(chosen) :]:
                spare.set_axis_off()
            axes = axes[: len(chosen)]
        ticks = list(range(0, n, step))
        # kept queries out of the prompt's run of them say their positions
        row_labels = [
            labels[q] if every else f"{q} {token_label(self.tokens[p][q], 10)}" for q in kept
        ]
        rows_step = max(1, -(-len(kept) // 30))
        row_ticks = list(range(0, len(kept), rows_step))
        import matplotlib as mpl

        colours = mpl.colormaps["Blues"].with_extremes(bad="0.85")
        # keys after each kept query: masked
        later = np.arange(n)[None, :] > np.asarray(kept)[:, None]
        image = None
        for axis, e in zip(axes, chosen, strict=True):
            weights = np.ma.masked_array(self.patterns[p, e, : len(kept), :n], mask=later)
            top = vmax if vmax is not None else max(float(weights.max()), 1e-12)
            image = axis.imshow(
                weights, cmap=colours, vmin=0, vmax=top, aspect="equal" if every else "auto"
            )
            axis.set_xticks(ticks, labels=[literal(labels[t]) for t in ticks], rotation=90)
            axis.set_yticks(row_ticks, labels=[literal(row_labels[r]) for r in row_ticks])
            axis.tick_params(labelsize=7)
            axis.set_xlabel("key")
            axis.set_ylabel("query")
            axis.set_title(literal(self.sites[e]), fontsize=9)
        if image is not None and (vmax is not None or len(chosen) == 1):
            fig.colorbar(image, ax=axes, label="attention weight", shrink=0.8)
        return fig

    def _describe(self) -> str:
        shortest, longest = min(self.lengths, default=0), max(self.lengths, default=0)
        span = f"{shortest}" if shortest == longest else f"{shortest}-{longest}"
        text = (
            f"{_count(len(self.sites), 'head')} in {_count(len(set(self.layers)), 'layer')} on "
            f"{_count(len(self.prompts), 'prompt')} of {span} token{'' if longest == 1 else 's'}"
        )
        if self._every_query():
            return text
        counts = {len(self._queries(p)) for p in range(len(self.lengths))}
        few, many = min(counts, default=0), max(counts, default=0)
        kept = f"{few}" if few == many else f"{few}-{many}"
        return f"{text}, {kept} quer{'y' if many == 1 else 'ies'} each"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _is_one_site(value: Any) -> bool:
    """A site on its own, not a list of them: a label, a Site, or a ``(layer, head)`` pair (or a
    ``(layer, head, score)`` triple, as ``HeadScoreResult.top`` gives)."""
    return isinstance(value, (str, Site)) or (
        isinstance(value, tuple)
        and len(value) in (2, 3)
        and all(as_int(v) is not None for v in value[:2])
    )


def _as_site(value: Any, what: str) -> Site:
    """One head as a ``pattern`` Site: a label, a Site, or a ``(layer, head)`` pair / ``(layer,
    head, score)`` triple."""
    if isinstance(value, Site):
        return value
    if isinstance(value, str):
        return Site.parse(value)
    if _is_one_site(value):
        return Site("pattern", as_int(value[0]), head=as_int(value[1]))  # type: ignore[arg-type]
    raise TypeError(
        f"{what} {value!r} is not a head: pass a label ('pattern@9, head 3'), a Site, or a "
        "(layer, head) pair."
    )


class _Keep(Intervention):
    """Writes the chosen heads and queries of one layer's pattern (query-major ``[rows, q, head,
    k]``) into the result's array as float32, inside the hook: a layer's maps are held only
    while its hook runs (kept until the pass ended, every layer's were alive at once, and a call
    under the 4 GiB guard peaked at 2.2x its patterns, review 41a). The last layer's hook ends
    the forward pass.

    Args:
        heads: The layer's heads kept.
        entries: Each kept head's index on the result's head axis.
        queries: ``[rows, queries]`` each row's kept query indices in the padded batch (a
            shorter row's list repeated to the width), or None where every row keeps its every
            query.
        keys: Per row, the padded indices of its own tokens.
        counts: Per row, how many queries it keeps.
        out: The result's ``[prompts, heads, queries, keys]`` array.
        start: The chunk's first prompt.
        stop: End the forward pass after this layer.
    """

    def __init__(
        self,
        heads: list[int],
        entries: list[int],
        queries: Tensor | None,
        keys: list[Tensor],
        counts: list[int],
        out: np.ndarray,
        start: int,
        stop: bool,
    ) -> None:
        super().__init__(positions=None)
        self.heads, self.entries, self.queries, self.keys = heads, entries, queries, keys
        self.counts, self.out, self.start, self.stop = counts, out, start, stop
        self.fired = False

    def edit(self, selected: Tensor, hook: Any) -> None:
        if self.queries is not None:  # the kept queries before the heads: the smaller copy
            rows = torch.arange(selected.shape[0], device=selected.device)[:, None]
            selected = selected[rows, self.queries.to(selected.device)]
        kept = selected[:, :, self.heads, :].detach().to("cpu", torch.float32)
        for r, (keys, m) in enumerate(zip(self.keys, self.counts, strict=True)):
            n = len(keys)
            mine = kept[r, keys] if self.queries is None else kept[r, :m]  # [m, heads, k]
            weights = rearrange(mine[:, :, keys], "q h k -> h q k").numpy()
            self.out[self.start + r][self.entries, :m, :n] = weights
        self.fired = True
        if self.stop:
            raise StopForward
        return None


@evaluates
def attention_patterns(
    model: Any,
    prompts: str | Sequence[str] | Batch,
    *,
    sites: SiteLike | Sequence[SiteLike] = "pattern",
    layers: Layers = "all",
    positions: int | Sequence[int] | str = "all",
    batch_size: int | None = 32,
    progress: bool = True,
) -> AttentionPatterns:
    """The attention patterns of chosen heads on prompts, each prompt cut to its own tokens
    (module docstring).

    One forward pass per ``batch_size`` prompts, stopped after the last layer read; only the
    chosen heads and queries are kept (float32, ``prompts x heads x queries x longest prompt``
    weights: every query by default, one with ``positions=-1``, so long prompts fit).

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts or a :class:`Batch`.
        sites: ``"pattern"`` (every head of each of ``layers``), ``pattern`` Sites or their
            labels (``"pattern@9, head 3"``), ``(layer, head)`` pairs as
            :func:`mechprobe.function_vector` names its heads (``fv.heads``; the ``(layer, head,
            score)`` triples of ``HeadScoreResult.top`` too), or a list of them. Sites carry no
            positions here (say ``positions=``).
        layers: The layers whose heads ``"pattern"`` stands for (default every layer).
        positions: The query positions kept in each prompt: ``"all"`` (the default: whole
            maps), or one or several positions of its own tokens, negative from its end (``-1``:
            the last token, the one that predicts; padding never counts). A pattern of
            ``n`` tokens then holds ``len(positions) x n`` weights, not ``n ** 2``.
        batch_size: Prompts per forward pass (None: all at once).
        progress: Show a progress bar over batches.

    Returns:
        An :class:`AttentionPatterns`.

    Raises:
        ValueError: A site of another kind or with positions; a prompt without tokens; token
            ids outside the vocabulary; a position outside a prompt, or two naming one token;
            patterns that would take more than 4 GiB (pass fewer heads, queries or prompts).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.attention_patterns(model, "The cat sat", sites="pattern@1, head 2",
        ...                             progress=False)
        >>> res.sites, res.pattern("pattern@1, head 2").shape == (res.lengths[0],) * 2
        (('pattern@1, head 2',), True)
        >>> last = mp.attention_patterns(model, ["The cat sat", "Hi"], layers=[1],
        ...                              positions=-1, progress=False)
        >>> last.queries, last.pattern("pattern@1, head 2", prompt=1).shape
        (((11,), (2,)), (1, 3))
    """
    if _is_one_site(sites) and isinstance(sites, tuple):
        sites = _as_site(sites, "sites")
    elif isinstance(sites, (list, tuple)):
        sites = [_as_site(s, "sites") if isinstance(s, tuple) else s for s in sites]
    chosen = expand_sites(model, sites, layers=layers, kinds=("pattern",), layers_name="layers")
    placed = [str(s) for s in chosen if s.positions is not None]
    if placed:
        raise ValueError(
            f"attention_patterns takes its queries from positions=: the Sites {placed} carry "
            "positions. Pass them without, and the queries as positions=[...] (or -1)."
        )
    check_batch_size(batch_size)
    if isinstance(prompts, Batch):
        check_token_ids(model, prompts.tokens)  # ids given by hand, before the embedding
        batch = prompts
    else:
        batch = tokenize(model, prompts)
    lengths = [int(n) for n in batch.attention_mask.sum(1).tolist()]
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise ValueError(
            f"Prompts {empty} have no tokens (attention_mask all 0): leave them out of the Batch."
        )
    kept = _query_positions(check_positions(positions), lengths)
    longest = max(lengths, default=0)
    most = max((len(q) for q in kept), default=0)
    size = len(batch) * len(chosen) * most * longest * 4
    if size > MAX_BYTES:
        raise ValueError(
            f"{len(chosen)} heads on {len(batch)} prompts of up to {longest} tokens, {most} "
            f"queries each, would hold {size / 2**30:.1f} GiB of patterns (at most "
            f"{MAX_BYTES / 2**30:.0f}): pass fewer heads (sites=[...] or layers=[...]), fewer "
            "queries (positions=-1 or a list), fewer prompts, or shorter ones."
        )
    by_layer: dict[int, list[int]] = {}
    for site in chosen:
        assert site.head is not None  # a pattern site always names its head
        by_layer.setdefault(site.layer, []).append(site.head)
    last = max(by_layer)
    out = np.full((len(batch), len(chosen), most, longest), np.nan, dtype=np.float32)
    entry = {(s.layer, s.head): e for e, s in enumerate(chosen)}
    for rows, chunk in progress_bar(
        list(batch.chunks(batch_size)), progress=progress, desc="attention patterns"
    ):
        # each row's own tokens and kept queries at their padded indices (short lists repeat
        # their last); None where every row keeps every query: nothing to gather
        where = [torch.nonzero(chunk.attention_mask[r]).flatten() for r in range(len(chunk))]
        mine = [where[r][list(kept[rows.start + r])] for r in range(len(chunk))]
        every = all(len(mine[r]) == len(where[r]) for r in range(len(chunk)))
        width = max(len(q) for q in mine)
        queries = (
            None
            if every
            else torch.stack([torch.cat([q, q[-1:].expand(width - len(q))]) for q in mine])
        )
        counts = [len(q) for q in mine]
        keeps = {
            layer: _Keep(
                heads,
                [entry[(layer, head)] for head in heads],
                queries,
                where,
                counts,
                out,
                rows.start,
                layer == last,
            )
            for layer, heads in by_layer.items()
        }
        try:
            with (
                torch.no_grad(),
                intervene(
                    model,
                    {f"blocks.{layer}.attn.hook_pattern": keep for layer, keep in keeps.items()},
                    batch=chunk,
                ),
            ):
                forward(model, chunk)
        except StopForward:  # the last layer read ends the pass
            pass
        for layer, keep in keeps.items():
            if not keep.fired:
                raise RuntimeError(f"Layer {layer}'s attention pattern hook never fired.")
    ids = [batch.tokens[i][batch.attention_mask[i].bool()].tolist() for i in range(len(batch))]
    tokenizer = getattr(model, "tokenizer", None)
    texts = tuple(
        tuple(str(t) for t in row) if tokenizer is None else tuple(token_texts(tokenizer, row))
        for row in ids
    )
    shown = tuple(
        batch.prompts[i] if batch.prompts and batch.prompts[i] else "".join(texts[i])
        for i in range(len(batch))
    )
    bos = model_adapter(model).prepended_bos
    # a BOS the model prepends (a Batch of ids may start with it too)
    leads = tuple(bos is not None and len(row) > 0 and int(row[0]) == bos for row in ids)
    return AttentionPatterns(
        sites=tuple(str(s) for s in chosen),
        layers=tuple(s.layer for s in chosen),
        heads=tuple(int(s.head) for s in chosen if s.head is not None),
        patterns=out,
        lengths=tuple(lengths),
        prompts=shown,
        tokens=texts,
        bos=leads,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        windows=tuple(model_adapter(model).attention_window(s.layer) or 0 for s in chosen),
        queries=tuple(kept),
    )


def _query_positions(
    positions: int | list[int] | str, lengths: Sequence[int]
) -> list[tuple[int, ...]]:
    """Per prompt, the query positions ``positions`` (read by ``check_positions``) names among
    its own ``lengths[i]`` tokens, ascending: every one for ``"all"``, negative ones from its
    end. A position outside a prompt, or two naming one token of it, is an error."""
    out: list[tuple[int, ...]] = []
    outside: list[int] = []
    twice: list[int] = []
    for i, n in enumerate(lengths):
        if isinstance(positions, str):  # "all", as check_positions read it
            out.append(tuple(range(n)))
            continue
        asked = [positions] if isinstance(positions, int) else list(positions)
        if any(not -n <= q < n for q in asked):
            outside.append(i)
            continue
        resolved = sorted(q % n for q in asked)
        if len(set(resolved)) < len(resolved):
            twice.append(i)
        out.append(tuple(resolved))
    if outside:
        shortest = min(lengths[i] for i in outside)
        raise ValueError(
            f"positions={positions} reach outside {_count(len(outside), 'prompt')} "
            f"({_listed(outside)}; the shortest has {_count(shortest, 'token')}): pass positions "
            "every prompt has (negative ones count from each prompt's end; -1 is its last token)."
        )
    if twice:
        raise ValueError(
            f"positions={positions} name one token twice in {_count(len(twice), 'prompt')} "
            f"({_listed(twice)}; a negative and a positive position meet on short prompts): "
            "pass each query once."
        )
    return out


def _listed(indices: Sequence[int]) -> str:
    """Prompt indices as a message names them: the first five, then how many more."""
    shown = ", ".join(map(str, indices[:5]))
    return shown + (f" and {len(indices) - 5} more" if len(indices) > 5 else "")
