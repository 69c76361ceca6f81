"""Progress bars: one default for the whole API, one environment variable to silence them.

Every long loop takes ``progress: bool = True``. Bars come from ``tqdm.auto`` (a widget in Jupyter,
text in a terminal), appear only once a loop has run for a second (short calls stay quiet), and
are switched off everywhere by ``MECHPROBE_PROGRESS=0``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

__all__ = ["progress_bar", "progress_enabled"]

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
    if not isinstance(progress, (bool, np.bool_)):
        raise TypeError(f"progress must be True or False, got {progress!r}.")
    return bool(progress) and os.environ.get(_ENV, "1").strip().lower() not in _OFF


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
