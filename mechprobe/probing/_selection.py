"""Which tokens of each text :func:`mechprobe.collect` keeps, with their labels: a :class:`Plan`.

Everything here happens before any forward pass: texts are tokenised once, ``positions`` is
turned into unpadded positions per text, labels are matched to those positions, and the output
row of every selected token is fixed. See :mod:`mechprobe.probing._activations` for the rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mechprobe.core import Batch, PaddingSide, as_int, check_positions, token_texts, tokenize

_WORD = re.compile(r"\S+")
_POSITIONS_HELP = (
    "positions must be -1 (each text's last token; each word's last token for word-level "
    "datasets), an int, 'all', 'word_last', a list of ints (the same for every text) or one list "
    "of positions per text"
)


@dataclass(frozen=True)
class Plan:
    """Tokenised texts and, per text, the unpadded positions to keep (see :func:`make_plan`)."""

    batch: Batch
    positions: list[np.ndarray]
    order: np.ndarray
    row_start: np.ndarray
    labels: np.ndarray | None
    groups: np.ndarray | None
    text_index: np.ndarray
    position: np.ndarray
    token: np.ndarray
    positions_name: int | str
    dropped_words: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return len(self.position)


def whitespace_words(text: str) -> list[tuple[int, int]]:
    """Character spans ``(start, end)`` of the maximal non-whitespace runs of ``text``.

    Example:
        >>> whitespace_words("The cat, sat.")
        [(0, 3), (4, 8), (9, 13)]
    """
    return [m.span() for m in _WORD.finditer(text)]


def _is_label(value: Any) -> bool:
    """Whether ``value`` is one class label (or word type): a str, an int (an integral float
    counts: ``2.0`` is class 2) or a bool, Python or numpy. The one rule of a ProbingDataset and
    of ``collect``'s ``labels=``/``groups=``, as :func:`mechprobe.core.class_labels`, through
    which every probe and eraser reads labels: refusing here what it takes (bools, a yes/no
    property; labels read from a float column) refused data that the fits downstream take.
    """
    if isinstance(value, (float, np.floating)):
        return bool(np.isfinite(value)) and float(value).is_integer()
    return isinstance(value, (str, int, np.integer, np.bool_))  # bool is an int


def _label(value: Any) -> Any:
    """A label as kept: numpy scalars as Python ones, an integral float as its int."""
    if isinstance(value, (float, np.floating)):
        return int(value)
    return value.item() if isinstance(value, np.generic) else value


def _inputs(data: Any, positions: Any, labels: Any, groups: Any) -> dict[str, Any]:
    """Texts, labels, groups, word spans and the rule for ``positions`` from whatever ``data`` is."""
    from mechprobe.probing._datasets import ProbingDataset
    from mechprobe.tasks import Task

    spans = None
    meta: dict[str, Any] = {}
    if isinstance(data, (ProbingDataset, Task)) and (labels is not None or groups is not None):
        raise ValueError(
            f"labels/groups come from the {type(data).__name__}; do not pass them as well."
        )
    if isinstance(data, ProbingDataset):
        texts, labels, groups, spans = list(data.texts), data.labels, data.groups, data.words
        word_level = data.level == "word"
        meta = {"dataset": data.name}
    elif isinstance(data, Task):
        texts, labels, groups, word_level = data.prompts(), data.inputs(), data.inputs(), False
        meta = {"dataset": data.name}
    else:
        if isinstance(data, Batch):  # its strings, tokenised here
            data = data.texts()
        texts = [data] if isinstance(data, str) else list(data)
        word_level = False
        if not texts:
            raise ValueError("No texts given: pass a non-empty list of strings.")
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("collect() takes a list of strings, a ProbingDataset or a Task.")
    for name, given in (("labels", labels), ("groups", groups)):
        if given is not None and len(given) != len(texts):
            raise ValueError(
                f"{len(texts)} texts but {len(given)} {name}: pass one entry per text (a label, "
                "or a list with one label per selected word or token)."
            )
    # Entries pair with texts by position: a pandas Series indexed after a sort or a filter
    # would otherwise be read by its index labels (wrong labels, or a KeyError).
    labels = None if labels is None else list(labels)
    groups = None if groups is None else list(groups)
    return {
        "texts": texts,
        "labels": labels,
        "groups": groups,
        "spans": spans,
        "rule": _rule(positions, len(texts), word_level),
        "meta": meta,
    }


def _rule(positions: Any, n_texts: int, word_level: bool) -> Any:
    """``"last"``, ``"all"``, ``"word_last"``, or one list of positions per text."""
    if isinstance(positions, str):
        if positions not in ("all", "word_last"):
            raise ValueError(f"{_POSITIONS_HELP}; got {positions!r}.")
        return positions
    single = as_int(positions)
    if single is not None:
        if single == -1:  # the last token of each labelled unit: a text, or a word
            return "word_last" if word_level else "last"
        return [[single]] * n_texts
    array = isinstance(positions, np.ndarray) and positions.dtype.kind != "O"  # not lists of lists
    if (isinstance(positions, torch.Tensor) or array) and positions.ndim == 1:
        # The same for every text, read as every other analysis reads positions (a 1-d tensor
        # was refused here alone).
        return [check_positions(positions)] * n_texts
    if isinstance(positions, (bytes, bool)) or not isinstance(positions, (Sequence, np.ndarray)):
        raise TypeError(f"{_POSITIONS_HELP}; got {type(positions).__name__} {positions!r}.")
    items = list(positions)
    if not items:
        raise ValueError(f"{_POSITIONS_HELP}; got an empty list.")
    if all(as_int(p) is not None for p in items):
        return [check_positions(items)] * n_texts
    if len(items) != n_texts:
        raise ValueError(
            f"positions has {len(items)} position lists for {n_texts} texts: pass one per text."
        )
    return items


def _offsets(model: Any, texts: list[str]) -> list[list[tuple[int, int]]] | None:
    tokenizer = model.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        return None
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"]]


def _word_last(
    spans: Sequence[tuple[int, int]], offsets: list[tuple[int, int]], bos: int
) -> tuple[list[int | None], int]:
    """Per word, the position of its last sub-token (None when the word ends inside a token)."""
    out: list[int | None] = []
    dropped = 0
    ends = np.asarray([e for _, e in offsets] or [0])
    starts = np.asarray([s for s, _ in offsets] or [0])
    for start, end in spans:
        overlap = np.nonzero((starts < end) & (ends > start))[0]
        if len(overlap) == 0 or ends[overlap[-1]] > end:
            out.append(None)
            dropped += 1
        else:
            out.append(int(overlap[-1]) + bos)
    return out, dropped


def _units(rule: Any, i: int, length: int, bos: int, words: Any, offsets: Any) -> list[Any]:
    """Unpadded positions of text ``i``'s selectable units (None: a word without its own token)."""
    if rule == "last":
        return [length - 1]
    if rule == "all":
        return list(range(bos, length))
    if rule == "word_last":
        return _word_last(words, offsets, bos)[0]
    marked = rule[i]
    if isinstance(marked, (str, bytes)) or not isinstance(marked, (Sequence, np.ndarray)):
        raise TypeError(f"positions[{i}] must be a list of int positions, got {marked!r}.")
    out = []
    for p in marked:
        number = as_int(p)
        if number is None:
            raise TypeError(f"positions[{i}] holds {p!r}; positions are ints.")
        if not -length <= number < length:
            raise ValueError(
                f"position {number} is outside text {i}, which has {length} tokens "
                f"(BOS included): use 0..{length - 1} or -1..-{length}."
            )
        out.append(number % length)
    if len(set(out)) != len(out):
        # A row twice: a probe's split could put one copy in training and one in its test set.
        raise ValueError(
            f"positions {list(marked)} name a token of text {i} twice (it has {length} tokens, "
            "BOS included): name each position once."
        )
    return out


def _expand(values: Any, i: int, n_units: int, name: str) -> list[Any]:
    """One text's label entry as a list with one value per unit (a scalar is repeated)."""
    entry = values[i]
    if entry is None or _is_label(entry):
        return [None if entry is None else _label(entry)] * n_units
    if isinstance(entry, bytes) or not isinstance(entry, (Sequence, np.ndarray)):
        raise TypeError(
            f"{name}[{i}] is {entry!r}: use a str, int or bool label or a list of them."
        )
    if len(entry) != n_units:
        raise ValueError(
            f"{name}[{i}] has {len(entry)} entries but text {i} has {n_units} selectable units "
            "(words for 'word_last', tokens without BOS for 'all', listed positions): pass one "
            "per unit, or a single label for the whole text."
        )
    return [None if v is None else _label(v) if _is_label(v) else v for v in entry]


def _array(values: list[Any], name: str) -> np.ndarray:
    if all(isinstance(v, str) for v in values):
        return np.asarray(values, dtype=np.str_)
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=np.bool_)
    if all(_is_label(v) and not isinstance(v, (str, bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=np.int64)
    kinds = sorted({type(v).__name__ for v in values})
    raise TypeError(
        f"{name} must be all strings, all ints or all bools (found {kinds}): use one type."
    )


def make_plan(
    model: Any,
    data: Any,
    *,
    positions: Any,
    labels: Any,
    groups: Any,
    padding_side: PaddingSide = "right",
) -> Plan:
    """Tokenise ``data`` and resolve ``positions``, ``labels`` and ``groups`` to output rows."""
    given = _inputs(data, positions, labels, groups)
    texts, rule = given["texts"], given["rule"]
    # Compared with None, never by truth value: labels may be a numpy array.
    labels, groups = given["labels"], given["groups"]
    name = _name(positions, rule)
    batch = tokenize(model, texts, padding_side=padding_side)
    lengths = batch.lengths.tolist()
    offsets = _offsets(model, texts)
    if offsets is None and rule == "word_last":
        raise ValueError(
            "positions='word_last' needs a fast tokenizer (offsets); use 'all' instead."
        )
    spans = given["spans"] or [whitespace_words(t) for t in texts]
    chosen: list[np.ndarray] = []
    text_index: list[np.ndarray] = []
    all_labels: list[Any] = []
    all_groups: list[Any] = []
    tokens: list[str] = []
    dropped = 0
    for i, text in enumerate(texts):
        n_ids = len(offsets[i]) if offsets is not None else None
        bos = lengths[i] - n_ids if n_ids is not None else int(batch.tokens[i, 0] == _bos(model))
        units = _units(rule, i, lengths[i], bos, spans[i], offsets[i] if offsets else None)
        dropped += sum(u is None for u in units)
        lab = None if labels is None else _expand(labels, i, len(units), "labels")
        grp = None if groups is None else _expand(groups, i, len(units), "groups")
        keep = [
            j for j, u in enumerate(units) if u is not None and (lab is None or lab[j] is not None)
        ]
        pos = np.asarray([units[j] for j in keep], dtype=np.int64)
        chosen.append(pos)
        text_index.append(np.full(len(pos), i, dtype=np.int64))
        if lab is not None:
            all_labels.extend(lab[j] for j in keep)
        if grp is not None:
            all_groups.extend(grp[j] for j in keep)
        tokens.extend(_token_text(model, batch, text, i, p, bos, offsets) for p in pos.tolist())
    counts = np.asarray([len(p) for p in chosen])
    if counts.sum() == 0:
        raise ValueError(
            "No token was selected: every text is empty under this rule, or every label is None."
        )
    # Longest texts first: chunks of similar length waste little padding; stable for determinism.
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return Plan(
        batch=batch,
        positions=chosen,
        order=order,
        row_start=np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64),
        labels=None if labels is None else _array(all_labels, "labels"),
        groups=None if groups is None else _array(all_groups, "groups"),
        text_index=np.concatenate(text_index),
        position=np.concatenate(chosen),
        token=np.asarray(tokens, dtype=np.str_),
        positions_name=name,
        dropped_words=int(dropped),
        metadata=given["meta"],
    )


def _name(positions: Any, rule: Any) -> int | str:
    """How the rows were chosen, for the record: -1, an int, 'all', 'word_last' or 'listed'."""
    if rule == "last":
        return -1
    if isinstance(rule, str):
        return rule
    single = as_int(positions)
    return single if single is not None else "listed"


def _bos(model: Any) -> int:
    bos = model.tokenizer.bos_token_id
    return -1 if bos is None else int(bos)


def _token_text(model: Any, batch: Batch, text: str, i: int, p: int, bos: int, offsets: Any) -> str:
    if p < bos or offsets is None:  # the token's own text ("Ġthe" is its BPE piece)
        return token_texts(model.tokenizer, [int(batch.tokens[i, p])])[0]
    start, end = offsets[i][p - bos]
    return text[start:end]
