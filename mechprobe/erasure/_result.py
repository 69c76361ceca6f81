"""What amnesic probing measured: :class:`AmnesicResult`, one row (:class:`AmnesicMeasure`) per number.

Every number :func:`mechprobe.amnesic` computes is an :class:`AmnesicMeasure`: a metric
(``lm_accuracy``, ``lm_loss``, ``lm_kl``, ``task_accuracy``, ``task_logprob``, ``task_kl``,
``probe_accuracy``), the condition it was measured under (``intact``: the unmodified model;
``erased``: the eraser hooked in; ``random``: a random eraser of the same rank, one row per seed; ``dropout``: the
same number of coordinates zeroed) and, for probes, where the probe read and which probe it was.

*Effect* of a condition on a metric is how much worse it makes the model: the drop of an accuracy
or log-probability, the rise of a loss, the KL itself. *Selectivity* (Elazar et al. 2021) is the
effect of the real erasure minus the mean effect of the random control.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mechprobe.core import Result, new_axes, positions_text, site_columns

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AmnesicMeasure", "AmnesicResult"]

#: Metrics where higher is better: their effect is ``intact - condition``.
_HIGHER_IS_BETTER = {"lm_accuracy", "task_accuracy", "task_logprob", "probe_accuracy"}
#: Metrics that already compare with the intact run (a divergence): their effect is the value.
_DIVERGENCES = {"lm_kl", "task_kl"}
_CONDITIONS = ("intact", "erased", "random", "dropout")
_COLOURS = {"intact": "#4c72b0", "erased": "#c44e52", "random": "#8c8c8c", "dropout": "#dd8452"}
_PANELS = ("lm_accuracy", "lm_kl", "task_accuracy", "task_kl")
#: The metric a one-panel figure (``plot(ax=...)``) draws by default, the first measured of these:
#: the same in AmnesicResult and ErasureSweep (one drew lm KL, the other task accuracy).
_ONE_PANEL_ORDER = ("task_accuracy", "task_kl", "lm_kl", "lm_accuracy", "probe_accuracy")


@dataclass(frozen=True, repr=False)
class AmnesicMeasure:
    """One measured number (a record: one row of :meth:`AmnesicResult.to_frame`).

    Attributes:
        metric: ``lm_accuracy``, ``lm_loss``, ``lm_kl``, ``task_accuracy``, ``task_logprob``,
            ``task_kl`` or ``probe_accuracy``.
        condition: ``intact`` (``original`` in files saved before, read as ``intact``),
            ``erased``, ``random`` or ``dropout``.
        value: The number.
        seed: Seed of a ``random`` or ``dropout`` control, else None.
        site: Hook name a probe read (``probe_accuracy`` only; the frame's ``probe_site`` says
            it as a label, beside the erased ``site``).
        probe: ``"linear"`` or ``"mlp"`` (``probe_accuracy`` only).

    Example:
        >>> AmnesicMeasure("lm_kl", "random", 0.25, seed=1)
        AmnesicMeasure(lm_kl, random, 0.25, seed=1)
    """

    metric: str
    condition: str
    value: float
    seed: int | None = None
    site: str | None = None
    probe: str | None = None

    def __post_init__(self) -> None:
        # Files saved before the unedited run was "intact" in every frame called it "original".
        if self.condition == "original":
            object.__setattr__(self, "condition", "intact")

    def __repr__(self) -> str:
        extra = "".join(
            f", {f.name}={getattr(self, f.name)}"
            for f in fields(self)[3:]
            if getattr(self, f.name) is not None
        )
        return f"AmnesicMeasure({self.metric}, {self.condition}, {self.value:.4g}{extra})"


# eq=False as every result: a dict field made the generated __hash__ raise, and NaN != NaN
# made a result with a NaN measure unequal to its own loaded copy.
@dataclass(frozen=True, eq=False, repr=False)
class AmnesicResult(Result, format="mechprobe.AmnesicResult", version=2, html_figure=True):
    """What erasing a concept at one site costs the model, beside random controls of equal rank.

    Attributes:
        site: Hook name where the eraser was applied.
        layer: Its block index (None for a hook outside the blocks).
        positions: Positions erased (``"all"``; an int or ints: negative from each row's last
            real token).
        method: The eraser's method (``inlp``, ``leace``, ...).
        n_removed: Directions it erases; every control erases as many.
        dim: Width of the site.
        measures: Every number, one :class:`AmnesicMeasure` each.
        majority_baseline: Held-out accuracy of predicting the most frequent concept label (the
            floor a guarded linear probe should fall to), or None without probing.
        counts: How much was evaluated: ``text_tokens`` (predictions with a next token: what
            ``lm_accuracy`` and ``lm_loss`` average over), ``kl_tokens`` (what ``lm_kl``
            averages over: also the last erased token, whose next-token prediction an erasure
            at ``-1`` changes), ``task_items``, ``probe_examples``.
        seed: The seed the call took (None in files saved before results recorded it).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        probe_hook: The hook whose probe reports the erased site itself (:meth:`selectivity`,
            :meth:`headline`): ``site`` for a whole site; for a head, whose site has no
            activation of its own to probe, the residual stream after its layer. None (files
            saved before it existed): ``site``, or for a head the first site probed.

    Saved as JSON, the record starts with the headline numbers of :meth:`headline` (what
    ``mechprobe erase`` prints), then every field.

    Example:
        >>> import mechprobe as mp
        >>> r = AmnesicResult("blocks.0.hook_resid_post", 0, "all", "inlp", 2, 8,
        ...     (AmnesicMeasure("lm_accuracy", "intact", 0.5), AmnesicMeasure("lm_accuracy", "erased", 0.3),
        ...      AmnesicMeasure("lm_accuracy", "random", 0.45, seed=0)))
        >>> round(r.effect("lm_accuracy", "erased")[0], 2), round(r.selectivity()["lm_accuracy"], 2)
        (0.2, 0.15)
    """

    site: str
    layer: int | None
    positions: int | tuple[int, ...] | str
    method: str
    n_removed: int
    dim: int
    measures: tuple[AmnesicMeasure, ...]
    majority_baseline: float | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seed: int | None = None
    model_name: str = ""
    model_dtype: str = ""
    probe_hook: str | None = None

    # --- reading numbers -----------------------------------------------------------------------

    def values(
        self, metric: str, condition: str, *, site: str | None = None, probe: str | None = None
    ) -> np.ndarray:
        """All values of ``metric`` under ``condition`` (one per seed for the controls).

        Args:
            metric: A measured metric (``lm_accuracy``, ``lm_kl``, ``task_accuracy``,
                ``probe_accuracy``...; see :class:`AmnesicMeasure`).
            condition: ``intact``, ``erased``, ``random`` or ``dropout``.
            site: Only the probe readings of this hook name (None: every site).
            probe: Only those of this probe, ``"linear"`` or ``"mlp"`` (None: every probe).

        Returns:
            ``[n]`` float64 array, in the order measured (empty where nothing matches).

        Raises:
            ValueError: A condition that is none of ``intact``, ``erased``, ``random``,
                ``dropout`` (code written for ``"original"`` read nothing, without a word).
        """
        if condition not in _CONDITIONS:
            old = " ('original' is now 'intact')" if condition == "original" else ""
            raise ValueError(
                f"condition must be one of {list(_CONDITIONS)}, got {condition!r}{old}."
            )
        return np.asarray(
            [
                m.value
                for m in self.measures
                if m.metric == metric
                and m.condition == condition
                and (site is None or m.site == site)
                and (probe is None or m.probe == probe)
            ],
            dtype=np.float64,
        )

    def mean_std(
        self, metric: str, condition: str, *, site: str | None = None, probe: str | None = None
    ) -> tuple[float | None, float | None]:
        """``(mean, std)`` over seeds (std NaN for a single value, where a spread is undefined;
        ``(None, None)`` if unmeasured).

        Args:
            metric: A measured metric, as for :meth:`values`.
            condition: ``intact``, ``erased``, ``random`` or ``dropout``.
            site: Only the probe readings of this hook name (None: every site).
            probe: Only those of this probe (None: every probe).

        Returns:
            ``(mean, std)`` of the matching values (sample standard deviation, ``ddof=1``).
        """
        vals = self.values(metric, condition, site=site, probe=probe)
        if len(vals) == 0:
            return None, None
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan

    def effect(
        self, metric: str, condition: str, *, site: str | None = None, probe: str | None = None
    ) -> tuple[float | None, float | None]:
        """``(mean, std)`` of how much worse ``condition`` makes ``metric`` than the intact run.

        Accuracies and log-probabilities: ``intact - condition``; losses: ``condition -
        intact``; KL divergences: the value itself.

        Args:
            metric: A measured metric, as for :meth:`values`.
            condition: The condition compared with the intact run (``erased``, ``random`` or
                ``dropout``).
            site: Only the probe readings of this hook name (None: every site).
            probe: Only those of this probe (None: every probe).

        Returns:
            ``(mean, std)`` of the effect over the condition's values (std NaN for one value);
            ``(None, None)`` where the condition, or for a non-KL metric the intact run, is
            unmeasured.
        """
        vals = self.values(metric, condition, site=site, probe=probe)
        if len(vals) == 0:
            return None, None
        if metric not in _DIVERGENCES:
            base, _ = self.mean_std(metric, "intact", site=site, probe=probe)
            if base is None:
                return None, None
            vals = base - vals if metric in _HIGHER_IS_BETTER else vals - base
        return float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else math.nan

    def selectivity(self) -> dict[str, float]:
        """Per behavioural metric: effect of the erasure minus the mean effect of the random control.

        Positive: the real projection hurts more than deleting random directions of equal rank.
        Probe accuracy is reported at the erased site (linear probe). Empty when the analysis
        ran without random controls (``n_random=0``): there is nothing to be selective against.
        """
        out: dict[str, float] = {}
        for metric in sorted({m.metric for m in self.measures}):
            kw: dict[str, Any] = {}
            if metric == "probe_accuracy":
                kw = self._at_site()
            real, _ = self.effect(metric, "erased", **kw)
            rand, _ = self.effect(metric, "random", **kw)
            if real is not None and rand is not None:
                out[metric] = real - rand
        return out

    def _at_site(self, probe: str = "linear") -> dict[str, Any]:
        """The keywords that select the probe reporting the erased site itself."""
        site = self.probe_hook or self.site
        head = "@" in self.site  # a head's label; a whole site is stored as its hook name
        if self.probe_hook is None and head and self.probe_sites:
            # A file saved before probe_hook existed, of a head (whose own label names no probed
            # site): amnesic() probed the head's layer first.
            site = self.probe_sites[0]
        return {"site": site, "probe": probe}

    @property
    def probe_sites(self) -> list[str]:
        """Sites probed for information, in the order measured."""
        return list(dict.fromkeys(m.site for m in self.measures if m.site is not None))

    # --- views ---------------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """One row per measure: where the erasure was, then what was measured there.

        Columns: the erased site as in every result's frame (``site``, its label such as
        ``"resid_post@3"``; ``kind``; ``layer`` and ``head``, ``Int64``; ``hook``), the eraser's
        ``method`` and ``n_removed``, the ``positions`` erased (``"all"``, ``"-1"``), then
        ``metric``, ``condition``, ``seed`` (a control's, ``Int64``, ``<NA>`` else), ``probe_site`` and
        ``probe_layer`` (where a probe read, which may be a later layer than the erased one; None
        and ``<NA>`` on rows without a probe), ``probe``, ``value``.

        Example:
            >>> r = AmnesicResult("blocks.1.hook_resid_post", 1, "all", "inlp", 1, 4, (
            ...     AmnesicMeasure("lm_kl", "erased", 0.1),
            ...     AmnesicMeasure("probe_accuracy", "erased", 0.5,
            ...                    site="blocks.3.hook_resid_post", probe="linear")))
            >>> r.to_frame().columns.tolist()  # doctest: +NORMALIZE_WHITESPACE
            ['site', 'kind', 'layer', 'head', 'hook', 'method', 'n_removed', 'positions',
             'metric', 'condition', 'seed', 'probe_site', 'probe_layer', 'probe', 'value']
            >>> r.to_frame()[["site", "layer", "probe_site", "probe_layer"]].values.tolist()
            [['resid_post@1', 1, None, <NA>], ['resid_post@1', 1, 'resid_post@3', 3]]
        """
        measured = pd.DataFrame(
            [asdict(m) for m in self.measures],
            columns=["metric", "condition", "seed", "site", "probe", "value"],
        )
        # AmnesicMeasure.site (a saved field) is the probe's hook name: labelled here, so files
        # saved before frames used labels read the same.
        probed = [m.site for m in self.measures if m.site is not None]
        where = site_columns(probed)
        labels, layers = iter(where["site"]), iter(where["layer"])
        probe_site = [None if m.site is None else next(labels) for m in self.measures]
        probe_layer = [pd.NA if m.site is None else next(layers) for m in self.measures]
        n = len(self.measures)
        erased = self._erased_site()
        return pd.DataFrame(
            {
                "site": [erased["site"]] * n,
                "kind": [erased["kind"]] * n,
                "layer": pd.array([erased["layer"]] * n, dtype="Int64"),
                "head": pd.array([erased["head"]] * n, dtype="Int64"),
                "hook": [erased["hook"]] * n,
                "method": [self.method] * n,
                "n_removed": [self.n_removed] * n,
                "positions": [positions_text(self.positions)] * n,
                "metric": measured["metric"],
                "condition": measured["condition"],
                # Int64 as every integer column that may be missing (it was float64: 0.0, NaN)
                "seed": pd.array([m.seed for m in self.measures], dtype="Int64"),
                "probe_site": pd.Series(probe_site, dtype=object),
                "probe_layer": pd.array(probe_layer, dtype="Int64"),
                "probe": measured["probe"],
                "value": measured["value"],
            }
        )

    def summary(self) -> pd.DataFrame:
        """Per (metric, probe site, probe, condition): the mean ``value`` and ``value_std`` (over
        the controls' seeds), the ``effect`` and ``effect_std``, after the erasure's columns of
        :meth:`to_frame` (``site`` ... ``positions``).

        Example:
            >>> r = AmnesicResult("blocks.1.hook_resid_post", 1, "all", "inlp", 1, 4,
            ...                   (AmnesicMeasure("lm_kl", "erased", 0.1),))
            >>> r.summary()[["site", "metric", "probe_site", "effect"]].values.tolist()
            [['resid_post@1', 'lm_kl', None, 0.1]]
        """
        frame = self.to_frame()
        first = ["site", "kind", "layer", "head", "hook", "method", "n_removed", "positions"]
        keys = ["metric", "probe_site", "probe_layer", "probe", "condition"]
        rows = []
        # One group per stored probe site (its hook name, which values() selects by; "" for
        # rows without a probe), in the order measured.
        hooks = pd.Series([m.site or "" for m in self.measures], dtype=object)
        grouped = frame.assign(_hook=hooks).fillna({"probe": ""})
        for (metric, hook, probe, condition), group in grouped.groupby(
            ["metric", "_hook", "probe", "condition"], sort=False
        ):
            metric, condition = str(metric), str(condition)
            kw = {"site": str(hook) or None, "probe": str(probe) or None}
            mean, std = self.mean_std(metric, condition, **kw)
            eff, eff_std = self.effect(metric, condition, **kw)
            at = group.iloc[0]
            where = [at["probe_site"], at["probe_layer"], kw["probe"]]
            rows.append([metric, *where, condition, mean, std, eff, eff_std])
        body = pd.DataFrame(rows, columns=[*keys, "value", "value_std", "effect", "effect_std"])
        # As in to_frame: None (not NaN) where no probe read, layers as integers.
        body["probe_site"] = pd.Series([row[1] for row in rows], dtype=object)
        body["probe_layer"] = pd.array(body["probe_layer"].tolist(), dtype="Int64")
        head = frame[first].iloc[:1].reset_index(drop=True)
        lead = head.loc[head.index.repeat(len(body))].reset_index(drop=True)
        return pd.concat([lead, body], axis=1)

    def _erased_site(self) -> dict[str, Any]:
        """The erased site's ``site``, ``kind``, ``layer``, ``head`` and ``hook``."""
        where = {key: values[0] for key, values in site_columns([self.site]).items()}
        if pd.isna(where["layer"]) and self.layer is not None:
            where["layer"] = self.layer  # a hook of no site kind inside a block keeps its block
        return where

    def headline(self) -> dict[str, Any]:
        """The headline numbers, as ``mechprobe erase`` prints them and ``result.json`` starts.

        Keys: ``n_removed``, ``probe_accuracy_before``/``_after``, ``majority_baseline``,
        ``random_control_probe_accuracy``, ``lm_kl``, ``random_control_lm_kl``,
        ``task_accuracy_before``/``_after``, ``random_control_task_accuracy`` and their
        neighbours (None where that evaluation was not run, or not finite), ``*_std`` spreads of
        the random control, and ``selectivity``. Probe numbers are the linear probe's at the
        erased site.

        Example:
            >>> r = AmnesicResult("hook_embed", None, "all", "inlp", 1, 4,
            ...                   (AmnesicMeasure("lm_kl", "erased", 0.1),))
            >>> r.headline()["lm_kl"], r.headline()["task_accuracy_before"]
            (0.1, None)
        """
        at_site, mlp = self._at_site(), self._at_site("mlp")

        def mean(metric: str, condition: str, **kw: Any) -> float | None:
            return _finite(self.mean_std(metric, condition, **kw)[0])

        def std(metric: str, condition: str, **kw: Any) -> float | None:
            return _finite(self.mean_std(metric, condition, **kw)[1])

        return {
            "n_removed": self.n_removed,
            "probe_accuracy_before": mean("probe_accuracy", "intact", **at_site),
            "probe_accuracy_after": mean("probe_accuracy", "erased", **at_site),
            "majority_baseline": _finite(self.majority_baseline),
            "random_control_probe_accuracy": mean("probe_accuracy", "random", **at_site),
            "random_control_probe_accuracy_std": std("probe_accuracy", "random", **at_site),
            "mlp_probe_accuracy_before": mean("probe_accuracy", "intact", **mlp),
            "mlp_probe_accuracy_after": mean("probe_accuracy", "erased", **mlp),
            "lm_accuracy_before": mean("lm_accuracy", "intact"),
            "lm_accuracy_after": mean("lm_accuracy", "erased"),
            "random_control_lm_accuracy": mean("lm_accuracy", "random"),
            "dropout_control_lm_accuracy": mean("lm_accuracy", "dropout"),
            "lm_loss_before": mean("lm_loss", "intact"),
            "lm_loss_after": mean("lm_loss", "erased"),
            "random_control_lm_loss": mean("lm_loss", "random"),
            "lm_kl": mean("lm_kl", "erased"),
            "random_control_lm_kl": mean("lm_kl", "random"),
            "random_control_lm_kl_std": std("lm_kl", "random"),
            "dropout_control_lm_kl": mean("lm_kl", "dropout"),
            "task_accuracy_before": mean("task_accuracy", "intact"),
            "task_accuracy_after": mean("task_accuracy", "erased"),
            "random_control_task_accuracy": mean("task_accuracy", "random"),
            "random_control_task_accuracy_std": std("task_accuracy", "random"),
            "dropout_control_task_accuracy": mean("task_accuracy", "dropout"),
            "task_kl": mean("task_kl", "erased"),
            "random_control_task_kl": mean("task_kl", "random"),
            "selectivity": {k: _finite(v) for k, v in self.selectivity().items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` record: format and version, the :meth:`headline` numbers, then
        every field (which :meth:`load` reads back; the headline is derived from them)."""
        data = super().to_dict()
        head = {k: v for k, v in self.headline().items() if k not in data}
        return {"format": data.pop("format"), "version": data.pop("version"), **head, **data}

    def _describe(self) -> str:
        # The site's label, as the frames write it (the field keeps the hook name).
        at = self._erased_site()["site"]
        words = f"{self.method}, {self.n_removed} of {self.dim} directions at {at}"
        words += f" (positions {positions_text(self.positions)})"
        head = self.headline()
        for key, name in (("lm_kl", "KL"), ("task_accuracy_after", "task accuracy")):
            if head[key] is not None:
                words += f", {name} {head[key]:.3g}"
        if head["probe_accuracy_before"] is not None and head["probe_accuracy_after"] is not None:
            words += (
                f", probe {head['probe_accuracy_before']:.3f} -> {head['probe_accuracy_after']:.3f}"
            )
        return words

    # --- figure --------------------------------------------------------------------------------

    def plot(self, ax: Axes | None = None, *, metric: str | None = None) -> Figure:
        """Bars per behavioural metric (controls as mean ± std) and probe accuracy by layer.

        With ``ax``, only one panel is drawn there: ``metric`` (``lm_accuracy``, ``lm_kl``,
        ``task_accuracy``, ``task_kl`` or ``probe_accuracy``), by default the first measured of
        task accuracy, task KL, LM KL, LM accuracy and probe accuracy (as
        :meth:`ErasureSweep.plot`'s), titled with the method and site.

        Args:
            ax: Draw one panel into these axes (default: a new figure of every panel).
            metric: The panel drawn alone (None: the overview, or with ``ax`` the default panel).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: Nothing measured to plot, or a ``metric`` not measured here.

        Example:
            >>> r = AmnesicResult("hook_embed", None, "all", "inlp", 1, 4,
            ...                   (AmnesicMeasure("lm_kl", "erased", 0.1),))
            >>> len(r.plot().axes)
            1
        """
        panels = [m for m in _PANELS if len(self.values(m, "erased"))]
        probing = bool(self.probe_sites)
        available = panels + (["probe_accuracy"] if probing else [])
        if not available:
            raise ValueError("This result holds no measures to plot; pass text=, task= or probe=.")
        # One panel may show any measured metric; the overview keeps to the _PANELS.
        single = sorted({m.metric for m in self.measures} - {"probe_accuracy"})
        single += ["probe_accuracy"] if probing else []
        if metric is not None and metric not in single:
            raise ValueError(f"metric must be one of {single} (measured here), got {metric!r}.")
        if ax is not None or metric is not None:
            figure, ax = new_axes(ax, (4.5, 3.8))
            chosen = metric or next(m for m in _ONE_PANEL_ORDER if m in available)
            if chosen == "probe_accuracy":
                self._information(ax)
            else:
                self._bars(ax, chosen)
            # One panel among others: it says which erasure it shows (the suptitle did).
            what = f"{self.method} at {self._erased_site()['site']}"
            ax.set_title(f"{what}: {ax.get_title()}" if ax.get_title() else what, fontsize=9)
            return figure
        from matplotlib.figure import Figure

        n = len(available)
        fig = Figure(figsize=(max(6.0, 3.2 * n + (1.5 if probing else 0)), 3.8))
        widths = [1.0] * len(panels) + ([1.8] if probing else [])
        axes = fig.subplots(1, n, squeeze=False, gridspec_kw={"width_ratios": widths})[0]
        for panel_ax, name in zip(axes, panels, strict=False):
            self._bars(panel_ax, name)
        if probing:
            self._information(axes[-1])
        where = {"all": "all positions", -1: "the last token"}.get(
            self.positions, f"positions {self.positions}"
        )
        fig.suptitle(
            f"{self.method} erasure of {self.n_removed}/{self.dim} directions\n"
            f"at {self._erased_site()['site']} ({where})",
            fontsize=10,
        )
        fig.tight_layout()
        return fig

    def _bars(self, ax: Any, metric: str) -> None:
        labels, heights, errors, colours = [], [], [], []
        for condition in _CONDITIONS:
            mean, std = self.mean_std(metric, condition)
            if mean is None or (metric in _DIVERGENCES and condition == "intact"):
                continue
            n_seeds = len(self.values(metric, condition))
            labels.append(condition if n_seeds == 1 else f"{condition}\n(n={n_seeds})")
            heights.append(mean)
            # A spread only where there are several runs (one run's caps of zero height said
            # nothing).
            errors.append(std if n_seeds > 1 and std is not None else np.nan)
            colours.append(_COLOURS[condition])
        bars = ax.bar(range(len(heights)), heights, color=colours)
        several = [i for i, e in enumerate(errors) if np.isfinite(e)]
        if several:
            ax.errorbar(several, [heights[i] for i in several], yerr=[errors[i] for i in several],
                        fmt="none", ecolor="black", capsize=4)  # fmt: skip
        # Values on the bars: a bar of 0 is otherwise indistinguishable from one not measured.
        texts = ax.bar_label(bars, fmt="%.3g", fontsize=7)
        for text, height, error in zip(texts, heights, errors, strict=True):
            if np.isfinite(error):  # above the error bar: on the bar, its cap crossed the text
                text.xy = (text.xy[0], height + error)
        ax.set_xticks(range(len(heights)), labels, fontsize=8)
        ax.set_title(metric.replace("_", " ").replace(" kl", " KL"), fontsize=10)
        ax.set_ylabel(_UNITS.get(metric, metric), fontsize=8)
        if metric.endswith("accuracy"):
            ax.set_ylim(0, 1.1)

    def _information(self, ax: Any) -> None:
        sites = self.probe_sites
        x = np.arange(len(sites))
        for probe, style in (("linear", "-"), ("mlp", ":")):
            # intact last and widest: equal to the random control's, it was drawn under it
            for condition in ("random", "erased", "intact"):
                stats = [
                    self.mean_std("probe_accuracy", condition, site=s, probe=probe) for s in sites
                ]
                if all(mean is None for mean, _ in stats):
                    continue
                mean = np.asarray([np.nan if m is None else m for m, _ in stats])
                spread = np.asarray([0.0 if s is None else s for _, s in stats])
                ax.plot(
                    x,
                    mean,
                    style,
                    marker="o",
                    color=_COLOURS[condition],
                    label=f"{probe}, {condition}",
                    linewidth=2.5 if condition == "intact" else 1.2,
                    zorder=3 if condition == "intact" else 2,
                )
                if condition == "random":
                    ax.fill_between(
                        x, mean - spread, mean + spread, color=_COLOURS[condition], alpha=0.2
                    )
        if self.majority_baseline is not None:
            ax.axhline(self.majority_baseline, color="black", ls="--", lw=0.8, label="majority")
        ax.set_xticks(x, [_short(s) for s in sites], fontsize=8, rotation=45)
        ax.set_ylim(0, 1.05)
        ax.set_title("information: probe accuracy after erasure", fontsize=10)
        ax.set_ylabel("held-out probe accuracy", fontsize=8)
        # Below the panel: inside, it covered the erased site's drop (lower left, where it is).
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)


#: The y axis of each metric's panel.
_UNITS = {
    "lm_accuracy": "next-token top-1 accuracy",
    "lm_kl": "KL to the intact run (nats)",
    "task_accuracy": "answer top-1 accuracy",
    "task_kl": "KL to the intact run (nats)",
    "task_logprob": "answer log-probability",
}


def _short(site: str) -> str:
    parts = site.split(".")
    return f"L{parts[1]}" if len(parts) > 2 and parts[0] == "blocks" else site


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
