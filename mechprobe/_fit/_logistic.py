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
for the current weights (a few Newton steps on K numbers, on logits already computed), so
L-BFGS minimises ``min_b loss(W, b)`` (variable projection). Left to L-BFGS, the biases were
what converged last: about 10 iterations instead of 6. Each layer's biases are solved to 1e-3 of
its latest convergence measure, down to ``tol / 100``: early iterations need no more. The
weights are preconditioned, ``W = L⁻ᵀ V`` with ``L Lᵀ = E[c_i (x_i - μ)(x_i - μ)ᵀ] + l2 I`` over
4,096-8,191 evenly spaced rows (all rows of smaller sets), ``c_i`` the softmax curvature
``mean_k p_ik (1 - p_ik)``: the Hessian of the loss up to its class structure. It starts at
uniform predictions and is re-fitted at iterations 3 and 8 for layers whose predictions became
confident, where the curvature collapses and ``l2`` dominates, and whose convergence is slow
(more than 4 further iterations at their recent rate; refreshing every layer costs more
evaluations than it saves: 33 instead of 25 per layer at 10k rows). On real activations the
first step takes the gradient from ~0.3 to ~3e-3 and the curvature falls 20-60x within a few
iterations; re-fitting then rather than at 15 and 50 saves a sixth of the evaluations (2k-10k
rows of SmolLM2's POS activations). A re-fit is a change of variables ``V' = L'ᵀ L⁻ᵀ V`` at the
same weights, so L-BFGS keeps its curvature pairs (mapped) and evaluates nothing again:
dropping them and re-evaluating, as an earlier version did, took 27.4 evaluations per layer
instead of 24.6 at 10k rows, 21.7 instead of 19.9 at 4k and 31.7 instead of 25.7 at 100k (three
layers): the step after a restart overshoots (the gradient rises 10-40x) and takes a few to
recover. The re-fitted Gram keeps only the rows carrying 99.9% of the curvature (about half of
them) when it runs in bfloat16, 95% (about a quarter) when it runs in the features' dtype, where
a row costs about four times as much. With the AVX2 paths forced, probe_layers at 10,097 rows
re-fits from 62-65k rows instead of 167k (about 43 GFLOP, half a CPU second of ten, fewer) at
22.4 evaluations per layer instead of 22.6 (17.1 / 17.2 at 4,000 rows, 13.8 / 13.8 at 2,000);
two threads, alternating: 5.52 s instead of 6.38 s (medians of six in one process), 5.86 s
instead of 5.95 s (four fresh processes, each the median of three calls). On the native
bfloat16 path 95% saved no time and took 23.0 evaluations per layer instead of 21.7. A fit given a ``start`` (``probe_layers`` starts a layer from its neighbours' mean) begins
there, with the same uniform first factor and the same re-fits. The Gram matrix runs in bfloat16
where the CPU has native bfloat16 products (~4x faster; a preconditioner need not be exact).
Features are centred and scaled inside the products (``center``/``scale``), which costs no copy
of ``X``. Heavy products run in the dtype of ``X`` (float32 is about twice as fast as float64 and
reaches ~1e-6 in the gradient); the optimiser state is float64. A class with no examples gets
zero weights and a bias 50 below the others (its optimum is ``b = -inf``).

Where the time goes, and the alternatives measured and not kept (an exact line search on the
logits, a factor per class, a warm start from a subsample, a neighbour's factor reused), are in
benchmarks/probes.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from einops import rearrange
from jaxtyping import Float, Int
from sklearn.exceptions import ConvergenceWarning
from torch import Tensor

from mechprobe._fit._inputs import check_features, validate
from mechprobe._fit._lbfgs import batched_lbfgs
from mechprobe._fit._paths import current_solver_path
from mechprobe._fit._preconditioner import (
    PRECONDITIONER_ROWS,
    change_factor,
    covariance_preconditioner,
    preconditioner,
)
from mechprobe._fit._products import times, times_transposed

# Iterations at which the preconditioner is re-fitted to the current curvature, for layers
# that would need more than _SLOWER_THAN further iterations at their recent rate and whose mean
# curvature fell below _STALE of what their factor assumed.
_REFRESH_AT = (3, 8)
_SLOWER_THAN = 4
_STALE = 0.5
_ABSENT_GAP = 50.0
# The bias is solved to this fraction of tol (at least) inside each evaluation, in at most this
# many steps.
_BIAS_TOL = 1e-2
_BIAS_NEWTON = 20
# The refreshed preconditioner keeps the rows that carry this fraction of the curvature, by the
# dtype of its Gram matrix: fewer rows pay where each costs a float32 product.
_CURVATURE_MASS = {"bfloat16": 0.999, "float32": 0.95}


@dataclass(frozen=True)
class LogisticFit:
    """Fitted multinomial logistic regressions, one per layer.

    Attributes:
        weight: ``[layers, d, classes]`` coefficients, in the dtype of the training ``X``.
        bias: ``[layers, classes]`` intercepts.
        n_iter: L-BFGS iterations of the slowest layer.
        unfinished: The layers (by ``layer_names``) that did not reach ``tol`` in ``max_iter``.

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
    unfinished: tuple[int, ...] = ()

    def logits(self, X: Float[Tensor, "layers n d"]) -> Float[Tensor, "layers n classes"]:
        """Class scores ``X W + b`` for every layer (``X`` standardised like the training data)."""
        check_features(X, self.weight.shape[0], self.weight.shape[1])
        weight = self.weight.to(device=X.device, dtype=X.dtype)
        bias = self.bias.to(device=X.device, dtype=X.dtype)
        return torch.baddbmm(bias[:, None, :], X, weight)

    def predict(self, X: Float[Tensor, "layers n d"]) -> Int[Tensor, "layers n"]:
        """Most likely class index per layer and example."""
        return self.logits(X).argmax(-1)


def softmax_penalty(l2: float, n_classes: int) -> float:
    """The ``l2`` of :func:`fit_logistic` whose optimum is scikit-learn's ``LogisticRegression``
    with ``C = 1 / (l2 · n)``, whatever the number of classes.

    With two classes scikit-learn fits one binary vector ``v`` where the softmax fits ``±v/2``,
    whose penalty is half the binary one (module docstring): the softmax penalty is doubled.
    Every public ``l2`` of mechprobe (probes, ``probe_layers``, the scalar mix, INLP's default
    probe) means ``C = 1 / (l2 · n)`` and is passed through this.

    Example:
        >>> softmax_penalty(1e-3, 2), softmax_penalty(1e-3, 5)
        (0.002, 0.001)
    """
    return (2.0 if n_classes == 2 else 1.0) * l2


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
    covariance: Float[Tensor, "layers d d"] | None = None,
    start: LogisticFit | None = None,
    layer_names: Sequence[int] | None = None,
    warn: bool = True,
) -> LogisticFit:
    """Fit one L2 multinomial logistic regression per layer, all layers in one optimisation.

    Args:
        X: ``[layers, n, d]`` float features (callers standardise them, or pass ``scale``).
        y: ``[n]`` class indices in ``[0, n_classes)``, shared by all layers.
        n_classes: number of classes (≥ 2); absent classes get low scores.
        l2: penalty on the softmax weights of the mean loss: scikit-learn's ``C = 1 / (l2 · n)``
            for three or more classes, ``C = 2 / (l2 · n)`` for two; callers whose ``l2``
            means ``C = 1 / (l2 · n)`` for any number of classes pass
            :func:`softmax_penalty` of it.
        max_iter: L-BFGS iterations at most.
        tol: stop a layer when the largest absolute gradient entry is ≤ ``tol`` (scikit-learn's
            ``tol`` for lbfgs means the same).
        sample_weight: optional ``[n]`` non-negative weights (the loss is their weighted mean).
        center: optional ``[layers, d]``, and
        scale: optional ``[layers, d]`` positive divisors: fit on ``(X - center) / scale``
            without materialising it (e.g. the training mean and standard deviation, to
            standardise for free).
        covariance: optional ``[layers, d, d]`` covariance ``E[(f - μ)(f - μ)ᵀ]`` of the features
            ``f = X / scale`` under the sample weights, for the first preconditioner instead of
            a Gram matrix over rows of ``X`` (``rows x d²`` products). A caller fitting a series
            of related problems can update one covariance instead: INLP projects it.
        start: a fit to start from, for the same standardisation and classes (e.g. the mean of
            the neighbouring layers' fits): its weights and biases are the first iterate. The
            optimum does not depend on it; the number of iterations does.
        layer_names: what the convergence warning calls the layers (default their positions
            in ``X``), for a caller fitting some of a model's layers.
        warn: warn of layers that did not converge; False leaves it to the caller (the fit's
            ``unfinished``), e.g. one fitting on worker threads, whose warnings point at no line
            of the user's.

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
    if start is not None and tuple(start.weight.shape) != (n_layers, d, n_classes):
        raise ValueError(
            f"start must be a fit of [layers, d, classes] = [{n_layers}, {d}, {n_classes}], got "
            f"weights {tuple(start.weight.shape)}; start from a fit of the same classes and layers."
        )
    if covariance is not None and tuple(covariance.shape) != (n_layers, d, d):
        raise ValueError(
            f"covariance must be [layers, d, d] = [{n_layers}, {d}, {d}], got "
            f"{tuple(covariance.shape)}; add a layer axis with covariance[None] for one layer."
        )
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
    n_iter, names = 0, []
    if len(present) > 1:
        remap = torch.full((n_classes,), -1, dtype=torch.long, device=X.device)
        remap[present] = torch.arange(len(present), device=X.device)
        first = None
        if start is not None:  # the start's function of the features f = x / scale, centred
            W0 = start.weight.to(X.device, torch.float64)[..., present]
            b0 = start.bias.to(X.device, torch.float64)[..., present]
            if center is not None:
                offset = center.to(X.device, torch.float64)
                if scale is not None:
                    offset = offset / scale.to(X.device, torch.float64)
                b0 = b0 - torch.einsum("ld,ldk->lk", offset, W0)
            first = (W0, b0)
        W[..., present], bias[..., present], n_iter, unfinished = _solve(
            X, remap[y], len(present), l2, max_iter, tol, weights, center, scale, covariance, first
        )
        names = unfinished if layer_names is None else [layer_names[i] for i in unfinished]
        if unfinished and warn:
            warnings.warn(
                f"fit_logistic: layers {names} did not reach tol={tol} in max_iter={max_iter} "
                "iterations; increase max_iter or l2.",
                ConvergenceWarning,
                stacklevel=2,
            )
    if len(present) < n_classes:
        absent = torch.ones(n_classes, dtype=torch.bool, device=X.device)
        absent[present] = False
        bias[..., absent] = bias[..., present].amin(-1, keepdim=True) - _ABSENT_GAP
    return LogisticFit(
        weight=W.to(X.dtype), bias=bias.to(X.dtype), n_iter=n_iter, unfinished=tuple(names)
    )


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
    covariance: Tensor | None,
    start: tuple[Tensor, Tensor] | None,
) -> tuple[Tensor, Tensor, int, list[int]]:
    """``(W [L, d, K], b [L, K], iterations, unfinished layers)``, ``W`` and ``b`` in float64,
    for classes that all occur in ``y``; ``start``: ``(W, b)`` of the features ``x / scale``
    (not centred) to start from."""
    objective = _Objective(X, y, n_classes, l2, weights, scale, _BIAS_TOL * tol, covariance, start)
    if start is None:
        n_layers, _, d = X.shape
        theta = torch.zeros(n_layers, d * n_classes, dtype=torch.float64, device=X.device)
    else:  # W = L⁻ᵀ V, so V = Lᵀ W
        theta = (objective.chol.mT.double() @ start[0]).flatten(1)
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
        refresh_slower_than=_SLOWER_THAN,
    )
    W, bias = objective.solution(theta)
    if center is not None:  # the bias for (x - center) / scale rather than x / scale
        offset = center.to(X.device, torch.float64) * objective.inv_scale.double()
        bias += torch.einsum("ld,ldk->lk", offset, W)
    return W, bias, n_iter, torch.nonzero(~finished).flatten().tolist()


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
        covariance: Tensor | None = None,
        start: tuple[Tensor, Tensor] | None = None,
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
        if start is None:
            c = self.class_weight.log().expand(n_layers, -1)  # the optimal c at W = 0
        else:
            c = start[1] + torch.einsum("ld,ldk->lk", self.mean, start[0])
        # Biases sum to 0 (adding a constant to all changes nothing), as in scikit-learn.
        self.bias = c - c.mean(1, keepdim=True)
        # Each layer's latest evaluated point, as (batch, row): solution() checks the bias is its.
        self.evaluated: list[tuple[Tensor, int] | None] = [None] * n_layers
        # The latest convergence measure per layer: the bias is solved to a fraction of it.
        self.measure = torch.full((n_layers,), torch.inf, dtype=torch.float64, device=X.device)
        # [2, L, K, n] logits and probabilities, reused by every evaluation: fresh tensors of
        # this size would be paged in (and zeroed by the kernel) at every call.
        self.work = torch.empty(2, n_layers, n_classes, n, dtype=X.dtype, device=X.device)
        # Evenly spaced rows (a strided view, no copy) estimate the curvature for preconditioning.
        self.sample = X[:, :: max(1, n // PRECONDITIONER_ROWS)]
        uniform = (n_classes - 1) / n_classes**2  # softmax curvature p(1 - p) at p = 1/K
        # The first factor assumes uniform predictions, with a start too: re-fitted at
        # iteration 3 (near that start's optimum) it beat one fitted to the start's curvature,
        # which stayed (neighbour starts at 2,000 / 10,097 POS rows: 9.0 / 16.6 evaluations per
        # layer instead of 10.9 / 22.6).
        curvature = torch.full(self.sample.shape[:2], uniform, dtype=X.dtype, device=X.device)
        if covariance is None:
            self.chol = preconditioner(self.sample, self.mean, curvature, l2, self.inv_scale)
        else:
            self.chol = covariance_preconditioner(covariance, uniform, l2).to(X)
        self.level = curvature.mean(1, dtype=torch.float64)  # mean curvature behind each factor
        self.at_start = start is None  # then all logits are 0 at the first call

    def __call__(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        X, layers = self.X, idx.tolist()
        W = self._weights(theta, idx)
        Z = self.work[0, : len(layers)]
        if self.at_start:  # the first call is at theta = 0: all logits 0, no product needed
            Z.zero_()
            self.at_start = False
        else:
            self._logits(X, W, idx, out=Z)
        # The bias is solved to 1e-3 of the layer's last measure (bias_tol near the optimum):
        # early iterations need no more, and the line search tolerates that much.
        tolerance = (1e-3 * self.measure[idx]).clamp_min(self.bias_tol)
        P, nll, bias_grad, self.bias[idx] = self._solve_bias(Z, self.bias[idx], tolerance)
        for row, layer in enumerate(layers):
            self.evaluated[layer] = (theta, row)
        loss = nll.double() @ self.w + 0.5 * self.l2 * torch.linalg.vecdot(W, W).double().sum(1)
        P -= self.targets
        P *= self.w_data
        grad_rows = torch.stack([times(G, X[layer]) for G, layer in zip(P, layers, strict=True)])
        # Gradient in W of the features f = x / scale, centred: Σ_i (f_i - μ) ⊗ g_i.
        grad_W = grad_rows.mT * self.inv_scale[idx, :, None]
        grad_W -= self.mean[idx].to(X.dtype)[..., None] * bias_grad.to(X.dtype)[:, None]
        grad_W.add_(W, alpha=self.l2)
        measure = torch.maximum(grad_W.abs().amax((1, 2)), bias_grad.abs().amax(1)).double()
        self.measure[idx] = measure
        grad_V = self._solve_factors(grad_W, idx, transposed=False)
        return loss, grad_V.flatten(1).double(), measure

    def solution(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(W [L, d, K], bias [L, K])`` in float64 at the optimiser's final ``theta``."""
        # The solved bias belongs to each layer's latest evaluation; a layer whose line search
        # failed ended at an earlier point, so its bias is solved again there.
        stale = [
            layer
            for layer, seen in enumerate(self.evaluated)
            if seen is None or not torch.equal(seen[0][seen[1]], theta[layer])
        ]
        if stale:
            rows = torch.tensor(stale, device=theta.device)
            self.measure[rows] = 0.0  # solve the bias to bias_tol
            self(theta[rows], rows)
        idx = torch.arange(len(theta), device=theta.device)
        W = self._weights(theta, idx).double()
        bias = self.bias - self.bias.mean(1, keepdim=True)  # against drift of the sum by rounding
        return W, bias - torch.einsum("bd,bdk->bk", self.mean, W)

    def refresh(
        self, theta: Tensor, idx: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """Re-fit the preconditioner of problems ``idx`` at ``theta``: ``(changed, points,
        gradients)``, the change of variables for :func:`batched_lbfgs`.

        Only problems whose mean curvature fell below half of what their factor assumed change:
        a refresh costs a Gram matrix. The weights stay ``W = L⁻ᵀ V = L'⁻ᵀ V'``, so
        ``V' = L'ᵀ L⁻ᵀ V`` (points) and gradients map by ``L'⁻¹ L`` (the transposed inverse).
        """
        W = self._weights(theta, idx)
        layers = idx.tolist()
        # Layer by layer on views of the sample: indexing it would copy every layer's rows.
        logits = self._logits(self.sample, W, idx)
        p = torch.softmax(logits + self.bias[idx].to(logits.dtype)[..., None], 1)
        curvature = (p * (1 - p)).mean(1)  # mean diagonal of the per-example softmax Hessian
        level = curvature.mean(1, dtype=torch.float64)
        stale = level < _STALE * self.level[idx]
        factors = []  # (old, new) per changed problem, in order
        low = current_solver_path().uses_bfloat16_gram(self.sample)
        mass = _CURVATURE_MASS["bfloat16" if low else "float32"]
        for row, layer in enumerate(layers):
            if bool(stale[row]):
                rows, weights = _heaviest(self.sample[layer], curvature[row], mass)
                old = self.chol[layer].clone()
                self.chol[layer] = preconditioner(
                    rows[None],
                    self.mean[layer][None],
                    weights[None],
                    self.l2,
                    self.inv_scale[layer][None],
                )[0]
                self.level[layer] = level[row]
                factors.append((old, self.chol[layer]))
        d, k = self.X.shape[2], self.n_classes

        def change(vectors: Tensor, *, gradients: bool) -> Tensor:
            # [c, m, d·K] -> per problem one [d, m·K] block: one solve and one product each.
            out = torch.empty_like(vectors)
            for j, (old, new) in enumerate(factors):
                block = rearrange(vectors[j].to(old.dtype), "m (d k) -> d (m k)", d=d, k=k)
                block = change_factor(old, new, block, gradients=gradients)
                out[j] = rearrange(block, "d (m k) -> m (d k)", k=k)
            return out

        return (
            stale,
            partial(change, gradients=False),
            partial(change, gradients=True),
        )

    def _weights(self, theta: Tensor, idx: Tensor) -> Tensor:
        """``W [b, d, K]`` in the dtype of ``X`` for the problems ``idx``."""
        d, k = self.X.shape[2], self.n_classes
        V = theta.reshape(-1, d, k).to(self.X.dtype)
        return self._solve_factors(V, idx, transposed=True)

    def _solve_factors(self, B: Tensor, idx: Tensor, *, transposed: bool) -> Tensor:
        """``L⁻ᵀ B`` (``transposed``) or ``L⁻¹ B`` for ``B [b, d, K]``, ``L`` the factors of
        ``idx``. Triangular solves with ~10 right-hand sides beat products with explicit
        inverses (and ``out=`` views, which LAPACK's layout makes ~1.5x slower)."""
        if len(idx) == len(self.chol):  # all problems: one batched call on the factors
            factors = self.chol.mT if transposed else self.chol
            return torch.linalg.solve_triangular(factors, B, upper=transposed)
        # Per problem on views: indexing the [L, d, d] factors would copy them.
        return torch.stack(
            [
                torch.linalg.solve_triangular(
                    self.chol[layer].mT if transposed else self.chol[layer], b, upper=transposed
                )
                for layer, b in zip(idx.tolist(), B, strict=True)
            ]
        )

    def _logits(self, X: Tensor, W: Tensor, idx: Tensor, out: Tensor | None = None) -> Tensor:
        """``[b, K, n]`` centred logits ``(f - μ) W`` (no bias) of the raw rows ``X[idx]``."""
        # Class-major [K, n]: the softmax over a leading axis of ~10 vectorises along the
        # examples (over a last axis of ~10 it is ~1.4x slower), and the backward product takes
        # the residuals in that layout.
        scaled = (W * self.inv_scale[idx, :, None]).mT.contiguous()  # [b, K, d]
        shift = torch.bmm(self.mean[idx].to(W.dtype)[:, None], W)[:, 0, :, None]  # [b, K, 1]
        if out is None:
            out = torch.empty(len(idx), W.shape[2], X.shape[1], dtype=W.dtype, device=W.device)
        for row, layer in enumerate(idx.tolist()):
            torch.sub(times_transposed(scaled[row], X[layer]), shift[row], out=out[row])
        return out

    def _solve_bias(
        self, Z: Tensor, bias: Tensor, tolerance: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Newton on the biases of logits ``Z [b, K, n]`` from ``bias [b, K]``.

        Returns ``(P [b, K, n] softmax, nll [b, n], bias gradient [b, K], bias)`` at the last
        bias; it stops when every problem's gradient is below its ``tolerance [b]``. ``P`` is a
        view of the reused workspace, valid until the next evaluation.
        """
        f64, k = torch.float64, self.n_classes
        # H·1 = 0 (adding a constant to every bias changes nothing): 11ᵀ/K makes H invertible
        # without changing the step, as the gradient sums to 0.
        gauge = torch.full((k, k), 1.0 / k, dtype=f64, device=Z.device)
        P = self.work[1, : len(Z)]
        scale = self.w[0] if self.uniform else 1.0
        for it in range(_BIAS_NEWTON):
            torch.add(Z, bias.to(Z.dtype)[..., None], out=P)
            top = P.amax(1, keepdim=True)
            P.sub_(top).exp_()
            total = P.sum(1)
            P /= total[:, None]
            weighted = P if self.uniform else P * self.w_data
            # A sum (pairwise), not a product with w: BLAS adds 10⁴ float32 terms in order.
            mean_p = weighted.sum(2).double() * scale
            grad = mean_p - self.class_weight
            if it == _BIAS_NEWTON - 1 or bool((grad.abs().amax(1) <= tolerance).all()):
                break
            outer = (weighted @ P.mT).double() * scale
            # A class whose probabilities all underflowed would make H singular.
            hessian = torch.diag_embed(mean_p.clamp_min(1e-30)) - outer
            step, info = torch.linalg.solve_ex(hessian + gauge, -grad[..., None])
            step = step[..., 0]
            # Where every row is certain of one class (a far start), H is 0 up to rounding:
            # a gradient step, cut to the trust region below, instead.
            failed = (info != 0) | ~torch.isfinite(step).all(1)
            step[failed] = -grad[failed]
            # A trust region of one nat per step: Newton from a far start can overshoot.
            bias = bias + step / step.abs().amax(1, keepdim=True).clamp_min(1.0)
        # -log p(y) = log Σ exp(z + b - top) + top - (z_y + b_y), with z_y read off the logits.
        picked = Z.gather(1, self.y_index.expand(len(Z), -1, -1))[:, 0]
        picked += bias.to(Z.dtype)[:, self.y_index[0, 0]]
        nll = total.log_().add_(top[:, 0]).sub_(picked)
        return P, nll, grad, bias


def _heaviest(rows: Tensor, curvature: Tensor, mass: float) -> tuple[Tensor, Tensor]:
    """The fewest ``rows [s, d]`` whose ``curvature [s]`` sums to ``mass`` of the total, with
    their curvature rescaled so that ``mean(c_i x_i x_iᵀ)`` over them estimates it over all.

    Once predictions are confident, most rows have almost no curvature: at iteration 5 of a
    real-activation probe, 99% of it sits in 15-35% of the rows, so the Gram costs that much.
    """
    if mass >= 1:
        return rows, curvature
    order = torch.argsort(curvature, descending=True)
    cumulative = curvature[order].cumsum(0)
    count = int(torch.searchsorted(cumulative, mass * cumulative[-1])) + 1
    keep = order[: min(count, len(order))].sort().values  # in row order: deterministic sums
    return rows[keep], curvature[keep] * (len(keep) / len(rows))
