"""Scalar-mix probes (Peters et al. 2018; Tenney et al. 2019): which layers does a probe draw on?

The probe reads ``h = γ Σ_l softmax(w)_l h⁽ˡ⁾`` (AllenNLP's ``ScalarMix``: ``w`` starts at zeros,
i.e. a uniform mix) through a linear softmax classifier ``h W + b``; ``w`` and the classifier are
fitted jointly by full-batch L-BFGS on mean cross-entropy + ``l2/2 · ||γ W||²`` (``l2`` doubled for
two classes, as in :class:`LinearProbe`: a mix of one layer is that layer's linear probe, scikit-learn's
``C = 1 / (l2 · n)``). With a linear
classifier on top only the product ``γ W`` is identifiable (``(cγ, W/c)`` fits identically, so a
penalty on ``W`` alone would send γ to infinity): the product is fitted, with γ starting at 1 as
in AllenNLP, and reported split as ``γ = ||γ W||_F`` and a unit-norm ``W``. ``softmax(w)``
(normalised, summing to 1) is what to read. Layers are standardised per layer first.

``cumulative_scores`` is Tenney et al.'s cumulative scoring: the held-out score of mixes of layers
``0..l`` for every ``l``, their differences Δ⁽ˡ⁾ (not clipped at zero) and the expected layer
``E_Δ = Σ_{l≥1} l Δ⁽ˡ⁾ / Σ_{l≥1} Δ⁽ˡ⁾``. All prefixes are fitted in one batched optimisation.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from einops import rearrange
from jaxtyping import Float
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import Tensor

from mechprobe._fit import (
    PRECONDITIONER_ROWS,
    batched_lbfgs,
    change_factor,
    preconditioner,
    softmax_penalty,
)
from mechprobe.core import (
    Result,
    check_bool,
    check_seed,
    gradients_enabled,
    new_axes,
    progress_bar,
    site_columns,
    warn,
)
from mechprobe.probing._activations import Activations
from mechprobe.probing._data import (
    as_layers,
    collected_model,
    collected_sites,
    encode_labels,
    host,
    matched_layers,
    model_layers,
    split_groups_of,
    splits,
    standardised,
    stream_depths,
)
from mechprobe.probing._probes import _check_known_labels, _encode_targets, _softmax

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_MIX_BUDGET = 2**27  # floats of mixed features held at once (512 MB in float32)


class ScalarMixProbe(ClassifierMixin, BaseEstimator):
    """Linear probe on a learned softmax-weighted mix of layers.

    Inputs are ``[n, layers, d]`` activations (an array, a tensor or :class:`Activations`), or, as scikit-learn pipelines and its estimator checks need, 2-D ``[n, layers * d]``:
    the layers side by side, ``X3.reshape(n, -1)``, with ``n_layers`` saying how many there are
    (``n_layers=None`` reads 2-D input as a single layer). Predictions take either form.

    Args:
        l2: penalty on the effective classifier weights ``γ W``, as :class:`LinearProbe`'s
            (scikit-learn's ``C = 1 / (l2 · n)``, for two classes too).
        n_layers: layers in 2-D input (its columns split into ``n_layers`` equal blocks); for
            3-D input, None or its layer count.
        max_iter: L-BFGS iterations at most.
        tol: stop when the largest absolute gradient entry is ≤ ``tol``.
        standardize: scale each layer's features with training statistics first.

    The mixing weights carry no penalty, and on real activations of many layers the fitted
    optimum can put nearly all the weight on one layer, reached only after many more iterations
    than the default ``max_iter`` (on SmolLM2's POS words over 30 layers, some thousand; a larger
    ``l2`` converges sooner), with held-out accuracy no better than where the default stops and
    warns. Read a converged ``layer_weights_`` as which layer, not as a spread over layers.

    Attributes:
        layer_weights_: ``[layers]`` softmax mixing weights (sum to 1).
        gamma_: the scale γ, reported as ``||γ W||_F`` (only the product is identifiable).
        expected_layer_: centre of gravity ``Σ_l depth_l · layer_weights_[l]``, ``depth_l`` each
            entry's depth in the residual stream for :class:`Activations`, on the scale of block
            outputs (block ``l``'s output is ``l``, the embeddings, ``resid_pre@0``, -1; Tenney
            et al. number them one higher), its position along the layer axis for arrays.
        coef_: ``[K, d]`` unit-norm classifier on the mixed (standardised) features; ``intercept_``:
            ``[K]``. Class scores are ``gamma_ · mix @ coef_.T + intercept_``;
            :meth:`decision_function` returns them (two classes: the log-odds of ``classes_[1]``,
            ``[n]``).
        classes_, n_layers_in_, n_features_in_ (columns of the 2-D form, ``layers * d``),
        n_iter_, mean_, scale_ (``[layers, d]``).
        sites_: the sites of :class:`Activations` it was fitted on (None for arrays): later
            Activations are read in that order, and other sites refused.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(300, 4, 3)); y = X[:, 2, 0] > 0
        >>> probe = ScalarMixProbe().fit(X, y)
        >>> int(probe.layer_weights_.argmax()), probe.score(X, y) > 0.9
        (2, True)
        >>> flat = ScalarMixProbe(n_layers=4).fit(X.reshape(300, -1), y)
        >>> bool(np.allclose(flat.layer_weights_, probe.layer_weights_))
        True
    """

    def __init__(
        self,
        l2: float = 1e-3,
        *,
        n_layers: int | None = None,
        max_iter: int = 300,
        tol: float = 1e-5,
        standardize: bool = True,
    ) -> None:
        self.l2 = l2
        self.n_layers = n_layers
        self.max_iter = max_iter
        self.tol = tol
        self.standardize = standardize

    def fit(self, X: Any, y: Any) -> ScalarMixProbe:
        """Fit on ``X`` (``[n, layers, d]``, or ``[n, layers * d]`` with ``n_layers``) and
        labels ``y [n]``.

        Args:
            X: ``[n, layers, d]`` features (numpy, a torch tensor, or :class:`Activations`), or
                ``[n, layers * d]`` with ``n_layers`` set.
            y: ``[n]`` labels (at least two classes).

        Returns:
            The probe itself, fitted (``layer_weights_``, ``gamma_``, ``coef_``, ``intercept_``,
            ``expected_layer_``...).
        """
        flat, n_layers = self._flatten(X, fitting=True)
        flat, y = validate_data(self, flat, host(y), dtype=[np.float64, np.float32])
        if flat.shape[1] % n_layers:
            raise ValueError(
                f"X has {flat.shape[1]} feature(s), not a multiple of n_layers={n_layers}: 2-D "
                "input is [n, layers * d], the layers side by side."
            )
        y_idx = _encode_targets(self, y)
        n, d = flat.shape[0], flat.shape[1] // n_layers
        with warnings.catch_warnings():  # read-only input: standardised() only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            values = torch.from_numpy(np.ascontiguousarray(flat).reshape(n, n_layers, d))
        train, _, mean, scale = standardised(values, np.arange(n), standardize=self.standardize)
        masks = torch.ones(1, n_layers, dtype=torch.bool)
        fit = _fit_mix(
            train,
            torch.from_numpy(y_idx),
            len(self.classes_),
            masks,
            self.l2,
            self.max_iter,
            self.tol,
        )
        self.mean_, self.scale_ = mean.cpu().numpy(), scale.cpu().numpy()
        self.layer_weights_ = fit.weights[0].cpu().numpy()
        self.gamma_ = float(fit.gamma[0])
        self.coef_, self.intercept_ = fit.W[0].T.cpu().numpy(), fit.b[0].cpu().numpy()
        depths = stream_depths(collected_sites(X), n_layers)
        self.expected_layer_ = float(depths @ self.layer_weights_)
        self.n_layers_in_, self.n_iter_ = n_layers, fit.n_iter
        # Activations name their layers: later ones are put in this order (None: positional).
        self.sites_ = collected_sites(X)
        return self

    def _flatten(self, X: Any, *, fitting: bool) -> tuple[Any, int]:
        """``(2-D X, layers)``: 3-D arrays and tensors flattened to ``[n, layers * d]``; other
        input passed on as it is, for scikit-learn's validation to accept or refuse."""
        if not fitting:
            check_is_fitted(self)
        if isinstance(X, Activations):
            # A probe fitted before it kept its sites reads them by position, as before.
            fitted = getattr(self, "sites_", None)
            X = X.values if fitting else matched_layers(X.values, X, fitted, "X")
        X = host(X)  # tensors on any device
        if getattr(X, "ndim", None) == 3:
            values = np.asarray(X)
            n, layers, d = values.shape
            if fitting and self.n_layers is not None and self.n_layers != layers:
                raise ValueError(f"X has {layers} layers but n_layers={self.n_layers}.")
            if not fitting:
                width = self.n_features_in_ // self.n_layers_in_
                if (layers, d) != (self.n_layers_in_, width):
                    raise ValueError(
                        f"X must be [n, {self.n_layers_in_}, {width}] like the training data, "
                        f"got shape {values.shape}."
                    )
            return values.reshape(n, layers * d), layers
        if not fitting:
            return X, self.n_layers_in_
        layers = self.n_layers
        if layers is not None and (
            isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or layers < 1
        ):
            raise ValueError(f"n_layers must be None or an int >= 1, got {layers!r}.")
        return X, 1 if layers is None else int(layers)

    def decision_function(self, X: Any) -> np.ndarray:
        """Class scores ``[n, K]``; for two classes the log-odds of ``classes_[1]``, ``[n]``.

        Args:
            X: Features shaped as in :meth:`fit`.

        Returns:
            ``[n]`` or ``[n, K]`` scores.
        """
        flat, n_layers = self._flatten(X, fitting=False)
        flat = validate_data(self, flat, reset=False, dtype=[np.float64, np.float32])
        values = flat.reshape(len(flat), n_layers, -1).astype(np.float64, copy=False)
        mixed = np.einsum("nld,l->nd", (values - self.mean_) / self.scale_, self.layer_weights_)
        scores = self.gamma_ * mixed @ self.coef_.T + self.intercept_
        return scores[:, 1] - scores[:, 0] if scores.shape[1] == 2 else scores

    def predict_proba(self, X: Any) -> np.ndarray:
        """Class probabilities ``[n, K]`` in the order of ``classes_``.

        Args:
            X: Features shaped as in :meth:`fit`.

        Returns:
            ``[n, K]`` probabilities.
        """
        scores = self.decision_function(X)
        if scores.ndim == 1:
            scores = np.stack([np.zeros_like(scores), scores], 1)
        return _softmax(scores)

    def predict_log_proba(self, X: Any) -> np.ndarray:
        """Log class probabilities ``[n, K]``.

        Args:
            X: Features shaped as in :meth:`fit`.

        Returns:
            ``[n, K]`` log-probabilities, in the order of ``classes_``.
        """
        return np.log(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """Most likely label per row.

        Args:
            X: Features shaped as in :meth:`fit`.

        Returns:
            ``[n]`` labels, from ``classes_``.
        """
        best = self.predict_proba(X).argmax(1)  # first: it raises NotFittedError before fit
        return self.classes_[best]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy; labels that ``fit`` never saw raise an error.

        Args:
            X: Features shaped as in :meth:`fit`.
            y: ``[n]`` true labels, each among ``classes_``.
            sample_weight: ``[n]`` weights of the rows (None: equal).

        Returns:
            The (weighted) fraction of rows predicted right.
        """
        X, y = host(X), host(y)  # tensors on any device
        _check_known_labels(self, y)
        return float(super().score(X, y, sample_weight=sample_weight))


@dataclass(frozen=True, eq=False, repr=False)
class CumulativeScores(Result, format="mechprobe.CumulativeScores", version=3):
    """Tenney et al.'s cumulative scoring of layer prefixes.

    Attributes:
        scores: ``[layers]`` held-out accuracy of the scalar mix of layers ``0..l``.
        deltas: ``[layers]`` ``scores[l] - scores[l-1]``, NaN at ``l = 0``; negative values kept.
        expected_layer: ``E_Δ = Σ_{l≥1} depths[l] Δ(l) / Σ_{l≥1} Δ(l)`` (NaN when the deltas
            sum to 0), on the scale of :attr:`depths`: block ``l``'s output is ``l`` and the
            embeddings -1, where Tenney et al. number them 0 and block ``l``'s output ``l + 1``
            (their E_Δ is this plus one). Layers are taken in the model's order, however they
            were collected. Outside the layers probed (negative deltas cancel the positive
            ones) it names no layer: :attr:`expected_layer_defined` is False, and the figure,
            repr and summary say so.
        mix_weights: ``[layers, layers]``, row ``l`` the softmax weights of the mix of ``0..l``.
        n_train: Training rows.
        n_test: Held-out rows.
        layers: ``[layers]`` the model layer of each entry, read from the site names of
            :class:`Activations` (as :class:`ProbeResult`); positions for a plain array.
        sites: ``[layers]`` the site names of :class:`Activations`, in the model's order (None
            for a plain array, and in files saved before results recorded them).
        seed: The seed the call took (None in files saved before results recorded it).
        model_name: The model :class:`Activations` were collected from (``cfg.model_name``), for
            the record; empty for a plain array and in files saved before results recorded it.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        l2, max_iter, tol, standardize: The fits' settings (None, and True for
            ``standardize``, in files saved before results recorded them).

    Example:
        >>> import numpy as np, mechprobe as mp
        >>> X = np.random.default_rng(0).normal(size=(200, 3, 4)); y = X[:, 1, 0] > 0
        >>> scores = mp.cumulative_scores(X, y, progress=False)
        >>> scores.to_frame().shape[0], type(scores.plot()).__name__
        (3, 'Figure')
    """

    scores: np.ndarray
    deltas: np.ndarray
    expected_layer: float
    mix_weights: np.ndarray
    n_train: int
    n_test: int
    layers: np.ndarray | None = None
    seed: int | None = None
    model_name: str = ""
    model_dtype: str = ""
    l2: float | None = None
    max_iter: int | None = None
    tol: float | None = None
    standardize: bool = True
    sites: tuple[str, ...] | None = None

    def _layers(self) -> np.ndarray:
        return np.arange(len(self.scores)) if self.layers is None else np.asarray(self.layers)

    @property
    def depths(self) -> np.ndarray:
        """``[layers]`` each entry's depth in the residual stream, the scale of
        :attr:`expected_layer`: block ``l``'s output is ``l``, what block ``l`` reads
        (``resid_pre@l``) ``l - 1``, so the embeddings are -1 (the layers themselves where the
        sites are not recorded).

        Example:
            >>> import mechprobe as mp
            >>> model, data = mp.tiny_model(), mp.pos_dataset(max_sentences=30)
            >>> acts = mp.collect(model, data, [mp.Site("resid_pre", 0), "resid_post"],
            ...                   progress=False)
            >>> mp.cumulative_scores(acts, progress=False).depths.tolist()
            [-1, 0, 1, 2]
        """
        if self.sites is None:
            return self._layers()
        return stream_depths(self.sites, len(self.scores))

    @property
    def expected_layer_defined(self) -> bool:
        """Whether :attr:`expected_layer` names a layer: finite and within the layers probed.

        Read off the stored numbers, so a result loaded from a file says it as well (the
        warning at compute time is not kept): E_Δ = 32.67 over layers 0..29 was drawn as a
        layer past the last one.

        Example:
            >>> import numpy as np, mechprobe as mp
            >>> X = np.random.default_rng(0).normal(size=(200, 3, 4)); y = X[:, 1, 0] > 0
            >>> mp.cumulative_scores(X, y, progress=False).expected_layer_defined
            True
        """
        depths = self.depths
        expected = self.expected_layer
        return bool(np.isfinite(expected) and depths.min() <= expected <= depths.max())

    def _expected_text(self) -> str:
        """``E_Δ = 12.34``, or why there is none (the value kept where there is one)."""
        if self.expected_layer_defined:
            return f"E_Δ = {self.expected_layer:.2f}"
        if not np.isfinite(self.expected_layer):
            return "E_Δ undefined (deltas cancel)"
        depths = self.depths
        return (
            f"E_Δ undefined (deltas cancel: {self.expected_layer:.2f} lies outside layers "
            f"{depths.min():g}..{depths.max():g})"
        )

    def to_frame(self) -> pd.DataFrame:
        """One row per layer: ``layer`` (``Int64``, as in every result's frame), ``accuracy``
        (the held-out accuracy of the mix of the layers up to it, :attr:`scores`; the word
        :class:`ProbeResult`'s frame uses) and ``delta``; for :class:`Activations`, first the
        site columns of :class:`ProbeResult`'s frame (``site``, ``kind``, ``layer``, ``head``,
        ``hook``) and ``depth`` (:attr:`depths`).

        Example:
            >>> import numpy as np, mechprobe as mp
            >>> X = np.random.default_rng(0).normal(size=(100, 2, 4)); y = X[:, 1, 0] > 0
            >>> mp.cumulative_scores(X, y, progress=False).to_frame().columns.tolist()
            ['layer', 'accuracy', 'delta']
        """
        scores = {"accuracy": self.scores, "delta": self.deltas}
        if self.sites is not None and len(self.sites) == len(self.scores):
            # The sites say what each entry is: resid_pre@0 and resid_post@0 are both layer 0.
            return pd.DataFrame({**site_columns(self.sites), "depth": self.depths, **scores})
        return pd.DataFrame({"layer": pd.array(self._layers().tolist(), dtype="Int64"), **scores})

    def summary(self) -> pd.DataFrame:
        """One row: the expected layer ``E_Δ`` and ``expected_layer_defined`` (False where it
        names no layer: NaN, or outside the layers probed as the deltas cancel), the first and
        last prefix scores, the layer of the largest gain (None when no layer adds to the
        score), and the data sizes."""
        # deltas[0] is NaN (no prefix before the first layer): a single layer gains nothing,
        # and argmax of gains that are all <= 0 would name the first layer for no gain at all.
        gains = np.nan_to_num(self.deltas, nan=-np.inf)
        best = int(np.argmax(gains))
        largest = int(self._layers()[best]) if gains[best] > 0 else None
        return pd.DataFrame(
            [
                {
                    "expected_layer": self.expected_layer,
                    "expected_layer_defined": self.expected_layer_defined,
                    "first_score": float(self.scores[0]),
                    "last_score": float(self.scores[-1]),
                    "largest_gain_layer": largest,
                    "n_train": self.n_train,
                    "n_test": self.n_test,
                }
            ]
        )

    def _expected_line(self) -> str:
        if self.expected_layer_defined:
            return f"expected layer {self.expected_layer:.2f}"
        return "expected layer undefined" + self._expected_text().removeprefix("E_Δ undefined")

    def _describe(self) -> str:
        return (
            f"{len(self.scores)} layers, {self._expected_line()}, score "
            f"{self.scores[0]:.3f} -> {self.scores[-1]:.3f} ({self.n_train} train, "
            f"{self.n_test} test)"
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Δ(l) as bars (negative ones red), the prefix scores as a line, E_Δ as a dashed line
        (none where it names no layer, as the title then says).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        figure, ax = new_axes(ax, (7, 3.5))
        layers = self.depths  # the embeddings at -1, before block 0's output
        colors = ["tab:red" if d < 0 else "tab:blue" for d in np.nan_to_num(self.deltas)]
        ax.bar(layers, np.nan_to_num(self.deltas), color=colors, label="Δ(l)")
        # n_test in the title: with a few held-out rows each step of Δ is one row, not signal.
        expected = self._expected_text()
        # The reason on a line of its own: on one line it ran past both edges of 7 inches.
        join = "; " if self.expected_layer_defined else "\n"
        title = f"Cumulative scoring, {self.n_test} held-out rows{join}{expected}"
        xlabel = "layer" if (layers >= 0).all() else "layer (-1: the embeddings)"
        ax.set(xlabel=xlabel, ylabel="Δ accuracy", title=title)
        twin = ax.twinx()
        twin.plot(layers, self.scores, color="black", marker=".", label="accuracy of the mix 0..l")
        twin.set_ylabel("accuracy")
        if self.expected_layer_defined:  # outside the layers, a line there read as a layer
            ax.axvline(self.expected_layer, ls="--", color="gray", label=expected)
        # One legend for both axes, below them: inside, it covered the bars (and lacked the line).
        handles = [*ax.get_legend_handles_labels()[0], *twin.get_legend_handles_labels()[0]]
        ax.legend(
            handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3,
            fontsize="small", frameon=False,
        )  # fmt: skip
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        return figure


def cumulative_scores(
    X: Any,
    y: Any = None,
    *,
    X_test: Any = None,
    y_test: Any = None,
    test_size: float = 0.2,
    split_groups: Any = None,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 300,
    tol: float = 1e-5,
    standardize: bool = True,
    progress: bool = True,
) -> CumulativeScores:
    """Score scalar mixes of layers ``0..l`` for every ``l`` on held-out data (Tenney et al. 2019).

    Args:
        X: ``[n, layers, d]`` activations (array, tensor or an object with ``.values``/``.labels``).
        y: ``[n]`` labels (default ``X.labels``).
        X_test: held-out activations; without them a stratified ``test_size`` split of ``X`` is used.
        y_test: held-out labels.
        test_size: held-out fraction when ``X_test`` is None.
        split_groups: keep each group's rows on one side of that split: ``"text"`` (the texts
            of :class:`Activations`) or ``[n]`` group ids, as in :func:`probe_layers`.
        seed: split seed.
        l2: classifier penalty, as in :class:`ScalarMixProbe`.
        max_iter: L-BFGS iterations at most.
        tol: gradient tolerance.
        standardize: standardise each layer with the training rows' statistics first (as
            :class:`ScalarMixProbe`); False mixes the raw layers, as AllenNLP's ``ScalarMix``
            and Tenney et al. do.
        progress: show a progress bar (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        Prefix scores, their differences and the expected layer ``E_Δ``.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(400, 3, 4)); y = X[:, 1, 0] > 0
        >>> result = cumulative_scores(X, y, progress=False)
        >>> bool(result.deltas[1] > 0.3), round(result.expected_layer)
        (True, 1)
    """

    standardize = check_bool(standardize, "standardize")
    seed = check_seed(seed)
    values, labels, _ = as_layers(X, y)
    sites = fitted_sites = collected_sites(X)
    layers = model_layers(sites, values.shape[1])
    depths = stream_depths(sites, values.shape[1])
    # Prefixes follow the model's depth, whatever order the layers were collected in
    # (collect(layers=[2, 0]) mixed "layers 0..l" in collection order); the embeddings
    # (resid_pre@0) come before block 0's output, which shares their layer label.
    depth = np.argsort(depths, kind="stable")
    if (depth != np.arange(len(layers))).any():
        values, layers, depths = values[:, torch.from_numpy(depth)], layers[depth], depths[depth]
        sites = None if sites is None else tuple(sites[i] for i in depth)
    classes, y_idx = encode_labels(labels)
    if (X_test is None) != (y_test is None) and not hasattr(X_test, "labels"):
        # X_test alone was answered "no labels: pass y" (y was passed); y_test alone was ignored.
        given, missing = ("X_test", "y_test") if y_test is None else ("y_test", "X_test")
        raise ValueError(
            f"{given} was given without {missing}: pass both (or X_test as collected "
            "Activations, whose labels it holds), or neither to split X."
        )
    if X_test is not None and split_groups is not None:
        raise ValueError(
            "split_groups keeps groups on one side of the split of X, but X_test is given (no "
            "split is made): drop split_groups, or X_test."
        )
    if X_test is None:
        folds = splits(
            y_idx, test_size=test_size, n_folds=None, seed=seed, classes=classes,
            split_groups=split_groups_of(X, split_groups, len(y_idx)),
        )  # fmt: skip
        train, test = folds[0]
        train_x, test_x, _, _ = standardised(values, train, test, standardize=standardize)
        y_train, y_test_idx = y_idx[train], y_idx[test]
    else:
        test_values, test_labels, _ = as_layers(X_test, y_test)
        test_values = matched_layers(test_values, X_test, fitted_sites, "X_test")
        if test_values.shape[1] == len(depth):
            test_values = test_values[:, torch.from_numpy(depth)]
        if test_values.shape[1:] != values.shape[1:]:
            raise ValueError(
                f"X_test rows are {tuple(test_values.shape[1:])} but X rows are "
                f"{tuple(values.shape[1:])}; pass the same layers and features."
            )
        unseen = np.setdiff1d(test_labels, classes)
        if unseen.size:
            raise ValueError(
                f"y_test has labels {unseen[:5].tolist()} absent from y; drop those rows."
            )
        both = torch.cat([values, test_values.to(values.dtype)])
        n = values.shape[0]
        train_x, test_x, _, _ = standardised(
            both, np.arange(n), np.arange(n, len(both)), standardize=standardize
        )
        y_train, y_test_idx = y_idx, np.searchsorted(classes, test_labels)
    assert test_x is not None
    n_layers, n_train, d = train_x.shape
    masks = torch.ones(n_layers, n_layers, dtype=torch.bool).tril()  # problem l mixes 0..l
    chunk = max(1, _MIX_BUDGET // (n_train * d))
    weights = np.zeros((n_layers, n_layers))
    scores = np.zeros(n_layers)
    y_tr, y_te = torch.from_numpy(y_train), torch.from_numpy(y_test_idx)
    starts = range(0, n_layers, chunk)
    for start in progress_bar(starts, progress=progress, desc="cumulative scores"):
        stop = min(n_layers, start + chunk)
        # Prefixes up to ``stop`` need only those layers: slicing the layer axis is a view.
        fit = _fit_mix(
            train_x[:stop], y_tr, len(classes), masks[start:stop, :stop], l2, max_iter, tol
        )
        logits = fit.logits(test_x[:stop])
        hits = logits.argmax(-1).cpu() == y_te
        scores[start:stop] = hits.double().mean(1).numpy()
        weights[start:stop, :stop] = fit.weights.cpu().numpy()
    deltas = np.concatenate([[np.nan], np.diff(scores)])
    expected = _expected_layer(scores, depths, len(y_test_idx))
    return CumulativeScores(
        scores,
        deltas,
        expected,
        weights,
        n_train,
        len(y_test_idx),
        layers,
        seed=seed,
        **collected_model(X),
        sites=sites,
        l2=float(l2),
        max_iter=int(max_iter),
        tol=float(tol),
        standardize=standardize,
    )


@dataclass(frozen=True)
class _MixFit:
    weights: Tensor  # [B, L] softmax weights
    gamma: Tensor  # [B]
    W: Tensor  # [B, d, K]
    b: Tensor  # [B, K]
    n_iter: int

    def logits(self, X: Float[Tensor, "layers n d"]) -> Tensor:
        """``[B, n, K]`` class scores of every problem's mix."""
        mixed = _scalar_mix(X, self.weights.to(X.dtype))
        effective = (self.gamma[:, None, None] * self.W).to(X.dtype)
        return torch.baddbmm(self.b.to(X.dtype)[:, None], mixed, effective)


def _scalar_mix(X: Float[Tensor, "layers n d"], weights: Float[Tensor, "B layers"]) -> Tensor:
    """``[B, n, d]`` mixes ``Σ_l weights[b, l] X[l]``: one GEMM over the flattened layers."""
    n_layers, n, d = X.shape
    return (weights @ X.reshape(n_layers, n * d)).view(-1, n, d)


@gradients_enabled()  # differentiated by autograd, also where the caller turned gradients off
def _fit_mix(
    X: Float[Tensor, "layers n d"],
    y: Tensor,
    n_classes: int,
    masks: Tensor,
    l2: float,
    max_iter: int,
    tol: float,
) -> _MixFit:
    """Fit ``masks.shape[0]`` scalar-mix probes at once; problem ``b`` mixes layers ``masks[b]``."""
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}.")
    # Everything beside the activations (a GPU's, where they live there); tensors made under
    # inference_mode cannot be saved for backward.
    X, y, masks = (
        t.clone() if t.is_inference() else t for t in (X, y.to(X.device), masks.to(X.device))
    )
    objective = _MixObjective(X, y, n_classes, masks, softmax_penalty(l2, n_classes))
    theta = torch.zeros(
        masks.shape[0], objective.size, dtype=torch.float64, device=X.device
    )  # w = 0: uniform
    eps = 10 * torch.finfo(X.dtype).eps
    theta, n_iter, finished = batched_lbfgs(
        objective,
        theta,
        max_iter=max_iter,
        tol=tol,
        first_step=1.0,
        eps=eps,
        refresh=objective.refresh,
        refresh_at=(15, 50),
    )
    if not bool(finished.all()):
        warn(
            f"scalar mix: {int((~finished).sum())} of {len(finished)} fits did not reach "
            f"tol={tol} in max_iter={max_iter} iterations; increase max_iter or l2.",
            ConvergenceWarning,
        )
    w, effective, b = objective.unpack(theta, torch.arange(len(theta), device=theta.device))
    weights = torch.softmax(w.masked_fill(~masks, -torch.inf), -1)
    # Only γW is identifiable: report it as γ = ||γW||_F times a unit-norm W.
    gamma = torch.linalg.matrix_norm(effective).clamp_min(1e-30)
    return _MixFit(
        weights=weights, gamma=gamma, W=effective / gamma[:, None, None], b=b, n_iter=n_iter
    )


class _MixObjective:
    """Loss and gradient (autograd) of scalar-mix probes, classifier preconditioned as in _logistic."""

    def __init__(self, X: Tensor, y: Tensor, n_classes: int, masks: Tensor, l2: float) -> None:
        self.X, self.y, self.k, self.masks, self.l2 = X, y, n_classes, masks, l2
        n_layers, n, d = X.shape
        self.size = n_layers + d * n_classes + n_classes
        self.rows = X[:, :: max(1, n // PRECONDITIONER_ROWS)]  # strided view for curvature
        uniform = (masks / masks.sum(1, keepdim=True)).to(X.dtype)
        self.chol = self._factor(uniform, None)

    def _factor(self, weights: Tensor, curvature: Tensor | None) -> Tensor:
        """Cholesky factors of ``E[c (m - m̄)(m - m̄)ᵀ] + l2 I`` for mixes ``m`` of the rows."""
        mixed = _scalar_mix(self.rows, weights)
        if curvature is None:  # softmax curvature at uniform predictions
            curvature = torch.full(
                mixed.shape[:2], (self.k - 1) / self.k**2, dtype=mixed.dtype, device=mixed.device
            )
        return preconditioner(mixed, mixed.mean(1, dtype=torch.float64), curvature, self.l2)

    def refresh(
        self, theta: Tensor, idx: Tensor
    ) -> tuple[Tensor, Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """Re-fit the preconditioners to the current mixes and predictions: ``(changed, points,
        gradients)``, the change of variables ``V' = L'ᵀ L⁻ᵀ V`` of the classifier block (the
        same γW, so the same loss) for :func:`batched_lbfgs`; mix weights and biases stay."""
        w, U, bias = self.unpack(theta, idx)
        weights = torch.softmax(w.masked_fill(~self.masks[idx], -torch.inf), -1).to(self.X.dtype)
        mixed = _scalar_mix(self.rows, weights)
        p = torch.softmax(
            torch.baddbmm(bias.to(mixed.dtype)[:, None], mixed, U.to(mixed.dtype)), -1
        )
        old = self.chol[idx].double()
        self.chol[idx] = self._factor(weights, (p * (1 - p)).mean(-1))
        new = self.chol[idx].double()
        n_layers, _, d = self.X.shape
        block = slice(n_layers, n_layers + d * self.k)

        def change(vectors: Tensor, *, gradients: bool) -> Tensor:
            # [c, m, size]: the classifier block as one [d, m·K] matrix per problem.
            out = vectors.clone()
            V = rearrange(vectors[..., block], "c m (d k) -> c d (m k)", d=d, k=self.k)
            V = change_factor(old, new, V, gradients=gradients)
            out[..., block] = rearrange(V, "c d (m k) -> c m (d k)", k=self.k)
            return out

        return (
            torch.ones(len(idx), dtype=torch.bool, device=idx.device),
            partial(change, gradients=False),
            partial(change, gradients=True),
        )

    def unpack(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(w [b, L], γW [b, d, K], bias [b, K])``."""
        n_layers, _, d = self.X.shape
        V = theta[:, n_layers : n_layers + d * self.k].reshape(-1, d, self.k)
        U = torch.linalg.solve_triangular(self.chol[idx].mT, V, upper=True)
        return theta[:, :n_layers], U, theta[:, n_layers + d * self.k :]

    def __call__(self, theta: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        theta = theta.detach().requires_grad_(True)
        w, effective, bias = self.unpack(theta, idx)
        weights = torch.softmax(w.masked_fill(~self.masks[idx], -torch.inf), -1)
        mixed = _scalar_mix(self.X, weights.to(self.X.dtype))
        # Narrow right factors multiply faster stored as [K, d] rows (see _logistic).
        rows = effective.mT.to(self.X.dtype).contiguous()
        logits = torch.baddbmm(bias.to(self.X.dtype)[:, None], mixed, rows.mT)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), self.y.repeat(len(idx)), reduction="none"
        )
        penalty = 0.5 * self.l2 * effective.square().sum((1, 2))
        loss = nll.view(len(idx), -1).double().mean(1) + penalty
        (grad,) = torch.autograd.grad(loss.sum(), theta)
        return loss.detach(), grad, grad.abs().amax(1)


def _expected_layer(scores: np.ndarray, layers: np.ndarray, n_test: int) -> float:
    """Tenney et al.'s ``E_Δ`` of held-out accuracies ``scores`` on ``n_test`` rows.

    The deltas telescope to the last score minus the first, a multiple of ``1 / n_test``: below
    half of that it is 0 and ``E_Δ`` is undefined (NaN). Their float sum left ~1e-17 there, and
    ``E_Δ`` came out near ±1e16.
    """
    total = scores[-1] - scores[0]
    if abs(total) < 0.5 / n_test:
        return float("nan")
    deltas = np.diff(scores)
    expected = float(layers[1:] @ deltas / total)
    if not layers[0] <= expected <= layers[-1]:
        # Only negative deltas take E_Δ outside the layers (Tenney et al. do not clip them): then
        # they cancel, and E_Δ = -9 for layers 0..27 was printed as if it meant a layer.
        warn(
            f"cumulative_scores: the expected layer {expected:.2f} lies outside the layers "
            f"probed ({layers[0]:g}..{layers[-1]:g}): the deltas cancel (their sum "
            f"{total:+.4f}, their sizes {np.abs(deltas).sum():.4f}; one held-out row is "
            f"{1 / n_test:.4f}), so it names no layer. Score more held-out rows, or fewer layers."
        )
    return expected
