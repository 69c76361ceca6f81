"""Generation: ``mp.generate`` against Hugging Face's cached ``generate`` and TransformerLens's.

The problem: SmolLM2 completing eight 3-shot capitals prompts (one batch, left-padded) greedily,
10 and 40 new tokens, no early stop. ``mp.generate`` recomputes the whole sequence for every
token (so that an edited position is edited as a cached generation edits it, and because
TransformerLens 4.3's bridge leaves its KV cache empty). Beside it: Hugging Face's ``generate``
with its KV cache on a fresh copy of the same weights (the fastest plain generation a user has,
with no intervention), and the bridge's own ``generate(use_past_kv_cache=False)``, which the
README used to point users to. Each is timed as a ratio to one plain forward pass of the prompts,
alternated three times (medians); the detail says whether the tokens agree with Hugging Face's.
"""

from __future__ import annotations

from typing import Any

import mechprobe as mp
from benchmarks.bench_lens import _interleaved
from mechprobe.core import cache_dir, pad_id

COUNTRIES = ["France", "Poland", "Japan", "Chile", "Egypt", "Kenya", "Norway", "Peru"]


def run(ctx: Any) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    model = ctx.model
    task = mp.load_task("capitals").with_shots(3)
    prompts = [task.prompt(c) for c in COUNTRIES]
    forward = ctx.forward_seconds(prompts)
    hf = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-f32")
    batch = mp.tokenize(model, prompts, padding_side="left")
    pad = pad_id(model)
    width = batch.tokens.shape[1]
    rows = []
    got: dict[str, Any] = {}  # each side's last output, for the agreement check
    for n in (10, 40):

        def ours(n: int = n) -> None:
            got["ours"] = mp.generate(
                model, prompts, max_new_tokens=n, stop_at_eos=False, progress=False
            )

        def cached(n: int = n) -> None:
            got["hf"] = hf.generate(
                batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=pad,
            )  # fmt: skip

        def bridge(n: int = n) -> None:
            got["tl"] = model.generate(
                batch.tokens, max_new_tokens=n, stop_at_eos=False, do_sample=False,
                use_past_kv_cache=False, attention_mask=batch.attention_mask,
                padding_side="left", verbose=False, return_type="tokens",
            )  # fmt: skip

        timed = _interleaved({"ours": ours, "hf": cached, "tl": bridge}, repeat=3)
        (mine, _), (theirs, _), (tl, _) = timed["ours"], timed["hf"], timed["tl"]
        hf_tokens = got["hf"][:, width:].tolist()
        agree = sum(t.tolist() == h for t, h in zip(got["ours"].tokens, hf_tokens, strict=True))
        tl_agree = sum(
            t == h for t, h in zip(got["tl"][:, width:].tolist(), hf_tokens, strict=True)
        )
        detail = (
            f"forward {forward:.2f} s; mp.generate {mine:.2f} s, Hugging Face cached "
            f"{theirs:.2f} s, bridge generate(use_past_kv_cache=False) {tl:.2f} s; tokens equal "
            f"Hugging Face's in {agree}/8 prompts (the bridge's: {tl_agree}/8)"
        )
        rows += [
            {
                "benchmark": f"generate {n} tokens, 8 prompts (mp.generate, whole sequence per "
                "token)",
                "ratio": mine / forward,
                "baseline": "plain forward",
                "target": "none (report)",
                "detail": detail,
            },
            {
                "benchmark": f"generate {n} tokens, 8 prompts: mp.generate against Hugging Face's "
                "cached generate",
                "ratio": mine / theirs,
                "baseline": "HF generate (KV cache)",
                "target": "none (report: the price of no cache)",
                "detail": detail,
            },
            {
                "benchmark": f"generate {n} tokens, 8 prompts: mp.generate against the bridge's "
                "generate without its cache",
                "ratio": mine / tl,
                "baseline": "TL generate (no cache)",
                "target": "<= 1.0",
                "detail": detail,
            },
        ]
    return rows
