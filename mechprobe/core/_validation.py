"""Checking arguments in one place: messages name the argument, the value and the fix.

Numbers from numpy (``np.int64``) and 0-d tensors count as the Python numbers they hold, so
positions and sizes computed with numpy or torch are accepted wherever an int is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["as_int", "check_choice", "check_finite", "check_float", "check_int", "check_seed"]


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (Python, numpy or a 0-d integer tensor), else
    None. Booleans are not integers here.

    Example:
        >>> as_int(np.int64(3)), as_int(torch.tensor(-1)), as_int(2.0), as_int(True)
        (3, -1, None, None)
    """
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
        if value.dtype == torch.bool:
            return None
        return int(value.item())
    if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
        return int(value.item())
    return None


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int within ``[low, high]``.

    Raises:
        TypeError: Not an integer.
        ValueError: Out of range.

    Example:
        >>> check_int(np.int32(4), "batch_size", 1)
        4
    """
    number = as_int(value)
    if number is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if (low is not None and number < low) or (high is not None and number > high):
        if high is None:
            bound = f"at least {low}"
        elif low is None:
            bound = f"at most {high}"
        else:
            bound = f"between {low} and {high}"
        raise ValueError(f"{name} must be {bound}, got {number}.")
    return number


#: The largest seed every generator a seed reaches takes (scikit-learn's random_state and
#: numpy's legacy RandomState stop at 2**32 - 1).
MAX_SEED = 2**32 - 1


def check_seed(value: Any) -> int:
    """A seed as a Python int in ``0 .. 2**32 - 1``, the one range every seeded call accepts.

    numpy integers become ints (they reached ``random.seed`` and torch's generators as they
    were, and failed there); negative seeds, which numpy and scikit-learn refuse, are refused
    here for every function alike.

    Raises:
        TypeError: Not an integer.
        ValueError: Negative or past ``2**32 - 1``.

    Example:
        >>> check_seed(np.int64(3))
        3
    """
    return check_int(value, "seed", 0, MAX_SEED)


def check_float(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
) -> float:
    """``value`` as a finite float within ``[low, high]`` (``(low, high]`` with ``low_open``).

    Raises:
        TypeError: Not a real number.
        ValueError: NaN, infinite or out of range.

    Example:
        >>> check_float(2, "scale")
        2.0
    """
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {number}.")
    too_low = low is not None and (number <= low if low_open else number < low)
    if too_low or (high is not None and number > high):
        left = "(" if low_open else "["
        raise ValueError(
            f"{name} must be in {left}{'-inf' if low is None else low}, "
            f"{'inf' if high is None else high}], got {number}."
        )
    return number


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``.

    Example:
        >>> check_choice("zero", "method", ("zero", "mean"))
        'zero'
    """
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}.")
    return value


def check_finite(value: torch.Tensor | np.ndarray, name: str) -> None:
    """Raise if ``value`` holds NaN or infinity (a silent wrong answer otherwise).

    Raises:
        ValueError: naming how many entries are not finite.

    Example:
        >>> check_finite(torch.ones(3), "vector")
    """
    tensor = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if tensor.is_floating_point() or tensor.is_complex():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(
                f"{name} holds {bad} NaN or infinite value(s) of {tensor.numel()}: pass finite "
                "numbers (a NaN would make every comparison false and every rank 0)."
            )
