"""LEACE: least-squares concept erasure in closed form (Belrose et al. 2023), fitted in one call
(:func:`leace`) or streamed batch by batch (:class:`LeaceFitter`).

LEACE finds the affine map ``x' = x - (I - P)(x - mean)`` that changes ``x`` least (in the norm
of the covariance it whitens with: the shrunk estimate by default, the sample covariance with
``shrinkage=False``) while making the class means of ``x'`` equal, so that no linear classifier
can do better than a constant. With the covariance ``S`` of ``X`` and its inverse square root ``W``:

1. whiten: the cross-covariance of whitened ``X`` with the one-hot labels is ``W S_xz``;
2. ``U`` = left singular vectors of ``W S_xz`` (rank <= classes - 1; values under ``svd_tol`` are
   dropped as noise, with a warning: the class means still differ along those directions);
3. ``P = I - W^+ U U^T W``: orthogonal projection in whitened space, so *oblique* in the
   original one.

Everything it needs is the mean of ``x`` and of the labels and two scatter matrices, which
:class:`LeaceFitter` accumulates with Chan et al.'s pairwise update (exact, in float64), so data
too large for memory (a memory-mapped :class:`~mechprobe.Activations`) is fitted in chunks with
the same result as all at once.

concept-erasure's three options are switches here too: ``method="orth"`` (``U`` from ``S_xz``
itself, ``P = I - U U^T``: an orthogonal projection, which also equalises the class means but
moves ``x`` more than LEACE), ``affine=False`` (``x' = P x``: the same ``P``, from the same centred
statistics, without the shift that keeps the mean in place; the class means still coincide, at
``P mean``) and ``constrain_cov_trace=True`` (see :func:`leace`; off by default here, on there).

This is an independent implementation; it agrees with ``concept_erasure.LeaceFitter`` given the
same options (tests/test_leace_options.py checks every combination), except where the trace
constraint triggers: there concept-erasure 0.2.4 factors its blend wrongly (see
:func:`_constrain_trace`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import check_bool, check_choice, check_float, check_int, warn
from mechprobe.erasure._eraser import Eraser, check_xy

__all__ = ["LeaceFitter", "leace"]

LeaceMethod = Literal["leace", "orth"]
_LEACE_METHODS = ("leace", "orth")

# What to do with labels that are not class indices 0..n_classes-1 (LeaceFitter.update).
_TO_INDICES = "map labels to indices first (e.g. np.unique(labels, return_inverse=True))"


class LeaceFitter:
    """Streaming LEACE: :meth:`update` with batches of ``(x, class index)``, then :meth:`eraser`.

    Statistics (means, the scatter of ``x`` and its cross-scatter with the labels) are kept in
    float64 on ``device`` and merged exactly, so any split into batches gives the statistics of
    the whole data set, to rounding. Labels are one-hot encoded (a single 0/1 column for two
    classes), as in :func:`leace`.

    Args:
        dim: Width ``d`` of ``x``.
        n_classes: Number of classes; labels are indices ``0 .. n_classes - 1``.
        method: ``"leace"`` (the oblique least-squares erasure) or ``"orth"`` (an orthogonal
            projection onto the null space of the cross-covariance); see :func:`leace`.
        affine: Keep the mean in place (``x' = mean + P (x - mean)``); False gives the linear
            ``x' = P x`` with the same ``P``.
        constrain_cov_trace: concept-erasure's blend towards an orthogonal projection where the
            oblique erasure would raise the covariance's trace (see :func:`leace`).
        shrinkage: Estimate the covariance with optimal linear shrinkage (see :func:`leace`).
        svd_tol: Singular values of the (for ``"leace"`` whitened) cross-covariance below this
            are dropped (with a warning where such a direction still separates the class means).
        device: Where the statistics live (default: CPU).

    Attributes:
        n: Rows seen. mean_x: ``[d]``; mean_z: ``[c]``; scatter_xx: ``[d, d]``
        ``Σ (x - mean_x)(x - mean_x)ᵀ``, None for ``method="orth"`` (which needs no covariance
        of ``x``: its ``O(n d²)`` update is skipped, as concept-erasure does); scatter_xz:
        ``[d, c]`` ``Σ (x - mean_x)(z - mean_z)ᵀ`` (``c = 1`` for two classes, else
        ``n_classes``); counts: ``[n_classes]`` rows per class.

    Example:
        >>> import torch
        >>> X = torch.randn(600, 5, dtype=torch.float64); y = (X[:, 0] > 0).long()
        >>> fitter = LeaceFitter(5, 2, method="orth", affine=False)
        >>> for rows in torch.arange(600).split(200):
        ...     fitter = fitter.update(X[rows], y[rows])
        >>> eraser = fitter.eraser()
        >>> eraser.method, eraser.is_orthogonal
        ('leace-orth', True)
        >>> ref = leace(X, y, method="orth", affine=False)
        >>> bool(torch.allclose(eraser(X), ref(X), atol=1e-10))
        True
    """

    def __init__(
        self,
        dim: int,
        n_classes: int,
        *,
        method: LeaceMethod = "leace",
        affine: bool = True,
        constrain_cov_trace: bool = False,
        shrinkage: bool = True,
        svd_tol: float = 0.01,
        device: torch.device | str | None = None,
    ) -> None:
        self.dim = check_int(dim, "dim", 1)
        self.n_classes = check_int(n_classes, "n_classes", 2)
        self.method, self.affine, self.constrain_cov_trace, self.shrinkage, self.svd_tol = (
            _check_options(method, affine, constrain_cov_trace, shrinkage, svd_tol)
        )
        width = 1 if self.n_classes == 2 else self.n_classes
        kw: dict[str, Any] = {"dtype": torch.float64, "device": device}
        self.n = 0
        self.mean_x = torch.zeros(self.dim, **kw)
        self.mean_z = torch.zeros(width, **kw)
        self.scatter_xx: Tensor | None = (
            torch.zeros(self.dim, self.dim, **kw) if self.method == "leace" else None
        )
        self.scatter_xz = torch.zeros(self.dim, width, **kw)
        self.counts = torch.zeros(self.n_classes, dtype=torch.int64)

    def __repr__(self) -> str:
        options = "" if self.method == "leace" else f", method={self.method!r}"
        options += "" if self.affine else ", affine=False"
        options += ", constrain_cov_trace=True" if self.constrain_cov_trace else ""
        return f"LeaceFitter(dim={self.dim}, n_classes={self.n_classes}{options}, n={self.n})"

    def update(self, x: Any, z: Any) -> LeaceFitter:
        """Add a batch: ``x [n, d]`` (numpy or torch) and class indices ``z [n]``; returns self.

        Args:
            x: ``[n, d]`` rows (numpy or torch, finite; ``d`` the fitter's ``dim``).
            z: ``[n]`` integer class indices, ``0..n_classes - 1``, one per row.

        Returns:
            The fitter itself, its statistics updated (so that calls chain).

        Raises:
            TypeError: ``z`` holds labels other than integers (strings, floats, bools): map
                them to indices first, e.g. with ``np.unique(labels, return_inverse=True)``.
            ValueError: Wrong shapes, non-finite values, or class indices out of range.
        """
        x_t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x.detach()
        if x_t.ndim != 2 or x_t.shape[1] != self.dim:
            raise ValueError(f"x must be [n, {self.dim}], got shape {tuple(x_t.shape)}.")
        x_t = x_t.to(device=self.mean_x.device, dtype=torch.float64)
        if not bool(torch.isfinite(x_t).all()):
            raise ValueError("x contains NaN or infinite values; drop or impute those rows.")
        # The type is checked before torch reads z: label strings (what leace(X, y) takes) met
        # torch's list of supported numpy dtypes instead of the fix.
        values = z.detach() if isinstance(z, Tensor) else np.asarray(z)
        integral = (
            values.dtype.kind in "iu"
            if isinstance(values, np.ndarray)
            else not (
                values.is_floating_point() or values.is_complex() or values.dtype == torch.bool
            )
        )
        if not integral:
            raise TypeError(
                f"z must hold integer class indices 0..{self.n_classes - 1}, got {values.dtype}: "
                f"{_TO_INDICES}."
            )
        codes = torch.as_tensor(values)
        if codes.ndim != 1 or len(codes) != len(x_t):
            raise ValueError(
                f"z must hold one class index per row of x ({len(x_t)}), got shape "
                f"{tuple(codes.shape)}."
            )
        codes = codes.to(device=self.mean_x.device, dtype=torch.long)
        if len(codes) and (int(codes.min()) < 0 or int(codes.max()) >= self.n_classes):
            raise ValueError(
                f"z holds class indices outside 0..{self.n_classes - 1}: {_TO_INDICES}."
            )
        n_batch = len(x_t)
        if n_batch == 0:
            return self
        z_t = _one_hot(codes, self.n_classes)
        mean_x, mean_z = x_t.mean(0), z_t.mean(0)
        xc, zc = x_t - mean_x, z_t - mean_z
        # Chan et al.: scatter of the union = both scatters + the outer product of the mean shift.
        total = self.n + n_batch
        shift_x, shift_z = mean_x - self.mean_x, mean_z - self.mean_z
        weight = self.n * n_batch / total
        if self.scatter_xx is not None:
            self.scatter_xx += xc.T @ xc + weight * torch.outer(shift_x, shift_x)
        self.scatter_xz += xc.T @ zc + weight * torch.outer(shift_x, shift_z)
        self.mean_x += shift_x * (n_batch / total)
        self.mean_z += shift_z * (n_batch / total)
        self.n = total
        self.counts += torch.bincount(codes.cpu(), minlength=self.n_classes)
        return self

    def eraser(self) -> Eraser:
        """The :class:`Eraser` of the statistics so far (on CPU, float64).

        Its ``method`` says what it is: ``"leace"`` (the oblique LEACE projection),
        ``"leace-orth"`` (``method="orth"``: ``readout`` is None, an orthogonal projection) or
        ``"leace-blend"`` (``constrain_cov_trace=True`` where the constraint triggered: a blend
        of the two that no longer equalises the class means exactly). ``mean`` is the training
        mean when ``affine``, else None (a linear eraser).

        Warns:
            UserWarning: Directions that separate the class means were left in place because
                their singular values are under ``svd_tol`` (name how many and the fix).

        Raises:
            ValueError: Fewer than two rows seen, or rows of one class only.
        """
        n = self.n
        if n < 2:
            raise ValueError(f"LEACE needs at least two rows; this fitter has seen {n}.")
        seen = int((self.counts > 0).sum())
        if seen < 2:
            raise ValueError(
                f"LEACE needs rows of at least two classes; this fitter has seen {n} rows, all "
                f"of class {int(self.counts.argmax())}: update it with the other classes' rows."
            )
        # affine=False keeps the centred statistics (and so the same P) and drops only the shift
        # that keeps the mean in place, as concept-erasure does: x' = P x.
        mean = self.mean_x.cpu().clone() if self.affine else None
        sigma_xz = self.scatter_xz / (n - 1)
        if self.scatter_xx is None:  # method="orth": the same SVD, without whitening
            u, s, _ = torch.linalg.svd(sigma_xz, full_matrices=False)
            # Unwhitened, the singular values carry x's units: rounding is relative to the largest.
            _warn_left(s, self.svd_tol, floor=_ROUNDING * float(s.max()))
            u = u[:, s > self.svd_tol]
            # An orthogonal eraser never raises the covariance's trace: nothing to constrain.
            return Eraser(removed=u.T.contiguous().cpu(), method="leace-orth", mean=mean)
        left, right, u, sigma_xx = self._oblique(self.scatter_xx, sigma_xz)
        blend = _constrain_trace(left, right, u, sigma_xx) if self.constrain_cov_trace else None
        if blend is not None:
            removed, readout, _ = blend
            return Eraser(
                removed=removed.contiguous().cpu(),
                method="leace-blend",
                readout=readout.contiguous().cpu(),
                mean=mean,
            )
        # Orthonormal basis of range(I - P); then I - P = removed.T @ (removed @ (I - P)).
        removed = torch.linalg.qr(left).Q.T if left.shape[1] else left.T
        return Eraser(
            removed=removed.contiguous().cpu(),
            method="leace",
            readout=((removed @ left) @ right).contiguous().cpu(),
            mean=mean,
        )

    def _oblique(
        self, scatter_xx: Float[Tensor, "d d"], sigma_xz: Float[Tensor, "d c"]
    ) -> tuple[Float[Tensor, "d r"], Float[Tensor, "r d"], Float[Tensor, "d r"], Tensor]:
        """LEACE's ``I - P = left @ right`` (``left = W^+ U``: what is edited, ``right = Uᵀ W``),
        the whitened directions ``U`` and the covariance ``S`` that whitened."""
        n = self.n
        sigma_xx = _shrink(scatter_xx / n, n) if self.shrinkage else scatter_xx / (n - 1)
        whiten, unwhiten = _whitening(sigma_xx)
        u, s, _ = torch.linalg.svd(whiten @ sigma_xz, full_matrices=False)
        _warn_left(s, self.svd_tol, floor=_ROUNDING)
        u = u[:, s > self.svd_tol]
        return unwhiten @ u, u.T @ whiten, u, sigma_xx


def leace(
    X: Any,
    y: Any,
    *,
    method: LeaceMethod = "leace",
    affine: bool = True,
    constrain_cov_trace: bool = False,
    shrinkage: bool = True,
    svd_tol: float = 0.01,
) -> Eraser:
    """Fit LEACE on ``X [n, d]`` with class labels ``y [n]``; returns an :class:`Eraser`.

    Labels are one-hot encoded (a single 0/1 column for two classes), so at most
    ``classes - 1`` directions are erased. Statistics are computed in float64 on ``X``'s device
    (a :class:`LeaceFitter` with one batch; stream larger data through one yourself). Every
    option has concept-erasure's meaning, and the result agrees with
    ``concept_erasure.LeaceFitter.fit(X, Z, ...)`` given the same options (but for a triggered
    trace constraint, where that package's factors are not the blend it computes).

    ``constrain_cov_trace`` defaults to False here and True in concept-erasure. It blends ``P``
    towards the orthogonal ``Q = I - U Uᵀ`` (``U`` the whitened directions) until the trace of
    the erased covariance is back at the original's, which gives up exact erasure where it
    triggers; mechprobe keeps erasure exact unless asked. It rarely matters: with the covariance
    that whitened, ``tr(P S Pᵀ) = tr S - |S^{1/2} U|²`` cannot exceed ``tr S``, so only rounding
    can trigger it, and the two defaults agree to rounding.

    Args:
        X: Representations ``[n, d]``, numpy or torch (any device; the result is on CPU).
        y: Class labels ``[n]`` (any values; at least two distinct).
        method: ``"leace"`` (default): the oblique projection that moves ``x`` least in the norm
            of the covariance it whitens with (see ``shrinkage``). ``"orth"``: the orthogonal
            projection onto the null space of the cross-covariance ``S_xz`` (no whitening, so
            ``shrinkage`` plays no part); it also
            equalises the class means, but moves ``x`` further, along correlated directions.
        affine: True (default) keeps the mean in place, ``x' = mean + P (x - mean)``. False
            gives the linear ``x' = P x``: the same ``P`` (fitted on centred data, as
            concept-erasure does), without the shift; the class means still coincide, at
            ``P mean``, but the mean moves there.
        constrain_cov_trace: Blend towards the orthogonal projection where the erasure would
            raise the covariance's trace (concept-erasure's default; see above). Only for
            ``method="leace"``: an orthogonal projection never raises it.
        shrinkage: Estimate the covariance with optimal linear shrinkage towards a multiple of
            the identity (as concept-erasure does by default); helps when ``n`` is not much
            larger than ``d``. ``False`` uses the plain sample covariance, and gives the paper's
            least change in its norm. The erasure is exact either way (equal class means, no
            covariance with the labels), but with shrinkage it is least in the shrunk norm only,
            which differs far from small ``n / d`` where the covariance is badly conditioned
            (review 43a: 22% more change in the sample norm at ``n / d = 62``).
        svd_tol: Singular values of the whitened cross-covariance (for ``"orth"``, of the
            cross-covariance itself, in ``X``'s units) below this are treated as zero
            (concept-erasure's default). Larger values erase fewer, weaker directions; a
            direction dropped this way keeps its class-mean difference, and a warning says so.

    Returns:
        An :class:`Eraser` whose ``method`` is ``"leace"``, ``"leace-orth"`` (orthogonal:
        ``readout`` is None) or ``"leace-blend"`` (the trace constraint triggered), with
        ``mean`` set when ``affine`` (None: a linear eraser); ``removed`` spans the directions
        that the erasure edits.

    Raises:
        ValueError: Bad shapes, one class only, ``svd_tol <= 0`` or ``method`` not
            ``"leace"``/``"orth"``.
        TypeError: ``affine``, ``constrain_cov_trace`` or ``shrinkage`` not True or False.

    Example:
        >>> import torch
        >>> X = torch.randn(500, 6, dtype=torch.float64); y = (X[:, 0] > 0).long()
        >>> eraser = leace(X, y)
        >>> Xe = eraser(X)
        >>> eraser.n_removed, bool((Xe[y == 0].mean(0) - Xe[y == 1].mean(0)).abs().max() < 1e-8)
        (1, True)
        >>> linear = leace(X, y, method="orth", affine=False)
        >>> linear.method, linear.mean is None, bool(torch.allclose(linear.P, linear.P.T))
        ('leace-orth', True, True)
    """
    _check_options(method, affine, constrain_cov_trace, shrinkage, svd_tol)  # before any work
    X_t, codes, classes = check_xy(X, y, "leace")
    fitter = LeaceFitter(
        X_t.shape[1],
        len(classes),
        method=method,
        affine=affine,
        constrain_cov_trace=constrain_cov_trace,
        shrinkage=shrinkage,
        svd_tol=svd_tol,
        device=X_t.device,
    )
    return fitter.update(X_t, torch.as_tensor(codes, device=X_t.device)).eraser()


def _check_options(
    method: Any, affine: Any, constrain_cov_trace: Any, shrinkage: Any, svd_tol: Any
) -> tuple[LeaceMethod, bool, bool, bool, float]:
    """The options of :func:`leace` and :class:`LeaceFitter`, checked (one place for both).

    Yes-or-no options must be True or False: ``affine="no"`` read as truthy would fit the
    eraser the caller did not ask for.
    """
    return (
        check_choice(method, "method", _LEACE_METHODS),
        check_bool(affine, "affine"),
        check_bool(constrain_cov_trace, "constrain_cov_trace"),
        check_bool(shrinkage, "shrinkage"),
        check_float(svd_tol, "svd_tol", 0.0, low_open=True),
    )


def _constrain_trace(
    left: Float[Tensor, "d r"],
    right: Float[Tensor, "r d"],
    u: Float[Tensor, "d r"],
    sigma: Float[Tensor, "d d"],
) -> tuple[Float[Tensor, "k d"], Float[Tensor, "k d"], float] | None:
    """concept-erasure's ``constrain_cov_trace``: ``(removed, readout, alpha)`` of the blend
    ``alpha P + (1 - alpha) Q`` whose erased covariance has the trace of ``sigma``, or None
    where ``P = I - left @ right`` does not raise it (``Q = I - u uᵀ``, orthogonal).

    ``tr((a P + (1 - a) Q) S (…)ᵀ)`` is a convex quadratic in ``a``: at most ``tr S`` at 0 (an
    orthogonal projection), above it at 1 (the trigger), so it crosses ``tr S`` once in
    ``(0, 1]``; concept-erasure's closed form and choice of root are kept. Its factors are not:
    concept-erasure 0.2.4 writes ``I - blend`` as ``(u * s.sqrt()) @ (vh * s.sqrt())``, which
    scales the columns of ``vh`` rather than its rows, so its eraser is not the blend (and
    depends on the SVD's basis of the null space); here the erased covariance's trace is
    ``tr S``, as the constraint intends.
    """
    if not u.shape[1]:
        return None
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    p, q = eye - left @ right, eye - u @ u.T
    old, new = torch.trace(sigma), torch.trace(p @ sigma @ p.T)
    if not bool(new > old):
        return None
    x, y, z, w = new, 2 * torch.trace(p @ sigma @ q.T), torch.trace(q @ sigma @ q.T), old
    root = torch.sqrt(4 * w * x - 4 * w * y + 4 * w * z - 4 * x * z + y**2)
    low = (-y / 2 + z - root / 2) / (x - y + z)
    high = (-y / 2 + z + root / 2) / (x - y + z)
    alpha = torch.where(low > 0, low, high).clamp(0, 1)
    # I - blend = alpha left @ right + (1 - alpha) u uᵀ lies in span(left, u): factor it there
    # ([d, 2r] at most) instead of an SVD of the dense [d, d] matrix, as concept-erasure does.
    basis = torch.linalg.qr(torch.cat([left, u], dim=1)).Q
    coords = alpha * ((basis.T @ left) @ right) + (1 - alpha) * ((basis.T @ u) @ u.T)
    a, s, vh = torch.linalg.svd(coords, full_matrices=False)
    keep = s > s[0] * max(coords.shape) * torch.finfo(s.dtype).eps  # numpy's matrix_rank rule
    return (basis @ a[:, keep]).T, s[keep, None] * vh[keep], float(alpha)


# Singular values of the whitened cross-covariance (scale-free: whitened x, 0/1 labels) at or
# below this are rounding (the one-hot columns' sum-to-zero direction gives ~1e-16).
_ROUNDING = 1e-8


def _warn_left(singular: Tensor, svd_tol: float, *, floor: float) -> None:
    """Warn where ``svd_tol`` drops directions along which the class means still differ
    (singular values above ``floor``, the rounding level).

    concept-erasure drops them silently; then "the class means of x' are equal" is false along
    them (a reviewer's weak binary concept at n = 200k: nothing erased, mean gap unchanged).
    """
    left = singular[(singular > floor) & (singular <= svd_tol)]
    if len(left):
        warn(
            f"LEACE left {len(left)} direction(s) in place along which the class means differ: "
            f"their singular values (largest {float(left.max()):.3g}) are under "
            f"svd_tol={svd_tol:g}, so a linear probe can still separate the classes there. Pass "
            "a smaller svd_tol (e.g. 1e-6) to erase them too, or keep it to treat them as noise.",
            UserWarning,
        )


def _one_hot(codes: Tensor, n_classes: int) -> Float[Tensor, "n c"]:
    """A single 0/1 column for two classes (concept-erasure's convention), one-hot otherwise."""
    if n_classes == 2:
        return codes[:, None].to(torch.float64)
    return torch.nn.functional.one_hot(codes, n_classes).to(torch.float64)


def _whitening(sigma: Float[Tensor, "d d"]) -> tuple[Tensor, Tensor]:
    """``(S^{-1/2}, S^{1/2})`` as pseudo-inverses: null directions of ``S`` map to zero."""
    evals, evecs = torch.linalg.eigh(sigma)
    # Same cut-off as torch.linalg.pinv: eigenvalues this small are rounding noise.
    keep = evals > evals[-1] * sigma.shape[-1] * torch.finfo(evals.dtype).eps
    safe = torch.where(keep, evals, torch.ones_like(evals))
    inv_sqrt = torch.where(keep, safe.rsqrt(), torch.zeros_like(evals))
    sqrt = torch.where(keep, safe.sqrt(), torch.zeros_like(evals))
    return (evecs * inv_sqrt) @ evecs.T, (evecs * sqrt) @ evecs.T


def _shrink(sample_cov: Float[Tensor, "d d"], n: int) -> Tensor:
    """Optimal linear shrinkage of a (1/n) sample covariance towards ``(tr S / d) I``.

    The distribution-free, asymptotically optimal weight (Bodnar, Gupta & Parolya 2014,
    arXiv:1308.2608) simplifies for this target to ``alpha = 1 - (tr(S)^2 / n) / (|S|_F^2 -
    tr(S)^2 / d)`` and the estimate ``alpha S + (1 - alpha) (tr S / d) I``. ``alpha`` is clipped
    to [0, 1] so the estimate stays positive semi-definite in tiny-sample corner cases.
    """
    d = sample_cov.shape[-1]
    trace = torch.trace(sample_cov)
    spread = (sample_cov**2).sum() - trace**2 / d
    tiny = torch.finfo(sample_cov.dtype).eps
    alpha = 1 - (trace**2 / n + tiny) / (spread + tiny)
    alpha = alpha.clamp(0.0, 1.0)
    eye = torch.eye(d, dtype=sample_cov.dtype, device=sample_cov.device)
    return alpha * sample_cov + (1 - alpha) * (trace / d) * eye
