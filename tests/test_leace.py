"""LEACE: invariants on planted data, agreement with concept-erasure's LeaceEraser, streaming."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from concept_erasure import LeaceEraser
from sklearn.linear_model import LogisticRegression

import mechprobe as mp
from mechprobe.erasure import Eraser, LeaceFitter, leace


def _planted(n: int = 2000, d: int = 16, classes: int = 3, seed: int = 0):
    """Correlated Gaussian features whose class shifts the mean along a few planted directions."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    shifts = rng.normal(size=(classes, d)) * 1.5
    X = rng.normal(size=(n, d)) @ mix + shifts[y] + 3.0
    return X, y


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("shrinkage", [True, False])
def test_matches_concept_erasure(classes: int, shrinkage: bool) -> None:
    X, y = _planted(classes=classes, seed=classes)
    ours = leace(X, y, shrinkage=shrinkage)
    x_t = torch.from_numpy(X)
    # concept-erasure's convention: one 0/1 column for two classes, one-hot otherwise.
    z = torch.from_numpy(y).double()
    if classes > 2:
        z = torch.nn.functional.one_hot(torch.from_numpy(y), classes).double()
    ref = LeaceEraser.fit(x_t, z, shrinkage=shrinkage, constrain_cov_trace=False)
    torch.testing.assert_close(ours(x_t), ref(x_t), rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.P, ref.P, rtol=0, atol=1e-10)
    assert ours.n_removed == classes - 1


def test_invariants_on_planted_data() -> None:
    classes = 4
    X, y = _planted(classes=classes)
    p = leace(X, y)
    Xe = p.apply(X)

    # Idempotent, as a matrix and as a map.
    P = p.P.numpy()
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    np.testing.assert_allclose(p.apply(Xe), Xe, atol=1e-10)
    # Oblique, not orthogonal: the features are correlated, so P is not symmetric.
    assert np.abs(P - P.T).max() > 1e-2

    # Class means coincide and the overall mean stays where it was.
    overall = Xe.mean(0)
    np.testing.assert_allclose(overall, X.mean(0), atol=1e-10)
    for k in range(classes):
        np.testing.assert_allclose(Xe[y == k].mean(0), overall, atol=1e-9)

    # The edit has rank <= classes - 1, and `removed`/`readout` reproduce I - P exactly.
    assert np.linalg.matrix_rank(X - Xe, tol=1e-8) <= classes - 1
    assert p.n_removed == classes - 1
    np.testing.assert_allclose(p.removed @ p.removed.T, np.eye(p.n_removed), atol=1e-12)
    assert p.readout is not None
    np.testing.assert_allclose(
        (p.removed.T @ p.readout).numpy(), np.eye(X.shape[1]) - P, atol=1e-12
    )


def test_logistic_regression_learns_nothing_after() -> None:
    X, y = _planted(classes=2, seed=3)
    before = LogisticRegression(max_iter=1000).fit(X, y).coef_
    assert np.abs(before).max() > 0.1
    Xe = leace(X, y).apply(X)
    # With equal class means the optimum of the (convex) logistic loss is w = 0 exactly.
    after = LogisticRegression(max_iter=1000, tol=0.0).fit(Xe, y).coef_
    assert np.abs(after).max() < 1e-4  # lbfgs stopping precision, as concept-erasure tests


def test_torch_float32_and_devices_follow_input() -> None:
    X, y = _planted()
    x32 = torch.from_numpy(X).float()
    p = leace(x32, torch.from_numpy(y))
    out = p.apply(x32.reshape(4, -1, X.shape[1]))
    assert out.dtype == torch.float32 and out.shape == (4, X.shape[0] // 4, X.shape[1])
    np.testing.assert_allclose(
        out.reshape(-1, X.shape[1]).numpy(), p.apply(X.astype(np.float32)), atol=1e-5
    )


def test_string_labels_and_save_load(tmp_path) -> None:
    X, y = _planted(classes=3)
    names = np.array(["noun", "verb", "adj"])[y]
    p = leace(X, names)
    np.testing.assert_allclose(p.apply(X), leace(X, y).apply(X), atol=1e-12)
    path = tmp_path / "leace.safetensors"
    p.save(path)
    q = Eraser.load(path)
    assert q.method == "leace" and q.mean is not None and q.readout is not None
    assert torch.equal(q.P, p.P) and torch.equal(q.readout, p.readout)
    np.testing.assert_array_equal(q.apply(X), p.apply(X))


def test_bad_input() -> None:
    X, y = _planted()
    with pytest.raises(ValueError, match="rows but y has"):
        leace(X, y[:-1])
    with pytest.raises(ValueError, match="only one class"):
        leace(X, np.zeros(len(X), dtype=int))
    with pytest.raises(ValueError, match="svd_tol"):
        leace(X, y, svd_tol=0.0)


def test_streamed_statistics_equal_the_full_batch_ones() -> None:
    X, y = _planted(n=1500, classes=4, seed=5)
    whole = LeaceFitter(X.shape[1], 4).update(X, y)
    # Chunks of unequal sizes (one of a single row), numpy and torch mixed: Chan's update is exact.
    streamed = LeaceFitter(X.shape[1], 4)
    for rows in np.split(np.arange(len(X)), [1, 7, 400, 401, 1100]):
        chunk = torch.from_numpy(X[rows]) if rows[0] % 2 else X[rows]
        streamed.update(chunk, y[rows])
    assert streamed.n == whole.n == len(X)
    # Independent statistics: the mean and the centred scatter matrices, computed directly.
    z = np.eye(4)[y]
    xc, zc = X - X.mean(0), z - z.mean(0)
    for fitter in (whole, streamed):
        np.testing.assert_allclose(fitter.mean_x.numpy(), X.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(fitter.mean_z.numpy(), z.mean(0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(fitter.scatter_xx.numpy(), xc.T @ xc, rtol=1e-12, atol=1e-8)
        np.testing.assert_allclose(fitter.scatter_xz.numpy(), xc.T @ zc, rtol=1e-12, atol=1e-9)
    a, b = whole.eraser(), streamed.eraser()
    np.testing.assert_allclose(a.P.numpy(), b.P.numpy(), atol=1e-10)
    np.testing.assert_allclose(b(X), leace(X, y)(X), atol=1e-10)
    # Two classes use one 0/1 column, as leace() and concept-erasure do.
    binary = LeaceFitter(X.shape[1], 2).update(X, y % 2)
    assert binary.scatter_xz.shape == (X.shape[1], 1)
    np.testing.assert_allclose(binary.eraser()(X), leace(X, y % 2)(X), atol=1e-10)


def test_fitter_refuses_bad_batches() -> None:
    fitter = LeaceFitter(3, 3)
    with pytest.raises(ValueError, match=r"\[n, 3\]"):
        fitter.update(np.zeros((4, 2)), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=r"outside 0..2"):
        fitter.update(np.zeros((4, 3)), np.array([0, 1, 2, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        fitter.update(np.zeros((2, 3)), np.array([0.0, 1.0]))
    # Label strings, which leace(X, y) takes, met torch's list of numpy dtypes (review 28b F8).
    fix = r"map labels to indices first \(e\.g\. np\.unique"
    for labels in (["a", "b", "a"], np.array([True, False, True]), torch.tensor([0.0, 1.0, 0.0])):
        with pytest.raises(TypeError, match=rf"integer class indices 0..2, got .*: {fix}"):
            fitter.update(np.zeros((3, 3)), labels)
    with pytest.raises(ValueError, match="NaN"):
        fitter.update(np.full((2, 3), np.nan), np.array([0, 1]))
    with pytest.raises(ValueError, match="at least two rows"):
        fitter.eraser()
    with pytest.raises(ValueError, match="n_classes"):
        LeaceFitter(3, 1)
    # Rows of one class only: it returned an eraser that erases nothing, where leace() refuses.
    one = LeaceFitter(3, 2).update(np.random.default_rng(0).normal(size=(8, 3)), np.zeros(8, int))
    with pytest.raises(ValueError, match=r"at least two classes.*all of class 0"):
        one.eraser()
    assert one.update(np.ones((2, 3)), np.array([1, 1])).eraser().n_removed == 1


def test_a_direction_under_svd_tol_is_left_with_a_warning() -> None:
    # The reviewer's weak binary concept: its one singular value (~0.0087) is under the
    # default svd_tol = 0.01, so nothing was erased and the mean gap stayed (t ~ 8), silently.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200_000)
    X = rng.normal(size=(200_000, 8))
    X[:, 0] += 0.035 * y
    with pytest.warns(UserWarning, match=r"left 1 direction.*svd_tol=0.01.*smaller svd_tol"):
        kept = leace(X, y)
    gap = X[y == 1].mean(0) - X[y == 0].mean(0)
    assert kept.n_removed == 0 and np.allclose(kept(X), X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # below svd_tol = 1e-6 nothing is dropped: no warning
        erased = leace(X, y, svd_tol=1e-6)
        leace(X[:2000], y[:2000])  # at 2,000 rows its singular value is over svd_tol
        leace(X, (X[:, 1] > 0).astype(int))  # a plain concept is erased: no warning
    after = erased(X)
    assert erased.n_removed == 1 and abs(gap[0]) > 0.03
    np.testing.assert_allclose(after[y == 1].mean(0), after[y == 0].mean(0), atol=1e-10)


def test_an_erasers_frame_is_never_empty():
    # mp.leace(X, y).to_frame() was an empty frame (review 25a): erasers' frames concatenated
    # into a table that left LEACE and the controls out.
    import pandas as pd

    X = np.random.default_rng(0).normal(size=(60, 5))
    y = np.arange(60) % 3
    frames = [mp.leace(X, y).to_frame(), mp.random_projection(5, 2).to_frame()]
    table = pd.concat(frames, ignore_index=True)
    assert table["method"].tolist() == ["leace", "random"]
    assert table["n_removed"].tolist() == [2, 2] and table["iteration"].isna().all()
