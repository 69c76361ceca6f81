"""The batched L-BFGS on problems whose optimum is known: stopping, shrinking, refreshing."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mechprobe._fit import batched_lbfgs


def _quadratics(spreads: list[float], dim: int = 40) -> tuple[Tensor, Tensor]:
    """Diagonal quadratics ``½ θᵀ A θ - bᵀ θ``, eigenvalues from 1 to ``spread`` per problem."""
    A = torch.stack([torch.logspace(0, torch.log10(torch.tensor(s)), dim) for s in spreads])
    b = torch.linspace(-1, 1, dim, dtype=torch.float64).expand(len(spreads), -1)
    return A.double(), b.clone()


def _fun(A: Tensor, b: Tensor, calls: list[list[int]] | None = None):
    def fun(theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if calls is not None:
            calls.append(idx.tolist())
        grad = A[idx] * theta - b[idx]
        loss = 0.5 * (theta * A[idx] * theta).sum(1) - (b[idx] * theta).sum(1)
        return loss, grad, grad.abs().amax(1)

    return fun


def test_every_problem_reaches_its_own_optimum_and_stopped_ones_are_no_longer_evaluated() -> None:
    A, b = _quadratics([2.0, 1e3, 10.0])
    calls: list[list[int]] = []
    # eps: the approximate Wolfe test's loss tolerance, at float64's rounding here
    theta, n_iter, finished = batched_lbfgs(
        _fun(A, b, calls), torch.zeros_like(b), max_iter=500, tol=1e-6, eps=1e-15
    )
    assert bool(finished.all()) and 0 < n_iter < 500
    optimum = b / A
    grad = A * theta - b
    assert float(grad.abs().max()) <= 1e-6  # the stopping rule, on every problem
    # |θ - θ*| ≤ |g|₂ / λ_min with λ_min = 1 and |g|₂ ≤ √40 · 1e-6
    assert float((theta - optimum).norm(dim=1).max()) <= 40**0.5 * 1e-6
    # the well-conditioned problems stop first and drop out: the last evaluations are the slow
    # one's alone, and it was evaluated more often than either of the others
    assert calls[-1] == [1]
    counts = [sum(p in call for call in calls) for p in range(3)]
    assert counts[1] > max(counts[0], counts[2])


def test_a_problem_whose_line_search_fails_at_once_stops_where_it_started() -> None:
    # A gradient that points the wrong way (as rounding can make it at the floor): every step
    # along -g raises the loss, so the first line search fails and nothing moves.
    start = torch.full((2, 5), 3.0, dtype=torch.float64)

    def uphill(theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss = 1.0 - (theta - start[idx]).sum(1)
        return loss, torch.ones_like(theta), torch.ones(len(idx), dtype=torch.float64)

    theta, n_iter, finished = batched_lbfgs(uphill, start.clone(), max_iter=10, tol=1e-6, eps=1e-15)
    assert torch.equal(theta, start) and bool(finished.all()) and n_iter == 1


def _same(vectors: Tensor) -> Tensor:
    return vectors


def test_a_change_of_variables_keeps_the_curvature_pairs_and_costs_no_evaluation() -> None:
    # Rescaling θ' = a θ (a per coordinate) at iteration 5 of ill-conditioned quadratics: in the
    # new variables the Hessian is A / a², so a = √A makes it the identity. Mapped pairs stay
    # exact curvature information.
    A, b = _quadratics([1e3, 1e4])
    scale = torch.ones_like(A)  # θ = θ' / scale: the objective sees the original variables

    def fun_in(calls: list[list[int]]):
        inner = _fun(A, b, calls)

        def fun(theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            loss, grad, measure = inner(theta / scale[idx], idx)
            return loss, grad / scale[idx], measure

        return fun

    def refresh(theta: Tensor, idx: Tensor) -> tuple[Tensor, Callable, Callable]:
        new = A[idx].sqrt()
        ratio = (new / scale[idx])[:, None]  # old variables -> new, per coordinate
        scale[idx] = new
        return torch.ones(len(idx), dtype=torch.bool), lambda v: v * ratio, lambda v: v / ratio

    calls: list[list[int]] = []
    theta, _, finished = batched_lbfgs(
        fun_in(calls),
        torch.zeros_like(b),
        max_iter=500,
        tol=1e-9,
        eps=1e-15,
        refresh=refresh,
        refresh_at=(5,),
    )
    assert bool(finished.all())
    optimum = b / A
    assert torch.allclose(theta / scale, optimum, atol=1e-8, rtol=0)
    # Whitened at iteration 5, the problems finish in far fewer evaluations than unwhitened.
    plain: list[list[int]] = []
    scale.fill_(1.0)
    batched_lbfgs(fun_in(plain), torch.zeros_like(b), max_iter=500, tol=1e-9, eps=1e-15)
    assert len(calls) < len(plain)


def test_an_identity_change_of_variables_changes_nothing() -> None:
    # Reported as changed, mapped by the identity: the run is the run without a refresh, bit for
    # bit (pairs kept, nothing evaluated again, the same γ as the newest pair gives).
    A, b = _quadratics([3.0, 1e4])

    def refresh(theta: Tensor, idx: Tensor) -> tuple[Tensor, Callable, Callable]:
        return torch.ones(len(idx), dtype=torch.bool), _same, _same

    with_refresh: list[list[int]] = []
    without: list[list[int]] = []
    kept, _, _ = batched_lbfgs(
        _fun(A, b, with_refresh),
        torch.zeros_like(b),
        max_iter=1000,
        tol=1e-9,
        eps=1e-15,
        refresh=refresh,
        refresh_at=(3, 8),
    )
    plain, _, _ = batched_lbfgs(
        _fun(A, b, without), torch.zeros_like(b), max_iter=1000, tol=1e-9, eps=1e-15
    )
    assert torch.equal(kept, plain)
    assert with_refresh == without


def test_refresh_goes_only_to_problems_that_converge_slowly() -> None:
    A, b = _quadratics([3.0, 1e4])  # problem 0 converges in a few iterations, problem 1 slowly
    offered: list[list[int]] = []

    def refresh(theta: Tensor, idx: Tensor) -> tuple[Tensor, Callable, Callable]:
        offered.append(idx.tolist())
        return torch.zeros(len(idx), dtype=torch.bool), _same, _same  # variables unchanged

    def solve(slower_than: float | None) -> Tensor:
        offered.clear()
        theta, _, finished = batched_lbfgs(
            _fun(A, b),
            torch.zeros_like(b),
            max_iter=1000,
            tol=1e-9,
            eps=1e-15,
            refresh=refresh,
            refresh_at=(3,),
            refresh_slower_than=slower_than,
        )
        assert bool(finished.all())
        return theta

    everyone = solve(None)
    assert offered == [[0, 1]]
    # At iteration 3 the fast problem's measure falls by ~10x per iteration, the slow one's by far
    # less: only the slow one would need more than 20 further iterations at its rate.
    selective = solve(20)
    assert offered == [[1]]
    solve(float("inf"))
    assert offered == []  # nobody that slow: refresh is not even called
    assert torch.equal(everyone, selective)  # an unchanged parametrisation changes nothing
