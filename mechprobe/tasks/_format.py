"""The task file format: field names, the item type and validation (used by ``mechprobe.tasks._task``).

Kept apart from :mod:`mechprobe.tasks._task` so that the ``Task`` class reads as what a task does, and
this module as what a task file may contain; see the ``mechprobe.tasks._task`` docstring for the format.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import NamedTuple

KINDS = ("abstractive", "extractive")
REQUIRED = ("name", "kind", "template", "shots", "items")
OPTIONAL = ("separator", "description")
FORMAT_HELP = (
    'A task file is one JSON object: {"name": str, "kind": "abstractive"|"extractive", '
    '"template": "...{input}...", "shots": [[input, output(, argument)], ...], '
    '"items": [[input, output(, argument)], ...], "separator": "\\n" (optional), '
    '"description": str (optional)}.'
)


class TaskItem(NamedTuple):
    """One example of a task: the input, the expected output and the argument (all without the
    leading space; the argument defaults to the input).

    Attributes:
        input: What the template asks about (``"Poland"``).
        output: The expected answer (``"Warsaw"``).
        argument: The token early decoding should show before the answer (``"Poland"``; a task
            file may leave it out when it is the input).

    Example:
        >>> TaskItem("Poland", "Warsaw", "Poland").output
        'Warsaw'
    """

    input: str
    output: str
    argument: str


def check_str(what: str, value: object) -> None:
    """Raise TypeError naming ``what`` unless ``value`` is a string."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__} ({value!r}).")


def check_template(name: str, template: object) -> None:
    """A template must hold ``{input}`` and no other format field."""
    check_str(f"Task {name!r}: template", template)
    assert isinstance(template, str)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"Task {name!r}: template {template!r} is not a valid format string ({err}); write "
            "literal braces as '{{' and '}}'."
        ) from err
    fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
    if not any(f == "input" for f, _, _ in fields):
        raise ValueError(
            f"Task {name!r}: template {template!r} has no '{{input}}'; put '{{input}}' where "
            "each item's input goes."
        )
    others = sorted({f"{{{f}}}" for f, spec, conv in fields if f != "input" or spec or conv})
    if others:
        raise ValueError(
            f"Task {name!r}: template {template!r} has format fields {others}; only a plain "
            "'{input}' is allowed (write literal braces as '{{' and '}}')."
        )
    if template[-1:].isspace():
        # The answer follows after the one space the task adds (" Kabul"): a trailing space made
        # "A:  Kabul" in every shot and scored " Kabul" after "A: " (accuracy 0.47 -> 0.37).
        raise ValueError(
            f"Task {name!r}: template {template!r} ends in whitespace; end it where the answer "
            "follows (e.g. 'A:'): the task puts one space before each answer."
        )


def normalise_rows(name: str, key: str, rows: object) -> tuple[TaskItem, ...]:
    """Validate ``shots`` or ``items`` rows and turn them into TaskItems (argument filled in)."""
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise TypeError(
            f"Task {name!r}: {key} must be a list of [input, output] or [input, output, "
            f"argument] lists, got {type(rows).__name__}."
        )
    out: list[TaskItem] = []
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        where = f"Task {name!r}: {key}[{index}]"
        if isinstance(row, str) or not isinstance(row, Sequence) or len(row) not in (2, 3):
            raise ValueError(
                f"{where} = {row!r} must be a list of 2 strings [input, output] or 3 strings "
                "[input, output, argument]."
            )
        for part, value in zip(("input", "output", "argument"), row, strict=False):
            if not isinstance(value, str):
                raise TypeError(
                    f"{where}: the {part} {value!r} is a {type(value).__name__}; write it as a "
                    "JSON string."
                )
            if not value.strip():
                raise ValueError(f"{where}: the {part} is empty; give it some text.")
            if part != "input" and value != value.strip():
                raise ValueError(
                    f"{where}: the {part} {value!r} has surrounding whitespace; store it without "
                    "(the leading space is added by answers() and arguments())."
                )
        # An input the template writes after "of" with its own space (" Poland") is still the
        # argument "Poland": arguments() adds the one leading space.
        item = TaskItem(row[0], row[1], row[2] if len(row) == 3 else row[0].strip())
        if item.input in seen:
            raise ValueError(
                f"{where}: the input {item.input!r} repeats {key}[{seen[item.input]}]; keep "
                "each input once."
            )
        seen[item.input] = index
        out.append(item)
    return tuple(out)


def item_to_list(item: TaskItem) -> list[str]:
    """The JSON row of an item: two strings when the argument is the input (up to surrounding
    whitespace), else three."""
    if item.argument == item.input.strip():
        return [item.input, item.output]
    return [item.input, item.output, item.argument]
