"""Probe classifiers with the scikit-learn estimator API, and Hewitt & Liang control labels.

``LinearProbe`` is scikit-learn's multinomial L2 ``LogisticRegression`` (the same optimum, with
``C = 1 / (l2 n)``) fitted by the batched torch solver of ``mechprobe._fit``; ``MLPProbe`` is
Hewitt & Liang's (2019) family of probes trained by Adam: ReLU networks of one or more hidden
layers, and rank-constrained linear maps (``hidden_layers=0, rank=k``), with optional dropout.
MLP probes reach high accuracy on control tasks too, so they are less *selective*.
``control_labels`` builds that control task. Regularisation is ``l2`` everywhere: the penalty
``l2/2 ||W||²`` on the mean loss.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from mechprobe._fit import fit_logistic, softmax_penalty
from mechprobe.core import check_float, check_int, check_seed, class_labels, gradients_enabled, warn
from mechprobe.probing._data import host


class _Probe(ClassifierMixin, BaseEstimator):
    """What both probes share: labels from ``predict_proba`` (which each defines), and an
    accuracy that refuses labels ``fit`` never saw instead of silently counting them as errors."""

    classes_: np.ndarray

    def predict_proba(self, X: Any) -> np.ndarray:
        raise NotImplementedError

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities ``[n, K]``.

        Args:
            X: ``[n, d]`` features (numpy, or a torch tensor on any device).

        Returns:
            ``[n, K]`` float64 log-probabilities, in the order of ``classes_``.
        """
        return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Most likely label per row.

        Args:
            X: ``[n, d]`` features (numpy, or a torch tensor on any device).

        Returns:
            ``[n]`` labels, from ``classes_``.
        """
        check_is_fitted(self)
        return self.classes_[self.predict_proba(X).argmax(1)]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy; labels that ``fit`` never saw raise instead of silently counting as errors.

        Args:
            X: ``[n, d]`` features (numpy, or a torch tensor on any device).
            y: ``[n]`` true labels, each among ``classes_``.
            sample_weight: ``[n]`` weights of the rows (None: equal).

        Returns:
            The (weighted) fraction of rows predicted right.
        """
        X, y = host(X), host(y)  # tensors on any device
        _check_known_labels(self, y)
        return float(super().score(X, y, sample_weight=sample_weight))


class LinearProbe(_Probe):
    """Multinomial logistic regression with an L2 penalty: scikit-learn's objective, torch solver.

    Loss: weighted mean cross-entropy + ``l2/2 ||coef_||²`` (intercept unpenalised), on the
    standardised features (on the raw features with ``standardize=False``). The fitted model
    equals ``make_pipeline(StandardScaler(), LogisticRegression(C=1 / (l2 n)))`` for ``n``
    training rows (``n`` = the sum of the sample weights; ``LogisticRegression`` alone with
    ``standardize=False``), and a layer of :func:`mechprobe.probe_layers` with the same ``l2``.

    Args:
        l2: penalty on the mean loss (scikit-learn's ``C = 1 / (l2 n)``).
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest absolute gradient entry is ≤ ``tol``.
        standardize: centre and scale each feature with the training mean and standard deviation
            before fitting (``coef_`` is reported on the original features either way).
        C: deprecated (one release): scikit-learn's inverse regularisation; when given, it wins
            over ``l2`` (``l2 = 1 / (C n)``) and ``fit`` warns.

    A fit stops when every gradient entry is at most ``tol``, so two fits of the same problem
    (say, with integer sample weights and with repeated rows) agree to about ``tol`` divided by
    the loss's curvature, not to machine precision: scikit-learn's
    ``check_sample_weight_equivalence_on_dense_data`` (rtol 1e-7) needs ``tol=1e-12`` (with
    ``l2 = 1 / n``, scikit-learn's ``C = 1``, on its 15 separable rows), and passes there.

    Attributes:
        classes_: ``[K]`` labels seen in ``fit``.
        coef_: ``[1, d]`` for two classes, else ``[K, d]``, on the original features.
        intercept_: ``[1]`` or ``[K]``.
        n_features_in_: ``d``.
        n_iter_: ``[1]`` L-BFGS iterations.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(200, 4)); y = (X[:, 0] > 0).astype(int)
        >>> LinearProbe().fit(X, y).score(X, y) > 0.95
        True
    """

    def __init__(
        self,
        l2: float = 1e-3,
        *,
        max_iter: int = 200,
        tol: float = 1e-4,
        standardize: bool = True,
        C: float | None = None,
    ) -> None:
        self.l2 = l2
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize
        self.C = C

    def fit(self, X: Any, y: Any, sample_weight: Any = None) -> LinearProbe:
        """Fit on ``X [n, d]`` and labels ``y [n]``; ``sample_weight`` weights the mean loss.

        Args:
            X: ``[n, d]`` features (numpy, or a torch tensor on any device).
            y: ``[n]`` labels (at least two classes).
            sample_weight: ``[n]`` non-negative row weights (None: equal).

        Returns:
            The probe itself, fitted (``coef_``, ``intercept_``, ``classes_``, ``n_iter_``).
        """
        X, y = validate_data(self, host(X), host(y), dtype=np.float64)
        y_idx = _encode_targets(self, y)
        weights = _sample_weight(sample_weight, X.shape[0])
        if self.C is not None:
            warn(
                "LinearProbe(C=...) is deprecated: say l2 = 1 / (C n) for n training rows "
                "(C goes in the next release).",
                DeprecationWarning,
            )
            if not self.C > 0:
                raise ValueError(
                    f"C must be > 0, got {self.C}; larger C means weaker regularisation."
                )
            l2 = 1.0 / (self.C * weights.sum())
        else:
            l2 = _check_l2(self.l2)
        mean, scale = _standardizer(X, weights, self.standardize)
        k = len(self.classes_)
        fit = fit_logistic(
            torch.from_numpy((X - mean) / scale)[None],
            torch.from_numpy(y_idx),
            k,
            l2=softmax_penalty(l2, k),  # scikit-learn's optimum with two classes too
            max_iter=self.max_iter,
            tol=self.tol,
            sample_weight=torch.from_numpy(weights),
        )
        W = fit.weight[0].cpu().numpy() / scale[:, None]  # back to the original features
        b = fit.bias[0].cpu().numpy() - mean @ W
        if k == 2:
            self.coef_, self.intercept_ = (W[:, 1] - W[:, 0])[None, :], np.array([b[1] - b[0]])
        else:
            self.coef_, self.intercept_ = W.T.copy(), b
        self.n_iter_ = np.array([fit.n_iter])
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores ``[n]`` (two classes: log-odds of ``classes_[1]``) or ``[n, K]``.

        Args:
            X: ``[n, d]`` features.

        Returns:
            ``[n]`` or ``[n, K]`` float64 scores.
        """
        check_is_fitted(self)
        X = validate_data(self, host(X), reset=False, dtype=np.float64)
        scores = X @ self.coef_.T + self.intercept_
        return scores.ravel() if scores.shape[1] == 1 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, K]`` in the order of ``classes_``.

        Args:
            X: ``[n, d]`` features.

        Returns:
            ``[n, K]`` float64 probabilities.
        """
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], 1)
        return _softmax(scores)


class MLPProbe(_Probe):
    """ReLU MLP or rank-constrained linear probe (torch, Adam): Hewitt & Liang's probe family.

    The architecture, from ``d`` features to ``K`` classes:

    - ``hidden_layers=1`` (default): ``logits = relu(x W₁ + b₁) W₂ + b₂``, ``hidden_size`` units
      (Hewitt & Liang's "1hid"); ``hidden_layers=2``: two ReLU layers of ``hidden_size`` each
      ("2hid"); any depth ``>= 1`` works the same way.
    - ``hidden_layers=0, rank=k``: the rank-constrained linear probe ``logits = (x A + a) B + b``
      with ``A [d, k]`` and ``B [k, K]``, so ``W = A B`` has rank at most ``k`` (their "rank k,
      0hid"; ``k >= min(d, K)`` constrains nothing). ``hidden_layers=0`` alone is a plain linear
      softmax probe ``x W + b`` trained by Adam (:class:`LinearProbe` solves the convex problem
      exactly; use this one to compare dropout or minibatch training like for like).

    ``rank`` constrains linear probes only: Hewitt & Liang's "rank k" MLP probes are MLPs of width
    ``k`` (their code sets the hidden width to the rank), i.e. ``MLPProbe(hidden_size=k)``.

    Args:
        hidden_size: units of each hidden layer (unused with ``hidden_layers=0``).
        l2: penalty ``l2/2 · Σ ||Wᵢ||²`` over every weight matrix (biases unpenalised), added to
            the mean cross-entropy. For the rank probe that is ``||A||² + ||B||²``, which at its
            optimum is ``2 ||A B||_*`` (the nuclear norm), not ``||A B||²``.
        max_iter: epochs at most.
        batch_size: examples per Adam step (all of them if fewer).
        learning_rate: Adam step size.
        tol: stop after 10 epochs whose loss improved by less than ``tol``.
        standardize: centre and scale features with training statistics first.
        random_state: seed of the initialisation, the shuffling and the dropout masks (fits are
            deterministic). Minibatches are drawn over row indices, so the same rows in another
            order give another (equally valid) fit, as in any SGD-trained probe: compare MLP
            probes on the same rows in the same order, or average over seeds.
        alpha: deprecated (one release): this probe's old name of ``l2``, the same number (unlike
            scikit-learn's ``MLPClassifier(alpha=a)``, whose penalty ``a/2 ||W||²`` is on the
            summed loss of a minibatch, i.e. ``a = l2 · batch_size``); when given, it wins over
            ``l2`` and ``fit`` warns.
        hidden_layers: ReLU hidden layers, an int ``>= 0`` (0: a linear probe, see above).
        dropout: probability in ``[0, 1)`` of zeroing each input of every layer (the features,
            and each hidden layer's output; for the rank probe the features only, as Hewitt &
            Liang's linear probe, never its rank-k code) during training, scaled by
            ``1 / (1 - dropout)`` as ``torch.nn.Dropout`` does; prediction uses no dropout. 0
            (default): none. (Hewitt & Liang's POS MLP leaves the first hidden layer's output
            undropped.)
        rank: None, or an int ``k >= 1`` with ``hidden_layers=0``: the rank-constrained linear
            probe.

    The loss that decides early stopping is the training loss of each epoch, with dropout where
    ``dropout > 0`` (so it is noisier there; raise ``tol`` or lower ``max_iter`` to stop sooner).

    Attributes:
        classes_, n_features_in_, n_iter_ (epochs run), mean_, scale_.
        coefs_: one weight matrix per layer, input first: ``[W₁ [d, h], W₂ [h, K]]`` for one
            hidden layer, ``[W₁ [d, h], W₂ [h, h], W₃ [h, K]]`` for two, ``[A [d, k], B [k, K]]``
            for the rank probe, ``[W [d, K]]`` for a plain linear one; on the standardised
            features ``(x - mean_) / scale_``.
        intercepts_: the matching biases, ``[b₁ [h], b₂ [K]]`` and so on (``[a [k], b [K]]``).
            ReLU follows every layer but the last, except in the rank probe (linear throughout).

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(300, 2)); y = (X[:, 0] * X[:, 1] > 0)
        >>> MLPProbe(max_iter=300).fit(X, y).score(X, y) > 0.9
        True
        >>> rank_1 = MLPProbe(hidden_layers=0, rank=1, learning_rate=1e-2, tol=1e-3)
        >>> [w.shape for w in rank_1.fit(X, X[:, 0] > 0).coefs_], rank_1.score(X, X[:, 0] > 0)
        ([(2, 1), (1, 2)], 1.0)
    """

    def __init__(
        self,
        hidden_size: int = 100,
        *,
        l2: float = 1e-4,
        max_iter: int = 200,
        batch_size: int = 200,
        learning_rate: float = 1e-3,
        tol: float = 1e-4,
        standardize: bool = True,
        random_state: int = 0,
        alpha: float | None = None,
        hidden_layers: int = 1,
        dropout: float = 0.0,
        rank: int | None = None,
    ) -> None:
        self.hidden_size = hidden_size
        self.l2 = l2
        self.alpha = alpha
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.tol = tol
        self.standardize = standardize
        self.random_state = random_state
        self.hidden_layers = hidden_layers
        self.dropout = dropout
        self.rank = rank

    def fit(self, X: Any, y: Any) -> MLPProbe:
        """Fit on ``X [n, d]`` and labels ``y [n]``.

        Args:
            X: ``[n, d]`` features (numpy, or a torch tensor on any device).
            y: ``[n]`` labels (at least two classes).

        Returns:
            The probe itself, fitted (``coefs_``, ``intercepts_``, ``classes_``, ``n_iter_``).
        """
        X, y = validate_data(self, host(X), host(y), dtype=np.float64)
        y_idx = _encode_targets(self, y)
        settings = self._settings()
        weights = np.ones(X.shape[0])
        self.mean_, self.scale_ = _standardizer(X, weights, settings.standardize)
        Xs = torch.from_numpy((X - self.mean_) / self.scale_).float()[None]
        params, self.n_iter_ = settings.train(Xs, torch.from_numpy(y_idx), len(self.classes_))
        arrays = [p[0].double().cpu().numpy() for p in params]
        self.coefs_, self.intercepts_ = arrays[0::2], arrays[1::2]
        # As fitted, so that set_params(rank=...) after fit cannot change what predict computes.
        self._relu = settings.rank is None
        return self

    def _settings(self) -> _MLPSettings:
        """The parameters, checked (at fit, as scikit-learn does: ``__init__`` only stores them;
        hidden_size=0 once divided by zero in the initialisation)."""
        if self.alpha is not None:
            warn(
                "MLPProbe(alpha=...) is deprecated: say l2=... (the same number; alpha goes in "
                "the next release).",
                DeprecationWarning,
            )
        l2 = _check_l2(self.l2 if self.alpha is None else self.alpha, allow_zero=True)
        hidden_layers = check_int(self.hidden_layers, "hidden_layers")
        if hidden_layers < 0:
            raise ValueError(
                f"hidden_layers must be >= 0, got {hidden_layers}; say 1 or 2 for Hewitt & "
                "Liang's MLP probes, 0 for a linear one."
            )
        rank = None if self.rank is None else check_int(self.rank, "rank")
        if rank is not None and rank < 1:
            raise ValueError(
                f"rank must be None or >= 1, got {rank}; say rank=None for an unconstrained probe."
            )
        if rank is not None and hidden_layers > 0:
            raise ValueError(
                f"rank={rank} constrains linear probes only (hidden_layers=0), got "
                f"hidden_layers={hidden_layers}; Hewitt & Liang's rank-{rank} MLP probes are MLPs "
                f"of width {rank}: say MLPProbe(hidden_size={rank}, hidden_layers="
                f"{hidden_layers}), or hidden_layers=0 for the rank-{rank} linear probe."
            )
        dropout = check_float(self.dropout, "dropout")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(
                f"dropout must be in [0, 1), got {dropout}: it is the probability of zeroing each "
                "input during training (0: no dropout)."
            )
        return _MLPSettings(
            hidden_size=check_int(self.hidden_size, "hidden_size", 1),
            hidden_layers=hidden_layers,
            rank=rank,
            dropout=dropout,
            l2=l2,
            max_iter=check_int(self.max_iter, "max_iter", 1),
            batch_size=check_int(self.batch_size, "batch_size", 1),
            learning_rate=check_float(self.learning_rate, "learning_rate", 0.0, low_open=True),
            tol=check_float(self.tol, "tol", 0.0),
            seed=_random_state(self.random_state),
            standardize=bool(self.standardize),
        )

    def decision_function(self, X: Any) -> np.ndarray:
        """Scores ``[n]`` (two classes: the log-odds of ``classes_[1]``) or logits ``[n, K]``.

        Args:
            X: ``[n, d]`` features.

        Returns:
            ``[n]`` or ``[n, K]`` float64 scores.
        """
        scores = self._logits(X)
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, K]`` in the order of ``classes_``.

        Args:
            X: ``[n, d]`` features.

        Returns:
            ``[n, K]`` float64 probabilities.
        """
        return _softmax(self._logits(X))

    def _logits(self, X: Any) -> np.ndarray:
        """``[n, K]`` logits: the layers of ``coefs_``/``intercepts_`` in float64, ReLU between
        them (none in the rank probe), on the standardised features."""
        check_is_fitted(self)
        X = validate_data(self, host(X), reset=False, dtype=np.float64)
        hidden = (X - self.mean_) / self.scale_
        for i, (w, b) in enumerate(zip(self.coefs_, self.intercepts_, strict=True)):
            hidden = hidden @ w + b
            if self._relu and i < len(self.coefs_) - 1:
                hidden = np.maximum(hidden, 0)
        return hidden


@dataclass(frozen=True)
class _MLPSettings:
    """An :class:`MLPProbe`'s checked parameters: what :func:`_fit_mlp` trains, for the estimator
    and for :func:`mechprobe.probe_layers` alike."""

    hidden_size: int
    hidden_layers: int
    rank: int | None
    dropout: float
    l2: float
    max_iter: int
    batch_size: int
    learning_rate: float
    tol: float
    seed: int
    standardize: bool

    def train(
        self,
        X: Float[Tensor, "layers n d"],
        y: Tensor,
        n_classes: int,
        unfinished: list[int] | None = None,
    ) -> tuple[tuple[Tensor, ...], int]:
        """:func:`_fit_mlp` with these settings."""
        return _fit_mlp(
            X, y, n_classes, hidden_size=self.hidden_size, l2=self.l2, max_iter=self.max_iter,
            batch_size=self.batch_size, learning_rate=self.learning_rate, tol=self.tol,
            seed=self.seed, hidden_layers=self.hidden_layers, rank=self.rank,
            dropout=self.dropout, unfinished=unfinished,
        )  # fmt: skip

    def label(self, l2: float, seed: int) -> str:
        """``"mlp"`` for what ``probe_layers(mlp=True, l2=l2, seed=seed)`` fits, else what
        differs from it: ``"mlp(hidden_layers=0, rank=10)"``, ``"mlp(l2=0.0001)"`` (a penalty
        or seed changed beside the depth would otherwise pass for the depth's effect)."""
        changed = [
            f"{name}={value}"
            for name, value, default in (
                ("hidden_size", self.hidden_size, 100),
                ("hidden_layers", self.hidden_layers, 1),
                ("rank", self.rank, None),
                ("dropout", self.dropout, 0.0),
                ("l2", self.l2, l2),
                ("random_state", self.seed, seed),
            )
            if value != default and not (name == "hidden_size" and self.hidden_layers == 0)
        ]
        return f"mlp({', '.join(changed)})" if changed else "mlp"


def control_labels(groups: Any, y: Any, *, seed: int = 0) -> np.ndarray:
    """Hewitt & Liang control task: one random label per word type, from y's label distribution.

    Each distinct value of ``groups`` (a word type) gets a label drawn from the empirical
    distribution of ``y``; every row of that type carries it, whatever its context. The draw is a
    hash of ``(seed, type)``, so a type's label does not depend on row order or on which other
    types are present: call it once on the whole data set and every split agrees.

    Args:
        groups: ``[n]`` word types (str or int).
        y: ``[n]`` task labels; their frequencies set the control label distribution (those
            of every row passed, test rows included: only a type's label is drawn from them,
            so the split leaks nothing the probe could use).
        seed: changes every type's label.

    Returns:
        ``[n]`` control labels, values taken from ``y``'s classes.

    Example:
        >>> control_labels(["the", "cat", "the"], ["DET", "NOUN", "DET"], seed=1).tolist()[0] in {"DET", "NOUN"}
        True
    """

    seed = check_seed(seed)
    given = host(groups), host(y)
    groups, y = np.asarray(given[0]), np.asarray(given[1])
    if groups.ndim != 1 or y.ndim != 1 or len(groups) != len(y):
        raise ValueError(
            f"groups and y must be 1-D with one entry per example, got shapes {groups.shape} and "
            f"{y.shape}; pass the word type and the label of every row."
        )
    if len(y) == 0:
        raise ValueError("control_labels got no examples; pass at least one row.")
    # Missing or mixed labels and word types are refused (numpy merges 1 and "1", and NaNs).
    class_labels(given[1], "y", min_classes=1)
    class_labels(given[0], "groups", min_classes=1)
    classes, y_idx = np.unique(y, return_inverse=True)
    cdf = np.cumsum(np.bincount(y_idx, minlength=len(classes)) / len(y))
    try:
        types, inverse = np.unique(groups, return_inverse=True)
    except TypeError as err:
        raise TypeError(
            "groups mixes types that cannot be sorted; pass word types as str (e.g. np.asarray(groups, str))."
        ) from err
    u = np.array([_uniform_hash(t, seed) for t in types.tolist()])
    per_type = np.minimum(np.searchsorted(cdf, u, side="right"), len(classes) - 1)
    return classes[per_type[inverse.ravel()]]


def _uniform_hash(value: object, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, value)`` (stable across runs and platforms)."""
    digest = hashlib.blake2b(f"{seed}\x00{value!r}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


@gradients_enabled()  # trained by backpropagation, also where the caller turned gradients off
def _fit_mlp(
    X: Float[Tensor, "layers n d"],
    y: Tensor,
    n_classes: int,
    *,
    hidden_size: int,
    l2: float,
    max_iter: int,
    batch_size: int,
    learning_rate: float,
    tol: float,
    seed: int,
    hidden_layers: int = 1,
    rank: int | None = None,
    dropout: float = 0.0,
    unfinished: list[int] | None = None,
) -> tuple[tuple[Tensor, ...], int]:
    """Train one MLP per layer, all layers in the same Adam steps (their losses are summed).

    Each layer's MLP is trained as if alone: every layer starts from the same draw of ``seed``,
    sees the same minibatches and dropout masks, Adam's update is elementwise, and each layer
    stops on its own early-stopping rule (its parameters are those of the epoch it stopped at),
    so a layer's probe does not depend on which other layers are fitted beside it.

    Returns ``((W₁ [L, d, h], b₁ [L, h], ..., W_last [L, h, K], b_last [L, K]), epochs)``,
    weights and biases alternating, input layer first (see :class:`MLPProbe` for the shapes of
    each architecture), ``epochs`` those of the layer that trained longest. Layers that did not
    stop are warned of, or, given an ``unfinished`` list, appended to it (by position) for the
    caller to warn of: a fit on a worker thread has no user's line to point a warning at.
    """
    n_layers, n, d = X.shape
    # Draws come from a CPU generator and go to the activations' device, so a seed gives the
    # same initialisation, minibatches and dropout masks on every device.
    gen = torch.Generator().manual_seed(seed)
    device = X.device
    # Tensors made under inference_mode cannot be saved for backward.
    X, y = (t.clone() if t.is_inference() else t for t in (X, y.to(device)))

    def uniform(*shape: int, fan_in: int) -> Tensor:
        bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default initialisation range
        one = (torch.rand(1, *shape, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        return one.expand(n_layers, *shape).to(device, X.dtype).clone().requires_grad_()

    widths = _widths(d, n_classes, hidden_size, hidden_layers, rank)
    params: list[Tensor] = []
    # Drawn weight then bias, layer by layer: the one-hidden-layer draws are those of before
    # hidden_layers existed, so its fits did not change.
    for fan_in, fan_out in itertools.pairwise(widths):
        params += [uniform(fan_in, fan_out, fan_in=fan_in), uniform(fan_out, fan_in=fan_in)]
    weights = params[0::2]
    kept = [p.detach().clone() for p in params]  # each layer's parameters where it stopped
    optimiser = torch.optim.Adam(params, lr=learning_rate)
    batch = max(1, min(batch_size, n))
    best = torch.full((n_layers,), math.inf, dtype=torch.float64, device=device)
    stale = torch.zeros(n_layers, dtype=torch.long, device=device)
    stopped = torch.zeros(n_layers, dtype=torch.bool, device=device)

    def drop(rows: int) -> Callable[[Tensor], Tensor] | None:
        """Inverted dropout with masks from ``gen``, one draw shared by every layer of ``X``
        (each is trained as if alone); None where there is no dropout (no draw, so the
        minibatches are those of a fit without it)."""
        if dropout == 0.0:
            return None

        def apply(h: Tensor) -> Tensor:
            keep = torch.rand(1, rows, h.shape[-1], generator=gen) >= dropout
            return h * (keep.to(device, h.dtype) / (1.0 - dropout))

        return apply

    epoch = 0
    for epoch in range(1, max_iter + 1):  # noqa: B007 - the epoch count is returned
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros(n_layers, dtype=torch.float64, device=device)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            logits = _mlp_logits(X[:, idx], params, relu=rank is None, drop=drop(len(idx)))
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y[idx].repeat(n_layers), reduction="none"
            ).view(n_layers, len(idx)).sum(1)  # fmt: skip
            penalty = sum(w.square().sum() for w in weights)
            loss = ce.sum() / len(idx) + 0.5 * l2 * penalty
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += ce.detach().double() / n
        # scikit-learn's rule per layer: stop after 10 epochs without a gain of tol.
        stale = torch.where(total > best - tol, stale + 1, 0)
        best = torch.minimum(best, total)
        done = (stale >= 10) & ~stopped
        if bool(done.any()):
            for held, param in zip(kept, params, strict=True):
                held[done] = param.detach()[done]
            stopped |= done
        if bool(stopped.all()):
            break
    if unfinished is not None:
        unfinished += torch.nonzero(~stopped).flatten().tolist()
    elif not bool(stopped.all()):  # as scikit-learn's MLPClassifier and the linear fits warn
        warn(
            f"MLP probe: {int((~stopped).sum())} of {n_layers} fits did not stop within "
            f"max_iter={max_iter} epochs (their loss still fell by more than tol={tol} within 10 "
            "epochs); increase max_iter.",
            ConvergenceWarning,
        )
    with torch.no_grad():
        final = [
            torch.where(_layer_mask(stopped, p), k, p) for k, p in zip(kept, params, strict=True)
        ]
    return tuple(p.detach() for p in final), epoch


def _widths(
    d: int, n_classes: int, hidden_size: int, hidden_layers: int, rank: int | None
) -> list[int]:
    """Each layer's input width, then the classes: ``[d, h, ..., h, K]``, or ``[d, k, K]`` for
    the rank-``k`` linear probe."""
    if rank is not None:
        return [d, rank, n_classes]
    return [d, *[hidden_size] * hidden_layers, n_classes]


def _mlp_logits(
    x: Float[Tensor, "layers n d"],
    params: Sequence[Tensor],
    *,
    relu: bool = True,
    drop: Callable[[Tensor], Tensor] | None = None,
) -> Float[Tensor, "layers n K"]:
    """The batched forward pass of :func:`_fit_mlp`'s parameters (weights and biases
    alternating): ReLU between layers (none with ``relu=False``, the rank probe), ``drop``
    applied while training to every layer's input, or, for the rank probe, to its input only
    (Hewitt & Liang's ``OneWordLinearLabelProbe`` drops the input, never its rank-k code)."""
    hidden = x
    n_linear = len(params) // 2
    for i in range(n_linear):
        if drop is not None and (relu or i == 0):
            hidden = drop(hidden)
        hidden = torch.baddbmm(params[2 * i + 1][:, None], hidden, params[2 * i])
        if relu and i < n_linear - 1:
            hidden = torch.relu(hidden)
    return hidden


def _layer_mask(layers: Tensor, like: Tensor) -> Tensor:
    """``layers [L]`` broadcast over a parameter ``[L, ...]``."""
    return layers.view(-1, *([1] * (like.ndim - 1)))


def _encode_targets(estimator: BaseEstimator, y: np.ndarray) -> np.ndarray:
    """Set ``classes_`` and return class indices; one class only is an error."""
    check_classification_targets(y)
    classes, y_idx = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(
            f"{type(estimator).__name__} needs at least two classes, but y has only one class "
            f"({classes[0]!r}); a probe cannot learn anything from constant labels."
        )
    estimator.classes_ = classes
    return y_idx.ravel()


def _check_l2(l2: Any, *, allow_zero: bool = False) -> float:
    """``l2`` as a float > 0 (>= 0 where no penalty still has an optimum: the MLP's)."""
    if isinstance(l2, bool) or not isinstance(l2, (int, float, np.number)) or not np.isfinite(l2):
        raise ValueError(f"l2 must be a finite number, got {l2!r}.")
    if l2 < 0 or (l2 == 0 and not allow_zero):
        raise ValueError(
            f"l2 must be > 0, got {l2}; a larger l2 means stronger regularisation "
            "(scikit-learn's C = 1 / (l2 n))."
        )
    return float(l2)


def _check_known_labels(estimator: BaseEstimator, y: Any) -> None:
    check_is_fitted(estimator)
    unseen = np.setdiff1d(np.asarray(host(y)), estimator.classes_)
    if unseen.size:
        raise ValueError(
            f"y contains labels {unseen[:5].tolist()} that were not seen during fit (classes_ = "
            f"{estimator.classes_[:10].tolist()}); drop those rows or refit with them."
        )


def _sample_weight(sample_weight: Any, n: int) -> np.ndarray:
    if sample_weight is None:
        return np.ones(n)
    weights = np.asarray(sample_weight, dtype=np.float64)
    if weights.ndim == 0:
        weights = np.full(n, float(weights))
    if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(
            f"sample_weight must be [n] = [{n}] finite and non-negative, got shape {weights.shape}; "
            "pass one weight per example."
        )
    if not weights.sum() > 0:
        raise ValueError("sample_weight sums to zero; give some examples a positive weight.")
    return weights


def _standardizer(
    X: np.ndarray, weights: np.ndarray, standardize: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted per-feature mean and standard deviation (zero spread left unscaled)."""
    d = X.shape[1]
    if not standardize:
        return np.zeros(d), np.ones(d)
    mean = weights @ X / weights.sum()
    std = np.sqrt(weights @ (X - mean) ** 2 / weights.sum())
    return mean, np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max(initial=0))), std, 1.0)


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


def _random_state(value: Any) -> int:
    """``MLPProbe.random_state`` as a seed, refused under its own name (the message said
    "seed", a word the estimator does not take)."""
    if value is None:
        raise TypeError(
            "MLPProbe random_state must be an int: fits are deterministic given it (scikit-learn's "
            "None, other randomness on every fit, is not taken)."
        )
    return check_seed(value, "MLPProbe random_state")
