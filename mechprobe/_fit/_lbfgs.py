"""Batched L-BFGS: many independent smooth problems, one loop, per-problem histories and steps.

Each problem keeps its own curvature pairs, step length and stopping state, so it converges as if
optimised alone, while the objective is evaluated for all still-active problems at once (e.g. one
logistic regression per layer). Deterministic; the state is float64.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor

_HISTORY = 10
_MAX_LINE_SEARCH = 20
_ARMIJO = 1e-4
# Iterations in a row in which neither the loss fell by more than eps·|f| nor the convergence
# measure reached a new low, before a problem counts as at its floating-point floor.
_STALLED = 5

# fun(theta [b, p], problem indices [b]) -> (loss [b], grad [b, p], convergence measure [b]).
_Fun = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]
# A linear map of stacked vectors [c, m, p] of the changed problems (in order), per problem.
_Map = Callable[[Tensor], Tensor]
# refresh(theta [b, p], problem indices [b]) -> (changed [b] bool, points, gradients): a linear
# change of variables θ' = A θ of the changed problems; `points` applies A (to points and steps),
# `gradients` A⁻ᵀ (to gradients and their differences).
_Refresh = Callable[[Tensor, Tensor], tuple[Tensor, _Map, _Map]]


def batched_lbfgs(
    fun: _Fun,
    theta: Float[Tensor, "batch p"],
    *,
    max_iter: int,
    tol: float,
    first_step: float | None = None,
    eps: float = 1e-6,
    refresh: _Refresh | None = None,
    refresh_at: tuple[int, ...] = (),
    refresh_slower_than: float | None = None,
) -> tuple[Tensor, int, Tensor]:
    """Minimise ``batch`` independent objectives with per-problem L-BFGS histories and steps.

    Backtracking line search accepts Armijo decrease, or (Hager & Zhang's approximate Wolfe test)
    a loss within ``eps·|f|`` of the old one whose slope has not overshot; the second test keeps
    float32 objectives converging when decreases fall below their rounding. A problem stops where
    it is (at its floating-point floor) when its line search fails, or when for five iterations in
    a row its loss fell by at most ``eps·|f|`` and its convergence measure set no new low: steps
    that the approximate Wolfe test accepts at the floor would otherwise wander until
    ``max_iter``, and how soon a line search happens to fail there depends on rounding, so on
    the CPU.

    Args:
        fun: ``(theta [b, p], indices [b]) -> (loss, grad, convergence measure)`` in float64 for
            the problems ``indices`` only (the still active ones).
        theta: ``[B, p]`` start point.
        max_iter: iterations at most.
        tol: a problem stops when its convergence measure is ≤ ``tol``.
        first_step: first step length along ``-grad``; ``None``: ``min(1, 1/||g||₁)``.
        eps: relative loss tolerance of the approximate Wolfe test.
        refresh: ``(theta [b, p], indices [b]) -> (changed [b], points, gradients)``, called
            for the active problems at the iterations ``refresh_at`` to change their variables
            linearly, ``θ' = A θ`` (e.g. a new preconditioner): ``points`` applies ``A`` and
            ``gradients`` ``A⁻ᵀ`` to ``[c, m, p]`` stacks of the ``c`` changed problems'
            vectors. The loss and convergence measure at the point do not change, so nothing
            is evaluated again, and the curvature pairs stay valid (``sᵀy`` is invariant):
            they are mapped, not dropped; only the initial scaling ``γ`` is recomputed from the
            newest pair.
        refresh_at: iterations at which to call ``refresh``.
        refresh_slower_than: refresh only the problems that, at the rate their convergence
            measure fell over the last (up to four) iterations, would need more than this many
            further iterations to reach ``tol``: a new preconditioner costs its own
            computation and disturbs the step scaling for an iteration or two, which a problem
            about to converge never wins back. ``None``: every active problem.

    Returns:
        ``(theta, iterations of the slowest problem, finished [B] bool)``; a problem is finished
        when it reached ``tol`` or its floating-point floor, not when it ran out of iterations.
    """
    theta = theta.clone()
    out = theta  # the rows of problems that stopped hold their final values here
    finished = torch.zeros(len(theta), dtype=torch.bool, device=theta.device)
    # The state below covers the live problems only (original indices ``live``): stopped ones
    # are dropped from it, so the loop's vector operations shrink with the active set.
    live = torch.arange(len(theta), device=theta.device)
    f, g, measure = fun(theta, live)
    active = measure > tol
    s_hist: list[Tensor] = []
    y_hist: list[Tensor] = []
    rho_hist: list[Tensor] = []
    gamma = torch.ones_like(f)
    stalled = torch.zeros_like(f, dtype=torch.long)
    lowest = measure.clone()
    past: list[Tensor] = []  # the convergence measure of the last (up to 4) iterations
    n_iter = 0
    for it in range(max_iter):
        if not bool(active.all()):
            keep = torch.nonzero(active).flatten()
            stopped = torch.nonzero(~active).flatten()
            out[live[stopped]] = theta[stopped]
            finished[live[stopped]] = True
            if len(keep) == 0:
                break
            live, theta, f, g, measure = live[keep], theta[keep], f[keep], g[keep], measure[keep]
            s_hist = [s[keep] for s in s_hist]
            y_hist = [y[keep] for y in y_hist]
            rho_hist = [rho[keep] for rho in rho_hist]
            gamma, stalled, lowest = gamma[keep], stalled[keep], lowest[keep]
            past = [m[keep] for m in past]
            active = torch.ones_like(keep, dtype=torch.bool)
        if refresh is not None and it in refresh_at:
            rows = torch.arange(len(theta), device=theta.device)
            if refresh_slower_than is not None and past:
                rate = (measure / past[0]).clamp_min(1e-300) ** (1 / len(past))
                remaining = torch.log(tol / measure) / torch.log(rate.clamp(max=1 - 1e-12))
                rows = torch.nonzero(remaining > refresh_slower_than).flatten()
            if len(rows):
                changed, points, gradients = refresh(theta[rows], live[rows])
                if bool(changed.any()):
                    _change_variables(
                        rows[changed], points, gradients, theta, g, s_hist, y_hist, rho_hist, gamma
                    )
        n_iter = it + 1
        direction = _two_loop(g, s_hist, y_hist, rho_hist, gamma).neg_()
        slope = torch.linalg.vecdot(g, direction)
        # Curvature pairs are skipped when unsafe, so descent is expected; fall back if not.
        uphill = slope >= 0
        if bool(uphill.any()):
            direction[uphill] = -g[uphill]
            slope = torch.linalg.vecdot(g, direction)
        if s_hist:
            step = torch.ones_like(f)
        elif first_step is not None:
            step = torch.full_like(f, first_step)
        else:
            step = (1.0 / g.abs().sum(1).clamp_min(1e-12)).clamp(max=1.0)
        old_f = f.clone()
        past = [*past[-3:], measure.clone()]
        s, yv = torch.zeros_like(theta), torch.zeros_like(g)
        pending = active.clone()
        for _ in range(_MAX_LINE_SEARCH):
            rows = torch.nonzero(pending).flatten()
            every = len(rows) == len(theta)  # the first trial: no gathers
            start = theta if every else theta[rows]
            along = direction if every else direction[rows]
            cand = torch.addcmul(start, step[rows, None], along)
            cf, cg, cm = fun(cand, live[rows])
            f0, slope0 = old_f[rows], slope[rows]
            armijo = cf <= f0 + _ARMIJO * step[rows] * slope0
            cslope = torch.linalg.vecdot(cg, along)
            approx_wolfe = (cf <= f0 + eps * f0.abs()) & (cslope <= -(1 - 2 * _ARMIJO) * slope0)
            ok = (armijo | approx_wolfe) & torch.isfinite(cf)
            if every and bool(ok.all()):
                s, yv = cand - theta, cg - g
                theta, g, f, measure = cand, cg, cf, cm
                pending[:] = False
                break
            done = rows[ok]
            s[done] = cand[ok] - theta[done]
            yv[done] = cg[ok] - g[done]
            theta[done], g[done], f[done], measure[done] = cand[ok], cg[ok], cf[ok], cm[ok]
            pending[done] = False
            if not bool(pending.any()):
                break
            step[rows[~ok]] *= 0.5
        sy, yy = torch.linalg.vecdot(s, yv), torch.linalg.vecdot(yv, yv)
        valid = sy > 1e-10 * torch.sqrt(torch.linalg.vecdot(s, s) * yy)
        s_hist.append(s)
        y_hist.append(yv)
        # rho = 0 turns a pair into a no-op for problems where it is unsafe or absent.
        rho_hist.append(torch.where(valid, 1.0 / torch.where(valid, sy, 1.0), 0.0))
        gamma = torch.where(valid, sy / torch.where(valid, yy, 1.0), gamma)
        if len(s_hist) > _HISTORY:
            del s_hist[0], y_hist[0], rho_hist[0]
        flat = (old_f - f <= eps * old_f.abs()) & (measure >= lowest)
        stalled = torch.where(flat, stalled + 1, 0)
        lowest = torch.minimum(lowest, measure)
        # A failed line search, or a loss that no longer falls, means the loss is at its
        # floating-point floor: stop that problem.
        active = ~pending & (measure > tol) & (stalled < _STALLED)
    if theta is not out:  # it is when no step was ever taken
        out[live] = theta
    finished[live] = ~active
    return out, n_iter, finished


def _change_variables(
    rows: Tensor,
    points: _Map,
    gradients: _Map,
    theta: Tensor,
    g: Tensor,
    s_hist: list[Tensor],
    y_hist: list[Tensor],
    rho_hist: list[Tensor],
    gamma: Tensor,
) -> None:
    """Map problems ``rows``' point, gradient and curvature pairs to new variables, in place."""
    mapped = points(torch.stack([theta[rows], *(s[rows] for s in s_hist)], 1))
    theta[rows] = mapped[:, 0]
    for i, s in enumerate(s_hist):
        s[rows] = mapped[:, i + 1]
    mapped = gradients(torch.stack([g[rows], *(y[rows] for y in y_hist)], 1))
    g[rows] = mapped[:, 0]
    for i, y in enumerate(y_hist):
        y[rows] = mapped[:, i + 1]
    if s_hist:  # γ = sᵀy / yᵀy of the newest pair, as after a step; sᵀy itself (rho) is invariant
        s, y, rho = s_hist[-1][rows], y_hist[-1][rows], rho_hist[-1][rows]
        yy = torch.linalg.vecdot(y, y)
        gamma[rows] = torch.where(rho > 0, torch.linalg.vecdot(s, y) / yy.clamp_min(1e-300), 1.0)


def _two_loop(
    g: Tensor, s_hist: list[Tensor], y_hist: list[Tensor], rho_hist: list[Tensor], gamma: Tensor
) -> Tensor:
    """L-BFGS two-loop recursion with per-problem scalars: approximates ``H⁻¹ g``."""
    q = g.clone()
    alphas = []
    for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
        a = rho * torch.linalg.vecdot(s, q)
        alphas.append(a)
        q.addcmul_(yv, a[:, None], value=-1)
    q *= gamma[:, None]
    for s, yv, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
        beta = rho * torch.linalg.vecdot(yv, q)
        q.addcmul_(s, (a - beta)[:, None])
    return q
