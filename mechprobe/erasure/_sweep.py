"""Layer sweep of amnesic probing: fit an erasure at each layer in turn, measure what each costs.

:func:`layer_sweep` collects the concept's activations at every chosen layer in one pass, fits one
eraser per layer (INLP or LEACE), and runs :func:`mechprobe.amnesic` at each layer with the same
evaluation data and the same random controls of equal rank. :class:`ErasureSweep` plots the
effect of the real erasure and of the controls against the layer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from mechprobe.core import (
    Layers,
    Result,
    SiteLike,
    check_seed,
    evaluates,
    expand_sites,
    new_axes,
    positions_text,
    progress_bar,
    warn,
    writer_positions,
)
from mechprobe.erasure._amnesic import amnesic
from mechprobe.erasure._eraser import Eraser
from mechprobe.erasure._information import ProbeData
from mechprobe.erasure._inlp import inlp
from mechprobe.erasure._leace import leace
from mechprobe.erasure._metrics import ErasePositions
from mechprobe.erasure._result import _ONE_PANEL_ORDER, AmnesicResult
from mechprobe.probing import ProbingDataset, collect
from mechprobe.tasks import Task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["ErasureSweep", "fit_erasure", "layer_sweep"]

Method = Literal["inlp", "leace", "leace-orth"]
_KINDS = ("resid_pre", "resid_mid", "mlp_in", "resid_post", "attn_out", "mlp_out")
#: The location columns of every result's frame, in order (AmnesicResult._erased_site's keys).
_WHERE = ("site", "kind", "layer", "head", "hook")
_METRICS = _ONE_PANEL_ORDER
_TITLES = {
    "lm_kl": "KL(intact || erased) on text",
    "lm_accuracy": "next-token accuracy drop",
    "task_accuracy": "task accuracy drop",
    "task_kl": "KL at the answer position",
    "probe_accuracy": "linear probe accuracy at the erased layer",
}


def fit_erasure(
    X: Any, y: Any, method: Method = "inlp", *, seed: int = 0, **options: Any
) -> Eraser:
    """Fit ``inlp`` (Elazar et al.'s stopping rule by default), ``leace`` or ``leace-orth``
    (:func:`mechprobe.leace` with ``method="orth"``) on ``X [n, d]``, ``y [n]``.

    Options go to :func:`mechprobe.inlp` / :func:`mechprobe.leace`; INLP defaults to
    ``n_iterations=20, stop="majority"``, without a progress bar. ``method`` here names the
    eraser, so leace's own ``method="orth"`` is asked for as ``"leace-orth"`` (passed beside
    ``"leace"`` it is Python's "multiple values for argument 'method'").

    Args:
        X: ``[n, d]`` features (a numpy array or torch tensor).
        y: ``[n]`` class labels.
        method: ``"inlp"``, ``"leace"`` or ``"leace-orth"``.
        seed: INLP's seed (LEACE is closed-form and draws nothing).
        **options: Keyword arguments of :func:`mechprobe.inlp` or :func:`mechprobe.leace`
            (INLP's replace its defaults above; LEACE ignores ``progress``).

    Returns:
        The fitted :class:`Eraser` for ``d``-wide vectors.

    Raises:
        ValueError: ``method`` is none of the three.

    Example:
        >>> import torch
        >>> X = torch.randn(400, 8); y = (X[:, 0] > 0).long()
        >>> fit_erasure(X, y, "leace").n_removed
        1
    """
    seed = check_seed(seed)
    if method == "inlp":
        opts: dict[str, Any] = {"n_iterations": 20, "stop": "majority", "progress": False}
        opts |= {"seed": seed} | options
        return inlp(X, y, **opts)
    if method in ("leace", "leace-orth"):
        # LEACE is closed-form: no draws, no iterations; the API-wide words are accepted.
        opts = {k: v for k, v in options.items() if k not in ("progress", "seed")}
        return leace(X, y, method="orth" if method == "leace-orth" else "leace", **opts)
    raise ValueError(f"method must be 'inlp', 'leace' or 'leace-orth', got {method!r}.")


def _joined(values: Iterable[str]) -> str:
    """The distinct non-empty values, in order of first appearance, joined by ", "."""
    return ", ".join(dict.fromkeys(v for v in values if v))


@dataclass(frozen=True, eq=False, repr=False)  # as every result (hashable, by identity)
class ErasureSweep(Result, format="mechprobe.ErasureSweep", version=2, html_figure=True):
    """One :class:`AmnesicResult` per erased site (a layer sweep).

    Attributes:
        method: The erasure's method (``"inlp"`` or ``"leace"``), fitted at every site.
        results: One :class:`AmnesicResult` per erased site, in the order erased.

    Example:
        >>> ErasureSweep(method="inlp", results=()).to_frame().empty
        True
    """

    method: str
    results: tuple[AmnesicResult, ...]

    @property
    def layers(self) -> list[int | None]:
        """The erased layer of each result, in order."""
        return [r.layer for r in self.results]

    @property
    def model_name(self) -> str:
        """The model the erasures were made on (its results' ``model_name``; several, if the
        results were made on several, joined by ", ")."""
        return _joined(r.model_name for r in self.results)

    @property
    def model_dtype(self) -> str:
        """The model's dtype in the erasures (its results' ``model_dtype``, joined as
        :attr:`model_name`)."""
        return _joined(r.model_dtype for r in self.results)

    def to_frame(self) -> pd.DataFrame:
        """Every measure of every erasure: the results' :meth:`AmnesicResult.to_frame` one
        after another (each row says its erased ``site``, ``kind``, ``layer``, ``head``,
        ``hook``, ``method``, ``n_removed`` and ``positions``, then the probe's ``probe_site``
        apart).

        Example:
            >>> ErasureSweep(method="inlp", results=()).to_frame().columns.tolist()[:7]
            ['site', 'kind', 'layer', 'head', 'hook', 'method', 'n_removed']
        """
        frames = [r.to_frame() for r in self.results]
        if not frames:
            empty = AmnesicResult("", None, "all", self.method, 0, 0, ())
            return empty.to_frame()
        return pd.concat(frames, ignore_index=True)

    def effects(self) -> pd.DataFrame:
        """Per erasure and metric: the erasure's ``effect``, the random controls'
        (``random_effect``, ``random_effect_std`` over seeds) and dropout's
        (``dropout_effect``); each row leads with the erased site's columns (``site``,
        ``kind``, ``layer``, ``head``, ``hook``, as in :meth:`to_frame`), ``n_removed`` and
        ``positions``."""
        rows = []
        for r in self.results:
            where = r._erased_site()
            for metric in sorted({m.metric for m in r.measures}):
                # Probe accuracy at the erased site, linear probe (as AmnesicResult.selectivity).
                kw: dict[str, Any] = r._at_site() if metric == "probe_accuracy" else {}
                real, _ = r.effect(metric, "erased", **kw)
                if real is None:
                    continue
                rand, rand_std = r.effect(metric, "random", **kw)
                drop, _ = r.effect(metric, "dropout", **kw)
                at = [r.n_removed, positions_text(r.positions), metric]
                rows.append([*(where[c] for c in _WHERE), *at, real, rand, rand_std, drop])
        effects = ["effect", "random_effect", "random_effect_std", "dropout_effect"]
        cols = [*_WHERE, "n_removed", "positions", "metric", *effects]
        frame = pd.DataFrame(rows, columns=cols)
        for col in ("layer", "head"):
            frame[col] = pd.array(frame[col].tolist(), dtype="Int64")
        return frame

    def summary(self) -> pd.DataFrame:
        """The :meth:`effects` table: per erasure and metric, the erasure's effect beside its
        controls'."""
        return self.effects()

    def _describe(self) -> str:
        layers = [lay for lay in self.layers if lay is not None]
        span = f"layers {min(layers)}-{max(layers)}" if layers else "no layer"
        return f"{self.method}, {len(self.results)} erasure(s), {span}"

    def plot(self, ax: Axes | None = None, *, metric: str | None = None) -> Figure:
        """Effect against layer per metric: erasure, random control (mean ± std band), dropout.

        With ``ax`` (or ``metric``), one panel: ``metric``, by default the first measured.

        Args:
            ax: Draw one panel into these axes (default: a new figure, one panel per measured
                metric).
            metric: The metric of the one panel (None: the first measured).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: Nothing measured to plot, or a ``metric`` not measured here.
        """
        metrics = [m for m in _METRICS if any(len(r.values(m, "erased")) for r in self.results)]
        if not metrics:
            raise ValueError("This sweep holds no measures to plot.")
        if metric is not None and metric not in metrics:
            raise ValueError(f"metric must be one of {metrics} (measured here), got {metric!r}.")
        x = np.asarray([np.nan if lay is None else lay for lay in self.layers], dtype=float)
        if ax is not None or metric is not None:
            figure, ax = new_axes(ax, (4.0, 3.4))
            self._panel(ax, metric or metrics[0], x)
            ax.set_title(f"{self.method}: {ax.get_title()}", fontsize=10)  # as the suptitle said
            return figure
        from matplotlib.figure import Figure

        fig = Figure(figsize=(3.6 * len(metrics), 3.4))
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
        for panel_ax, name in zip(axes, metrics, strict=True):
            self._panel(panel_ax, name, x)
        ranks = sorted({r.n_removed for r in self.results})
        rank = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}-{ranks[-1]}"
        # Counted as the panels read them (probe accuracy: one value per probed site and seed)
        n_random = max(
            len(r.values("probe_accuracy", "random", **r._at_site()))
            if metrics[0] == "probe_accuracy"
            else len(r.values(metrics[0], "random"))
            for r in self.results
        )
        fig.suptitle(
            f"{self.method} erasure ({rank}), layer by layer; random controls: {n_random} a layer",
            fontsize=10,
        )
        fig.tight_layout()
        return fig

    def _panel(self, ax: Any, metric: str, x: np.ndarray) -> None:
        if metric == "probe_accuracy":
            self._probe_panel(ax, x)
        else:
            # Markers apart: near 0 the random and dropout lines lay on each other.
            for condition, colour, marker in (
                ("erased", "#c44e52", "o"),
                ("random", "#8c8c8c", "s"),
                ("dropout", "#dd8452", "^"),
            ):
                stats = [r.effect(metric, condition) for r in self.results]
                mean = np.asarray([np.nan if m is None else m for m, _ in stats])
                std = np.asarray([0.0 if s is None else s for _, s in stats])
                if np.isnan(mean).all():
                    continue
                ax.plot(x, mean, marker=marker, color=colour, label=condition, alpha=0.85)
                if condition == "random":  # the band named: it read as a confidence interval
                    ax.fill_between(
                        x, mean - std, mean + std, color=colour, alpha=0.25, label="random ± std"
                    )
            ax.axhline(0, color="black", lw=0.6)
            ax.set_ylabel("nats" if metric.endswith("kl") else "accuracy drop", fontsize=8)
        ax.set_xlabel("erased layer")
        measured = sorted({int(v) for v in x[np.isfinite(x)]})
        if 0 < len(measured) <= 12:  # the layers erased, not 6, 9, ... between layers 5 and 14
            ax.set_xticks(measured)
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_TITLES.get(metric, metric), fontsize=10)
        ax.legend(fontsize=7)

    def _probe_panel(self, ax: Any, x: np.ndarray) -> None:
        for condition, colour in (
            ("intact", "#4c72b0"),
            ("erased", "#c44e52"),
            ("random", "#8c8c8c"),
        ):
            vals = [
                r.mean_std("probe_accuracy", condition, **r._at_site())[0] for r in self.results
            ]
            ax.plot(
                x,
                [np.nan if v is None else v for v in vals],
                marker="o",
                color=colour,
                label=condition,
            )
        majority = [r.majority_baseline for r in self.results]
        if any(m is not None for m in majority):
            ax.plot(
                x, [np.nan if m is None else m for m in majority], "k--", lw=0.8, label="majority"
            )
        ax.set_ylim(0, 1.05)


@evaluates
def layer_sweep(
    model: Any,
    data: ProbingDataset | Task,
    layers: Layers = "all",
    method: Method = "inlp",
    *,
    sites: SiteLike | Sequence[SiteLike] = "resid_post",
    text: Sequence[str] | None = None,
    task: Task | str | None = None,
    probe: ProbeData | None = None,
    positions: ErasePositions = -1,
    n_random: int = 3,
    random_directions: Literal["sphere", "cube"] = "sphere",
    mlp: bool = False,
    fit_options: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
    kind: str | None = None,
) -> ErasureSweep:
    """Erase the concept of ``data`` at each of ``sites`` in turn and measure each erasure.

    Activations of ``data`` (its own positions: the last token for text-level data) are
    collected at every site in one pass; an eraser is fitted per site with ``method`` and
    evaluated with :func:`mechprobe.amnesic` (same text, task, probe data and controls).

    Args:
        model: A TransformerLens model.
        data: Labelled data for fitting the erasure (e.g. ``country_dataset()``).
        layers: Layers to erase at, one at a time (an int, a range, a list or ``"all"``, the
            default, as everywhere in the API).
        method: ``"inlp"``, ``"leace"`` or ``"leace-orth"`` (as :func:`fit_erasure`).
        sites: The site kind erased at each of ``layers`` (``resid_post``, ``mlp_out``, ...), or
            Sites / hook names, each at its own layer (``layers`` chooses the layers of kinds
            only, and is refused where no entry is a kind).
        text, task, probe: Evaluation data, as for :func:`mechprobe.amnesic`; ``probe`` is only
            probed at the erased layer (pass ``data`` itself to check the erasure holds).
        positions: Positions erased (default ``-1``: each prompt's last token, where
            text-level ``data`` is read and the erasure was fitted; ``"all"`` erases everywhere,
            and is the only choice for word-level ``data``, read at every word).
        n_random: Random controls of equal rank per layer.
        random_directions: ``"sphere"`` (uniform subspaces, the default) or ``"cube"`` (Elazar
            et al.'s draw), as for :func:`mechprobe.amnesic`.
        mlp: Also fit MLP probes (as for :func:`mechprobe.amnesic`, where it is on by default;
            off here, as a sweep fits them again at every site).
        fit_options: Options for :func:`fit_erasure`.
        seed: Seed of the fits, controls and probe split.
        batch_size: Prompts per forward pass (None: all at once).
        progress: Progress bar over the erased sites.
        kind: Deprecated name of ``sites`` (one release).

    Returns:
        An :class:`ErasureSweep` (``method``), with one :class:`AmnesicResult` per erased site,
        in the order of ``sites`` and ``layers``.

    Raises:
        ValueError: An unknown ``method``; none of ``text``, ``task`` and ``probe``; word-level
            ``data`` with positions other than ``"all"``; ``fit_options`` naming ``method``; or
            ``data`` without labels.

    Example:
        >>> import mechprobe as mp
        >>> data = mp.ProbingDataset("toy", ["ab", "ba", "aa", "bb"] * 5, ["x", "y", "x", "y"] * 5)
        >>> sweep = layer_sweep(mp.tiny_model(), data, [0, 2], "leace", text=["abab"], n_random=1,
        ...                     progress=False)
        >>> sweep.layers
        [0, 2]
    """
    if kind is not None:
        warn(
            "layer_sweep(kind=...) is deprecated: say sites=... (removed in the next release).",
            DeprecationWarning,
        )
        sites = kind
    # Everything checkable before the collection and the first fit, which cost the most.
    if method not in ("inlp", "leace", "leace-orth"):
        raise ValueError(f"method must be 'inlp', 'leace' or 'leace-orth', got {method!r}.")
    if text is None and task is None and probe is None:
        raise ValueError("Nothing to measure: pass text=[...], task='capitals' and/or probe=data.")
    seed = check_seed(seed)
    positions = writer_positions(positions, "layer_sweep")  # warns under its own name
    if getattr(data, "level", "text") == "word" and positions != "all":
        # Its rows are every word's last token: fitted there, erased at one position a text,
        # the KL and task numbers measured an erasure of almost nothing, without a word.
        where = "each text's last token" if positions == -1 else "those positions"
        raise ValueError(
            f"data {getattr(data, 'name', '')!r} is word-level: the eraser is fitted on every "
            f"word, but positions={positions!r} erases only {where}. Pass positions='all' (as "
            "Elazar et al. erase word-level concepts), or text-level data."
        )
    options = dict(fit_options or {})
    if "method" in options:  # else Python's "got multiple values for argument 'method'"
        raise ValueError(
            f"fit_options holds method={options['method']!r}: the erasure method is "
            "layer_sweep's method= argument ('inlp', 'leace', or 'leace-orth' for LEACE's "
            "method='orth')."
        )
    fit_seed = options.pop("seed", seed)  # a seed among the fit options is the fits' own
    found = expand_sites(model, sites, layers=layers, kinds=_KINDS, layers_name="layers")
    for site in found:
        if site.positions is not None:
            raise ValueError(
                f"{site} carries positions; layer_sweep() takes positions= itself: pass "
                f"Site({site.kind!r}, {site.layer}) and positions={site.positions!r}."
            )
    acts = collect(model, data, found, batch_size=batch_size, progress=False)
    if acts.labels is None:
        raise ValueError("The sweep data has no labels: pass a labelled ProbingDataset or Task.")
    results = []
    for j, site in enumerate(progress_bar(found, progress=progress, desc=f"{method} sweep")):
        eraser = fit_erasure(acts.layer(j), acts.labels, method, seed=fit_seed, **options)
        results.append(
            amnesic(
                model,
                site,
                eraser,
                text=text,
                task=task,
                probe=probe,
                probe_layers=[site.layer],
                positions=positions,
                n_random=n_random,
                random_directions=random_directions,
                mlp=mlp,
                seed=seed,
                batch_size=batch_size,
                progress=False,
            )
        )
    return ErasureSweep(method, tuple(results))
