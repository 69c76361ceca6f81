"""LEACE: least-squares concept erasure in closed form (Belrose et al. 2023).

LEACE finds the affine map ``x' = x - (I - P)(x - mean)`` that changes ``x`` least (in the
covariance norm) while making the class means of ``x'`` equal, so that no linear classifier can do
better than a constant. With the covariance ``S`` of ``X`` and its inverse square root ``W``:

1. whiten: the cross-covariance of whitened ``X`` with the one-hot labels is ``W S_xz``;
2. ``U`` = left singular vectors of ``W S_xz`` (rank <= classes - 1; values under ``svd_tol`` are
   dropped as noise);
3. ``P = I - W^+ U U^T W``: orthogonal projection in whitened space, so *oblique* in the
   original one.

This is an independent implementation; it agrees with ``concept_erasure.LeaceEraser`` fitted with
``constrain_cov_trace=False`` (that package's heuristic blend towards an orthogonal projection,
which gives up exact erasure when it triggers, is not applied here).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.erasure._projection import Projection, _check_xy

__all__ = ["leace"]


def leace(X: Any, y: Any, *, shrinkage: bool = True, svd_tol: float = 0.01) -> Projection:
    """Fit LEACE on ``X [n, d]`` with class labels ``y [n]``; returns an affine :class:`Projection`.

    Labels are one-hot encoded (a single 0/1 column for two classes), so at most
    ``classes - 1`` directions are erased. Statistics are computed in float64.

    Args:
        X: Representations ``[n, d]``, numpy or torch (any device; the result is on CPU).
        y: Class labels ``[n]`` (any values; at least two distinct).
        shrinkage: Estimate the covariance with optimal linear shrinkage towards a multiple of
            the identity (as concept-erasure does by default); helps when ``n`` is not much
            larger than ``d``. ``False`` uses the plain sample covariance.
        svd_tol: Singular values of the whitened cross-covariance below this are treated as
            zero (concept-erasure's default). Larger values erase fewer, weaker directions.

    Returns:
        Projection with ``method="leace"``, ``mean`` set (erasure keeps the mean in place) and an
        oblique ``matrix``; ``removed`` spans the directions that the erasure edits.

    Example:
        >>> import torch
        >>> X = torch.randn(500, 6, dtype=torch.float64); y = (X[:, 0] > 0).long()
        >>> p = leace(X, y)
        >>> Xe = p.apply(X)
        >>> p.n_removed, bool((Xe[y == 0].mean(0) - Xe[y == 1].mean(0)).abs().max() < 1e-8)
        (1, True)
    """
    X_t, codes, classes = _check_xy(X, y, "leace")
    if svd_tol <= 0:
        raise ValueError(f"svd_tol must be positive for numerical stability, got {svd_tol}.")
    n, d = X_t.shape
    x = X_t.to(torch.float64)
    codes_t = torch.as_tensor(codes, device=x.device)
    if len(classes) == 2:
        z = codes_t[:, None].to(torch.float64)
    else:
        z = torch.nn.functional.one_hot(codes_t, len(classes)).to(torch.float64)

    mean_x = x.mean(0)
    xc = x - mean_x
    zc = z - z.mean(0)
    scatter = xc.T @ xc
    sigma_xx = _shrink(scatter / n, n) if shrinkage else scatter / (n - 1)
    sigma_xz = xc.T @ zc / (n - 1)

    whiten, unwhiten = _whitening(sigma_xx)
    u, s, _ = torch.linalg.svd(whiten @ sigma_xz, full_matrices=False)
    u = u[:, s > svd_tol]
    left = unwhiten @ u  # [d, r]: the directions the erasure edits
    right = u.T @ whiten  # [r, d]: how it reads them
    edit = left @ right  # I - P

    # Orthonormal basis of range(I - P); then I - P = removed.T @ (removed @ (I - P)).
    removed = torch.linalg.qr(left).Q.T if left.shape[1] else left.T
    eye = torch.eye(d, dtype=torch.float64, device=x.device)
    return Projection(
        matrix=(eye - edit).cpu(),
        removed=removed.contiguous().cpu(),
        method="leace",
        readout=(removed @ edit).contiguous().cpu(),
        mean=mean_x.cpu(),
    )


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
