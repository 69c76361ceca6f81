"""Markdown for a :class:`~mechprobe.relational._result.RelationalResult`: headline table and report.

Every figure of the o-vector is printed beside its controls' (random directions of the same norm,
another task's o-vector, the intact model), so no number stands alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mechprobe.relational._result import RelationalResult

__all__ = ["headline_table", "report"]


def _f(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _layers(layers: Sequence[int]) -> str:
    if not layers:
        return "none"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(str(x) for x in layers)


def _positions(positions: Any) -> str:
    if positions == "all":
        return "every position"
    listed = list(positions) if isinstance(positions, (list, tuple)) else positions
    return f"positions {listed}"


def headline_table(result: RelationalResult, group: str | None = None, tuned: bool = False) -> str:
    """Markdown table: each condition's top-1 rate, ranks, MRR and no-effect rate, before/after
    (of the default intervention, or of the one at the sweep's best cell with ``tuned``)."""
    inter = result.tuned if tuned and result.tuned is not None else result.intervention
    fams = inter.families()
    lines = [
        "| condition | n | layers | scale | top-1 before | top-1 after | mean rank before | "
        "mean rank after | median rank after | MRR before | MRR after | no effect |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    other = result.config.get("other_task")
    n_seeds = len(fams.get("random", []))
    labels = {
        "ovector": f"o-vector ({result.task}, {result.ovector.n_prompts} prompts)",
        "random": f"random, same norm ({n_seeds} seed{'' if n_seeds == 1 else 's'})",
        "other_task": f"other task's o-vector ({other})",
        "intact": "intact model",
    }
    for fam in ["ovector", "random", "other_task", "intact"]:
        if fam not in fams:
            continue
        s = inter.metrics(fams[fam], group=group)
        lines.append(
            f"| {labels[fam]} | {s['n']} | {_layers(s['layers'])} | {s['scale']:g} | "
            f"{_f(s['top1_before'])} | {_f(s['top1_after'])} | {_f(s['mean_rank_before'], 0)} | "
            f"{_f(s['mean_rank_after'], 0)} | {_f(s['median_rank_after'], 0)} | "
            f"{_f(s['mrr_before'])} | {_f(s['mrr_after'])} | {_f(s['no_effect_rate'])} |"
        )
    return "\n".join(lines)


def report(result: RelationalResult, figures: Sequence[str] = ()) -> str:
    """The full markdown report of one task's analysis."""
    from mechprobe import __version__

    st, traj = result.stages, result.fitted_trajectory()
    cfg = result.config
    # The settings that ran, as every command's report.md records them (review 31a F8).
    settings = "\n".join(f"{key}: {value!r}" for key, value in cfg.items() if key != "model")
    out = [
        f"# Relational analysis: {result.task} ({result.kind})",
        "",
        f"Model `{cfg.get('model', '')}`, {cfg.get('shots')} shots, {result.n_items} items; "
        f"mechprobe {__version__}, settings:",
        "",
        f"```\n{settings}\n```",
        "",
        "## Scores",
        "",
        f"- greedy first-token accuracy: **{result.accuracy:.3f}**",
        f"- whole answer greedy under teacher forcing: {result.score.exact_accuracy:.3f}",
        f"- mean teacher-forced log p(answer): {result.score.mean_logprob:.3f}",
        "",
        "## Early decoding (the X)",
        "",
        _over(traj, " of the fitting split" if traj is not result.trajectory else "")
        + ": argument-formation layer "
        f"**{_f(st.argument_layer)}**, function-application layer **{_f(st.function_layer)}**, "
        f"saturation layer **{_f(st.saturation_layer)}** (of {traj.n_layers}; rules in "
        "`mechprobe.relational._trajectory`).",
        "",
    ]
    if st.function_layer is not None and st.argument_layer is None:
        out += [
            "No argument stage: the argument's mean reciprocal rank never reaches 0.05 before the "
            "function-application layer.",
            "",
        ]
    if st.function_layer is not None:
        a = result.trajectory.ffn_attribution(st.function_layer)  # every item: it chooses nothing
        out += [
            f"FFN attribution at layer {st.function_layer}: removing that layer's FFN update "
            f"(`resid_post - mlp_out`) makes the argument the top token in "
            f"{_f(a['argument_top1_after_removal'])} of items (with it: "
            f"{_f(a['argument_top1_before_removal'])}), and ranks the argument above the answer in "
            f"{_f(a['argument_above_answer_after_removal'])} (with it: "
            f"{_f(a['argument_above_answer_before_removal'])}).",
            "",
        ]
    out += [
        "## o-vector intervention and controls",
        "",
        f"The FFN outputs of layers {_layers(result.intervention.layers)} are "
        f"{'replaced by' if result.intervention.mode == 'replace' else 'added'} scale x vector "
        f"at {_positions(result.intervention.positions)}"
        f", on random-word contexts ending before a repeat of the argument. The o-vector is the "
        f"mean `mlp_out` at layer {result.ovector.layer} over {result.ovector.n_prompts} "
        + (
            "correctly answered prompts"
            if result.ovector.info.get("only_correct", True)
            else "prompts (none was answered correctly: all of them)"
        )
        + f" (norm {result.ovector.norm:.1f}); ranks are 0-based.",
        "",
        "All contexts:",
        "",
        headline_table(result),
        "",
    ]
    for group in ("in_domain", "held_out"):
        if group in result.intervention.groups:
            out += [
                f"{group.replace('_', ' ').capitalize()} arguments:",
                "",
                headline_table(result, group),
                "",
            ]
    if result.ablation is not None:
        abl = result.ablation
        # AblationResult.summary()'s columns: steps that round to the same layers (more parts
        # than layers) share one, which this table repeated.
        table = abl.summary()
        steps = [c for c in table.columns if c.startswith("removed ")]
        head = " | ".join(c.removeprefix("removed ") for c in steps)
        out += [
            "## FFN ablation, top-down",
            "",
            f"{abl.method}-ablation of the FFN outputs at every position; columns: number of top "
            "layers removed.",
            "",
            f"| task | kind | {head} |",
            "|---|---|" + "---|" * len(steps),
        ]
        for t, name in enumerate(abl.tasks):
            vals = " | ".join(f"{v:.2f}" for v in table.loc[t, steps])
            out.append(f"| {name} | {abl.kinds[t]} | {vals} |")
        out.append("")
    if result.sweep is not None:
        cell, scale = result.sweep.best("ovector", "mrr")
        out += [
            "## Sweep of layer range and scale",
            "",
            f"On {result.sweep.n_contexts} {result.sweep_chosen_on.replace('_', '-')} contexts, "
            "the o-vector's best cell by MRR is "
            f"layers {_layers(cell)}, scale {scale:g} (the random control's grid is beside it "
            "in sweep.png). Rerun there on all contexts; the held-out rows judge the choice:",
            "",
        ]
        if result.tuned is not None:
            for part in (None, "held_out"):
                label = "All contexts" if part is None else "Held-out arguments"
                out += [f"{label}:", "", headline_table(result, part, tuned=True), ""]
    if result.notes:
        out += ["## Notes", "", *[f"- {n}" for n in result.notes], ""]
    if figures:
        out += ["## Figures", "", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(out)


def _over(traj: Any, where: str = "") -> str:
    """Which items the X averages, as :attr:`Trajectory.included` chose them (``where``: of
    which split)."""
    if not traj.correct.any():
        return f"No item{where} was answered correctly, so no curve is averaged"
    n = int(traj.included.sum())
    if (traj.correct & traj.distinct).any():
        return f"Over {n} correctly answered items{where} with distinct argument and answer tokens"
    return (
        f"Over {n} correctly answered items{where} (none has distinct argument and answer tokens)"
    )
