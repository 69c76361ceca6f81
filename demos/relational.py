"""Merullo-style FFN-update analysis of world capitals on SmolLM2-135M-Instruct.

``python demos/relational.py`` runs the analysis on 40 capitals (3 shots) and prints the stages
of the X, the o-vector beside its controls at the default layer range and at the sweep's best
cell (chosen on in-domain contexts, shown on held-out ones), and the top-down FFN ablation (about
two minutes on a 2-core CPU). ``--out DIR`` also writes result.json, figures and a report.

``python demos/relational.py --docs`` regenerates the findings of ``docs/relational.md``: every
built-in task on 100 items, with the layer-range x scale sweep for the abstractive tasks, writing
``docs/figures/relational_*.png`` and ``docs/figures/relational_results.json`` (about an hour
on two cores; ``--part analysis|arithmetic|ablation`` runs one part, ``--tasks`` some analyses), and every full result under ``out/relational``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np

import mechprobe as mp

ROOT = Path(__file__).resolve().parent.parent
ABSTRACTIVE = ("capitals", "uppercase", "past_tense")
EXTRACTIVE = ("capitals_extractive", "colors_extractive", "past_tense_extractive")


def _print(result: mp.RelationalResult) -> None:
    st = result.stages
    print(
        f"\n== {result.task} ({result.kind}): {result.n_items} items, first-token accuracy "
        f"{result.accuracy:.2f}\n   argument layer {st.argument_layer}, function layer "
        f"{st.function_layer}, saturation layer {st.saturation_layer} "
        f"(of {result.trajectory.n_layers})\n"
    )
    print(result.headline())
    if result.tuned is not None:
        layers, scale = result.tuned.layers, result.tuned.scale  # the sweep's best cell
        print(f"\nAt the sweep's best cell on in-domain contexts (layers {layers[0]}-{layers[-1]}, "
              f"scale {scale:g}), held-out arguments:\n")  # fmt: skip
        print(result.headline("held_out", tuned=True))
    if result.ablation is not None:
        abl = result.ablation
        print("\nFFN ablation, top-down (" + abl.method + "), accuracy by layers removed:")
        print("   " + " ".join(f"{len(r):>5}" for r in abl.removed))
        for t, name in enumerate(abl.tasks):
            print("   " + " ".join(f"{a:5.2f}" for a in abl.accuracy[t]) + f"  {name}")


def demo(out: str | None) -> None:
    model = mp.load_model()
    # The sweep picks a layer range and scale on in-domain contexts; held-out ones then judge it.
    result = mp.relational_analysis(
        model, "capitals", n_items=40, sweep_layers="auto", progress=False
    )
    _print(result)
    if out:
        print(f"\nwrote {result.save(out)}")


def _plain(result: Any) -> dict[str, Any]:
    """A result's fields as plain JSON lists (the docs' record; ``save`` tags its arrays)."""

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(result, f.name)) for f in dataclasses.fields(result)}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def docs(n_items: int, part: str, tasks: tuple[str, ...]) -> None:
    """Figures and a JSON summary for docs/relational.md (``part``: analysis, ablation or all)."""
    model = mp.load_model()
    figures = ROOT / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    path = figures / "relational_results.json"
    summary = _load(path)
    if part in ("analysis", "all"):
        for name in tasks:
            result = mp.relational_analysis(
                model,
                name,
                n_items=n_items,
                ablation=False,  # the ablation part runs each pair once, below
                sweep_layers="auto" if name in ABSTRACTIVE else None,
                progress=True,
            )
            _print(result)
            result.save(ROOT / "out" / "relational" / name)  # full result, outside git
            data = result.to_dict()
            for key in ("format", "version", "details"):
                data.pop(key)
            data["headline"] = result.headline()
            data["headline_held_out"] = result.headline("held_out")
            if result.sweep is not None:
                data["sweep_grid"] = _plain(result.sweep)
                data["headline_tuned"] = result.headline(tuned=True)
                data["headline_tuned_held_out"] = result.headline("held_out", tuned=True)
            summary.setdefault("analysis", {})[name] = data
            result.plot().savefig(figures / f"relational_{name}_x.png", dpi=110)
            result.plot_intervention().savefig(
                figures / f"relational_{name}_intervention.png", dpi=110
            )
            if result.sweep is not None:
                result.plot_sweep(metric="mrr").savefig(
                    figures / f"relational_{name}_sweep.png", dpi=110
                )
            path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if part in ("arithmetic", "all"):
        arithmetic: dict[str, Any] = {"analogies": {}, "offsets": {}}
        for a, b, c in (("Warsaw", "Poland", "France"), ("Paris", "France", "China")):
            arithmetic["analogies"][f"{a} - {b} + {c}"] = mp.analogy(model, a, b, c, top_k=5)
        for name in ABSTRACTIVE:
            task = mp.load_task(name)
            for space in ("embed", "unembed"):
                for candidates in ("vocab", "answers"):
                    res = mp.offset_accuracy(model, task, space=space, candidates=candidates)
                    arithmetic["offsets"][f"{name}/{space}/{candidates}"] = {
                        "n": len(res.offset_ranks),
                        "top1": res.top1,
                        "top5": res.top5,
                        "baseline_top1": res.baseline_top1,
                    }
        summary["arithmetic"] = arithmetic
        path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    if part in ("ablation", "all"):
        runs: list[tuple[str, str, Literal["zero", "mean"]]] = [
            (a, b, "zero") for a, b in zip(ABSTRACTIVE, EXTRACTIVE, strict=True)
        ]
        runs.append(("capitals", "capitals_extractive", "mean"))
        for abstractive, extractive, method in runs:
            pair = [mp.load_task(n).with_shots(3) for n in (abstractive, extractive)]
            pair = [t.subset(n_items, seed=0) if n_items < len(t) else t for t in pair]
            abl = mp.ffn_ablation(model, pair, method=method, progress=True)
            suffix = "" if method == "zero" else f"_{method}"
            abl.plot().savefig(figures / f"relational_{abstractive}_ablation{suffix}.png", dpi=110)
            summary.setdefault("ablation", {})[f"{abstractive}{suffix}"] = _plain(abl)
            path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also save the capitals run (result.json, figures, report)")
    parser.add_argument("--docs", action="store_true", help="regenerate docs/relational.md's data")
    parser.add_argument("--n-items", type=int, default=100, help="items per task with --docs")
    parser.add_argument(
        "--part",
        choices=("analysis", "arithmetic", "ablation", "all"),
        default="all",
        help="with --docs",
    )
    parser.add_argument(
        "--tasks", default=",".join(ABSTRACTIVE + EXTRACTIVE), help="with --docs: which analyses"
    )
    args = parser.parse_args()
    if args.docs:
        docs(args.n_items, args.part, tuple(args.tasks.split(",")))
    else:
        demo(args.out)


if __name__ == "__main__":
    main()
