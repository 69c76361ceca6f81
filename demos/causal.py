"""Causal analyses on SmolLM2-135M-Instruct: the numbers of ``docs/causal.md``.

``python demos/causal.py`` runs all three parts with small defaults (a few minutes on two cores)
and writes ``docs/causal_results.json`` and ``docs/figures/causal_*.png``:

- ``attribution``: attribution patching against exact batched patching on capitals prompt pairs
  (one shot, equal token lengths), the correlation per site kind, layer 0's MLP and the largest
  misses;
- ``trace``: causal tracing with noise (ROME) of the capitals task, the country as the subject;
- ``fv``: function vectors of every built-in task beside random vectors, three draws of random
  heads, the o-vector and the intact model;
- ``fv-layers``: four tasks' function vectors added after every other layer to zero-shot and
  shuffled-label prompts (Todd et al.'s layer sweep, ``mp.function_vector_sweep``);
- ``generate``: what the model says on held-out zero-shot capitals_extractive prompts, intact and
  with that task's function vector added (``mp.generate``, greedy, one line);
- ``dla``: direct logit attribution of the capital's logit over the country's (3-shot capitals
  prompts), per layer's attention and MLP and per head;
- ``das``: distributed alignment search for a name's gender ("Yesterday Mary went to the store
  because" -> " she"): a one-dimensional subspace at the name's token and at the last token, layer
  by layer, beside random subspaces and the whole site;
- ``das-capitals``: DAS of a many-valued variable (the country, so the capital), k = 4;
- ``heads``: head scores (previous-token, duplicate-token, induction) on repeated random tokens,
  and the repeated half's accuracy with the best induction heads ablated beside random heads;
  the best head of each kind looked at on a sentence said twice (``mp.attention_patterns``);
- ``path``: edge attribution (``path_patch(method="attribution")``) against exact path patching,
  every head to the final residual and to the q/k/v inputs of layer 23's heads 1, 4 and 5;
- ``path-mlps``: the same exact paths with the MLPs frozen (the direct path) and live (Wang et
  al.'s default, ``freeze_mlps=False``): what the MLPs between make of each head's change.

``--part attribution|trace|fv|fv-layers|generate|dla|das|das-capitals|path|path-mlps|heads`` runs one part (the JSON keeps the other parts' last numbers);
``--pairs``, ``--items``, ``--prompts`` make them larger; ``--fv-tasks`` picks the tasks of fv
(default all built-in ones; a task file too, such as one of Todd et al.'s datasets,
``function_vectors/dataset_files/abstractive/antonym.json``, with ``--fv-items`` for a seeded
subset of its items) and fv-layers (default four), ``--fv-layer-step`` the layers of fv-layers;
both write each task's row as it ends, keeping the rows of tasks not run. Parts may run in
separate processes side by side: each write re-reads the JSON and replaces its own key (fv and
fv-layers: their task's row) only, atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import mechprobe as mp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "causal_results.json"
FIGURES = ROOT / "docs" / "figures"
LAYER_KINDS = ("resid_pre", "attn_out", "mlp_out")
PARTS = (
    "fv", "fv-layers", "generate", "trace", "attribution", "dla", "das", "das-capitals", "path", "path-mlps",
    "heads",
)  # fmt: skip
HEAD_KINDS = ("head", "q", "k", "v", "pattern", "head_out")
# ROME's token categories, in TraceResult.by_category's order.
CATEGORIES = (
    "first subject token",
    "middle subject tokens",
    "last subject token",
    "first subsequent token",
    "further tokens",
    "last token",
)


def _pairs(model: Any, n_pairs: int) -> tuple[list[str], list[str], list[str], list[str], int]:
    """Capitals pairs (one shot) whose prompts have equal token lengths and differ in one
    token (the country), with single-token answers that differ."""
    task = mp.load_task("capitals").with_shots(1)
    items = []
    for prompt, answer in zip(task.prompts(), task.answers(), strict=True):
        ids = model.to_tokens(prompt)[0].tolist()
        ans = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(ans) == 1:
            items.append((prompt, answer, ids))
    by_len: dict[int, list[tuple[str, str, list[int]]]] = {}
    for item in items:
        by_len.setdefault(len(item[2]), []).append(item)
    clean, corrupt, answers, wrongs, where = [], [], [], [], set()
    for group in sorted(by_len.values(), key=len, reverse=True):
        for a, b in zip(group[::2], group[1::2], strict=False):
            diff = [i for i, (x, y) in enumerate(zip(a[2], b[2], strict=True)) if x != y]
            if len(diff) != 1 or a[1] == b[1]:
                continue
            clean.append(a[0])
            corrupt.append(b[0])
            answers.append(a[1])
            wrongs.append(b[1])
            where.add(diff[0] - len(a[2]))  # from the end
            if len(clean) == n_pairs:
                break
        if len(clean) == n_pairs:
            break
    if len(where) != 1:
        raise ValueError(f"the pairs' countries sit at different offsets from the end: {where}")
    subject = where.pop()
    return clean, corrupt, answers, wrongs, subject


def attribution(model: Any, n_pairs: int) -> dict[str, Any]:
    began = time.perf_counter()
    clean, corrupt, answers, wrongs, subject = _pairs(model, n_pairs)
    metric = mp.logit_diff(answers, wrongs)
    out: dict[str, Any] = {"pairs": list(zip(clean, corrupt, strict=True)), "kinds": {}}
    for kind in LAYER_KINDS + HEAD_KINDS:
        # Exact patching of a cell runs the tokens from its position on: the positions from the
        # country on keep it to minutes (earlier positions are the same in both prompts, where
        # both methods give 0).
        positions: Any = list(range(subject, 0)) if kind in LAYER_KINDS else [subject, -1]
        args = (model, clean, corrupt, kind, positions, metric)
        exact = mp.patch(*args, n_random=0, progress=False)
        approx = mp.attribution_patch(*args, n_random=0, progress=False)
        e, a = exact.effect.ravel(), approx.effect.ravel()
        worst = np.argsort(-np.abs(e - a))[:3]
        top = np.argsort(-np.abs(e))[:20]  # the cells exact patching finds largest
        frame = exact.to_frame()
        row: dict[str, Any] = {
            "positions": str(positions),
            "cells": int(e.size),
            "pearson": float(np.corrcoef(e, a)[0, 1]),
            "sign_agreement_top20": float(np.mean(np.sign(e[top]) == np.sign(a[top]))),
            "exact_abs_max": float(np.abs(e).max()),
            "worst": [
                {
                    "cell": f"{frame['site'][k]} @ {frame['token'][k]!r}",
                    "exact": float(e[k]),
                    "attribution": float(a[k]),
                }
                for k in worst
            ],
        }
        if kind in LAYER_KINDS:
            rest = [r for r in range(exact.effect.shape[0]) if exact.layers[r] != 0]
            row["pearson_without_layer0"] = float(
                np.corrcoef(exact.effect[rest].ravel(), approx.effect[rest].ravel())[0, 1]
            )
            row["layer0"] = {
                "exact": exact.effect[0].round(3).tolist(),
                "attribution": approx.effect[0].round(3).tolist(),
            }
        out["kinds"][kind] = row
        print(f"{kind:>10}: r = {row['pearson']:.3f} over {row['cells']} cells", flush=True)
        if kind == "mlp_out":
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(12, 6))
            exact.plot(ax=axes[0], normalised=False)
            approx.plot(ax=axes[1], normalised=False)
            fig.tight_layout()
            fig.savefig(FIGURES / f"causal_attribution_{kind}.png", dpi=110)
            plt.close(fig)
        if kind == "head":
            _plot_heads(exact, approx, FIGURES / "causal_attribution_head.png")
    out["wall_s"] = round(time.perf_counter() - began, 1)
    return out


def _path_setup(model: Any, n_pairs: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The path-patching parts' call: capitals pairs, every head as a sender, to the final
    residual and to the q/k/v inputs of the three heads that DLA finds moving the answer most
    (layer 23), from the country on: ``(args, keyword arguments)`` of ``mp.path_patch``."""
    clean, corrupt, answers, wrongs, subject = _pairs(model, n_pairs)
    metric = mp.logit_diff(answers, wrongs)
    heads = [  # 3 query heads share a k/v head: heads 4 and 5 read the same k and v
        mp.Site(kind, 23, head=h if kind == "q" else h // 3)
        for h in (1, 4, 5)
        for kind in ("q", "k", "v")
    ]
    receivers: list[Any] = ["final", *dict.fromkeys(heads)]
    args = (model, clean, corrupt, "head", receivers, metric)
    return args, {"positions": list(range(subject, 0)), "n_random": 0}


def path_attribution(model: Any, n_pairs: int) -> dict[str, Any]:
    """Edge attribution (``path_patch(method="attribution")``) against exact path patching:
    every head as a sender, to the final residual and to the q/k/v inputs of the three heads that
    DLA finds moving the answer most (layer 23), on capitals pairs from the country on."""
    args, common = _path_setup(model, n_pairs)
    clean, corrupt = args[1], args[2]
    timed = {}
    for method in ("exact", "attribution"):
        start = time.perf_counter()
        timed[method] = mp.path_patch(*args, method=method, progress=False, **common)
        timed[f"{method}_s"] = round(time.perf_counter() - start, 1)
    exact, approx = timed["exact"], timed["attribution"]
    rows = {}
    for r, name in enumerate(exact.receivers):
        e, a = exact.effect[:, r], approx.effect[:, r]
        ok = np.isfinite(e)
        top = np.argsort(-np.abs(np.where(ok, e, 0)))[:10]
        rows[name] = {
            "paths": int(ok.sum()),
            "pearson": round(float(np.corrcoef(e[ok], a[ok])[0, 1]), 3),
            "sign_agreement_top10": float(np.mean(np.sign(e[top]) == np.sign(a[top]))),
            "exact_abs_max": round(float(np.abs(e[ok]).max()), 3),
            "top3_exact": [exact.senders[k] for k in top[:3]],
            "top3_attribution": [
                exact.senders[k] for k in np.argsort(-np.abs(np.where(ok, a, 0)))[:3]
            ],
        }
        print(name, rows[name], flush=True)
    out = {
        "pairs": list(zip(clean, corrupt, strict=True)),
        "positions": common["positions"],
        "senders": len(exact.senders),
        "receivers": rows,
        "exact_s": timed["exact_s"],
        "attribution_s": timed["attribution_s"],
    }
    print({k: out[k] for k in ("exact_s", "attribution_s")}, flush=True)
    return out


def path_mlps(model: Any, n_pairs: int) -> dict[str, Any]:
    """Exact path patching with the MLPs frozen (the direct path) and live (Wang et al.'s
    default): every head to the final residual and to the q/k/v inputs of layer 23's heads 1, 4
    and 5, on the pairs and positions of :func:`path_attribution`."""
    args, common = _path_setup(model, n_pairs)
    clean, corrupt = args[1], args[2]
    runs, seconds = {}, {}
    for freeze in (True, False):
        start = time.perf_counter()
        runs[freeze] = mp.path_patch(*args, freeze_mlps=freeze, progress=False, **common)
        seconds[freeze] = round(time.perf_counter() - start, 1)
    frozen, live = runs[True], runs[False]
    rows = {}
    for r, name in enumerate(frozen.receivers):
        f, v = frozen.effect[:, r], live.effect[:, r]
        ok = np.isfinite(f)
        rank_f = np.argsort(-np.abs(np.where(ok, f, 0)))
        rank_v = np.argsort(-np.abs(np.where(ok, v, 0)))
        gap = np.abs(np.where(ok, v - f, 0))
        rows[name] = {
            "paths": int(ok.sum()),
            "pearson": round(float(np.corrcoef(f[ok], v[ok])[0, 1]), 3),
            "frozen_abs_max": round(float(np.abs(f[ok]).max()), 3),
            "live_abs_max": round(float(np.abs(v[ok]).max()), 3),
            "top3_frozen": [frozen.senders[k] for k in rank_f[:3]],
            "top3_live": [frozen.senders[k] for k in rank_v[:3]],
            "top10_shared": len(set(rank_f[:10]) & set(rank_v[:10])),
            "largest_gap": {
                "sender": frozen.senders[int(gap.argmax())],
                "frozen": round(float(f[gap.argmax()]), 3),
                "live": round(float(v[gap.argmax()]), 3),
            },
        }
        print(name, rows[name], flush=True)
    out = {
        "pairs": list(zip(clean, corrupt, strict=True)),
        "positions": common["positions"],
        "senders": len(frozen.senders),
        "receivers": rows,
        "frozen_s": seconds[True],
        "live_s": seconds[False],
    }
    print({k: out[k] for k in ("frozen_s", "live_s")}, flush=True)
    return out


def _plot_heads(exact: Any, approx: Any, path: Path) -> None:
    """Layer x head grids of both estimates at the last token (a site x position grid of 270
    heads is unreadable)."""
    import matplotlib.pyplot as plt

    col = list(exact.positions).index(-1)
    layers = sorted(set(exact.layers))
    n_heads = max(h or 0 for h in exact.heads) + 1
    fig, axes = plt.subplots(1, 2, figsize=(10, 6))
    lim = float(np.abs(exact.effect[:, col]).max())
    for ax, res, title in ((axes[0], exact, "exact"), (axes[1], approx, "attribution")):
        grid = np.full((len(layers), n_heads), np.nan)
        for value, layer, head in zip(res.effect[:, col], res.layers, res.heads, strict=True):
            grid[layers.index(layer), head or 0] = value
        image = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(len(layers)), labels=[str(layer) for layer in layers])
        ax.set_xticks(range(n_heads))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{title}: head z at the last token, change of {res.metric}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trace(model: Any, n_items: int) -> dict[str, Any]:
    began = time.perf_counter()
    task = mp.load_task("capitals").subset(n_items, seed=0)
    n_noise, n_random = 10, 1
    res = mp.causal_trace(model, task, n_noise=n_noise, n_random=n_random, progress=False)
    wall_s = round(time.perf_counter() - began, 1)
    res.plot().savefig(FIGURES / "causal_trace_capitals.png", dpi=110, bbox_inches="tight")
    cats = res.by_category()  # [kinds, layers, categories]
    rand = res.by_category(random=True)
    out: dict[str, Any] = {
        "items": n_items,
        "subjects": task.inputs(),
        "n_noise": n_noise,
        "n_random": n_random,
        "wall_s": wall_s,
        "clean": float(res.clean.mean()),
        "corrupted": float(res.corrupted.mean()),
        "noise_level": res.noise_level,
        "window": res.window,
        "summary": res.summary().round(4).to_dict("records"),
    }
    for k, kind in enumerate(res.kinds):
        ie, rie = cats[k], rand[k]  # indirect effects (minus the corrupted run)
        best = np.unravel_index(np.nanargmax(ie), ie.shape)
        out[kind] = {
            "peak_layer": int(res.layers[best[0]]),
            "peak_category": CATEGORIES[best[1]],
            "peak_ie": float(ie[best]),
            "random_ie_there": float(rie[best]),
            "last_subject_token_by_layer": ie[:, CATEGORIES.index("last subject token")]
            .round(4)
            .tolist(),
            "last_token_by_layer": ie[:, CATEGORIES.index("last token")].round(4).tolist(),
        }
    return out


def function_vectors(
    model: Any,
    n_prompts: int,
    tasks: list[str],
    done: Callable[[str, dict], None],
    n_items: int | None = None,
    shots: int | None = None,
) -> dict[str, Any]:
    """Each task's FV beside its controls; ``done(name, row)`` gets each task's row as it ends
    (written into the record's ``function_vectors`` beside the tasks not run). A task is a
    built-in name or a file (a Todd et al. dataset reads as their prompts); ``n_items`` keeps a
    seeded subset of a larger task's items; ``shots``: demonstrations drawn afresh per fit
    prompt (Todd et al.'s 10; None: the task's own)."""
    out: dict[str, Any] = {}
    for source in tasks:
        start = time.perf_counter()
        task = mp.load_task(source)
        total = len(task)
        if n_items is not None and total > n_items:
            task = task.subset(n_items, seed=0)
        name = task.name
        res = mp.function_vector(
            model,
            task,
            shots=shots,
            n_prompts=n_prompts,
            n_random=1,
            n_random_heads=3,
            progress=False,
        )
        out[name] = {
            "source": source if source in mp.list_tasks() else "/".join(Path(source).parts[-2:]),
            "items": len(task),
            "items_in_source": total,
            "shots": len(task.shots),
            "fit_shots": "the task's own" if shots is None else f"{shots} drawn per prompt",
            "n_prompts": n_prompts,
            "layer": res.layer,
            "heads": [list(h) for h in res.heads],
            "accuracy": dict(zip(res.conditions, res.accuracy.round(3).tolist(), strict=True)),
            "norms": dict(zip(res.conditions, np.round(res.norms, 2).tolist(), strict=True)),
            "held_out_items": int(res.correct.shape[1]),
            # Todd et al. count only the items the model answers few-shot (their filter_set)
            "accuracy_solved": dict(
                zip(res.conditions, np.round(res.accuracy_solved, 3).tolist(), strict=True)
            ),
            "solved_items": int((res.correct[res.conditions.index("few-shot")] == 1).sum()),
            "random_heads": [[list(h) for h in draw] for draw in res.random_heads],
            "top_aie": float(res.aie.max()),
            "top_aie_random": float(np.nanmax(res.aie_random)),
            # the commonest top next token per condition and its share of the held-out items
            "top_prediction": {
                row.condition: [row.top_prediction, round(float(row.top_share), 3)]
                for row in res.summary().itertuples()
            },
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(name, out[name]["accuracy"], flush=True)
        done(name, out[name])
        if name == "capitals":
            res.plot().savefig(FIGURES / "causal_fv_capitals.png", dpi=110, bbox_inches="tight")
    return out


def function_vector_layers(
    model: Any, n_prompts: int, tasks: list[str], step: int, done: Callable[[str, dict], None]
) -> dict[str, Any]:
    """Todd et al.'s layer sweep: each task's FV (fitted as in ``fv``) added after every
    ``step``-th layer to zero-shot and shuffled-label few-shot prompts of its held-out items,
    beside one random vector of its norm (``mp.function_vector_sweep``); ``done(name, row)``
    gets each task's row as it ends (a task takes 10-30 minutes on two cores)."""
    out: dict[str, Any] = {}
    for name in tasks:
        res = mp.function_vector(model, name, n_prompts=n_prompts, n_random=1, progress=False)
        start = time.perf_counter()
        sweep = mp.function_vector_sweep(
            model, name, res, layers=range(0, 30, step), n_random=1, progress=False
        )
        seconds = time.perf_counter() - start
        out[name] = {
            "layers": list(sweep.layers),
            "held_out_items": len(sweep.items),
            "baseline": {k: round(v, 3) for k, v in sweep.baseline.items()},
            "accuracy": {
                c: sweep.accuracy[i].round(3).tolist() for i, c in enumerate(sweep.conditions)
            },
            "best_layer": {c: sweep.best_layer(c) for c in sweep.conditions if "random" not in c},
            "fv_layer": sweep.fv_layer,
            "seconds": round(seconds, 1),
        }
        print(name, out[name]["best_layer"], out[name]["baseline"], flush=True)
        if name == "capitals_extractive":
            sweep.plot().savefig(FIGURES / "causal_fv_layers.png", dpi=110, bbox_inches="tight")
        done(name, out[name])
    return out


def generations(model: Any, n_prompts: int, n_items: int = 6) -> dict[str, Any]:
    """Greedy one-line completions of the first held-out zero-shot prompts of
    capitals_extractive, intact and with the task's function vector (fitted as in ``fv``)."""
    res = mp.function_vector(
        model, "capitals_extractive", n_prompts=n_prompts, n_random=1, progress=False
    )
    _, test = mp.load_task("capitals_extractive").split(0.5, seed=0)  # function_vector's split
    held = test.with_shots(0)
    items = held.items[:n_items]
    prompts = [held.prompt(item.input) for item in items]
    fv = {mp.Site("mlp_out", res.layer): mp.Add(res.vector, positions=-1)}
    start = time.perf_counter()
    plain = mp.generate(model, prompts, max_new_tokens=8, stop_strings="\n", progress=False)
    steered = mp.generate(model, prompts, fv, max_new_tokens=8, stop_strings="\n", progress=False)
    seconds = time.perf_counter() - start
    rows = [
        {"input": item.input, "answer": item.output, "intact": a, "function vector": b}
        for item, a, b in zip(items, plain.completions, steered.completions, strict=True)
    ]
    for row in rows:
        print(row, flush=True)
    return {"layer": res.layer, "prompt": prompts[0], "rows": rows, "seconds": round(seconds, 1)}


def direct_attribution(model: Any) -> dict[str, Any]:
    """Which writes put the capital above the country: ``logit[capital] - logit[country]`` at the
    last token of every 3-shot capitals prompt whose answer and argument start with different
    tokens, split into the direct effects of each layer's attention and MLP (and each head)."""
    task = mp.load_task("capitals").with_shots(3)
    with warnings.catch_warnings(record=True) as left_out:  # items whose two tokens coincide
        warnings.simplefilter("always")
        start = time.perf_counter()
        layers = mp.direct_logit_attribution(model, task, progress=False)  # capital vs country
        seconds = time.perf_counter() - start
        heads = mp.direct_logit_attribution(model, task, heads=True, progress=False)
    for warning in left_out[:1]:
        print(warning.message, flush=True)
    prompts = layers.prompts
    gap = float(np.abs(layers.attributions.sum(1) - layers.logit_diff).max())
    layers.plot().savefig(FIGURES / "causal_dla_layers.png", dpi=110, bbox_inches="tight")
    heads.plot().savefig(FIGURES / "causal_dla_heads.png", dpi=110, bbox_inches="tight")

    def top(res: Any, k: int) -> list[dict[str, Any]]:
        frame = res.summary(top=k)
        return [
            {"component": c, "mean": round(float(m), 3), "std": round(float(s), 3)}
            for c, m, s in zip(frame["component"], frame["mean"], frame["spread"], strict=True)
        ]

    out = {
        "prompts": len(prompts),
        "answer_above_argument": round(float((layers.logit_diff > 0).mean()), 3),
        "mean_logit_diff": round(float(layers.logit_diff.mean()), 3),
        "max_gap_sum_vs_model": gap,
        "top_layers": top(layers, 8),
        "top_heads": top(heads, 8),
        "seconds_layers": round(seconds, 1),
    }
    print(out, flush=True)
    return out


def head_kinds(model: Any, n_prompts: int = 20, k: int = 5) -> dict[str, Any]:
    """Previous-token, duplicate-token and induction heads on Olsson et al.'s repeated random
    tokens (``mp.head_scores``), and what the induction heads do: the model's top-1 accuracy on
    the repeated half, intact, with the ``k`` best induction heads zero-ablated, and with ``k``
    other heads drawn at random (three draws)."""
    start = time.perf_counter()
    scores = mp.head_scores(model, n_prompts=n_prompts, progress=False)
    seconds = time.perf_counter() - start
    scores.plot().savefig(FIGURES / "causal_head_scores.png", dpi=110, bbox_inches="tight")
    batch = mp.Batch.from_tokens(np.stack(scores.tokens))
    n = scores.seq_len
    tokens = batch.tokens

    def accuracy(heads: list[tuple[int, int]]) -> dict[str, float]:
        spec = {mp.Site("head", layer, head=h): mp.Ablate() for layer, h in heads}
        logits = mp.run(model, batch, spec, progress=False).logits
        hit = logits[:, :-1].argmax(-1) == tokens[:, 1:]  # [prompts, 2n]: predicts position + 1
        # the first half's tokens are new (random); the second half's repeat the first
        return {
            "first_half": round(float(hit[:, 1:n].float().mean()), 3),
            "repeated_half": round(float(hit[:, n + 1 :].float().mean()), 3),
        }

    best = [(layer, head) for layer, head, _ in scores.top("induction", k)]
    rng = np.random.default_rng(0)
    others = [(layer, h) for layer in scores.layers for h in range(scores.scores.shape[2])]
    others = [cell for cell in others if cell not in best]
    draws = [[others[i] for i in rng.choice(len(others), size=k, replace=False)] for _ in range(3)]
    random_runs = [accuracy(draw) for draw in draws]
    out = {
        "prompts": n_prompts,
        "seq_len": n,
        "seconds": round(seconds, 2),
        # SmolLM2 has no sliding-window layer: every layer's chance is the same.
        "chance": dict(zip(scores.kinds, np.round(scores.chance[:, 0], 4).tolist(), strict=True)),
        "top": {
            kind: [
                {"layer": layer, "head": head, "score": round(score, 3)}
                for layer, head, score in scores.top(kind, k)
            ]
            for kind in scores.kinds
        },
        "accuracy_intact": accuracy([]),
        "accuracy_top_induction_ablated": accuracy(best),
        "accuracy_random_heads_ablated": random_runs,
        "random_heads": [[f"L{layer}H{h}" for layer, h in draw] for draw in draws],
        "patterns": head_patterns(model, scores),
    }
    print(out, flush=True)
    return out


REPEATED = (
    " The old man walked his dog to the park by the river." * 2
)  # both copies tokenised alike


def head_patterns(model: Any, scores: Any) -> dict[str, Any]:
    """The best head of each kind, looked at (``mp.attention_patterns``) on a sentence said twice:
    where its attention goes, read off its pattern by hand (the weight each query of the second
    sentence puts on the token one back, on its own token's first copy, and on the token after
    that copy), and its map drawn with the tokens."""
    best = {kind: scores.top(kind, 1)[0][:2] for kind in scores.kinds}
    sites = [mp.Site("pattern", layer, head=head) for layer, head in best.values()]
    res = mp.attention_patterns(model, REPEATED, sites=sites, progress=False)
    n = res.lengths[0]
    half = (n - 1) // 2  # BOS, then the sentence twice: the copy of query q is q - half
    assert res.tokens[0][1 : half + 1] == res.tokens[0][half + 1 :], res.tokens[0]
    queries = np.arange(half + 1, n)
    out: dict[str, Any] = {"text": REPEATED, "tokens": n}
    for kind, site in zip(best, sites, strict=True):
        w = res.pattern(site)
        out[kind] = {
            "head": f"L{site.layer}H{site.head}",
            "previous_token": round(float(w[queries, queries - 1].mean()), 3),
            "duplicate_token": round(float(w[queries, queries - half].mean()), 3),
            "induction": round(float(w[queries, queries - half + 1].mean()), 3),
            "first_token": round(float(w[queries, 0].mean()), 3),
        }
    res.plot().savefig(FIGURES / "causal_attention_patterns.png", dpi=110, bbox_inches="tight")
    return out


FEMALE = [
    "Jennifer",
    "Jessica",
    "Elizabeth",
    "Maria",
    "Nancy",
    "Betty",
    "Margaret",
    "Sandra",
    "Ashley",
    "Kimberly",
    "Donna",
    "Michelle",
    "Carol",
    "Amanda",
    "Melissa",
    "Deborah",
    "Stephanie",
    "Rebecca",
    "Sharon",
    "Cynthia",
    "Kathleen",
    "Amy",
    "Angela",
    "Anna",
    "Brenda",
    "Pamela",
    "Nicole",
    "Samantha",
    "Katherine",
    "Christine",
    "Emma",
    "Olivia",
    "Catherine",
    "Victoria",
    "Hannah",
    "Mary",
    "Sarah",
    "Laura",
    "Julia",
    "Linda",
    "Susan",
    "Karen",
    "Lisa",
    "Emily",
    "Alice",
    "Grace",
    "Helen",
    "Rachel",
    "Sophie",
]
MALE = [
    "William",
    "Richard",
    "Joseph",
    "Charles",
    "Christopher",
    "Matthew",
    "Anthony",
    "Donald",
    "Andrew",
    "Joshua",
    "Kenneth",
    "Edward",
    "Ronald",
    "Timothy",
    "Jason",
    "Jeffrey",
    "Ryan",
    "Jacob",
    "Gary",
    "Nicholas",
    "Eric",
    "Jonathan",
    "Larry",
    "Justin",
    "Scott",
    "Frank",
    "Benjamin",
    "Gregory",
    "Samuel",
    "Raymond",
    "Patrick",
    "Alexander",
    "John",
    "James",
    "David",
    "Michael",
    "Robert",
    "Peter",
    "Thomas",
    "Daniel",
    "Mark",
    "Paul",
    "Kevin",
    "Brian",
    "George",
    "Steven",
    "Henry",
    "Jack",
]


def alignment_search(model: Any, n_pairs: int, layers: tuple[int, ...]) -> dict[str, Any]:
    """DAS of a name's gender: base and source prompts differ in the name (one token each, the
    model's pronoun right for both), the counterfactual is the source's pronoun and the two-way
    choice is against the base's own; k = 1 at the name's token and at the last token."""
    lead, rest = "Yesterday", " went to the store because"
    tok = model.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    he, she = ids(" he")[0], ids(" she")[0]
    names = [(n, True) for n in FEMALE if len(ids(" " + n)) == 1]
    names += [(n, False) for n in MALE if len(ids(" " + n)) == 1]
    prompts = [f"{lead} {n}{rest}" for n, _ in names]
    logits = mp.run(model, prompts, logit_positions=-1, progress=False).logits[:, 0]
    prefers_she = (logits[:, she] > logits[:, he]).tolist()
    right = [(p, f) for p, (_, f), s in zip(prompts, names, prefers_she, strict=True) if s == f]
    pairs = [(b, s) for b in right for s in right if b[1] != s[1]]
    np.random.default_rng(0).shuffle(pairs)
    pairs = pairs[:n_pairs]
    base, source = [b for (b, _), _ in pairs], [s for _, (s, _) in pairs]
    answer = [she if f else he for (_, f), _ in pairs]
    counterfactual = [she if f else he for _, (_, f) in pairs]
    name_position = -(len(ids(rest)) + 1)
    rows = []
    start = time.perf_counter()
    for layer in layers:
        for where, position in (("name", name_position), ("last", -1)):
            res = mp.das(
                model, base, source, counterfactual, mp.Site("resid_post", layer),
                answer=answer, positions=position, k=1, epochs=8, lr=0.02, progress=False,
            )  # fmt: skip
            row = {
                "layer": layer,
                "position": where,
                **{c: round(v, 3) for c, v in res.iia.items()},
            }
            row["train"] = round(res.iia_train, 3)
            rows.append(row)
            print(row, flush=True)
    out = {
        "names": {"female": sum(f for _, f in names), "male": sum(not f for _, f in names)},
        "pronoun_right": f"{len(right)} of {len(names)}",
        "pairs": len(pairs),
        "held_out_pairs": round(0.5 * len(pairs)),
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    return out


def alignment_search_capitals(model: Any, n_pairs: int) -> dict[str, Any]:
    """DAS of a many-valued variable: which country (and so which capital). One-shot capitals
    prompts whose country and capital are one token each and which the model answers right;
    pairs of two such prompts with different capitals; the counterfactual is the source's
    capital over the whole vocabulary (no two-way choice), k = 4, at the country's token (the
    same offset from the end in every prompt) and at the last token."""
    task = mp.load_task("capitals").with_shots(1)
    tok = model.tokenizer

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    single = [
        (item.input, prompt, ids(answer)[0])
        for item, prompt, answer in zip(task.items, task.prompts(), task.answers(), strict=True)
        if len(ids(" " + item.input)) == 1 and len(ids(answer)) == 1
    ]
    logits = mp.run(model, [p for _, p, _ in single], logit_positions=-1, progress=False).logits
    right = [
        s for s, top in zip(single, logits[:, 0].argmax(-1).tolist(), strict=True) if top == s[2]
    ]
    pairs = [(b, s) for b in right for s in right if b[2] != s[2]]
    np.random.default_rng(0).shuffle(pairs)
    pairs = pairs[:n_pairs]
    base, source = [b[1] for b, _ in pairs], [s[1] for _, s in pairs]
    counterfactual = [s[2] for _, s in pairs]
    country = -len(ids("?\nA:")) - 1  # the template ends "... of {country}?\nA:"
    rows = []
    start = time.perf_counter()
    for layer in (6, 14, 22, 26):
        for where, position in (("country", country), ("last", -1)):
            res = mp.das(
                model, base, source, counterfactual, mp.Site("resid_post", layer), k=4,
                positions=position, epochs=10, lr=0.02, progress=False,
            )  # fmt: skip
            row = {"layer": layer, "position": where}
            row |= {c: round(v, 3) for c, v in res.iia.items()}
            row["train"] = round(res.iia_train, 3)
            rows.append(row)
            print(row, flush=True)
    return {
        "countries": f"{len(right)} of {len(single)} one-token countries answered right",
        "pairs": len(pairs),
        "held_out_pairs": round(0.5 * len(pairs)),
        "k": 4,
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part",
        choices=PARTS,
        action="append",
    )
    parser.add_argument("--pairs", type=int, default=3, help="prompt pairs (attribution)")
    parser.add_argument("--items", type=int, default=3, help="capitals items (trace)")
    parser.add_argument("--prompts", type=int, default=8, help="fit prompts per task (fv)")
    parser.add_argument(
        "--fv-tasks",
        help="tasks of fv (default all) and fv-layers (default capitals,capitals_extractive,"
        "past_tense,uppercase), comma-separated",
    )  # fmt: skip
    parser.add_argument("--fv-layer-step", type=int, default=2, help="every n-th layer (fv-layers)")
    parser.add_argument(
        "--fv-items", type=int, help="fv: a seeded subset of this many items of a larger task"
    )
    parser.add_argument(
        "--fv-shots", type=int, help="fv: demonstrations drawn afresh per fit prompt (Todd: 10)"
    )
    args = parser.parse_args()
    parts = args.part or list(PARTS)
    FIGURES.mkdir(parents=True, exist_ok=True)

    def record(key: str, value: Any, entry: str | None = None) -> None:
        # Re-read before each write: parts run in another process beside this one keep theirs
        # (``entry``: one task's row of ``key``, the other rows as the file has them now), and
        # write atomically, so that a reader never sees half a file.
        now = json.loads(OUT.read_text()) if OUT.exists() else {}
        if entry is None:
            now[key] = value
        else:
            now.setdefault(key, {})[entry] = value
        partial = OUT.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(now, indent=1) + "\n")
        os.replace(partial, OUT)

    chosen = [t for t in (args.fv_tasks or "").split(",") if t]
    for name in chosen:  # a misspelt task before the model loads and earlier tasks run
        mp.load_task(name)
    model = mp.load_model()
    if "fv" in parts:
        function_vectors(
            model, args.prompts, chosen or mp.list_tasks(),
            lambda name, row: record("function_vectors", row, entry=name), args.fv_items,
            args.fv_shots,
        )  # fmt: skip
    if "fv-layers" in parts:
        tasks = chosen or ["capitals", "capitals_extractive", "past_tense", "uppercase"]
        function_vector_layers(
            model, args.prompts, tasks, args.fv_layer_step,
            lambda name, row: record("function_vector_layers", row, entry=name),
        )  # fmt: skip
    if "generate" in parts:
        record("generate", generations(model, args.prompts))
    if "trace" in parts:
        record("trace", trace(model, args.items))
    if "attribution" in parts:
        record("attribution", attribution(model, args.pairs))
    if "dla" in parts:
        record("direct_attribution", direct_attribution(model))
    if "das" in parts:
        record("das", alignment_search(model, 200, (2, 6, 10, 14, 18, 22, 26)))
    if "das-capitals" in parts:
        record("das_capitals", alignment_search_capitals(model, 160))
    if "path" in parts:
        record("path_attribution", path_attribution(model, args.pairs))
    if "path-mlps" in parts:
        record("path_mlps", path_mlps(model, args.pairs))
    if "heads" in parts:
        record("head_scores", head_kinds(model))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
