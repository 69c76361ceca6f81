"""Probing datasets: texts with a label per text or per word, and word types for control tasks.

A :class:`ProbingDataset` is what :func:`mechprobe.collect` turns into labelled activations:

- text level (``level="text"``): one label per text, read at the last token (``positions=-1``);
- word level (``level="word"``): words as character spans of each text, one label per word (None:
  not probed), read at each word's last sub-token (``positions="word_last"``, which ``-1`` means
  for word-level data).

Loaders: :func:`pos_dataset` here (English sentences tagged with spaCy's ``en_core_web_sm`` 3.8,
shipped as data); :func:`mechprobe.load_labels` (your own JSON, JSONL or CSV file, in
:mod:`mechprobe.probing._labels`); :mod:`mechprobe.probing._templated` (templated sentences with exact labels,
relational-task prompts: ``templated_dataset``, ``country_dataset``).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from mechprobe.core import check_seed, warn
from mechprobe.probing._selection import _is_label, _label, whitespace_words

__all__ = ["ProbingDataset", "pos_dataset"]

Level = Literal["text", "word"]


@dataclass(frozen=True, repr=False)
class ProbingDataset:
    """Texts with a label per text or per word, optional word spans and groups (word types).

    Args:
        name: Short name, used in results.
        texts: The texts.
        labels: Per text, one label (``level="text"``) or a tuple of per-word labels (``"word"``;
            None skips a word). Labels are all str, all int or all bool.
        level: ``"text"`` or ``"word"``.
        words: Word level only: per text, ``(start, end)`` character spans of its words; default:
            the maximal runs of non-whitespace characters.
        groups: Shaped like ``labels``: the word type of each example (control tasks give each
            group one random label). Default: the lower-cased word (word level), none (text level).
        description: Where the data comes from.

    Example:
        >>> ds = ProbingDataset("toy", ["a cat", "the dog"], [("DET", "NOUN"), ("DET", "NOUN")],
        ...                     level="word")
        >>> ds.positions, ds.classes, ds.n_examples, ds.groups
        ('word_last', ('DET', 'NOUN'), 4, (('a', 'cat'), ('the', 'dog')))
        >>> ds
        ProbingDataset('toy', 2 texts, word level, 4 examples, 2 classes)
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[Any, ...]
    level: Level = "text"
    words: tuple[tuple[tuple[int, int], ...], ...] | None = None
    groups: tuple[Any, ...] | None = None
    description: str = ""

    def __post_init__(self) -> None:
        texts = (self.texts,) if isinstance(self.texts, str) else tuple(self.texts)
        if not texts:
            raise ValueError(f"Dataset {self.name!r} has no texts: pass at least two examples.")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise ValueError(
                    f"Dataset {self.name!r}: text {i} is {t!r}; pass non-empty strings."
                )
        if self.level not in ("text", "word"):
            raise ValueError(f"level must be 'text' or 'word', got {self.level!r}.")
        labels = self._per_text("labels", self.labels, texts)
        words = None
        if self.level == "word":
            words = self._spans(texts, labels)
        elif self.words is not None:
            raise ValueError("words= only applies to level='word' datasets.")
        groups = None if self.groups is None else self._per_text("groups", self.groups, texts)
        if groups is None and words is not None:
            groups = tuple(
                tuple(t[a:b].lower() for a, b in w) for t, w in zip(texts, words, strict=True)
            )
        if groups is not None:
            self._same_shape(labels, groups)
        object.__setattr__(self, "texts", texts)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "groups", groups)
        flat = self._flat(labels)
        kinds = {
            "str" if isinstance(v, str) else "bool" if isinstance(v, bool) else "int" for v in flat
        }
        if len(kinds) > 1:
            # The probes (core.class_labels) refuse a mix too; here the message names the dataset.
            mixed = " and ".join(k for k in ("str", "int", "bool") if k in kinds)
            raise TypeError(f"Dataset {self.name!r} mixes {mixed} labels: use one type.")
        if len(set(flat)) < 2:
            raise ValueError(
                f"Dataset {self.name!r} has {len(set(flat))} class ({sorted(set(flat))[:3]}); a "
                "probe needs at least two: add examples of another label."
            )

    # --- validation helpers --------------------------------------------------------------------

    def _per_text(self, what: str, values: Any, texts: tuple[str, ...]) -> tuple[Any, ...]:
        values = tuple(values)
        if len(values) != len(texts):
            raise ValueError(
                f"Dataset {self.name!r}: {len(texts)} texts but {len(values)} {what}: pass one "
                "entry per text."
            )
        out = []
        for i, v in enumerate(values):
            if self.level == "text":
                if not _is_label(v):
                    raise TypeError(
                        f"Dataset {self.name!r}: {what}[{i}] is {v!r}; a text-level dataset "
                        "takes one str, int or bool per text."
                    )
                out.append(_label(v))
            else:
                if isinstance(v, str) or not isinstance(v, (Sequence, np.ndarray)):
                    raise TypeError(
                        f"Dataset {self.name!r}: {what}[{i}] is {v!r}; a word-level dataset "
                        "takes a list per text with one entry per word."
                    )
                bad = [x for x in v if x is not None and not _is_label(x)]
                if bad:
                    raise TypeError(f"Dataset {self.name!r}: {what}[{i}] holds {bad[0]!r}.")
                out.append(tuple(None if x is None else _label(x) for x in v))
        return tuple(out)

    def _spans(self, texts: tuple[str, ...], labels: tuple[Any, ...]) -> tuple[Any, ...]:
        spans = self.words if self.words is not None else [whitespace_words(t) for t in texts]
        if len(spans) != len(texts):
            raise ValueError(
                f"Dataset {self.name!r}: {len(spans)} word lists for {len(texts)} texts."
            )
        out = []
        for i, (text, row, lab) in enumerate(zip(texts, spans, labels, strict=True)):
            row = tuple((int(a), int(b)) for a, b in row)
            if len(row) != len(lab):
                raise ValueError(
                    f"Dataset {self.name!r}: text {i} has {len(row)} words but {len(lab)} labels "
                    f"({text[:50]!r}); pass one label per word (None to skip one)."
                )
            end = 0
            for a, b in row:
                if not end <= a < b <= len(text):
                    raise ValueError(
                        f"Dataset {self.name!r}: word span ({a}, {b}) of text {i} is empty, "
                        "overlaps the previous word or runs past the text: pass increasing, "
                        "non-overlapping (start, end) character spans."
                    )
                end = b
            out.append(row)
        return tuple(out)

    def _same_shape(self, labels: tuple[Any, ...], groups: tuple[Any, ...]) -> None:
        if self.level == "word":
            for i, (a, b) in enumerate(zip(labels, groups, strict=True)):
                if len(a) != len(b):
                    raise ValueError(
                        f"Dataset {self.name!r}: text {i} has {len(a)} labels but {len(b)} groups."
                    )

    def _flat(self, values: tuple[Any, ...]) -> list[Any]:
        if self.level == "text":
            return list(values)
        return [v for row in values for v in row if v is not None]

    # --- views ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.texts)

    def __repr__(self) -> str:
        return (
            f"ProbingDataset({self.name!r}, {len(self.texts)} texts, {self.level} level, "
            f"{self.n_examples} examples, {len(self.classes)} classes)"
        )

    @property
    def positions(self) -> int | str:
        """Where :func:`mechprobe.collect` reads it: ``-1`` (the last token) or ``"word_last"``."""
        return -1 if self.level == "text" else "word_last"

    @property
    def select(self) -> str:
        """Deprecated (one release): ``"last"`` or ``"word_last"``; say :attr:`positions`."""
        warn(
            "ProbingDataset.select is deprecated: say .positions (-1 or 'word_last').",
            DeprecationWarning,
        )
        return "last" if self.level == "text" else "word_last"

    @property
    def classes(self) -> tuple[Any, ...]:
        """The sorted distinct labels."""
        return tuple(sorted(set(self._flat(self.labels))))

    @property
    def n_examples(self) -> int:
        """Labelled examples: texts (text level) or labelled words (word level)."""
        return len(self._flat(self.labels))

    def counts(self) -> dict[Any, int]:
        """Examples per label, most frequent first.

        Example:
            >>> ProbingDataset("t", ["a", "b", "c"], ["x", "y", "x"]).counts()
            {'x': 2, 'y': 1}
        """
        return dict(Counter(self._flat(self.labels)).most_common())

    def summary(self) -> pd.DataFrame:
        """Examples per label, most frequent first, with their share.

        Example:
            >>> ProbingDataset("t", ["a", "b", "c"], ["x", "y", "x"]).summary()["examples"].tolist()
            [2, 1]
        """
        counts = self.counts()
        total = sum(counts.values())
        return pd.DataFrame(
            {
                "label": list(counts),
                "examples": list(counts.values()),
                "share": [v / total for v in counts.values()],
            }
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per labelled example: text_index, word (or text), label, group.

        Example:
            >>> ProbingDataset("t", ["a", "b"], ["x", "y"]).to_frame().label.tolist()
            ['x', 'y']
        """
        rows = []
        for i, text in enumerate(self.texts):
            groups = self.groups[i] if self.groups is not None else None
            if self.level == "text":
                rows.append(
                    {"text_index": i, "word": text, "label": self.labels[i], "group": groups}
                )
                continue
            assert self.words is not None
            for j, ((a, b), lab) in enumerate(zip(self.words[i], self.labels[i], strict=True)):
                if lab is not None:
                    grp = groups[j] if groups is not None else None
                    rows.append({"text_index": i, "word": text[a:b], "label": lab, "group": grp})
        return pd.DataFrame(rows, columns=["text_index", "word", "label", "group"])

    def subset(self, indices: Sequence[int]) -> ProbingDataset:
        """The dataset restricted to the texts ``indices`` (in the order given).

        Args:
            indices: Indices of the texts kept (each an int; the order given is kept).

        Returns:
            A new :class:`ProbingDataset` of those texts with their labels, words and groups.

        Example:
            >>> ProbingDataset("t", ["a", "b", "c"], ["x", "y", "x"]).subset([2, 1]).texts
            ('c', 'b')
        """
        idx = [int(i) for i in indices]

        def pick(values: tuple[Any, ...]) -> tuple[Any, ...]:
            return tuple(values[i] for i in idx)

        # The description names the whole dataset ("817 sentences ..."): say what was kept.
        kept = f" ({len(idx)} of its {len(self.texts)} texts)" if len(idx) != len(self) else ""
        return ProbingDataset(
            self.name,
            pick(self.texts),
            pick(self.labels),
            self.level,
            None if self.words is None else pick(self.words),
            None if self.groups is None else pick(self.groups),
            (self.description + kept).strip(),
        )

    def sample(self, max_examples: int, *, seed: int = 0) -> ProbingDataset:
        """Random texts (kept in file order) with at most ``max_examples`` labelled examples.

        Args:
            max_examples: The most labelled examples kept (at least 2): texts, or labelled words.
            seed: Seed of the draw.

        Returns:
            A new :class:`ProbingDataset` of the texts drawn, in their order here.

        Raises:
            ValueError: ``max_examples`` is under 2.

        Example:
            >>> pos_dataset().sample(200, seed=0).n_examples <= 200
            True
        """

        seed = check_seed(seed)
        if max_examples < 2:
            raise ValueError(f"max_examples must be at least 2, got {max_examples}.")
        sizes = [1 if self.level == "text" else sum(v is not None for v in r) for r in self.labels]
        chosen, total = [], 0
        for i in np.random.default_rng(seed).permutation(len(self.texts)).tolist():
            if total + sizes[i] > max_examples:
                continue
            chosen.append(i)
            total += sizes[i]
        return self.subset(sorted(chosen))

    def drop_rare(self, min_count: int) -> ProbingDataset:
        """Leave out labels with fewer than ``min_count`` examples (words: unlabelled; texts: removed).

        Args:
            min_count: The fewest examples a label keeps.

        Returns:
            A new :class:`ProbingDataset`: text level without the texts of rarer labels, word level
            with those words' labels None.

        Example:
            >>> ProbingDataset("t", ["a", "b", "c", "d"], ["x", "x", "y", "z"]).drop_rare(2).counts()
            Traceback (most recent call last):
            ...
            ValueError: Dataset 't' has 1 class (['x']); a probe needs at least two: add examples of another label.
        """
        keep = {k for k, v in self.counts().items() if v >= min_count}
        if self.level == "text":
            return self.subset([i for i, v in enumerate(self.labels) if v in keep])
        labels = tuple(tuple(v if v in keep else None for v in row) for row in self.labels)
        return ProbingDataset(
            self.name, self.texts, labels, self.level, self.words, self.groups, self.description
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Deprecated (one release): say :meth:`save`.

        Args:
            path: As for :meth:`save`.

        Returns:
            The path written.
        """
        warn(
            "ProbingDataset.to_json(path) is deprecated: say .save(path).",
            DeprecationWarning,
        )
        return self.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, name: str | None = None) -> ProbingDataset:
        """Read a label file (JSON, JSONL or CSV): :func:`mechprobe.load_labels`.

        Args:
            path: The label file.
            name: The dataset's name (default: the one the file records, else its stem).

        Returns:
            The :class:`ProbingDataset`.
        """
        from mechprobe.probing._labels import load_labels

        return load_labels(path, name=name)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the dataset as a label file that :meth:`load` reads back: JSONL (``*.jsonl``,
        one record per line) or JSON (``*.json``, a list of records); word level keeps its
        words, and the first record the dataset's name and description (``"dataset"``,
        ``"description"``).

        Args:
            path: The file to write, ending in ``.jsonl`` or ``.json`` (its folder must exist).

        Returns:
            The path written.

        Example:
            >>> import tempfile, os
            >>> ds = ProbingDataset("t", ["a b", "c"], [("x", "y"), ("x",)], level="word")
            >>> back = ProbingDataset.load(ds.save(os.path.join(tempfile.mkdtemp(), "d.jsonl")))
            >>> back.name, back.labels
            ('t', (('x', 'y'), ('x',)))

        Raises:
            ValueError: Another suffix (a ``.json`` or ``.npz`` name was written as JSONL,
                which :meth:`load` then could not read).
            FileNotFoundError: The folder does not exist.
        """
        path = Path(path).expanduser()
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(
                f"ProbingDataset.save writes a label file: name it *.jsonl or *.json, not "
                f"{path.name!r} (e.g. {path.with_suffix('.jsonl').name!r})."
            )
        if not path.parent.is_dir():
            raise FileNotFoundError(
                f"Cannot write {path}: the folder {path.parent} does not exist; create it first."
            )
        records = []
        for i, text in enumerate(self.texts):
            rec: dict[str, Any] = {"text": text}
            if self.level == "text":
                rec["label"] = self.labels[i]
            else:
                assert self.words is not None
                rec["spans"] = [list(s) for s in self.words[i]]
                rec["labels"] = list(self.labels[i])
            if self.groups is not None:
                grp = self.groups[i]
                rec["group" if self.level == "text" else "groups"] = (
                    grp if self.level == "text" else list(grp)
                )
            records.append(rec)
        # The name and description ride on the first record (other readers ignore the keys).
        records[0] = {"dataset": self.name, "description": self.description, **records[0]}
        with path.open("w", encoding="utf-8") as handle:
            if path.suffix == ".json":
                json.dump(records, handle, ensure_ascii=False, indent=1)
                handle.write("\n")
            else:
                handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        return path


# --- loaders -------------------------------------------------------------------------------------


def words_text(words: Sequence[str], spaces: Sequence[bool]) -> tuple[str, list[tuple[int, int]]]:
    """Join words (each followed by a space where ``spaces`` says so) and return their spans."""
    parts, spans, pos = [], [], 0
    for word, space in zip(words, spaces, strict=True):
        spans.append((pos, pos + len(word)))
        parts.append(word + (" " if space else ""))
        pos += len(word) + (1 if space else 0)
    return "".join(parts).rstrip(" "), spans


def pos_dataset(*, min_count: int = 10, max_sentences: int | None = None) -> ProbingDataset:
    """Part of speech: English sentences tagged by spaCy ``en_core_web_sm`` 3.8 (coarse UPOS tags).

    The sentences were written for mechprobe in several registers (news, narrative, technical,
    dialogue, ...) and tagged offline by ``scripts/tag_pos.py`` (needs the ``pos`` extra); the tags
    ship in ``mechprobe/probing/data/pos_sentences.jsonl``, so no tagger is needed here. Groups are the
    lower-cased words (for control tasks); Hewitt & Liang key their control task by the word as
    written, so "The" and "the" are two types there and one here: pass ``groups=`` to a
    :class:`ProbingDataset` of these texts to key by case. Tags are the tagger's, not hand-checked
    gold labels.

    Args:
        min_count: Tags with fewer examples are not probed (their words get no label).
        max_sentences: Keep only the first sentences.

    Returns:
        A word-level :class:`ProbingDataset` named ``"pos"``: one text per sentence, each with its
        words' character spans and one UPOS tag per word (None for a tag under ``min_count``).

    Example:
        >>> ds = pos_dataset()
        >>> ds.level, "NOUN" in ds.classes, ds.n_examples > 10_000
        ('word', True, True)
    """
    source = resources.files("mechprobe.probing").joinpath("data", "pos_sentences.jsonl")
    lines = source.read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])
    records = [json.loads(line) for line in lines[1:] if line.strip()]
    if max_sentences is not None:
        records = records[:max_sentences]
    texts, spans, labels = [], [], []
    for rec in records:
        text, span = words_text(rec["words"], rec["spaces"])
        texts.append(text)
        spans.append(span)
        labels.append(rec["upos"])
    ds = ProbingDataset(
        "pos",
        tuple(texts),
        tuple(labels),
        "word",
        tuple(tuple(s) for s in spans),
        description=f"{len(texts)} sentences tagged by spaCy {header['model']} "
        f"{header['model_version']} (spaCy {header['spacy_version']}), UPOS tags.",
    )
    return ds.drop_rare(min_count) if min_count > 1 else ds
