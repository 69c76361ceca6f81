"""Direct logit attribution: ``mp.direct_logit_attribution`` against TransformerLens's own.

The problem: SmolLM2's 270 heads, 30 MLPs and the embedding, each one's direct effect on
``logit[capital] - logit[country]`` at the last token of 3-shot capitals prompts (8, 32 and 128
prompts). mechprobe captures every write at the last real token of each prompt in batches of 32
and decodes them through the frozen final norm. TransformerLens's way is a cache of the whole
forward pass per prompt (``run_with_cache``), ``get_full_resid_decomposition`` and
``logit_attrs``; one prompt at a time, as a batch padded on the right would read padding at
``pos_slice=-1`` (the pitfall of the TransformerLens 4.3 notes). Both are timed as a ratio to one
plain forward pass of the same prompts, alternated three times (medians). TransformerLens 4.3's
``logit_attrs`` leaves the final RMSNorm's weight out on a bridge (it assumes the weight folded
into ``W_U``, as ``HookedTransformer.from_pretrained`` does), so its numbers do not add up to the
model's logit difference; the detail compares ours with its stack decoded with the weight, and
says how far its own numbers are off.
"""

from __future__ import annotations

from typing import Any

import torch

import mechprobe as mp
from benchmarks.bench_lens import _interleaved, _row


def _tl_attribution(model: Any, prompt: str, answer: int, wrong: int) -> dict[str, Any]:
    """TransformerLens's direct logit attribution of one prompt (what its docs show), and for
    the agreement check the same stack decoded with the final norm's weight, which
    ``logit_attrs`` leaves out on a bridge whose norm is not folded into ``W_U``."""
    logits, cache = model.run_with_cache(model.to_tokens(prompt))
    stack, labels = cache.get_full_resid_decomposition(
        pos_slice=-1, apply_ln=False, expand_neurons=False, return_labels=True
    )
    attrs = cache.logit_attrs(
        stack, tokens=torch.tensor([answer]), incorrect_tokens=torch.tensor([wrong]), pos_slice=-1
    )[:, 0]
    direction = model.W_U[:, answer] - model.W_U[:, wrong]
    weight = dict(model.ln_final.named_parameters())["_original_component.weight"]
    scale = cache["ln_final.hook_scale"][0, -1]
    weighted = (stack[:, 0] / scale * weight) @ direction
    return {
        "attrs": dict(zip(labels, attrs.tolist(), strict=True)),
        "weighted": dict(zip(labels, weighted.tolist(), strict=True)),
        "sum": float(attrs.sum()),
        "model": float(logits[0, -1, answer] - logits[0, -1, wrong]),
    }


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    task = mp.load_task("capitals").with_shots(3)
    # The prompts mp.direct_logit_attribution(model, task) keeps: capital and country differ.
    firsts = zip(
        mp.core.first_token_ids(model, task.answers()),
        mp.core.first_token_ids(model, task.arguments()),
        strict=True,
    )
    kept = [(p, a, w) for p, (a, w) in zip(task.prompts(), firsts, strict=True) if a != w]
    prompts, answers, arguments = (list(column) for column in zip(*kept, strict=True))
    rows = []
    got: dict[str, Any] = {}  # each side's last output, for the agreement check
    for n in (8, 32, 128):
        some, ans, arg = prompts[:n], answers[:n], arguments[:n]
        metric = mp.logit_diff(ans, arg)

        def ours(some: list[str] = some, metric: Any = metric) -> None:
            got["ours"] = mp.direct_logit_attribution(
                model, some, metric, heads=True, progress=False
            )

        def theirs(some: list[str] = some, ans: list[int] = ans, arg: list[int] = arg) -> None:
            with torch.no_grad():
                got["tl"] = [
                    _tl_attribution(model, p, a, w) for p, a, w in zip(some, ans, arg, strict=True)
                ]

        def forward(some: list[str] = some) -> None:
            batch = mp.tokenize(model, some)
            with torch.no_grad():
                model(batch.tokens, attention_mask=batch.attention_mask)

        timed = _interleaved({"ours": ours, "tl": theirs, "forward": forward}, repeat=3)
        res = got["ours"]
        gap = raw_gap = 0.0
        for i, tl in enumerate(got["tl"]):
            for c, name in enumerate(res.components):
                kind, layer = res.kinds[c], int(res.layer[c])
                key = name if kind == "head" else f"{layer}_mlp_out" if kind == "mlp" else None
                if key is not None:
                    ours_value = float(res.attributions[i, c])
                    gap = max(gap, abs(ours_value - tl["weighted"][key]))
                    raw_gap = max(raw_gap, abs(ours_value - tl["attrs"][key]))
        sums = [(tl["sum"], tl["model"]) for tl in got["tl"]]
        off = max(abs(a - b) for a, b in sums)
        ours_off = float(abs(res.attributions.sum(1) - res.logit_diff).max())
        detail = (
            f"{n} prompts (3-shot capitals, capital minus country), 270 heads + 30 MLPs + "
            f"embedding; largest |ours - TransformerLens| over heads and MLPs {gap:.1e} with the "
            f"final norm's weight applied to TransformerLens's stack; its logit_attrs leaves the "
            f"weight out on the bridge ({raw_gap:.1f} from ours; its rows miss the model's "
            f"logit difference by up to {off:.2f}, ours by {ours_off:.1e})"
        )
        rows.append(
            _row(
                f"direct logit attribution per head, {n} prompts (mp.direct_logit_attribution)",
                timed["ours"],
                timed["forward"],
                baseline="plain forward of the prompts",
                target="none (report)",
                detail=detail,
            )
        )
        rows.append(
            _row(
                f"direct logit attribution per head, {n} prompts: TransformerLens's "
                "run_with_cache + get_full_resid_decomposition + logit_attrs, per prompt / ours",
                timed["tl"],
                timed["ours"],
                baseline="mp.direct_logit_attribution",
                target="none (report)",
                detail=detail,
            )
        )
    return rows
