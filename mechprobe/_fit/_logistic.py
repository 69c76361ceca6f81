"""Batched multinomial L2 logistic regression: one fit for many layers at once.

The objective for each layer ``l`` (layers are independent, so fitting their sum is exact)::

    loss_l(W, b) = Σ_i w_i CE(x_il W + b, y_i) / Σ_i w_i  +  l2 / 2 · ||W||²_F      (b unpenalised)

with ``w_i = 1`` without sample weights. This is scikit-learn's multinomial ``LogisticRegression``
objective (lbfgs solver, scikit-learn ≥ 1.1) with ``C = 1 / (l2 · Σ_i w_i)`` (``C = 1 / (l2 · n)``
without weights) for three or more classes. With two classes scikit-learn fits one binary
coefficient vector instead of two softmax columns; the two optima coincide with
``C = 2 / (l2 · n)`` (the softmax penalty on ``±w/2`` is half the binary one).

The solver is a batched L-BFGS (``_lbfgs``: one history and one step size per layer, so every
layer converges as if fitted alone) over the weights only: each evaluation solves the biases
exactly for the current weights (a few Newton steps on K numbers, on logits already computed),
so L-BFGS minimises ``min_b loss(W, b)`` (variable projection). Left to L-BFGS, the biases were
what converged last: about 10 iterations instead of 6. The weights are preconditioned,
``W = L⁻ᵀ V`` with ``L Lᵀ = E[c_i (x_i - μ)(x_i - μ)ᵀ] + l2 I`` over 4,096-8,191 evenly
spaced rows, ``c_i`` the softmax curvature ``mean_k p_ik (1 - p_ik)``: the Hessian of the loss
up to its class structure. It starts at uniform predictions and is re-fitted (at iterations 15
and 50) for layers whose predictions became confident, where the curvature collapses and ``l2``
dominates. Its Gram matrix runs in bfloat16 where the CPU has native bfloat16 products (~4x
faster; a preconditioner need not be exact). Features are centred and scaled inside the products
(``center``/``scale``), which costs no copy of ``X``. Heavy products run in the dtype of ``X``
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

from mechprobe._fit._inputs import check_features, validate
from mechprobe._fit._lbfgs import batched_lbfgs
from mechprobe._fit._preconditioner import PRECONDITIONER_ROWS, preconditioner
from mechprobe._fit._products import times, times_transposed

# Iterations at which the preconditioner is re-fitted to the current curvature.
_REFRESH_AT = (15, 50)
_ABSENT_GAP = 50.0
# The bias is solved to this fraction of tol inside each evaluation, in at most this many steps.
_BIAS_TOL = 1e-2
_BIAS_NEWTON = 20


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
        check_features(X, self.weight.shape[0], self.weight.shape[1])
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
    center: Float[Tensor, "layers d"] | None = None,
    scale: Float[Tensor, "layers d"] | None = None,
) -> LogisticFit:
    """Fit one L2 multinomial logistic regression per layer, all layers in one optimisation.

    Args:
        X: ``[layers, n, d]`` float features (callers standardise them, or pass ``scale``).
        y: ``[n]`` class indices in ``[0, n_classes)``, shared by all layers.
        n_classes: number of classes (≥ 2); absent classes get low scores.
        l2: penalty on the weights of the mean loss; scikit-learn's ``C = 1 / (l2 · n)``.
        max_iter: L-BFGS iterations at most.
        tol: stop a layer when the largest absolute gradient entry is ≤ ``tol`` (scikit-learn's
            ``tol`` for lbfgs means the same).
        sample_weight: optional ``[n]`` non-negative weights (the loss is their weighted mean).
        center: optional ``[layers, d]``, and
        scale: optional ``[layers, d]`` positive divisors: fit on ``(X - center) / scale``
            without materialising it (e.g. the training mean and standard deviation, to
            standardise for free).

    Returns:
        The per-layer weights and biases, for features ``(X - center) / scale``.

    Example:
        >>> import torch
        >>> X = torch.randn(3, 200, 5, dtype=torch.float64)
        >>> y = (X[1, :, 0] > 0).long()
        >>> fit = fit_logistic(X, y, 2)
        >>> bool((fit.predict(X)[1] == y).float().mean() > 0.95)
        True
    """
    X, y, weights = validate(X, y, n_classes, l2, max_iter, tol, sample_weight, center, scale)
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
            X, remap[y], len(present), l2, max_iter, tol, weights, center, scale
        )
    if len(present) < n_classes:
        absent = torch.ones(n_classes, dtype=torch.bool, device=X.device)
        absent[present] = False
        bias[..., absent] = bias[..., present].amin(-1, keepdim=True) - _ABSENT_GAP
    return LogisticFit(weight=W.to(X.dtype), bias=bias.to(X.dtype), n_iter=n_iter)


def _solve(
    X: Tensor,
    y: Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    tol: float,
    weights: Tensor,
    center: Tensor | None,
    scale: Tensor | None,
) -> tuple[Tensor, Tensor, int]:
    """``(W [L, d, K], b [L, K], iterations)`` in float64 for classes that all occur in ``y``."""
    objective = _Objective(X, y, n_classes, l2, weights, scale, bias_tol=_BIAS_TOL * tol)
    n_layers, _, d = X.shape
    theta = torch.zeros(n_layers, d * n_classes, dtype=torch.float64, device=X.device)
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
    W, bias = objective.solution(theta)
    if center is not None:  # the bias for (x - center) / scale rather than x / scale
        offset = center.to(X.device, torch.float64) * objective.inv_scale.double()
        bias += torch.einsum("ld,ldk->lk", offset, W)
    return W, bias, n_iter


class _Objective:
    """Loss and preconditioned gradient of the layers' problems, with the bias solved out.

    Features are ``f = x / scale``. The optimiser sees ``theta = V.flatten()`` per layer with
    ``W = M V`` (``M = L⁻ᵀ``, ``L`` the preconditioner's Cholesky factor). Logits are
    ``(f - μ) W + c`` (``μ`` the weighted feature mean, so ``b = c - μ W``), centred and scaled
    inside the products, which costs no copy of ``X``. For a given ``W`` the loss is minimised
    over ``c`` exactly: a K-dimensional convex problem, a Newton step or two on logits already
    computed and no further product with ``X``. L-BFGS thus minimises ``min_c loss(W, c)``, whose
    gradient is ``∂loss/∂W`` at that ``c`` (variable projection): left to L-BFGS, the biases
    converge slowest, their curvature changing most as predictions become confident.
    Products run layer by layer on views of ``X``: the optimiser only asks for the layers still
    active, and slicing a batch would copy it.
    """

    def __init__(
        self,
        X: Tensor,
        y: Tensor,
        n_classes: int,
        l2: float,
        weights: Tensor,
        scale: Tensor | None,
        bias_tol: float,
    ) -> None:
        n_layers, n, d = X.shape
        self.X, self.l2, self.n_classes, self.bias_tol = X, l2, n_classes, bias_tol
        self.w = weights / weights.sum()  # weighted mean loss, scikit-learn's scaling
        self.w_data = self.w.to(X.dtype)
        self.uniform = bool((weights == weights[0]).all())
        self.targets = torch.nn.functional.one_hot(y, n_classes).T.to(X.dtype).contiguous()
        self.y_index = y[None, None, :]
        self.class_weight = self.targets.double() @ self.w  # [K] weighted class frequencies
        ones = torch.ones(n_layers, d, dtype=X.dtype, device=X.device)
        self.inv_scale = ones if scale is None else (1 / scale).to(X.dtype)  # [L, d]
        raw_mean = torch.stack([self.w_data @ layer for layer in X])
        self.mean = (raw_mean * self.inv_scale).double()  # [L, d] of the features f
        start = self.class_weight.log()  # the optimal c at W = 0
        # Biases sum to 0 (adding a constant to all changes nothing), as in scikit-learn.
        self.bias = (start - start.mean()).expand(n_layers, -1).clone()
        self.evaluated = torch.full(
            (n_layers, d * n_classes), torch.nan, dtype=torch.float64, device=X.device
        )
        # Evenly spaced rows (a strided view, no copy) estimate the curvature for preconditioning.
        self.sample = X[:, :: max(1, n // PRECONDITIONER_ROWS)]
        uniform = (n_classes - 1) / n_classes**2  # softmax curvature p(1 - p) at p = 1/K
        curvature = torch.full(self.sample.shape[:2], uniform, dtype=X.dtype, device=X.device)
        self.chol = preconditioner(self.sample, self.mean, curvature, l2, self.inv_scale)
        self.level = curvature.mean(1, dtype=torch.float64)  # mean curvature behind each factor

    def __call__(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        X, layers = self.X, idx.tolist()
        W = self._weights(theta, idx)
        if bool((theta == 0).all()):  # the start: all logits 0, no product needed
            Z = torch.zeros(len(layers), self.n_classes, X.shape[1], dtype=X.dtype, device=X.device)
        else:
            Z = torch.stack([self._logits(X[layer], W[i], layer) for i, layer in enumerate(layers)])
        P, nll, bias_grad, self.bias[idx] = self._solve_bias(Z, self.bias[idx])
        self.evaluated[idx] = theta
        loss = nll.double() @ self.w + 0.5 * self.l2 * (W.double() ** 2).sum((1, 2))
        P -= self.targets
        P *= self.w_data
        grad_rows = torch.stack([times(G, X[layer]) for G, layer in zip(P, layers, strict=True)])
        # Gradient in W of the features f = x / scale, centred: Σ_i (f_i - μ) ⊗ g_i.
        grad_W = grad_rows.mT * self.inv_scale[idx, :, None]
        grad_W -= self.mean[idx].to(X.dtype)[..., None] * bias_grad.to(X.dtype)[:, None]
        grad_W += self.l2 * W
        measure = torch.maximum(grad_W.abs().amax((1, 2)), bias_grad.abs().amax(1)).double()
        # Triangular solves with ~10 right-hand sides beat products with explicit inverses.
        grad_V = torch.stack(
            [
                torch.linalg.solve_triangular(self.chol[layer], g, upper=False)
                for layer, g in zip(layers, grad_W, strict=True)
            ]
        )
        return loss, grad_V.flatten(1).double(), measure

    def solution(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(W [L, d, K], bias [L, K])`` in float64 at the optimiser's final ``theta``."""
        # The solved bias belongs to each layer's latest evaluation; a layer whose line search
        # failed ended at an earlier point, so its bias is solved again there.
        stale = torch.nonzero(~(self.evaluated == theta).all(1)).flatten()
        if len(stale):
            self(theta[stale], stale)
        idx = torch.arange(len(theta), device=theta.device)
        W = self._weights(theta, idx).double()
        bias = self.bias - self.bias.mean(1, keepdim=True)  # against drift of the sum by rounding
        return W, bias - torch.einsum("bd,bdk->bk", self.mean, W)

    def refresh(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Re-fit the preconditioner of problems ``idx`` at ``theta``: ``(new theta, changed)``.

        Only problems whose mean curvature fell below half of what their factor assumed change:
        a refresh costs about three loss evaluations and restarts the L-BFGS memory.
        """
        W = self._weights(theta, idx)
        sample = self.sample[idx]
        pairs = zip(sample, W, idx.tolist(), strict=True)
        logits = torch.stack([self._logits(rows, w, layer) for rows, w, layer in pairs])
        p = torch.softmax(logits + self.bias[idx].to(logits.dtype)[..., None], 1)
        curvature = (p * (1 - p)).mean(1)  # mean diagonal of the per-example softmax Hessian
        level = curvature.mean(1, dtype=torch.float64)
        stale = level < 0.5 * self.level[idx]
        if bool(stale.any()):
            new = idx[stale]
            self.chol[new] = preconditioner(
                sample[stale], self.mean[new], curvature[stale], self.l2, self.inv_scale[new]
            )
            self.level[new] = level[stale]
        V = self.chol[idx].mT @ W
        return V.flatten(1).double(), stale

    def _weights(self, theta: Tensor, idx: Tensor) -> Tensor:
        """``W [b, d, K]`` in the dtype of ``X`` for the problems ``idx``."""
        d, k = self.X.shape[2], self.n_classes
        V = theta.reshape(-1, d, k).to(self.X.dtype)
        # Per problem on views: indexing the [L, d, d] factors would copy them every call.
        return torch.stack(
            [
                torch.linalg.solve_triangular(self.chol[layer].mT, v, upper=True)
                for layer, v in zip(idx.tolist(), V, strict=True)
            ]
        )

    def _logits(self, rows: Tensor, W: Tensor, layer: int) -> Tensor:
        """``[K, n]`` centred logits ``(f - μ) W`` of raw ``rows [n, d]`` (no bias)."""
        # Class-major [K, n]: the softmax over a leading axis of ~10 vectorises along the
        # examples (over a last axis of ~10 it is ~1.4x slower), and the backward product takes
        # the residuals in that layout.
        scaled = (W * self.inv_scale[layer, :, None]).T.contiguous()
        shift = self.mean[layer].to(W.dtype) @ W
        return times_transposed(scaled, rows).sub_(shift[:, None])

    def _solve_bias(self, Z: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Newton on the biases of logits ``Z [b, K, n]`` from ``bias [b, K]``.

        Returns ``(P [b, K, n] softmax, nll [b, n], bias gradient [b, K], bias)`` at the last
        bias; it stops when the gradient is below ``bias_tol``.
        """
        f64, k = torch.float64, self.n_classes
        # H·1 = 0 (adding a constant to every bias changes nothing): 11ᵀ/K makes H invertible
        # without changing the step, as the gradient sums to 0.
        gauge = torch.full((k, k), 1.0 / k, dtype=f64, device=Z.device)
        for it in range(_BIAS_NEWTON):
            A = Z + bias.to(Z.dtype)[..., None]
            A -= A.amax(1, keepdim=True)
            picked = A.gather(1, self.y_index.expand(len(A), -1, -1))[:, 0]
            P = A.exp_()
            total = P.sum(1)
            P /= total[:, None]
            weighted = P if self.uniform else P * self.w_data
            # A sum (pairwise), not a product with w: BLAS adds 10⁴ float32 terms in order.
            mean_p = weighted.sum(2).double() * (self.w[0] if self.uniform else 1.0)
            grad = mean_p - self.class_weight
            if it == _BIAS_NEWTON - 1 or float(grad.abs().max()) <= self.bias_tol:
                break
            outer = (weighted @ P.mT).double() * (self.w[0] if self.uniform else 1.0)
            hessian = torch.diag_embed(mean_p) - outer
            step = torch.linalg.solve(hessian + gauge, -grad[..., None])[..., 0]
            # A trust region of one nat per step: Newton from a far start can overshoot.
            bias = bias + step / step.abs().amax(1, keepdim=True).clamp_min(1.0)
        return P, total.log_() - picked, grad, bias
