"""Old spellings accepted for one release, each with a DeprecationWarning naming the new one.

- Renamed keywords (``layer_ranges=`` -> ``layers=``, ``sweep_ranges=`` -> ``sweep_layers=``,
  ``holdout=`` -> ``test_size=``):
  :func:`renamed_keywords` wraps a function so that the old keyword still works; the function's
  signature (what ``inspect.signature`` and the vocabulary test see) shows only the new names.

CHANGELOG.md lists each of them; they go in the next release.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar

from mechprobe.core import warn

__all__ = ["half_open_pairs", "renamed_keywords"]

P = ParamSpec("P")
R = TypeVar("R")


def renamed_keywords(
    **renames: tuple[str, Callable[[Any], Any]],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept ``old=value`` as ``new=convert(value)`` with a DeprecationWarning.

    Args:
        renames: ``old=(new, convert)``; ``convert`` maps the old meaning onto the new one.

    Example:
        >>> @renamed_keywords(size=("n", int))
        ... def f(*, n: int = 1) -> int:
        ...     return n
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     f(size="3")
        3
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, (new, convert) in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(
                        f"{fn.__name__}() got both {old}= and {new}=; pass {new}= only."
                    )
                warn(
                    f"{fn.__name__}({old}=...) is deprecated and will be removed in the next "
                    f"release; pass {new}= instead (see CHANGELOG.md).",
                    DeprecationWarning,
                )
                kwargs[new] = convert(kwargs.pop(old))
            return fn(*args, **kwargs)

        return inner

    return wrap


def half_open_pairs(value: Any) -> Any:
    """The old ``(start, stop)`` layer ranges as ``range`` objects (other values unchanged).

    Example:
        >>> half_open_pairs([(1, 3), (2, 3)])
        [range(1, 3), range(2, 3)]
    """
    if isinstance(value, str) or value is None:
        return value
    if not isinstance(value, Sequence):
        return value
    return [range(int(a), int(b)) for a, b in value]
