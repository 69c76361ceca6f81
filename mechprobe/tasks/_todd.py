"""Todd et al.'s function-vector datasets as tasks.

Todd, Li, Sharma, Mueller, Wallace & Bau ("Function Vectors in Large Language Models", ICLR 2024)
ship their tasks as JSON lists of ``{"input": ..., "output": ...}`` pairs (the repository
``ericwtodd/function_vectors``, folder ``dataset_files/abstractive`` or ``extractive``; MIT
licence for their code, each dataset's own source for its data, so they are not bundled here).
Their prompts (``word_pairs_to_prompt_data`` with its defaults) are ``"Q: x\\nA: y\\n\\n"`` per
demonstration, a space before every input and output, and ``"Q: x\\nA:"`` for the query: a
task with template ``"Q: {input}\\nA:"`` and separator ``"\\n\\n"`` writes the same text.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from mechprobe.core import check_int, check_seed, warn

__all__ = ["is_todd_dataset", "todd_task_fields"]

#: Their prompt, as mechprobe's template and separator.
TEMPLATE, SEPARATOR = "Q: {input}\nA:", "\n\n"


def is_todd_dataset(data: Any) -> bool:
    """Whether parsed JSON is a Todd et al. dataset: a list of ``{"input", "output"}`` objects."""
    return (
        isinstance(data, list)
        and bool(data)
        and all(isinstance(row, dict) and {"input", "output"} <= set(row) for row in data)
    )


def todd_task_fields(
    path: str | os.PathLike[str],
    data: Any,
    *,
    name: str | None,
    kind: str | None,
    shots: int,
    seed: int,
) -> dict[str, Any]:
    """The fields of a :class:`~mechprobe.Task` for a Todd et al. dataset read from ``path``.

    Inputs are kept as written (ag_news's end in a space, as their prompts show them); outputs
    lose surrounding whitespace (a task scores its answer with one leading space: three of
    english-german's end in a space). Pairs whose input or output is empty, or whose input
    repeats an earlier one, are dropped with a warning that tells exact repeats (their conll2003
    sets repeat hundreds of rows) from inputs given another answer (the first is kept).
    ``shots`` pairs drawn with ``random.Random(seed)`` become the task's fixed demonstrations,
    the rest its items (function vectors draw their own demonstrations per prompt from the items
    with ``shots=``).
    """
    source = Path(path)
    shots = check_int(shots, "shots", 0)
    seed = check_seed(seed)
    name = name or source.stem
    if kind is None:
        folder = source.parent.name
        if folder not in ("abstractive", "extractive"):
            raise ValueError(
                f"{source}: the kind of a Todd et al. dataset is its folder's name "
                f"('abstractive' or 'extractive'), and this one is in {folder!r}: put it in a "
                "folder of either name, as their repository does, or give the kind to "
                "mp.Task.from_todd."
            )
        kind = folder
    pairs: list[list[str]] = []
    seen: dict[str, str] = {}
    empty = repeated = conflicting = 0
    for row in data:
        given, answer = str(row["input"]), str(row["output"]).strip()
        if not given.strip() or not answer:
            empty += 1
        elif given in seen:
            if seen[given] == answer:
                repeated += 1
            else:
                conflicting += 1
        else:
            seen[given] = answer
            pairs.append([given, answer])
    if empty or repeated or conflicting:
        warn(
            f"{source.name}: left out {empty} pairs with an empty input or output, {repeated} "
            f"exact repeats and {conflicting} inputs given another answer than their first "
            f"(kept); {len(pairs)} pairs remain (a task asks each input once)."
        )
    if len(pairs) <= shots:
        raise ValueError(
            f"{source}: {len(pairs)} usable pairs, not more than its {shots} demonstrations: no "
            "items would remain; give mp.Task.from_todd fewer shots."
        )
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    picked = sorted(order[:shots])
    chosen = set(picked)
    return {
        "name": name,
        "kind": kind,
        "template": TEMPLATE,
        "separator": SEPARATOR,
        "shots": [pairs[i] for i in picked],
        "items": [p for i, p in enumerate(pairs) if i not in chosen],
        "description": (
            f"Todd et al. (ICLR 2024) function-vector dataset {name!r} ({kind}), read from "
            f"{source.name}: {len(pairs)} pairs, {shots} of them (random.Random({seed})) the "
            "demonstrations; prompts as their code writes them, 'Q: x\\nA: y' separated by a "
            "blank line."
        ),
    }
