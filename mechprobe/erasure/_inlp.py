"""INLP: iterative nullspace projection (Ravfogel et al. 2020), with Elazar et al.'s stopping rule.

Each iteration trains a fresh linear classifier to predict the concept from the data projected so
far, and adds its weight rows to the set of removed directions. The projection is always rebuilt
from an orthonormal basis ``B`` of the span of *all* rows so far, ``P = I - B^T B``, and the
classifiers see the *original* data projected with it, as in the reference implementation
(Ben-Israel's intersection-of-nullspaces formula), not data pushed through a product of
per-iteration projections, which drifts numerically. (``X P`` is accumulated as ``X`` minus the
original data's components along each new block of orthonormal rows: the same sum, without
recomputing the components along the old rows.) The number of directions removed is the numerical
rank of that span, not iterations x classes.

The default classifier is L2 multinomial logistic regression fitted in torch by a preconditioned
L-BFGS (``_logistic.py``); ``benchmarks/bench_nullspace.py`` times it against the reference's
scikit-learn loops. Any scikit-learn linear classifier (anything with ``fit`` and ``coef_``, e.g.
``LinearSVC`` as in the INLP paper) can be plugged in instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import clone
from sklearn.model_selection import train_test_split
from torch import Tensor

from mechprobe._fit import fit_logistic, softmax_penalty
from mechprobe.core import check_float, check_seed, progress_bar, warn
from mechprobe.erasure._eraser import Eraser, _orthogonal, check_xy, orthonormal_basis

__all__ = ["inlp"]

#: Elazar et al.: the best projection is the first whose probe is within this of the target.
_MAJORITY_TOL = 0.01
#: Penalty of the default probe on its mean loss (scikit-learn's ``C = 1 / (0.001 n)``).
_L2 = 1e-3
#: Stopping tolerance of the default probe (largest gradient entry), scikit-learn's lbfgs's. A
#: tighter one does not make INLP's discrete outcomes the same on every kernel path: late
#: iterations' probes are near chance, where some held-out row is close to a tie between
#: classes, and the paths' rounding decides it (SmolLM2's countries at layer 20: one row apart
#: at 1e-4, 1e-6 and 1e-8 alike, so the majority rule stops one iteration apart; review 43a).
_TOL = 1e-4
#: Rows whose part outside the current basis is below this fraction of their norm add nothing.
_RANK_RTOL = 1e-5


@dataclass(frozen=True)
class _Step:
    """One trained classifier: its directions in the original space and held-out accuracy."""

    rows: Float[Tensor, "r d"]
    accuracy: float


def inlp(
    X: Any,
    y: Any,
    n_iterations: int = 20,
    *,
    classifier: Any = "logistic",
    min_accuracy: float | None = None,
    by_class: bool = False,
    main_labels: Any = None,
    stop: Literal["fixed", "majority"] = "fixed",
    test_size: float = 0.2,
    tol: float = _TOL,
    seed: int = 0,
    progress: bool = True,
) -> Eraser:
    """Iterative nullspace projection: remove the directions linear probes use to predict ``y``.

    ``X`` is split once (stratified ``train_test_split(test_size=test_size, random_state=seed)``);
    classifiers train on the training part and every accuracy is measured on the held-out part.

    Args:
        X: Representations ``[n, d]``, numpy or torch (any device; float64 inputs stay float64,
            others are fitted in float32).
        y: Concept labels ``[n]`` (any values; at least two distinct).
        n_iterations: Maximum number of classifiers whose directions are removed.
        classifier: ``"logistic"`` (default): multinomial logistic regression in torch (L2
            penalty ``1e-3`` on the mean loss, i.e. scikit-learn's ``C = 1 / (0.001 n)``; fitted
            to ``tol``), fitted on features divided by the *original*
            training data's per-feature standard deviation ``s`` (fixed across iterations;
            centring is absorbed by the unpenalised bias). Its weights ``w`` are mapped back to the input space as ``w / s``
            before removal, and the class-mean of the weight rows (which no softmax can use) is
            dropped, so a ``C``-class probe removes ``C - 1`` directions. Or any
            scikit-learn linear classifier *instance* (``LinearSVC(...)``, ``SGDClassifier(...)``,
            ``LogisticRegression(...)``): it is cloned every iteration, trained on the raw
            projected data, and the span of its ``coef_`` rows is removed, as in the reference,
            up to numerical rank (singular values below ``1e-5`` of the largest are dropped):
            where the rows are nearly dependent, as a multinomial ``LogisticRegression``'s, whose
            rows sum to about zero, this removes one direction fewer per iteration than the
            reference's ``scipy.linalg.orth``, which keeps the near-null one.
        min_accuracy: With ``stop="fixed"``, stop as soon as an iteration's classifier scores
            below this on held-out data; its directions are *not* removed (the reference skips
            such classifiers, and with a deterministic classifier retraining gives the same one).
            With ``stop="majority"`` it replaces the majority baseline as the target.
        by_class: Train each iteration's classifier on the examples of one main-task label only,
            drawn at random (seeded) among those with at least two concept labels, as in the
            reference. Accuracies are still those of a probe trained on all training examples.
        main_labels: Main-task labels ``[n]``; required with ``by_class=True``.
        stop: ``"fixed"`` runs ``n_iterations``, fewer where a probe removes no direction
            (without ``by_class`` every later iteration would repeat it). The default probe
            removes none once its gradient at zero weights, the (scaled) class-mean differences,
            is under ``tol``: where the classes' means agree that closely it
            stops, where a scikit-learn classifier would still return small weights. ``"majority"``
            (Elazar et al. 2021, amnesic probing) stops at the first iteration whose probe
            scores within 0.01 of the majority baseline (or ``min_accuracy``); as in their code, that iteration's
            directions are removed too; a run that reaches ``n_iterations`` first warns. Their
            released loop (yanaiela/amnesic_probing) trains
            ``SGDClassifier(loss="log_loss", early_stopping=True, warm_start=True,
            max_iter=10000, random_state=0)`` on the raw features (one-vs-rest: one direction
            per class and iteration, where the default probe removes one fewer): pass that as
            ``classifier=`` with ``stop="majority"`` to follow it.
        test_size: Held-out fraction.
        tol: Stopping tolerance of the default probe: its largest gradient entry (``1e-4``,
            scikit-learn's lbfgs's). Not used by a scikit-learn ``classifier`` (set its own).
            Each probe is the optimum's to within ``tol`` on every CPU, but late iterations'
            probes are near chance, where a held-out row can sit at a tie between classes:
            there the CPU's kernel path (or a smaller ``tol``) can move an accuracy by one row,
            and the majority rule's stop, hence the rank, by one iteration.
        seed: Seed for the split and for ``by_class`` draws.
        progress: Show a progress bar (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        An :class:`Eraser` with ``method="inlp"``: ``accuracies[0]`` is the probe before erasure and
        ``accuracies[i]`` after ``i`` iterations (``ranks[i]`` directions removed); the last
        entry is the probe on the returned projection.

    Example:
        >>> import torch
        >>> X = torch.randn(1000, 10, generator=torch.Generator().manual_seed(0))
        >>> y = (X[:, 0] + X[:, 1] > 0).long()
        >>> eraser = inlp(X, y, 5, stop="majority", progress=False)
        >>> eraser.accuracies[0] > 0.95, abs(eraser.accuracies[-1] - eraser.majority_baseline) < 0.05
        (True, True)
    """
    seed = check_seed(seed)
    tol = check_float(tol, "tol", 0.0, low_open=True)
    X_t, codes, _ = check_xy(X, y, "inlp")
    _check_options(n_iterations, stop, test_size, by_class, main_labels, len(codes))
    if X_t.dtype != torch.float64:
        X_t = X_t.float()
    d = X_t.shape[1]

    train_idx, test_idx = _split(codes, test_size, seed)
    device = X_t.device
    x_train, x_test = _take(X_t, train_idx), _take(X_t, test_idx)
    y_train, y_test = codes[train_idx], codes[test_idx]
    fit, scale = _make_fitter(classifier, x_train, tol)
    majority = float(np.bincount(y_test).max() / len(y_test))
    target = majority if min_accuracy is None or stop == "fixed" else float(min_accuracy)
    draw = _class_drawer(main_labels, train_idx, test_idx, y_train, seed) if by_class else None

    basis = torch.zeros(0, d, dtype=torch.float64)
    accuracies: list[float] = []
    ranks: list[int] = []
    done = capped = False
    # The classifiers see (x P) / scale. x P = x - sum over basis blocks N of (x N^T) N, each
    # block computed from the ORIGINAL x; the rows are orthonormal to machine precision, so
    # subtracting only the new block each iteration is the full re-projection x (I - B^T B)
    # summed in another order, at O(n d r) per iteration instead of O(n d k).
    xp_train, xp_test = x_train / scale, x_test / scale
    # The logistic probes' first preconditioner is the features' covariance. Each projection
    # maps the features linearly, f <- f M, so the covariance follows as Mᵀ C M: d³ work per
    # iteration instead of a Gram over the rows (n d²), the larger part of a small fit.
    covariance = _covariance(xp_train) if isinstance(classifier, str) else None
    for it in progress_bar(range(n_iterations + 1), progress=progress, desc="INLP"):
        probe = fit(xp_train, y_train, xp_test, y_test, covariance=covariance)
        accuracies.append(probe.accuracy)
        ranks.append(int(basis.shape[0]))
        capped = it == n_iterations and not done
        if it == n_iterations or done:
            break
        step = probe
        if draw is not None:
            tr, te = draw()
            step = fit(_take(xp_train, tr), y_train[tr], _take(xp_test, te), y_test[te])
        if stop == "fixed" and min_accuracy is not None and step.accuracy < min_accuracy:
            break
        k = basis.shape[0]
        basis = orthonormal_basis(step.rows, basis, rtol=_RANK_RTOL)
        new = basis[k:].to(device=device, dtype=X_t.dtype)
        if len(new) == 0 and draw is None:
            # Nothing removed, so every later iteration would fit the same probe on the same
            # data. (A logistic probe stays at zero weights where the class means agree to within
            # its tolerance: its gradient at zero is their difference, and the loss is convex.)
            break
        # In place (one pass over the features): memory traffic, not flops, bounds this step.
        xp_train.addmm_(x_train @ new.T, new / scale, alpha=-1)
        xp_test.addmm_(x_test @ new.T, new / scale, alpha=-1)
        if covariance is not None:
            covariance = _projected_covariance(covariance, new, scale)
        done = stop == "majority" and probe.accuracy - target <= _MAJORITY_TOL
    if stop == "majority" and capped:
        # At the cap the rule has not stopped the run: a probe still above the target, or one
        # that just met it, whose directions the rule would remove too (review 43d F3).
        warn(
            f"INLP reached n_iterations={n_iterations} ({ranks[-1]} directions removed) before "
            f"its stopping rule ended the run (last held-out probe {accuracies[-1]:.3f}, target "
            f"{target:.3f} within {_MAJORITY_TOL}): the rank is the cap's, not the rule's; pass "
            "a larger n_iterations.",
            UserWarning,
        )
    return _orthogonal(
        basis,
        "inlp",
        accuracies=tuple(accuracies),
        ranks=tuple(ranks),
        majority_baseline=majority,
    )


def _take(x: Tensor, idx: np.ndarray) -> Tensor:
    return x[torch.as_tensor(idx, device=x.device)]


def _check_options(
    n_iterations: int, stop: str, test_size: float, by_class: bool, main_labels: Any, n: int
) -> None:
    if isinstance(n_iterations, bool) or not isinstance(n_iterations, int) or n_iterations < 1:
        raise ValueError(f"n_iterations must be a positive int, got {n_iterations!r}.")
    if stop not in ("fixed", "majority"):
        raise ValueError(f"stop must be 'fixed' or 'majority', got {stop!r}.")
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be a fraction in (0, 1), got {test_size!r}.")
    if by_class and main_labels is None:
        raise ValueError("by_class=True needs main_labels=<main-task label per example>.")
    if main_labels is not None and len(main_labels) != n:
        raise ValueError(
            f"main_labels has {len(main_labels)} entries but X has {n} rows; they must match."
        )


def _split(codes: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified when every class can be split, plain otherwise."""
    idx = np.arange(len(codes))
    try:
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=codes)
    except ValueError:  # a class with a single example, or fewer test slots than classes
        tr, te = train_test_split(idx, test_size=test_size, random_state=seed)
    if len(np.unique(codes[tr])) < 2 or len(te) == 0:
        raise ValueError(
            "inlp: the training split has a single class; pass more examples of each class "
            "or a smaller test_size."
        )
    return np.sort(tr), np.sort(te)


def _class_drawer(
    main_labels: Any, train_idx: np.ndarray, test_idx: np.ndarray, y_train: np.ndarray, seed: int
) -> Any:
    """Returns a function drawing (train, test) index arrays of one main-task label."""
    main = np.asarray(
        main_labels.detach().cpu() if isinstance(main_labels, Tensor) else main_labels
    )
    main_train, main_test = main[train_idx], main[test_idx]
    usable = [
        m
        for m in np.unique(main_train)
        if len(np.unique(y_train[main_train == m])) >= 2 and (main_test == m).any()
    ]
    if not usable:
        raise ValueError(
            "by_class: no main-task label has two concept classes in the training split and "
            "held-out examples; use by_class=False or more data."
        )
    rng = np.random.default_rng(seed)

    def draw() -> tuple[np.ndarray, np.ndarray]:
        label = usable[int(rng.integers(len(usable)))]
        return np.flatnonzero(main_train == label), np.flatnonzero(main_test == label)

    return draw


def _make_fitter(classifier: Any, x_train: Tensor, tol: float) -> tuple[Any, Tensor]:
    """``(fit, scale)``: ``fit(f_train, y_train, f_test, y_test) -> _Step`` on features divided
    by ``scale [d]``, returning directions in the input space."""
    if isinstance(classifier, str):
        if classifier != "logistic":
            raise ValueError(
                f"classifier must be 'logistic' or a scikit-learn linear classifier instance, "
                f"got {classifier!r}."
            )
        # Scale from the *original* data, fixed for all iterations: rescaling by the projected
        # data's spread would blow up the rounding residue along removed directions.
        scale = _feature_scale(x_train)
        return functools.partial(_fit_logistic, scale=scale, tol=tol), scale
    if not hasattr(classifier, "fit"):
        raise TypeError(
            f"classifier must be 'logistic' or an object with fit() and coef_ (e.g. "
            f"sklearn.svm.LinearSVC()), got {type(classifier).__name__}."
        )

    def fit(
        x_tr: Tensor,
        y_tr: np.ndarray,
        x_te: Tensor,
        y_te: np.ndarray,
        covariance: Tensor | None = None,  # always None: scikit-learn fits need none
    ) -> _Step:
        model = clone(classifier)
        model.fit(x_tr.detach().cpu().numpy(), y_tr)
        if not hasattr(model, "coef_"):
            raise TypeError(
                f"{type(model).__name__} has no coef_ after fit: INLP needs a linear classifier."
            )
        accuracy = float((model.predict(x_te.detach().cpu().numpy()) == y_te).mean())
        rows = torch.as_tensor(np.atleast_2d(np.asarray(model.coef_)), dtype=torch.float64)
        return _Step(rows=rows, accuracy=accuracy)

    # The reference trains scikit-learn classifiers on the raw projected data.
    return fit, torch.ones(x_train.shape[1], dtype=x_train.dtype, device=x_train.device)


def _fit_logistic(
    z_tr: Tensor,
    y_tr: np.ndarray,
    z_te: Tensor,
    y_te: np.ndarray,
    covariance: Tensor | None = None,
    *,
    scale: Tensor,
    tol: float,
) -> _Step:
    # Labels present in this (possibly by-class) subset only: a class that never occurs would
    # get a weight pushed along the data mean, a direction that says nothing about the concept.
    present, y_codes = np.unique(y_tr, return_inverse=True)
    y_long = torch.as_tensor(y_codes, device=z_tr.device, dtype=torch.long)
    # fit_logistic centres the features itself (the mean is folded into the unpenalised bias).
    # scikit-learn's lbfgs tolerance: tighter only polishes weights along directions the data
    # barely constrains, doubling the iterations without changing predictions.
    result = fit_logistic(
        z_tr[None],
        y_long,
        len(present),
        l2=softmax_penalty(_L2, len(present)),  # scikit-learn's C = 1 / (0.001 n), binary too
        tol=tol,
        covariance=None if covariance is None else covariance[None],
    )
    predicted = present[result.predict(z_te[None])[0].cpu().numpy()]
    accuracy = float((predicted == y_te).mean())
    # logits = (x / s) @ W + b, so in the input space the weights are W / s.
    weight = result.weight[0].to(torch.float64) / scale.to(torch.float64)[:, None]
    rows = (weight - weight.mean(1, keepdim=True)).T
    return _Step(rows=rows.cpu(), accuracy=accuracy)


def _covariance(f: Tensor) -> Tensor:
    """``[d, d]`` covariance of the rows of ``f [n, d]``, in float64."""
    f64 = f.to(torch.float64)
    centred = f64 - f64.mean(0)
    return centred.T @ centred / len(f)


def _projected_covariance(covariance: Tensor, new: Tensor, scale: Tensor) -> Tensor:
    """The covariance of the features after removing the orthonormal rows ``new [r, d]``.

    Features are ``f = x_p / scale``; removing ``new`` maps them as ``f <- f M`` with
    ``M = S (I - NᵀN) S⁻¹`` (``S = diag(scale)``), so the covariance becomes ``Mᵀ C M``.
    """
    sd = scale.to(device=covariance.device, dtype=torch.float64)
    rows = new.to(device=covariance.device, dtype=torch.float64)
    M = -(sd[:, None] * (rows.T @ rows)) / sd[None, :]
    M.diagonal().add_(1.0)
    return M.T @ covariance @ M


def _feature_scale(x: Tensor) -> Tensor:
    """Per-feature standard deviation, with constant features left unscaled."""
    scale = x.std(0)
    return torch.where(scale > 1e-12 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
