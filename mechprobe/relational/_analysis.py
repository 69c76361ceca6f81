"""Merullo-style analysis of a relational task in one call: :func:`relational_analysis`.

Steps, each also a public building block:

1. one teacher-forced pass over the items scores them (:func:`mechprobe.score_task`) and keeps
   ``resid_post`` and ``mlp_out`` at the prompt's last token at every layer;
2. early decoding of those gives the X plot and the argument / function / saturation layers
   (:func:`mechprobe.relational._trajectory`, rules in :mod:`mechprobe.relational._trajectory`), and decoding
   ``resid_post - mlp_out`` at the function layer gives the FFN attribution;
3. the o-vector is the mean ``mlp_out`` at the function layer over the correctly answered items
   of a fitting split (or the first ``ovector_prompts`` of them; 1 is Merullo et al.'s setting);
4. on random-word contexts holding each correctly answered item's argument (fit items:
   ``in_domain``; the rest: ``held_out``), the FFN outputs of ``layers`` (default: the function
   layer to the last) are replaced by ``scale * o`` (:func:`mechprobe.ovector_intervention`),
   beside the controls on the same contexts: ``n_random`` random directions of the same norm, the
   o-vector of another task read at the same layer, and the intact model;
5. FFNs are removed top-down in sixths for the task and its extractive (or abstractive)
   counterpart (:func:`mechprobe.relational._ablation`).

When a rule finds no layer (e.g. a model that answers nothing correctly), the o-vector layer falls
back to two thirds of the depth (where Merullo et al. found it in GPT-2) and ``notes`` says so.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from mechprobe.core import Positions
from mechprobe.relational._ablation import Method, ffn_ablation
from mechprobe.relational._contexts import intervention_contexts
from mechprobe.relational._intervention import Mode, ovector_intervention
from mechprobe.relational._ovector import OVector, _model_name, extract_ovector, random_ovector
from mechprobe.relational._result import RelationalResult
from mechprobe.relational._scoring import _forced_pass
from mechprobe.relational._sweep import ovector_sweep
from mechprobe.relational._trajectory import _from_pass
from mechprobe.tasks import Task, as_task, load_task

__all__ = ["RelationalResult", "default_sweep_ranges", "relational_analysis"]

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
    return as_task(value)


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


def default_sweep_ranges(n_layers: int, function_layer: int | None) -> list[tuple[int, int]]:
    """Ranges ``(start, n_layers)`` for every start from ``function_layer - 4`` to the last layer,
    and the same ranges without the last layer (``(start, n_layers - 1)``), which a model whose last
    FFN does the final readout may need.

    Example:
        >>> default_sweep_ranges(30, 27)[:3], len(default_sweep_ranges(30, 27))
        ([(23, 30), (24, 30), (25, 30)], 13)
    """
    f = function_layer if function_layer is not None else (2 * n_layers) // 3
    first = max(0, f - 4)
    to_end = [(s, n_layers) for s in range(first, n_layers)]
    return to_end + [(s, n_layers - 1) for s in range(first, n_layers - 1)]


def _split(n: int, holdout: float, seed: int) -> np.ndarray:
    """``[item]`` True for held-out items (a seeded fraction ``holdout`` of them)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout is a fraction in [0, 1), got {holdout!r}.")
    held = np.zeros(n, dtype=bool)
    n_held = min(round(holdout * n), n - 1)
    held[np.random.default_rng(seed).permutation(n)[:n_held]] = True
    return held


def relational_analysis(
    model: Any,
    task: TaskArg,
    *,
    shots: int = 3,
    n_items: int | None = None,
    layers: Sequence[int] | None = None,
    scale: float = 1.0,
    mode: Mode = "replace",
    positions: Positions = None,
    n_random: int = 3,
    other_task: TaskArg | Literal["auto"] | None = "auto",
    contrast_task: TaskArg | Literal["auto"] | None = "auto",
    holdout: float = 0.5,
    ovector_prompts: int | None = None,
    ablation: bool = True,
    ablation_method: Method = "zero",
    sweep_ranges: Sequence[tuple[int, int]] | Literal["auto"] | None = None,
    sweep_scales: Sequence[float] = (1.0, 2.0, 4.0),
    sweep_contexts: int | None = 64,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
) -> RelationalResult:
    """The whole Merullo-style analysis of one task (see the module docstring for the steps).

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file.
        shots: Demonstrations per prompt.
        n_items: Use a seeded subset of this many items (None: all).
        layers: FFN layers the o-vector is written into (None: function layer to the last).
        scale: Scale of the written vector.
        mode: ``"replace"`` (Merullo et al.) or ``"add"``.
        positions: Positions edited (None: all, as in the paper; ``-1``: last token only).
        n_random: Random-direction controls (seeds ``seed .. seed + n_random - 1``).
        other_task: The task whose o-vector is the other-task control (``"auto"``: a built-in
            pairing; None: skip).
        contrast_task: The task ablated beside this one (``"auto"``: the extractive or abstractive
            counterpart of a built-in task; None: only this task).
        holdout: Fraction of items held out of the o-vector (their contexts are ``held_out``).
        ovector_prompts: Average the o-vector over at most this many correct fit items (1: one
            prompt, as in the paper; None: all).
        ablation: Run the top-down FFN ablation.
        ablation_method: ``"zero"`` or ``"mean"``.
        sweep_ranges: If given, also sweep these half-open layer ranges x ``sweep_scales`` for the
            o-vector and the first random control on the in-domain contexts (``"auto"``:
            :func:`default_sweep_ranges`), then rerun the o-vector and every control at the cell
            with the best o-vector MRR on all contexts (``tuned``: its held-out rows judge it).
        sweep_scales: Scales of the sweep.
        sweep_contexts: Sweep on at most this many in-domain contexts (None: all).
        seed: Seed of the item subset, split, contexts and random controls.
        batch_size: Rows per forward pass.
        progress: Show progress bars.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.relational_analysis(mp.tiny_model(), "capitals", n_items=6, ablation=False,
        ...                              progress=False)
        >>> sorted(res.to_json()["controls"])
        ['intact', 'other_task', 'random']
    """
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0, got {n_random}.")
    base = as_task(task)
    work = _prepare(base, shots, n_items, seed)
    held = _split(len(work), holdout, seed)  # validates holdout before any forward pass
    n_layers = int(model.cfg.n_layers)
    notes: list[str] = []
    say = tqdm.write if progress else (lambda _: None)

    # 1-2. One pass: score, trajectory, stages, FFN attribution; o-vector candidates.
    forced = _forced_pass(
        model, work, kinds=("resid_post", "mlp_out"), batch_size=batch_size, progress=progress
    )
    score = forced.score
    traj = _from_pass(model, work, score, forced.captures)
    stages = traj.stages()
    say(f"{work.name}: accuracy {score.accuracy:.2f}, stages {stages}")
    o_layer = stages.function_layer
    if o_layer is None:
        o_layer = int(layers[0]) % n_layers if layers else (2 * n_layers) // 3
        notes.append(
            f"No function-application layer was found (no correct item with distinct argument "
            f"and answer tokens, or the answer never stays ahead); the o-vector is read at layer "
            f"{o_layer} instead."
        )
    layer_list = list(layers) if layers is not None else list(range(o_layer, n_layers))

    # 3. The o-vector from correct items of the fitting split.
    correct = score.correct
    fit = np.flatnonzero(~held & correct)
    if fit.size == 0:
        fit = np.flatnonzero(~held)
        notes.append("No fit item is answered correctly; the o-vector averages all fit items.")
    if ovector_prompts is not None:
        fit = fit[: max(1, int(ovector_prompts))]
    o = OVector(
        vector=forced.captures["mlp_out"][torch.as_tensor(fit), o_layer].mean(0),
        layer=o_layer,
        source=work.name,
        n_prompts=int(fit.size),
        model=_model_name(model),
        info={"items": [work.items[int(i)].input for i in fit]},
    )
    vectors: dict[str, OVector] = {"ovector": o}
    for k in range(n_random):
        vectors[f"random_{k}"] = random_ovector(o, seed=seed + k)
    other = _resolve_pair(other_task, base, 1)
    if other is not None:
        other = _prepare(other, min(shots, len(other.shots)), _OTHER_TASK_ITEMS, seed)
        try:
            vectors["other_task"] = extract_ovector(
                model, other, o_layer, only_correct=True, batch_size=batch_size
            )
        except ValueError:
            vectors["other_task"] = extract_ovector(model, other, o_layer, batch_size=batch_size)
            notes.append(f"Other task {other.name!r}: no item correct; its o-vector averages all.")

    # 4. The intervention on random-word contexts, every control on the same contexts.
    eligible = np.flatnonzero(correct & traj.distinct)
    if eligible.size == 0:
        eligible = np.flatnonzero(traj.distinct)
        notes.append("No correct item with distinct argument/answer tokens; contexts use all.")
    if eligible.size == 0:
        eligible = np.arange(len(work))
        notes.append("Argument and answer share their first token in every item.")
    args = [work.arguments()[int(i)] for i in eligible]
    contexts = intervention_contexts(args, seed=seed)
    targets = [work.answers()[int(i)] for i in eligible]
    groups = ["held_out" if held[int(i)] else "in_domain" for i in eligible]
    interv = ovector_intervention(
        model,
        vectors,
        contexts,
        targets,
        layers=layer_list,
        scale=scale,
        mode=mode,
        positions=positions,
        arguments=args,
        groups=groups,
        batch_size=batch_size,
        progress=progress,
    )

    # 5. Top-down FFN ablation of this task and its counterpart.
    abl = None
    if ablation:
        contrast = _resolve_pair(contrast_task, base, 0)
        pair = [work]
        if contrast is not None:
            pair.append(_prepare(contrast, min(shots, len(contrast.shots)), n_items, seed))
        abl = ffn_ablation(
            model, pair, method=ablation_method, batch_size=batch_size, progress=progress
        )

    swept, tuned = None, None
    if isinstance(sweep_ranges, str):
        if sweep_ranges != "auto":
            raise ValueError(
                f"sweep_ranges is 'auto', None or (start, stop) pairs, not {sweep_ranges!r}."
            )
        sweep_ranges = default_sweep_ranges(n_layers, o_layer)
    if sweep_ranges is not None:
        # Pick the cell on in-domain contexts only; the held-out ones then judge the choice.
        pick = [i for i, g in enumerate(groups) if g == "in_domain"][:sweep_contexts]
        if not pick:
            pick = list(range(len(contexts)))[:sweep_contexts]
            notes.append("No in-domain context: the sweep cell was chosen on held-out contexts.")
        control = {"random_0": vectors["random_0"]} if n_random else {}
        swept = ovector_sweep(
            model,
            {"ovector": o, **control},
            [contexts[i] for i in pick],
            [targets[i] for i in pick],
            layer_ranges=sweep_ranges,
            scales=sweep_scales,
            mode=mode,
            positions=positions,
            batch_size=batch_size,
            progress=progress,
        )
        (start, stop), best_scale = swept.best("ovector", "mrr")
        tuned = ovector_intervention(
            model,
            vectors,
            contexts,
            targets,
            layers=range(start, stop),
            scale=best_scale,
            mode=mode,
            positions=positions,
            arguments=args,
            groups=groups,
            batch_size=batch_size,
        )
    config = {
        "model": _model_name(model),
        "shots": shots,
        "n_items": n_items,
        "layers": list(interv.layers),
        "ovector_layer": o_layer,
        "scale": scale,
        "mode": mode,
        "positions": positions
        if positions is None or isinstance(positions, int)
        else list(positions),
        "n_random": n_random,
        "other_task": vectors["other_task"].source if "other_task" in vectors else None,
        "holdout": holdout,
        "ovector_prompts": ovector_prompts,
        "ablation_method": ablation_method if ablation else None,
        "seed": seed,
    }
    return RelationalResult(
        task=work.name,
        kind=work.kind,
        score=score,
        trajectory=traj,
        stages=stages,
        ovector=o,
        vectors_norms={name: v.norm for name, v in vectors.items()},
        intervention=interv,
        ablation=abl,
        sweep=swept,
        tuned=tuned,
        config=config,
        notes=tuple(notes),
    )
