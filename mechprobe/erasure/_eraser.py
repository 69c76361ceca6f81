"""The fitted erasure: :class:`Eraser`, its rank-matched controls and the rank-revealing basis.

An :class:`Eraser` is what :func:`~mechprobe.inlp` and :func:`~mechprobe.leace` return, what
:class:`~mechprobe.Project` hooks into a model and what :func:`~mechprobe.amnesic` measures. It
stores only its factors, for row vectors ``x [..., d]``::

    x' = x - ((x - mean) @ readout.T) @ removed

``removed [k, d]`` is an orthonormal basis of the directions that change (the range of ``I - P``)
and ``readout [k, d]`` reads the coordinates to subtract. For an orthogonal projection (INLP and
the random, dropout and identity controls) ``readout`` is None (it equals ``removed``) and ``mean``
is None, so ``x' = x (I - removedᵀ removed)``. LEACE is oblique and affine: ``readout`` differs
from ``removed`` and ``mean`` is the training mean, which the erasure leaves in place (with
``affine=False`` ``mean`` is None: a linear map; with ``method="orth"`` ``readout`` is None: an
orthogonal projection, affine or not). The dense matrix :attr:`Eraser.P` (acting on column
vectors, ``x' = mean + P (x - mean)``) is derived on demand; applying the eraser costs two thin
products, ``O(k d)`` per vector, never ``O(d²)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import Result, check_finite, check_int, check_seed, class_labels, new_axes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Eraser",
    "dropout_projection",
    "identity_projection",
    "orthonormal_basis",
    "random_projection",
]

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)
# "leace-orth" and "leace-blend" are leace(method="orth") and leace(constrain_cov_trace=True)
# where the constraint triggered: other maps than LEACE's, so named apart (files of older
# releases, which know neither, refuse them by name).
_METHODS = ("inlp", "leace", "leace-orth", "leace-blend", "random", "dropout", "identity")


@dataclass(frozen=True, eq=False, repr=False)
class Eraser(Result, format="mechprobe.Eraser", version=1):
    """A fitted erasure ``x -> x'`` that removes ``n_removed`` directions from ``d``-dim vectors.

    Callable: ``eraser(x)`` is :meth:`apply`. Frozen: it holds its factors and its fit's record,
    nothing else (casting for a device or dtype makes a new eraser, :meth:`to`, which shares the
    tensors that need no cast). Torch has no read-only tensors: writing into ``removed`` in place
    changes the eraser (and any made from it by ``to``); clone before editing.

    Attributes:
        removed: ``[k, d]`` orthonormal basis of the erased directions (the range of ``I - P``).
        method: ``"inlp"``, ``"leace"``, ``"random"``, ``"dropout"`` or ``"identity"``; also
            ``"leace-orth"`` (:func:`~mechprobe.leace` with ``method="orth"``, an orthogonal
            projection) and ``"leace-blend"`` (``constrain_cov_trace=True`` where it triggered:
            LEACE blended towards ``"leace-orth"``, not idempotent, erasure no longer exact).
        readout: ``[k, d]`` coordinates read for subtraction, ``I - P = removedᵀ readout``; None
            means ``readout == removed`` (an orthogonal projection).
        mean: ``[d]`` centre of an affine erasure (LEACE keeps the mean in place); None if linear
            (also LEACE fitted with ``affine=False``).
        accuracies: Held-out probe accuracy before the first INLP iteration and after each kept
            one (INLP only; empty otherwise).
        ranks: Directions removed after each entry of ``accuracies`` (same length).
        majority_baseline: Held-out accuracy of always predicting the most frequent class (INLP).

    Example:
        >>> import torch
        >>> eraser = random_projection(8, 3, seed=0)
        >>> x = torch.randn(2, 5, 8)
        >>> y = eraser(x)
        >>> bool(torch.allclose(eraser(y), y, atol=1e-5)), eraser.n_removed
        (True, 3)
    """

    removed: Float[Tensor, "k d"]
    method: str
    readout: Float[Tensor, "k d"] | None = None
    mean: Float[Tensor, " d"] | None = None
    accuracies: tuple[float, ...] = ()
    ranks: tuple[int, ...] = ()
    majority_baseline: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.removed, Tensor) or self.removed.ndim != 2:
            raise ValueError(
                f"removed must be a [k, d] tensor, got {type(self.removed).__name__} of shape "
                f"{tuple(getattr(self.removed, 'shape', ()))}."
            )
        d = self.removed.shape[1]
        if d < 1:
            raise ValueError("removed must have at least one column (d >= 1).")
        if self.readout is not None and tuple(self.readout.shape) != tuple(self.removed.shape):
            raise ValueError(
                f"readout must have the shape of removed {tuple(self.removed.shape)}, "
                f"got {tuple(self.readout.shape)}."
            )
        if self.mean is not None and tuple(self.mean.shape) != (d,):
            raise ValueError(f"mean must be [{d}], got {tuple(self.mean.shape)}.")
        if len(self.ranks) != len(self.accuracies):
            raise ValueError(
                f"ranks ({len(self.ranks)}) and accuracies ({len(self.accuracies)}) must align."
            )
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {list(_METHODS)}, got {self.method!r}.")
        for name in ("removed", "readout", "mean"):
            value = getattr(self, name)
            if value is not None:
                check_finite(value, f"Eraser.{name}")
        if self.readout is None and self.removed.shape[0]:
            # An orthogonal eraser subtracts removedᵀ removed x: right only for orthonormal rows
            # (rows [3, 4, 0] took [3, 4, 1] to [-72, -96, 1]). Tolerance: float rounding of the
            # stored dtype over d terms, with room.
            rows = self.removed.to(torch.float64)
            gram = rows @ rows.T
            error = float(
                (gram - torch.eye(len(rows), dtype=gram.dtype, device=gram.device)).abs().max()
            )
            tol = 100 * torch.finfo(self.removed.dtype).eps * max(1.0, d**0.5)
            if error > tol:
                raise ValueError(
                    f"removed must hold orthonormal rows for an orthogonal eraser (|R Rᵀ - I| "
                    f"reaches {error:.3g}): orthonormalise them first "
                    "(torch.linalg.qr(rows.T).Q.T), use mp.Project(remove=rows), which does, or "
                    "pass readout= for an oblique eraser."
                )

    # --- what it is ------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Dimension ``d`` of the vectors it acts on."""
        return int(self.removed.shape[1])

    @property
    def n_removed(self) -> int:
        """Number ``k`` of erased directions (the rank of ``I - P``)."""
        return int(self.removed.shape[0])

    @property
    def is_orthogonal(self) -> bool:
        """True when ``P`` is an orthogonal (symmetric) projection with no affine shift."""
        return self.readout is None and self.mean is None

    @property
    def P(self) -> Float[Tensor, "d d"]:
        """The dense ``[d, d]`` matrix on column vectors, ``I - removedᵀ readout`` (computed).

        Symmetric and idempotent for the orthogonal methods; idempotent but not symmetric for
        LEACE, where ``x' = mean + P (x - mean)`` (``x' = P x`` when ``mean`` is None); neither
        for ``"leace-blend"``.

        Example:
            >>> identity_projection(2).P
            tensor([[1., 0.],
                    [0., 1.]], dtype=torch.float64)
        """
        read = self.removed if self.readout is None else self.readout
        eye = torch.eye(self.dim, dtype=self.removed.dtype, device=self.removed.device)
        return eye - self.removed.T @ read.to(self.removed.dtype)

    @property
    def matrix(self) -> Float[Tensor, "d d"]:
        """The old name of :attr:`P` (``Projection.matrix``), kept for one release."""
        return self.P

    # --- applying it -----------------------------------------------------------------------------

    def apply(self, x: ArrayT) -> ArrayT:
        """Erase from ``x [..., d]`` (numpy or torch), keeping its type, dtype and device.

        Costs ``O(k d)`` per vector. Safe inside a forward hook: any leading shape (batch,
        position, ...) and autograd pass through. ``eraser(x)`` is the same call.

        Args:
            x: ``[..., d]`` floating-point vectors, a numpy array or a torch tensor.

        Returns:
            ``x`` with the removed directions erased: the same type, shape, dtype and device.

        Raises:
            TypeError: ``x`` is not a floating-point array or tensor.
            ValueError: ``x``'s last axis is not the eraser's ``dim``.

        Example:
            >>> import numpy as np
            >>> identity_projection(4).apply(np.ones((2, 4), dtype=np.float32)).dtype
            dtype('float32')
        """
        # 16-bit input is erased in float32 and rounded once: computed in bfloat16, the erased
        # activations kept about five times more of the concept (review 43a S1).
        if isinstance(x, np.ndarray):
            if not np.issubdtype(x.dtype, np.floating):
                raise TypeError(f"apply needs floating-point input, got {x.dtype}; use x.astype.")
            self._check_last_dim(x.shape)
            work = np.promote_types(x.dtype, np.float32)
            basis, read = _numpy(self.removed, work), _numpy(self._read(), work)
            xw = x.astype(work, copy=False)
            centred = xw if self.mean is None else xw - _numpy(self.mean, work)
            return (xw - (centred @ read.T) @ basis).astype(x.dtype, copy=False)
        if isinstance(x, Tensor):
            if not x.is_floating_point():
                raise TypeError(f"apply needs floating-point input, got {x.dtype}; use x.float().")
            self._check_last_dim(tuple(x.shape))
            dtype = torch.promote_types(x.dtype, torch.float32)
            # A no-op when the factors already match (see to()); else a [k, d] cast per call.
            basis_t = self.removed.to(device=x.device, dtype=dtype)
            read_t = self._read().to(device=x.device, dtype=dtype)
            xw = x.to(dtype)
            centred_t = xw if self.mean is None else xw - self.mean.to(device=x.device, dtype=dtype)
            return (xw - (centred_t @ read_t.T) @ basis_t).to(x.dtype)
        raise TypeError(f"apply takes a numpy array or torch tensor, got {type(x).__name__}.")

    __call__ = apply

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Eraser:
        """A copy whose factors live on ``device`` in ``dtype``, so that a hook applying it on
        every forward pass casts nothing (the fit's record is kept).

        Args:
            device: Where the factors go (None: where they are).
            dtype: Their dtype (None: as they are).

        Returns:
            A new :class:`Eraser` with the same method and record.

        Example:
            >>> random_projection(4, 1).to(dtype=torch.float32).removed.dtype
            torch.float32
        """

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        removed = cast(self.removed)
        assert removed is not None
        return Eraser(
            removed=removed,
            method=self.method,
            readout=cast(self.readout),
            mean=cast(self.mean),
            accuracies=self.accuracies,
            ranks=self.ranks,
            majority_baseline=self.majority_baseline,
        )

    def _read(self) -> Tensor:
        return self.removed if self.readout is None else self.readout

    def _check_last_dim(self, shape: tuple[int, ...]) -> None:
        if len(shape) == 0 or shape[-1] != self.dim:
            raise ValueError(
                f"apply needs [..., {self.dim}] input, got shape {shape}; the eraser was "
                f"fitted on {self.dim}-dimensional vectors."
            )

    # --- the result protocol ---------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """Held-out probe accuracy per INLP iteration, one row each; for other methods one row,
        the erasure as fitted (``iteration`` ``<NA>``, ``accuracy`` NaN), so that the frames of
        several erasers concatenate into a table of them (an empty frame said nothing).

        Columns: ``method``, ``iteration`` (``Int64``, 0 = before erasure), ``n_removed``,
        ``accuracy``, ``majority_baseline`` (float, NaN where no probe was fitted).

        Example:
            >>> identity_projection(3).to_frame().columns.tolist()
            ['method', 'iteration', 'n_removed', 'accuracy', 'majority_baseline']
            >>> random_projection(8, 2).to_frame()[["method", "n_removed"]].values.tolist()
            [['random', 2]]
        """
        # One dtype per column whatever the method (LEACE's majority_baseline was an object
        # None, INLP's float64; iteration Int64 and int64): concatenated frames keep them.
        majority = np.nan if self.majority_baseline is None else float(self.majority_baseline)
        if not self.accuracies:
            return pd.DataFrame(
                {
                    "method": [self.method],
                    "iteration": pd.array([None], dtype="Int64"),
                    "n_removed": [self.n_removed],
                    "accuracy": [float("nan")],
                    "majority_baseline": np.array([majority], dtype=np.float64),
                }
            )
        return pd.DataFrame(
            {
                "method": [self.method] * len(self.accuracies),
                "iteration": pd.array(range(len(self.accuracies)), dtype="Int64"),
                "n_removed": list(self.ranks),
                "accuracy": list(self.accuracies),
                "majority_baseline": np.full(len(self.accuracies), majority, dtype=np.float64),
            },
            columns=["method", "iteration", "n_removed", "accuracy", "majority_baseline"],
        )

    def summary(self) -> pd.DataFrame:
        """One row: method, ``dim``, ``n_removed``, whether affine, and (INLP only) the probe
        accuracy before and after erasure beside the majority baseline.

        Example:
            >>> random_projection(6, 2).summary()[["method", "dim", "n_removed"]].values.tolist()
            [['random', 6, 2]]
        """
        row = {
            "method": self.method,
            "dim": self.dim,
            "n_removed": self.n_removed,
            "affine": self.mean is not None,
        }
        if self.accuracies:  # INLP's; the other erasers fit no probe (the columns read None)
            row |= {
                "accuracy_before": self.accuracies[0],
                "accuracy_after": self.accuracies[-1],
                "majority_baseline": self.majority_baseline,
            }
        return pd.DataFrame([row])

    def _describe(self) -> str:
        words = f"{self.method}, {self.n_removed} of {self.dim} directions removed"
        if not self.is_orthogonal:  # say both what P is and whether a centre is kept
            shape = "orthogonal" if self.readout is None else "oblique"
            words += f", {shape} {'linear' if self.mean is None else 'affine'}"
        if self.accuracies:
            words += f", probe {self.accuracies[0]:.3f} -> {self.accuracies[-1]:.3f}"
            if self.majority_baseline is not None:
                words += f" (majority {self.majority_baseline:.3f})"
        return words

    def plot(self, ax: Axes | None = None) -> Figure:
        """Probe accuracy by INLP iteration with the majority baseline (erasers from
        :func:`~mechprobe.inlp`), or, for erasers that record no accuracies (LEACE, random,
        dropout, identity), the singular values of ``I - P``: how strongly each direction is
        removed (1 for each removed direction of an orthogonal projection; LEACE's oblique one
        differs).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> fig = random_projection(8, 3, seed=0).plot()
            >>> [round(float(v), 6) for v in fig.axes[0].lines[0].get_ydata()][:4]
            [1.0, 1.0, 1.0, 0.0]
        """
        figure, ax = new_axes(ax, (5, 3.2))
        if not self.accuracies:
            # The strength of the removal per direction, largest first, and a few kept ones.
            shown = min(self.dim, self.n_removed + 5)
            eye = torch.eye(self.dim, dtype=torch.float64)
            strength = torch.linalg.svdvals(eye - self.P.detach().cpu().double())[:shown]
            ax.plot(range(1, shown + 1), strength.cpu().numpy(), marker="o", ls="none")
            ax.set_xlabel("direction (by strength)")
            ax.set_ylabel("singular value of I - P")
            ax.set_title(f"{self.method}: {self.n_removed} of {self.dim} directions removed")
            return figure
        from matplotlib.ticker import MaxNLocator

        frame = self.to_frame()
        ax.plot(frame["iteration"], frame["accuracy"], marker="o", label="held-out probe")
        if self.majority_baseline is not None:
            ax.axhline(self.majority_baseline, color="grey", ls="--", label="majority baseline")
        ax.set_xlabel("INLP iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.method}: {self.n_removed} of {self.dim} directions removed")
        ax.legend(loc="best")
        return figure

    # --- files -----------------------------------------------------------------------------------


def _numpy(tensor: Tensor, dtype: np.dtype) -> np.ndarray:
    """A factor as a numpy array of ``dtype`` (through float64: numpy has no bfloat16)."""
    return tensor.detach().cpu().to(torch.float64).cpu().numpy().astype(dtype, copy=False)


def orthonormal_basis(
    rows: Float[Tensor, "r d"] | np.ndarray,
    basis: Float[Tensor, "k d"] | None = None,
    *,
    rtol: float | None = None,
) -> Float[Tensor, "m d"]:
    """Orthonormal rows spanning ``span(basis) + span(rows)``, ``basis`` kept as the first rows.

    Rank-revealing: the removed rank is the rank of what was given. Zero rows add nothing, and
    each row is normalised before the singular value decomposition of its part outside
    ``basis``, so a direction counts only if its singular value exceeds ``rtol`` (default
    ``max(r, d)`` times the machine epsilon of the rows' dtype, numpy's ``matrix_rank`` rule).

    Raises:
        ValueError: Rows that are not ``[r, d]`` (or ``[d]``) or hold NaN or infinity.

    Example:
        >>> v = torch.tensor([3.0, 4.0, 0.0])
        >>> orthonormal_basis(torch.stack([v, 2 * v, torch.zeros(3)])).shape
        torch.Size([1, 3])
    """
    given = torch.from_numpy(np.asarray(rows)) if not isinstance(rows, Tensor) else rows.detach()
    if given.ndim == 1:
        given = given[None]
    if given.ndim != 2 or (basis is not None and given.shape[1] != basis.shape[1]):
        raise ValueError(f"rows must be [r, d] (or [d]), got shape {tuple(given.shape)}.")
    check_finite(given, "rows")
    dtype = given.dtype if given.is_floating_point() else torch.float64
    if rtol is None:
        rtol = max(given.shape) * torch.finfo(dtype).eps
    found = given.to(torch.float64)
    norms = found.norm(dim=1)
    found = found[norms > 0] / norms[norms > 0, None]
    if basis is not None and basis.shape[0] and found.shape[0]:
        basis = basis.to(device=found.device, dtype=torch.float64)
        for _ in range(2):  # twice: orthogonal to the basis to machine precision
            found = found - (found @ basis.T) @ basis
    if found.shape[0]:
        _, singular, vh = torch.linalg.svd(found, full_matrices=False)
        found = vh[singular > rtol]
    if basis is not None and basis.shape[0] and found.shape[0]:
        # A row nearly inside span(basis) leaves a small part whose SVD rounding, scaled up by
        # 1 / singular, reaches back into the basis (1e-13 at singular 1.7e-4): project once
        # more and re-orthonormalise, or the concatenation is not orthonormal.
        found = found - (found @ basis.T) @ basis
        found = torch.linalg.qr(found.T).Q.T
    if basis is None:
        return found.contiguous()
    return torch.cat([basis.to(device=found.device, dtype=torch.float64), found])


def _orthogonal(removed: Tensor, method: str, **fields: Any) -> Eraser:
    """The orthogonal eraser of the (orthonormal) rows of ``removed``."""
    return Eraser(removed=removed.to(torch.float64).contiguous(), method=method, **fields)


def _check_rank(dim: int, n_removed: int) -> tuple[int, int]:
    dim = check_int(dim, "dim", 1)
    number = check_int(n_removed, "n_removed", 0)
    if number > dim:
        raise ValueError(
            f"n_removed must be an int in [0, {dim}], got {number}; pass e.g. "
            "eraser.n_removed of the eraser you want to match."
        )
    return dim, number


def random_projection(
    dim: int,
    n_removed: int,
    *,
    random_directions: Literal["sphere", "cube"] = "sphere",
    seed: int = 0,
) -> Eraser:
    """Control: remove ``n_removed`` random orthonormal directions.

    With ``random_directions="sphere"`` (the default) the directions are the sign-fixed Q factor
    of a Gaussian ``[dim, n_removed]`` matrix, which is Haar-distributed, so the subspace is
    uniform. ``"cube"`` is Elazar et al.'s control as their code draws it
    (``amnesic_probing/tasks/utils.py``, ``rand_direction_control``): vectors with entries
    uniform in ``[-0.5, 0.5]``, whose span is removed; such vectors lean towards the cube's
    diagonals, so their subspace is not uniform. Match an erasure's rank with
    ``random_projection(eraser.dim, eraser.n_removed)``.

    Args:
        dim: The width of the vectors erased (e.g. ``eraser.dim``), at least 1.
        n_removed: The number of directions removed, from 0 to ``dim`` (e.g.
            ``eraser.n_removed``).
        random_directions: ``"sphere"`` (uniform subspaces) or ``"cube"`` (Elazar et al.'s).
        seed: Seed of the draw; equal seeds give the same directions.

    Returns:
        An orthogonal :class:`Eraser` of ``method="random"`` removing ``n_removed`` orthonormal
        directions of ``dim``-wide vectors.

    Raises:
        ValueError: ``n_removed`` is outside ``[0, dim]``, or ``random_directions`` is neither
            form.

    Example:
        >>> random_projection(10, 4, seed=1).n_removed
        4
        >>> random_projection(10, 4, random_directions="cube", seed=1).n_removed
        4
    """
    dim, n_removed = _check_rank(dim, n_removed)
    if random_directions not in ("sphere", "cube"):
        raise ValueError(
            f"random_directions must be 'sphere' (uniform subspaces) or 'cube' (Elazar et al.'s "
            f"entries uniform in [-0.5, 0.5]), got {random_directions!r}."
        )
    gen = torch.Generator().manual_seed(check_seed(seed))
    if random_directions == "cube":
        cube = torch.rand(dim, n_removed, generator=gen, dtype=torch.float64) - 0.5
        return _orthogonal(torch.linalg.qr(cube)[0].T, "random")
    gauss = torch.randn(dim, n_removed, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # QR is unique only up to column signs; fixing diag(R) > 0 makes Q Haar-uniform.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return _orthogonal((q * signs).T, "random")


def dropout_projection(dim: int, n_removed: int, *, seed: int = 0) -> Eraser:
    """Control (Elazar et al.'s dropout): zero ``n_removed`` randomly chosen coordinates.

    Args:
        dim: The width of the vectors erased (e.g. ``eraser.dim``), at least 1.
        n_removed: The number of coordinates zeroed, from 0 to ``dim``.
        seed: Seed of the choice of coordinates.

    Returns:
        An orthogonal :class:`Eraser` of ``method="dropout"`` whose removed directions are the
        chosen coordinates' unit vectors.

    Raises:
        ValueError: ``n_removed`` is outside ``[0, dim]``.

    Example:
        >>> import torch
        >>> eraser = dropout_projection(5, 2, seed=0)
        >>> int((eraser(torch.ones(5)) == 0).sum())
        2
    """
    dim, n_removed = _check_rank(dim, n_removed)
    gen = torch.Generator().manual_seed(check_seed(seed))
    coords = torch.randperm(dim, generator=gen)[:n_removed].sort().values
    return _orthogonal(torch.eye(dim, dtype=torch.float64)[coords], "dropout")


def identity_projection(dim: int) -> Eraser:
    """The no-op erasure (rank 0), for a vanilla condition in the same code path.

    Args:
        dim: The width of the vectors it takes, at least 1.

    Returns:
        An :class:`Eraser` of ``method="identity"`` that removes nothing (``n_removed == 0``).

    Example:
        >>> identity_projection(4).n_removed
        0
    """
    dim, _ = _check_rank(dim, 0)
    return _orthogonal(torch.zeros(0, dim, dtype=torch.float64), "identity")


def check_xy(X: Any, y: Any, caller: str) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """Validate ``X [n, d]`` and labels ``y [n]``; returns (X as a tensor, codes, classes)."""
    if isinstance(X, np.ndarray):
        # A read-only array (Activations.values) is copied: torch would share it writable.
        X = torch.from_numpy(X if X.flags.writeable else X.copy())
    if isinstance(X, Tensor):
        X = X.detach()  # the fits need no graph (a tensor requiring grad broke INLP's out= ops)
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
    classes, codes = class_labels(y, f"{caller}: y")
    if len(codes) != X.shape[0]:
        raise ValueError(
            f"{caller}: X has {X.shape[0]} rows but y has {len(codes)} labels; they must match."
        )
    return X, codes.astype(np.int64), classes
