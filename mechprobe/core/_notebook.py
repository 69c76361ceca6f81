"""Figures shown in notebooks: every ``plot()`` returns a bare matplotlib ``Figure``.

mechprobe builds figures without pyplot (nothing pops up, any backend works, nothing is left in
pyplot's registry). IPython shows a bare ``Figure`` as an image only once its inline backend has
registered a PNG formatter for the type, which happens on ``%matplotlib inline`` or the first
pyplot figure, not before: in a fresh kernel ``res.plot()`` printed ``<Figure size ... with 2
Axes>``. Importing mechprobe inside IPython registers that formatter where none is, by the type's
name (matplotlib is not imported for it), and leaves any registration made before alone.
"""

from __future__ import annotations

import sys
from functools import partial

__all__ = ["show_figures_in_notebooks"]


def show_figures_in_notebooks() -> bool:
    """Register IPython's PNG formatter for matplotlib figures, if IPython runs and has none.

    Returns whether it registered one (False outside IPython, or where one already was).

    Example:
        >>> show_figures_in_notebooks()  # a script or doctest: no IPython shell
        False
    """
    if "IPython" not in sys.modules:  # never import IPython into a script
        return False
    from IPython import get_ipython

    shell = get_ipython()
    formatters = getattr(getattr(shell, "display_formatter", None), "formatters", None)
    if not formatters or "image/png" not in formatters:
        return False
    png = formatters["image/png"]
    key = ("matplotlib.figure", "Figure")
    registered = key in png.deferred_printers or any(
        (t.__module__, t.__name__) == key for t in png.type_printers
    )
    if registered:
        return False
    import inspect

    from IPython.core.pylabtools import print_figure

    # IPython before 7.29 has no base64= (the formatter then takes the raw bytes).
    options = {"base64": True} if "base64" in inspect.signature(print_figure).parameters else {}
    png.for_type_by_name(*key, partial(print_figure, fmt="png", bbox_inches="tight", **options))
    return True
