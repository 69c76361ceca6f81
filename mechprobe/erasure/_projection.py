"""Projection: a fitted linear (or affine) concept erasure, and the controls that match its rank.

A :class:`Projection` is what :func:`~mechprobe.inlp` and :func:`~mechprobe.erasure._leace` return and what
the amnesic-probing hooks apply. It stores the erased subspace explicitly, so applying it costs two
thin matrix products instead of a dense ``d x d`` one, and it works on numpy arrays and torch
tensors of any leading shape.

Erasure is written for row vectors ``x [..., d]``::

    x' = x - ((x - mean) @ readout.T) @ removed

``removed [k, d]`` is an orthonormal basis of the directions that change (the range of ``I - P``)
and ``readout [k, d]`` reads the coordinates to subtract. For an orthogonal projection (INLP and
the random, dropout and identity controls) ``readout == removed`` and ``mean`` is ``None``, so
``x' = x @ P`` with ``P = I - removed.T @ removed`` symmetric. LEACE is oblique and affine:
``readout != removed`` and ``mean`` is the training mean, which the erasure leaves in place.
``matrix`` is ``P`` acting on column vectors (``x' = mean + P (x - mean)``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Projection", "dropout_projection", "identity_projection", "random_projection"]

_FORMAT = "mechprobe.Projection/1"
ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)


@dataclass(frozen=True, eq=False)
class Projection:
    """A fitted erasure ``x -> x'`` that removes ``n_removed`` directions from ``d``-dim vectors.

    Attributes:
        matrix: ``P [d, d]`` (float64) acting on column vectors; symmetric and idempotent for the
            orthogonal methods, idempotent but not symmetric for LEACE.
        removed: ``[k, d]`` orthonormal basis of the erased directions (the range of ``I - P``).
        method: ``"inlp"``, ``"leace"``, ``"random"``, ``"dropout"`` or ``"identity"``.
        accuracies: Held-out probe accuracy before the first iteration and after each kept one
            (INLP only; empty otherwise).
        ranks: Directions removed after each entry of ``accuracies`` (same length).
        majority_baseline: Held-out accuracy of always predicting the most frequent class.
        readout: ``[k, d]`` coordinates read for subtraction, ``I - P = removed.T @ readout``;
            ``None`` means ``readout == removed`` (orthogonal projection).
        mean: ``[d]`` centre of an affine erasure (LEACE keeps the mean in place); ``None`` if
            linear.

    Example:
        >>> import torch
        >>> p = random_projection(8, 3, seed=0)
        >>> x = torch.randn(2, 5, 8)
        >>> y = p.apply(x)
        >>> bool(torch.allclose(p.apply(y), y, atol=1e-5)), p.n_removed
        (True, 3)
    """

    matrix: Float[Tensor, "d d"]
    removed: Float[Tensor, "k d"]
    method: str
    accuracies: tuple[float, ...] = ()
    ranks: tuple[int, ...] = ()
    majority_baseline: float | None = None
    readout: Float[Tensor, "k d"] | None = None
    mean: Float[Tensor, " d"] | None = None
    # (dtype, device) -> factors cast once, so a hook applying it every forward pass copies nothing.
    _cast: dict[tuple[Any, ...], tuple[Tensor, Tensor, Tensor | None]] = field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self) -> None:
        d = self.matrix.shape[-1]
        if self.matrix.shape != (d, d):
            raise ValueError(f"matrix must be square [d, d], got {tuple(self.matrix.shape)}.")
        if self.removed.ndim != 2 or self.removed.shape[1] != d:
            raise ValueError(f"removed must be [k, {d}], got {tuple(self.removed.shape)}.")
        if self.readout is not None and self.readout.shape != self.removed.shape:
            raise ValueError(
                f"readout must have the shape of removed {tuple(self.removed.shape)}, "
                f"got {tuple(self.readout.shape)}."
            )
        if self.mean is not None and self.mean.shape != (d,):
            raise ValueError(f"mean must be [{d}], got {tuple(self.mean.shape)}.")
        if len(self.ranks) != len(self.accuracies):
            raise ValueError(
                f"ranks ({len(self.ranks)}) and accuracies ({len(self.accuracies)}) must align."
            )

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the vectors it acts on."""
        return int(self.matrix.shape[0])

    @property
    def n_removed(self) -> int:
        """Number ``k`` of erased directions (the rank of ``I - P``)."""
        return int(self.removed.shape[0])

    @property
    def is_orthogonal(self) -> bool:
        """True when ``P`` is an orthogonal (symmetric) projection with no affine shift."""
        return self.readout is None and self.mean is None

    def apply(self, x: ArrayT) -> ArrayT:
        """Erase from ``x [..., d]`` (numpy or torch), keeping its type, dtype and device.

        Costs ``O(k d)`` per vector. Safe inside a forward hook: any leading shape (batch,
        position, ...) and autograd pass through.

        Example:
            >>> import numpy as np
            >>> p = identity_projection(4)
            >>> p.apply(np.ones((2, 4), dtype=np.float32)).dtype
            dtype('float32')
        """
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"apply needs floating-point input, got {x.dtype}; use x.astype.")
            basis, read, mean = self._factors(torch.float64, torch.device("cpu"))
            b, r = basis.numpy().astype(x.dtype), read.numpy().astype(x.dtype)
            centred = x if mean is None else x - mean.numpy().astype(x.dtype)
            self._check_last_dim(x.shape)
            return x - (centred @ r.T) @ b
        if isinstance(x, Tensor):
            if not x.is_floating_point():
                raise TypeError(f"apply needs floating-point input, got {x.dtype}; use x.float().")
            self._check_last_dim(tuple(x.shape))
            basis_t, read_t, mean_t = self._factors(x.dtype, x.device)
            centred_t = x if mean_t is None else x - mean_t
            return x - (centred_t @ read_t.T) @ basis_t
        raise TypeError(f"apply takes a numpy array or torch tensor, got {type(x).__name__}.")

    def _check_last_dim(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 0 or shape[-1] != self.dim:
            raise ValueError(
                f"apply needs [..., {self.dim}] input, got shape {shape}; the projection was "
                f"fitted on {self.dim}-dimensional vectors."
            )

    def _factors(
        self, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        key = (dtype, str(device))
        if key not in self._cast:
            read = self.removed if self.readout is None else self.readout
            mean = None if self.mean is None else self.mean.to(device=device, dtype=dtype)
            self._cast[key] = (
                self.removed.to(device=device, dtype=dtype),
                read.to(device=device, dtype=dtype),
                mean,
            )
        return self._cast[key]

    def to_frame(self) -> pd.DataFrame:
        """Held-out probe accuracy per iteration, one row each (empty for non-INLP methods).

        Columns: ``method``, ``iteration`` (0 = before erasure), ``n_removed``, ``accuracy``,
        ``majority_baseline``.

        Example:
            >>> identity_projection(3).to_frame().columns.tolist()
            ['method', 'iteration', 'n_removed', 'accuracy', 'majority_baseline']
        """
        return pd.DataFrame(
            {
                "method": [self.method] * len(self.accuracies),
                "iteration": list(range(len(self.accuracies))),
                "n_removed": list(self.ranks),
                "accuracy": list(self.accuracies),
                "majority_baseline": [self.majority_baseline] * len(self.accuracies),
            },
            columns=["method", "iteration", "n_removed", "accuracy", "majority_baseline"],
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Probe accuracy by iteration with the majority baseline; returns the Figure.

        Example:
            >>> fig = identity_projection(3).plot()  # doctest: +SKIP
        """
        if not self.accuracies:
            raise ValueError(
                f"This {self.method!r} projection recorded no probe accuracies to plot; "
                "only inlp() records them (plot an inlp() result instead)."
            )
        if ax is None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(5, 3.2))
            ax = fig.add_subplot()
        frame = self.to_frame()
        ax.plot(frame["iteration"], frame["accuracy"], marker="o", label="held-out probe")
        if self.majority_baseline is not None:
            ax.axhline(self.majority_baseline, color="grey", ls="--", label="majority baseline")
        ax.set_xlabel("INLP iteration")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.method}: {self.n_removed} of {self.dim} directions removed")
        ax.legend(loc="best")
        figure = ax.get_figure()
        assert figure is not None
        return figure  # type: ignore[return-value]

    def save(self, path: str | Path) -> None:
        """Write to one ``.safetensors`` file (tensors exact, metadata as JSON; no pickle).

        Example:
            >>> import tempfile, os
            >>> p = random_projection(6, 2)
            >>> f = os.path.join(tempfile.mkdtemp(), "p.safetensors")
            >>> p.save(f); bool(torch.equal(Projection.load(f).matrix, p.matrix))
            True
        """
        tensors = {"matrix": self.matrix, "removed": self.removed}
        if self.readout is not None:
            tensors["readout"] = self.readout
        if self.mean is not None:
            tensors["mean"] = self.mean
        meta = {
            "format": _FORMAT,
            "method": self.method,
            "accuracies": json.dumps(list(self.accuracies)),
            "ranks": json.dumps(list(self.ranks)),
            "majority_baseline": json.dumps(self.majority_baseline),
        }
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        """Read a file written by :meth:`save`."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(
                    f"{path} is not a saved mechprobe Projection (format {meta.get('format')!r}); "
                    "write it with Projection.save."
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        return cls(
            matrix=tensors["matrix"],
            removed=tensors["removed"],
            method=meta["method"],
            accuracies=tuple(float(a) for a in json.loads(meta["accuracies"])),
            ranks=tuple(int(r) for r in json.loads(meta["ranks"])),
            majority_baseline=json.loads(meta["majority_baseline"]),
            readout=tensors.get("readout"),
            mean=tensors.get("mean"),
        )


def _orthogonal(removed: Tensor, method: str, **fields: Any) -> Projection:
    """Projection onto the orthogonal complement of the rows of ``removed`` (orthonormal)."""
    removed = removed.to(torch.float64)
    eye = torch.eye(removed.shape[1], dtype=torch.float64)
    return Projection(
        matrix=eye - removed.T @ removed, removed=removed.contiguous(), method=method, **fields
    )


def _check_rank(dim: int, n_removed: int) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    if isinstance(n_removed, bool) or not isinstance(n_removed, int) or not 0 <= n_removed <= dim:
        raise ValueError(
            f"n_removed must be an int in [0, {dim}], got {n_removed!r}; pass e.g. "
            "projection.n_removed of the projection you want to match."
        )


def random_projection(dim: int, n_removed: int, seed: int = 0) -> Projection:
    """Control: remove ``n_removed`` uniformly random orthonormal directions.

    The directions are the sign-fixed Q factor of a Gaussian ``[dim, n_removed]`` matrix, which is
    Haar-distributed, so the subspace is uniform. Match an erasure's rank with
    ``random_projection(p.dim, p.n_removed)``.

    Example:
        >>> random_projection(10, 4, seed=1).n_removed
        4
    """
    _check_rank(dim, n_removed)
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(dim, n_removed, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # QR is unique only up to column signs; fixing diag(R) > 0 makes Q Haar-uniform.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return _orthogonal((q * signs).T, "random")


def dropout_projection(dim: int, n_removed: int, seed: int = 0) -> Projection:
    """Control (Elazar et al.'s dropout): zero ``n_removed`` randomly chosen coordinates.

    Example:
        >>> import torch
        >>> p = dropout_projection(5, 2, seed=0)
        >>> int((p.apply(torch.ones(5)) == 0).sum())
        2
    """
    _check_rank(dim, n_removed)
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randperm(dim, generator=gen)[:n_removed].sort().values
    return _orthogonal(torch.eye(dim, dtype=torch.float64)[coords], "dropout")


def identity_projection(dim: int) -> Projection:
    """The no-op erasure (rank 0), for a vanilla condition in the same code path.

    Example:
        >>> identity_projection(4).n_removed
        0
    """
    _check_rank(dim, 0)
    return _orthogonal(torch.zeros(0, dim, dtype=torch.float64), "identity")


def _check_xy(X: Any, y: Any, caller: str) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Validate ``X [n, d]`` and labels ``y [n]``; returns (X as a tensor, codes, classes)."""
    if isinstance(X, np.ndarray):
        X = torch.from_numpy(X)
    if not isinstance(X, Tensor):
        raise TypeError(
            f"{caller}: X must be a numpy array or torch tensor [n, d], got {type(X).__name__}."
        )
    if X.ndim != 2:
        raise ValueError(
            f"{caller}: X must be 2-D [n_examples, d], got shape {tuple(X.shape)}; flatten "
            "leading dims first, e.g. X.reshape(-1, X.shape[-1])."
        )
    if X.is_complex() or X.dtype == torch.bool:
        raise TypeError(f"{caller}: X must hold real numbers, got {X.dtype}.")
    if not X.is_floating_point():
        X = X.float()
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{caller}: X contains NaN or infinite values; drop or impute those rows.")
    labels = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if labels.ndim != 1:
        raise ValueError(
            f"{caller}: y must be 1-D [n_examples] class labels, got shape {labels.shape}; "
            "pass class indices, not one-hot rows (use y.argmax(-1))."
        )
    if len(labels) != X.shape[0]:
        raise ValueError(
            f"{caller}: X has {X.shape[0]} rows but y has {len(labels)} labels; they must match."
        )
    if labels.dtype.kind == "f" and np.isnan(labels).any():
        raise ValueError(f"{caller}: y contains NaN labels; drop those rows from X and y.")
    classes, codes = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"{caller}: y has a single class ({classes.tolist()}); erasure needs at least two "
            "distinct labels."
        )
    return X, codes.astype(np.int64), classes
