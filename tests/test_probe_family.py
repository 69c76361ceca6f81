"""Hewitt & Liang's probe family: MLPProbe's depth, rank constraint and dropout, on planted data,
checked against plain numpy computations and against the fits of before these options existed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split

import mechprobe as mp


def _quiet(probe: mp.MLPProbe, X: np.ndarray, y: np.ndarray) -> mp.MLPProbe:
    """Fit without the ConvergenceWarning of short fits (what is tested here is not when Adam
    stops)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.fit(X, y)


def _classes(n: int = 1200, d: int = 10, k: int = 5, seed: int = 0):
    """``k`` Gaussian classes in ``d`` dimensions, split 3:1 (a linear probe separates them)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, d)) + 1.2 * rng.normal(size=(k, d))[y]
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def _xor(n: int = 1600, seed: int = 0):
    """XOR of two signs, plus two noise features: no linear probe beats chance."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def _numpy_forward(probe: mp.MLPProbe, X: np.ndarray, relu: bool) -> np.ndarray:
    """Class probabilities written out from ``coefs_``/``intercepts_`` alone."""
    h = (X - probe.mean_) / probe.scale_
    last = len(probe.coefs_) - 1
    for i, (w, b) in enumerate(zip(probe.coefs_, probe.intercepts_, strict=True)):
        h = h @ w + b
        if relu and i < last:
            h = np.where(h > 0, h, 0.0)
    e = np.exp(h - h.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_rank_k_probe_learns_a_map_of_rank_at_most_k(k: int) -> None:
    X_tr, _, y_tr, _ = _classes()
    probe = _quiet(
        mp.MLPProbe(hidden_layers=0, rank=k, max_iter=60, learning_rate=1e-2), X_tr, y_tr
    )
    A, B = probe.coefs_
    assert A.shape == (10, k) and B.shape == (k, 5)
    assert [b.shape for b in probe.intercepts_] == [(k,), (5,)]
    s = np.linalg.svd(A @ B, compute_uv=False)
    assert np.linalg.matrix_rank(A @ B, tol=1e-10 * s[0]) <= k
    assert (s[k:] <= 1e-10 * s[0]).all() and s[k - 1] > 1e-3 * s[0]  # rank exactly k here


def test_an_unconstrained_rank_matches_a_linear_probe() -> None:
    # rank >= min(d, K) = 5 constrains nothing: held-out accuracy within 0.03 of the convex
    # optimum (LinearProbe, L-BFGS) on five planted classes, where a rank-1 map cannot separate
    # five classes as well.
    X_tr, X_te, y_tr, y_te = _classes()
    linear = mp.LinearProbe().fit(X_tr, y_tr).score(X_te, y_te)
    full = mp.MLPProbe(hidden_layers=0, rank=5, max_iter=200, learning_rate=1e-2)
    one = mp.MLPProbe(hidden_layers=0, rank=1, max_iter=200, learning_rate=1e-2)
    full_acc = _quiet(full, X_tr, y_tr).score(X_te, y_te)
    one_acc = _quiet(one, X_tr, y_tr).score(X_te, y_te)
    assert linear > 0.8
    assert abs(full_acc - linear) <= 0.03
    assert one_acc < linear - 0.1


def test_two_hidden_layers_fit_xor_where_a_linear_probe_cannot() -> None:
    X_tr, X_te, y_tr, y_te = _xor()
    assert mp.LinearProbe().fit(X_tr, y_tr).score(X_te, y_te) < 0.6
    deep = mp.MLPProbe(hidden_size=32, hidden_layers=2, max_iter=150, learning_rate=1e-2)
    assert _quiet(deep, X_tr, y_tr).score(X_te, y_te) > 0.9
    assert [w.shape for w in deep.coefs_] == [(4, 32), (32, 32), (32, 2)]
    assert [b.shape for b in deep.intercepts_] == [(32,), (32,), (2,)]


@pytest.mark.parametrize(
    "settings",
    [
        {"hidden_layers": 1},
        {"hidden_layers": 2},
        {"hidden_layers": 0},
        {"hidden_layers": 0, "rank": 2},
        {"hidden_layers": 2, "dropout": 0.3},
    ],
    ids=str,
)
def test_the_forward_pass_is_the_plain_numpy_one(settings: dict) -> None:
    X_tr, X_te, y_tr, _ = _classes(n=400, k=3)
    probe = _quiet(mp.MLPProbe(hidden_size=12, max_iter=20, **settings), X_tr, y_tr)
    expected = _numpy_forward(probe, X_te, relu=settings.get("rank") is None)
    np.testing.assert_allclose(probe.predict_proba(X_te), expected, rtol=0, atol=1e-10)
    logits = np.log(expected)  # decision_function: the logits up to a constant per row
    scores = probe.decision_function(X_te)
    np.testing.assert_allclose(
        scores - scores.mean(1, keepdims=True), logits - logits.mean(1, keepdims=True), atol=1e-9
    )
    np.testing.assert_array_equal(probe.predict(X_te), probe.classes_[expected.argmax(1)])


def test_two_class_decision_function_is_the_log_odds() -> None:
    X_tr, X_te, y_tr, _ = _xor(n=400)
    probe = _quiet(mp.MLPProbe(hidden_size=8, max_iter=10), X_tr, y_tr)
    p = probe.predict_proba(X_te)
    np.testing.assert_allclose(probe.decision_function(X_te), np.log(p[:, 1] / p[:, 0]), atol=1e-9)


def test_dropout_zero_gives_the_fits_of_before_dropout_existed() -> None:
    # Recorded on the code before hidden_layers, rank and dropout were added (same data, same
    # random_state): the default architecture's draws, minibatches and steps are unchanged.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] * X[:, 1] > 0).astype(int)
    with pytest.warns(ConvergenceWarning):
        probe = mp.MLPProbe(hidden_size=8, max_iter=40, random_state=3).fit(X, y)
    explicit = _quiet(
        mp.MLPProbe(hidden_size=8, max_iter=40, random_state=3, hidden_layers=1, dropout=0.0),
        X,
        y,
    )
    assert probe.n_iter_ == 40
    before_w1 = [
        [-0.42652133107185364, -0.43080124258995056, -0.273202121257782],
        [0.01289006881415844, 0.42522016167640686, -0.11753176152706146],
    ]
    np.testing.assert_allclose(probe.coefs_[0][:2, :3], before_w1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        probe.intercepts_[1], [-0.24974478781223297, -0.30787578225135803], rtol=0, atol=1e-6
    )
    before_p = [[0.48298926796020447, 0.5170107320397955], [0.5918204752777461, 0.4081795247222539]]
    np.testing.assert_allclose(probe.predict_proba(X[:2]), before_p, rtol=0, atol=1e-6)
    pairs = zip(
        probe.coefs_ + probe.intercepts_, explicit.coefs_ + explicit.intercepts_, strict=True
    )
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)
    # probe_layers(mlp=True): the accuracies recorded before, and those of the MLPProbe it is.
    rng.integers(0, 3, 300)  # as drawn where the numbers were recorded, between the two fits
    Xl = rng.normal(size=(200, 3, 4))
    yl = (Xl[:, 1, 0] > 0).astype(int)
    groups = rng.integers(0, 20, 200)
    with pytest.warns(ConvergenceWarning):
        old = mp.probe_layers(Xl, yl, groups=groups, mlp=True, max_iter=30, progress=False)
    np.testing.assert_array_equal(old.accuracy, [0.475, 0.85, 0.525])
    np.testing.assert_array_equal(old.control_accuracy, [0.35, 0.375, 0.5])
    same = mp.MLPProbe(l2=1e-3, max_iter=30, random_state=0)
    with pytest.warns(ConvergenceWarning):
        new = mp.probe_layers(Xl, yl, groups=groups, mlp=same, max_iter=30, progress=False)
    np.testing.assert_array_equal(new.accuracy, old.accuracy)
    np.testing.assert_array_equal(new.control_accuracy, old.control_accuracy)
    assert new.probe == old.probe == "mlp" and new.l2 == old.l2 == 1e-3


def test_dropout_changes_training_but_fits_and_predictions_stay_deterministic() -> None:
    X_tr, X_te, y_tr, _ = _classes(n=400, k=3)

    def fit(**settings):
        return _quiet(mp.MLPProbe(hidden_size=12, max_iter=15, **settings), X_tr, y_tr)

    plain, dropped, again = fit(), fit(dropout=0.3), fit(dropout=0.3)
    other_seed = fit(dropout=0.3, random_state=1)
    assert not np.allclose(plain.coefs_[0], dropped.coefs_[0])  # masks changed the steps
    pairs = zip(dropped.coefs_ + dropped.intercepts_, again.coefs_ + again.intercepts_, strict=True)
    for a, b in pairs:
        np.testing.assert_array_equal(a, b)  # the masks are drawn from random_state
    assert not np.allclose(dropped.coefs_[0], other_seed.coefs_[0])
    first = dropped.predict_proba(X_te)
    np.testing.assert_array_equal(first, dropped.predict_proba(X_te))  # no dropout at predict
    np.testing.assert_allclose(first, _numpy_forward(dropped, X_te, relu=True), atol=1e-10)
    assert dropped.score(X_te, dropped.predict(X_te)) == 1.0


def test_new_parameters_follow_estimator_conventions() -> None:
    probe = mp.MLPProbe(hidden_layers=2, dropout=0.1, rank=None)
    params = probe.get_params()
    assert {params[k] for k in ("hidden_layers", "dropout", "rank")} == {2, 0.1, None}
    assert clone(probe).get_params() == params
    assert probe.set_params(hidden_layers=0, rank=3).rank == 3
    assert not hasattr(probe, "coefs_")  # __init__ and set_params do no work
    # What predict computes is what fit fitted, whatever set_params says afterwards.
    X_tr, X_te, y_tr, _ = _classes(n=300, k=3)
    fitted = _quiet(mp.MLPProbe(hidden_layers=0, rank=2, max_iter=10), X_tr, y_tr)
    before = fitted.predict_proba(X_te)
    fitted.set_params(rank=None, hidden_layers=1)
    np.testing.assert_array_equal(fitted.predict_proba(X_te), before)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"hidden_layers": -1}, r"hidden_layers must be >= 0, got -1; say 1 or 2"),
        ({"rank": 0, "hidden_layers": 0}, r"rank must be None or >= 1, got 0; say rank=None"),
        ({"rank": 10}, r"Hewitt & Liang's rank-10 MLP probes are MLPs of width 10: say "),
        ({"rank": 10}, r"MLPProbe\(hidden_size=10, hidden_layers=1\)"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0: it is the probability"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
    ],
)
def test_bad_settings_are_refused_at_fit_with_the_fix(settings: dict, message: str) -> None:
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    probe = mp.MLPProbe(**settings)  # stored as given: scikit-learn checks at fit
    with pytest.raises(ValueError, match=message):
        probe.fit(X, y)
    with pytest.raises(ValueError, match=message):
        mp.probe_layers(X[:, None], y, mlp=probe, progress=False)


def test_probe_layers_refuses_settings_given_twice() -> None:
    X, y = np.random.default_rng(0).normal(size=(40, 2, 3)), np.arange(40) % 2
    probe = mp.MLPProbe(l2=1e-4)
    with pytest.raises(
        ValueError, match=r"l2=0.01 and mlp=MLPProbe\(l2=0.0001\).*MLPProbe\(\.\.\., l2=0.01\)"
    ):
        mp.probe_layers(X, y, l2=0.01, mlp=probe, progress=False)
    with pytest.raises(ValueError, match=r"max_iter=50 and mlp=MLPProbe\(max_iter=200\)"):
        mp.probe_layers(X, y, max_iter=50, mlp=probe, progress=False)
    with pytest.raises(ValueError, match="pass the same standardize to both"):
        mp.probe_layers(X, y, standardize=False, mlp=probe, progress=False)
    with pytest.raises(TypeError, match="mlp must be"):
        mp.probe_layers(X, y, mlp="yes", progress=False)


def test_probe_layers_fits_a_configured_probe_at_every_layer_with_a_control_task() -> None:
    # Layer 1 holds an XOR of two features; layers 0 and 2 noise. A two-hidden-layer probe finds
    # it (a linear one cannot), and the control task gives a selectivity per layer.
    rng = np.random.default_rng(0)
    n = 800
    X = rng.normal(size=(n, 3, 4))
    y = (X[:, 1, 0] * X[:, 1, 1] > 0).astype(int)
    groups = rng.integers(0, 40, n)
    probe = mp.MLPProbe(hidden_size=32, hidden_layers=2, max_iter=80, learning_rate=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = mp.probe_layers(X, y, groups=groups, mlp=probe, progress=False)
        linear = mp.probe_layers(X, y, groups=False, progress=False)
    assert result.accuracy.shape == result.control_accuracy.shape == (3,)
    assert np.isfinite(result.selectivity).all()
    assert result.best_layer == 1 and result.accuracy[1] > 0.85 > linear.accuracy.max() + 0.2
    # the probe's own l2 (1e-4, not mlp=True's 1e-3) is named: depth is not all that differs
    assert result.probe == "mlp(hidden_size=32, hidden_layers=2, l2=0.0001)"
    assert (result.l2, result.max_iter, result.tol) == (1e-4, 80, 1e-4)  # the probe's, recorded
    assert not hasattr(probe, "coefs_")  # the instance is a specification, never fitted
    rank = mp.MLPProbe(hidden_layers=0, rank=1, max_iter=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        low = mp.probe_layers(X, y, groups=groups, mlp=rank, progress=False)
    assert low.probe == "mlp(hidden_layers=0, rank=1, l2=0.0001)" and low.accuracy.shape == (3,)
    same = mp.MLPProbe(l2=1e-3, random_state=0, max_iter=5)  # mlp=True's penalty and seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert mp.probe_layers(X, y, mlp=same, progress=False).probe == "mlp"
        seeded = mp.probe_layers(X, y, mlp=same, seed=3, progress=False)
    assert seeded.probe == "mlp(random_state=0)"


@pytest.mark.parametrize(
    ("settings", "widths"),
    [
        ({"hidden_layers": 0, "rank": 3}, {10}),  # H&L's linear probe: the input only
        ({"hidden_layers": 2, "hidden_size": 7}, {10, 7}),  # an MLP: every layer's input
    ],
)
def test_dropout_falls_where_hewitt_and_liang_put_it(monkeypatch, settings, widths) -> None:
    """Review 35a F1: the rank probe dropped its rank-k code too, a far stronger regulariser
    than their OneWordLinearLabelProbe's dropout of the input."""
    from mechprobe.probing import _probes

    seen: set[int] = set()
    forward = _probes._mlp_logits

    def spy(x, params, *, relu=True, drop=None):
        def watched(t):
            seen.add(int(t.shape[-1]))
            return drop(t)

        return forward(x, params, relu=relu, drop=None if drop is None else watched)

    monkeypatch.setattr(_probes, "_mlp_logits", spy)
    X_tr, _, y_tr, _ = _classes(n=200, k=3)
    _quiet(mp.MLPProbe(dropout=0.5, max_iter=1, **settings), X_tr, y_tr)
    assert seen == widths
