"""The result of :func:`mechprobe.relational_analysis`: a folder of result.json, figures and a report.

``result.json`` starts with the format tag and version, then the headline keys (``task, kind,
n_items, accuracy, argument_layer, function_layer, saturation_layer``, an ``intervention`` object
and a ``controls`` object mapping ``random``, ``other_task`` and ``intact`` to objects of the same
shape: ``layers, scale, top1_before, top1_after, mean_rank_before, mean_rank_after,
no_effect_rate`` and more), then ``details``: every field of the result through the one serialiser
(per-item numbers, the o-vector, the sweep), from which :meth:`RelationalResult.load` rebuilds it
without pickle. ``ovector.safetensors`` holds the o-vector again, for other tools.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mechprobe.core import Result, encode, literal, warn, write_atomic
from mechprobe.relational._ablation import AblationResult
from mechprobe.relational._intervention import _GROUPS, OVectorEffect, _span
from mechprobe.relational._ovector import OVector
from mechprobe.relational._report import headline_table, report
from mechprobe.relational._scoring import TaskScore
from mechprobe.relational._split import held_out_items
from mechprobe.relational._sweep import OVectorSweep
from mechprobe.relational._trajectory import Stages, Trajectory

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["RelationalResult"]

_SUMMARY_COLUMNS = (
    "n",
    "top1_before",
    "top1_after",
    "mean_rank_after",
    "mrr_before",
    "mrr_after",
    "no_effect_rate",
)

# The figures save() may write into a result folder (and so the ones it may remove there).
_FIGURES = ("x_plot.png", "intervention.png", "ablation.png", "sweep.png")

#: The note relational_analysis records when no context is in-domain and the sweep's cell is
#: chosen on held-out ones (``RelationalResult.sweep_chosen_on`` reads it).
SWEEP_ON_HELD_OUT = "No in-domain context: the sweep cell was chosen on held-out contexts."


@dataclass(frozen=True, eq=False, repr=False)
class RelationalResult(Result, format="mechprobe.RelationalResult", version=2, html_figure=True):
    """Everything :func:`mechprobe.relational_analysis` measured on one task.

    Attributes:
        task: Task name.
        kind: ``abstractive`` or ``extractive``.
        score: Per-item scores.
        trajectory: Early-decoding ranks per item and layer.
        stages: Argument-formation, function-application and saturation layers, read off the
            fitting split's items (``trajectory`` holds every item).
        ovector: The o-vector used.
        vectors_norms: Norm of each vector run (o-vector and controls).
        intervention: The o-vector and its controls on the same contexts.
        ablation: Top-down FFN ablation (None if not run).
        sweep: Layer-set x scale grid on the in-domain contexts (None if not run).
        tuned: The o-vector and every control rerun at the sweep's best cell (by o-vector MRR on
            the in-domain contexts), on all contexts; its held-out rows judge that choice.
        config: The arguments of the run.
        notes: Fallbacks taken, in words.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Its repr gives the stages as argument/function/saturation layers (``-``: none found).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.relational_analysis(mp.tiny_model(), "capitals", n_items=6, ablation=False,
        ...                              other_task=None, n_random=1, progress=False)
        >>> res
        RelationalResult(capitals (abstractive): 6 items, accuracy 0.00, stages -/-/-; o-vector top-1 0.00, random 0.00, intact 0.00)
    """

    task: str
    kind: str
    score: TaskScore
    trajectory: Trajectory
    stages: Stages
    ovector: OVector
    vectors_norms: dict[str, float]
    intervention: OVectorEffect
    ablation: AblationResult | None = None
    sweep: OVectorSweep | None = None
    tuned: OVectorEffect | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    model_name: str = ""
    model_dtype: str = ""

    @property
    def sweep_chosen_on(self) -> str:
        """The contexts the sweep's cell was chosen on: ``in_domain``, or ``held_out`` where the
        task had no in-domain context (the fallback its notes record)."""
        fell_back = SWEEP_ON_HELD_OUT in self.notes
        return "held_out" if fell_back else "in_domain"

    @property
    def n_items(self) -> int:
        return len(self.score)

    @property
    def accuracy(self) -> float:
        return self.score.accuracy

    def _condition(self, names: list[str], inter: OVectorEffect | None = None) -> dict[str, Any]:
        inter = inter if inter is not None else self.intervention
        out = inter.metrics(names)
        for group in _GROUPS:
            out[group] = inter.metrics(names, group=group)
        return out

    def controls(self, inter: OVectorEffect | None = None) -> dict[str, dict[str, Any]]:
        """``{"random": ..., "other_task": ..., "intact": ...}``, each shaped like the intervention
        (of ``inter``, default :attr:`intervention`).

        Args:
            inter: The run read (default: :attr:`intervention`; :attr:`tuned` for the sweep's cell).

        Returns:
            ``{family: metrics}``: each as :meth:`OVectorEffect.metrics` gives it over all contexts,
            with one such dict per context group (``"in_domain"``, ``"held_out"``) under its name;
            ``random`` adds ``per_seed_top1_after``, ``other_task`` its ``task``.
        """
        inter = inter if inter is not None else self.intervention
        fams = inter.families()
        out: dict[str, dict[str, Any]] = {}
        if "random" in fams:
            out["random"] = self._condition(fams["random"], inter)
            out["random"]["per_seed_top1_after"] = [
                inter.metrics(n)["top1_after"] for n in fams["random"]
            ]
        if "other_task" in fams:
            out["other_task"] = self._condition(fams["other_task"], inter)
            out["other_task"]["task"] = self.config.get("other_task")
        out["intact"] = self._condition(["intact"], inter)
        return out

    def headline(self, group: str | None = None, tuned: bool = False) -> str:
        """The headline table as markdown (o-vector beside its controls), over all contexts or
        one ``group`` (``"in_domain"`` / ``"held_out"``), of the default or ``tuned`` run.

        Args:
            group: ``"in_domain"`` or ``"held_out"`` (None: every context).
            tuned: Read the run at the sweep's best cell (:attr:`tuned`) instead of the default.

        Returns:
            The markdown table.
        """
        return headline_table(self, group, tuned=tuned)

    def _headline(self) -> dict[str, Any]:
        """The headline keys of result.json (what scripts read), in their order."""
        f = self.stages.function_layer
        head: dict[str, Any] = {
            "task": self.task,
            "kind": self.kind,
            "model": self.config.get("model", ""),
            "n_items": self.n_items,
            "accuracy": self.accuracy,
            "exact_accuracy": self.score.exact_accuracy,
            "mean_logprob": self.score.mean_logprob,
            "argument_layer": self.stages.argument_layer,
            "function_layer": f,
            "saturation_layer": self.stages.saturation_layer,
            "ffn_attribution": (
                {"layer": f, **self.trajectory.ffn_attribution(f)} if f is not None else None
            ),
            "ovector": {
                "layer": self.ovector.layer,
                "n_prompts": self.ovector.n_prompts,
                "norm": self.ovector.norm,
            },
            "intervention": self._condition(["ovector"]),
            "controls": self.controls(),
            "ablation": None,
            "sweep": None,
            "config": self.config,
            "notes": list(self.notes),
        }
        if self.ablation is not None:
            head["ablation"] = {
                "method": self.ablation.method,
                "tasks": list(self.ablation.tasks),
                "kinds": list(self.ablation.kinds),
                "n_layers_removed": [len(r) for r in self.ablation.removed],
                "accuracy": self.ablation.accuracy.tolist(),
            }
        if self.sweep is not None:
            cell, best_scale = self.sweep.best("ovector", "mrr")
            head["sweep"] = {
                "chosen_on": self.sweep_chosen_on,
                "metric": "mrr",
                "best_layers": [cell[0], cell[-1]],  # the span; the set is intervention.layers
                "best_scale": best_scale,
            }
            if self.tuned is not None:
                head["sweep"]["intervention"] = self._condition(["ovector"], self.tuned)
                head["sweep"]["controls"] = self.controls(self.tuned)
        return head

    # --- the protocol ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The ``result.json`` object: format and version, the headline keys, then ``details``
        (every field, through the one serialiser; NaN as "nan")."""
        fields = super().to_dict()
        tag = {"format": fields.pop("format"), "version": fields.pop("version")}
        return {**tag, **encode(self._headline()), "details": fields}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelationalResult:
        """Rebuild a result from :meth:`to_dict`'s output (its ``details``).

        Args:
            data: The ``result.json`` object (its ``format``, ``version`` and ``details``).

        Returns:
            The :class:`RelationalResult`.

        Raises:
            ValueError: Not a saved RelationalResult of this version.
        """
        details = data.get("details")
        if not isinstance(details, Mapping):
            details = {}
        tag = {"format": data.get("format"), "version": data.get("version")}
        return super().from_dict({**tag, **details})

    def to_json(self) -> dict[str, Any]:
        """Deprecated: call :meth:`to_dict` (the same ``result.json`` object)."""
        warn(
            "RelationalResult.to_json() is deprecated and will be removed in the next release; "
            "call .to_dict() (the result.json object) or .save(folder).",
            DeprecationWarning,
        )
        return self.to_dict()

    def to_frame(self) -> pd.DataFrame:
        """The headline table: one row per setting (``default``, and ``tuned`` after a sweep),
        condition and context group, the metrics as columns (``layers``: the layers the vector
        was added at, ``"24-29"``)."""
        rows = []
        runs = [("default", self.intervention)]
        if self.tuned is not None:
            runs.append(("tuned", self.tuned))
        for setting, inter in runs:
            fams = inter.families()
            for fam in ["ovector", "random", "other_task", "intact"]:
                if fam not in fams:
                    continue
                for group in [None, *_GROUPS]:
                    s = inter.metrics(fams[fam], group=group)
                    # A layer set as text ("24-29"), as OVectorSweep's: a list cannot be grouped.
                    s["layers"] = _span(s["layers"])
                    rows.append({"setting": setting, "condition": fam, "group": group or "all"} | s)
        return pd.DataFrame(rows)

    def summary(self) -> pd.DataFrame:
        """The o-vector beside its controls over all contexts, and over the held-out ones: one
        row per setting (``default``, ``tuned``), condition and group, the key metrics."""
        frame = self.to_frame()
        frame = frame[frame["group"].isin(["all", "held_out"])]
        keep = ["setting", "condition", "group", *_SUMMARY_COLUMNS]
        return frame[keep].reset_index(drop=True)

    def _describe(self) -> str:
        fams = self.intervention.families()
        labels = {"ovector": "o-vector top-1", "random": "random", "other_task": "other task"}
        words = [
            f"{labels.get(fam, fam)} {self.intervention.metrics(fams[fam])['top1_after']:.2f}"
            for fam in ["ovector", "random", "other_task", "intact"]
            if fam in fams
        ]
        st = self.stages
        layers = (st.argument_layer, st.function_layer, st.saturation_layer)
        stages = "/".join("-" if x is None else str(x) for x in layers)
        # One short line (a notebook repr): the stages as argument/function/saturation layers.
        return (
            f"{self.task} ({self.kind}): {self.n_items} items, accuracy {self.accuracy:.2f}, "
            f"stages {stages}; {', '.join(words)}"
        )

    # --- figures ---------------------------------------------------------------------------

    @property
    def fitted(self) -> np.ndarray | None:
        """``[item]`` True for the fitting split: the items whose curves gave :attr:`stages` and
        whose correct answers the o-vector averages (the held-out ones judge it). None for a
        file without the split's ``test_size`` and ``seed`` in its config.

        Example:
            >>> import mechprobe as mp
            >>> r = mp.relational_analysis(mp.tiny_model(), "capitals", n_items=8, n_random=0,
            ...                            ablation=False, progress=False)
            >>> int(r.fitted.sum()), len(r.fitted)  # test_size=0.5
            (4, 8)
        """
        test_size, seed = self.config.get("test_size"), self.config.get("seed")
        if test_size is None or seed is None:
            return None
        held = held_out_items(self.trajectory.arguments, float(test_size), int(seed))
        # As relational_analysis: with nothing left to fit on, the stages are all items'.
        return ~held if (~held).any() else np.ones_like(held)

    def fitted_trajectory(self) -> Trajectory:
        """:attr:`trajectory` of the fitting items only, whose :meth:`Trajectory.stages` are
        :attr:`stages` (all items for an older file)."""
        fitted = self.fitted
        return self.trajectory if fitted is None else self.trajectory.select(fitted)

    def plot(self, ax: Axes | None = None) -> Figure:
        """The X plot of the fitting items, whose curves gave the stages marked on it (early
        decoding of argument and answer; into ``ax`` when given). ``trajectory.plot()`` draws
        every item's. :meth:`plot_intervention`, :meth:`plot_ablation` and :meth:`plot_sweep`
        draw the other figures.

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        # Review 26a: every correct item's curves were drawn under the fitting items' stages,
        # so a stage could sit where the curves drawn show none.
        traj = self.fitted_trajectory()
        fig = traj.plot(ax, stages=self.stages)
        if traj is not self.trajectory:
            axis = ax if ax is not None else fig.axes[0]
            axis.set_title(axis.get_title() + " of the fitting split (the stages')")
        return fig

    def plot_intervention(self) -> Figure:
        """Top-1 rate and MRR of the answer under the o-vector and each control, in-domain and
        held-out; a second row for the sweep's best cell when a sweep was run."""
        from matplotlib.figure import Figure

        runs = [self.intervention] + ([self.tuned] if self.tuned is not None else [])
        # Which row is the setting fixed beforehand and which the sweep chose: the rows said
        # neither.
        settings = ["default: ", "tuned on the sweep: "]
        fig = Figure(figsize=(8, 3.0 * len(runs)), layout="constrained")
        rows = fig.subplots(len(runs), 2, squeeze=False)
        for inter, row, setting in zip(runs, rows, settings, strict=False):
            inter._draw(list(row), ["top1", "mrr"], setting=setting)
        fig.suptitle(literal(f"{self.task}: the o-vector beside its controls"), fontsize=9)
        return fig

    def plot_ablation(self, ax: Axes | None = None, *, relative: bool = False) -> Figure:
        """Accuracy as FFNs are removed top-down (raises if the ablation was not run).

        Args:
            ax: Draw into these axes (default: a new figure).
            relative: Accuracy relative to the intact model's, as :meth:`AblationResult.plot`.

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: The ablation was not run.
        """
        if self.ablation is None:
            raise ValueError("The ablation was not run: call relational_analysis(ablation=True).")
        return self.ablation.plot(ax, relative=relative)

    def plot_sweep(self, ax: Axes | None = None, *, metric: str = "top1") -> Figure:
        """The layer-set x scale heatmaps (raises if no sweep was run; see
        :meth:`OVectorSweep.plot` for ``ax``).

        Args:
            ax: Draw the o-vector's heatmap alone into these axes (default: a new figure).
            metric: ``"top1"``, ``"mrr"``, ``"mean_rank"`` or ``"no_effect"``.

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: No sweep was run.
        """
        if self.sweep is None:
            raise ValueError("No sweep was run: pass sweep_layers= to relational_analysis.")
        return self.sweep.plot(ax, metric=metric)

    # --- files -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, figures: bool = True) -> Path:
        """Write the folder ``path``: ``result.json``, ``ovector.safetensors``, the figures
        (``x_plot.png``, ``intervention.png``, ``ablation.png``, ``sweep.png``, with ``figures``)
        and ``report.md``. The folder is created, with its missing parents; figures of an
        earlier result saved there that this one does not draw are removed. A ``path`` ending in
        ``.json`` is one file instead (its missing parents created too): that ``result.json``
        alone, everything :meth:`load` needs, the o-vector included.

        Args:
            path: A folder, or a file ending in ``.json``.
            figures: Draw and write the figures (folder only).

        Returns:
            The folder, or the ``.json`` file.

        Raises:
            FileExistsError: ``path`` (or a folder above it) is a file.
            ValueError: ``path`` ends in ``.npz`` or ``.safetensors`` (a folder or ``.json``).
        """
        folder = Path(path).expanduser()
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        if folder.suffix == ".json":
            folder.parent.mkdir(parents=True, exist_ok=True)  # as for a folder, parents made
            write_atomic(folder, text.encode("utf-8"))
            return folder
        if folder.suffix in (".npz", ".safetensors"):
            raise ValueError(
                f"A RelationalResult is saved to a folder (result.json, the o-vector, figures "
                f"and report.md) or to one .json file, not to {folder.name!r}: drop the suffix "
                "or use .json."
            )
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"Cannot write a result folder at {folder}: it is a file.")
        # An earlier RelationalResult's folder (its result.json): its figures this one does not
        # draw go; in any other folder a file of that name is the user's, and stays.
        earlier = _holds_relational_result(folder / "result.json")
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / "result.json", text.encode("utf-8"))
        self.ovector.save(folder / "ovector.safetensors")
        names = []
        if figures:
            plots = [("x_plot.png", self.plot), ("intervention.png", self.plot_intervention)]
            if self.ablation is not None:
                plots.append(("ablation.png", self.plot_ablation))
            if self.sweep is not None:
                plots.append(("sweep.png", self.plot_sweep))
            for name, make in plots:
                make().savefig(folder / name, dpi=110)
                names.append(name)
        for name in sorted(set(_FIGURES) - set(names)) if earlier else ():
            (folder / name).unlink(missing_ok=True)
        (folder / "report.md").write_text(report(self, figures=names), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RelationalResult:
        """Read a folder written by :meth:`save` (the folder, or its ``result.json``).

        Args:
            path: The folder :meth:`save` wrote, its ``result.json``, or a ``.json`` file it wrote.

        Returns:
            The :class:`RelationalResult`.

        Raises:
            FileNotFoundError: No result.json there.
            ValueError: Not a saved RelationalResult of this version, or unreadable.
        """
        path = Path(path).expanduser()
        file = path if path.suffix == ".json" else path / "result.json"
        if not file.is_file():
            raise FileNotFoundError(
                f"{path} has no result.json; pass the folder RelationalResult.save wrote."
            )
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{file}: not a readable RelationalResult ({err}).") from err

    def report(self) -> str:
        """The markdown report (headline table, stages, controls, ablation)."""
        return report(self)


def _holds_relational_result(file: Path) -> bool:
    """Whether ``file`` is a RelationalResult's result.json (by its format tag)."""
    try:
        return bool(
            json.loads(file.read_text(encoding="utf-8")).get("format") == RelationalResult._format
        )
    except (OSError, ValueError, AttributeError):
        return False
