"""Your own labels from a file: :func:`load_labels` -> :class:`mechprobe.ProbingDataset`.

Formats (the file's suffix decides): JSON (a list of records), JSONL (one record per line), CSV.

- ``{"text": "I ran home", "label": "past"}``: one label per text, probed at the last token;
- ``{"text": "I ran home", "labels": ["PRON", "VERB", null]}``: one label per whitespace-separated
  word (``null`` leaves a word out), probed at each word's last sub-token;
- ``{"words": ["I", "ran", "home", "."], "labels": [...], "spaces": [true, true, false, false]}``:
  explicit words (joined by single spaces unless ``spaces`` says otherwise), or ``"text"`` with
  ``"spans"`` (``[start, end]`` character offsets of the words), as :meth:`ProbingDataset.save`
  writes;
- optional ``"group"`` / ``"groups"`` (either spelling: word types for control tasks), shaped
  like the labels, in every record or in none.

CSV: columns ``text,label`` or ``text,labels`` (space-separated per-word labels), optional
``group`` / ``groups`` (space-separated per word with ``labels``).
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
    "CSV: columns text,label or text,labels (space-separated per-word labels), optional group."
)


def _text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are an error naming the file and the place."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8 "
            f"(e.g. iconv -f latin1 -t utf-8). {_FILE_HELP}"
        ) from None


def _records_from_csv(path: Path) -> list[dict[str, Any]]:
    with io.StringIO(_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        if "text" not in fields or not fields & {"label", "labels"}:
            raise ValueError(f"{path} has columns {sorted(fields)}. {_FILE_HELP}")
        rows: list[dict[str, Any]] = []
        for row in reader:
            rec: dict[str, Any] = {"text": row["text"]}
            # Either spelling of the group column, at either level (shaped like the labels).
            group = next((row[c] for c in ("groups", "group") if c in fields), None)
            if group is not None and not group.strip():
                group = None  # a blank cell is a missing group (refused unless all are blank)
            if "labels" in fields:
                rec["labels"] = row["labels"].split()
                if group is not None:
                    rec["groups"] = group.split()
            else:
                rec["label"] = row["label"]
                if group is not None:
                    rec["group"] = group
            rows.append(rec)
        return rows


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix.lower() == ".csv":
        return _records_from_csv(path)
    text = _text(path)
    try:
        if path.suffix.lower() == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}). {_FILE_HELP}") from err
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path} must hold a list of JSON objects. {_FILE_HELP}")
    return data


def load_labels(path: str | os.PathLike[str], *, name: str | None = None) -> ProbingDataset:
    """Your own labels from a JSON, JSONL or CSV file, validated, as a :class:`ProbingDataset`.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "l.csv")
        >>> _ = open(path, "w").write("text,label\\nI ran,past\\nI run,present\\n")
        >>> load_labels(path).classes
        ('past', 'present')
    """
    path = Path(path)
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
    return ProbingDataset(
        name or path.stem,
        tuple(texts),
        tuple(labels),
        "word" if word_level else "text",
        tuple(spans) if word_level else None,
        tuple(groups) if has_groups else None,
        description=f"labels from {path}",
    )
