"""Does SmolLM2's capital-retrieving FFN read a linearly decodable country identity?

Amnesic probing (Elazar et al. 2021) meets Merullo et al.'s function application:

1. Early decoding of the 3-shot capitals task finds the function-application layer ``f`` (the
   first layer from which the capital stays ahead of the country in the logit lens).
2. "Which country is this prompt about?" is learned at the last token of capital questions
   (``country_dataset``: 4 phrasings x 0/1/3 shots), at ``resid_post`` of layers before ``f``,
   at ``mlp_in`` of ``f`` (exactly what that FFN reads) and three layers after ``f``, with
   INLP (Elazar et al.'s stopping rule) and LEACE, on two thirds of the prompts.
3. Each erasure is hooked into the model at the last token and the capitals task is scored again,
   beside three random erasers of the same rank.
4. At ``f``'s FFN input: the information left (linear and MLP probes, 4-fold cross-validated on
   the held-out third, at ``f`` and later layers), and the same subspace erased at every position
   (task, and next-token accuracy, loss and KL on English text).
5. At the earliest layer: whether a linear probe finds the country again in later layers.

Figures: docs/figures/amnesic_sweep.png, amnesic_ffn_input_{inlp,leace}.png,
amnesic_all_positions_{inlp,leace}.png, amnesic_recovery_L*.png, amnesic_inlp.png.
Numbers: docs/amnesic_results.json. Run: ``python demos/amnesic.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from matplotlib.figure import Figure
from sklearn.model_selection import train_test_split

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import mechprobe as mp

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
N_COUNTRIES = 20  # the task items are the same 20 countries the erasure is fitted on
N_TEXTS = 24
N_RANDOM = 3
SEED = 0
METHODS: tuple[Literal["leace", "inlp"], ...] = ("leace", "inlp")


def split(data: mp.ProbingDataset) -> tuple[mp.ProbingDataset, mp.ProbingDataset]:
    """Stratified 2/3 (fit the erasures) and 1/3 (probe what is left after erasure)."""
    fit, held = train_test_split(
        np.arange(len(data)), test_size=1 / 3, random_state=SEED, stratify=list(data.labels)
    )
    return data.subset(sorted(fit.tolist())), data.subset(sorted(held.tolist()))


def sweep_figure(sweeps: dict[str, mp.ErasureSweep], labels: list[str], f: int) -> Figure:
    """Task accuracy and KL by erased site: each method beside its own random controls."""
    fig = Figure(figsize=(10, 3.8))
    acc_ax, kl_ax = fig.subplots(1, 2)
    x = np.arange(len(labels))
    colours = {"leace": "#c44e52", "inlp": "#8172b2"}
    first = next(iter(sweeps.values())).results
    base = [r.mean_std("task_accuracy", "intact")[0] for r in first]
    acc_ax.plot(x, base, "k--", label="intact model")
    for method, sweep in sweeps.items():
        for condition, style in (("erased", "-"), ("random", ":")):
            acc = [r.mean_std("task_accuracy", condition) for r in sweep.results]
            kl = [r.mean_std("task_kl", condition) for r in sweep.results]
            label = f"{method} (rank {'/'.join(str(r.n_removed) for r in sweep.results)})"
            label = label if condition == "erased" else f"random, {method}'s rank"
            for ax, stats in ((acc_ax, acc), (kl_ax, kl)):
                mean = np.asarray([m for m, _ in stats], dtype=float)
                std = np.asarray([s for _, s in stats], dtype=float)
                ax.errorbar(x, mean, yerr=std, fmt=style, marker="o", capsize=3,
                            color=colours[method], label=label)  # fmt: skip
    acc_ax.set_ylabel("capitals task accuracy (first token)")
    kl_ax.set_ylabel("KL(intact || erased) at the answer")
    kl_ax.set_yscale("log")
    for ax in (acc_ax, kl_ax):
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_xlabel(f"erased at the last token (function-application layer f = {f})")
    acc_ax.set_ylim(0, 1)
    acc_ax.legend(fontsize=7)
    fig.suptitle("Erasing which country the prompt is about, before the capital-retrieving FFN")
    fig.tight_layout()
    return fig


def line(name: str, r: mp.AmnesicResult) -> str:
    j = r.headline()
    rand_acc, rand_std = j["random_control_task_accuracy"], j["random_control_task_accuracy_std"]
    return (
        f"{name:<34} rank {r.n_removed:>3}  task acc {j['task_accuracy_before']:.2f} -> "
        f"{j['task_accuracy_after']:.2f} (random {rand_acc:.2f}±{rand_std:.2f})  KL "
        f"{j['task_kl']:.3f} (random {j['random_control_task_kl']:.3f})"
    )


def main() -> dict[str, Any]:
    start = time.perf_counter()
    model = mp.load_model()
    task = mp.load_task("capitals").with_shots(3).subset(N_COUNTRIES, seed=SEED)

    # 1. Where the function is applied (Merullo et al.): the last crossing of the lens "X", read
    # on every capitals item (on a few items the near-zero early ranks make the crossing noisy).
    stages = mp.trajectory(model, mp.load_task("capitals").with_shots(3)).stages()
    f = stages.function_layer
    if f is None or f < model.cfg.n_layers // 2:
        print(f"no clear function layer ({stages}); using 24, where the lens answer appears")
        f = 24
    print(f"stages: {stages}  ({time.perf_counter() - start:.0f} s)")

    # 2. The concept: which country, read at the last token, same countries as the task items.
    data = mp.country_dataset(n_countries=N_COUNTRIES, shots=(0, 1, 3), seed=SEED)
    fit_data, probe_data = split(data)
    # Before the FFN of layer f, at mlp_in f (what that FFN reads: erased there, it is gone for
    # the FFN alone; the residual stream keeps it for later layers), and after.
    sites = [mp.Site("resid_post", layer) for layer in (f - 9, f - 4, f - 1)]
    sites += [mp.Site("mlp_in", f), mp.Site("resid_post", f + 3)]
    labels = [f"L{s.layer}" if s.kind == "resid_post" else f"FFN{f} input" for s in sites]
    main_site = sites[3]
    acts = mp.collect(model, fit_data, sites, progress=False)
    print(f"collected {acts.values.shape} ({time.perf_counter() - start:.0f} s)")

    # 3. Erase at each site (last token), score the task beside random controls of equal rank.
    erasers: dict[str, list[mp.Eraser]] = {m: [] for m in METHODS}
    sweeps: dict[str, mp.ErasureSweep] = {}
    for method in METHODS:
        results = []
        for j, (site, label) in enumerate(zip(sites, labels, strict=True)):
            eraser = mp.fit_erasure(acts.layer(j), acts.labels, method, seed=SEED)
            erasers[method].append(eraser)
            r = mp.amnesic(model, site, eraser, task=task, positions=-1, n_random=N_RANDOM,
                           dropout=False, seed=SEED, progress=False)  # fmt: skip
            results.append(r)
            print(line(f"{method} at {label}", r))
        sweeps[method] = mp.ErasureSweep(method, tuple(results))
    print(f"sweep done ({time.perf_counter() - start:.0f} s)")

    # 4. At the FFN's input: information left there and in later layers (last token, as fitted),
    # then the same subspace erased at every position, scored on the task and on English text.
    text = list(mp.pos_dataset().texts[:N_TEXTS])
    later = [f, f + 2, f + 4, model.cfg.n_layers - 1]
    detail: dict[str, Any] = {}
    for method in METHODS:
        eraser = erasers[method][3]
        last = mp.amnesic(model, main_site, eraser, task=task, probe=probe_data, positions=-1,
                          probe_layers=later, probe_folds=4, n_random=N_RANDOM, seed=SEED,
                          progress=False)  # fmt: skip
        everywhere = mp.amnesic(model, main_site, eraser, text=text, task=task, positions="all",
                                n_random=N_RANDOM, seed=SEED, progress=False)  # fmt: skip
        print(line(f"{method} at FFN{f} input, all positions", everywhere))
        print(last.summary().round(3).to_string())
        print(everywhere.summary().round(3).to_string())
        last.plot().savefig(FIGURES / f"amnesic_ffn_input_{method}.png", dpi=130)
        everywhere.plot().savefig(FIGURES / f"amnesic_all_positions_{method}.png", dpi=130)
        detail[method] = {"last_token": last.to_dict(), "all_positions": everywhere.to_dict()}

    # 5. Why the early erasures cost nothing: is the country back at the last token later on?
    early = mp.amnesic(model, sites[0], erasers["leace"][0], probe=probe_data, positions=-1,
                       probe_layers=[f - 9, f - 4, f - 1, f + 3], probe_folds=4, n_random=1,
                       mlp=False, seed=SEED, progress=False)  # fmt: skip
    print(early.summary().round(3).to_string())
    early.plot().savefig(FIGURES / f"amnesic_recovery_L{f - 9}.png", dpi=130)
    detail["early_leace_recovery"] = early.to_dict()
    inlp_fig = Figure(figsize=(6, 3.6))
    erasers["inlp"][3].plot(ax=inlp_fig.add_subplot())
    inlp_fig.suptitle(f"INLP on 'which country' at FFN{f}'s input (mlp_in {f})", fontsize=9)
    inlp_fig.tight_layout()
    inlp_fig.savefig(FIGURES / "amnesic_inlp.png", dpi=130)
    sweep_figure(sweeps, labels, f).savefig(FIGURES / "amnesic_sweep.png", dpi=130)

    record = {
        "model": "SmolLM2-135M-Instruct",
        "stages": {"argument": stages.argument_layer, "function": f},
        "n_countries": N_COUNTRIES,
        "fit_prompts": len(fit_data),
        "probe_prompts": len(probe_data),
        "sites": labels,
        "sweep": {m: [r.to_dict() for r in s.results] for m, s in sweeps.items()},
        "ffn_input": detail,
        "seconds": round(time.perf_counter() - start),
    }
    (ROOT / "docs" / "amnesic_results.json").write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"wrote docs/figures/amnesic_*.png and docs/amnesic_results.json in {record['seconds']} s"
    )
    return record


if __name__ == "__main__":
    main()
