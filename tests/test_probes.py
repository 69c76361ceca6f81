"""Probe estimators, control labels, layer-wise probing and scalar mixes, on planted data."""

from __future__ import annotations

import dataclasses
import threading
import types
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from optimum import (
    binary_objective,
    certified_distance,
    distance,
    gradient_norm,
    multinomial_objective,
    multinomial_theta,
)
from scipy.stats import chisquare
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import (
    check_sample_weight_equivalence_on_dense_data,
    parametrize_with_checks,
)

import mechprobe as mp
from mechprobe._fit._paths import current_solver_path
from mechprobe.cli import main as cli_main
from mechprobe.core import load_result
from mechprobe.probing import _layerwise as layerwise
from mechprobe.probing._data import as_layers, standardised
from mechprobe.probing._scalar_mix import _scalar_mix

_SAMPLE_WEIGHT_REASON = (
    "weighted and repeated fits reach the same optimum, but only to the solver tolerance "
    "(tol=1e-4), not to rtol=1e-7; test_sample_weights_equal_repeated_rows_at_tight_tol checks it"
)


def _expected_failures(estimator: object) -> dict[str, str]:
    if isinstance(estimator, mp.LinearProbe):
        return {"check_sample_weight_equivalence_on_dense_data": _SAMPLE_WEIGHT_REASON}
    return {}


@parametrize_with_checks(
    [
        mp.LinearProbe(),
        mp.MLPProbe(hidden_size=16, max_iter=30, learning_rate=3e-2),
        # Hewitt & Liang's family: two hidden layers, a rank-constrained linear probe, dropout.
        mp.MLPProbe(hidden_size=16, max_iter=30, learning_rate=3e-2, hidden_layers=2),
        mp.MLPProbe(max_iter=30, learning_rate=3e-2, hidden_layers=0, rank=2),
        mp.MLPProbe(hidden_size=16, max_iter=30, learning_rate=3e-2, dropout=0.2),
        mp.ScalarMixProbe(),  # 2-D input with n_layers=None: one layer (its 2-D convention)
    ],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_estimator_checks(estimator: object, check: object) -> None:
    check(estimator)  # type: ignore[operator]  # each check raises AssertionError on failure


def test_sample_weights_equal_repeated_rows_at_tight_tol() -> None:
    # The check fits 15 rows of 30 features (separable), weights summing to 27: at l2 = 1/27
    # (scikit-learn's default C = 1) the optimum is well conditioned enough for rtol 1e-7; at the
    # default l2 = 1e-3 the flat objective leaves differences of ~3e-7 at the rounding floor.
    check_sample_weight_equivalence_on_dense_data("LinearProbe", mp.LinearProbe(1 / 27, tol=1e-12))


def _planted(n: int = 1200, layers: int = 7, d: int = 16, k: int = 3, signal=(3, 5), seed: int = 0):
    """``X [n, layers, d]`` noise with class directions added at the ``signal`` layers only."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = rng.normal(size=(n, layers, d)).astype(np.float32)
    for layer in signal:
        X[:, layer] += 1.5 * rng.normal(size=(k, d))[y]
    return X, y


def _probe_objective(X: np.ndarray, y: np.ndarray, C: float):
    """scikit-learn's LogisticRegression(C) objective in the probe's parameters, and ``k``."""
    k = len(np.unique(y))
    if k == 2:
        return binary_objective(X, y, C), None
    f, _, k = multinomial_objective(X, y, 1 / (C * len(y)))
    return f, k


def _probe_theta(coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Parameters ``[W.ravel(), b]`` (``W [d, K]``), or ``[v, c]`` for two classes."""
    if coef.shape[0] == 1:
        return np.append(coef[0], intercept[0])
    return multinomial_theta(coef.T, intercept)


@pytest.mark.parametrize("k", [2, 4])
def test_linear_probe_equals_sklearn_logistic_regression(k: int, every_solver_path) -> None:
    X, y = _planted(n=400, layers=1, d=6, k=k, signal=(0,))
    X = X[:, 0].astype(np.float64) * 3 + 1  # unstandardised on purpose
    tol = 1e-10
    scaler = StandardScaler().fit(X)
    Z = scaler.transform(X)
    l2 = 1 / (0.5 * len(y))  # scikit-learn's C = 1 / (l2 n)
    ours = mp.LinearProbe(l2, tol=tol).fit(X, y)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000))
    ref.fit(X, y)
    raw = mp.LinearProbe(l2, tol=tol, max_iter=2000, standardize=False).fit(X, y)
    sk = LogisticRegression(C=0.5, tol=1e-12, max_iter=10_000).fit(X, y)
    assert raw.coef_.shape == ((1, 6) if k == 2 else (k, 6))
    # Compare optima, each within what the fits' own gradients certify (tests/optimum.py): the
    # probe stops at tol (its softmax gradient; a binary or raw-feature gradient is at most a few
    # times that), scikit-learn on its own rules, so its distance is measured, not assumed.
    standardised = _probe_theta(
        ours.coef_ * scaler.scale_, ours.intercept_ + ours.coef_ @ scaler.mean_
    )
    sk_std = ref[-1]
    for features, mine, theirs, margin in [
        (Z, standardised, _probe_theta(sk_std.coef_, sk_std.intercept_), 2),
        (X, _probe_theta(raw.coef_, raw.intercept_), _probe_theta(sk.coef_, sk.intercept_), 10),
    ]:
        f, gauge = _probe_objective(features, y, 0.5)
        assert gradient_norm(f, mine, gauge) <= margin * len(mine) ** 0.5 * tol
        assert distance(mine, theirs, gauge) <= certified_distance(f, [mine, theirs], gauge)
    assert (ours.predict(X) == ref.predict(X)).mean() >= 0.99
    assert (raw.predict(X) == sk.predict(X)).mean() >= 0.99


def test_pipeline_and_cross_val_score_match_sklearn(every_solver_path) -> None:
    X, y = _planted(n=300, layers=1, d=8, signal=(0,))
    X = X[:, 0].astype(np.float64)
    probe = mp.LinearProbe(l2=1 / 200, tol=1e-8)  # 200 training rows per fold: C = 1
    ours = cross_val_score(make_pipeline(StandardScaler(), probe), X, y, cv=3)
    ref = cross_val_score(
        make_pipeline(StandardScaler(), LogisticRegression(tol=1e-10, max_iter=5000)), X, y, cv=3
    )
    np.testing.assert_allclose(ours, ref, atol=1 / 100)
    assert ours.mean() > 0.8


def test_estimators_clone_and_expose_params() -> None:
    probe = mp.ScalarMixProbe(l2=0.1, max_iter=50)
    assert clone(probe).get_params() == probe.get_params()
    assert mp.LinearProbe().set_params(l2=3.0).l2 == 3.0
    assert mp.ScalarMixProbe(n_layers=4).get_params()["n_layers"] == 4
    assert mp.MLPProbe(hidden_size=8).get_params()["hidden_size"] == 8


def test_probe_errors_are_helpful() -> None:
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="only one class"):
        mp.LinearProbe().fit(X, np.zeros(20))
    fitted = mp.LinearProbe().fit(X, np.arange(20) % 2)
    with pytest.raises(ValueError, match=r"labels \[7\] that were not seen during fit"):
        fitted.score(X, np.full(20, 7))
    with pytest.raises(ValueError, match="NaN"):
        mp.LinearProbe().fit(np.full((20, 3), np.nan), np.arange(20) % 2)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        mp.LinearProbe().fit(X, np.arange(19) % 2)
    with pytest.raises(ValueError, match="l2 must be > 0"):
        mp.LinearProbe(l2=0).fit(X, np.arange(20) % 2)
    # probe_layers names the value given (two classes reported it doubled, "got -2.0"), and its
    # MLP probes took a negative l2 and reported accuracies.
    layered, y = np.stack([X, X], 1), np.arange(20) % 2
    for mlp in (False, True):
        with pytest.raises(ValueError, match=r"l2 must be in \(0.0, inf\], got -1.0"):
            mp.probe_layers(layered, y, l2=-1, mlp=mlp, progress=False)
    with pytest.raises(TypeError, match="max_iter must be an int"):
        mp.probe_layers(layered, y, max_iter=1.5, progress=False)
    with pytest.raises(ValueError, match="seed must be between 0 and 4294967295"):
        mp.probe_layers(layered, y, seed=-1, progress=False)


def test_deprecated_c_and_alpha_are_l2_under_their_old_names() -> None:
    X, y = _planted(n=300, layers=1, d=5, signal=(0,))
    X = X[:, 0].astype(np.float64)
    with pytest.warns(DeprecationWarning, match="l2 = 1 / \\(C n\\)"):
        old = mp.LinearProbe(C=0.5, tol=1e-10).fit(X, y)
    new = mp.LinearProbe(1 / (0.5 * len(y)), tol=1e-10).fit(X, y)
    np.testing.assert_array_equal(old.coef_, new.coef_)
    with pytest.raises(ValueError, match="C must be > 0"):
        mp.LinearProbe(C=0).fit(X, y)
    with pytest.warns(DeprecationWarning, match="the same number"):
        old_mlp = mp.MLPProbe(hidden_size=4, alpha=0.01, max_iter=5).fit(X, y)
    new_mlp = mp.MLPProbe(hidden_size=4, l2=0.01, max_iter=5).fit(X, y)
    np.testing.assert_array_equal(old_mlp.coefs_[0], new_mlp.coefs_[0])


# --- control task -------------------------------------------------------------------------------


def test_control_labels_are_constant_per_type_and_follow_the_label_distribution() -> None:
    rng = np.random.default_rng(0)
    n_types = 3000
    groups = rng.integers(0, n_types, 30_000)
    y = rng.choice(np.array(["NOUN", "VERB", "DET"]), size=len(groups), p=[0.5, 0.3, 0.2])
    control = mp.control_labels(groups, y, seed=1)
    per_type = pd.Series(control).groupby(groups).nunique()
    assert (per_type == 1).all()  # one label per word type, whatever the context
    type_label = pd.Series(control).groupby(groups).first()
    counts = type_label.value_counts().reindex(["NOUN", "VERB", "DET"]).to_numpy()
    token_share = pd.Series(y).value_counts(normalize=True).reindex(["NOUN", "VERB", "DET"])
    assert chisquare(counts, token_share.to_numpy() * counts.sum()).pvalue > 1e-3
    np.testing.assert_allclose(counts / counts.sum(), [0.5, 0.3, 0.2], atol=0.03)


def test_control_labels_do_not_depend_on_order_or_split_and_change_with_seed() -> None:
    rng = np.random.default_rng(1)
    groups = np.array([f"w{i}" for i in rng.integers(0, 200, 2000)])
    y = rng.integers(0, 4, 2000)
    control = mp.control_labels(groups, y, seed=0)
    order = rng.permutation(2000)
    np.testing.assert_array_equal(
        mp.control_labels(groups[order], y[order], seed=0), control[order]
    )
    # the same per-type label whichever copy of the data (same distribution) it is computed on
    doubled = mp.control_labels(np.concatenate([groups, groups]), np.concatenate([y, y]), seed=0)
    np.testing.assert_array_equal(doubled[:2000], control)
    train, test = train_test_split(np.arange(2000), test_size=0.3, random_state=0)
    shared = np.intersect1d(groups[train], groups[test])
    for word in shared[:20]:
        assert (
            len(
                set(control[train][groups[train] == word])
                | set(control[test][groups[test] == word])
            )
            == 1
        )
    assert (mp.control_labels(groups, y, seed=5) != control).mean() > 0.3
    assert set(np.unique(control)) <= set(np.unique(y))


# --- layer-wise probing -------------------------------------------------------------------------


def test_probe_layers_finds_the_planted_layers_and_chance_elsewhere(every_solver_path) -> None:
    X, y = _planted()
    result = mp.probe_layers(X, y, progress=False, scalar_mix=True)
    _, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    chance = np.bincount(y[test]).max() / len(test)
    assert result.accuracy[[3, 5]].min() > 0.95
    others = np.delete(result.accuracy, [3, 5])
    assert np.abs(others - 1 / 3).max() < 0.08
    train_majority = np.bincount(np.delete(y, test)).argmax()
    assert result.majority_baseline == pytest.approx((y[test] == train_majority).mean())
    assert result.majority_baseline <= chance
    assert result.mix_weights is not None and result.mix_weights[[3, 5]].sum() > 0.9
    assert 3 <= result.expected_layer <= 5  # type: ignore[operator]
    assert result.mix_accuracy > 0.95  # type: ignore[operator]
    assert np.isnan(result.control_accuracy).all() and np.isnan(result.selectivity).all()


def test_vectorised_fit_matches_a_sklearn_loop_layer_by_layer(every_solver_path) -> None:
    X, y = _planted(n=800, layers=4, d=10, k=4, signal=(1, 2, 3))
    X[:, 2] *= 0.4  # weaker signal: accuracy strictly between chance and 1
    l2 = 1e-2
    result = mp.probe_layers(X, y, l2=l2, tol=1e-8, progress=False)
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    for layer in range(4):
        scaler = StandardScaler().fit(X[train, layer])
        sk = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10_000)
        sk.fit(scaler.transform(X[train, layer]), y[train])
        sk_accuracy = sk.score(scaler.transform(X[test, layer]), y[test])
        assert abs(result.accuracy[layer] - sk_accuracy) <= 0.01


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("k", [2, 4])
def test_probe_layers_fits_scikit_learns_optimum_for_its_l2(
    k: int, standardize: bool, monkeypatch
) -> None:
    """Each layer's probe is scikit-learn's LogisticRegression(C = 1 / (l2 n_train)) on the
    standardised training rows (on the raw rows with standardize=False), two classes included
    (where the softmax penalty is doubled)."""
    X, y = _planted(n=300, layers=3, d=6, k=k, signal=(1,))
    X = X.astype(np.float64)  # fitted in float64: tol is reachable
    X *= np.array([0.1, 1, 3, 1, 10, 0.5])  # scales that standardising changes
    l2, tol = 0.3, 1e-9  # a strong penalty: a factor of two in it moves the optimum far
    calls: list[tuple[torch.Tensor, dict]] = []
    fit_logistic = layerwise.fit_logistic

    def recorded(train_x, y_train, *args, **kwargs):
        fit = fit_logistic(train_x, y_train, *args, **kwargs)
        calls.append((fit, kwargs))
        return fit

    monkeypatch.setattr(layerwise, "fit_logistic", recorded)
    result = mp.probe_layers(
        X, y, l2=l2, tol=tol, max_iter=2000, standardize=standardize, progress=False
    )
    assert result.standardize is standardize
    train, _ = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    train = np.sort(train)
    C = 1 / (l2 * len(train))
    checked = 0
    for fit, kwargs in calls:
        for row, layer in enumerate(kwargs["layer_names"]):
            if standardize:
                center, scale = kwargs["center"][row].double(), kwargs["scale"][row].double()
                Z = ((torch.from_numpy(X[train, layer]).double() - center) / scale).numpy()
            else:  # the fit's parameters are on the raw rows
                Z = X[train, layer]
            W, b = fit.weight[row].double().numpy(), fit.bias[row].double().numpy()
            binary = np.append(W[:, 1] - W[:, 0], b[1] - b[0])  # scikit-learn's one vector
            mine = binary if k == 2 else multinomial_theta(W, b)
            sk = LogisticRegression(C=C, tol=1e-12, max_iter=10_000).fit(Z, y[train])
            f, gauge = _probe_objective(Z, y[train], C)
            theirs = _probe_theta(sk.coef_, sk.intercept_)
            # Stopped at tol on the softmax gradient: the binary one is at most twice that.
            assert gradient_norm(f, mine, gauge) <= 2 * len(mine) ** 0.5 * tol
            assert distance(mine, theirs, gauge) <= certified_distance(f, [mine, theirs], gauge)
            checked += 1
    assert checked == 3


def test_raw_scalar_mixes_are_the_raw_layers_linear_probes() -> None:
    """standardize=False (AllenNLP's and Tenney et al.'s mix of raw layers): the mix of the first
    layer alone is scikit-learn's logistic regression on that layer's raw features, so
    cumulative_scores' first score is its held-out accuracy; standardised, with one informative
    feature at a small scale and a strong penalty, it is another."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    X = rng.normal(size=(600, 2, 4))
    X[:, :, 0] = 0.01 * (2 * y[:, None] + rng.normal(size=(600, 2)))  # the signal, at 1/100
    # Under a strong penalty a weight follows its feature's covariance with the label, so the
    # unit-scale noise features outvote the small informative one unless features are scaled.
    l2 = 1.0
    train, test = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0, stratify=y)
    sk = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10_000)
    raw_accuracy = sk.fit(X[train, 0], y[train]).score(X[test, 0], y[test])
    raw = mp.cumulative_scores(X, y, l2=l2, tol=1e-9, max_iter=5000, standardize=False,
                               progress=False)  # fmt: skip
    assert raw.standardize is False
    assert abs(raw.scores[0] - raw_accuracy) <= 1 / len(test) + 1e-12
    scaled = mp.cumulative_scores(X, y, l2=l2, tol=1e-9, max_iter=5000, progress=False)
    assert abs(scaled.scores[0] - raw_accuracy) > 0.05
    mixed = mp.probe_layers(X, y, l2=l2, tol=1e-9, max_iter=5000, scalar_mix=True,
                            standardize=False, progress=False)  # fmt: skip
    assert abs(mixed.accuracy[0] - raw_accuracy) <= 1 / len(test) + 1e-12
    with pytest.raises(TypeError, match="standardize must be True or False"):
        mp.probe_layers(X, y, standardize="no", progress=False)


@pytest.mark.parametrize("k", [2, 4])
def test_scalar_mix_of_one_layer_is_that_layers_linear_probe(k: int) -> None:
    X, y = _planted(n=300, layers=1, d=6, k=k, signal=(0,))
    X = X[:, 0].astype(np.float64)
    l2 = 0.3
    mix = mp.ScalarMixProbe(l2, tol=1e-10, max_iter=5000).fit(X[:, None], y)
    linear = mp.LinearProbe(l2, tol=1e-10, max_iter=5000).fit(X, y)
    Z = StandardScaler().fit_transform(X)
    f, gauge = _probe_objective(Z, y, 1 / (l2 * len(y)))
    # Both on standardised features: the mix's γ·W·softmax(w) with one layer is γ·W.
    mine = _probe_theta(*_standardised_coef(linear, X))
    mixed = mix.decision_function(X[:, None])
    ours = linear.decision_function(X)
    scale = np.abs(ours).max()
    np.testing.assert_allclose(mixed, ours, atol=1e-5 * scale)
    assert gradient_norm(f, mine, gauge) <= 10 * len(mine) ** 0.5 * 1e-10


def _standardised_coef(probe: mp.LinearProbe, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaler = StandardScaler().fit(X)
    return probe.coef_ * scaler.scale_, probe.intercept_ + probe.coef_ @ scaler.mean_


def test_groups_of_layers_give_the_results_of_one_batch(monkeypatch) -> None:
    X, y = _planted(n=600, layers=5, d=12, k=3, signal=(1, 3))
    X[:, 3] += 3 * np.random.default_rng(1).normal(size=X[:, 3].shape)  # weaker: not 1.0
    groups = np.arange(len(y)) % 40
    together = mp.probe_layers(X, y, groups=groups, progress=False)
    assert layerwise._group_size(torch.from_numpy(X), 480) == 5  # all layers in one batch
    monkeypatch.setattr(layerwise, "_GROUP_BYTES", 2 * 480 * 12 * X.itemsize)  # two per group
    assert layerwise._group_size(torch.from_numpy(X), 480) == 2
    grouped = mp.probe_layers(X, y, groups=groups, progress=False)
    np.testing.assert_allclose(grouped.accuracy, together.accuracy, atol=1 / 120)
    np.testing.assert_allclose(grouped.control_accuracy, together.control_accuracy, atol=1 / 120)
    assert 0.4 < together.accuracy[3] < 0.95


def test_layers_between_start_from_their_neighbours_and_reach_the_same_probes(
    monkeypatch,
) -> None:
    """Every other layer and the last are fitted first; each layer between starts from the mean
    of its neighbours' fits (control-task fits from theirs), and ends at the probe a cold fit
    reaches."""
    X, y = _planted(n=600, layers=6, d=12, k=3, signal=(1, 3))
    X[:, 3] += 3 * np.random.default_rng(1).normal(size=X[:, 3].shape)  # weaker: not 1.0
    groups = np.arange(len(y)) % 40
    calls: list[tuple[torch.Tensor, object, object]] = []
    fit_logistic = layerwise.fit_logistic

    def recorded(train_x, y_train, *args, **kwargs):
        fit = fit_logistic(train_x, y_train, *args, **kwargs)
        calls.append((y_train, kwargs["start"], fit))
        return fit

    monkeypatch.setattr(layerwise, "fit_logistic", recorded)
    monkeypatch.setattr(layerwise, "_WORKERS", 1)  # one batch per phase, whatever the threads
    assert layerwise._phases(6, mlp=False) == [[0, 2, 4, 5], [1, 3]]
    assert layerwise._phases(6, mlp=True) == [[0, 1, 2, 3, 4, 5]]
    assert layerwise._phases(2, mlp=False) == [[0, 1]]
    phased = mp.probe_layers(X, y, groups=groups, tol=1e-8, progress=False)
    (_, no_start, first), (_, no_start_control, first_control) = calls[0], calls[1]
    (_, start, _), (_, start_control, _) = calls[2], calls[3]
    assert no_start is None and no_start_control is None and len(calls) == 4
    for begin, fitted in ((start, first), (start_control, first_control)):
        for row, (low, high) in enumerate([(0, 1), (1, 2)]):  # layers 1 and 3 of [0, 2, 4, 5]
            torch.testing.assert_close(
                begin.weight[row], (fitted.weight[low] + fitted.weight[high]) / 2
            )
            torch.testing.assert_close(begin.bias[row], (fitted.bias[low] + fitted.bias[high]) / 2)
    # One warning names the layers of X (not their places in a phase's batch), at the caller's
    # line: the fits run on worker threads, whose warnings pointed at mechprobe's code, once per
    # phase.
    with pytest.warns(ConvergenceWarning) as caught:
        layerwise.probe_layers(X, y, max_iter=1, tol=1e-12, progress=False)
    found = [w for w in caught if w.category is ConvergenceWarning]
    assert [str(w.message).split(" did not")[0] for w in found] == [
        "probe_layers: the probes of layers 0, 1, 2, 3, 4, 5"
    ]
    assert found[0].filename == __file__
    monkeypatch.setattr(
        layerwise, "_phases", lambda n_layers, mlp, stride=2: [list(range(n_layers))]
    )
    cold = mp.probe_layers(X, y, groups=groups, tol=1e-8, progress=False)
    np.testing.assert_array_equal(phased.accuracy, cold.accuracy)
    np.testing.assert_array_equal(phased.control_accuracy, cold.control_accuracy)
    assert cold.accuracy[1] > 0.95 and 0.4 < cold.accuracy[3] < 0.95  # the started layers


def test_one_layer_per_group_fits_every_fourth_layer_first_and_interpolates_the_starts() -> None:
    """Large data (one layer per group) goes in three phases; each later layer starts from its
    nearest layers fitted before, interpolated linearly in the layer index."""
    assert layerwise._phases(8, mlp=False, stride=4) == [[0, 4, 7], [2, 6], [1, 3, 5]]
    assert layerwise._phases(8, mlp=False) == [[0, 2, 4, 6, 7], [1, 3, 5]]
    assert layerwise._phases(8, mlp=True, stride=4) == [list(range(8))]
    sources = layerwise._sources(layerwise._phases(8, mlp=False, stride=4))
    assert sources == {2: (0, 4), 6: (4, 7), 1: (0, 2), 3: (2, 4), 5: (4, 6)}
    fits = {
        layer: (torch.full((3, 2), float(layer)), torch.full((2,), -float(layer)))
        for layer in (0, 4, 7)
    }
    start = layerwise._start(fits, [2, 6], sources)
    assert start is not None
    torch.testing.assert_close(start.weight[:, 0, 0], torch.tensor([2.0, 6.0]))  # 4 + 2/3 * 3
    torch.testing.assert_close(start.bias[:, 0], torch.tensor([-2.0, -6.0]))
    assert layerwise._start(fits, [2, 3], sources) is None  # layer 2 is not fitted yet
    assert layerwise._start(fits, [0], sources) is None  # the first phase starts cold


@pytest.fixture
def two_torch_threads():
    """Two intra-op threads (make test runs one), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_layers_one_at_a_time_are_fitted_two_at_once_with_the_same_results(
    monkeypatch, two_torch_threads
) -> None:
    """Large data (one layer per group): two layers are fitted at once, each on one of the two
    threads; every layer between waits for its neighbours, so it gets the start it gets in order,
    and the results are those of fitting the layers one after another."""
    X, y = _planted(n=600, layers=6, d=12, k=3, signal=(1, 3))
    X[:, 3] += 3 * np.random.default_rng(1).normal(size=X[:, 3].shape)  # weaker: not 1.0
    groups = np.arange(len(y)) % 40
    monkeypatch.setattr(layerwise, "_GROUP_BYTES", 1)  # one layer per group
    calls: list[tuple[str, int, tuple[int, ...], bytes, object]] = []
    fit_logistic = layerwise.fit_logistic

    def recorded(train_x, y_train, *args, **kwargs):
        name, threads = threading.current_thread().name, torch.get_num_threads()
        task = y_train.numpy().tobytes()  # which fold, and probe or control
        calls.append((name, threads, tuple(kwargs["layer_names"]), task, kwargs["start"]))
        return fit_logistic(train_x, y_train, *args, **kwargs)

    monkeypatch.setattr(layerwise, "fit_logistic", recorded)
    both = mp.probe_layers(X, y, groups=groups, n_folds=2, tol=1e-8, progress=False)
    assert torch.get_num_threads() == 2  # restored
    assert {(name.startswith("mechprobe-probe"), threads) for name, threads, *_ in calls} == {
        (True, 1)
    }
    assert len({name for name, *_ in calls}) == 2
    started = sorted(layers[0] for *_, layers, _, start in calls if start is not None)
    assert started == [1] * 4 + [2] * 4 + [3] * 4  # [[0, 4, 5], [2], [1, 3]]; two tasks, folds
    together = {(layers, task): start for *_, layers, task, start in calls}
    calls.clear()
    monkeypatch.setattr(layerwise, "_WORKERS", 1)
    alone = mp.probe_layers(X, y, groups=groups, n_folds=2, tol=1e-8, progress=False)
    assert {name for name, *_ in calls} == {threading.current_thread().name}
    np.testing.assert_array_equal(both.accuracy, alone.accuracy)
    np.testing.assert_array_equal(both.control_accuracy, alone.control_accuracy)
    in_order = {(layers, task): start for *_, layers, task, start in calls}
    assert together.keys() == in_order.keys() and len(in_order) == 24
    for key, start in in_order.items():
        if start is None:
            assert together[key] is None
        else:  # the same start up to the rounding of one thread's products against two's
            torch.testing.assert_close(together[key].weight, start.weight, atol=1e-5, rtol=1e-4)


def test_small_data_splits_each_phase_between_two_workers_with_the_same_results(
    monkeypatch, two_torch_threads
) -> None:
    """With two threads, each phase of a small data set is split in two groups, fitted at once on
    a thread each; the results are those of one batch per phase on both threads."""
    X, y = _planted(n=600, layers=6, d=12, k=3, signal=(1, 3))
    X[:, 3] += 3 * np.random.default_rng(1).normal(size=X[:, 3].shape)  # weaker: not 1.0
    values = torch.from_numpy(X)
    assert layerwise._workers(6, mlp=False) == 2
    assert layerwise._workers(6, mlp=True) == 1 and layerwise._workers(1, mlp=False) == 1
    assert layerwise._group_size(values, 480, 2) == layerwise._group_size(values, 480) == 6
    assert layerwise._parts([[0, 2, 4, 5], [1, 3]], 6, 2) == [[0, 2], [4, 5], [1], [3]]
    assert layerwise._parts([[0, 2, 4, 5], [1, 3]], 6, 1) == [[0, 2, 4, 5], [1, 3]]
    assert layerwise._parts([[0, 2, 4, 6, 7]], 2, 2) == [[0, 2], [4, 6], [7]]
    monkeypatch.setattr(layerwise, "_GROUP_BYTES", 2 * 480 * 12 * X.itemsize)  # two layers
    assert layerwise._group_size(values, 480, 2) == 1  # a worker's share: one layer
    monkeypatch.undo()
    calls: list[tuple[str, int, tuple[int, ...]]] = []
    fit_logistic = layerwise.fit_logistic

    def recorded(train_x, y_train, *args, **kwargs):
        name, threads = threading.current_thread().name, torch.get_num_threads()
        calls.append((name, threads, tuple(kwargs["layer_names"])))
        return fit_logistic(train_x, y_train, *args, **kwargs)

    monkeypatch.setattr(layerwise, "fit_logistic", recorded)
    split = mp.probe_layers(X, y, tol=1e-8, progress=False)
    assert torch.get_num_threads() == 2  # restored
    assert sorted(layers for *_, layers in calls) == [(0, 2), (1,), (3,), (4, 5)]
    assert {threads for _, threads, _ in calls} == {1}
    assert len({name for name, *_ in calls}) == 2
    assert all(name.startswith("mechprobe-probe") for name, *_ in calls)
    calls.clear()
    monkeypatch.setattr(layerwise, "_WORKERS", 1)
    batched = mp.probe_layers(X, y, tol=1e-8, progress=False)
    assert [layers for *_, layers in calls] == [(0, 2, 4, 5), (1, 3)]
    np.testing.assert_array_equal(split.accuracy, batched.accuracy)
    assert 0.4 < split.accuracy[3] < 0.95


def test_a_group_larger_than_a_threads_first_gets_a_larger_buffer(
    monkeypatch, two_torch_threads
) -> None:
    """With every eighth layer first, a thread's first group can be one layer and a later one
    two: its buffer grows instead of failing, and results are those of one worker."""
    X, y = _planted(n=400, layers=9, d=8, k=3, signal=(1, 4, 7))
    phases = layerwise._phases
    monkeypatch.setattr(layerwise, "_phases", lambda n, mlp, stride=2: phases(n, mlp, 8))
    assert layerwise._parts(phases(9, False, 8), 9, 2) == [[0], [8], [4], [2], [6], [1, 3], [5, 7]]
    both = mp.probe_layers(X, y, tol=1e-8, progress=False)
    monkeypatch.setattr(layerwise, "_WORKERS", 1)
    alone = mp.probe_layers(X, y, tol=1e-8, progress=False)
    np.testing.assert_array_equal(both.accuracy, alone.accuracy)


def test_a_solver_path_block_holds_in_the_worker_threads(monkeypatch, two_torch_threads) -> None:
    """Worker threads start with an empty context: each task runs in a copy of the caller's, so
    ``solver_path`` forces the path of every fit, whichever thread runs it."""
    X, y = _planted(n=300, layers=5, d=8, signal=(1,))
    seen: list[tuple[str, mp.SolverPath]] = []
    fit_logistic = layerwise.fit_logistic

    def recorded(train_x, y_train, *args, **kwargs):
        seen.append((threading.current_thread().name, current_solver_path()))
        return fit_logistic(train_x, y_train, *args, **kwargs)

    monkeypatch.setattr(layerwise, "fit_logistic", recorded)
    with mp.solver_path("portable"):
        mp.probe_layers(X, y, progress=False)
    assert len({name for name, _ in seen}) == 2
    assert {path for _, path in seen} == {mp.SolverPath("matmul", "float32")}


def test_an_error_in_a_layer_fitted_beside_another_reaches_the_caller(
    monkeypatch, two_torch_threads
) -> None:
    X, y = _planted(n=300, layers=4, d=8, signal=(1,))
    monkeypatch.setattr(layerwise, "_GROUP_BYTES", 1)
    fit_logistic = layerwise.fit_logistic

    def failing(train_x, y_train, *args, **kwargs):
        if kwargs["layer_names"] == [2]:
            raise RuntimeError("layer 2 failed")
        return fit_logistic(train_x, y_train, *args, **kwargs)

    monkeypatch.setattr(layerwise, "fit_logistic", failing)
    with pytest.raises(RuntimeError, match="layer 2 failed"):
        mp.probe_layers(X, y, progress=False)
    assert torch.get_num_threads() == 2
    assert not [t for t in threading.enumerate() if t.name.startswith("mechprobe-probe")]


def test_float16_activations_are_gathered_as_float32_without_a_full_copy(tmp_path) -> None:
    X, y = _planted(n=400, layers=3, d=8, signal=(1,))
    np.save(tmp_path / "acts.npy", X.astype(np.float16))
    half = np.load(tmp_path / "acts.npy", mmap_mode="r")  # read-only, as collect() leaves them
    values, _, _ = as_layers(half, y)
    assert values.dtype == torch.float16  # no float32 copy of everything
    train, test = np.arange(300), np.arange(300, 400)
    train_x, test_x, _, _ = standardised(values, train, test)
    assert train_x.dtype == test_x.dtype == torch.float32  # type: ignore[union-attr]
    from_half = mp.probe_layers(half, y, progress=False)
    from_single = mp.probe_layers(half.astype(np.float32), y, progress=False)
    np.testing.assert_array_equal(from_half.accuracy, from_single.accuracy)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_standardised_moments_equal_numpy_over_many_gathered_chunks(dtype) -> None:
    # 5,000 training rows are gathered (and their moments merged) in three chunks; features
    # with offsets that dwarf their spread, as residual streams' outlier dimensions have.
    rng = np.random.default_rng(0)
    offsets = np.array([0.0, 50.0, -300.0, 2.0])
    spread = np.array([1.0, 0.5, 2.0, 1e-2])
    X = (offsets + spread * rng.normal(size=(6000, 3, 4))).astype(dtype)
    train, test = np.sort(rng.permutation(6000)[:5000]), np.arange(10)
    train_x, test_x, mean, scale = standardised(torch.from_numpy(X), train, test, layers=[2, 0])
    rows = X[train][:, [2, 0]].astype(np.float64)
    assert mean.dtype == scale.dtype == torch.float64
    np.testing.assert_allclose(mean.numpy(), rows.mean(0), rtol=0, atol=1e-7 * 300)
    # The variance's error is at most the mean's error times the centre's rounding (per row).
    np.testing.assert_allclose(scale.numpy(), rows.std(0), rtol=1e-5)
    expected = (X[test][:, [2, 0]].astype(np.float64) - rows.mean(0)) / rows.std(0)
    np.testing.assert_allclose(test_x.numpy(), expected.transpose(1, 0, 2), rtol=1e-4, atol=1e-4)  # type: ignore[union-attr]
    np.testing.assert_allclose(
        train_x.numpy(), ((rows - rows.mean(0)) / rows.std(0)).transpose(1, 0, 2), atol=1e-4
    )


def test_control_task_and_selectivity() -> None:
    rng = np.random.default_rng(0)
    n_types, n, d = 60, 3000, 64
    groups = rng.integers(0, n_types, n)
    embedding = rng.normal(size=(n_types, d))  # each word type has its own vector
    y = groups % 3
    X = (embedding[groups] + 0.3 * rng.normal(size=(n, d)))[:, None, :].repeat(2, 1)
    X[:, 0] = rng.normal(size=(n, d))  # layer 0 knows nothing
    result = mp.probe_layers(X, y, groups=groups, progress=False)
    np.testing.assert_allclose(result.selectivity, result.accuracy - result.control_accuracy)
    assert result.accuracy[1] > 0.9 and result.control_accuracy[1] > 0.5  # types memorised
    assert abs(result.selectivity[0]) < 0.1
    # the same answer through an Activations-like object and a tensor
    acts = types.SimpleNamespace(values=X, labels=y, groups=groups)
    again = mp.probe_layers(acts, progress=False)
    np.testing.assert_array_equal(again.control_accuracy, result.control_accuracy)
    tensor = mp.probe_layers(torch.from_numpy(X), y, groups=groups, progress=False)
    np.testing.assert_array_equal(tensor.accuracy, result.accuracy)


def test_a_control_task_that_only_renames_the_classes_is_skipped() -> None:
    # country_dataset(target="country") groups each country as its own label: the control labels
    # were a function of the task labels, so selectivity came out ~0 (1.000 - 1.000, 0.403 -
    # 0.403) whatever the layer held, printed and plotted as Hewitt & Liang selectivity.
    data = mp.country_dataset(n_countries=12)
    labels = np.asarray(data.labels)
    assert (labels == np.asarray(data.groups)).all()
    rng = np.random.default_rng(0)
    classes, y = np.unique(labels, return_inverse=True)
    X = rng.normal(size=(len(y), 2, 16))
    X[:, 1] += 3 * rng.normal(size=(len(classes), 16))[y]
    with pytest.warns(UserWarning, match="a control task would only rename the classes"):
        result = mp.probe_layers(X, labels, groups=data.groups, progress=False)
    assert np.isnan(result.control_accuracy).all() and np.isnan(result.selectivity).all()
    plain = mp.probe_layers(X, labels, groups=False, progress=False)
    np.testing.assert_array_equal(result.accuracy, plain.accuracy)
    # Several types in one class keep their control task.
    merged = np.where(y < 2, 0, y)  # classes 0 and 1 merged: one class holds two types
    kept = mp.probe_layers(X, merged, groups=data.groups, progress=False)
    assert np.isfinite(kept.control_accuracy).all()


def test_mlp_probe_memorises_the_control_task_more_than_a_linear_probe() -> None:
    rng = np.random.default_rng(0)
    n_types, n = 40, 2000
    groups = rng.integers(0, n_types, n)
    X = rng.normal(size=(n_types, 6))[groups][:, None, :] + 0.05 * rng.normal(size=(n, 1, 6))
    y = groups % 2
    linear = mp.probe_layers(X, y, groups=groups, progress=False)
    mlp = mp.probe_layers(X, y, groups=groups, mlp=True, max_iter=60, progress=False)
    assert mlp.control_accuracy[0] > linear.control_accuracy[0] + 0.1
    assert mlp.probe == "mlp"


def test_an_mlp_layers_probe_does_not_depend_on_the_layers_beside_it() -> None:
    """Each layer starts from the same draw, sees the same minibatches and stops on its own rule:
    fitted with three others or alone, a layer's MLP is the same (it was not: one early-stopping
    rule on the summed loss, and a different initial draw per position)."""
    from mechprobe.probing._probes import _fit_mlp

    rng = np.random.default_rng(0)
    n, d = 300, 12
    y = rng.integers(0, 3, n)
    X = rng.normal(size=(n, 4, d))
    X[np.arange(n), 2, y] += 0.8
    X[:, 3] *= 5  # a noise layer: it stops at another epoch than the informative one
    Xt = torch.from_numpy(X).float().permute(1, 0, 2).contiguous()
    args = {"hidden_size": 16, "l2": 1e-3, "max_iter": 80, "batch_size": 64}
    args |= {"learning_rate": 1e-3, "tol": 1e-4, "seed": 3}
    together, _ = _fit_mlp(Xt, torch.from_numpy(y), 3, **args)
    for layer in range(4):
        alone, _ = _fit_mlp(Xt[layer : layer + 1], torch.from_numpy(y), 3, **args)
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a[layer], b[0], rtol=1e-4, atol=1e-5)
    full = mp.probe_layers(X, y, mlp=True, max_iter=80, progress=False)
    one = [mp.probe_layers(X[:, [k]], y, mlp=True, max_iter=80, progress=False) for k in (1, 3)]
    assert [r.accuracy[0] for r in one] == [full.accuracy[1], full.accuracy[3]]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_probes_trained_by_autograd_fit_where_gradients_are_off(mode: str) -> None:
    # Under torch.set_grad_enabled(False) (many notebooks' first line) or inference_mode the MLP
    # and scalar-mix probes failed: "element 0 of tensors does not require grad".
    X, y = _planted(n=120, layers=3, signal=(1,))
    fits = {
        "mlp": lambda: mp.MLPProbe(max_iter=20).fit(X[:, 1], y).predict_proba(X[:, 1]),
        "mix": lambda: mp.ScalarMixProbe().fit(X, y).predict_proba(X),
        "layers": lambda: mp.probe_layers(X, y, mlp=True, max_iter=20, progress=False).accuracy,
    }
    expected = {name: fit() for name, fit in fits.items()}
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        X = torch.as_tensor(X)  # made in the mode: an inference tensor under inference_mode
        got = {name: fit() for name, fit in fits.items()}
    for name in fits:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert torch.is_grad_enabled()


def test_mlp_probes_warn_when_max_iter_ends_their_training() -> None:
    # The linear and scalar-mix fits warned; MLP probes stopped at max_iter silently.
    X, y = _planted(n=120, layers=2, signal=(1,))
    with pytest.warns(ConvergenceWarning, match="MLP probe: 1 of 1 fits did not stop"):
        mp.MLPProbe(max_iter=3).fit(X[:, 1], y)
    with pytest.warns(ConvergenceWarning, match=r"the MLP probes of layers 0, 1 did not") as got:
        mp.probe_layers(X, y, mlp=True, max_iter=3, progress=False)
    assert [w.filename for w in got if w.category is ConvergenceWarning] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        mp.MLPProbe(max_iter=15, tol=1e3).fit(X[:, 1], y)  # stops on its own rule: no warning


def test_rare_class_warning_names_the_label() -> None:
    X, _ = _planted(n=60, layers=2, signal=(1,))
    y = np.array(["NOUN"] * 30 + ["VERB"] * 29 + ["INTJ"])
    with pytest.warns(UserWarning, match=r"classes \['INTJ'\] have fewer than 2"):
        mp.probe_layers(X, y, progress=False)
    with pytest.warns(UserWarning, match=r"\['INTJ'\] have fewer than 3"):
        mp.probe_layers(X, y, n_folds=3, progress=False)
    assert mp.probe_layers(X, np.arange(60) % 3 * 1.0, progress=False).n_classes == 3  # 0., 1., 2.


def test_k_fold_runs_every_fold() -> None:
    X, y = _planted(n=300, layers=3, signal=(1,))
    result = mp.probe_layers(X, y, n_folds=3, progress=False)
    assert result.split == "3-fold" and result.accuracy[1] > 0.9


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.zeros((10, 4)), np.arange(10) % 2, r"\[n, layers, d\]"),
        (np.full((10, 2, 3), np.inf), np.arange(10) % 2, "NaN or inf"),
        (np.zeros((10, 2, 3)), np.arange(9) % 2, "one label per row"),
        (np.zeros((10, 2, 3)), np.zeros(10), "only one class"),
        (np.zeros((10, 2, 3)), None, "pass y"),
        (np.zeros((10, 2, 3)), np.linspace(0, 1, 10), "continuous values"),
        (np.zeros((10, 2, 3)), np.array(list(np.linspace(0, 1, 10)), dtype=object), "continuous"),
        (np.zeros((10, 2, 3)), np.array(["a", None] * 5, dtype=object), r"rows \[1, 3, 5"),
        (np.zeros((10, 2, 3)), np.array([0.0, np.nan] * 5), "None or NaN"),
    ],
)
def test_probe_layers_errors(X: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mp.probe_layers(X, y, progress=False)


def test_expected_layers_put_the_embeddings_before_block_0(tmp_path) -> None:
    """Collected as Tenney et al. did (the embeddings, then every block's output), the embeddings
    (resid_pre@0) and block 0's output were both layer 0 in the expected layers: E_s weighed the
    embeddings as block 0, and the prefixes could not tell them apart (review 33a S1). Both are
    on the scale of block outputs now, the embeddings -1: Tenney's numbering (embeddings 0,
    block l's output l + 1), written out here, minus one."""
    tiny = mp.tiny_model()
    data = mp.pos_dataset(max_sentences=60)
    # Collected out of order: the prefixes still start at the embeddings.
    acts = mp.collect(tiny, data, ["resid_post", mp.Site("resid_pre", 0)], progress=False)
    assert acts.sites[-1] == "blocks.0.hook_resid_pre"
    tenney = np.arange(4)  # embeddings 0, block l's output l + 1
    as_collected = tenney[[1, 2, 3, 0]]
    cumulative = mp.cumulative_scores(acts, progress=False)
    assert cumulative.depths.tolist() == [-1, 0, 1, 2]
    assert cumulative.layers.tolist() == [0, 0, 1, 2]  # layer labels, as frames write them
    frame = cumulative.to_frame()
    assert frame["site"].tolist()[:2] == ["resid_pre@0", "resid_post@0"]
    assert frame["depth"].tolist() == [-1, 0, 1, 2]
    gains = np.diff(cumulative.scores)
    assert abs(gains.sum()) > 0  # E_Δ defined
    assert cumulative.expected_layer == pytest.approx(tenney[1:] @ gains / gains.sum() - 1)
    back = mp.CumulativeScores.load(cumulative.save(tmp_path / "c.json"))
    assert back.depths.tolist() == [-1, 0, 1, 2]
    mix = mp.ScalarMixProbe().fit(acts, acts.labels)
    assert mix.expected_layer_ == pytest.approx(float(as_collected @ mix.layer_weights_) - 1)
    assert mix.layer_weights_[-1] > 1e-3  # the embeddings weigh in: -1 is not 0
    result = mp.probe_layers(acts, scalar_mix=True, progress=False)
    assert result.expected_layer == pytest.approx(float(as_collected @ result.mix_weights) - 1)


def test_held_out_activations_are_read_by_their_sites_not_their_order() -> None:
    """Review 43a F1: held-out Activations collected in another layer order (or at other layers)
    were read by position: cumulative_scores and ScalarMixProbe scored 0.156 for 0.486."""
    tiny = mp.tiny_model()
    data = mp.pos_dataset(max_sentences=60)
    train, test = data.subset(list(range(40))), data.subset(list(range(40, 60)))
    fitted = mp.collect(tiny, train, "resid_post", layers=[2, 0], progress=False)
    same = mp.collect(tiny, test, "resid_post", layers=[2, 0], progress=False)
    swapped = mp.collect(tiny, test, "resid_post", layers=[0, 2], progress=False)
    other = mp.collect(tiny, test, "resid_post", layers=[1, 2], progress=False)
    want = mp.cumulative_scores(fitted, X_test=same, progress=False).scores
    got = mp.cumulative_scores(fitted, X_test=swapped, progress=False).scores
    np.testing.assert_array_equal(got, want)
    mix = mp.ScalarMixProbe().fit(fitted, fitted.labels)
    assert mix.sites_ == fitted.sites
    assert mix.score(swapped, swapped.labels) == mix.score(same, same.labels)
    np.testing.assert_array_equal(mix.decision_function(swapped), mix.decision_function(same))
    # The same values as an array: matched by position, as scikit-learn matches columns.
    assert mix.score(np.asarray(same.values), same.labels) == mix.score(same, same.labels)
    message = r"holds the sites \['blocks.1.hook_resid_post', 'blocks.2.hook_resid_post'\]"
    with pytest.raises(ValueError, match="X_test " + message):
        mp.cumulative_scores(fitted, X_test=other, progress=False)
    with pytest.raises(ValueError, match="X " + message):
        mix.predict(other)
    # A probe fitted before it kept its sites (unpickled from an older release) reads by position.
    del mix.sites_
    assert mix.score(same, same.labels) == mix.score(np.asarray(same.values), same.labels)


def test_split_groups_keep_each_text_on_one_side() -> None:
    """split_groups="text" (Hewitt & Liang split by sentence): the held-out split is
    scikit-learn's StratifiedGroupKFold's first fold of round(1 / test_size), written out here
    with a per-layer LogisticRegression on it; no text is on both sides."""
    tiny = mp.tiny_model()
    data = mp.pos_dataset(max_sentences=80).drop_rare(5)  # every class in every fold
    acts = mp.collect(tiny, data, "resid_post", progress=False)
    labels, texts = np.asarray(acts.labels), np.asarray(acts.text_index)
    folds = StratifiedGroupKFold(5, shuffle=True, random_state=3)
    train, test = next(folds.split(np.zeros(len(labels)), labels, texts))
    assert not set(texts[train]) & set(texts[test])
    l2 = 1e-2
    result = mp.probe_layers(acts, split_groups="text", seed=3, l2=l2, tol=1e-8, groups=False,
                             progress=False)  # fmt: skip
    assert result.split == "holdout(test_size=0.2, by text)"
    values = np.asarray(acts.values, dtype=np.float64)
    for layer in range(values.shape[1]):
        scaler = StandardScaler().fit(values[train, layer])
        sk = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10_000)
        sk.fit(scaler.transform(values[train, layer]), labels[train])
        expected = sk.score(scaler.transform(values[test, layer]), labels[test])
        assert abs(result.accuracy[layer] - expected) <= 2 / len(test)
    free = mp.probe_layers(acts, seed=3, l2=l2, tol=1e-8, groups=False, progress=False)
    assert free.split == "holdout(test_size=0.2)"
    folded = mp.probe_layers(acts, split_groups=texts, n_folds=3, groups=False, progress=False)
    assert folded.split == "3-fold, by group"
    for bad, message in (
        ("sentence", "split_groups must be 'text'"),
        (texts[:-1], "one group per row"),
    ):
        with pytest.raises(ValueError, match=message):
            mp.probe_layers(acts, split_groups=bad, progress=False)
    with pytest.raises(ValueError, match="reads the texts of collected Activations"):
        mp.probe_layers(np.asarray(acts.values), labels, split_groups="text", progress=False)
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        mp.probe_layers(acts, split_groups=np.arange(len(labels)) % 3, progress=False)
    scores = mp.cumulative_scores(acts, split_groups="text", seed=3, progress=False)
    assert np.isfinite(scores.scores).all()
    with pytest.raises(ValueError, match="X_test is given"):
        mp.cumulative_scores(acts, X_test=acts, split_groups="text", progress=False)


def test_grouped_splits_follow_the_seed_and_say_what_they_hold_out() -> None:
    """A class rarer than the folds dropped grouped splits to an unshuffled GroupKFold: every seed
    gave one split, holding out the largest groups (review 34a F2); test_size=0.9 held out half
    while the result recorded 0.9 (F3)."""
    from mechprobe.probing._data import splits

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 3)  # 20 texts of 3 rows
    y = rng.integers(0, 2, 60)
    y[:3] = 2  # a class of 3 rows, rarer than the 5 folds
    with pytest.warns(UserWarning, match="fewer than 5 examples"):
        held = {tuple(splits(y, test_size=0.2, n_folds=None, seed=s, split_groups=groups)[0][1])
                for s in range(5)}  # fmt: skip
    assert len(held) > 1
    X = rng.normal(size=(60, 2, 3))
    with pytest.warns(UserWarning, match="holds out one fold of 3"):
        res = mp.probe_layers(X, y, split_groups=groups, test_size=0.3, progress=False)
    assert res.split == "holdout(test_size=0.333, by group)"
    with pytest.raises(ValueError, match="at most half"):
        mp.probe_layers(X, y, split_groups=groups, test_size=0.9, progress=False)


def test_an_expected_layer_off_the_layer_labels_says_its_scale(tmp_path, capsys) -> None:
    """resid_pre probes: the mix's expected layer counts resid_pre@l as l - 1, one below the
    labels its bars, repr and CLI line sit beside; each says so (review 34a F1). Block outputs
    (the default) print as before."""
    tiny = mp.tiny_model()
    data = mp.pos_dataset(max_sentences=40).drop_rare(5)
    pre = mp.probe_layers(mp.collect(tiny, data, "resid_pre", progress=False), scalar_mix=True,
                          groups=False, progress=False)  # fmt: skip
    assert pre.depths.tolist() == [-1, 0, 1] and pre.layers.tolist() == [0, 1, 2]
    assert pre.expected_layer == pytest.approx(float(pre.depths @ pre.mix_weights))
    note = "on block outputs: resid_pre@l counts l - 1"
    assert note in repr(pre) and note in pre.plot().axes[-1].get_title()
    post = mp.probe_layers(mp.collect(tiny, data, "resid_post", progress=False),
                           scalar_mix=True, groups=False, progress=False)  # fmt: skip
    assert "on block outputs" not in repr(post) and "expected layer" in repr(post)
    args = ["probe", "--dataset", "pos", "--model", "tiny", "--max-examples", "40", "--quiet"]
    assert cli_main([*args, "--site", "resid_pre", "--scalar-mix", "--out", str(tmp_path)]) == 0
    assert note in capsys.readouterr().out


def test_layers_are_the_models_layers_of_the_collected_sites(tmp_path) -> None:
    """collect(..., layers=[1, 2]) gives probes of layers 1 and 2 (they were numbered 0 and 1,
    and the scalar mix's expected layer was off by the first layer collected); head sites give
    their layer; groups=False skips the control task of an Activations with groups."""
    tiny = mp.tiny_model()
    data = mp.ProbingDataset(
        texts=[f"w{i % 7} x{i}" for i in range(80)], labels=[str(i % 2) for i in range(80)],
        groups=[f"w{i % 7}" for i in range(80)], name="toy",
    )  # fmt: skip
    acts = mp.collect(tiny, data, "resid_post", layers=[1, 2], progress=False)
    result = mp.probe_layers(acts, scalar_mix=True, progress=False)
    assert result.layers.tolist() == [1, 2]
    assert result.sites == ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
    assert result.best_layer in (1, 2)
    assert result.expected_layer == pytest.approx(float(np.dot([1, 2], result.mix_weights)))
    assert result.to_frame()["site"].tolist() == ["resid_post@1", "resid_post@2"]
    assert result.to_frame()["hook"].tolist() == list(result.sites)
    plain = mp.probe_layers(np.asarray(acts.values), acts.labels, scalar_mix=True, progress=False)
    np.testing.assert_array_equal(plain.accuracy, result.accuracy)
    assert plain.layers.tolist() == [0, 1] and plain.sites is None
    assert plain.expected_layer == pytest.approx(result.expected_layer - 1)
    mix = mp.ScalarMixProbe().fit(acts, acts.labels)  # Activations: the collected layers too
    assert mix.expected_layer_ == pytest.approx(float(np.dot([1, 2], mix.layer_weights_)))
    back = mp.ProbeResult.load(result.save(tmp_path / "r.json"))
    assert back.sites == result.sites and back.layers.tolist() == [1, 2]
    assert np.isfinite(result.control_accuracy).all()
    skipped = mp.probe_layers(acts, groups=False, progress=False)
    assert np.isnan(skipped.control_accuracy).all()
    np.testing.assert_array_equal(skipped.accuracy, result.accuracy)
    heads = mp.collect(tiny, data, "head_out", layers=[2], progress=False)
    by_head = mp.probe_layers(heads, groups=False, progress=False)
    assert by_head.layers.tolist() == [2] * int(tiny.cfg.n_heads)
    assert by_head.sites is not None and by_head.sites[1] == "head_out@2, head 1"
    assert by_head.plot().axes[0].get_xlabel() == "site, as collected"
    best = int(np.argmax(by_head.accuracy))
    assert by_head.entry_names()[best] == by_head.sites[best]
    assert f"{int(tiny.cfg.n_heads)} sites" in repr(by_head) and by_head.sites[best] in repr(
        by_head
    )
    assert by_head.summary()["best_site"][0] == by_head.sites[best]
    assert result.entry_names() == ["layer 1", "layer 2"]


def test_probe_frames_locate_each_entry_as_every_result_frame_does() -> None:
    """``site`` held hook names (``blocks.1.hook_resid_post``) beside head labels in one column,
    with no ``kind`` or ``head``, so a merge with another analysis's frame on the shared columns
    matched nothing (review 23a F1); the column set also depended on the input type."""
    tiny = mp.tiny_model()
    data = mp.ProbingDataset(
        texts=[f"w{i % 7} x{i}" for i in range(80)], labels=[str(i % 2) for i in range(80)],
        name="toy",
    )  # fmt: skip
    acts = mp.collect(tiny, data, ["head_out", "resid_post"], layers=[1], progress=False)
    result = mp.probe_layers(acts, progress=False)
    frame = result.to_frame()
    n_heads = int(tiny.cfg.n_heads)
    assert frame.columns.tolist()[:5] == ["site", "kind", "layer", "head", "hook"]
    heads = [f"head_out@1, head {h}" for h in range(n_heads)]
    assert frame["site"].tolist() == [*heads, "resid_post@1"]
    assert frame["kind"].tolist() == ["head_out"] * n_heads + ["resid_post"]
    assert frame["layer"].tolist() == [1] * (n_heads + 1)
    assert frame["head"].tolist()[:n_heads] == list(range(n_heads))
    assert pd.isna(frame["head"].iloc[-1])
    assert str(frame["layer"].dtype) == str(frame["head"].dtype) == "Int64"
    assert frame["hook"].iloc[-1] == "blocks.1.hook_resid_post"
    # Another analysis's rows at the same places, located by the shared helper, join on them.
    places = [mp.Site("resid_post", 1), mp.Site("head_out", 1, head=2)]
    other = pd.DataFrame(mp.core.site_columns(places)).assign(effect=[0.5, 0.25])
    joined = frame.merge(other, on=["site", "kind", "layer", "head", "hook"])
    assert joined["site"].tolist() == ["head_out@1, head 2", "resid_post@1"]
    assert joined["effect"].tolist() == [0.25, 0.5]
    best = int(np.argmax(result.accuracy))
    assert result.summary()["best_site"][0] == frame["site"][best]
    # A plain array names no site: the same columns, empty where it does not say.
    plain = mp.probe_layers(np.asarray(acts.values), acts.labels, progress=False)
    plain_frame = plain.to_frame()
    assert plain_frame.columns.tolist() == frame.columns.tolist()
    assert plain_frame["site"].isna().all() and plain_frame["head"].isna().all()
    assert plain_frame["layer"].tolist() == list(range(n_heads + 1))
    assert plain.summary()["best_site"].isna().all()
    # Cumulative scores say the layer as an integer too, and their accuracy as the probes do.
    scores = mp.cumulative_scores(np.asarray(acts.values)[:, -1:], acts.labels, progress=False)
    assert scores.to_frame().columns.tolist() == ["layer", "accuracy", "delta"]
    assert str(scores.to_frame()["layer"].dtype) == "Int64"


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_probe_result_round_trip_frame_and_plot(tmp_path, suffix: str) -> None:
    X, y = _planted(n=300, layers=3, signal=(1,))
    groups = np.arange(300) % 50
    for result in (
        mp.probe_layers(X, y, groups=groups, scalar_mix=True, progress=False),
        mp.probe_layers(X, y, progress=False),
    ):
        path = result.save(tmp_path / f"result{suffix}")
        loaded = mp.ProbeResult.load(path)
        pd.testing.assert_frame_equal(loaded.to_frame(), result.to_frame())
        pd.testing.assert_frame_equal(loaded.summary(), result.summary())
        assert isinstance(load_result(path), mp.ProbeResult)
        assert loaded.expected_layer == result.expected_layer
        assert loaded.split == result.split and loaded.n_classes == 3
        frame = result.to_frame()
        assert len(frame) == 3 and {"accuracy", "selectivity", "majority_baseline"} <= set(frame)
        assert result.summary()["best_layer"].tolist() == [1] == [result.best_layer]
        assert repr(result).startswith("ProbeResult(linear probes, 3 layers, 300 examples")
        fig = result.plot()
        assert isinstance(fig, Figure)
        assert len(fig.axes) == (2 if result.mix_weights is not None else 1)
        # what was probed, not the splitter's repr ("Layer-wise probing (holdout(test_size=0.2))")
        assert fig.axes[0].get_title().startswith("linear probes, 3 classes, 300 examples, ")
        low, high = fig.axes[0].get_ylim()
        assert high == 1.02 and low <= min(0.0, float(np.nanmin(result.selectivity)))
        # Selectivity is named only where a control task ran (its line is drawn); one panel's
        # legend sits below it (inside, it covered the layers at accuracy 1).
        controlled = bool(np.isfinite(result.control_accuracy).any())
        assert fig.axes[0].get_ylabel().endswith("/ selectivity") == controlled
        if result.mix_weights is None:
            fig.canvas.draw()
            below = fig.axes[0].get_legend().get_window_extent().y1
            assert below < fig.axes[0].get_window_extent().y0
        if result.mix_accuracy is not None:
            assert result.mix_accuracy in [line.get_ydata()[0] for line in fig.axes[0].lines]
        odd = dataclasses.replace(result, split="holdout(test_size=0.2, grouped)")
        assert odd.plot().axes[0].get_title().endswith(", holdout(test_size=0.2, grouped)")
        into = Figure()
        assert result.plot(ax=into.add_subplot()) is into and len(into.axes) == 1
        assert "<table" in result._repr_html_()


# --- scalar mix ---------------------------------------------------------------------------------


def test_scalar_mix_with_zero_weights_is_gamma_times_the_layer_mean() -> None:
    X = torch.randn(5, 7, 3)  # [layers, n, d]
    gamma = 2.5
    weights = torch.softmax(torch.zeros(1, 5), -1)
    np.testing.assert_allclose(gamma * _scalar_mix(X, weights)[0], gamma * X.mean(0), atol=1e-6)
    one_hot = torch.softmax(torch.tensor([[0.0, 0.0, 60.0, 0.0, 0.0]]), -1)
    np.testing.assert_allclose(_scalar_mix(X, one_hot)[0], X[2], atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2, 4])
def test_scalar_mix_probe_expected_layer_is_the_informative_layer(
    layer: int, every_solver_path
) -> None:
    X, y = _planted(n=600, layers=5, signal=(layer,))
    probe = mp.ScalarMixProbe().fit(X, y)
    assert probe.layer_weights_.sum() == pytest.approx(1.0)
    assert probe.layer_weights_[layer] > 0.95
    assert probe.expected_layer_ == pytest.approx(layer, abs=0.2)
    assert probe.score(X, y) > 0.95 and probe.predict_proba(X).shape == (600, 3)
    # only γW is identifiable: reported as a unit-norm W times γ = ||γW||
    assert np.linalg.norm(probe.coef_) == pytest.approx(1.0) and probe.gamma_ > 0


def test_scalar_mix_probe_averages_two_noisy_copies_of_the_signal(every_solver_path) -> None:
    # Layers 3 and 5 carry the same weak class signal with independent noise: averaging them
    # halves the noise variance, so the fitted mix splits its weight between the two.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 1500)
    X = rng.normal(size=(1500, 7, 16))
    signal = 0.5 * rng.normal(size=(3, 16))[y]
    X[:, 3] += signal
    X[:, 5] += signal
    probe = mp.ScalarMixProbe().fit(X, y)
    assert probe.layer_weights_[[3, 5]].sum() > 0.9
    assert min(probe.layer_weights_[3], probe.layer_weights_[5]) > 0.3
    assert probe.expected_layer_ == pytest.approx(4, abs=0.5)
    with pytest.raises(ValueError, match=r"\[n, 7, 16\]"):
        probe.predict(X[:, :3])


def test_scalar_mix_probe_takes_layers_side_by_side_in_two_dimensions() -> None:
    X, y = _planted(n=400, layers=4, d=6, k=2, signal=(2,))
    probe = mp.ScalarMixProbe().fit(X, y)
    flat = mp.ScalarMixProbe(n_layers=4).fit(X.reshape(len(X), -1), y)
    np.testing.assert_allclose(flat.layer_weights_, probe.layer_weights_, atol=1e-12)
    np.testing.assert_allclose(flat.decision_function(X), probe.decision_function(X), atol=1e-12)
    assert flat.n_features_in_ == probe.n_features_in_ == 24 and probe.n_layers_in_ == 4
    # Two classes: one score per row, the log-odds of classes_[1], as scikit-learn's classifiers.
    scores = probe.decision_function(X.reshape(len(X), -1))
    assert scores.shape == (400,)
    proba = probe.predict_proba(X)
    np.testing.assert_allclose(scores, np.log(proba[:, 1] / proba[:, 0]), atol=1e-9)
    with pytest.raises(ValueError, match="not a multiple of n_layers=5"):
        mp.ScalarMixProbe(n_layers=5).fit(X.reshape(len(X), -1), y)
    with pytest.raises(ValueError, match="4 layers but n_layers=3"):
        mp.ScalarMixProbe(n_layers=3).fit(X, y)


def test_cumulative_scores_keep_negative_deltas() -> None:
    # Layer 1 carries a feature that predicts y perfectly in training and is noise at test time:
    # adding it to the mix makes held-out accuracy drop, a negative Δ that must not be clipped.
    rng = np.random.default_rng(0)
    k, d = 3, 8
    directions = rng.normal(size=(k, d))

    def data(n: int, spurious: bool):
        y = rng.integers(0, k, n)
        X = rng.normal(size=(n, 4, d))
        X[:, 0] += 0.6 * directions[y]
        X[:, 1] += 4 * directions[y if spurious else rng.integers(0, k, n)]
        X[:, 3] += 3 * directions[y]
        return X, y

    X, y = data(600, spurious=True)
    X_test, y_test = data(600, spurious=False)
    result = mp.cumulative_scores(X, y, X_test=X_test, y_test=y_test, progress=False)
    assert result.deltas[1] < -0.05 and np.isnan(result.deltas[0])
    np.testing.assert_allclose(result.deltas[1:], np.diff(result.scores))
    manual = (np.arange(1, 4) * result.deltas[1:]).sum() / result.deltas[1:].sum()
    assert result.expected_layer == pytest.approx(manual)
    clipped = np.clip(result.deltas[1:], 0, None)  # what clipping would have reported
    assert abs((np.arange(1, 4) @ clipped) / clipped.sum() - result.expected_layer) > 0.5
    np.testing.assert_allclose(result.mix_weights.sum(1), 1.0, atol=1e-6)
    assert np.triu(result.mix_weights, 1).max() == 0  # prefix l only mixes layers 0..l


def test_cumulative_expected_layer_is_nan_when_the_gains_cancel() -> None:
    from mechprobe.probing._scalar_mix import _expected_layer

    # 3/7, 5/7, 1/7, 3/7: np.diff sums to 5.6e-17, and E_Δ was about 1.6e17 instead of NaN.
    scores, layers = np.array([3, 5, 1, 3]) / 7, np.arange(4)
    assert np.diff(scores).sum() != 0
    assert np.isnan(_expected_layer(scores, layers, n_test=7))
    gains = np.array([1, 3, 2, 5]) / 7
    manual = (layers[1:] @ np.diff(gains)) / np.diff(gains).sum()
    assert _expected_layer(gains, layers, n_test=7) == pytest.approx(manual)


def test_an_expected_layer_outside_the_layers_warns_that_the_deltas_cancel() -> None:
    from mechprobe.probing._scalar_mix import _expected_layer

    # Review 25a on SmolLM2 (layers 0, 4, 14, 27): deltas of +1, +1 and -1 held-out rows gave
    # "expected layer -9.00" with no word. The value stays as Tenney et
    # al.'s formula gives it (negative deltas unclipped); the warning says it names no layer.
    scores, layers = np.array([0.90, 0.91, 0.92, 0.91]), np.array([0, 4, 14, 27])
    with pytest.warns(UserWarning, match=r"expected layer -9\.00 lies outside the layers probed"):
        assert _expected_layer(scores, layers, n_test=100) == pytest.approx(-9.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inside the range: nothing to say
        _expected_layer(np.array([0.90, 0.91, 0.92, 0.93]), layers, n_test=100)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_an_expected_layer_outside_the_layers_is_drawn_and_told_as_undefined(
    tmp_path, suffix: str
) -> None:
    # Review 26a F6: E_Δ = 32.67 over layers 0..29 was drawn as a dashed line past the last
    # layer (the axis stretched to hold it) and printed as "expected layer 32.67"; the warning
    # at compute time left no trace in a loaded result. Built by hand: deltas +1, +1, -1 rows.
    scores, layers = np.array([0.90, 0.91, 0.92, 0.91]), np.array([0, 4, 14, 27])
    result = mp.CumulativeScores(
        scores, np.concatenate([[np.nan], np.diff(scores)]), -9.0, np.eye(4), 400, 100, layers
    )
    loaded = mp.CumulativeScores.load(result.save(tmp_path / f"cumulative{suffix}"))
    for each in (result, loaded):
        assert not each.expected_layer_defined
        assert "expected layer undefined (deltas cancel" in repr(each)
        assert "-9.00 lies outside layers 0..27" in repr(each)
        summary = each.summary()
        assert summary["expected_layer_defined"].tolist() == [False]
        assert summary["expected_layer"].iloc[0] == -9.0  # Tenney et al.'s value is kept
        fig = each.plot()
        ax = fig.axes[0]
        assert "E_Δ undefined (deltas cancel" in ax.get_title()
        assert "E_Δ = " not in ax.get_title()
        assert not ax.lines  # no line at -9: the bars' axes hold no vertical line
        assert ax.get_xlim()[0] > -9.0
        legend = [text.get_text() for text in ax.get_legend().get_texts()]
        assert legend == ["Δ(l)", "accuracy of the mix 0..l"]
    cancelled = mp.CumulativeScores(
        scores, np.concatenate([[np.nan], np.diff(scores)]), float("nan"), np.eye(4), 400, 100
    )
    assert not cancelled.expected_layer_defined
    assert "expected layer undefined (deltas cancel)" in repr(cancelled)
    assert cancelled.plot().axes[0].get_title().endswith("E_Δ undefined (deltas cancel)")
    inside = mp.CumulativeScores(scores, scores, 10.0, np.eye(4), 400, 100, layers)
    assert inside.expected_layer_defined and "expected layer 10.00" in repr(inside)
    assert inside.summary()["expected_layer_defined"].tolist() == [True]


def test_the_scalar_mix_figure_keeps_its_legend_off_the_curves() -> None:
    # Review 26a F7: with the mix panel below, the legend sat inside the accuracy panel (upper
    # right), on an MLP probe at accuracy 1.0 and on the scalar-mix line.
    import io

    X, y = _planted(n=300, layers=3, signal=(1, 2))
    result = mp.probe_layers(X, y, scalar_mix=True, progress=False)
    fig = result.plot()
    fig.savefig(io.BytesIO(), format="png")
    top, mix = fig.axes
    legend = top.get_legend().get_window_extent()
    assert legend.y1 < top.get_window_extent().y0  # below the accuracy panel
    assert legend.y0 > mix.title.get_window_extent().y1  # above the mix panel's title


def test_cumulative_scores_want_x_test_and_y_test_together() -> None:
    # X_test alone was answered "no labels: pass y" (y was passed); y_test alone was ignored.
    X, y = np.random.default_rng(0).normal(size=(60, 2, 3)), np.arange(60) % 2
    with pytest.raises(ValueError, match="X_test was given without y_test"):
        mp.cumulative_scores(X, y, X_test=X[:20], progress=False)
    with pytest.raises(ValueError, match="y_test was given without X_test"):
        mp.cumulative_scores(X, y, y_test=y[:20], progress=False)


def test_cumulative_scores_follow_depth_whatever_the_collection_order(tiny) -> None:
    # collect(layers=[2, 0, 1]) gave prefixes in collection order ("layers 0..l" were 2, 0, 1).
    texts = [f"{w} {v}" for w in ("cat", "dog", "sun", "map", "cup") for v in ("ran", "is", "sat")]
    labels = [t.split()[1] for t in texts] * 4
    texts = texts * 4
    shuffled = mp.collect(tiny, texts, layers=[2, 0, 1], labels=labels, progress=False)
    ordered = mp.collect(tiny, texts, layers=[0, 1, 2], labels=labels, progress=False)
    a = mp.cumulative_scores(shuffled, seed=1, progress=False)
    b = mp.cumulative_scores(ordered, seed=1, progress=False)
    assert a.layers.tolist() == b.layers.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.mix_weights, b.mix_weights)


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_cumulative_scores_round_trip_and_plot(tmp_path, suffix: str) -> None:
    X, y = _planted(n=300, layers=3, signal=(1,))
    result = mp.cumulative_scores(X, y, progress=False)
    loaded = mp.CumulativeScores.load(result.save(tmp_path / f"cumulative{suffix}"))
    pd.testing.assert_frame_equal(loaded.to_frame(), result.to_frame())
    pd.testing.assert_frame_equal(loaded.summary(), result.summary())
    assert np.isnan(loaded.deltas[0]) and loaded.expected_layer == result.expected_layer
    fig = result.plot()
    # one legend for both axes, the accuracy line in it, below the bars it used to cover
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"E_Δ = {result.expected_layer:.2f}", "Δ(l)", "accuracy of the mix 0..l"]
    assert f"{result.n_test} held-out rows" in fig.axes[0].get_title()
    into = Figure()
    assert result.plot(ax=into.add_subplot()) is into
    assert repr(result).startswith("CumulativeScores(3 layers, expected layer")
    assert 0.8 < result.expected_layer < 1.5


def test_mlp_probe_settings_are_checked_at_fit() -> None:
    # hidden_size=0 raised ZeroDivisionError from the initialisation; random_state=-1 ran.
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    for settings, message in (({"hidden_size": 0}, "hidden_size must be at least 1"),
                              ({"max_iter": 0}, "max_iter must be at least 1"),
                              ({"batch_size": 0}, "batch_size must be at least 1"),
                              ({"learning_rate": 0.0}, "learning_rate must be"),
                              ({"random_state": -1}, "random_state must be between 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            mp.MLPProbe(**settings).fit(X, y)


def test_mlp_probe_refuses_a_random_state_by_its_own_name():
    # MLPProbe(random_state=None) was refused with "seed must be an int", a word the estimator
    # does not take (review 24b F10).
    X, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
    with pytest.raises(TypeError, match="MLPProbe random_state must be an int: fits are"):
        mp.MLPProbe(random_state=None).fit(X, y)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MLPProbe random_state must be between 0 and"):
        mp.MLPProbe(random_state=-1).fit(X, y)


def test_x_given_layers_first_is_named_a_transposition():
    # probe_layers(X.transpose(1, 0, 2), y) said only "y has shape (1978,) but X has 4 rows"
    # (review 25a).
    X, y = np.random.default_rng(0).normal(size=(3, 40, 4)), np.arange(40) % 2
    with pytest.raises(ValueError, match=r"did you pass \[layers, rows, d\]\? Transpose it"):
        mp.probe_layers(X, y, progress=False)
    with pytest.raises(ValueError, match=r"one label per row of X\.$"):
        mp.probe_layers(X.transpose(1, 0, 2)[:30], y, progress=False)


def _activations(sites, rng):
    n = 80
    values = rng.normal(size=(n, len(sites), 6)).astype(np.float32)
    labels = (values[:, 0, 0] > 0).astype(int) + (values[:, 0, 1] > 0).astype(int)
    return mp.Activations(
        values=values, labels=labels, groups=None, text_index=np.arange(n),
        position=np.zeros(n, dtype=int), token=np.array(["x"] * n), sites=tuple(sites),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("sites", "named", "unnamed"),
    [
        (["blocks.2.hook_resid_post"], "layer 2", "layer 0"),
        (["head_out@2, head 0", "head_out@2, head 1"], "head_out@2, head 1", "layer 0"),
    ],
)
def test_a_convergence_warning_names_the_probed_entries(sites, named, unnamed):
    # Review 31a F1: probing layer 2 alone warned "layers [0]"; two heads of layer 2, "[0, 1]".
    X = _activations(sites, np.random.default_rng(0))
    with pytest.warns(ConvergenceWarning) as caught:
        mp.probe_layers(X, max_iter=1, groups=False, progress=False)
    message = next(str(w.message) for w in caught if w.category is ConvergenceWarning)
    assert named in message and unnamed not in message, message
