"""Every public name documents its parameters and what it returns (Google-style docstrings).

For each callable in ``mechprobe.__all__``: its ``Args:`` section names the parameters of its
signature, in order (``self`` left out; ``*args``/``**kwargs`` may be written with or without
their stars), and a function that returns something has a ``Returns:`` (or ``Yields:``) section.
A class's constructor is documented in the class docstring: ``Args:`` for a class with an
``__init__`` of its own, ``Args:`` or ``Attributes:`` for a dataclass or named tuple, whose
fields are its parameters (``Attributes:`` in any order: a result's fields are ordered by their
defaults, its docstring in the order that explains them). ``inspect.signature`` follows ``__wrapped__``, so a function wrapped
with ``functools.wraps`` is checked against the signature its users call.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

import pytest

import mechprobe as mp

#: Public names that do not follow yet, with the reason (each is an expected failure: once its
#: docstring is complete the test says so, and the name comes out of this set).
EXEMPT: dict[str, str] = {}

_SECTION = re.compile(r"^([A-Z][A-Za-z ]*):\s*$")
# "name: text", "name (type): text", "*args: text", or several names at once: "a, b: text".
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:")


def sections(doc: str | None) -> dict[str, list[str]]:
    """A docstring's sections: each header (``Args:``, ``Returns:``...) with its indented lines."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in inspect.cleandoc(doc or "").splitlines():
        if line[:1].isspace() or not line:
            if current is not None:
                current.append(line)
            continue
        header = _SECTION.match(line)
        current = found.setdefault(header.group(1), []) if header else None
    return found


def documented(lines: list[str]) -> list[str]:
    """The names an ``Args:`` or ``Attributes:`` section describes, in order, without stars.

    Its entries are the lines at the section's own indentation (deeper lines continue one); a line
    there that is not an entry is kept whole, so that it shows in the failure.
    """
    entries = [line for line in lines if line.strip()]
    if not entries:
        return []
    indent = min(len(line) - len(line.lstrip()) for line in entries)
    names: list[str] = []
    for line in entries:
        if len(line) - len(line.lstrip()) > indent:
            continue
        entry = _ENTRY.match(line.strip())
        if entry is None:
            names.append(f"<not an entry: {line.strip()!r}>")
        else:
            names.extend(name.strip().lstrip("*") for name in entry.group(1).split(","))
    return names


def parameters(obj: Any) -> list[str]:
    """The names of ``obj``'s parameters as its users pass them (no ``self``, no stars)."""
    return [name for name in inspect.signature(obj).parameters if name not in ("self", "cls")]


def returns_something(function: Any) -> bool:
    annotation = inspect.signature(function).return_annotation
    return annotation not in (None, "None", "NoReturn", "Never")


def _public() -> list[str]:
    """The public callables: functions and classes (an exception takes its message, a type alias
    such as ``LensSpec`` is no callable to document, so neither is checked)."""
    names = []
    for name in mp.__all__:
        obj = getattr(mp, name)
        if inspect.isclass(obj):
            if not issubclass(obj, BaseException):
                names.append(name)
        elif inspect.isfunction(obj):
            names.append(name)
    return names


def problems(name: str) -> list[str]:
    """What ``mechprobe.<name>``'s docstring lacks (nothing: it is complete)."""
    obj = getattr(mp, name)
    found = sections(obj.__doc__)
    where = "Args"
    if inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or hasattr(obj, "_fields")):
        where = "Args" if "Args" in found else "Attributes"
    wanted, given = parameters(obj), documented(found.get(where, []))
    if where == "Attributes":
        wanted, given = sorted(wanted), sorted(given)
    out = []
    if wanted != given:
        out.append(f"{where}: documents {given}, the signature has {wanted}")
    if (
        not inspect.isclass(obj)
        and returns_something(obj)
        and not {"Returns", "Yields"} & set(found)
    ):
        out.append(f"no Returns: section (it returns {inspect.signature(obj).return_annotation})")
    return out


PUBLIC = _public()


def test_the_check_reads_google_style() -> None:
    doc = """Summary.

    Args:
        a: First.
        b (int): Second,
            continued: still b.
        c, d: Both.
        *args: The rest.

    Returns:
        Something.
    """
    found = sections(doc)
    assert documented(found["Args"]) == ["a", "b", "c", "d", "args"]
    assert "Returns" in found


def test_every_public_callable_is_checked() -> None:
    assert {"tokenize", "patch", "Batch", "LinearProbe", "TaskItem"} <= set(PUBLIC)
    assert set(EXEMPT) <= set(PUBLIC), "an exemption names no public callable"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=EXEMPT[n]))
        if n in EXEMPT
        else n
        for n in PUBLIC
    ],
)
def test_docstring_documents_the_signature(name: str) -> None:
    assert not problems(name), f"mechprobe.{name}: " + "; ".join(problems(name))
