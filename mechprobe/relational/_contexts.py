"""Random-word contexts holding an argument, on which the o-vector intervention is measured.

Merullo et al. write the o-vector into a context of random tokens with an argument in it,
``"table mug free China table mug free China table mug free"``: a model that follows the repetition
predicts the argument (``" China"``) next, so the answer (``" Beijing"``) can only come from the
vector. The contexts here are built from a fixed list of neutral words, seeded, so every run and
every control sees the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mechprobe.core import check_seed

__all__ = ["FILLER_WORDS", "random_word_contexts"]

#: Neutral filler words for the random contexts: no countries, cities, colours or verbs in the
#: built-in tasks, so no filler word is itself an argument or an answer.
FILLER_WORDS: tuple[str, ...] = (
    "table", "mug", "free", "lamp", "pencil", "cloud", "garden", "button", "ticket", "basket",
    "window", "spoon", "blanket", "ladder", "pillow", "bottle", "carpet", "engine", "marble",
    "candle", "jacket", "wallet", "tunnel", "puzzle", "hammer", "rocket", "feather", "cookie",
    "helmet", "violin", "anchor", "bucket", "kettle", "lantern", "magnet", "napkin", "orbit",
    "paddle", "saddle", "tissue",
)  # fmt: skip


def random_word_contexts(
    arguments: Sequence[str],
    *,
    seed: int = 0,
    n_filler: int = 3,
    repeats: int = 2,
    words: Sequence[str] = FILLER_WORDS,
) -> list[str]:
    """One random-word context per argument, Merullo et al.'s pattern: ``F arg F arg F``.

    ``F`` is ``n_filler`` distinct words drawn (seeded) from ``words``; the block ``F arg`` repeats
    ``repeats`` times and the context ends with ``F``, so an induction-following model predicts the
    argument next.

    Args:
        arguments: The arguments (``" China"``), non-empty strings; each is stripped and joined to
            the filler words with single spaces.
        seed: Seed of the filler draws (one generator for all arguments, in order).
        n_filler: Words in ``F``, distinct, from 1 to ``len(words)``.
        repeats: Times the block ``F arg`` repeats (at least 1).
        words: The words ``F`` is drawn from (default: the module's ``FILLER_WORDS``).

    Returns:
        One context per argument, in order: ``repeats`` blocks ``F arg`` then ``F`` again, the
        same ``F`` throughout a context.

    Raises:
        ValueError: ``n_filler`` or ``repeats`` out of range, or an empty argument.

    Example:
        >>> random_word_contexts([" China"], words=["table", "mug", "free"], seed=0)[0]
        'free table mug China free table mug China free table mug'
    """

    seed = check_seed(seed)
    if not 1 <= n_filler <= len(words):
        raise ValueError(f"n_filler must be between 1 and {len(words)} (the number of words).")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    rng = np.random.default_rng(seed)
    out = []
    for arg in arguments:
        if not isinstance(arg, str) or not arg.strip():
            raise ValueError(f"Arguments must be non-empty strings, got {arg!r}.")
        filler = " ".join(words[int(i)] for i in rng.choice(len(words), n_filler, replace=False))
        out.append(" ".join([filler, arg.strip()] * repeats + [filler]))
    return out
