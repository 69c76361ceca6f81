"""Indirect object identification on SmolLM2-135M-Instruct: a circuit workflow of Wang et al.
(2022) with mechprobe alone, over templates that put the names at different offsets.

``python demos/ioi.py`` (about 10 minutes on two cores) writes ``docs/ioi_results.json`` and
``docs/figures/ioi_*.png``, the numbers of docs/causal.md's "An IOI circuit, end to end":

1. prompts: IOI templates ("When Mary and John went to the store, John gave a drink to"), each
   with name triples in both orders (ABBA, BABA); the corrupt prompt replaces the repeated name
   (S2) by a third name (Wang et al.'s ABC). Named positions IO, S1, S2 and END are found per
   prompt, since the templates put them at different offsets; the metric is the logit of IO
   minus that of S, which the model must get right on the clean prompts;
2. heads: every head's ``z`` patched (clean into corrupt) at S2 and at END, by name;
   attribution patching's estimate of the same cells beside it;
3. circuits: the heads whose patch at END (or at S2) recovers most, kept at that position, every
   other head mean-ablated to its mean over ABC prompts of the same template (three fresh names),
   position by position (``mp.faithfulness``), beside random circuits of the same size kept at the
   same positions, and beside the same means pooled over templates of one token length;
   The same circuits chosen on half the pairs are measured on the other half (held out);
4. knockouts: each part of the circuit alone mean-ablated where it is kept (the ``knockout``
   condition), beside random heads as many;
5. why larger circuits keep less: each head the largest circuit adds to the smallest, added
   alone; for the costliest, where its last-token query attends (IO, S1, S2) in the full model
   and in the circuit run, that run's ablations written by hand with ``mp.run`` and checked
   against ``mp.faithfulness``.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import mechprobe as mp

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "ioi_results.json"
FIGURES = ROOT / "docs" / "figures"
TEMPLATES = [
    "When{A} and{B} went to the store,{S} gave a drink to",
    "When{A} and{B} went to the park,{S} gave a ball to",
    "After{A} and{B} went to the office,{S} handed a letter to",
    "While{A} and{B} were at the house,{S} gave a book to",
    "Then,{A} and{B} had a long argument, and afterwards{S} said to",
    "When{A} and{B} got a snack at the cafe,{S} decided to give it to",
    "Friends{A} and{B} found a bag at the station.{S} gave it to",
    "Yesterday{A} and{B} went to the school.{S} gave a pen to",
]
NAMES = [" Mary", " John", " Tom", " James", " Anna", " Sarah", " David", " Paul", " Lisa",
         " Mark", " Kate", " Peter"]  # fmt: skip
SIZES = (4, 8, 12)  # heads kept at END; half as many at S2
N_RANDOM = 5
N_ABC = 8  # reference prompts per template


def prompts(model: Any) -> dict[str, Any]:
    """Clean and ABC-corrupt prompts, per-prompt named positions, answers and templates."""
    single = [n for n in NAMES if len(model.tokenizer(n, add_special_tokens=False).input_ids) == 1]
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {k: [] for k in ("clean", "corrupt", "io", "s", "template")}
    where: dict[str, list[int]] = {"IO": [], "S1": [], "S2": []}
    for t, template in enumerate(TEMPLATES):
        for order in ("ABBA", "BABA", "ABBA", "BABA"):
            a, b, c = (str(n) for n in rng.choice(single, 3, replace=False))
            io, s = (a, b) if order == "ABBA" else (b, a)
            clean = template.format(A=a, B=b, S=s)
            ids = mp.tokenize(model, [clean]).tokens[0].tolist()
            s_id, io_id = (
                model.tokenizer(x, add_special_tokens=False).input_ids[0] for x in (s, io)
            )
            s_at = [i for i, x in enumerate(ids) if x == s_id]
            where["IO"].append(ids.index(io_id))
            where["S1"].append(s_at[0])
            where["S2"].append(s_at[-1])
            out["clean"].append(clean)
            out["corrupt"].append(template.format(A=a, B=b, S=c))
            out["io"].append(io)
            out["s"].append(s)
            out["template"].append(t)
    out["positions"] = where
    # Wang et al.'s ABC dataset: the same templates with three fresh names, the means' source.
    out["abc"], out["abc_template"] = [], []
    for t, template in enumerate(TEMPLATES):
        for _ in range(N_ABC):
            a, b, c = (str(n) for n in rng.choice(single, 3, replace=False))
            out["abc"].append(template.format(A=a, B=b, S=c))
            out["abc_template"].append(t)
    return out


def _top_heads(heads: mp.PatchResult, pairs: list[int], n: int = 12) -> dict[str, list[mp.Site]]:
    """Per named position, the ``n`` heads whose patch recovers most on ``pairs`` alone."""
    values = heads.per_pair[pairs].mean(axis=0)
    clean, corrupt = heads.clean[pairs].mean(), heads.corrupt[pairs].mean()
    recovery = (values - corrupt) / (clean - corrupt)
    out = {}
    for column, name in enumerate(heads.positions):
        order = np.argsort(-recovery[:, column])[:n]
        out[str(name)] = [
            mp.Site("head", int(heads.layers[i] or 0), head=int(heads.heads[i] or 0)) for i in order
        ]
    return out


def _circuit(top: dict[str, list[mp.Site]], size: int) -> dict[mp.Site, Any]:
    """The top ``size`` heads kept at END and the top ``size // 2`` at S2 (both where both)."""
    circuit: dict[mp.Site, Any] = dict.fromkeys(top["END"][:size], "END")
    for site in top["S2"][: size // 2]:
        circuit[site] = ["S2", "END"] if site in circuit else "S2"
    return circuit


def why_larger_keep_less(
    model: Any, data: dict[str, Any], top: dict[str, list[mp.Site]], faithful: Any
) -> dict[str, Any]:
    """Each head the largest circuit adds to the smallest, added alone; then, for the addition
    that costs most, where its last-token query attends in the full model and in the circuit run,
    that run's ablations written by hand with ``mp.run`` (its metric checked against
    ``faithfulness``'s per-prompt ``circuit`` values)."""
    base = _circuit(top, SIZES[0])
    largest = _circuit(top, SIZES[-1])
    rows = []
    for site, where in largest.items():
        if site in base:
            continue
        res = faithful(base | {site: where})
        rows.append({"head": _label(site), "kept_at": where, "faithfulness": res.faithfulness})
    worst = min(rows, key=lambda row: row["faithfulness"])
    site = next(s for s in largest if _label(s) == worst["head"])
    circuit = base | {site: largest[site]}
    res = faithful(circuit)

    # The circuit run by hand: every head outside the circuit set to its template's ABC mean at
    # every position, a circuit head to that mean at the positions where it is not kept.
    clean, layers = data["clean"], range(int(model.cfg.n_layers))
    z_sites = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    means = {}
    for t in sorted(set(data["template"])):
        abc = [p for p, g in zip(data["abc"], data["abc_template"], strict=True) if g == t]
        out = mp.run(model, abc, capture=z_sites, progress=False)
        means[t] = [out[hook].mean(0) for hook in z_sites]  # [pos, heads, d_head] per layer
    pattern = mp.Site("pattern", site.layer, head=site.head)
    write = mp.Site("head_out", site.layer, head=site.head)  # z @ W_O, what the head adds
    tokens = mp.tokenize(model, clean)
    attention: dict[str, list[list[float]]] = {"full": [], "circuit": []}
    writes: dict[str, list[float]] = {"full": [], "circuit": [], "its ABC mean": []}
    w_o = model.blocks[site.layer].attn.W_O[site.head].detach()
    by_hand = []
    for i, prompt in enumerate(clean):
        n = int(tokens.lengths[i])
        kept_at = {"S2": [data["positions"]["S2"][i]], "END": [n - 1]}
        spec: dict[Any, Any] = {}
        for layer in layers:
            for h in range(int(model.cfg.n_heads)):
                head = mp.Site("head", layer, head=h)
                where = circuit.get(head)
                keep = set() if where is None else {
                    p for name in ([where] if isinstance(where, str) else where)
                    for p in kept_at[name]
                }  # fmt: skip
                ablated = [p for p in range(n) if p not in keep]
                if not ablated:
                    continue
                mean = means[data["template"][i]][layer][:, h]
                spec[head] = mp.Ablate(mean=mean[ablated], positions=ablated)
        io, s = (model.tokenizer(x, add_special_tokens=False).input_ids[0]
                 for x in (data["io"][i], data["s"][i]))  # fmt: skip
        # Its write read by the unembedding's IO - S direction (before the final norm's scale,
        # which is the run's): positive moves the logit difference up.
        direction = (model.W_U[:, io] - model.W_U[:, s]).detach()
        ablated_to = means[data["template"][i]][site.layer][n - 1, site.head] @ w_o
        writes["its ABC mean"].append(float(ablated_to @ direction))
        for condition, edits in (("full", None), ("circuit", spec)):
            out = mp.run(model, [prompt], edits, capture=[pattern, write], progress=False)
            writes[condition].append(float(out[write][0, n - 1] @ direction))
            row = out[pattern][0, n - 1]
            attention[condition].append(
                [float(row[data["positions"][k][i]]) for k in ("IO", "S1", "S2")]
            )
            if condition == "circuit":
                logits = out.logits[0, n - 1]
                by_hand.append(float(logits[io] - logits[s]))
    return {
        "base_heads": len(base),
        "added_alone": [{**row, "faithfulness": round(row["faithfulness"], 3)} for row in rows],
        "costliest": worst["head"],
        "costliest_attention_IO_S1_S2": {
            k: [round(float(v), 3) for v in np.mean(rows_, axis=0)]
            for k, rows_ in attention.items()
        },
        "costliest_write_on_IO_minus_S": {
            k: round(float(np.mean(v)), 2) for k, v in writes.items()
        },
        "by_hand_vs_faithfulness_max_abs": float(np.max(np.abs(np.asarray(by_hand) - res.circuit))),
    }


def _label(site: mp.Site) -> str:
    return f"L{site.layer}H{site.head}"


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    model = mp.load_model()
    data = prompts(model)
    clean, corrupt, template = data["clean"], data["corrupt"], data["template"]
    metric = mp.logit_diff(data["io"], data["s"])
    named = {"S2": data["positions"]["S2"], "END": -1}
    record: dict[str, Any] = {"pairs": len(clean), "templates": len(TEMPLATES)}
    lengths = sorted({int(n) for n in mp.tokenize(model, clean).lengths})
    record["token_lengths"] = lengths
    ends = mp.tokenize(model, clean).lengths.tolist()
    record["s2_offsets_from_end"] = sorted({p - n for p, n in zip(named["S2"], ends, strict=True)})

    # 1. The model must solve the clean prompts, and the corrupt ones must take it away.
    solved = metric.evaluate(model, clean, progress=False)
    broken = metric.evaluate(model, corrupt, progress=False)
    record["clean_logit_diff"] = round(float(solved.mean()), 3)
    record["corrupt_logit_diff"] = round(float(broken.mean()), 3)
    record["clean_solved"] = int((solved > 0).sum())
    print(record, flush=True)

    # 2. Every head at S2 and at END, by name (the templates put S2 at different offsets).
    start = time.perf_counter()
    heads = mp.patch(model, clean, corrupt, "head", named, metric, n_random=0, progress=False)
    record["patch_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    estimate = mp.attribution_patch(model, clean, corrupt, "head", named, metric, progress=False)
    record["attribution_seconds"] = round(time.perf_counter() - start, 1)
    exact, approx = heads.values.ravel(), estimate.values.ravel()
    record["attribution_r"] = round(float(np.corrcoef(exact, approx)[0, 1]), 3)
    top: dict[str, list[mp.Site]] = {}
    record["top_heads"] = {}
    for column, name in enumerate(heads.positions):
        order = np.argsort(-heads.normalised[:, column])
        rows = [(heads.layers[i], heads.heads[i], heads.normalised[i, column]) for i in order[:12]]
        top[str(name)] = [mp.Site("head", int(layer), head=int(h)) for layer, h, _ in rows]
        record["top_heads"][str(name)] = [
            {"head": f"L{layer}H{h}", "normalised": round(float(v), 3)} for layer, h, v in rows
        ]
    heads.plot().savefig(FIGURES / "ioi_heads.png", dpi=110, bbox_inches="tight")
    print(record["top_heads"], flush=True)

    # 3. Faithfulness: the top heads kept at END (and half as many at S2), every other head set
    # to its per-template ABC mean; random circuits of the same size beside them.
    abc = data["abc"]
    groups = (template, data["abc_template"])
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    all_heads = [
        mp.Site("head", layer, head=h) for layer in range(n_layers) for h in range(n_heads)
    ]
    rng = np.random.default_rng(1)

    def faithful(circuit: dict[mp.Site, Any], **how: Any) -> mp.FaithfulnessResult:
        how = {"reference": abc, "groups": groups} | how
        return mp.faithfulness(
            model, clean, circuit, metric, positions=named, progress=False, **how
        )

    def random_like(circuit: dict[mp.Site, Any]) -> dict[mp.Site, Any]:
        picked = rng.choice(len(all_heads), len(circuit), replace=False)
        spots = list(circuit.values())
        return {all_heads[i]: spots[k] for k, i in enumerate(picked)}

    record["abc_prompts_per_template"] = N_ABC
    record["faithfulness"] = []
    for size in SIZES:
        circuit = _circuit(top, size)
        start = time.perf_counter()
        res = faithful(circuit)
        seconds = time.perf_counter() - start
        randoms = [faithful(random_like(circuit)).faithfulness for _ in range(N_RANDOM)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pooled = faithful(circuit, groups=None)  # templates of one length share means
        row = {
            "heads_kept": len(circuit),
            "full": round(res.means["full"], 3),
            "circuit": round(res.means["circuit"], 3),
            "empty": round(res.means["empty"], 3),
            "knockout": round(res.means["knockout"], 3),
            "faithfulness": round(res.faithfulness, 3),
            "ratio": round(res.ratio, 3),
            "random_faithfulness": [round(float(r), 3) for r in randoms],
            "pooled_by_length_faithfulness": round(pooled.faithfulness, 3),
            "pooled_warned": any("several templates" in str(w.message) for w in caught),
            "seconds": round(seconds, 1),
        }
        record["faithfulness"].append(row)
        print(row, flush=True)
        if size == SIZES[-1]:
            res.plot().savefig(FIGURES / "ioi_faithfulness.png", dpi=110, bbox_inches="tight")

    # 3b. Held out: heads chosen on half the pairs (one ABBA and one BABA per template), the
    # circuit's faithfulness measured on the other half, beside random circuits there.
    chosen_on = [i for i in range(len(clean)) if i % 4 < 2]
    held = [i for i in range(len(clean)) if i % 4 >= 2]
    picked_top = _top_heads(heads, chosen_on)
    held_named = {"S2": [named["S2"][i] for i in held], "END": -1}
    held_metric = mp.logit_diff([data["io"][i] for i in held], [data["s"][i] for i in held])

    def held_out(circuit: dict[mp.Site, Any]) -> float:
        return mp.faithfulness(
            model, [clean[i] for i in held], circuit, held_metric, positions=held_named,
            reference=abc, groups=([template[i] for i in held], data["abc_template"]),
            progress=False,
        ).faithfulness  # fmt: skip

    record["held_out"] = []
    for size in SIZES:
        circuit = _circuit(picked_top, size)
        row = {
            "heads_kept": len(circuit),
            "chosen_on_pairs": len(chosen_on),
            "measured_on_pairs": len(held),
            "faithfulness": round(held_out(circuit), 3),
            "random_faithfulness": [
                round(held_out(random_like(circuit)), 3) for _ in range(N_RANDOM)
            ],
        }
        record["held_out"].append(row)
        print(row, flush=True)

    # 4. Each part of the largest circuit alone ablated where it is kept, beside random heads.
    n_end, n_s2 = SIZES[-1], SIZES[-1] // 2
    parts = {
        f"top {n_end} at END": dict.fromkeys(top["END"][:n_end], "END"),
        f"top {n_s2} at S2": dict.fromkeys(top["S2"][:n_s2], "S2"),
    }
    parts[f"random {n_end} at END"] = random_like(parts[f"top {n_end} at END"])
    parts[f"random {n_s2} at S2"] = random_like(parts[f"top {n_s2} at S2"])
    record["knockouts"] = []
    for name, part in parts.items():
        res = faithful(part)
        row = {
            "part": name,
            "knockout": round(res.means["knockout"], 3),
            "change": round(res.means["knockout"] - res.means["full"], 3),
        }
        record["knockouts"].append(row)
        print(row, flush=True)
    # 5. Why larger circuits keep less.
    start = time.perf_counter()
    record["why_larger_keep_less"] = why_larger_keep_less(model, data, top, faithful)
    record["why_larger_keep_less"]["seconds"] = round(time.perf_counter() - start, 1)
    print(record["why_larger_keep_less"], flush=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
