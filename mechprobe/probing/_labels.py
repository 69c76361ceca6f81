"""Your own labels from a file: :func:`load_labels` -> :class:`mechprobe.ProbingDataset`.

Formats (the file's suffix decides): JSON (a list of records), JSONL (one record per line), CSV
or TSV.

- ``{"text": "I ran home", "label": "past"}``: one label per text, probed at the last token;
- ``{"text": "I ran home", "labels": ["PRON", "VERB", null]}``: one label per whitespace-separated
  word (``null`` leaves a word out), probed at each word's last sub-token;
- ``{"words": ["I", "ran", "home", "."], "labels": [...], "spaces": [true, true, false, false]}``:
  explicit words (joined by single spaces unless ``spaces`` says otherwise), or ``"text"`` with
  ``"spans"`` (``[start, end]`` character offsets of the words), as :meth:`ProbingDataset.save`
  writes;
- optional ``"group"`` / ``"groups"`` (either spelling: word types for control tasks), shaped
  like the labels, in every record or in none.

CSV (or TSV): columns ``text,label`` or ``text,labels`` (space-separated per-word labels;
``null`` leaves a word out, as in JSON), optional ``group`` / ``groups`` (space-separated per word
with ``labels``). Label and group cells are stripped of surrounding spaces; a blank label cell, or
a row with more or fewer cells than the header (an unquoted comma in a text), is an error naming
its line.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from mechprobe.probing._datasets import ProbingDataset, words_text
from mechprobe.probing._selection import whitespace_words

__all__ = ["load_labels"]

_FILE_HELP = (
    "A label file is JSON (a list of records), JSONL (one record per line) or CSV. Records: "
    '{"text": ..., "label": ...} (one label per text, probed at the last token), '
    '{"text": ..., "labels": [...]} (one label per whitespace-separated word; null skips a word) '
    'or {"words": [...], "labels": [...]} (words joined by spaces); optional "group"/"groups". '
    "CSV or TSV: columns text,label or text,labels (space-separated per-word labels; null skips "
    'a word), optional group; quote texts that hold commas ("I ran, quickly",past).'
)
_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv")


def _text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and the place."""
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the text.
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8). {_FILE_HELP}"
        ) from None


def _records_from_csv(path: Path, delimiter: str = ",") -> list[dict[str, Any]]:
    with io.StringIO(_text(path), newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = [c.strip() for c in next(reader, [])]
        fields = set(header)
        if "text" not in fields or not fields & {"label", "labels"}:
            raise ValueError(f"{path} has columns {sorted(fields)}. {_FILE_HELP}")
        rows: list[dict[str, Any]] = []
        for cells in reader:
            line = reader.line_num
            if not any(c.strip() for c in cells):
                continue  # a blank line
            if len(cells) != len(header):
                raise ValueError(
                    f"{path.name} line {line} has {len(cells)} cell(s) where the header "
                    f"has {len(header)} ({cells!r}): quote a text that holds the delimiter, as "
                    f'"I ran, quickly",past. {_FILE_HELP}'
                )
            row = dict(zip(header, cells, strict=True))
            rec: dict[str, Any] = {"text": row["text"]}
            # Either spelling of the group column, at either level (shaped like the labels).
            group = next((row[c].strip() for c in ("groups", "group") if c in fields), None)
            if not group:
                group = None  # a blank cell is a missing group (refused unless all are blank)
            if "labels" in fields:
                rec["labels"] = [None if w == "null" else w for w in row["labels"].split()]
                if group is not None:
                    rec["groups"] = group.split()
            else:
                label = row["label"].strip()
                if not label:
                    raise ValueError(
                        f"{path.name} line {line}: the label cell is blank; give every text a "
                        "label, or leave the row out."
                    )
                rec["label"] = label
                if group is not None:
                    rec["group"] = group
            rows.append(rec)
        return rows


def _read_records(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"{path}: the suffix {suffix or '(none)'!r} does not say the format; name the file "
            f"{', '.join(_SUFFIXES)}. {_FILE_HELP}"
        )
    if suffix in (".csv", ".tsv"):
        return _records_from_csv(path, "," if suffix == ".csv" else "\t")
    text = _text(path)
    data: Any = []
    where = ""
    try:
        if suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                where = f" line {number}"
                if line.strip():
                    data.append(json.loads(line))
        else:
            data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}{where} is not valid JSON ({err}). {_FILE_HELP}") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of JSON objects. {_FILE_HELP}")
    return data


def load_labels(path: str | os.PathLike[str], *, name: str | None = None) -> ProbingDataset:
    """Your own labels from a JSON, JSONL or CSV file, validated, as a :class:`ProbingDataset`.

    Args:
        path: The label file (its suffix decides the format; see the module docstring).
        name: The dataset's name; default: the name its first record gives (``"dataset"``, as
            :meth:`ProbingDataset.save` writes, with ``"description"``), else the file's stem.

    Returns:
        A :class:`ProbingDataset` of the file's records, in order: text level where the
        records have ``"label"`` (one label per text), word level where they have ``"labels"``
        (one per word, with the words' character spans); with groups where every record has one.

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: No records, or a record that does not follow the formats (mixed ``label`` /
            ``labels``, no text, groups in some records only...).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "l.csv")
        >>> _ = open(path, "w").write("text,label\\nI ran,past\\nI run,present\\n")
        >>> load_labels(path).classes
        ('past', 'present')
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"No label file at {path}. {_FILE_HELP}")
    records = _read_records(path)
    if not records:
        raise ValueError(f"{path} holds no records. {_FILE_HELP}")
    word_level = "labels" in records[0]
    texts, labels, spans, groups = [], [], [], []
    for i, rec in enumerate(records):
        where = f"{path.name} record {i}"
        if ("labels" in rec) != word_level or ("label" in rec) == word_level:
            raise ValueError(
                f"{where}: records mix 'label' and 'labels' or lack both. {_FILE_HELP}"
            )
        if "words" in rec:
            spaces = rec.get("spaces", [True] * len(rec["words"]))
            if not isinstance(spaces, list) or len(spaces) != len(rec["words"]):
                raise ValueError(
                    f"{where}: 'spaces' must be a list with one true/false per word "
                    f"({len(rec['words'])} words). {_FILE_HELP}"
                )
            text, span = words_text([str(w) for w in rec["words"]], spaces)
        elif isinstance(rec.get("text"), str):
            text = rec["text"]
            span = rec.get("spans") or whitespace_words(text)
        else:
            raise ValueError(f"{where} has no 'text' string (or 'words' list). {_FILE_HELP}")
        texts.append(text)
        spans.append(tuple((int(s[0]), int(s[1])) for s in span))
        labels.append(rec["labels"] if word_level else rec["label"])
        groups.append(rec.get("groups", rec.get("group")))  # either spelling
    missing = [i for i, g in enumerate(groups) if g is None]
    if missing and len(missing) < len(groups):
        raise ValueError(
            f"{path.name}: records {missing[:10]} have no 'group' where the others have one; "
            "give every record its group (word types for the control task), or none."
        )
    has_groups = not missing
    # ProbingDataset.save puts the dataset's name and description on the first record.
    saved_name, saved_description = records[0].get("dataset"), records[0].get("description")
    return ProbingDataset(
        name or (saved_name if isinstance(saved_name, str) and saved_name else path.stem),
        tuple(texts),
        tuple(labels),
        "word" if word_level else "text",
        tuple(spans) if word_level else None,
        tuple(groups) if has_groups else None,
        description=saved_description
        if isinstance(saved_description, str) and saved_description
        else f"labels from {path}",
    )
