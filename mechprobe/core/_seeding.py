"""Seeds derived from content: a random draw fixed by what it is about, not by where it runs.

Random controls of patching and tracing, and sampled generation, draw from generators seeded by
the user's ``seed`` together with the token ids of the prompt(s) a draw belongs to: a prompt keeps
its draws whatever prompts run beside it, in whatever order or chunking, so runs split over jobs
join into the numbers of one run. Random control ``j`` of a run seeded ``seed`` draws from
:func:`control_seed` (``seed + j``, wrapped into the seed range).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["control_seed", "keyed_seed", "keyed_seeds", "keyed_uniforms"]

#: Seeds run over ``0 .. 2**32 - 1`` (:func:`mechprobe.core.check_seed`); control seeds wrap in it.
_SEED_RANGE = 2**32


def control_seed(seed: int, j: int) -> int:
    """The seed of random control ``j`` of a run seeded ``seed``: ``seed + j``, modulo ``2**32``.

    The random controls of the API (random directions, projections, vectors, subspaces) take
    their seeds from it (patching keys it with each pair's tokens; DAS's subspace ``j`` is
    control ``j + 1``, after the one the trained subspace starts from). The wrap keeps it a seed
    that every generator takes: without it, ``seed=2**32 - 1`` with two controls asked the second
    for ``2**32``, which :func:`mechprobe.core.check_seed` (and numpy's legacy generators)
    refuse, a seed the user never passed.

    Args:
        seed: The user's seed, in ``0 .. 2**32 - 1``.
        j: The control's number (0 for the first).

    Returns:
        ``(seed + j) % 2**32``.

    Example:
        >>> control_seed(7, 2)
        9
        >>> control_seed(2**32 - 1, 1)  # wraps to the start of the range
        0
    """
    return (int(seed) + int(j)) % _SEED_RANGE


def keyed_seed(seed: int, prompts: Sequence[Sequence[int] | Tensor], suffix: bytes = b"") -> int:
    """A generator seed from ``seed``, the token ids of the prompts a draw belongs to (one
    prompt, or a clean/corrupt pair) and ``suffix`` (a cell's key, a copy's number): the prompts,
    not their place in the list or the prompts run beside them, fix the random draws.

    Example:
        >>> keyed_seed(0, [[1, 5, 9]]) == keyed_seed(0, [torch.tensor([1, 5, 9])])
        True
        >>> keyed_seed(0, [[1, 5], [9]]) == keyed_seed(0, [[1], [5, 9]])  # where the pair splits
        False
    """
    return keyed_seeds(seed, prompts, [suffix])[0]


def keyed_seeds(
    seed: int, prompts: Sequence[Sequence[int] | Tensor], suffixes: Sequence[bytes]
) -> list[int]:
    """:func:`keyed_seed` for each of ``suffixes``, hashing the prompts once (a patching run
    draws a control for every cell of a pair).

    Example:
        >>> keys = [b"a", b"b"]
        >>> keyed_seeds(3, [[1, 2]], keys) == [keyed_seed(3, [[1, 2]], k) for k in keys]
        True
    """
    ids = b"".join(
        np.asarray(torch.as_tensor(p).cpu().reshape(-1), dtype=np.int64).tobytes() for p in prompts
    )
    # One prompt hashes its ids alone (the key causal tracing's noise has always had); a pair
    # adds its lengths, so that where one prompt ends is part of the key.
    lengths = b"" if len(prompts) == 1 else repr([len(p) for p in prompts]).encode()
    start = hashlib.blake2b(ids + lengths, digest_size=8, key=str(int(seed)).encode())
    out = []
    for suffix in suffixes:
        digest = start.copy()  # the same digest as hashing ids + lengths + suffix at once
        digest.update(suffix)
        out.append(int.from_bytes(digest.digest(), "little") % 2**63)
    return out


# splitmix64's constants (Steele, Lea & Flood 2014): a counter hashed into 64 random bits.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def keyed_uniforms(seeds: Sequence[int], width: int) -> np.ndarray:
    """``[len(seeds), width]`` uniform draws in ``[0, 1)``, row ``r`` a function of ``seeds[r]``
    and the width alone: splitmix64 of the seed and each draw's index, its top 53 bits. Vectorised
    over rows: attribution patching draws a few numbers for every cell, thousands at a time, where
    a generator per row (about 6 us each) cost more than the gradients it controls.

    Example:
        >>> draws = keyed_uniforms([1, 2, 1], 3)
        >>> draws.shape, bool((draws[0] == draws[2]).all()), bool((draws[0] == draws[1]).any())
        ((3, 3), True, False)
        >>> bool((keyed_uniforms([2], 3) == draws[1]).all())  # whatever rows come beside it
        True
    """
    start = np.asarray([int(s) % 2**64 for s in seeds], dtype=np.uint64).reshape(-1, 1)
    counter = np.arange(1, int(width) + 1, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):  # the mixing works modulo 2**64
        z = start + counter * np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53
