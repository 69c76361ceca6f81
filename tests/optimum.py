"""How far a logistic fit can be from the optimum, from its gradient: tolerances that follow from
the solvers' stopping rules instead of from what one machine happened to give.

The objectives are written plainly here, in float64, independently of the solver:

- multinomial: ``f(W, b) = Σ_i w_i CE(x_i W + b, y_i) / Σ_i w_i + l2/2 ||W||²`` (``b`` unpenalised),
  scikit-learn's ``LogisticRegression`` with ``C = 1 / (l2 Σ_i w_i)`` for three or more classes;
- binary: ``g(v, c) = Σ_i w_i log(1 + exp(-s_i (x_i v + c))) / Σ_i w_i + ||v||² / (2 C Σ_i w_i)``
  with ``s_i = ±1``, scikit-learn's two-class problem.

Both are strongly convex once the biases' common shift (which changes no softmax) is fixed; with
``μ`` the smallest eigenvalue of the Hessian on that subspace, any point ``θ`` satisfies
``||θ - θ*|| ≤ ||∇f(θ)|| / μ``. Two fits, each stopped at a small gradient, are therefore at most
``(||∇f(θ_a)|| + ||∇f(θ_b)||) / μ`` apart. ``μ`` is taken at one of the fits, a few 1e-5 from the
optimum, where the Hessian differs from the optimum's by far less than the factor of 2 applied.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SAFETY = 2.0  # μ at a fit instead of over the segment to the optimum: a generous margin


def _t(a: object) -> Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def multinomial_objective(X, y, l2: float, weights=None):
    """``f(θ)`` with ``θ = [W.ravel(), b]`` for ``W [d, K]`` (see the module docstring)."""
    X, y = _t(X), torch.as_tensor(np.asarray(y), dtype=torch.long)
    w = torch.ones(len(y), dtype=torch.float64) if weights is None else _t(weights)
    d, k = X.shape[1], int(y.max()) + 1

    def f(theta: Tensor) -> Tensor:
        W, b = theta[: d * k].reshape(d, k), theta[d * k :]
        ce = torch.nn.functional.cross_entropy(X @ W + b, y, reduction="none")
        return (w * ce).sum() / w.sum() + 0.5 * l2 * (W**2).sum()

    return f, d, k


def binary_objective(X, y, C: float, weights=None):
    """``g(θ)`` with ``θ = [v, c]`` for scikit-learn's two-class problem (labels 0/1)."""
    X, s = _t(X), 2.0 * _t(y) - 1.0
    w = torch.ones(len(s), dtype=torch.float64) if weights is None else _t(weights)

    def g(theta: Tensor) -> Tensor:
        v, c = theta[:-1], theta[-1]
        loss = torch.nn.functional.softplus(-s * (X @ v + c))
        return (w * loss).sum() / w.sum() + (v**2).sum() / (2 * C * w.sum())

    return g


def _gauge(n_params: int, k: int | None) -> Tensor:
    """Orthonormal basis of the parameters modulo a common shift of the ``k`` biases."""
    eye = torch.eye(n_params, dtype=torch.float64)
    if k is None:
        return eye
    shift = torch.zeros(n_params, dtype=torch.float64)
    shift[-k:] = 1 / k**0.5
    q, _ = torch.linalg.qr(torch.cat([shift[:, None], eye], 1))
    return q[:, 1:n_params]


def gradient_norm(f, theta, k: int | None = None) -> float:
    """``||∇f(θ)||₂`` on the gauge-fixed subspace, in float64 by autograd."""
    theta = _t(theta).requires_grad_()
    (grad,) = torch.autograd.grad(f(theta), theta)
    return float((_gauge(len(theta), k).T @ grad).norm())


def certified_distance(f, points, k: int | None = None) -> float:
    """An upper bound on the distance between any two of ``points`` (each close to the optimum).

    ``SAFETY · Σ_i ||∇f(θ_i)|| / μ``, ``μ`` the smallest Hessian eigenvalue at ``points[0]`` on the
    gauge-fixed subspace.
    """
    Q = _gauge(len(points[0]), k)
    hessian = torch.autograd.functional.hessian(f, _t(points[0]))
    mu = float(torch.linalg.eigvalsh(Q.T @ hessian @ Q)[0])
    assert mu > 0, "the objective must be strongly convex on the gauge-fixed subspace"
    return SAFETY * sum(gradient_norm(f, p, k) for p in points) / mu


def distance(a, b, k: int | None = None) -> float:
    """``||a - b||₂`` modulo a common shift of the last ``k`` entries (the biases)."""
    diff = _t(a) - _t(b)
    return float((_gauge(len(diff), k).T @ diff).norm())


def multinomial_theta(W, b) -> np.ndarray:
    """``[W.ravel(), b]`` for ``W [d, K]``."""
    return np.concatenate([np.asarray(W, dtype=np.float64).ravel(), np.asarray(b, np.float64)])
