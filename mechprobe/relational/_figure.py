"""Axes for a relational figure: the caller's, checked, or a new figure (one message for misuse).

Every result's ``plot(ax=None, ...)`` takes the axes first (the result protocol); the options that
used to come first (``stages``, ``metric``, ``relative``) are keyword-only, and a call that still
passes one positionally gets a TypeError naming the keyword instead of an AttributeError deep in
matplotlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mechprobe.core import new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["axes_for"]


def axes_for(ax: Any, figsize: tuple[float, float], owner: str) -> tuple[Figure, Axes]:
    """``(figure, axes)``: ``ax`` and its figure when given, else a new figure of ``figsize``.

    Raises:
        TypeError: ``ax`` is not a matplotlib Axes (e.g. an option passed positionally).

    Example:
        >>> fig, ax = axes_for(None, (3, 2), "X.plot")
        >>> axes_for(ax, (9, 9), "X.plot")[0] is fig
        True
    """
    if ax is not None:
        from matplotlib.axes import Axes

        if not isinstance(ax, Axes):
            raise TypeError(
                f"{owner}(ax=...) takes matplotlib Axes, got {type(ax).__name__} {ax!r}; its "
                "other options are keyword-only (e.g. plot(metric='mrr'))."
            )
    return new_axes(ax, figsize)
