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

__all__ = [
    "as_int",
    "check_batch_size",
    "check_choice",
    "check_finite",
    "check_float",
    "check_int",
    "check_seed",
    "class_labels",
]


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


def check_bool(value: Any, name: str) -> bool:
    """``value`` as a bool: True or False (numpy's too), not a truthy ``"no"`` or ``0``, which a
    yes-or-no setting would read by truthiness.

    Example:
        >>> check_bool(True, "heads")
        True
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return bool(value)


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


def check_batch_size(value: Any) -> int | None:
    """``batch_size`` as every function that batches takes it: an int >= 1 (rows per forward
    pass), or None for all rows in one pass (``Batch.chunks`` reads None the same way).

    Raises:
        TypeError: Neither None nor an integer.
        ValueError: Below 1.

    Example:
        >>> check_batch_size(np.int64(8)), check_batch_size(None)
        (8, None)
    """
    return None if value is None else check_int(value, "batch_size", 1)


#: The largest seed every generator a seed reaches takes (scikit-learn's random_state and
#: numpy's legacy RandomState stop at 2**32 - 1).
MAX_SEED = 2**32 - 1


def check_seed(value: Any, name: str = "seed") -> int:
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
    return check_int(value, name, 0, MAX_SEED)


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


def check_dtype(value: Any, name: str, allowed: Sequence[torch.dtype]) -> torch.dtype:
    """A floating dtype as every function takes it: a torch dtype, a numpy one, or its name
    (``"bfloat16"``, ``"torch.float16"``), one of ``allowed`` (one spelling for ``load_model``'s
    weights and ``collect``'s storage alike: review 43b F12).

    Args:
        value: The dtype given.
        name: The argument's name, for the message.
        allowed: The dtypes the caller takes.

    Returns:
        The torch dtype.

    Raises:
        ValueError: Not a dtype, or not one of ``allowed``.

    Example:
        >>> check_dtype("bfloat16", "dtype", [torch.float32, torch.bfloat16])
        torch.bfloat16
        >>> check_dtype(np.float16, "dtype", [torch.float16])
        torch.float16
    """
    found: torch.dtype | None = None
    if isinstance(value, torch.dtype):
        found = value
    elif isinstance(value, str) and isinstance(
        getattr(torch, value.removeprefix("torch."), None), torch.dtype
    ):
        found = getattr(torch, value.removeprefix("torch."))
    else:  # numpy dtypes, their types and codes ("f4", "<f2")
        try:
            kind = np.dtype(value)
        except (TypeError, ValueError):
            kind = None
        if kind is not None and kind.kind == "f":
            found = getattr(torch, kind.name, None)
    names = [str(d).removeprefix("torch.") for d in allowed]
    if not isinstance(found, torch.dtype) or found not in allowed:
        raise ValueError(
            f"{name} must be one of {names} (a torch or numpy dtype, or its name), got {value!r}."
        )
    return found


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


def class_labels(y: Any, name: str = "y", *, min_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, codes [n] int64)`` of class labels: strings, ints (or integral floats) or
    bools, one kind per call; ``codes`` index ``classes`` (sorted, as ``np.unique``).

    Probes and erasers read their labels here, so one label is accepted or refused alike by all
    of them. A list mixing kinds is refused rather than merged: numpy would turn ``[1, "1"]``
    into one class ``"1"``, and ``[True, 1]`` compare equal.

    Raises:
        ValueError: Labels not 1-D; a missing label (None, NaN); continuous values; fewer than
            ``min_classes`` classes.
        TypeError: A label of another kind (bytes, a list) or a mix of kinds.

    Example:
        >>> classes, codes = class_labels(["noun", "verb", "noun"])
        >>> classes.tolist(), codes.tolist()
        (['noun', 'verb'], [0, 1, 0])
    """
    values = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y
    array = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D [n_examples] class labels, got shape {array.shape}; pass class "
            "indices, not one-hot rows (use y.argmax(-1))."
        )
    if array.dtype == object:
        kinds = [_label_kind(v) for v in array.tolist()]
    elif array.dtype.kind == "f":
        kinds = np.where(np.isnan(array), "missing", "float").tolist()
    else:
        kind = {"b": "bool", "U": "str", "i": "int", "u": "int"}.get(array.dtype.kind, "other")
        kinds = [kind] * len(array)
    missing = [i for i, kind in enumerate(kinds) if kind == "missing"]
    if missing:
        raise ValueError(
            f"{name} has no label at rows {missing[:10]} (None or NaN); drop those rows, or give "
            "them a label."
        )
    kinds = ["int" if kind == "float" else kind for kind in kinds]  # 2.0 is class 2
    found = sorted(set(kinds))
    if "other" in found:
        row = kinds.index("other")
        raise TypeError(f"{name}[{row}] is {array[row]!r}: labels are strings, ints or bools.")
    if len(found) > 1:
        rows = ", ".join(f"row {kinds.index(k)} is {array[kinds.index(k)]!r}" for k in found)
        raise TypeError(f"{name} mixes {' and '.join(found)} labels ({rows}): use one kind.")
    floats = array.dtype == object and any(isinstance(v, (float, np.floating)) for v in array)
    if array.dtype.kind == "f" or floats:
        numbers = array.astype(np.float64)
        off = numbers != np.round(numbers)
        if off.any():
            raise ValueError(
                f"{name} holds continuous values (e.g. {numbers[off][:3].tolist()}), not class "
                "labels: bin them first (np.digitize) or pass strings, ints or bools."
            )
        array = numbers.astype(np.int64)
    elif array.dtype == object and len(array):
        array = array.astype({"str": np.str_, "bool": np.bool_, "int": np.int64}[found[0]])
    classes, codes = np.unique(array, return_inverse=True)
    if len(classes) < min_classes:
        held = f"only one class ({classes[0].item()!r})" if len(classes) else "no labels"
        raise ValueError(f"{name} has {held}; at least {min_classes} distinct ones are needed.")
    return classes, codes.ravel().astype(np.int64)


def _label_kind(value: Any) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and value != value):
        return "missing"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    return "other"
