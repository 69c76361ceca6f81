"""Progress bars: one default for the whole API, one environment variable to silence them.

Every long loop takes ``progress: bool = True``. Bars come from ``tqdm.auto`` (a widget in Jupyter,
text in a terminal), appear only once a loop has run for a second (short calls stay quiet), and
are switched off everywhere by ``MECHPROBE_PROGRESS=0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from mechprobe.core._validation import check_bool

__all__ = ["progress_bar", "progress_enabled", "weighted_progress_bar"]

T = TypeVar("T")
_ENV = "MECHPROBE_PROGRESS"
_OFF = {"0", "false", "no", "off"}


def progress_enabled(progress: bool) -> bool:
    """Whether a bar is shown: ``progress`` and not silenced by ``MECHPROBE_PROGRESS=0``.

    Example:
        >>> progress_enabled(False)
        False
    """
    # "no" or 0 would read as on/off by truthiness: a bar is a yes-or-no setting.
    return (
        check_bool(progress, "progress") and os.environ.get(_ENV, "1").strip().lower() not in _OFF
    )


def progress_bar(
    iterable: Iterable[T], *, progress: bool, desc: str, total: int | None = None, **kwargs: Any
) -> Iterator[T]:
    """``iterable`` wrapped in a bar when :func:`progress_enabled` (appearing after 1 s).

    Example:
        >>> list(progress_bar(range(3), progress=False, desc="demo"))
        [0, 1, 2]
    """
    if not progress_enabled(progress):
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, delay=1.0, leave=False, **kwargs))


def weighted_progress_bar(
    items: Sequence[T],
    *,
    weights: Sequence[float],
    counts: Sequence[int],
    unit: str,
    progress: bool,
    desc: str,
) -> Iterator[T]:
    """``items`` with a bar that advances by each item's ``weight`` and counts its ``counts``.

    For loops whose steps differ in cost (the patching engine's forward passes: a pass of a few
    long rows takes far longer than one of many short cells), a bar over steps predicts the
    remaining time wrongly; one advanced by each step's expected time predicts it where the
    weights are right. The bar shows the share done, ``done/total unit`` and the time left.

    Example:
        >>> list(weighted_progress_bar("ab", weights=[1.0, 3.0], counts=[2, 5], unit="cells",
        ...                            progress=False, desc="demo"))
        ['a', 'b']
    """
    if not len(items) == len(weights) == len(counts):
        raise ValueError(
            f"weighted_progress_bar: {len(items)} items, {len(weights)} weights and "
            f"{len(counts)} counts: give one weight and one count per item."
        )
    if not all(np.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"weighted_progress_bar: weights must be finite and >= 0, got {weights}.")
    if not progress_enabled(progress):
        yield from items
        return
    total, done = sum(counts), 0
    # The count is written in the bar's ``unit`` field: its ``postfix`` would add a comma.
    bar = tqdm(
        total=float(sum(weights)),
        desc=desc,
        delay=1.0,
        leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {unit} [{elapsed}<{remaining}]",
        unit=f"0/{total} {unit}",
    )
    try:
        for item, weight, count in zip(items, weights, counts, strict=True):
            yield item
            done += count
            bar.unit = f"{done}/{total} {unit}"
            bar.update(weight)
    finally:
        bar.close()
