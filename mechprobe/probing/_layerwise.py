"""Layer-wise probing: one probe per layer, all layers in one fit, with control task and baseline.

Split: a stratified held-out split (or stratified k folds) over rows, *not* grouped by word type,
even when ``groups`` are given. Hewitt & Liang's control task measures how much a probe memorises
word types; with types shared between train and test that memorisation shows up as control
accuracy, while a grouped split would make control accuracy chance by construction and selectivity
meaningless. Standardisation statistics come from the training rows of each split only.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning

from mechprobe._fit import LogisticFit, fit_logistic, softmax_penalty
from mechprobe.core import (
    Result,
    check_bool,
    check_float,
    check_int,
    check_seed,
    new_axes,
    progress_bar,
    site_columns,
    warn,
)
from mechprobe.probing._data import (
    as_layers,
    collected_model,
    collected_sites,
    encode_labels,
    gathered_dtype,
    group_folds,
    model_layers,
    split_groups_of,
    splits,
    standardised,
    stream_depths,
)
from mechprobe.probing._probes import MLPProbe, _mlp_logits, _MLPSettings, control_labels
from mechprobe.probing._scalar_mix import _fit_mix

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_GROUP_BYTES = 128 * 2**20  # gathered training rows per group of layers fitted together
_WORKERS = 2  # groups of layers fitted at once (each on its share of torch's threads)

_Fits = dict[int, tuple[torch.Tensor, torch.Tensor]]
T = TypeVar("T")


@dataclass(frozen=True, eq=False, repr=False)
class ProbeResult(Result, format="mechprobe.ProbeResult", version=3, html_figure=True):
    """Held-out probe accuracy per layer, with control task, selectivity and majority baseline.

    Attributes:
        layers: ``[L]`` the model layer of each entry of ``X``'s layer axis, read from the
            site names of :class:`Activations` (``collect(..., layers=[10, 20])`` gives 10 and
            20; heads of one layer share it); for a plain array, the positions along that axis.
        accuracy: ``[L]`` held-out accuracy of the task probe (mean over folds).
        control_accuracy: ``[L]`` accuracy on Hewitt & Liang control labels; all NaN when no
            ``groups`` were given, or when each class is one word type (an array either way,
            so the type never changes).
        selectivity: ``[L]`` ``accuracy - control_accuracy`` (NaN without groups).
        majority_baseline: accuracy of always predicting the most frequent training label (one
            number: it does not depend on the layer).
        probe: ``"linear"``, ``"mlp"`` (``mlp=True``), or for a configured
            :class:`MLPProbe` what differs from ``mlp=True``'s (its penalty and seed
            included): ``"mlp(hidden_layers=2)"``, ``"mlp(l2=0.0001)"``,
            ``"mlp(hidden_layers=0, rank=10)"``.
        split: how the data was split, e.g. ``"holdout(test_size=0.2)"`` or ``"5-fold"``.
        n_examples: rows used.
        n_classes: task classes.
        mix_weights: ``[L]`` scalar-mix softmax weights, or None when not computed.
        mix_gamma: the scalar mix's γ, or None.
        expected_layer: ``Σ_l depth[l] · mix_weights[l]``, each entry's depth in the residual
            stream on the scale of block outputs (block ``l``'s output is ``l``; the
            embeddings, ``resid_pre@0``, -1; Tenney et al.'s numbering is this plus one), or
            None.
        mix_accuracy: held-out accuracy of the scalar-mix probe, or None.
        sites: ``[L]`` the site names of :class:`Activations` (hook names, or
            ``"head_out@3, head 2"``), or None for a plain array.
        seed: The seed the call took (None in files saved before results recorded it).
        model_name: The model :class:`Activations` were collected from (``cfg.model_name``), for
            the record; empty for a plain array and in files saved before results recorded it.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        l2, max_iter, tol, standardize: The fit's settings (None, and True for
            ``standardize``, in files saved before results recorded them): probes of one
            dataset under other regularisation are other results.

    Example:
        >>> import numpy as np
        >>> X = np.random.default_rng(0).normal(size=(200, 3, 4)); y = X[:, 1, 0] > 0
        >>> probe_layers(X, y, progress=False)  # doctest: +ELLIPSIS
        ProbeResult(linear probes, 3 layers, 200 examples, 2 classes: best layer 1 (accuracy ...)
    """

    layers: np.ndarray
    accuracy: np.ndarray
    control_accuracy: np.ndarray
    selectivity: np.ndarray
    majority_baseline: float
    probe: str
    split: str
    n_examples: int
    n_classes: int
    mix_weights: np.ndarray | None = None
    mix_gamma: float | None = None
    expected_layer: float | None = None
    mix_accuracy: float | None = None
    sites: tuple[str, ...] | None = None
    seed: int | None = None
    model_name: str = ""
    model_dtype: str = ""
    l2: float | None = None
    max_iter: int | None = None
    tol: float | None = None
    standardize: bool = True

    def entry_names(self) -> list[str]:
        """What each entry of the layer axis is: ``"layer 10"``, or its site where entries share
        a layer (heads: ``"head_out@3, head 2"``).

        Example:
            >>> import numpy as np
            >>> X = np.random.default_rng(0).normal(size=(60, 2, 4)); y = X[:, 1, 0] > 0
            >>> probe_layers(X, y, progress=False).entry_names()
            ['layer 0', 'layer 1']
        """
        return _entry_names(self.sites, self.layers)

    @property
    def best_layer(self) -> int:
        """The layer of the highest held-out accuracy (the first, on ties)."""
        return int(self.layers[int(np.argmax(self.accuracy))])

    def to_frame(self) -> pd.DataFrame:
        """One row per entry of the layer axis: where it was read (``site``, ``kind``,
        ``layer``, ``head``, ``hook``, as in every result's frame), then accuracy, control
        accuracy, selectivity, baseline (and the mix weight).

        ``site`` is the site's label (``"resid_post@3"``, ``"head_out@3, head 2"``), ``hook`` its
        hook name; for a plain array, which names no site, they and ``kind`` are None and
        ``head`` ``<NA>``, and ``layer`` is the position along the layer axis.

        Example:
            >>> import mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), mp.ProbingDataset("t", ["ab", "ba"] * 10,
            ...                   ["x", "y"] * 10), "resid_post", layers=[1, 2], progress=False)
            >>> frame = probe_layers(acts, progress=False).to_frame()
            >>> frame[["site", "kind", "layer", "hook"]].values.tolist()[0]
            ['resid_post@1', 'resid_post', 1, 'blocks.1.hook_resid_post']
        """
        frame = pd.DataFrame(
            {
                **self._site_columns(),
                "accuracy": self.accuracy,
                "control_accuracy": self.control_accuracy,
                "selectivity": self.selectivity,
                "majority_baseline": self.majority_baseline,
            }
        )
        if self.mix_weights is not None:
            frame["mix_weight"] = self.mix_weights
        return frame

    def summary(self) -> pd.DataFrame:
        """One row of key numbers: the best layer and its accuracy, the majority baseline, the
        largest selectivity (NaN without a control task), the best entry's site label
        (``best_site``; None for a plain array) and, with a scalar mix, its expected layer and
        accuracy.

        Example:
            >>> import numpy as np
            >>> X = np.random.default_rng(0).normal(size=(200, 3, 4)); y = X[:, 2, 0] > 0
            >>> int(probe_layers(X, y, progress=False).summary()["best_layer"][0])
            2
        """
        best = int(np.argmax(self.accuracy))
        selectivity = self.selectivity
        row: dict[str, Any] = {
            "probe": self.probe,
            "n_examples": self.n_examples,
            "n_classes": self.n_classes,
            "best_layer": self.best_layer,
            "best_accuracy": float(self.accuracy[best]),
            "majority_baseline": self.majority_baseline,
            "max_selectivity": float(np.nanmax(selectivity))
            if np.isfinite(selectivity).any()
            else np.nan,
        }
        # Always present (None for a plain array): the columns do not depend on the input.
        row["best_site"] = self._site_columns()["site"][best]
        if self.mix_weights is not None:
            row |= {"expected_layer": self.expected_layer, "mix_accuracy": self.mix_accuracy}
        return pd.DataFrame([row])

    def _site_columns(self) -> dict[str, Any]:
        """``site``, ``kind``, ``layer``, ``head``, ``hook`` of each entry (see :meth:`to_frame`);
        the stored ``sites`` (hook names, or labels for heads) are converted here, so files saved
        before frames used labels read the same."""
        if self.sites is not None and len(self.sites) == len(self.layers):
            return site_columns(self.sites)
        n = len(self.layers)
        return {
            "site": [None] * n,
            "kind": [None] * n,
            "layer": pd.array(self.layers.tolist(), dtype="Int64"),
            "head": pd.array([None] * n, dtype="Int64"),
            "hook": [None] * n,
        }

    @property
    def depths(self) -> np.ndarray:
        """``[L]`` each entry's depth in the residual stream, the scale of
        :attr:`expected_layer`: block ``l``'s output is ``l``, what block ``l`` reads
        (``resid_pre@l``) ``l - 1``, attention's half ``l - 0.5`` (the layers themselves for a
        plain array).

        Example:
            >>> import numpy as np
            >>> X = np.random.default_rng(0).normal(size=(100, 2, 4)); y = X[:, 1, 0] > 0
            >>> probe_layers(X, y, progress=False).depths.tolist()
            [0, 1]
        """
        if self.sites is None or len(self.sites) != len(self.layers):
            return np.asarray(self.layers)
        return stream_depths(self.sites, len(self.layers))

    def expected_text(self, digits: int = 2) -> str:
        """``"expected layer 3.60"``, saying its scale where it is not the layers' labels
        (``resid_pre@l`` probes: the expected layer counts it ``l - 1``), or ``""`` without a
        scalar mix.

        Args:
            digits: Decimals of the expected layer.

        Returns:
            The text, or ``""``.

        Example:
            >>> import numpy as np
            >>> X = np.random.default_rng(0).normal(size=(100, 2, 4)); y = X[:, 1, 0] > 0
            >>> probe_layers(X, y, scalar_mix=True, progress=False).expected_text()[:15]
            'expected layer '
        """
        if self.expected_layer is None:
            return ""
        text = f"expected layer {self.expected_layer:.{digits}f}"
        if not np.array_equal(self.depths, self.layers):
            text += " (on block outputs: resid_pre@l counts l - 1, attention's half l - 0.5)"
        return text

    def _describe(self) -> str:
        best = int(np.argmax(self.accuracy))
        heads = self.entry_names()[0] != f"layer {int(self.layers[0])}"
        words = (
            f"{self.probe} probes, {len(self.layers)} {'sites' if heads else 'layers'}, "
            f"{self.n_examples} examples, {self.n_classes} classes: best "
            f"{self.entry_names()[best]} (accuracy {self.accuracy[best]:.3f}, majority "
            f"{self.majority_baseline:.3f})"
        )
        if self.expected_layer is not None:
            words += f", {self.expected_text()}"
        return words

    def plot(self, ax: Axes | None = None) -> Figure:
        """Accuracy and selectivity by layer, the majority baseline as a line, and (with a scalar
        mix, in a new figure) the mix weights as bars below. With ``ax``, the accuracy panel only.

        Args:
            ax: Draw the accuracy panel into these axes (default: a new figure, with the mix
                weights' panel where there is a scalar mix).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        has_mix = self.mix_weights is not None and ax is None
        if ax is None and has_mix:
            from matplotlib.figure import Figure

            figure = Figure(figsize=(7, 6), layout="constrained")
            ax, mix_ax = figure.subplots(2, 1, sharex=True)
        else:
            figure, ax = new_axes(ax, (7, 3.5))
        # Heads of one layer share it: they are drawn side by side, in the order collected.
        x = self.layers if len(set(self.layers.tolist())) == len(self.layers) else None
        x_axis = np.arange(len(self.layers)) if x is None else x
        # Lines follow depth, whatever order the layers were collected in (they zigzagged).
        depth = np.argsort(x_axis, kind="stable")
        ax.plot(x_axis[depth], self.accuracy[depth], marker=".", label=f"{self.probe} probe")
        if np.isfinite(self.control_accuracy).any():
            ax.plot(x_axis[depth], self.control_accuracy[depth], marker=".", label="control task")
            ax.plot(x_axis[depth], self.selectivity[depth], marker=".", label="selectivity")
        ax.axhline(self.majority_baseline, ls="--", color="gray", label="majority baseline")
        if self.mix_accuracy is not None:
            ax.axhline(self.mix_accuracy, ls=":", color="tab:purple", label="scalar-mix probe")
        import re

        held = re.fullmatch(r"holdout\(test_size=([0-9.eE+-]+)(, by \w+)?\)", self.split)
        fold = re.fullmatch(r"\d+-fold", self.split)
        split = (
            f"{float(held.group(1)):.0%} held out{(held.group(2) or '').replace(',', '')}"
            if held
            else (f"{self.split} CV" if fold else self.split)
        )
        title = (
            f"{self.probe} probes, {self.n_classes} classes, {self.n_examples} examples, {split}"
        )
        # Selectivity (accuracy minus control) can be negative; accuracies stay within 0-1.
        controlled = bool(np.isfinite(self.control_accuracy).any())
        ax.set(ylabel="held-out accuracy" + (" / selectivity" if controlled else ""), title=title)
        finite = self.selectivity[np.isfinite(self.selectivity)]
        ax.set_ylim(min(0.0, float(finite.min()) if finite.size else 0.0) - 0.02, 1.02)
        # Below the panel: inside, "best" still covered the layers where accuracy is 1 (with the
        # mix panel too: an MLP probe at 1.0 and the mix's line ran under it). Above the mix
        # panel the accuracy panel has no tick labels to clear, so the legend sits closer.
        ax.legend(
            fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.04 if has_mix else -0.2),
            ncol=4,
        )  # fmt: skip
        if has_mix:
            mix_ax.bar(x_axis, np.asarray(self.mix_weights), color="tab:purple")
            mix_ax.set(ylabel="scalar-mix weight", title=self.expected_text())
        from matplotlib.ticker import MaxNLocator

        bottom = mix_ax if has_mix else ax
        bottom.set_xlabel("layer" if x is not None else "site, as collected")
        bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
        return figure


def probe_layers(
    X: Any,
    y: Any = None,
    *,
    groups: Any = None,
    test_size: float = 0.2,
    n_folds: int | None = None,
    split_groups: Any = None,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 200,
    tol: float = 1e-4,
    mlp: bool | MLPProbe = False,
    scalar_mix: bool = False,
    standardize: bool = True,
    progress: bool = True,
) -> ProbeResult:
    """Probe every layer of ``X`` for ``y``: vectorised logistic-regression fits over the layers.

    Layers are fitted together in groups (one batched L-BFGS over each group's weights; a
    group's gathered training rows take at most 128 MiB, so memory stays bounded), and layers
    between fitted ones start from their neighbours' probes. Results depend on none of this
    beyond ``tol``: each fit stops when its largest gradient entry is within ``tol`` of zero, so
    a held-out prediction near a decision boundary can flip (a row or two in a hundred on pure
    noise at the default ``tol``; none at ``tol=1e-8``). With fewer training rows than features
    the weights grow until the penalty binds and held-out predictions move within that
    tolerance: pass a smaller ``tol`` there (``amnesic`` probes to 1e-6).

    Args:
        X: ``[n, layers, d]`` array or tensor, or an object with ``.values`` (and ``.labels``,
            ``.groups``, e.g. :class:`Activations`).
        y: ``[n]`` labels (default ``X.labels``).
        groups: ``[n]`` word types for the control task (default ``X.groups``, when ``X`` has
            them); ``False`` skips the control task (half the fitting). Where each class is
            one type (groups and labels match one to one) the control labels would only rename
            the classes: the control task is skipped with a warning.
        test_size: held-out fraction (stratified) when ``n_folds`` is None.
        n_folds: stratified k-fold cross-validation instead; scores are averaged over folds.
        split_groups: keep each group's rows on one side of every split: ``"text"`` (the texts
            of :class:`Activations`, as Hewitt & Liang split by sentence: the words of one
            sentence are not in both training and test) or ``[n]`` group ids. Stratified as far
            as the groups allow (scikit-learn's ``StratifiedGroupKFold``, shuffled by
            ``seed``); the held-out split is its first fold of ``round(1 / test_size)`` (so
            ``test_size`` at most 0.5, and a warning where ``1 / folds`` is not ``test_size``;
            :attr:`ProbeResult.split` records the share held out). None (default): rows split
            freely.
        seed: split and control-label seed.
        l2: penalty on the mean loss (scikit-learn ``C = 1 / (l2 · n_train)``).
        max_iter: L-BFGS iterations at most (Adam epochs for ``mlp=True``).
        tol: largest absolute gradient entry at convergence (scikit-learn's ``tol``).
        mlp: ``True`` for one-hidden-layer MLP probes instead of linear ones (less selective,
            per H&L): ``MLPProbe(hidden_size=100, l2=l2, max_iter=max_iter, tol=tol,
            random_state=seed)`` at every layer (this call's ``l2``, ``1e-3`` by default, where
            ``MLPProbe()`` alone defaults to ``1e-4``). Or a configured :class:`MLPProbe` (two hidden
            layers, a rank-constrained linear probe, dropout), fitted at every layer with all
            its parameters: its ``l2``, ``max_iter`` and ``tol`` replace this call's (passing
            other values here too is an error; the result records the probe's), its
            ``random_state`` seeds its initialisation, minibatches and dropout (``seed`` still
            seeds the split and the control task), and its ``standardize`` must agree with
            this call's. The instance itself is not fitted.
        scalar_mix: also fit a :class:`ScalarMixProbe` over all layers.
        standardize: centre and scale each layer's features with the training rows' mean and
            standard deviation before every probe (as :class:`LinearProbe` and
            :class:`ScalarMixProbe` do by default); False fits the raw features (the scalar mix
            then mixes raw layers, as AllenNLP's ``ScalarMix`` and Tenney et al. do).
        progress: show a progress bar (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        A :class:`ProbeResult`.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> X = rng.normal(size=(300, 3, 8)); y = rng.integers(0, 2, 300); X[:, 1, 0] += 3 * y
        >>> result = probe_layers(X, y, progress=False)
        >>> result.accuracy.round(1).tolist()[1], result.majority_baseline < 0.6
        (1.0, True)
    """
    # The settings, checked as the user gave them (a two-class fit doubles l2 internally, and an
    # MLP probe took a negative one).
    l2 = check_float(l2, "l2", 0.0, low_open=True)
    tol = check_float(tol, "tol", 0.0, low_open=True)
    max_iter = check_int(max_iter, "max_iter", 1)
    seed = check_seed(seed)
    scalar_mix = check_bool(scalar_mix, "scalar_mix")
    standardize = check_bool(standardize, "standardize")
    spec = _mlp_settings(mlp, l2=l2, max_iter=max_iter, tol=tol, seed=seed, standardize=standardize)
    mlp = spec is not None
    label = "linear" if spec is None else spec.label(l2, seed)  # against mlp=True's l2 and seed
    if spec is not None:  # the settings the MLP probes are fitted with, as the result records
        l2, max_iter, tol = spec.l2, spec.max_iter, spec.tol
    skip_control = groups is False
    sites = collected_sites(X)
    values, labels, groups = as_layers(X, y, None if skip_control else groups)
    if skip_control:
        groups = None
    classes, y_idx = encode_labels(labels)
    k = len(classes)
    control = None
    if groups is not None and _one_type_per_class(groups, y_idx):
        warn(
            "Each class is one word type (groups and labels match one to one, as in "
            "country_dataset(target='country')): a control task would only rename the classes, "
            "and selectivity would be ~0 whatever the representation. The control task is "
            "skipped (NaN); pass groups with several word types per class, or groups=False.",
            UserWarning,
        )
        groups = None
    if groups is not None:
        control = np.searchsorted(classes, control_labels(groups, labels, seed=seed))
        if len(np.unique(control)) < 2:
            # One control label for every row (few word types, or one): a constant task that
            # any probe "solves", so selectivity would be accuracy minus 1.
            warn(
                f"The control task drew the same label for all {len(np.unique(groups))} word "
                "type(s): it is constant, so its accuracy would be 1 whatever the representation. "
                "The control task is skipped (NaN); pass groups with more word types, another "
                "seed, or groups=False.",
                UserWarning,
            )
            control = None
    split_by = split_groups_of(X, split_groups, len(y_idx))
    folds = splits(
        y_idx, test_size=test_size, n_folds=n_folds, seed=seed, classes=classes,
        split_groups=split_by,
    )  # fmt: skip
    n_layers = values.shape[1]
    acc, ctrl, base = np.zeros(n_layers), np.full(n_layers, np.nan), 0.0
    if control is not None:
        ctrl[:] = 0.0
    mix_w, mix_g, mix_acc = np.zeros(n_layers), 0.0, 0.0
    # How the layers are split and ordered is a matter of speed only (measured in _workers,
    # _group_size and _phases); the fits are the same within tol.
    workers = _workers(n_layers, mlp)
    group = _group_size(values, len(folds[0][0]), workers)
    # One layer per group (large data): no batch to keep full, so every fourth layer goes first.
    phases = _phases(n_layers, mlp, stride=4 if group == 1 else 2)
    sources = _sources(phases)
    parts = _parts(phases, group, workers)

    # Layers whose fits did not converge, warned of here at the end: the fits run on worker
    # threads, whose own warnings pointed at mechprobe's code and came once per group of layers.
    late: dict[str, list[int]] = {"probe": [], "control": []}

    def fit_part(
        f: int, part: list[int], fits: _Fits, control_fits: _Fits, buffers: _Buffers
    ) -> tuple[list[int], np.ndarray, np.ndarray | None]:
        """``(layers, accuracy, control accuracy)`` of one group of layers in fold ``f``."""
        train, test = folds[f]
        y_tr, y_te = _on(y_idx[train], values), _on(y_idx[test], values)
        # The linear fit standardises inside its products; the MLP needs scaled rows.
        # A thread's buffer holds its largest group so far (the first, as the parts fall).
        rows = buffers.rows if buffers.rows and len(buffers.rows[0]) >= len(part) else None
        train_x, test_x, mean, scale = standardised(
            values, train, test, standardize=standardize, scale_train=mlp, out=rows, layers=part
        )
        assert test_x is not None
        if rows is None:
            buffers.rows = (train_x, test_x)
        moments = None if mlp else (mean, scale)
        accuracy = _fit_and_score(
            train_x, test_x, y_tr, y_te, k, l2, max_iter, tol, spec, moments, part, fits,
            sources, late["probe"],
        )  # fmt: skip
        control_accuracy = None
        if control is not None:
            c_tr, c_te = _on(control[train], values), _on(control[test], values)
            control_accuracy = _fit_and_score(
                train_x, test_x, c_tr, c_te, k, l2, max_iter, tol, spec, moments, part,
                control_fits, sources, late["control"],
            )  # fmt: skip
        return part, accuracy, control_accuracy

    def steps() -> Generator[tuple[list[int], np.ndarray, np.ndarray | None] | int]:
        """Each fold's groups of layers in order, then its scalar mix (the fold's index)."""
        for f in range(len(folds)):
            fits: _Fits = {}  # layer -> (weight, bias), this fold: starts for the layers between
            control_fits: _Fits = {}
            work = partial(fit_part, f, fits=fits, control_fits=control_fits, buffers=_Buffers())
            yield from _in_order(work, parts, workers, sources)
            if scalar_mix:
                yield f

    total = len(folds) * (len(parts) + int(scalar_mix))
    with contextlib.closing(steps()) as stream:
        for step in progress_bar(stream, progress=progress, desc="probing layers", total=total):
            if not isinstance(step, int):
                part, accuracy, control_accuracy = step
                acc[part] += accuracy
                if control_accuracy is not None:
                    ctrl[part] += control_accuracy
                continue
            # The scalar mix mixes all layers, so it needs them all at once.
            train, test = folds[step]
            y_tr, y_te = _on(y_idx[train], values), _on(y_idx[test], values)
            train_x, test_x, _, _ = standardised(values, train, test, standardize=standardize)
            assert test_x is not None
            masks = torch.ones(1, n_layers, dtype=torch.bool, device=values.device)
            fit = _fit_mix(train_x, y_tr, k, masks, l2, max_iter, tol)
            mix_w += fit.weights[0].cpu().numpy()
            mix_g += float(fit.gamma[0])
            mix_acc += float((fit.logits(test_x)[0].argmax(-1) == y_te).double().mean())
    if late["probe"] or late["control"]:
        # Named as the result names its entries: the indices along X's layer axis read as
        # layers (only layer 2 probed: "layers [0]"; four heads of one layer: "[0, 1, 2, 3]").
        names = _entry_names(sites, model_layers(sites, n_layers))
        what = "MLP probes" if mlp else "probes"
        failed = [
            f"the {who}{what} of {_listed([names[i] for i in sorted(set(late[key]))])}"
            for key, who in (("probe", ""), ("control", "control task's "))
            if late[key]
        ]
        warn(
            f"probe_layers: {' and '.join(failed)} did not converge within max_iter={max_iter} "
            f"(tol={tol}) in some fold; increase max_iter" + (" (or l2)." if not mlp else "."),
            ConvergenceWarning,
        )
    for train, test in folds:
        y_tr, y_te = _on(y_idx[train], values), _on(y_idx[test], values)
        base += float((y_te == torch.bincount(y_tr, minlength=k).argmax()).double().mean())
    n = len(folds)
    accuracy, control_accuracy = acc / n, ctrl / n
    layers = model_layers(sites, n_layers)
    return ProbeResult(
        layers=layers,
        accuracy=accuracy,
        control_accuracy=control_accuracy,
        selectivity=accuracy - control_accuracy,
        majority_baseline=base / n,
        probe=label,
        split=_split_name(n_folds, test_size, split_groups),
        n_examples=len(y_idx),
        n_classes=k,
        mix_weights=mix_w / n if scalar_mix else None,
        mix_gamma=mix_g / n if scalar_mix else None,
        expected_layer=float(stream_depths(sites, n_layers) @ mix_w / n) if scalar_mix else None,
        mix_accuracy=mix_acc / n if scalar_mix else None,
        sites=sites,
        seed=seed,
        **collected_model(X),
        l2=l2,
        max_iter=max_iter,
        tol=tol,
        standardize=standardize,
    )


def _listed(names: list[str]) -> str:
    """``"layers 0, 2"`` for layers; sites (``"head_out@2, head 1"``) joined by ``"; "``."""
    if len(names) > 1 and all(name.startswith("layer ") for name in names):
        return "layers " + ", ".join(name.removeprefix("layer ") for name in names)
    return "; ".join(names)


def _split_name(n_folds: int | None, test_size: float, split_groups: Any) -> str:
    """``"5-fold"``, ``"holdout(test_size=0.2)"``, with ``", by text"`` (or ``", by group"``)
    where groups stayed on one side."""
    by = ""
    if split_groups is not None:
        by = ", by text" if isinstance(split_groups, str) else ", by group"
    if n_folds is not None:
        return f"{n_folds}-fold{by}"
    if by:  # what was held out: one fold of round(1 / test_size)
        return f"holdout(test_size={1 / group_folds(test_size):.3g}{by})"
    return f"holdout(test_size={test_size})"


def _mlp_settings(
    mlp: Any, *, l2: float, max_iter: int, tol: float, seed: int, standardize: bool
) -> _MLPSettings | None:
    """The MLP probes' settings from ``probe_layers(mlp=...)``: None for linear probes, the
    default MLP for True, an :class:`MLPProbe`'s own parameters for one (checked as its ``fit``
    checks them)."""
    if not isinstance(mlp, MLPProbe):
        if not check_bool(mlp, "mlp"):
            return None
        return MLPProbe(l2=l2, max_iter=max_iter, tol=tol, random_state=seed)._settings()
    spec = mlp._settings()
    # This call's own values, where they are not its defaults, must not be silently dropped.
    for name, given, default, probe in (
        ("l2", l2, 1e-3, spec.l2),
        ("max_iter", max_iter, 200, spec.max_iter),
        ("tol", tol, 1e-4, spec.tol),
    ):
        if given != default and given != probe:
            raise ValueError(
                f"probe_layers got {name}={given} and mlp=MLPProbe({name}={probe}): an MLPProbe's "
                f"own {name} is used; set it there (MLPProbe(..., {name}={given})) and leave "
                f"probe_layers' {name} out."
            )
    if spec.standardize != standardize:
        raise ValueError(
            f"probe_layers got standardize={standardize} and mlp=MLPProbe(standardize="
            f"{spec.standardize}): the MLP probes see the features probe_layers standardises; "
            "pass the same standardize to both."
        )
    return spec


def _entry_names(sites: tuple[str, ...] | None, layers: np.ndarray) -> list[str]:
    """What each entry of the layer axis is: ``"layer 10"``, or its site where entries share a
    layer (heads: ``"head_out@3, head 2"``)."""
    if sites is None or len(set(layers.tolist())) == len(layers):
        return [f"layer {int(layer)}" for layer in layers]
    return list(sites)


def _phases(n_layers: int, mlp: bool, stride: int = 2) -> list[list[int]]:
    """The layers (entries of ``X``'s layer axis) in fitting order: every ``stride``-th layer and
    the last, then, halving the stride, the layers halfway between those fitted, each started
    from its nearest fitted layers' fits (see :func:`_sources`). ``stride``: a power of two.

    The residual stream changes little per block, so neighbouring layers' probes are close and a
    start between them saves iterations; the optimum, and so the result, is the same to ``tol``.
    Measured on SmolLM2's POS activations (l2 1e-3, tol 1e-4), loss evaluations per layer: 18.1
    -> 13.9 at 2,000 rows, 19.8 -> 17.2 at 4,000, 25.0 -> 21.9 at 10,097 and 27.1 -> 22.9 at
    100,970 (layers 10-16); the started layers take 9.0, 13.9 and 16.6 at 2,000, 4,000 and 10,097
    rows (19.9 and 23.4 at 4,000 and 10,097 fitted cold). A start from one neighbour saved less
    (13.9 instead of 12.4 evaluations at 4,000 rows, every start an exact cold fit). More levels
    (every fourth or eighth layer first, starts interpolated between the nearest fitted layers)
    took 12.5 / 15.7 / 20.9 and 12.0 / 15.4 / 19.2 evaluations per layer at 2,000 / 4,000 /
    10,097 rows, but their smaller batches cost about what they saved: two threads, alternating,
    2.07-2.66 s at 2,000 rows for all three schemes, 3.62-4.58 s at 4,000, 10.06-11.77 s at
    10,097, no scheme ahead at every size. So batched groups use a stride of two. Where every
    group is one layer there is no batch to shrink: a stride of four took 21.2 evaluations per
    layer instead of 23.8 at 100,970 rows (all 30 layers; 29.4 and 31.1 s instead of 32.0 and
    33.6 s, alternating, two cores). Re-measured with the AVX2 paths forced (2,000 rows, two
    threads, medians of five alternating runs): 1.08, 1.09 and 1.13 s for strides two, four and
    eight. MLP probes have no start.

    Example:
        >>> _phases(10, mlp=False, stride=4)
        [[0, 4, 8, 9], [2, 6], [1, 3, 5, 7]]
    """
    if mlp or n_layers < 3:
        return [list(range(n_layers))]
    done = sorted({*range(0, n_layers, stride), n_layers - 1})
    phases = [done]
    while stride > 1:
        stride //= 2
        phase = [layer for layer in range(stride, n_layers, 2 * stride) if layer not in done]
        if phase:
            phases.append(phase)
            done = sorted({*done, *phase})
    return phases


def _sources(phases: list[list[int]]) -> dict[int, tuple[int, int]]:
    """For each layer after the first phase, the nearest layers below and above it in earlier
    phases: its fit starts from theirs, interpolated (see :func:`_start`)."""
    sources: dict[int, tuple[int, int]] = {}
    earlier = list(phases[0]) if phases else []
    for phase in phases[1:]:
        for layer in phase:
            below = max(e for e in earlier if e < layer)
            above = min(e for e in earlier if e > layer)
            sources[layer] = (below, above)
        earlier += phase
    return sources


def _start(
    fits: dict[int, tuple[torch.Tensor, torch.Tensor]],
    layers: list[int],
    sources: dict[int, tuple[int, int]],
) -> LogisticFit | None:
    """Each layer's start: its sources' fits interpolated linearly in the layer index (their
    mean for a layer halfway), or None unless every layer has both sources fitted."""
    if not all(layer in sources and set(sources[layer]) <= fits.keys() for layer in layers):
        return None
    weights, biases = [], []
    for layer in layers:
        below, above = sources[layer]
        t = (layer - below) / (above - below)
        (w0, b0), (w1, b1) = fits[below], fits[above]
        weights.append(torch.lerp(w0, w1, t))
        biases.append(torch.lerp(b0, b1, t))
    return LogisticFit(weight=torch.stack(weights), bias=torch.stack(biases), n_iter=0)


def _group_size(values: torch.Tensor, n_train: int, workers: int = 1) -> int:
    """Layers fitted together: as many as fit a worker's share of ``_GROUP_BYTES`` of gathered
    training rows.

    Memory stays bounded for large activation sets, and the buffers are reused from group to
    group: on the benchmark (16k x 576 training rows per layer) 3 layers at a time take 2.9 s
    where all 30 at once take 3.5 s, most of the difference paging in a fresh 1.1 GB copy.
    """
    per_layer = n_train * values.shape[2] * gathered_dtype(values.dtype).itemsize
    share = _GROUP_BYTES // workers // max(per_layer, 1)
    return max(1, min(values.shape[1], share))


def _parts(phases: list[list[int]], group: int, workers: int) -> list[list[int]]:
    """Each phase cut into groups of at most ``group`` layers, and into at least ``workers``
    groups where it has that many layers, so that every worker has a group to fit."""
    parts = []
    for phase in phases:
        size = min(group, -(-len(phase) // workers))  # ceil: as even as the phase allows
        parts += [phase[i : i + size] for i in range(0, len(phase), size)]
    return parts


def _one_type_per_class(groups: np.ndarray, y_idx: np.ndarray) -> bool:
    """Whether every class holds exactly one word type and every type one class: then Hewitt &
    Liang's control labels are a function of the task labels, learnt exactly as well."""
    _, types = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    pairs = np.unique(np.stack([types.ravel(), y_idx]), axis=1)
    return pairs.shape[1] == len(np.unique(types)) == len(np.unique(y_idx))


def _workers(n_layers: int, mlp: bool) -> int:
    """Groups of layers fitted at once: two where torch has two or more threads, else one.

    Each group runs on half of torch's threads. The small products of a batched fit use two
    threads poorly, and the optimiser's own work between them (triangular solves, the bias's
    Newton steps, the line search) runs on one: on two cores of the AVX-512 EPYC, SmolLM2's POS
    activations (30 layers x 576), medians of five alternating runs, each phase split between two
    workers took 1.01 s instead of 1.13 s at 2,000 rows, 1.84 s instead of 2.04 s at 4,000 and
    3.99 s instead of 4.70 s at 10,097 (groups of three layers there). Where every
    group is one layer (more than ~18k rows of 576 features), one layer's products with
    ``[n, 576] x [576, K]`` at ~80k rows run at about a third of the memory bandwidth on two
    threads (the narrow kernel bounds them, not memory): 4.95 s instead of 6.41 s for four layers
    of 80,776 real rows (8.49 s on one thread), 34-36 s instead of 43 s for all 30 layers of
    100,970 rows, where the two buffers took +757 MiB instead of +402 MiB beside a 3.2 GiB
    float16 memory map. MLP probes train on minibatches in one group.
    """
    if n_layers < 2 or torch.get_num_threads() < 2 or mlp:
        return 1
    return _WORKERS


class _Buffers(threading.local):
    """Gathered ``(train, test)`` rows of the largest group a thread fitted, reused for its next."""

    def __init__(self) -> None:
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None


def _in_order(
    work: Callable[[list[int]], T],
    parts: list[list[int]],
    workers: int,
    sources: dict[int, tuple[int, int]],
) -> Iterator[T]:
    """``work(part)`` for each part, in order; with several workers, on a thread pool.

    Each worker runs torch ops on ``threads // workers`` threads (restored afterwards). A part
    whose layers start from other layers' fits (their ``sources``, see :func:`_start`) waits for
    the parts holding those, so every layer gets the start it gets in order: results do not
    depend on the scheduling.
    """
    if workers == 1:
        yield from map(work, parts)
        return
    threads = torch.get_num_threads()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="mechprobe-probe")
    torch.set_num_threads(max(1, threads // workers))
    try:
        holder: dict[int, Future[T]] = {}
        futures = []
        for part in parts:
            needs = [
                holder[source]
                for layer in part
                for source in sources.get(layer, ())
                if source in holder
            ]
            # Each task in a copy of the caller's context: a solver_path() block around the call
            # holds in the workers too (a pool thread starts with an empty context).
            future = pool.submit(contextvars.copy_context().run, _after, needs, work, part)
            futures.append(future)
            holder.update(dict.fromkeys(part, future))
        for future in futures:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _after(needs: list[Future[Any]], work: Callable[[list[int]], T], part: list[int]) -> T:
    for future in needs:  # submitted earlier, so running or done: waiting cannot deadlock
        future.result()
    return work(part)


def _on(labels: np.ndarray, values: torch.Tensor) -> torch.Tensor:
    """Label indices as a tensor beside the activations (a GPU's, where they live there)."""
    return torch.from_numpy(labels).to(values.device)


def _fit_and_score(
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    y_train: torch.Tensor,
    y_test: torch.Tensor,
    n_classes: int,
    l2: float,
    max_iter: int,
    tol: float,
    mlp: _MLPSettings | None,
    moments: tuple[torch.Tensor, torch.Tensor] | None,
    layers: list[int],
    fits: dict[int, tuple[torch.Tensor, torch.Tensor]],
    sources: dict[int, tuple[int, int]],
    late: list[int],
) -> np.ndarray:
    """``[layers]`` held-out accuracy of per-layer probes fitted together.

    ``mlp``: the MLP probes' settings, or None for linear probes (fitted with ``l2``,
    ``max_iter`` and ``tol``). ``moments``: ``(mean, scale)`` when the training rows are raw,
    for the linear fit to standardise inside its products (``test_x`` is standardised either
    way). Linear fits start
    from their ``sources``' entries in ``fits`` where there are both, and add their own. Layers
    whose fit did not converge are appended to ``late`` (the caller warns, on its own thread).
    """
    if mlp is not None:
        unfinished: list[int] = []
        params, _ = mlp.train(train_x.float(), y_train, n_classes, unfinished=unfinished)
        late += [layers[i] for i in unfinished]
        predicted = _mlp_logits(test_x.float(), params, relu=mlp.rank is None).argmax(-1)
    else:
        fit = fit_logistic(
            train_x, y_train, n_classes, l2=softmax_penalty(l2, n_classes), max_iter=max_iter,
            tol=tol,
            center=None if moments is None else moments[0],
            scale=None if moments is None else moments[1],
            start=_start(fits, layers, sources), layer_names=layers, warn=False,
        )  # fmt: skip
        late += fit.unfinished
        fits.update(zip(layers, zip(fit.weight, fit.bias, strict=True), strict=True))
        predicted = fit.predict(test_x)
    return (predicted == y_test).double().mean(1).cpu().numpy()
