"""Input checks of the batched logistic fit: each bad input gets an error naming the fix."""

from __future__ import annotations

import torch
from torch import Tensor


def check_features(X: Tensor, n_layers: int, d: int) -> None:
    """Raise unless ``X`` is ``[n_layers, n, d]``, the shape a fitted model applies to."""
    if not isinstance(X, Tensor) or X.ndim != 3:
        raise ValueError(
            f"X must be a [layers, n, d] tensor, got {type(X).__name__} with shape "
            f"{tuple(getattr(X, 'shape', ()))}; add a leading layer axis with X[None] for one layer."
        )
    if X.shape[0] != n_layers or X.shape[2] != d:
        raise ValueError(
            f"X has shape {tuple(X.shape)} but the fit expects [{n_layers}, n, {d}]; pass the "
            "same layers and features as in training."
        )


def validate(
    X: Tensor,
    y: Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    tol: float,
    sample_weight: Tensor | None,
    center: Tensor | None = None,
    scale: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(X, y, weights)`` ready to fit (half-precision X as float32, y as int64, weights float64),
    or an error naming the problem and the fix."""
    if not isinstance(X, Tensor) or X.ndim != 3:
        raise ValueError(
            f"X must be a [layers, n, d] float tensor, got shape {tuple(getattr(X, 'shape', ()))}; "
            "add a layer axis with X[None] for a single layer."
        )
    if not X.is_floating_point():
        raise TypeError(f"X must be a float tensor, got {X.dtype}; convert it with X.float().")
    if X.dtype not in (torch.float32, torch.float64):
        X = X.float()  # half precision is too coarse for the loss
    if not bool(torch.isfinite(torch.stack(torch.aminmax(X))).all()):  # one pass, no copy
        raise ValueError("X contains NaN or inf; drop or impute those rows before fitting.")
    y = torch.as_tensor(y, device=X.device)
    if y.ndim != 1 or y.shape[0] != X.shape[1]:
        raise ValueError(
            f"y must have shape [n] = [{X.shape[1]}] to match X {tuple(X.shape)}, got "
            f"{tuple(y.shape)}; pass one label per example."
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"y must hold integer class indices, got {y.dtype}; use y.long().")
    y = y.long()
    if n_classes < 2:
        raise ValueError(f"n_classes must be ≥ 2, got {n_classes}; a probe needs two classes.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(
            f"y must lie in [0, {n_classes}), got values in [{int(y.min())}, {int(y.max())}]; "
            "encode labels as indices (e.g. np.unique(..., return_inverse=True))."
        )
    if not l2 > 0:
        raise ValueError(
            f"l2 must be > 0, got {l2}; separable data has no finite optimum without it."
        )
    if max_iter < 1 or not tol > 0:
        raise ValueError(f"need max_iter ≥ 1 and tol > 0, got {max_iter} and {tol}.")
    if sample_weight is None:
        weights = torch.ones(X.shape[1], dtype=torch.float64, device=X.device)
    else:
        weights = torch.as_tensor(sample_weight, device=X.device).to(torch.float64)
        if weights.shape != (X.shape[1],) or bool((weights < 0).any()) or not weights.sum() > 0:
            raise ValueError(
                f"sample_weight must be [n] = [{X.shape[1]}] non-negative with a positive sum, got "
                f"shape {tuple(weights.shape)}; pass one weight per example."
            )
    for name, value in (("center", center), ("scale", scale)):
        shape = tuple(getattr(value, "shape", ()))
        if value is not None and shape != (X.shape[0], X.shape[2]):
            raise ValueError(
                f"{name} must be [layers, d] = [{X.shape[0]}, {X.shape[2]}], got shape {shape}; "
                "pass one value per layer and feature."
            )
    if scale is not None and not bool((scale > 0).all()):
        raise ValueError("scale must be positive; leave constant features unscaled (scale 1).")
    return X, y, weights
