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
# refresh(theta [b, p], problem indices [b]) -> (new theta [b, p], changed [b] bool).
_Refresh = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


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
        refresh: ``(theta [b, p], indices [b]) -> (theta, changed [b])``, called for the active
            problems at the iterations ``refresh_at`` to change their parametrisation (e.g. a
            new preconditioner); changed problems restart their L-BFGS memory.
        refresh_at: iterations at which to call ``refresh``.

    Returns:
        ``(theta, iterations of the slowest problem, finished [B] bool)``; a problem is finished
        when it reached ``tol`` or its floating-point floor, not when it ran out of iterations.
    """
    everything = torch.arange(len(theta), device=theta.device)
    f, g, measure = fun(theta, everything)
    active = measure > tol
    s_hist: list[Tensor] = []
    y_hist: list[Tensor] = []
    rho_hist: list[Tensor] = []
    gamma = torch.ones_like(f)
    stalled = torch.zeros_like(f, dtype=torch.long)
    lowest = measure.clone()
    n_iter = 0
    for it in range(max_iter):
        if not bool(active.any()):
            break
        if refresh is not None and it in refresh_at:
            idx = torch.nonzero(active).flatten()
            new, changed = refresh(theta[idx], idx)
            if bool(changed.any()):
                idx = idx[changed]
                theta[idx] = new[changed]
                f[idx], g[idx], measure[idx] = fun(theta[idx], idx)
                for rho in rho_hist:
                    rho[idx] = 0.0  # curvature pairs from the old parametrisation no longer apply
                gamma[idx] = 1.0
                active &= measure > tol
                if not bool(active.any()):
                    break
        n_iter = it + 1
        direction = -_two_loop(g, s_hist, y_hist, rho_hist, gamma)
        slope = (g * direction).sum(1)
        # Curvature pairs are skipped when unsafe, so descent is expected; fall back if not.
        direction = torch.where((slope >= 0)[:, None], -g, direction)
        slope = (g * direction).sum(1)
        if s_hist:
            step = torch.ones_like(f)
        elif first_step is not None:
            step = torch.full_like(f, first_step)
        else:
            step = (1.0 / g.abs().sum(1).clamp_min(1e-12)).clamp(max=1.0)
        pending = active.clone()
        new_theta, new_f, new_g, new_measure = theta.clone(), f.clone(), g.clone(), measure.clone()
        for _ in range(_MAX_LINE_SEARCH):
            idx = torch.nonzero(pending).flatten()
            cand = theta[idx] + step[idx, None] * direction[idx]
            cf, cg, cm = fun(cand, idx)
            f0, slope0 = f[idx], slope[idx]
            armijo = cf <= f0 + _ARMIJO * step[idx] * slope0
            cslope = (cg * direction[idx]).sum(1)
            approx_wolfe = (cf <= f0 + eps * f0.abs()) & (cslope <= -(1 - 2 * _ARMIJO) * slope0)
            ok = (armijo | approx_wolfe) & torch.isfinite(cf)
            done = idx[ok]
            new_theta[done], new_f[done], new_g[done], new_measure[done] = (
                cand[ok],
                cf[ok],
                cg[ok],
                cm[ok],
            )
            pending[done] = False
            if not bool(pending.any()):
                break
            step[idx[~ok]] *= 0.5
        s, yv = new_theta - theta, new_g - g
        sy, yy = (s * yv).sum(1), (yv * yv).sum(1)
        valid = sy > 1e-10 * torch.sqrt((s * s).sum(1) * yy)
        s_hist.append(s)
        y_hist.append(yv)
        # rho = 0 turns a pair into a no-op for problems where it is unsafe or absent.
        rho_hist.append(torch.where(valid, 1.0 / torch.where(valid, sy, 1.0), 0.0))
        gamma = torch.where(valid, sy / torch.where(valid, yy, 1.0), gamma)
        if len(s_hist) > _HISTORY:
            del s_hist[0], y_hist[0], rho_hist[0]
        flat = (f - new_f <= eps * f.abs()) & (new_measure >= lowest)
        stalled = torch.where(flat, stalled + 1, 0)
        lowest = torch.minimum(lowest, new_measure)
        theta, f, g, measure = new_theta, new_f, new_g, new_measure
        # A failed line search, or a loss that no longer falls, means the loss is at its
        # floating-point floor: stop that problem.
        active = active & ~pending & (measure > tol) & (stalled < _STALLED)
    return theta, n_iter, ~active


def _two_loop(
    g: Tensor, s_hist: list[Tensor], y_hist: list[Tensor], rho_hist: list[Tensor], gamma: Tensor
) -> Tensor:
    """L-BFGS two-loop recursion with per-problem scalars: approximates ``H⁻¹ g``."""
    q = g.clone()
    alphas = []
    for s, yv, rho in zip(reversed(s_hist), reversed(y_hist), reversed(rho_hist), strict=True):
        a = rho * (s * q).sum(1)
        alphas.append(a)
        q -= a[:, None] * yv
    q *= gamma[:, None]
    for s, yv, rho, a in zip(s_hist, y_hist, rho_hist, reversed(alphas), strict=True):
        beta = rho * (yv * q).sum(1)
        q += (a - beta)[:, None] * s
    return q
