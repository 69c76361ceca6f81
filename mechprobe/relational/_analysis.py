"""Merullo-style analysis of a relational task in one call: :func:`relational_analysis`.

Each step is a public function, so a researcher can run, vary or replace any of them:

1. :func:`mechprobe.task_pass`: one teacher-forced pass over the items scores them, decodes the
   argument and answer at every layer (the X plot; :meth:`Trajectory.stages` reads off the
   argument / function / saturation layers, rules in :mod:`mechprobe.relational._trajectory`,
   on the fitting split's items only: the held-out items judge the o-vector, so they do not help
   choose its layer) and keeps each layer's ``mlp_out`` at the prompt's last token;
2. :func:`mechprobe.fit_ovector`: the o-vector is the mean of those ``mlp_out`` rows at the
   function layer over the correctly answered items of a fitting split (or the first
   ``ovector_prompts`` of them; 1 is Merullo et al.'s setting), with no further forward pass;
3. :func:`mechprobe.ovector_controls`: ``n_random`` random directions of the same norm and the
   o-vector of another task read at the same layer;
4. :func:`mechprobe.ovector_intervention`: on random-word contexts
   (:func:`mechprobe.random_word_contexts`) holding each correctly answered item's argument (fit
   items: ``in_domain``; the rest: ``held_out``), the FFN outputs of ``layers`` (default: the
   function layer to the last; the paper's GPT-2 medium range, 18-23 for o read at 19, starts one
   layer before: ``layers=range(f - 1, n_layers)``) are replaced by ``scale * o``, beside every
   control and the intact model on the same contexts;
5. :func:`mechprobe.ffn_ablation`: FFNs are removed top-down in sixths for the task and its
   extractive (or abstractive) counterpart;
6. optionally :func:`mechprobe.tuned_intervention`: a layer-set x scale sweep on the in-domain
   contexts picks a cell, where every vector reruns on all contexts (the held-out ones judge it).

When a rule finds no layer (e.g. a model that answers nothing correctly), the o-vector layer falls
back to the first edited layer or two thirds of the depth (where Merullo et al. found it in GPT-2)
and ``notes`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from mechprobe.core import (
    Layers,
    check_choice,
    check_float,
    check_int,
    check_seed,
    evaluates,
    model_adapter,
    progress_enabled,
)
from mechprobe.lens import LensSpec
from mechprobe.relational._ablation import AblationMethod, ffn_ablation
from mechprobe.relational._contexts import random_word_contexts
from mechprobe.relational._deprecated import half_open_pairs, renamed_keywords
from mechprobe.relational._intervention import (
    Mode,
    WriterPositions,
    _layers,
    _positions,
    _scale,
    _scales,
    _unambiguous,
    ovector_intervention,
)
from mechprobe.relational._ovector import fit_ovector, ovector_controls
from mechprobe.relational._pass import TaskPass, task_pass
from mechprobe.relational._result import SWEEP_ON_HELD_OUT, RelationalResult
from mechprobe.relational._split import held_out_items
from mechprobe.relational._sweep import tuned_intervention
from mechprobe.relational._trajectory import check_lens
from mechprobe.tasks import Task, as_task, load_task

__all__ = ["RelationalResult", "default_sweep_layers", "relational_analysis"]

#: Built-in pairs: task -> (its counterpart of the other kind, the default other-task control).
PAIRS: dict[str, tuple[str, str]] = {
    "capitals": ("capitals_extractive", "past_tense"),
    "capitals_extractive": ("capitals", "past_tense"),
    "uppercase": ("colors_extractive", "capitals"),
    "colors_extractive": ("uppercase", "capitals"),
    "past_tense": ("past_tense_extractive", "capitals"),
    "past_tense_extractive": ("past_tense", "capitals"),
}

_OTHER_TASK_ITEMS = 64
TaskArg = Task | str | os.PathLike[str]


def _resolve_pair(value: TaskArg | Literal["auto"] | None, task: Task, which: int) -> Task | None:
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        if task.name in PAIRS:
            return load_task(PAIRS[task.name][which])
        if which == 1:  # any task's other-task control defaults to capitals (or past tense)
            return load_task("capitals" if task.name != "capitals" else "past_tense")
        return None
    chosen = as_task(value)
    if chosen.name == task.name:
        argument = ("contrast_task", "contrast") if which == 0 else ("other_task", "control")
        raise ValueError(
            f"{argument[0]} is {task.name!r}, the task analysed: its {argument[1]} would be the "
            "task itself. Name another task, 'auto', or None to leave it out."
        )
    return chosen


def _prepare(task: Task, shots: int, n_items: int | None, seed: int) -> Task:
    if shots > len(task.shots):
        raise ValueError(
            f"Task {task.name!r} has {len(task.shots)} shots; ask for at most that many "
            f"(shots={shots})."
        )
    task = task.with_shots(shots)
    if n_items is not None and n_items < len(task):
        task = task.subset(n_items, seed=seed)
    return task


def default_sweep_layers(n_layers: int, function_layer: int | None) -> list[range]:
    """Layer sets ``range(start, n_layers)`` for every start from ``function_layer - 4`` to the
    last layer, and the same without the last layer (``range(start, n_layers - 1)``), which a model
    whose last FFN does the final readout may need.

    Args:
        n_layers: The model's number of blocks.
        function_layer: The function-application layer the sets start near (None: two thirds
            of the depth).

    Returns:
        The layer sets, as ``range``s: every start to the end, then every start to the
        second-to-last layer.

    Example:
        >>> default_sweep_layers(30, 27)[:3], len(default_sweep_layers(30, 27))
        ([range(23, 30), range(24, 30), range(25, 30)], 13)
    """
    f = function_layer if function_layer is not None else (2 * n_layers) // 3
    first = max(0, f - 4)
    to_end = [range(s, n_layers) for s in range(first, n_layers)]
    return to_end + [range(s, n_layers - 1) for s in range(first, n_layers - 1)]


def _ovector_layer(
    function_layer: int | None, layers: tuple[int, ...] | None, n_layers: int, notes: list[str]
) -> int:
    """The function layer, or (noted) the first edited layer, or two thirds of the depth."""
    if function_layer is not None:
        return function_layer
    o_layer = layers[0] if layers else (2 * n_layers) // 3
    notes.append(
        f"No function-application layer was found (no correct item with distinct argument "
        f"and answer tokens, or the answer never stays ahead); the o-vector is read at layer "
        f"{o_layer} instead."
    )
    return o_layer


def _contexts(
    tp: TaskPass, held: np.ndarray, seed: int, notes: list[str]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """``(arguments, contexts, targets, groups)``: one random-word context per correctly answered
    item whose argument and answer start with different tokens (fallbacks noted)."""
    distinct = tp.trajectory.distinct
    eligible = np.flatnonzero(tp.score.correct & distinct)
    if eligible.size == 0:
        eligible = np.flatnonzero(distinct)
        notes.append("No correct item with distinct argument/answer tokens; contexts use all.")
    if eligible.size == 0:
        eligible = np.arange(len(tp))
        notes.append("Argument and answer share their first token in every item.")
    args = [tp.task.arguments()[int(i)] for i in eligible]
    targets = [tp.task.answers()[int(i)] for i in eligible]
    groups = ["held_out" if held[int(i)] else "in_domain" for i in eligible]
    return args, random_word_contexts(args, seed=seed), targets, groups


@renamed_keywords(
    sweep_ranges=("sweep_layers", half_open_pairs), holdout=("test_size", lambda share: share)
)
@evaluates
def relational_analysis(
    model: Any,
    task: TaskArg,
    *,
    shots: int | None = None,
    n_items: int | None = None,
    layers: Layers | None = None,
    scale: float = 1.0,
    mode: Mode = "replace",
    positions: WriterPositions = "all",
    n_random: int = 3,
    other_task: TaskArg | Literal["auto"] | None = "auto",
    contrast_task: TaskArg | Literal["auto"] | None = "auto",
    test_size: float = 0.5,
    ovector_prompts: int | None = None,
    ablation: bool = True,
    ablation_method: AblationMethod = "zero",
    sweep_layers: Sequence[Layers] | Literal["auto"] | None = None,
    sweep_scales: Sequence[float] = (1.0, 2.0, 4.0),
    sweep_contexts: int | None = 64,
    seed: int = 0,
    lens: LensSpec = "logit",
    batch_size: int | None = 32,
    progress: bool = True,
) -> RelationalResult:
    """The whole Merullo-style analysis of one task (see the module docstring for the steps).

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file.
        shots: Demonstrations per prompt (None: 3, or all the task has when it has fewer, as
            ``mechprobe relation`` does).
        n_items: Use a seeded subset of this many items (None, or more than the task has:
            all; ``config["n_items"]`` records the count used).
        layers: FFN layers the o-vector is written into: an int, a range, a list or ``"all"``
            (None: from the function layer, whose FFN wrote o, to the last; Merullo et al.'s
            18-23 for o read at 19 starts one layer before, as
            ``range(function_layer - 1, n_layers)`` does).
        scale: Scale of the written vector (finite).
        mode: ``"replace"`` (Merullo et al.) or ``"add"``.
        positions: Positions edited: ``"all"`` (as in the paper), an int (``-1``: each context's
            last token) or a list of ints.
        n_random: Random-direction controls (seeds ``seed .. seed + n_random - 1``, mod ``2**32``).
        other_task: The task whose o-vector is the other-task control (``"auto"``: a built-in
            pairing; None: skip); never the task analysed.
        contrast_task: The task ablated beside this one (``"auto"``: the extractive or abstractive
            counterpart of a built-in task; None: only this task); never the task analysed, and
            only with ``ablation``.
        test_size: Share of the items held out of the o-vector (their contexts are
            ``held_out``), split by argument: no held-out item shares its argument with a fitted
            one, so the share is met as closely as whole arguments allow (a note says when it
            is not). The old name ``holdout=`` still works for one release.
        ovector_prompts: Average the o-vector over at most this many correct fit items (1: one
            prompt, as in the paper; None: all).
        ablation: Run the top-down FFN ablation.
        ablation_method: ``"zero"`` or ``"mean"``.
        sweep_layers: If given, also sweep these layer sets (each an int, a range or a list) x
            ``sweep_scales`` for the o-vector and the first random control on the in-domain
            contexts (``"auto"``: :func:`default_sweep_layers`), then rerun the o-vector and every
            control at the cell with the best o-vector MRR on all contexts (``tuned``: its
            held-out rows judge it). The old ``sweep_ranges=`` of ``(start, stop)`` pairs still
            works for one release.
        sweep_scales: Scales of the sweep (finite).
        sweep_contexts: Sweep on at most this many in-domain contexts (None: all).
        seed: Seed of the item subset, split, contexts and random controls.
        lens: The lens of the trajectory and so of the stages (the o-vector's layer is the
            function-application layer): ``"logit"``, a :class:`~mechprobe.lens.TunedLens` or a
            :class:`~mechprobe.lens.Patchscope`.
        batch_size: Rows per forward pass.
        progress: Show progress bars and the stages found (``MECHPROBE_PROGRESS=0`` silences
            them).

    Returns:
        A :class:`~mechprobe.RelationalResult`: the task's scores, trajectory and stages, the
        o-vector and its intervention beside the controls, and (where run) the FFN ablation,
        the layer x scale sweep and the tuned rerun.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.relational_analysis(mp.tiny_model(), "capitals", n_items=6, ablation=False,
        ...                              progress=False)
        >>> sorted(res.to_dict()["controls"])
        ['intact', 'other_task', 'random']
    """
    # Every argument is checked before the first forward pass.
    n_layers = int(model.cfg.n_layers)
    n_random = check_int(n_random, "n_random", 0)
    seed = check_seed(seed)
    check_choice(mode, "mode", ("replace", "add"))
    check_choice(ablation_method, "ablation_method", ("zero", "mean"))
    scale = _scale(scale, "scale", "sweep_scales=[...]")
    where = _positions(positions, "relational_analysis")
    edited = (
        None if layers is None else _layers(model, _unambiguous(layers, "layers=", pairs_only=True))
    )
    if ovector_prompts is not None:
        ovector_prompts = check_int(ovector_prompts, "ovector_prompts", 1)
    if sweep_layers is not None:
        if isinstance(sweep_layers, str):
            check_choice(sweep_layers, "sweep_layers", ("auto",))
        else:
            for cell in sweep_layers:
                _layers(model, _unambiguous(cell, "A sweep's layer set"))
        _scales(sweep_scales, "sweep_scales")
        if sweep_contexts is not None:
            sweep_contexts = check_int(sweep_contexts, "sweep_contexts", 1)
    check_float(test_size, "test_size")
    check_lens(model, lens)
    base = as_task(task)
    seed = check_seed(seed)
    if shots is None:  # a task with two demonstrations runs as it does from the command line
        shots = min(3, len(base.shots))
    shots = check_int(shots, "shots", 0)
    work = _prepare(base, shots, n_items, seed)
    held = held_out_items(work.arguments(), test_size, seed)
    other = _resolve_pair(other_task, base, 1)
    if other is not None:
        other = _prepare(other, min(shots, len(other.shots)), _OTHER_TASK_ITEMS, seed)
    named = not (isinstance(contrast_task, str) and contrast_task == "auto")
    if not ablation and named and contrast_task is not None:
        raise ValueError(
            "contrast_task names the task ablated beside this one, but ablation=False runs "
            "no ablation: drop contrast_task, or set ablation=True."
        )
    contrast = _resolve_pair(contrast_task, base, 0) if ablation else None
    if contrast is not None:
        contrast = _prepare(contrast, min(shots, len(contrast.shots)), n_items, seed)
    notes: list[str] = []
    if n_items is not None and n_items > len(work):
        notes.append(f"n_items={n_items}, but {base.name!r} has {len(work)} items: all are used.")
    if abs(held.mean() - test_size) > 0.1:
        notes.append(
            f"test_size={test_size}: {int(held.sum())} of {len(work)} items are held out, split by "
            "argument (whole arguments only; no held-out item shares one with a fitted item)."
        )
    steps: dict[str, Any] = {"batch_size": batch_size, "progress": progress}

    # 1. One teacher-forced pass: score, trajectory, stages, the last-token FFN outputs.
    tp = task_pass(model, work, lens=lens, **steps)
    # Stages from the fitting split only: the function layer chooses where o is read, where it
    # is written and the sweep's grid, so held-out items must not help choose it (all items
    # gave capitals' layer 24 on SmolLM2, the fitting items 26).
    stages = tp.trajectory.select(~held).stages() if (~held).any() else tp.stages
    if progress_enabled(progress):
        tqdm.write(f"{work.name}: accuracy {tp.score.accuracy:.2f}, {stages!r}")
    o_layer = _ovector_layer(stages.function_layer, edited, n_layers, notes)

    # 2. The o-vector from the correct items of the fitting split (from that same pass).
    any_correct = bool((~held & tp.score.correct).any())
    if not any_correct:
        notes.append("No fit item is answered correctly; the o-vector averages all fit items.")
    o = fit_ovector(tp, o_layer, items=~held, only_correct=any_correct, max_prompts=ovector_prompts)

    # 3. Its controls: random directions of its norm, another task's o-vector at its layer.
    controls = ovector_controls(model, o, n_random=n_random, other_task=other, seed=seed, **steps)
    vectors = {"ovector": o, **controls}
    if other is not None and not controls["other_task"].info.get("only_correct"):
        notes.append(f"Other task {other.name!r}: no item correct; its o-vector averages all.")

    # 4. The intervention on random-word contexts, every control on the same contexts.
    args, contexts, targets, groups = _contexts(tp, held, seed, notes)
    edit: dict[str, Any] = {"mode": mode, "positions": where, "arguments": args, "groups": groups}
    edit.update(steps)
    default_layers = list(edited) if edited is not None else range(o_layer, n_layers)
    effect = ovector_intervention(
        model, vectors, contexts, targets, layers=default_layers, scale=scale, **edit
    )

    # 5. Top-down FFN ablation of this task and its counterpart.
    abl = None
    if ablation:
        pair = [work] + ([contrast] if contrast is not None else [])
        abl = ffn_ablation(model, pair, method=ablation_method, **steps)

    # 6. Optionally: the sweep's best cell, chosen on in-domain contexts, rerun on all of them.
    swept, tuned = None, None
    if sweep_layers is not None:
        cells = default_sweep_layers(n_layers, o_layer) if sweep_layers == "auto" else sweep_layers
        pick = [i for i, g in enumerate(groups) if g == "in_domain"][:sweep_contexts]
        if not pick:
            pick = list(range(len(contexts)))[:sweep_contexts]
            notes.append(SWEEP_ON_HELD_OUT)
        swept, tuned = tuned_intervention(
            model,
            vectors,
            contexts,
            targets,
            layers=cells,
            scales=sweep_scales,
            choose_on=pick,
            swept=["ovector", *(["random_0"] if n_random else [])],
            **edit,
        )

    config = {
        "model": tp.model,
        "shots": shots,
        "n_items": len(work),  # the items used (n_items asked more of a smaller task: all)
        "layers": list(effect.layers),
        "ovector_layer": o_layer,
        "scale": scale,
        "mode": mode,
        "positions": list(where) if isinstance(where, tuple) else where,
        "n_random": n_random,
        "other_task": vectors["other_task"].source if "other_task" in vectors else None,
        "test_size": test_size,
        "ovector_prompts": ovector_prompts,
        "ablation_method": ablation_method if ablation else None,
        "seed": seed,
        "lens": tp.trajectory.lens,
    }
    return RelationalResult(
        task=work.name,
        kind=work.kind,
        score=tp.score,
        trajectory=tp.trajectory,
        stages=stages,
        ovector=o,
        vectors_norms={name: v.norm for name, v in vectors.items()},
        intervention=effect,
        ablation=abl,
        sweep=swept,
        tuned=tuned,
        config=config,
        notes=tuple(notes),
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )
