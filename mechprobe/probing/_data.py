"""Input handling shared by the layer-wise probes: coercion, label encoding, splits, scaling, and
the model layers of collected sites."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.model_selection import (
    KFold,
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)
from torch import Tensor

from mechprobe.core import HEAD_KINDS, Site, block_of, class_labels, warn

_GATHER_ROWS = 2048  # rows gathered (and added to the moments) at a time


def host(x: Any) -> Any:
    """``x`` as NumPy can read it: a tensor on any device comes to the CPU (bfloat16, which
    NumPy lacks, as float32); anything else as is.

    Example:
        >>> host(torch.tensor([1, 2])).tolist(), host([3])
        ([1, 2], [3])
    """
    if not isinstance(x, Tensor):
        return x
    x = x.detach().cpu()
    # A bfloat16 model's captures: NumPy raised "unsupported ScalarType BFloat16" in fit.
    return (x.float() if x.dtype == torch.bfloat16 else x).numpy()


def as_layers(
    X: Any, y: Any = None, groups: Any = None
) -> tuple[Float[Tensor, "n layers d"], np.ndarray, np.ndarray | None]:
    """``(values [n, layers, d] float tensor, labels [n], groups [n] or None)`` from the inputs.

    ``X`` is an array or tensor, or an object with ``.values`` (e.g. :class:`Activations`) whose
    ``.labels`` and ``.groups`` fill in ``y`` and ``groups`` when those are not given. Values keep
    their dtype (no copy); :func:`standardised` gathers half precision as float32.
    """
    if not isinstance(X, (np.ndarray, Tensor)) and hasattr(X, "values"):
        y = getattr(X, "labels", None) if y is None else y
        groups = getattr(X, "groups", None) if groups is None else groups
        X = X.values
    if isinstance(X, Tensor):
        values = X.detach()
    else:
        with warnings.catch_warnings():  # read-only memory maps: nothing here writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            values = torch.from_numpy(np.asarray(X))
    if values.ndim != 3:
        raise ValueError(
            f"X must be [n, layers, d], got shape {tuple(values.shape)}; for a single layer use "
            "X[:, None, :]."
        )
    if not values.is_floating_point():
        raise TypeError(
            f"X must hold floats, got {values.dtype}; convert it with X.astype('float32')."
        )
    # Half precision stays as it is (a float16 memory map of 100k tokens x 30 layers is 3.2 GiB,
    # twice that as float32): rows are converted to float32 as they are gathered for fitting.
    if not bool(torch.isfinite(torch.stack(torch.aminmax(values))).all()):
        raise ValueError(
            "X contains NaN or inf activations; drop those rows (e.g. X[np.isfinite(X).all((1, 2))])."
        )
    if y is None:
        raise ValueError("no labels: pass y, or an object whose .labels holds one label per row.")
    labels = host(y)
    if not isinstance(labels, np.ndarray):  # a list: numpy would merge [True, 0] or [1, "1"]
        labels = np.asarray(labels) if len(labels) == 0 else _one_kind(labels, "y")
    n = values.shape[0]
    if labels.ndim != 1 or len(labels) != n:
        # X.transpose(1, 0, 2) was answered with the count alone (review 25a).
        swapped = labels.ndim == 1 and values.ndim == 3 and len(labels) == values.shape[1]
        hint = (
            f" X is [rows, layers, d] and its second axis has {len(labels)}: did you pass "
            "[layers, rows, d]? Transpose it (X.transpose(1, 0, 2))."
            if swapped
            else ""
        )
        raise ValueError(
            f"y has shape {labels.shape} but X has {n} rows: pass one label per row of X.{hint}"
        )
    if groups is not None:
        groups = host(groups)
        if not isinstance(groups, np.ndarray):
            groups = np.asarray(groups) if len(groups) == 0 else _one_kind(groups, "groups")
        if groups.ndim != 1 or len(groups) != n:
            raise ValueError(
                f"groups has shape {groups.shape} but X has {n} rows: pass one word type per row."
            )
    return values, labels, groups


def _one_kind(values: Sequence[Any], name: str) -> np.ndarray:
    """A list of labels as an array, refused where it mixes kinds or misses a label."""
    array = np.asarray(values)
    if array.ndim == 1:
        class_labels(values, name, min_classes=1)
    return array


def encode_labels(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, indices)`` of a probe's labels (:func:`mechprobe.core.class_labels`: one kind
    of label, none missing, not continuous, at least two classes)."""
    return class_labels(y, "y")


def split_groups_of(X: Any, split_groups: Any, n: int) -> np.ndarray | None:
    """``[n]`` the group of each row that a split keeps on one side (None: rows split freely):
    ``"text"`` reads :class:`Activations`' ``text_index``, an array gives them itself."""
    if split_groups is None:
        return None
    if isinstance(split_groups, str):
        if split_groups != "text":
            raise ValueError(
                f"split_groups must be 'text', an array of one group per row, or None; got "
                f"{split_groups!r}."
            )
        index = getattr(X, "text_index", None)
        if index is None:
            raise ValueError(
                "split_groups='text' reads the texts of collected Activations (their "
                "text_index); X has none: pass one group per row (e.g. the sentence id)."
            )
        return np.asarray(index)
    found = np.asarray(host(split_groups))
    if found.ndim != 1 or len(found) != n:
        raise ValueError(
            f"split_groups must hold one group per row ({n}), got shape {found.shape}."
        )
    return found


def splits(
    y_idx: np.ndarray,
    *,
    test_size: float,
    n_folds: int | None,
    seed: int,
    classes: np.ndarray | None = None,
    split_groups: np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified held-out split, or stratified k folds; plain shuffling if a class is too rare
    (the warning names it by ``classes[index]`` where given). With ``split_groups``, rows of one
    group stay on one side (scikit-learn's ``StratifiedGroupKFold``; the held-out split is its
    first fold of ``round(1 / test_size)``)."""
    counts = np.bincount(y_idx)
    n = len(y_idx)
    if split_groups is not None:
        return _group_splits(y_idx, split_groups, test_size, n_folds, seed, classes)
    if n_folds is not None:
        if n_folds < 2 or n_folds > n:
            raise ValueError(f"n_folds must be in [2, {n}], got {n_folds}.")
        stratify = counts.min() >= n_folds
        if not stratify:
            _warn_rare(counts, n_folds, classes)
        kind = StratifiedKFold if stratify else KFold
        folds = kind(n_folds, shuffle=True, random_state=seed).split(np.zeros(n), y_idx)
        return [(np.sort(tr), np.sort(te)) for tr, te in folds]
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size}.")
    stratify = counts.min() >= 2
    if not stratify:
        _warn_rare(counts, 2, classes)
    n_test = int(np.ceil(test_size * n))  # scikit-learn's rounding
    if stratify and min(n_test, n - n_test) < len(counts):
        raise ValueError(
            f"{n} rows split with test_size={test_size} leave {n - n_test} for training and "
            f"{n_test} for testing, fewer than the {len(counts)} classes on one side: pass more "
            "rows, another test_size, or n_folds."
        )
    train, test = train_test_split(
        np.arange(n), test_size=test_size, random_state=seed, stratify=y_idx if stratify else None
    )
    return [(np.sort(train), np.sort(test))]


def group_folds(test_size: float) -> int:
    """The folds whose first is the held-out part of a grouped split: ``round(1 / test_size)``
    (the held-out share is ``1 / folds``; it can hold at most half)."""
    if not 0 < test_size <= 0.5:
        raise ValueError(
            f"test_size={test_size} with split_groups: a grouped split holds out one fold of "
            "round(1 / test_size), at most half of the rows; pass a test_size in (0, 0.5]."
        )
    return max(2, round(1 / test_size))


def _group_splits(
    y_idx: np.ndarray,
    groups: np.ndarray,
    test_size: float,
    n_folds: int | None,
    seed: int,
    classes: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds (or one held-out split) that keep each group on one side, stratified as far as the
    groups allow, shuffled by ``seed``."""
    n_groups = len(np.unique(groups))
    k = group_folds(test_size) if n_folds is None else n_folds
    if n_folds is None and abs(1 / k - test_size) > 1e-9:
        warn(
            f"split_groups: test_size={test_size} holds out one fold of {k}, {1 / k:.3g} of the "
            "rows as groups allow (the result's split records it); pass 1/k (0.5, 0.333, 0.25, "
            "0.2, ...) to hold out what you ask.",
            UserWarning,
        )
    if not 2 <= k <= n_groups:
        raise ValueError(
            f"{n_groups} split group(s) cannot make {k} folds (each group stays on one side): "
            "pass more texts, fewer n_folds or a larger test_size."
        )
    counts = np.bincount(y_idx)
    if counts.min() < k:
        _warn_rare(counts, k, classes)
    # Stratified as far as a rare class allows, still shuffled by the seed (an unshuffled
    # GroupKFold here ignored it and held out the largest groups); its own warning is ours.
    folds = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        pairs = [
            (np.sort(tr), np.sort(te))
            for tr, te in folds.split(np.zeros(len(y_idx)), y_idx, groups)
        ]
    return pairs if n_folds is not None else pairs[:1]


def standardised(
    X: Float[Tensor, "n layers d"],
    train: np.ndarray,
    test: np.ndarray | None = None,
    *,
    standardize: bool = True,
    scale_train: bool = True,
    out: tuple[Tensor, Tensor | None] | None = None,
    layers: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """``(train [layers, n_train, d], test or None, mean [layers, d], scale [layers, d])``.

    Statistics come from the training rows only (``standardize=False``: mean 0, scale 1). With
    ``scale_train=False`` the training rows come back as they are, for a fit that standardises
    inside its products (``fit_logistic(..., scale=scale)``): a pass over the largest array saved.
    The layer axis moves first, each layer's rows contiguous, because narrow products over a
    strided layer run ~3x slower; gathering layer by layer does the row selection and the move in
    one pass. ``out``: ``(train, test)`` buffers with at least as many layers, written into and
    returned as views (reusing memory spares paging in a fresh copy, ~0.3 s per GB). ``layers``:
    only these layers of ``X``, in this order (read as views, without copying ``X``).
    """
    moments = _Moments() if standardize else None
    train_x = _gather(X, train, None if out is None else out[0], layers, moments)
    test_x = None if test is None else _gather(X, test, None if out is None else out[1], layers)
    n_layers, _, d = train_x.shape
    if moments is None:
        zeros = torch.zeros(n_layers, d, dtype=torch.float64, device=X.device)
        return train_x, test_x, zeros, torch.ones_like(zeros)
    mean, std = moments.result()
    # Constant features (spread at the rounding of these sums) stay unscaled rather than
    # dividing by ~0.
    dtype = train_x.dtype
    floor = 100 * torch.finfo(dtype).eps * mean.abs().clamp_min(1.0)
    scale = torch.where(std > floor, std, torch.ones_like(std))
    for part in (train_x, test_x) if scale_train else (test_x,):
        if part is not None:
            part.sub_(mean.to(dtype)[:, None]).div_(scale.to(dtype)[:, None])
    return train_x, test_x, mean, scale


class _Moments:
    """Per-layer mean and standard deviation of rows added chunk by chunk, in float64.

    Each chunk's sum and centred sum of squares are taken while its rows are in cache (one pass
    over memory, no copy of the rows), and chunks are merged by Chan et al.'s pairwise update; a
    plain ``E[x²] - E[x]²`` would lose the variance of features whose mean dwarfs their spread.
    """

    def __init__(self) -> None:
        self.count: list[int] = []
        self.mean: list[Tensor] = []
        self.squares: list[Tensor] = []  # centred sums of squares

    def add(self, layer: int, rows: Float[Tensor, "m d"], chunk: int = 512) -> None:
        """Add ``rows`` of the ``layer``-th layer (layers are added in order, from 0)."""
        m = len(rows)
        mean = rows.sum(0).double() / m  # float32 sums are pairwise: accurate, and fast
        centre = mean.to(rows.dtype)
        squares = torch.zeros_like(mean)
        for start in range(0, m, chunk):  # a centred temporary that stays in cache
            part = rows[start : start + chunk] - centre
            squares += part.mul_(part).sum(0)
        # The centre differs from the mean by its rounding: correct the sum for that offset.
        squares -= m * (mean - centre.double()) ** 2
        if layer == len(self.count):
            self.count.append(m)
            self.mean.append(mean)
            self.squares.append(squares)
            return
        n, total = self.count[layer], self.count[layer] + m
        delta = mean - self.mean[layer]
        self.mean[layer] = self.mean[layer] + delta * (m / total)
        self.squares[layer] = self.squares[layer] + squares + delta**2 * (n * m / total)
        self.count[layer] = total

    def result(self) -> tuple[Float[Tensor, "layers d"], Float[Tensor, "layers d"]]:
        """``(mean, std)`` per layer and feature (the population standard deviation)."""
        squares = torch.stack(self.squares).clamp_min(0.0)
        count = torch.tensor(self.count, dtype=torch.float64, device=squares.device)
        return torch.stack(self.mean), (squares / count[:, None]).sqrt()


def gathered_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (too coarse to fit in), else ``dtype``."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _gather(
    X: Tensor,
    rows: np.ndarray,
    out: Tensor | None = None,
    layers: Sequence[int] | None = None,
    moments: _Moments | None = None,
) -> Tensor:
    """``X[rows][:, layers]`` as ``[layers, len(rows), d]``, contiguous (in ``out[:layers]`` if
    given), in :func:`gathered_dtype`; ``layers`` defaults to all of them. ``moments``: add the
    gathered rows to it, chunk by chunk while they are in cache.

    Rows are gathered ``_GATHER_ROWS`` at a time: half precision through a small temporary that
    stays in cache, ~3x faster than one temporary the size of the layer (a float16 memory map of
    100,970 x 30 x 576: 30 ms instead of 95 ms per layer for 80,776 rows, one thread).
    """
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(X.device)
    chosen = range(X.shape[1]) if layers is None else list(layers)
    shape, dtype = (len(chosen), len(idx), X.shape[2]), gathered_dtype(X.dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=X.device)
    else:
        out = out[: len(chosen)]
        if out.shape != shape or out.dtype != dtype:
            raise ValueError(f"buffer {tuple(out.shape)} {out.dtype} cannot hold {shape} {dtype}")
    for i, layer in enumerate(chosen):
        for start in range(0, len(idx), _GATHER_ROWS):
            part, some = out[i, start : start + _GATHER_ROWS], idx[start : start + _GATHER_ROWS]
            if X.dtype == dtype:
                torch.index_select(X[:, layer], 0, some, out=part)
            else:
                part.copy_(torch.index_select(X[:, layer], 0, some))
            if moments is not None:
                moments.add(i, part)
    return out


def _warn_rare(counts: np.ndarray, needed: int, classes: np.ndarray | None) -> None:
    rare = np.flatnonzero(counts < needed)
    names = (rare if classes is None else classes[rare]).tolist()
    warn(
        f"classes {names[:10]} have fewer than {needed} examples, so the split is not stratified; "
        "drop rare classes for stratified splits.",
        UserWarning,
    )


def collected_sites(X: Any) -> tuple[str, ...] | None:
    """The site names of ``X``'s layer axis (:class:`Activations` has them), or None."""
    if isinstance(X, (np.ndarray, torch.Tensor)):
        return None
    names = getattr(X, "sites", None)
    return None if names is None else tuple(str(name) for name in names)


def matched_layers(values: Any, X: Any, sites: tuple[str, ...] | None, what: str) -> Any:
    """``values`` (``X``'s rows, layer axis second) with their layers in the order of ``sites``,
    the layers a probe was fitted on. :class:`Activations` name their layers, so held-out ones
    collected in another order are put in the fitted order, and other layers are refused (they
    were read positionally, silently: review 43a F1); an array, which does not say, is taken in
    the order given.

    Raises:
        ValueError: ``X`` names other sites than ``sites``.

    Example:
        >>> import numpy as np
        >>> x = np.arange(6).reshape(1, 2, 3)
        >>> class Collected:
        ...     sites = ("blocks.2.hook_resid_post", "blocks.0.hook_resid_post")
        >>> matched_layers(x, Collected(), tuple(reversed(Collected.sites)), "X_test")[0, 0]
        array([3, 4, 5])
    """
    theirs = collected_sites(X)
    if sites is None or theirs is None or theirs == sites:
        return values
    if sorted(theirs) != sorted(sites):
        raise ValueError(
            f"{what} holds the sites {list(theirs)}, but the probe was fitted on {list(sites)}: "
            f"collect {what} at the same sites (any order), or pass arrays to match by position."
        )
    return values[:, [theirs.index(site) for site in sites]]


def collected_model(X: Any) -> dict[str, str]:
    """The model :class:`Activations` were collected from, as results record it:
    ``{"model_name", "model_dtype"}`` (``""`` for a plain array, which does not say, and a
    dtype ``""`` for activations collected before they recorded it)."""
    metadata = getattr(X, "metadata", None)
    known = metadata if isinstance(metadata, dict) else {}
    return {
        "model_name": str(known.get("model", "")),
        "model_dtype": str(known.get("model_dtype", "")),
    }


# Where a kind's value lies in the residual stream, from its block's output: a block reads its
# predecessor's output (resid_pre@l is resid_post@(l-1), the embeddings at l = 0); attention
# reads that and writes half-way; the MLP writes the block's output.
_DEPTH_OFFSET = {"resid_pre": -1.0, "resid_mid": -0.5, "mlp_in": -0.5, "attn_out": -0.5}
_DEPTH_OFFSET |= {kind: -1.0 for kind in ("q", "k", "v", "pattern")}
_DEPTH_OFFSET |= {kind: -0.5 for kind in HEAD_KINDS if kind not in _DEPTH_OFFSET}


def stream_depths(sites: tuple[str, ...] | None, n_layers: int) -> np.ndarray:
    """The depth of each site in the residual stream, on the scale of block outputs: block
    ``l``'s output (``resid_post@l``, ``mlp_out@l``) is ``l``, what it reads (``resid_pre@l``) is
    ``l - 1`` (the embeddings, ``resid_pre@0`` or ``hook_embed``, are -1), attention's half of a
    block ``l - 0.5`` (hooks that read a block's input, its first norm, queries, keys and values,
    ``l - 1``); positions along the layer axis where the names give no place. A parallel block
    (GPT-NeoX) reads its input with the MLP too, which the names do not say: its ``mlp_in@l``
    counts ``l - 0.5`` here, though it holds ``resid_pre@l``. Expected layers are taken on
    this scale, so that the embeddings and block 0's output are not both 0; Tenney et al. number
    the embeddings 0 and block ``l``'s output ``l + 1``, which is this plus one. Integers where
    every entry is a block's input or output.

    Example:
        >>> stream_depths(("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"), 2).tolist()
        [-1, 0]
        >>> stream_depths(("hook_embed", "blocks.1.attn.hook_z", "blocks.1.ln1.hook_normalized"), 3)
        array([-1. ,  0.5,  0. ])
    """
    if sites is None or len(sites) != n_layers:
        return np.arange(n_layers)
    found = []
    for name in sites:
        try:
            site = Site.parse(name)
        except ValueError:  # a hook name of no site kind: where in its block it reads
            depth = _hook_depth(name)
            if depth is None:
                return np.arange(n_layers)
            found.append(depth)
            continue
        found.append(site.layer + _DEPTH_OFFSET.get(site.kind, 0.0))
    depths = np.asarray(found)
    return depths.astype(int) if np.all(depths == np.round(depths)) else depths


# Hooks of no site kind, by where they read: the embeddings (-1 from block 0's output), what
# reads a block's input (its first norm, queries, keys, values, attention maps), what reads or
# writes half-way (the heads' outputs, the second norm, the MLP's neurons).
_BEFORE_BLOCKS = re.compile(r"hook_(embed|pos_embed)$")
_READS_INPUT = re.compile(
    r"blocks\.(\d+)\.(ln1\.|attn\.hook_(q|k|v|rot_q|rot_k|attn_scores|pattern)$)"
)
_HALF_WAY = re.compile(r"blocks\.(\d+)\.(ln2\.|attn\.hook_(z|result)$|mlp\.)")


def _hook_depth(name: str) -> float | None:
    """The depth of a hook name that is no site (None where it names no place in the stream)."""
    if _BEFORE_BLOCKS.fullmatch(name):
        return -1.0
    for pattern, offset in ((_READS_INPUT, -1.0), (_HALF_WAY, -0.5)):
        found = pattern.match(name)
        if found:
            return int(found.group(1)) + offset
    layer = block_of(name)
    return None if layer is None else float(layer)


def model_layers(sites: tuple[str, ...] | None, n_layers: int) -> np.ndarray:
    """The model layer of each site name (``blocks.20.hook_resid_post``, ``head_out@3, head 2``),
    or the positions along the layer axis where a name gives none."""
    if sites is None or len(sites) != n_layers:
        return np.arange(n_layers)
    found = []
    for name in sites:
        layer = block_of(name)
        if layer is None:
            return np.arange(n_layers)
        found.append(layer)
    return np.asarray(found)
