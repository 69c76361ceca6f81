"""Relational tasks: one JSON file each, validated, rendered into few-shot prompts.

A task file is one JSON object::

    {"name": "capitals",
     "kind": "abstractive",                      # or "extractive": the answer is in the prompt
     "template": "Q: What is the capital of {input}?\\nA:",
     "shots": [["France", "Paris"], ...],        # demonstrations, rendered before every item
     "items": [["Poland", "Warsaw"], ...],       # what is asked and scored
     "separator": "\\n",                         # optional, default "\\n"
     "description": "..."}                       # optional

An item's prompt is every shot rendered as ``template.format(input=shot_in) + " " + shot_out +
separator``, concatenated, followed by ``template.format(input=item_in)``; the expected
continuation is ``" " + item_out``.

Extension: a shot or item may have a third string, its *argument*: the token early decoding should
show before the answer (Merullo et al.'s argument stage). It defaults to the input, which is right
for ``["Poland", "Warsaw"]``; it must be given when the input is not the argument, e.g.
``["On the desk, I see a brown mug ... What color is the mug?", "Brown", "brown"]`` or
``["the Netherlands", "Amsterdam", "Netherlands"]``. Outputs and arguments are stored without the
leading space; :meth:`Task.answers` and :meth:`Task.arguments` add it.

A shot whose input is also an item's input puts that item's answer in its own prompt: this is
allowed (some studies want it) but warns, naming the inputs, because it usually is a mistake.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from mechprobe.core import as_int, check_seed, warn
from mechprobe.tasks._format import (
    FORMAT_HELP,
    KINDS,
    OPTIONAL,
    REQUIRED,
    TaskItem,
    check_str,
    check_template,
    item_to_list,
    normalise_rows,
)
from mechprobe.tasks._todd import is_todd_dataset, todd_task_fields

Kind = Literal["abstractive", "extractive"]


@dataclass(frozen=True)
class Task:
    """A relational task: a template, demonstrations (shots) and the items to ask.

    Construct it with :func:`load_task`, :meth:`Task.from_json`, :meth:`Task.from_dict`, or
    directly (shots and items may be lists of 2- or 3-element lists; they are validated and
    stored as tuples of :class:`TaskItem`).

    Attributes:
        name: A short name (``"capitals"``), non-empty.
        kind: ``"abstractive"`` (the answer must be recalled) or ``"extractive"`` (the answer is
            in the prompt).
        template: The question, with an ``{input}`` field (``"Q: What is the capital of
            {input}?\\nA:"``).
        shots: The demonstrations rendered before every item, as :class:`TaskItem` (given as
            ``[input, output]`` or ``[input, output, argument]`` lists), possibly none.
        items: The items asked and scored, in the same forms; at least one.
        separator: The text after each demonstration's answer (default ``"\\n"``).
        description: Free text about the task.

    Example:
        >>> task = Task("toy", "abstractive", "Q: capital of {input}?\\nA:",
        ...             shots=[["France", "Paris"]], items=[["Poland", "Warsaw"]])
        >>> task.prompts()
        ['Q: capital of France?\\nA: Paris\\nQ: capital of Poland?\\nA:']
        >>> task.answers(), task.arguments()
        ([' Warsaw'], [' Poland'])
    """

    name: str
    kind: Kind
    template: str
    shots: tuple[TaskItem, ...]
    items: tuple[TaskItem, ...]
    separator: str = "\n"
    description: str = ""
    _prefix: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_str("name", self.name)
        if not self.name:
            raise ValueError("Task name is empty: give the task a short name, e.g. 'capitals'.")
        if self.kind not in KINDS:
            raise ValueError(
                f"Task {self.name!r}: kind {self.kind!r} is not allowed; use 'abstractive' (the "
                "answer must be recalled) or 'extractive' (the answer is in the prompt)."
            )
        check_template(self.name, self.template)
        check_str(f"Task {self.name!r}: separator", self.separator)
        check_str(f"Task {self.name!r}: description", self.description)
        shots = normalise_rows(self.name, "shots", self.shots)
        items = normalise_rows(self.name, "items", self.items)
        if not items:
            raise ValueError(
                f"Task {self.name!r} has no items: add at least one [input, output] pair to "
                '"items".'
            )
        overlap = sorted({s.input for s in shots} & {i.input for i in items})
        if overlap:
            warn(
                f"Task {self.name!r}: shots and items share inputs {overlap[:5]}"
                f"{' ...' if len(overlap) > 5 else ''}; those items see their own answer in the "
                "prompt. Remove them from the items or pick other shots if that is unintended.",
                UserWarning,
            )
        object.__setattr__(self, "shots", shots)
        object.__setattr__(self, "items", items)
        prefix = _demonstrations(self, [s.output for s in shots])
        object.__setattr__(self, "_prefix", prefix)

    def __len__(self) -> int:
        return len(self.items)

    # --- prompts -------------------------------------------------------------------------------

    def prompt(self, input: str, *, shot_outputs: Sequence[str] | None = None) -> str:
        """The few-shot prompt for one input (which need not be one of the items).

        Args:
            input: The input asked about.
            shot_outputs: The answers the demonstrations show, in shot order, in place of
                their own (a corrupted prompt: function vectors' shuffled labels); None: their
                own.

        Returns:
            The demonstrations, each ``template.format(input=...) + " " + answer + separator``,
            followed by ``template.format(input=input)``.

        Raises:
            ValueError: ``shot_outputs`` does not have one answer per shot.
            TypeError: ``shot_outputs`` is one string.

        Example:
            >>> load_task("capitals").with_shots(1).prompt("Poland")
            'Q: What is the capital of France?\\nA: Paris\\nQ: What is the capital of Poland?\\nA:'
        """
        check_str("prompt input", input)
        prefix = self._prefix
        if shot_outputs is not None:
            if isinstance(shot_outputs, str):
                raise TypeError(
                    "shot_outputs is one answer per demonstration, a list of strings, not one "
                    f"string ({shot_outputs!r} would be read a character at a time)."
                )
            for k, answer in enumerate(shot_outputs):
                check_str(f"shot_outputs[{k}]", answer)
            if len(shot_outputs) != len(self.shots):
                raise ValueError(
                    f"shot_outputs has {len(shot_outputs)} answers for {len(self.shots)} "
                    f"demonstrations of task {self.name!r}: pass one per shot."
                )
            prefix = _demonstrations(self, shot_outputs)
        return prefix + self.template.format(input=input)

    def prompts(self) -> list[str]:
        """One prompt per item, in item order.

        Example:
            >>> len(load_task("capitals").prompts()) == len(load_task("capitals"))
            True
        """
        return [self.prompt(item.input) for item in self.items]

    def inputs(self) -> list[str]:
        """The items' inputs, as written in the file.

        Example:
            >>> load_task("capitals").inputs()[:2]
            ['Afghanistan', 'Albania']
        """
        return [item.input for item in self.items]

    def answers(self) -> list[str]:
        """The expected continuations, with the leading space (``" Warsaw"``).

        Example:
            >>> load_task("capitals").answers()[:2]
            [' Kabul', ' Tirana']
        """
        return [" " + item.output for item in self.items]

    def arguments(self) -> list[str]:
        """The items' arguments, with the leading space (``" Poland"``, ``" brown"``).

        Example:
            >>> load_task("uppercase").arguments()[:1]
            [' red']
        """
        return [" " + item.argument for item in self.items]

    # --- derived tasks -------------------------------------------------------------------------

    def with_shots(self, n: int) -> Task:
        """The same task with only its first ``n`` shots (``0`` gives zero-shot prompts).

        Args:
            n: The number of shots kept, from 0 to ``len(self.shots)``.

        Returns:
            A new :class:`Task` with the same items.

        Raises:
            ValueError: ``n`` is not an int in that range.

        Example:
            >>> len(load_task("capitals").with_shots(3).shots)
            3
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(self.shots):
            raise ValueError(
                f"Task {self.name!r} has {len(self.shots)} shots; with_shots needs an int "
                f"between 0 and {len(self.shots)}, got {n!r}."
            )
        return self._replace(shots=self.shots[:n])

    def subset(self, n: int | Sequence[int], *, seed: int = 0) -> Task:
        """A task with fewer items: ``n`` drawn at random (kept in file order), or given indices.

        Args:
            n: how many items to draw without replacement, or a sequence of item indices (kept
                in the order given).
            seed: seed of the draw (ignored for indices).

        Returns:
            A new :class:`Task` with the same shots and the chosen items.

        Example:
            >>> load_task("capitals").subset(10, seed=0) == load_task("capitals").subset(10, seed=0)
            True
        """

        seed = check_seed(seed)
        if isinstance(n, (bool, np.bool_)):
            raise TypeError("subset takes an int count or a sequence of int indices, not a bool.")
        count = as_int(n)  # numpy and 0-d tensor integers are counts too
        if count is not None:
            if not 1 <= count <= len(self.items):
                raise ValueError(
                    f"Task {self.name!r} has {len(self.items)} items; ask for between 1 and "
                    f"{len(self.items)}, got {count}."
                )
            rng = np.random.default_rng(seed)
            chosen = np.sort(rng.choice(len(self.items), count, replace=False))
            return self._replace(items=tuple(self.items[int(i)] for i in chosen))
        indices = list(cast(Sequence[int], n))  # not a count: as_int read every integer above
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if bad or not indices:
            raise TypeError(
                f"subset indices must be a non-empty sequence of ints, got {list(indices)[:5]!r}."
            )
        out_of_range = [i for i in indices if not -len(self.items) <= i < len(self.items)]
        if out_of_range:
            raise ValueError(
                f"Task {self.name!r} has {len(self.items)} items; indices {out_of_range[:5]} are "
                "out of range."
            )
        if len({int(i) % len(self.items) for i in indices}) != len(indices):
            raise ValueError("subset indices repeat an item; pass each index once.")
        return self._replace(items=tuple(self.items[int(i)] for i in indices))

    def split(self, test_size: float | int = 0.25, *, seed: int = 0) -> tuple[Task, Task]:
        """Split the items into (train, test) tasks with disjoint inputs (item inputs are unique),
        e.g. to fit an o-vector or an offset on train and evaluate on held-out items.

        The split is by item: a task whose items repeat an *argument* (``uppercase``: 200
        items over 13 colours) has the same arguments on both sides.
        :func:`mechprobe.relational_analysis` splits by argument for its held-out contexts.

        Args:
            test_size: a fraction in (0, 1) or a count of test items; both parts keep >= 1 item.
            seed: seed of the shuffle.

        Returns:
            ``(train, test)``: two tasks with this task's shots, the items divided between them
            (each in file order), ``test`` with ``test_size`` of them.

        Example:
            >>> train, test = load_task("capitals").split(0.25, seed=0)
            >>> set(train.inputs()).isdisjoint(test.inputs())
            True
        """

        seed = check_seed(seed)
        total = len(self.items)
        if isinstance(test_size, (bool, np.bool_)):
            raise TypeError("test_size is a fraction in (0, 1) or an int count, not a bool.")
        # A count computed with numpy (len(a) // 2 of an array, a pandas column) or torch is a
        # count as well: as_int reads them as the int they hold.
        count = as_int(test_size)
        if count is not None:
            n_test = count
        elif isinstance(test_size, float) and 0.0 < test_size < 1.0:
            n_test = round(test_size * total)
        else:
            raise ValueError(
                f"test_size must be a fraction in (0, 1) or an int, got {test_size!r}."
            )
        if not 1 <= n_test <= total - 1:
            kept = (
                f"asks for {n_test} test items"
                if n_test > total
                else f"leaves {n_test} test and {total - n_test} train items"
            )
            raise ValueError(
                f"Task {self.name!r} has {total} items: test_size={test_size!r} {kept}; both "
                f"need at least one (pass a count from 1 to {total - 1}, or a fraction)."
            )
        order = np.random.default_rng(seed).permutation(total)
        test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
        return (
            self._replace(items=tuple(self.items[int(i)] for i in train_idx)),
            self._replace(items=tuple(self.items[int(i)] for i in test_idx)),
        )

    def _replace(self, **changes: Any) -> Task:
        fields = self.to_dict() | changes
        return Task(**fields)

    # --- (de)serialisation ---------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The task as a JSON-ready dict (an argument equal to the input is left out).

        Example:
            >>> Task.from_dict(load_task("capitals").to_dict()) == load_task("capitals")
            True
        """
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "template": self.template,
            "separator": self.separator,
            "shots": [item_to_list(s) for s in self.shots],
            "items": [item_to_list(i) for i in self.items],
        }

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write the task as a JSON file (UTF-8, one item per line) and return its path.

        Args:
            path: The file to write (``~`` is expanded; an existing file is replaced).

        Returns:
            The path written.

        Example:
            >>> import tempfile, os
            >>> path = load_task("capitals").to_json(os.path.join(tempfile.mkdtemp(), "c.json"))
            >>> load_task(path) == load_task("capitals")
            True
        """
        path = Path(path).expanduser()
        data = self.to_dict()
        head = {k: v for k, v in data.items() if k not in ("shots", "items")}
        lines = [json.dumps(head, ensure_ascii=False, indent=2)[:-2] + ","]
        for key in ("shots", "items"):
            rows = ",\n".join("    " + json.dumps(r, ensure_ascii=False) for r in data[key])
            lines.append(f'  "{key}": [\n{rows}\n  ]' + ("," if key == "shots" else ""))
        path.write_text("\n".join([*lines, "}"]) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Task:
        """Build a task from a parsed task file, validating every field.

        Args:
            data: The task file's object: ``name``, ``kind``, ``template``, ``shots`` and
                ``items``, optionally ``separator`` and ``description`` (see the module
                docstring).

        Returns:
            The validated :class:`Task`.

        Raises:
            TypeError: ``data`` is not a mapping.
            ValueError: A field is unknown, missing or invalid.

        Example:
            >>> Task.from_dict({"name": "t", "kind": "abstractive", "template": "{input} ->",
            ...                 "shots": [], "items": [["a", "A"]]}).prompts()
            ['a ->']
        """
        if not isinstance(data, Mapping):
            todd = (
                " (a list is read as one of Todd et al.'s datasets when every entry is an object "
                'with "input" and "output")'
                if isinstance(data, list)
                else ""
            )
            raise TypeError(
                f"A task must be a JSON object, got {type(data).__name__}{todd}. {FORMAT_HELP}"
            )
        label = data.get("name", "<unnamed>")
        unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise ValueError(
                f"Task {label!r} has unknown fields {unknown}; remove them (allowed: "
                f"{', '.join(REQUIRED + OPTIONAL)})."
            )
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise ValueError(f"Task {label!r} is missing fields {missing}. {FORMAT_HELP}")
        return cls(**{k: data[k] for k in REQUIRED + OPTIONAL if k in data})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Task:
        """Read and validate a task file.

        Args:
            path: A mechprobe task file, or one of Todd et al.'s datasets (read by
                :meth:`from_todd` with its defaults).

        Returns:
            The validated :class:`Task`.

        Raises:
            ValueError: The file is not UTF-8 text, not JSON, or not a valid task; the message
                names the file.

        Example:
            >>> import tempfile, os
            >>> path = load_task("past_tense").to_json(os.path.join(tempfile.mkdtemp(), "p.json"))
            >>> Task.from_json(path).name
            'past_tense'
        """
        path = Path(path).expanduser()
        data = _parsed(path)
        if is_todd_dataset(data):  # a list of {"input", "output"} pairs: Todd et al.'s format
            return cls.from_todd(path)
        return cls.from_dict(data)

    @classmethod
    def from_todd(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        kind: Kind | None = None,
        shots: int = 10,
        seed: int = 0,
    ) -> Task:
        """Read one of Todd et al.'s function-vector datasets (``dataset_files/abstractive/
        antonym.json`` of ``ericwtodd/function_vectors``: a JSON list of ``{"input", "output"}``
        pairs) as a task whose prompts are the ones their code writes (``"Q: x\\nA: y"``
        separated by blank lines). :func:`load_task` and :meth:`from_json` read such a file
        this way too, with the defaults.

        Args:
            path: The dataset file.
            name: The task's name (default: the file's stem, ``"antonym"``).
            kind: ``"abstractive"`` or ``"extractive"`` (default: the file's folder, as their
                repository sorts them; another folder needs it).
            shots: Pairs kept as the task's fixed demonstrations (Todd et al. show 10); the
                rest are its items.
            seed: Seed of the draw of those demonstrations.

        Returns:
            The :class:`Task`, with template ``"Q: {input}\\nA:"`` and blank lines between
            demonstrations.

        Raises:
            ValueError: Not UTF-8 JSON, not a list of input/output pairs, a kind that cannot be
                told, or no items left after ``shots``.

        Warns:
            UserWarning: Pairs with an empty side or a repeated input were left out.

        Example:
            >>> import json, os, tempfile
            >>> folder = os.path.join(tempfile.mkdtemp(), "abstractive")
            >>> os.mkdir(folder)
            >>> path = os.path.join(folder, "antonym.json")
            >>> pairs = [("hot", "cold"), ("up", "down"), ("big", "small"), ("wet", "dry")]
            >>> _ = open(path, "w").write(json.dumps([{"input": a, "output": b} for a, b in pairs]))
            >>> task = Task.from_todd(path, shots=2)
            >>> task.name, task.kind, len(task)
            ('antonym', 'abstractive', 2)
            >>> task.prompts()[0]
            'Q: hot\\nA: cold\\n\\nQ: big\\nA: small\\n\\nQ: up\\nA:'
        """
        source = Path(path).expanduser()
        data = _parsed(source)
        if not is_todd_dataset(data):
            raise ValueError(
                f"{source} is not one of Todd et al.'s datasets: a JSON list of "
                '{"input": ..., "output": ...} objects. A mechprobe task file is read by '
                "Task.from_json."
            )
        fields = todd_task_fields(source, data, name=name, kind=kind, shots=shots, seed=seed)
        return cls.from_dict(fields)


def _parsed(path: Path) -> Any:
    """The JSON in ``path``; a file that is not UTF-8 JSON is named in the error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save the task file "
            f"as UTF-8. {FORMAT_HELP}"
        ) from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {FORMAT_HELP}") from err


def _demonstrations(task: Task, outputs: Sequence[str]) -> str:
    """The prompt's prefix: each shot asked by the template and answered by ``outputs[k]``."""
    return "".join(
        task.template.format(input=shot.input) + " " + answer + task.separator
        for shot, answer in zip(task.shots, outputs, strict=True)
    )


def list_tasks() -> list[str]:
    """The names of the built-in tasks (the JSON files in ``mechprobe/tasks/data``), sorted.

    Returns:
        The names, each accepted by :func:`load_task` (``"capitals"``...).

    Example:
        >>> "capitals" in list_tasks()
        True
    """
    data = resources.files("mechprobe.tasks").joinpath("data")
    return sorted(p.name[: -len(".json")] for p in data.iterdir() if p.name.endswith(".json"))


def load_task(name_or_path: str | os.PathLike[str]) -> Task:
    """A built-in task by name (see :func:`list_tasks`) or a task JSON file by path: a mechprobe
    task file, or one of Todd et al.'s function-vector datasets (a list of ``{"input",
    "output"}`` pairs, read by :meth:`Task.from_todd` with its defaults).

    Args:
        name_or_path: A name of :func:`list_tasks`, or the path of a task file (a string or
            path-like; ``~`` is expanded). A built-in name wins over a file of the same name.

    Returns:
        The validated :class:`Task`.

    Raises:
        TypeError: ``name_or_path`` is neither a string nor a path.
        ValueError: No built-in task and no file of that name (the message suggests close
            names), or a file that is not a valid task.

    Example:
        >>> load_task("capitals").kind
        'abstractive'
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_task takes a task name or a path, got {type(name_or_path).__name__}."
        )
    text = os.fspath(name_or_path)
    if text in list_tasks():
        source = resources.files("mechprobe.tasks").joinpath("data", f"{text}.json")
        return Task.from_dict(json.loads(source.read_text(encoding="utf-8")))
    path = Path(text).expanduser()
    if path.is_file():
        return Task.from_json(path)
    close = difflib.get_close_matches(text, list_tasks(), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"No built-in task or file named {text!r}.{hint} Built-in tasks: "
        f"{', '.join(list_tasks())}; or pass the path of a JSON task file. {FORMAT_HELP}"
    )


def as_task(task: Task | str | os.PathLike[str]) -> Task:
    """A :class:`Task` from a task, a built-in name or a path (errors name the fix).

    Example:
        >>> as_task("capitals").name
        'capitals'
    """
    if isinstance(task, Task):
        return task
    if isinstance(task, (str, os.PathLike)):
        return load_task(task)
    raise TypeError(
        f"Expected a Task, a built-in task name or a task file path, got {type(task).__name__}; "
        "e.g. mp.load_task('capitals')."
    )
