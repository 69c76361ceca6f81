"""Warnings point at the user's own line: the first caller outside mechprobe.

A fixed ``stacklevel`` counts frames, and analyses call each other and run behind wrappers (the
eval-mode one, the deprecated-keyword one): a warning meant for the user's ``mp.patch(...)``
pointed into mechprobe instead whenever one more frame stood between them. Walking the stack to
the first frame of another module finds the user's line from any depth.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["user_stacklevel", "warn"]


def warn(message: str | Warning, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first caller outside mechprobe.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn("careful")
        >>> str(caught[0].message)
        'careful'
    """
    warnings.warn(message, category, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function point at the
    first caller outside mechprobe (``1`` is the calling function's own line).

    Example:
        >>> user_stacklevel() >= 1
        True
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and _in_mechprobe(frame.f_globals.get("__name__", "")):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _in_mechprobe(module: str) -> bool:
    # Context managers used as decorators (contextlib's, torch's no_grad) stand between two of
    # mechprobe's frames: theirs are no user's line either.
    return module in _WRAPPERS or module == "mechprobe" or module.startswith("mechprobe.")


_WRAPPERS = ("contextlib", "torch.utils._contextlib")
