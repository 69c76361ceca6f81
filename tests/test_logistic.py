"""The batched logistic solver against scikit-learn, autograd and its own invariants."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from optimum import (
    binary_objective,
    certified_distance,
    distance,
    gradient_norm,
    multinomial_objective,
    multinomial_theta,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from mechprobe._fit._logistic import LogisticFit, _heaviest, fit_logistic

# Every test here runs on every kernel path the solver can take (conftest.SOLVER_PATHS).
pytestmark = pytest.mark.usefixtures("every_solver_path")


def _layers(n: int = 500, d: int = 12, k: int = 4, strengths=(0.3, 1.0, 2.5), seed: int = 0):
    """``[layers, n, d]`` standardised features whose class signal grows with the layer."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=gen)
    mixing = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)  # correlated features
    X = torch.stack(
        [
            (s * torch.randn(k, d, generator=gen)[y] + torch.randn(n, d, generator=gen)) @ mixing
            for s in strengths
        ]
    ).double()
    X = (X - X.mean(1, keepdim=True)) / X.std(1, keepdim=True)
    return X, y


def _objective(X: torch.Tensor, y: torch.Tensor, W, b, l2: float, weights=None) -> torch.Tensor:
    """The documented loss, written independently: weighted mean CE + l2/2 ||W||²."""
    logits = X @ W + b
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    weights = torch.ones_like(ce) if weights is None else weights
    return (weights * ce).sum() / weights.sum() + 0.5 * l2 * (W**2).sum()


def _theta(fit: LogisticFit, layer: int) -> np.ndarray:
    return multinomial_theta(fit.weight[layer].double(), fit.bias[layer].double())


def _assert_same_optimum(f, k: int, *points: np.ndarray, tol: float) -> None:
    """Each point met the stopping rule (every gradient entry ≤ tol, so the norm ≤ √p · tol) and
    the points agree within what their gradients certify (tests/optimum.py)."""
    for point in points:
        assert gradient_norm(f, point, k) <= len(point) ** 0.5 * tol
    bound = certified_distance(f, list(points), k)
    for other in points[1:]:
        assert distance(points[0], other, k) <= bound, (distance(points[0], other, k), bound)


def test_matches_sklearn_per_layer_with_the_same_penalty() -> None:
    X, y = _layers()
    train, test = slice(0, 400), slice(400, None)
    l2, tol = 1e-2, 1e-9
    fit = fit_logistic(X[:, train], y[train], 4, l2=l2, tol=tol)
    predicted = fit.predict(X[:, test])
    for layer in range(X.shape[0]):
        sk = LogisticRegression(C=1 / (l2 * 400), tol=1e-10, max_iter=10_000)
        sk.fit(X[layer, train].numpy(), y[train].numpy())
        f, _, k = multinomial_objective(X[layer, train], y[train], l2)
        ours = _theta(fit, layer)
        _assert_same_optimum(f, k, ours, tol=tol)
        # scikit-learn stops on its own rules (tol, or a relative loss change of 64 eps), so its
        # distance to the optimum is whatever its gradient certifies, measured here.
        reference = multinomial_theta(sk.coef_.T, sk.intercept_)
        assert distance(ours, reference, k) <= certified_distance(f, [ours, reference], k)
        sk_pred = sk.predict(X[layer, test].numpy())
        ours_pred = predicted[layer].numpy()
        assert (ours_pred == sk_pred).mean() >= 0.99
        y_test = y[test].numpy()
        assert abs((ours_pred == y_test).mean() - (sk_pred == y_test).mean()) <= 0.01
    # the layers really differ: accuracy grows with the planted signal
    accuracy = (predicted == y[test]).double().mean(1)
    assert accuracy[0] < 0.6 < 0.9 < accuracy[2]


def test_two_classes_map_to_sklearn_binary_with_twice_the_C() -> None:
    X, y = _layers(k=2)
    l2 = 1e-2
    C = 2 / (l2 * len(y))
    fit = fit_logistic(X, y, 2, l2=l2, tol=1e-10)
    for layer in range(X.shape[0]):
        sk = LogisticRegression(C=C, tol=1e-12, max_iter=10_000)
        sk.fit(X[layer].numpy(), y.numpy())
        w, b = fit.weight[layer].double(), fit.bias[layer].double()
        ours = np.append((w[:, 1] - w[:, 0]).numpy(), float(b[1] - b[0]))
        g = binary_objective(X[layer], y, C)
        # d/dv of the softmax problem at W = [-v/2, v/2] is half the binary gradient: ≤ 2·tol·√p
        assert gradient_norm(g, ours) <= 2 * 1e-10 * len(ours) ** 0.5
        reference = np.append(sk.coef_[0], sk.intercept_[0])
        assert distance(ours, reference) <= certified_distance(g, [ours, reference])


def test_gradient_of_the_documented_objective_vanishes() -> None:
    X, y = _layers()
    weights = torch.rand(len(y), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fit = fit_logistic(X, y, 4, l2=3e-3, tol=1e-10, sample_weight=weights)
    for layer in range(X.shape[0]):
        W = fit.weight[layer].clone().requires_grad_()
        b = fit.bias[layer].clone().requires_grad_()
        loss = _objective(X[layer], y, W, b, 3e-3, weights)
        gW, gb = torch.autograd.grad(loss, (W, b))
        assert max(gW.abs().max().item(), gb.abs().max().item()) < 1e-9


def test_layers_fitted_together_equal_layers_fitted_alone() -> None:
    X, y = _layers()
    together = fit_logistic(X, y, 4, tol=1e-10)
    for layer in range(X.shape[0]):
        alone = fit_logistic(X[layer : layer + 1], y, 4, tol=1e-10)
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        _assert_same_optimum(f, k, _theta(together, layer), _theta(alone, 0), tol=1e-10)


def test_integer_sample_weights_equal_repeated_rows() -> None:
    X, y = _layers(n=200)
    counts = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(2))
    weighted = fit_logistic(X, y, 4, l2=1e-2, tol=1e-11, sample_weight=counts.double())
    repeated = fit_logistic(
        X.repeat_interleave(counts, dim=1), y.repeat_interleave(counts), 4, l2=1e-2, tol=1e-11
    )
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-2, weights=counts.double())
        _assert_same_optimum(f, k, _theta(weighted, layer), _theta(repeated, layer), tol=1e-11)


def test_penalised_optimum_has_zero_sum_weights_and_biases() -> None:
    # Σ_k ∂loss/∂W_k = l2 Σ_k W_k at the optimum, and the CE part sums to zero over classes.
    X, y = _layers()
    fit = fit_logistic(X, y, 4, tol=1e-10)
    assert fit.weight.sum(-1).abs().max() < 1e-8
    assert fit.bias.sum(-1).abs().max() < 1e-8


def test_float32_agrees_with_float64_and_keeps_its_dtype() -> None:
    X, y = _layers(n=2000, d=40)
    f64 = fit_logistic(X, y, 4, l2=1e-2, tol=1e-9)
    f32 = fit_logistic(X.float(), y, 4, l2=1e-2, tol=1e-6)
    assert f32.weight.dtype == torch.float32 and f64.weight.dtype == torch.float64
    # weight error ≈ gradient error / l2: float32 reaches ~1e-6 in the gradient
    np.testing.assert_allclose(f32.weight.double(), f64.weight, atol=5e-4)
    assert (f32.predict(X.float()) == f64.predict(X)).double().mean() > 0.995


def test_uncentred_features_are_handled_by_the_implicit_centring() -> None:
    X, y = _layers()
    shifted = X + 25.0  # a large common offset, as in raw residual streams
    a = fit_logistic(X, y, 4, tol=1e-10)
    b = fit_logistic(shifted, y, 4, tol=1e-10)
    for layer in range(X.shape[0]):
        # the shift moves only the biases: b(shifted) = b - 25 Σ_d W_d
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        unshifted = b.bias[layer] + 25.0 * b.weight[layer].sum(0)
        back = multinomial_theta(b.weight[layer], unshifted)
        # the W-gradient there is the shifted problem's plus 25 x its bias gradient: ≤ 26·tol
        _assert_same_optimum(f, k, _theta(a, layer), back, tol=26e-10)
    assert (a.predict(X) == b.predict(shifted)).double().mean() > 0.999


def test_center_and_scale_equal_fitting_the_standardised_rows() -> None:
    X, y = _layers()
    gen = torch.Generator().manual_seed(5)
    scale = torch.rand(X.shape[0], X.shape[2], generator=gen, dtype=torch.float64) * 5 + 0.1
    center = torch.randn(X.shape[0], X.shape[2], generator=gen, dtype=torch.float64) * 30
    raw = X * scale[:, None] + center[:, None]  # raw rows whose standardisation is X
    folded = fit_logistic(raw, y, 4, tol=1e-10, center=center, scale=scale)
    plain = fit_logistic(X, y, 4, tol=1e-10)
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        _assert_same_optimum(f, k, _theta(plain, layer), _theta(folded, layer), tol=1e-10)
    with pytest.raises(ValueError, match="scale must be positive"):
        fit_logistic(raw, y, 4, scale=-scale)
    with pytest.raises(ValueError, match=r"center must be \[layers, d\]"):
        fit_logistic(raw, y, 4, center=center[0])


def test_a_given_covariance_preconditions_the_same_problem() -> None:
    """``covariance=`` replaces the first Gram over rows (INLP passes a projected one): the fit
    meets the same stopping rule at the same optimum, and a wrong shape is refused."""
    X, y = _layers()
    centred = X - X.mean(1, keepdim=True)
    covariance = centred.mT @ centred / X.shape[1]
    given = fit_logistic(X, y, 4, tol=1e-10, covariance=covariance)
    plain = fit_logistic(X, y, 4, tol=1e-10)
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        _assert_same_optimum(f, k, _theta(plain, layer), _theta(given, layer), tol=1e-10)
    # A poor covariance (the identity) still preconditions the same problem: the same optimum,
    # to the stopping rule of a looser tol (far from the float64 floor a poor factor reaches).
    eye = torch.eye(X.shape[2], dtype=X.dtype).expand(X.shape[0], -1, -1)
    poor = fit_logistic(X, y, 4, tol=1e-7, covariance=eye, max_iter=1000)
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        _assert_same_optimum(f, k, _theta(plain, layer), _theta(poor, layer), tol=1e-7)
    with pytest.raises(ValueError, match=r"covariance must be \[layers, d, d\]"):
        fit_logistic(X, y, 4, covariance=covariance[0])


def test_a_start_changes_the_iterations_not_the_optimum() -> None:
    """``start=`` (another layer's fit, for raw rows standardised inside the products) reaches the
    optimum a cold fit reaches; started at that optimum, a fit takes no step; a start of other
    classes or layers is refused."""
    X, y = _layers()
    gen = torch.Generator().manual_seed(6)
    scale = torch.rand(X.shape[0], X.shape[2], generator=gen, dtype=torch.float64) * 5 + 0.1
    center = torch.randn(X.shape[0], X.shape[2], generator=gen, dtype=torch.float64) * 30
    raw = X * scale[:, None] + center[:, None]
    cold = fit_logistic(raw, y, 4, tol=1e-10, center=center, scale=scale)
    shifted = LogisticFit(cold.weight.roll(1, 0), cold.bias.roll(1, 0), 0)  # layer l from l - 1
    warm = fit_logistic(raw, y, 4, tol=1e-10, center=center, scale=scale, start=shifted)
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        _assert_same_optimum(f, k, _theta(cold, layer), _theta(warm, layer), tol=1e-10)
    # A fifth class without examples: the start's entries for it are dropped, not fitted.
    absent = fit_logistic(raw, y, 5, tol=1e-10, center=center, scale=scale)
    again = fit_logistic(raw, y, 5, tol=1e-8, center=center, scale=scale, start=absent)
    assert again.n_iter == 0  # the start met tol: the centring offset was carried over exactly
    torch.testing.assert_close(again.weight, absent.weight, rtol=0, atol=1e-12)
    assert cold.n_iter > 5
    with pytest.raises(ValueError, match=r"start must be a fit of \[layers, d, classes\]"):
        fit_logistic(raw, y, 5, center=center, scale=scale, start=cold)
    with pytest.raises(ValueError, match=r"start must be a fit of \[layers, d, classes\]"):
        fit_logistic(raw[:2], y, 4, start=cold)


def test_float32_fit_reaches_the_float64_optimum(every_solver_path) -> None:
    # On every path (oneDNN or matmul products, bfloat16 or float32 Gram) a float32 fit stops at
    # its tol (or at float32's floor, which the gradient measured in float64 shows) and is as
    # close to the float64 optimum as that gradient certifies.
    X, y = _layers(n=2000, d=40)
    reference = fit_logistic(X, y, 4, l2=1e-2, tol=1e-10)
    single = fit_logistic(X.float(), y, 4, l2=1e-2, tol=1e-6)
    assert single.weight.dtype == torch.float32
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-2)
        # float32 gradients carry rounding of ~eps32 · |x| per entry: 1e-5 holds with room
        _assert_same_optimum(f, k, _theta(reference, layer), _theta(single, layer), tol=1e-5)


def test_absent_classes_reduce_to_the_present_classes_problem() -> None:
    X, y = _layers(k=3)
    fit = fit_logistic(X, y * 2, 5, tol=1e-9)  # classes 0, 2, 4 occur; 1 and 3 never do
    present = fit_logistic(X, y, 3, tol=1e-9)
    for layer in range(X.shape[0]):
        f, _, k = multinomial_objective(X[layer], y, 1e-3)
        kept = multinomial_theta(fit.weight[layer][:, [0, 2, 4]], fit.bias[layer][[0, 2, 4]])
        _assert_same_optimum(f, k, _theta(present, layer), kept, tol=1e-9)
    assert fit.weight[..., [1, 3]].abs().max() == 0
    assert (fit.bias[..., [1, 3]] < fit.bias[..., [0, 2, 4]].min() - 49).all()
    assert not torch.isin(fit.predict(X), torch.tensor([1, 3])).any()


def test_logits_and_predict_shapes_and_dtype_follow_x() -> None:
    X, y = _layers()
    fit = fit_logistic(X, y, 4)
    assert isinstance(fit, LogisticFit)
    assert fit.logits(X[:, :7].float()).shape == (3, 7, 4)
    assert fit.logits(X[:, :7].float()).dtype == torch.float32
    assert fit.predict(X).shape == (3, 500)
    with pytest.raises(ValueError, match="same layers and features"):
        fit.logits(X[:2])


def test_warns_when_iterations_run_out() -> None:
    X, y = _layers()
    with pytest.warns(ConvergenceWarning, match=r"layers \[0, 1, 2\] did not reach") as caught:
        fit_logistic(X, y, 4, max_iter=2, tol=1e-12)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller
    with pytest.warns(ConvergenceWarning, match=r"layers \[7, 9, 11\] did not reach"):
        fit_logistic(X, y, 4, max_iter=2, tol=1e-12, layer_names=[7, 9, 11])


def test_converged_fit_does_not_warn() -> None:
    X, y = _layers()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_logistic(X.float(), y, 4, tol=1e-7)  # float32 floor is reached quietly
    assert [str(w.message) for w in caught] == []
    assert 0 < fit.n_iter < 200  # stopped at its floor, not at max_iter


def test_refreshed_preconditioner_rows_carry_the_curvature_mass() -> None:
    # The refresh keeps the fewest rows holding `mass` of the curvature, rescaled so that their
    # mean c x xᵀ differs from the full one by exactly the dropped rows' (PSD) part.
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    curvature = torch.rand(400, generator=gen, dtype=torch.float64) ** 8  # most rows near 0
    kept, weights = _heaviest(rows, curvature, 0.99)
    chosen = torch.isin(rows[:, 0], kept[:, 0])
    assert 0 < len(kept) < 200 and torch.equal(rows[chosen], kept)  # row order kept
    carried = curvature[chosen].sum() / curvature.sum()
    assert carried >= 0.99
    assert carried - curvature[chosen].min() / curvature.sum() < 0.99  # none to spare
    assert bool(curvature[~chosen].max() <= curvature[chosen].min())  # the heaviest ones
    full = (rows.T * curvature) @ rows / len(rows)
    estimate = (kept.T * weights) @ kept / len(kept)
    dropped = (rows[~chosen].T * curvature[~chosen]) @ rows[~chosen] / len(rows)
    torch.testing.assert_close(full - estimate, dropped, rtol=0, atol=1e-12)
    same_rows, same_weights = _heaviest(rows, curvature, 1.0)
    assert same_rows is rows and same_weights is curvature


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"X": torch.zeros(5, 3)}, r"\[layers, n, d\]"),
        ({"X": torch.zeros(1, 5, 3, dtype=torch.long)}, "float tensor"),
        ({"y": torch.zeros(4, dtype=torch.long)}, "one label per example"),
        ({"y": torch.full((5,), 7)}, "encode labels"),
        ({"y": torch.zeros(5)}, "integer class indices"),
        ({"n_classes": 1}, "two classes"),
        ({"l2": 0.0}, "l2 must be > 0"),
        ({"sample_weight": -torch.ones(5)}, "non-negative"),
        ({"X": torch.full((1, 5, 3), float("nan"))}, "NaN or inf"),
    ],
)
def test_bad_input_raises_a_helpful_error(kwargs: dict, message: str) -> None:
    args = {"X": torch.randn(1, 5, 3), "y": torch.tensor([0, 1, 0, 1, 1]), "n_classes": 2}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        fit_logistic(args.pop("X"), args.pop("y"), args.pop("n_classes"), **args)
