"""Figures of a :class:`~mechprobe.lens._result.LensResult`: the logit-lens heatmap and trajectories.

Both return a matplotlib ``Figure`` built without pyplot (nothing is shown, any backend works) and
only read the result's arrays: plotting never recomputes.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mechprobe.core import check_int, figure_of, literal, new_axes, token_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from mechprobe.lens._result import LensResult

__all__ = ["heatmap", "trajectory"]


def _target_index(result: LensResult, b: int, target: int | str) -> int:
    names = result.targets[b]
    if isinstance(target, str):
        if target not in names:
            raise ValueError(f"Prompt {b} has no target {target!r}; its targets are {list(names)}.")
        return names.index(target)
    if not 0 <= target < len(names):
        raise ValueError(
            f"Prompt {b} has {len(names)} target(s); pass target= an index in 0..{len(names) - 1} "
            "or its string (run logit_lens with targets= to colour by rank)."
        )
    return int(target)


def heatmap(
    result: LensResult,
    prompt: int | None = None,
    *,
    site: str | None = None,
    color: str = "prob",
    target: int | str = 0,
    label_width: int = 8,
    last: int | None = None,
    ax: Axes | None = None,
) -> Figure:
    """The classic logit-lens picture: layers (rows) x prompt positions (columns).

    Each cell is annotated with the lens's top-1 token, the prediction for the *next* token; the x
    axis shows the input token at each position. Where every prompt was decoded at one position
    (``positions=-1``, the default of :func:`mechprobe.logit_lens`) and no ``prompt`` is named,
    the columns are the prompts instead, each at its decoded token.

    Args:
        result: A logit-lens result.
        prompt: Which prompt to draw (None: every prompt where each has one decoded position,
            else prompt 0).
        site: Which site kind (default: the first decoded).
        color: ``"prob"`` (top-1 probability) or ``"rank"`` (rank of ``target``'s first token,
            log colour scale, 0 = top-1).
        target: Target index or string for ``color="rank"``.
        label_width: Characters of each annotation before it is cut.
        last: Draw only the last ``last`` columns (default: all, the last 20 of more, said in
            the title). The figure widens with each column up to 16 inches; past that the
            columns narrow and their annotations are cut shorter.
        ax: Draw into these axes (default: a new figure).

    Example:
        >>> import mechprobe as mp
        >>> fig = mp.logit_lens(mp.tiny_model(), "Hi there", positions="all").plot_heatmap()
        >>> len(fig.axes)  # the heatmap and its colour bar
        2
    """
    decoded = [np.nonzero(result.positions[b] >= 0)[0] for b in range(len(result.prompts))]
    across = prompt is None and len(decoded) > 1 and all(len(c) == 1 for c in decoded)
    if across:  # (prompt, column) of each drawn column
        cells = [(b, int(c[0])) for b, c in enumerate(decoded)]
    else:
        b = result.check_prompt(0 if prompt is None else prompt)
        cells = [(b, int(c)) for c in decoded[b]]
    n_cells = len(cells)
    if last is not None:  # 0 drew every column (cells[-0:]) and -3 all but the first three
        check_int(last, "last", 1)
    if last is None and n_cells > _COLUMNS:  # 73 positions drew 56 inches, 40 of them 31.5
        last = _COLUMNS
    if last is not None:
        cells = cells[-last:]
    unit = "prompts" if across else "positions"
    shown = f" (last {len(cells)} of {n_cells} {unit})" if len(cells) < n_cells else ""
    entries = np.asarray(result.entries(site))
    kind = result.sites[entries[0]]
    others = [k for k in dict.fromkeys(result.sites) if k != kind]
    also = f" (also decoded: {', '.join(others)}; pass site=)" if others and site is None else ""
    layers = [result.layers[e] for e in entries]
    top1 = np.stack([result.top_ids[b][entries, c, 0] for b, c in cells], axis=1)
    if color == "prob":
        values = np.stack([result.top_probs[b][entries, c, 0] for b, c in cells], axis=1)
        options: dict[str, object] = {"cmap": "viridis", "vmin": 0.0, "vmax": 1.0}
        bar = "top-1 probability"
    elif color == "rank":
        slots = {b: _target_index(result, b, target) for b, _ in cells}
        values = np.stack(
            [result.position_rank[b][entries, c, slots[b]] + 1.0 for b, c in cells], axis=1
        )
        options = {"cmap": "viridis_r", "norm": LogNorm(vmin=1.0, vmax=max(10.0, values.max()))}
        names = {result.targets[b][slots[b]] for b, _ in cells}
        what = repr(names.pop()) if len(names) == 1 else f"target {target}"
        bar = f"rank of {what} (first token) + 1"
    else:
        raise ValueError(f"color must be 'prob' or 'rank', got {color!r}.")
    # At least 5 inches: one column (positions=-1) left no room for the title and colour bar; at
    # most 16 as patching's figures (40 columns drew 31.5 inches, unreadable once scaled to a page).
    width = min(_MAX_WIDTH, max(5.0, 1.5 + 0.75 * len(cells)))
    # An annotation fits its column: about 18 characters an inch at this font size.
    label_width = min(label_width, max(3, int(18 * (width - 1.5) / len(cells))))
    fig, ax = new_axes(ax, (width, 1.4 + 0.26 * len(layers)))
    image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest", **options)  # type: ignore[arg-type]
    fig.colorbar(image, ax=ax, label=literal(bar), fraction=0.04, pad=0.01)
    shade = np.asarray(image.norm(values), dtype=float)
    light = shade < 0.5 if color == "prob" else shade > 0.5
    for i in range(len(layers)):
        for j in range(len(cells)):
            ax.text(
                j,
                i,
                literal(token_label(result.text(top1[i, j]), label_width)),
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if light[i, j] else "black",
            )
    ticks = [token_label(result.prompt_tokens[b][result.positions[b, c]], 12) for b, c in cells]
    what = "input token (position)"
    if across:
        what = "prompt: its decoded token"
        # Templated prompts all end in the same token (":"), and "0: :", "1: :" named none of
        # them: each column says what sets its prompt apart, and the token where it is not shared.
        parts = _distinct_parts([result.prompts[b] for b, _ in cells])
        if any(part.strip() for part in parts):
            shared = ticks[0] if len(set(ticks)) == 1 else None
            ticks = [
                f"{b}: {token_label(part, 16, tail=True)}"
                + ("" if shared is not None else f" | {tick}")
                if part.strip()
                else f"{b}: {tick}"
                for (b, _), part, tick in zip(cells, parts, ticks, strict=True)
            ]
            what = (
                f"prompt: what sets it apart (each decoded at its token '{shared}')"
                if shared is not None
                else "prompt: what sets it apart | its decoded token"
            )
        else:  # the same prompt drawn twice: its index and token say all there is
            ticks = [f"{b}: {tick}" for (b, _), tick in zip(cells, ticks, strict=True)]
    if len(cells) == 1:  # upright, with its position: a lone ":" rotated read as a dot pair
        b, c = cells[0]
        at = int(result.positions[b, c])
        is_last = ", the last" if at == len(result.prompt_tokens[b]) - 1 else ""
        ax.set_xticks([0], [literal(f"'{ticks[0]}' (position {at}{is_last})")])
    else:
        if not across:  # "What" thrice in a 3-shot prompt: the position tells them apart
            ticks = [
                f"{t} ({int(result.positions[b, c])})"
                for t, (b, c) in zip(ticks, cells, strict=True)
            ]
        ax.set_xticks(range(len(cells)), [literal(t) for t in ticks], rotation=60, ha="right")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.tick_params(axis="y", labelsize=7)
    # Two lines where the columns are prompts: on one, the label ran past a 5-inch figure.
    cells_are = "cells: the lens's top-1 next token"
    ax.set_xlabel(literal(f"{what}\n{cells_are}" if across else f"{what}; {cells_are}"))
    ax.set_ylabel(f"layer ({kind})")
    name = "Logit lens" if result.lens == "logit" else result.lens.split(" ")[0].capitalize()
    if across:
        title = f"{name}, {len(result.prompts)} prompts{shown}{also}"
    else:
        b = cells[0][0]
        of = f" of {len(result.prompts)}" if len(result.prompts) > 1 else ""
        prompt_text = token_label(result.prompts[b], min(70, int(8 * width)), tail=True)
        title = f"{name}, prompt {b}{of}{shown}{also}: {prompt_text}"
    # Wrapped to the figure, as patching's titles: with a second site kind named, one line ran
    # past both edges of a 5-inch figure. About 12 characters an inch at this size.
    ax.set_title(literal(textwrap.fill(title, max(30, int(12 * width)))), fontsize=9)
    return fig


def _distinct_parts(texts: Sequence[str]) -> list[str]:
    """What sets each text apart: it without the prefix and suffix all of them share, cut back
    to whole words (``"Poland"`` and ``"Portugal"``, not ``"land"`` and ``"rtugal"``).

    Example:
        >>> _distinct_parts(["Q: capital of France?", "Q: capital of Poland?"])
        ['France', 'Poland']
    """
    if len(set(texts)) == 1:  # nothing sets them apart
        return ["" for _ in texts]
    shortest = min(len(text) for text in texts)
    start = 0
    while start < shortest and len({text[start] for text in texts}) == 1:
        start += 1
    while start > 0 and texts[0][start - 1].isalnum():  # back to the start of a word
        start -= 1
    end = 0  # characters shared at the end, not reaching into the shared start
    while end < shortest - start and len({text[-end - 1] for text in texts}) == 1:
        end += 1
    while end > 0 and texts[0][-end].isalnum():  # on to the end of a word
        end -= 1
    return [text[start : len(text) - end] for text in texts]


#: Columns :func:`heatmap` draws when ``last`` is not given (the last ones): about 0.75 inch
#: each, they fill the widest figure, :data:`_MAX_WIDTH` inches.
_COLUMNS = 20
_MAX_WIDTH = 16.0
#: Panels :func:`trajectory` draws when no prompt is named.
_PANELS = 6


def trajectory(
    result: LensResult,
    prompt: int | Sequence[int] | None = None,
    *,
    site: str | None = None,
    metric: str = "rank",
    titles: Sequence[str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Each target's rank, probability or log-probability across layers at the prompt's last token.

    One line per target (e.g. the argument and the answer), one panel per prompt.

    Args:
        result: A logit-lens result with targets.
        prompt: A prompt index or several (one panel each; default: every prompt, the first
            six of more).
        site: Which site kind (default: the first decoded).
        metric: ``"rank"`` (first token, log scale, top-1 at the top), ``"prob"`` (first token) or
            ``"logprob"`` (whole target, teacher-forced).
        titles: One panel title per prompt (default: the end of each prompt).
        ax: Draw into these axes (one prompt only; default: a new figure).

    Example:
        >>> import mechprobe as mp
        >>> lens = mp.logit_lens(mp.tiny_model(), "Hi", targets=[" a", " b"])
        >>> [line.get_label() for line in lens.plot_trajectory().axes[0].lines]
        ["' a' (2 tokens)", "' b' (2 tokens)"]
    """
    if prompt is None:  # into given axes: the first prompt
        prompts: list[int] = list(range(1 if ax is not None else min(len(result.prompts), _PANELS)))
    else:
        prompts = [prompt] if isinstance(prompt, (int, np.integer)) else list(prompt)
        if not prompts:
            raise ValueError("prompt is an empty list: name a prompt index, several, or None.")
    indices = [result.check_prompt(p) for p in prompts]
    if titles is not None and len(titles) != len(indices):
        raise ValueError(f"Got {len(titles)} titles for {len(indices)} prompts: pass one each.")
    if metric not in ("rank", "prob", "logprob"):
        raise ValueError(f"metric must be 'rank', 'prob' or 'logprob', got {metric!r}.")
    entries = result.entries(site)
    kind = result.sites[entries[0]]
    layers = [result.layers[e] for e in entries]
    if ax is not None and len(indices) != 1:
        raise ValueError(f"ax= draws one prompt; got {len(indices)}: pass ax=None for panels.")
    if ax is not None:
        fig, axes = figure_of(ax), [ax]
    else:
        fig = Figure(figsize=(1.0 + 4.2 * len(indices), 3.6), layout="constrained")
        axes = list(fig.subplots(1, len(indices), sharey=True, squeeze=False)[0])
        if prompt is None and len(result.prompts) > len(indices):
            fig.suptitle(
                f"prompts 0-{len(indices) - 1} of {len(result.prompts)} (prompt= draws others)",
                fontsize=9,
            )
    for i, (ax, b) in enumerate(zip(axes, indices, strict=True)):
        if not result.targets[b]:
            raise ValueError(f"Prompt {b} has no targets: run logit_lens with targets=.")
        for t, name in enumerate(result.targets[b]):
            n_tok = len(result.target_tokens[b][t])
            label = repr(name) + (f" ({n_tok} tokens)" if n_tok > 1 else "")
            if metric == "rank":
                y = result.target_rank[b, entries, t] + 1.0
            elif metric == "prob":
                y = result.target_prob[b, entries, t]
            else:
                y = result.target_logprob[b, entries, t]
            ax.plot(layers, y, marker="o", markersize=3, label=literal(label))
        title = titles[i] if titles is not None else token_label(result.prompts[b], 48, tail=True)
        ax.set_title(literal(title), fontsize=9)
        ax.set_xlabel(f"layer ({kind}, last prompt token)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if metric == "rank":
        axes[0].set_yscale("log")
        # The axis always reaches 1 (top-1): autoscaled to the data, a line that ended at rank 14
        # touched the top edge and read as top-1.
        lines = [line.get_ydata() for a in axes for line in a.lines]
        axes[0].set_ylim(max(10.0, *(float(np.nanmax(y)) for y in lines)) * 1.5, 0.8)
        axes[0].set_ylabel("rank + 1 of the first token (1 = top-1)")
    elif metric == "prob":
        axes[0].set_ylim(-0.02, 1.02)  # autoscaled, a probability of 4e-9 drew a tall spike
        axes[0].set_ylabel("probability of the first token")
    else:
        axes[0].set_ylabel("log-probability of the whole target")
    return fig
