"""The held-out split of a relational analysis: whole arguments held out, seeded.

:func:`mechprobe.relational_analysis` fits the o-vector and reads the stages off the other items;
a saved :class:`RelationalResult` recomputes the split from its config to say which items those
were.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def held_out_items(arguments: Sequence[str], test_size: float, seed: int) -> np.ndarray:
    """``[item]`` True for held-out items: a seeded fraction ``test_size`` of them, split by
    argument, so that no held-out item shares its argument with an item the o-vector is fitted
    on (``uppercase`` asks about 13 colours in 200 items). Arguments are taken in a seeded order,
    each one whose items bring the count no farther from the fraction, until it is reached,
    leaving at least one argument in (so arguments of very unequal counts can miss the fraction,
    and one argument alone holds nothing out: :func:`relational_analysis` notes both). With every
    argument distinct (capitals) this is a seeded fraction of the items.

    Example:
        >>> held_out_items(["a", "b", "a", "c"], 0.5, 0).tolist()  # "c", then "a": 3 of 4
        [True, False, True, True]
    """
    if not 0.0 <= test_size < 1.0:
        raise ValueError(f"test_size is a fraction in [0, 1), got {test_size!r}.")
    n = len(arguments)
    names = list(dict.fromkeys(arguments))  # in order of first occurrence
    members = {name: [i for i, a in enumerate(arguments) if a == name] for name in names}
    held = np.zeros(n, dtype=bool)
    wanted = min(round(test_size * n), n - 1)
    count, taken = 0, 0
    for g in np.random.default_rng(seed).permutation(len(names)):
        if count >= wanted or taken == len(names) - 1:
            break
        size = len(members[names[g]])
        if abs(count + size - wanted) <= abs(count - wanted):
            held[members[names[g]]] = True
            count, taken = count + size, taken + 1
    return held
