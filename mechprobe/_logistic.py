"""Batched multinomial L2 logistic regression: one fit for many layers at once.

The objective for each layer ``l`` (layers are independent, so fitting their sum is exact)::

    loss_l(W, b) = Σ_i w_i CE(x_il W + b, y_i) / Σ_i w_i  +  l2 / 2 · ||W||²_F      (b unpenalised)

with ``w_i = 1`` without sample weights. This is scikit-learn's multinomial ``LogisticRegression``
objective (lbfgs solver, scikit-learn ≥ 1.1) with ``C = 1 / (l2 · Σ_i w_i)`` (``C = 1 / (l2 · n)``
without weights) for three or more classes. With two classes scikit-learn fits one binary
coefficient vector instead of two softmax columns; the two optima coincide with
``C = 2 / (l2 · n)`` (the softmax penalty on ``±w/2`` is half the binary one).

The solver is a batched L-BFGS (``_lbfgs``: one history and one step size per layer, so every
layer converges as if fitted alone) on a preconditioned parametrisation ``W = L⁻ᵀ V`` with
``L Lᵀ = E[c_i (x_i - μ)(x_i - μ)ᵀ] + l2 I`` over at most 4096 evenly spaced rows, ``c_i`` the
softmax curvature ``mean_k p_ik (1 - p_ik)``: the Hessian of the loss up to its class structure.
It starts at uniform predictions and is re-fitted (at iterations 15 and 50) for layers whose
predictions became confident, where the curvature collapses and ``l2`` dominates. L-BFGS then
needs tens of iterations instead of hundreds on correlated features. Features are centred
implicitly (folded into the bias), which costs no copy. Heavy products run in the dtype of ``X``
(float32 is about twice as fast as float64 and reaches ~1e-6 in the gradient); the optimiser
state is float64. A class with no examples gets zero weights and a bias 50 below the others (its
optimum is ``b = -inf``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from ._lbfgs import batched_lbfgs

_PRECONDITIONER_ROWS = 4096
# Iterations at which the preconditioner is re-fitted to the current curvature.
_REFRESH_AT = (15, 50)
_ABSENT_GAP = 50.0


@dataclass(frozen=True)
class LogisticFit:
    """Fitted multinomial logistic regressions, one per layer.

    Attributes:
        weight: ``[layers, d, classes]`` coefficients, in the dtype of the training ``X``.
        bias: ``[layers, classes]`` intercepts.
        n_iter: L-BFGS iterations of the slowest layer.

    Example:
        >>> import torch
        >>> X = torch.randn(2, 100, 3)
        >>> fit = fit_logistic(X, (X[0, :, 0] > 0).long(), 2)
        >>> fit.predict(X).shape
        torch.Size([2, 100])
    """

    weight: Float[Tensor, "layers d classes"]
    bias: Float[Tensor, "layers classes"]
    n_iter: int

    def logits(self, X: Float[Tensor, "layers n d"]) -> Float[Tensor, "layers n classes"]:
        """Class scores ``X W + b`` for every layer (``X`` standardised like the training data)."""
        _check_features(X, self.weight.shape[0], self.weight.shape[1])
        weight = self.weight.to(device=X.device, dtype=X.dtype)
        bias = self.bias.to(device=X.device, dtype=X.dtype)
        return torch.baddbmm(bias[:, None, :], X, weight)

    def predict(self, X: Float[Tensor, "layers n d"]) -> Int[Tensor, "layers n"]:
        """Most likely class index per layer and example."""
        return self.logits(X).argmax(-1)


def fit_logistic(
    X: Float[Tensor, "layers n d"],
    y: Int[Tensor, " n"],
    n_classes: int,
    *,
    l2: float = 1e-3,
    max_iter: int = 200,
    tol: float = 1e-6,
    sample_weight: Float[Tensor, " n"] | None = None,
) -> LogisticFit:
    """Fit one L2 multinomial logistic regression per layer, all layers in one optimisation.

    Args:
        X: ``[layers, n, d]`` float features (callers standardise them).
        y: ``[n]`` class indices in ``[0, n_classes)``, shared by all layers.
        n_classes: number of classes (≥ 2); absent classes get low scores.
        l2: penalty on the weights of the mean loss; scikit-learn's ``C = 1 / (l2 · n)``.
        max_iter: L-BFGS iterations at most.
        tol: stop a layer when the largest absolute gradient entry is ≤ ``tol`` (scikit-learn's
            ``tol`` for lbfgs means the same).
        sample_weight: optional ``[n]`` non-negative weights (the loss is their weighted mean).

    Returns:
        The per-layer weights and biases.

    Example:
        >>> import torch
        >>> X = torch.randn(3, 200, 5, dtype=torch.float64)
        >>> y = (X[1, :, 0] > 0).long()
        >>> fit = fit_logistic(X, y, 2)
        >>> bool((fit.predict(X)[1] == y).float().mean() > 0.95)
        True
    """
    X, y, weights = _validate(X, y, n_classes, l2, max_iter, tol, sample_weight)
    n_layers, _, d = X.shape
    # A class without (weighted) examples has its optimum at W = 0, b = -inf: solve for the
    # present classes only and give absent ones a bias far below (probability ~e^-50).
    present = (
        torch.nonzero(
            torch.zeros(n_classes, dtype=torch.float64).index_add_(0, y.cpu(), weights.cpu()) > 0
        )
        .flatten()
        .to(X.device)
    )
    W = torch.zeros(n_layers, d, n_classes, dtype=torch.float64, device=X.device)
    bias = torch.zeros(n_layers, n_classes, dtype=torch.float64, device=X.device)
    n_iter = 0
    if len(present) > 1:
        remap = torch.full((n_classes,), -1, dtype=torch.long, device=X.device)
        remap[present] = torch.arange(len(present), device=X.device)
        W[..., present], bias[..., present], n_iter = _solve(
            X, remap[y], len(present), l2, max_iter, tol, weights
        )
    if len(present) < n_classes:
        absent = torch.ones(n_classes, dtype=torch.bool, device=X.device)
        absent[present] = False
        bias[..., absent] = bias[..., present].amin(-1, keepdim=True) - _ABSENT_GAP
    return LogisticFit(weight=W.to(X.dtype), bias=bias.to(X.dtype), n_iter=n_iter)


def _solve(
    X: Tensor, y: Tensor, n_classes: int, l2: float, max_iter: int, tol: float, weights: Tensor
) -> tuple[Tensor, Tensor, int]:
    """``(W [L, d, K], b [L, K], iterations)`` in float64 for classes that all occur in ``y``."""
    objective = _Objective(X, y, n_classes, l2, weights)
    n_layers, _, d = X.shape
    theta = torch.zeros(n_layers, d * n_classes + n_classes, dtype=torch.float64, device=X.device)
    # Losses are accurate to about the rounding of X's dtype; the line search tolerates that much.
    eps = 10 * torch.finfo(X.dtype).eps
    theta, n_iter, finished = batched_lbfgs(
        objective,
        theta,
        max_iter=max_iter,
        tol=tol,
        first_step=1.0,
        eps=eps,
        refresh=objective.refresh,
        refresh_at=_REFRESH_AT,
    )
    if not bool(finished.all()):
        bad = torch.nonzero(~finished).flatten().tolist()
        warnings.warn(
            f"fit_logistic: layers {bad} did not reach tol={tol} in max_iter={max_iter} "
            "iterations; increase max_iter or l2.",
            ConvergenceWarning,
            stacklevel=3,
        )
    W, bias = objective.weights(theta, torch.arange(n_layers, device=X.device))
    return W, bias, n_iter


class _Objective:
    """Loss and preconditioned gradient of a subset of the layers' problems.

    Parameters per layer are ``theta = [V.flatten(), c]`` with ``W = M V`` (``M = L⁻ᵀ``, ``L`` the
    preconditioner's Cholesky factor) and ``b = c - μ W`` (``μ`` the weighted feature mean), so
    the optimiser sees centred, whitened features without a copy of ``X``. Products run layer by
    layer on views of ``X``: the optimiser only asks for the layers still active, and slicing a
    batch would copy it.
    """

    def __init__(self, X: Tensor, y: Tensor, n_classes: int, l2: float, weights: Tensor) -> None:
        self.X, self.y, self.l2, self.n_classes = X, y, l2, n_classes
        self.w = weights / weights.sum()  # weighted mean loss, scikit-learn's scaling
        self.w_data = self.w.to(X.dtype)
        self.onehot = torch.nn.functional.one_hot(y, n_classes).to(X.dtype)
        self.mean = torch.stack([self.w_data @ layer for layer in X]).double()  # [L, d]
        # Evenly spaced rows (a strided view, no copy) estimate the curvature for preconditioning.
        self.sample = X[:, :: max(1, X.shape[1] // _PRECONDITIONER_ROWS)]
        uniform = (n_classes - 1) / n_classes**2  # softmax curvature p(1 - p) at p = 1/K
        curvature = torch.full(self.sample.shape[:2], uniform, dtype=X.dtype, device=X.device)
        self.chol = _preconditioner(self.sample, self.mean, curvature, l2)
        self.factor, self.factor_t = _inverses(self.chol)
        self.level = curvature.mean(1, dtype=torch.float64)  # mean curvature behind each factor

    def parameters(self, W: Tensor, bias: Tensor, idx: Tensor) -> Tensor:
        """``theta [b, p]`` of problems ``idx`` from ``W [b, d, K]`` and ``b [b, K]``."""
        V = self.chol[idx].mT @ W
        centred_bias = bias + torch.einsum("bd,bdk->bk", self.mean[idx], W)
        return torch.cat([V.flatten(1), centred_bias], 1)

    def weights(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(W [b, d, K], bias [b, K])`` in float64 for the problems ``idx``."""
        d, k = self.X.shape[2], self.n_classes
        V = theta[:, : d * k].reshape(-1, d, k)
        # Per problem on views: indexing the [L, d, d] factors would copy them every call.
        W = torch.stack([self.factor[layer] @ v for layer, v in zip(idx.tolist(), V, strict=True)])
        bias = theta[:, d * k :] - torch.einsum("bd,bdk->bk", self.mean[idx], W)
        return W, bias

    def refresh(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Re-fit the preconditioner of problems ``idx`` at ``theta``: ``(new theta, changed)``.

        Only problems whose mean curvature fell below half of what their factor assumed change:
        a refresh costs about three loss evaluations and restarts the L-BFGS memory.
        """
        W, bias = self.weights(theta, idx)
        sample = self.sample[idx]
        logits = torch.baddbmm(bias.to(sample.dtype)[:, None], sample, W.to(sample.dtype))
        p = torch.softmax(logits, -1)
        curvature = (p * (1 - p)).mean(-1)  # mean diagonal of the per-example softmax Hessian
        level = curvature.mean(1, dtype=torch.float64)
        stale = level < 0.5 * self.level[idx]
        if bool(stale.any()):
            new = idx[stale]
            self.chol[new] = _preconditioner(
                sample[stale], self.mean[new], curvature[stale], self.l2
            )
            self.factor[new], self.factor_t[new] = _inverses(self.chol[new])
            self.level[new] = level[stale]
        return self.parameters(W, bias, idx), stale

    def __call__(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        X, f64 = self.X, torch.float64
        W, bias = self.weights(theta, idx)
        # X @ (W stored [K, d]) is ~2x faster than X @ W for narrow W (BLAS kernel choice).
        W_rows = W.mT.to(X.dtype).contiguous()
        layers = idx.tolist()
        Z = torch.stack([X[layer] @ W_rows[i].T for i, layer in enumerate(layers)])
        Z += bias.to(X.dtype)[:, None, :]
        # Softmax by hand: torch's (log_)softmax over a last axis of ~10 is ~4x slower on CPU.
        Z -= Z.amax(-1, keepdim=True)
        G = Z.exp()
        total = G.sum(-1, keepdim=True)
        nll = total[..., 0].log() - Z.gather(-1, self.y.expand(len(layers), -1)[..., None])[..., 0]
        loss = nll.to(f64) @ self.w + 0.5 * self.l2 * (W * W).sum((1, 2))
        G /= total
        G -= self.onehot
        G *= self.w_data[:, None]
        grad_bias = G.sum(1, dtype=f64)
        grad_rows = torch.stack([G[i].T @ X[layer] for i, layer in enumerate(layers)])
        grad_W = grad_rows.mT.to(f64) + self.l2 * W  # gradient in the (W, b) parametrisation
        measure = torch.maximum(grad_W.abs().amax((1, 2)), grad_bias.abs().amax(1))
        centred = grad_W - self.mean[idx][..., None] * grad_bias[:, None]
        grad_V = torch.stack(
            [self.factor_t[layer] @ c for layer, c in zip(layers, centred, strict=True)]
        )
        return loss, torch.cat([grad_V.flatten(1), grad_bias], 1), measure


def _inverses(chol: Tensor) -> tuple[Tensor, Tensor]:
    """``(L⁻ᵀ, L⁻¹)`` per problem, both contiguous: products with them beat triangular solves, and
    BLAS runs a transposed float64 view ~5x slower."""
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    return inverse.mT.contiguous(), inverse.contiguous()


def _preconditioner(sample: Tensor, mean: Tensor, curvature: Tensor, l2: float) -> Tensor:
    """Cholesky factor of ``E[c_i (x_i - μ)(x_i - μ)ᵀ] + l2 I`` per layer, over sample rows.

    ``c_i`` is the softmax curvature at row ``i``, so the factor approximates the Hessian of the
    loss (Böhning's bound with ``c_i = 1/4`` fits early iterations, but once predictions are
    confident the true curvature is far smaller and whitening by the full covariance would
    ill-condition a problem that ``l2`` keeps well-conditioned).
    """
    centred = sample - mean[:, None, :].to(sample.dtype)
    # In the dtype of X: a preconditioner need not be exact, and float32 is twice as fast.
    second = torch.stack(
        [(rows * c[:, None]).T @ rows for rows, c in zip(centred, curvature, strict=True)]
    )
    eye = torch.eye(sample.shape[2], dtype=torch.float64, device=sample.device)
    return torch.linalg.cholesky(second.to(torch.float64) / sample.shape[1] + l2 * eye)


def _check_features(X: Tensor, n_layers: int, d: int) -> None:
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


def _validate(
    X: Tensor,
    y: Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    tol: float,
    sample_weight: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
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
    return X, y, weights
