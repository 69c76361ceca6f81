"""LEACE's options (review 33a G7): method="orth", affine=False, constrain_cov_trace=True.

Every combination is checked against concept-erasure's ``LeaceFitter`` on planted float64 data,
streamed against one batch, for its guarantee (equal class means) and through save/load. The trace
constraint cannot trigger on fitted statistics (see test_the_trace_never_rises_...): its blend is
exercised with a covariance other than the whitening one, and checked against its definition.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pytest
import torch
from concept_erasure import LeaceFitter as ReferenceFitter

import mechprobe as mp
from mechprobe.erasure import Eraser, LeaceFitter, _leace, leace
from mechprobe.erasure._amnesic import control_projections

# Float64 throughout: both implementations whiten a d = 16 covariance of condition number ~1e2
# (~1e3 unshrunk), losing about cond * d * eps ~ 1e-12 relative; observed differences are ~2e-14.
# 1e-10 of the data's scale leaves two orders of margin and still catches any real difference,
# which is O(1) (a wrong direction, a missing mean).
RTOL = 1e-10
OPTIONS = list(itertools.product(("leace", "orth"), (True, False), (True, False)))
ID = [f"{m}-{'affine' if a else 'linear'}-{'trace' if c else 'free'}" for m, a, c in OPTIONS]


def _planted(n: int = 2000, d: int = 16, classes: int = 3, seed: int = 0, spread: float = 0.0):
    """Correlated Gaussian features (eigenvalues over ``2 * spread`` decades) whose class shifts
    the mean along a few planted directions, away from the origin."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    mix = (rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)) * np.logspace(spread, -spread, d)
    shifts = rng.normal(size=(classes, d)) * 1.5
    X = rng.normal(size=(n, d)) @ mix + shifts[y] + 3.0
    return X, y


def _z(y: np.ndarray, classes: int) -> torch.Tensor:
    """concept-erasure's labels: one 0/1 column for two classes, one-hot otherwise."""
    codes = torch.from_numpy(y)
    if classes == 2:
        return codes.double()
    return torch.nn.functional.one_hot(codes, classes).double()


def _close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, scale: float) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=RTOL * scale)


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize(("method", "affine", "constrain"), OPTIONS, ids=ID)
def test_every_option_matches_concept_erasure(
    method: str, affine: bool, constrain: bool, classes: int
) -> None:
    X, y = _planted(classes=classes, seed=classes)
    x = torch.from_numpy(X)
    ours = leace(X, y, method=method, affine=affine, constrain_cov_trace=constrain)  # type: ignore[arg-type]
    options: dict[str, Any] = {"method": method, "affine": affine, "constrain_cov_trace": constrain}
    ref = ReferenceFitter.fit(x, _z(y, classes), **options).eraser
    scale = float(x.abs().max())
    _close(ours(x), ref(x), scale)
    _close(ours.P, ref.P, 1.0)
    # What was fitted is on record: the kind of map, and a centre only when affine.
    assert ours.method == ("leace" if method == "leace" else "leace-orth")
    assert (ours.mean is not None) == affine and (ref.bias is not None) == affine
    assert (ours.readout is None) == (method == "orth")
    assert ours.is_orthogonal == (method == "orth" and not affine)
    assert ours.n_removed == classes - 1
    # The constraint did not trigger (it cannot; see below): theirs equals their unconstrained.
    free = ReferenceFitter.fit(x, _z(y, classes), **(options | {"constrain_cov_trace": False}))
    _close(ref(x), free.eraser(x), scale)


@pytest.mark.parametrize("shrinkage", [True, False])
@pytest.mark.parametrize("spread", [0.0, 3.0])
def test_the_trace_never_rises_with_the_covariance_that_whitened(
    shrinkage: bool, spread: float
) -> None:
    # tr(P S Pᵀ) = tr S - |S^{1/2} U|_F², with P = I - W^+ U Uᵀ W and W = S^{-1/2}: LEACE never
    # raises the trace of the covariance it whitened with, so constrain_cov_trace cannot trigger
    # on fitted statistics (even with eigenvalues over 12 decades), only by rounding.
    X, y = _planted(classes=4, seed=7, spread=spread)
    fitter = LeaceFitter(X.shape[1], 4, shrinkage=shrinkage).update(X, y)
    assert fitter.scatter_xx is not None
    left, right, u, sigma = fitter._oblique(fitter.scatter_xx, fitter.scatter_xz / (fitter.n - 1))
    p = torch.eye(X.shape[1], dtype=torch.float64) - left @ right
    evals, evecs = torch.linalg.eigh(sigma)
    root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    old, new = float(torch.trace(sigma)), float(torch.trace(p @ sigma @ p.T))
    assert new == pytest.approx(old - float((root @ u).square().sum()), rel=1e-9)
    assert new < old
    constrained = leace(X, y, shrinkage=shrinkage, constrain_cov_trace=True)
    assert constrained.method == "leace"
    np.testing.assert_array_equal(constrained(X), leace(X, y, shrinkage=shrinkage)(X))


def _skewed_blend(X: np.ndarray, y: np.ndarray, classes: int):
    """The blend of a LEACE fit where the trace is checked against the identity covariance
    instead of the whitening one: correlated features make P oblique enough to raise it."""
    fitter = LeaceFitter(X.shape[1], classes).update(X, y)
    assert fitter.scatter_xx is not None
    left, right, u, _ = fitter._oblique(fitter.scatter_xx, fitter.scatter_xz / (fitter.n - 1))
    return left, right, u, torch.eye(X.shape[1], dtype=torch.float64)


def test_the_trace_constraint_blends_where_it_triggers() -> None:
    X, y = _planted(classes=3)
    d = X.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    left, right, u, sigma = _skewed_blend(X, y, 3)
    p = eye - left @ right
    assert float(torch.trace(p @ sigma @ p.T)) > float(torch.trace(sigma)) + 1  # it triggers
    blend = _leace._constrain_trace(left, right, u, sigma)
    assert blend is not None
    removed, readout, alpha = blend
    assert 0 < alpha < 1
    np.testing.assert_allclose(removed @ removed.T, np.eye(len(removed)), atol=1e-12)
    p_blend = eye - removed.T @ readout
    # Its definition, from independent pieces: P is concept-erasure's LEACE matrix, Q the
    # orthogonal projection off W S_xz's range (W from concept-erasure's covariance, by numpy).
    ref = ReferenceFitter.fit(torch.from_numpy(X), _z(y, 3), constrain_cov_trace=False)
    evals, evecs = np.linalg.eigh(ref.sigma_xx.numpy())
    whitened = (evecs / np.sqrt(evals)) @ evecs.T @ ref.sigma_xz.numpy()
    vecs, singular, _ = np.linalg.svd(whitened, full_matrices=False)
    kept = vecs[:, singular > 0.01]
    q = np.eye(d) - kept @ kept.T
    expected = alpha * ref.eraser.P.numpy() + (1 - alpha) * q
    np.testing.assert_allclose(p_blend.numpy(), expected, rtol=0, atol=1e-10)
    # ... and its purpose: the erased covariance has the original trace, no more.
    assert float(torch.trace(p_blend @ sigma @ p_blend.T)) == pytest.approx(d, rel=1e-12)
    # concept-erasure 0.2.4 computes the same alpha and blend but factors I - blend as
    # (u * s.sqrt()) @ (vh * s.sqrt()), scaling vh's columns instead of its rows: its eraser is
    # not the blend (nor determined: it depends on the SVD's null-space basis). Not compared.


def test_a_triggered_constraint_is_recorded_as_a_blend(monkeypatch, tmp_path) -> None:
    # The fitter's own path through the blend (only reachable by rounding otherwise): hand the
    # trace check the identity covariance, as above.
    X, y = _planted(classes=3)
    real = _leace._constrain_trace
    monkeypatch.setattr(
        _leace,
        "_constrain_trace",
        lambda left, right, u, sigma: real(left, right, u, torch.eye(len(sigma)).double()),
    )
    eraser = leace(X, y, constrain_cov_trace=True)
    assert eraser.method == "leace-blend" and eraser.mean is not None
    assert eraser.readout is not None
    expected = real(*_skewed_blend(X, y, 3))
    assert expected is not None
    torch.testing.assert_close(eraser.removed.T @ eraser.readout, expected[0].T @ expected[1])
    # Rank 2 (classes - 1) = 4: the blend edits both LEACE's and the orthogonal directions.
    assert eraser.n_removed == 4
    P = eraser.P
    assert float((P @ P - P).abs().max()) > 1e-3  # no longer a projection
    Xe = eraser(X)
    gaps = [np.abs(Xe[y == k].mean(0) - Xe.mean(0)).max() for k in range(3)]
    assert max(gaps) > 1e-3  # nor an exact erasure: the price of the constraint
    assert "leace-blend" in repr(eraser) and "oblique affine" in repr(eraser)
    eraser.save(tmp_path / "blend.safetensors")
    back = Eraser.load(tmp_path / "blend.safetensors")
    assert back.method == "leace-blend"
    np.testing.assert_array_equal(back(X), eraser(X))
    # Not triggered, or not asked for: plain LEACE.
    assert leace(X, y).method == "leace"
    assert leace(X, y, method="orth", constrain_cov_trace=True).method == "leace-orth"


@pytest.mark.parametrize(("method", "affine", "constrain"), OPTIONS, ids=ID)
def test_streaming_equals_one_batch(method: str, affine: bool, constrain: bool) -> None:
    X, y = _planted(n=1500, classes=4, seed=5)
    options: dict[str, Any] = {"method": method, "affine": affine, "constrain_cov_trace": constrain}
    streamed = LeaceFitter(X.shape[1], 4, **options)
    for rows in np.split(np.arange(len(X)), [1, 7, 400, 401, 1100]):
        chunk = torch.from_numpy(X[rows]) if rows[0] % 2 else X[rows]
        streamed.update(chunk, y[rows])
    assert (streamed.scatter_xx is None) == (method == "orth")  # orth needs no covariance of x
    whole = leace(X, y, **options)
    erased = streamed.eraser()
    assert (erased.method, erased.n_removed) == (whole.method, whole.n_removed)
    assert (erased.mean is None) == (whole.mean is None) == (not affine)
    _close(erased(X), whole(X), float(np.abs(X).max()))
    _close(erased.P, whole.P, 1.0)


@pytest.mark.parametrize(
    ("method", "affine"), list(itertools.product(("leace", "orth"), (True, False)))
)
def test_the_class_means_coincide_after_erasure(method: str, affine: bool) -> None:
    # LEACE's guarantee: equal class means, so no linear classifier beats a constant. The
    # orthogonal projection off S_xz's range equalises them too, and so does the linear x' = P x
    # (P (mean_k - mean) = 0 for every class k): there the common mean is P mean, not mean.
    X, y = _planted(classes=4, seed=2)
    eraser = leace(X, y, method=method, affine=affine, shrinkage=False)  # type: ignore[arg-type]
    Xe = eraser(X)
    centre = X.mean(0) if affine else eraser(X.mean(0))
    scale = float(np.abs(X).max())
    for k in range(4):
        _close(Xe[y == k].mean(0), centre, scale)
    _close(Xe.mean(0), centre, scale)
    if not affine:
        assert np.abs(centre - X.mean(0)).max() > 0.1  # the linear map moves the mean


def test_leace_moves_the_data_less_than_the_orthogonal_projection() -> None:
    # Both satisfy the same constraint (Cov(x', z) = 0); LEACE is the least-squares one.
    X, y = _planted(classes=4, seed=3)
    moved = {
        m: float(((leace(X, y, method=m, shrinkage=False)(X) - X) ** 2).sum(1).mean())
        for m in ("leace", "orth")
    }
    assert moved["leace"] < moved["orth"]


@pytest.mark.parametrize(
    ("method", "affine"), list(itertools.product(("leace", "orth"), (True, False)))
)
def test_each_kind_of_eraser_survives_save_and_load(method: str, affine: bool, tmp_path) -> None:
    X, y = _planted(classes=3)
    eraser = leace(X, y, method=method, affine=affine)  # type: ignore[arg-type]
    path = eraser.save(tmp_path / "eraser.safetensors")
    back = Eraser.load(path)
    assert back.method == eraser.method
    for name in ("removed", "readout", "mean"):
        mine, theirs = getattr(eraser, name), getattr(back, name)
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine, theirs)
    np.testing.assert_array_equal(back(X), eraser(X))
    shape = "orthogonal" if method == "orth" else "oblique"
    if eraser.is_orthogonal:
        assert "orthogonal" not in repr(eraser) and "affine" not in repr(eraser)
    else:
        assert f"{shape} {'affine' if affine else 'linear'}" in repr(eraser)
    assert bool(eraser.summary()["affine"][0]) == affine


def test_bad_options_name_the_fix() -> None:
    X, y = _planted()
    choices = r"method must be one of \['leace', 'orth'\], got 'x'"
    with pytest.raises(ValueError, match=choices):
        leace(X, y, method="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=choices):
        LeaceFitter(3, 2, method="x")  # type: ignore[arg-type]
    # Truthy strings and ints would choose an option by accident: True or False only.
    bad_options: tuple[tuple[str, Any], ...] = (
        ("affine", "yes"),
        ("constrain_cov_trace", 1),
        ("shrinkage", "no"),
    )
    for name, bad in bad_options:
        with pytest.raises(TypeError, match=rf"{name} must be True or False, got {bad!r}"):
            leace(X, y, **{name: bad})
        with pytest.raises(TypeError, match=rf"{name} must be True or False"):
            LeaceFitter(3, 2, **{name: bad})
    # numpy's bools are bools.
    assert leace(X, y, affine=np.bool_(False)).mean is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method must be one of \[.*'leace-orth'"):
        Eraser(removed=torch.zeros(0, 3), method="orth")


def test_a_linear_leace_erasers_controls_are_linear() -> None:
    # Random controls keep an affine eraser's mean (review 33a D11/G6); a LEACE eraser fitted
    # with affine=False has none, so its controls project through zero, as INLP's do.
    X, y = _planted(classes=3)
    linear = leace(X, y, affine=False)
    conditions = control_projections(linear, n_random=2, seed=4)
    x = torch.from_numpy(X[:7])
    for c in conditions[1:]:
        assert c.eraser is not None and c.eraser.mean is None and c.eraser.is_orthogonal
        q = c.eraser.removed
        torch.testing.assert_close(c.eraser(x), x - (x @ q.T) @ q)
    affine = control_projections(leace(X, y), n_random=1, seed=4)
    assert all(c.eraser is not None and c.eraser.mean is not None for c in affine)
    # The orthogonal variant's controls follow the same rule.
    orth = control_projections(leace(X, y, method="orth"), n_random=1, seed=4)
    assert all(c.eraser is not None and c.eraser.mean is not None for c in orth)
    assert repr(LeaceFitter(4, 3, method="orth", affine=False)) == (
        "LeaceFitter(dim=4, n_classes=3, method='orth', affine=False, n=0)"
    )
    assert mp.leace is leace


def test_fit_erasure_names_the_orthogonal_leace() -> None:
    """fit_erasure's own method= named the eraser: leace's method="orth" clashed with it
    ("multiple values for 'method'"); "leace-orth" asks for it, in layer sweeps too."""
    X, y = _planted(classes=3, seed=5)
    Xt = torch.from_numpy(X)
    via_sweep = mp.fit_erasure(Xt, y, "leace-orth")
    direct = leace(Xt, y, method="orth")
    assert via_sweep.method == "leace-orth"
    _close(via_sweep(Xt), direct(Xt), float(np.abs(X).max()))
    with pytest.raises(ValueError, match="'inlp', 'leace' or 'leace-orth'"):
        mp.fit_erasure(Xt, y, "orth")  # type: ignore[arg-type]
