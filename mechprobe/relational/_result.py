"""The result of :func:`mechprobe.relational_analysis`: summary JSON, figures, markdown report.

``result.json`` holds the headline keys (``task, kind, n_items, accuracy, argument_layer,
function_layer, saturation_layer``, an ``intervention`` object and a ``controls`` object mapping
``random``, ``other_task`` and ``intact`` to objects of the same shape: ``layers, scale,
top1_before, top1_after, mean_rank_before, mean_rank_after, no_effect_rate`` and more), then
``details`` with every per-item number, so :meth:`RelationalResult.load` rebuilds the result
without pickle (the o-vector itself goes to ``ovector.safetensors``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from mechprobe.relational._ablation import AblationResult
from mechprobe.relational._intervention import InterventionResult
from mechprobe.relational._ovector import OVector
from mechprobe.relational._report import headline_table, report
from mechprobe.relational._scoring import TaskScore
from mechprobe.relational._sweep import SweepResult
from mechprobe.relational._trajectory import Stages, Trajectory

__all__ = ["RelationalResult"]

_GROUPS = ("in_domain", "held_out")


def _clean(value: Any) -> Any:
    """Strict JSON: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


@dataclass(frozen=True, eq=False)
class RelationalResult:
    """Everything :func:`mechprobe.relational_analysis` measured on one task.

    Attributes:
        task: Task name.
        kind: ``abstractive`` or ``extractive``.
        score: Per-item scores.
        trajectory: Early-decoding ranks per item and layer.
        stages: Argument-formation, function-application and saturation layers.
        ovector: The o-vector used.
        vectors_norms: Norm of each vector run (o-vector and controls).
        intervention: The o-vector and its controls on the same contexts.
        ablation: Top-down FFN ablation (None if not run).
        sweep: Layer-range x scale grid on the in-domain contexts (None if not run).
        tuned: The o-vector and every control rerun at the sweep's best cell (by o-vector MRR on
            the in-domain contexts), on all contexts; its held-out rows judge that choice.
        config: The arguments of the run.
        notes: Fallbacks taken, in words.
    """

    task: str
    kind: str
    score: TaskScore
    trajectory: Trajectory
    stages: Stages
    ovector: OVector
    vectors_norms: dict[str, float]
    intervention: InterventionResult
    ablation: AblationResult | None = None
    sweep: SweepResult | None = None
    tuned: InterventionResult | None = None
    config: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def n_items(self) -> int:
        return len(self.score)

    @property
    def accuracy(self) -> float:
        return self.score.accuracy

    def _condition(
        self, names: list[str], inter: InterventionResult | None = None
    ) -> dict[str, Any]:
        inter = inter if inter is not None else self.intervention
        out = inter.summary(names)
        for group in _GROUPS:
            out[group] = inter.summary(names, group=group)
        return out

    def controls(self, inter: InterventionResult | None = None) -> dict[str, dict[str, Any]]:
        """``{"random": ..., "other_task": ..., "intact": ...}``, each shaped like the intervention
        (of ``inter``, default :attr:`intervention`)."""
        inter = inter if inter is not None else self.intervention
        fams = inter.families()
        out: dict[str, dict[str, Any]] = {}
        if "random" in fams:
            out["random"] = self._condition(fams["random"], inter)
            out["random"]["per_seed_top1_after"] = [
                inter.summary(n)["top1_after"] for n in fams["random"]
            ]
        if "other_task" in fams:
            out["other_task"] = self._condition(fams["other_task"], inter)
            out["other_task"]["task"] = self.config.get("other_task")
        out["intact"] = self._condition(["intact"], inter)
        return out

    def to_json(self) -> dict[str, Any]:
        """The ``result.json`` object: headline keys first, then ``details``."""
        f = self.stages.function_layer
        summary: dict[str, Any] = {
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
            summary["ablation"] = {
                "method": self.ablation.method,
                "tasks": list(self.ablation.tasks),
                "kinds": list(self.ablation.kinds),
                "n_removed": [len(r) for r in self.ablation.removed],
                "accuracy": self.ablation.accuracy.tolist(),
            }
        if self.sweep is not None:
            (start, stop), best_scale = self.sweep.best("ovector", "mrr")
            summary["sweep"] = {
                "chosen_on": "in_domain",
                "metric": "mrr",
                "best_layers": [start, stop - 1],
                "best_scale": best_scale,
            }
            if self.tuned is not None:
                summary["sweep"]["intervention"] = self._condition(["ovector"], self.tuned)
                summary["sweep"]["controls"] = self.controls(self.tuned)
        summary["details"] = {
            "score": self.score.to_dict(),
            "trajectory": self.trajectory.to_dict(),
            "intervention": self.intervention.to_dict(),
            "ablation": None if self.ablation is None else self.ablation.to_dict(),
            "sweep": None if self.sweep is None else self.sweep.to_dict(),
            "tuned": None if self.tuned is None else self.tuned.to_dict(),
            "vectors_norms": self.vectors_norms,
        }
        return _clean(summary)

    def to_frame(self) -> pd.DataFrame:
        """The headline table: one row per setting (``default``, and ``tuned`` after a sweep),
        condition and context group, the metrics as columns."""
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
                    s = inter.summary(fams[fam], group=group)
                    rows.append({"setting": setting, "condition": fam, "group": group or "all"} | s)
        return pd.DataFrame(rows)

    # --- figures ---------------------------------------------------------------------------

    def plot(self) -> Figure:
        """The X plot (early decoding of argument and answer, stages marked)."""
        return self.trajectory.plot(self.stages)

    def plot_intervention(self) -> Figure:
        """Top-1 rate and MRR of the answer under the o-vector and each control, in-domain and
        held-out; a second row for the sweep's best cell when a sweep was run."""
        runs = [self.intervention] + ([self.tuned] if self.tuned is not None else [])
        fig = Figure(figsize=(8, 3.0 * len(runs)), layout="constrained")
        for inter, row in zip(runs, fig.subplots(len(runs), 2, squeeze=False), strict=True):
            inter.plot(axes=list(row))
        return fig

    def plot_ablation(self, relative: bool = False) -> Figure:
        """Accuracy as FFNs are removed top-down (raises if the ablation was not run)."""
        if self.ablation is None:
            raise ValueError("The ablation was not run: call relational_analysis(ablation=True).")
        return self.ablation.plot(relative=relative)

    def plot_sweep(self, metric: str = "top1") -> Figure:
        """The layer-range x scale heatmap (raises if no sweep was run)."""
        if self.sweep is None:
            raise ValueError("No sweep was run: pass sweep_ranges= to relational_analysis.")
        return self.sweep.plot(metric)

    # --- files -----------------------------------------------------------------------------

    def save(self, out_dir: str | os.PathLike[str], *, figures: bool = True) -> Path:
        """Write ``result.json``, ``ovector.safetensors``, figures and ``report.md``; return the
        folder."""
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        data = self.to_json()
        (folder / "result.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
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
        (folder / "report.md").write_text(report(self, figures=names), encoding="utf-8")
        return folder

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str]) -> RelationalResult:
        """Read a folder written by :meth:`save`."""
        folder = Path(out_dir)
        path = folder / "result.json"
        if not path.is_file():
            raise ValueError(
                f"{folder} has no result.json; pass the folder RelationalResult.save wrote."
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        d = data["details"]
        return cls(
            task=data["task"],
            kind=data["kind"],
            score=TaskScore.from_dict(d["score"]),
            trajectory=Trajectory.from_dict(d["trajectory"]),
            stages=Stages(data["argument_layer"], data["function_layer"], data["saturation_layer"]),
            ovector=OVector.load(folder / "ovector.safetensors"),
            vectors_norms={k: float(v) for k, v in d["vectors_norms"].items()},
            intervention=InterventionResult.from_dict(d["intervention"]),
            ablation=None if d["ablation"] is None else AblationResult.from_dict(d["ablation"]),
            sweep=None if d["sweep"] is None else SweepResult.from_dict(d["sweep"]),
            tuned=None if d.get("tuned") is None else InterventionResult.from_dict(d["tuned"]),
            config=data["config"],
            notes=tuple(data["notes"]),
        )

    def report(self) -> str:
        """The markdown report (headline table, stages, controls, ablation)."""
        return report(self)

    def headline(self, group: str | None = None, tuned: bool = False) -> str:
        """The headline table as markdown (o-vector beside its controls), over all contexts or
        one ``group`` (``"in_domain"`` / ``"held_out"``), of the default or ``tuned`` run."""
        return headline_table(self, group, tuned=tuned)
