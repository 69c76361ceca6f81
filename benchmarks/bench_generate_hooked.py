"""Generation on a HookedTransformer: ``mp.generate`` with TransformerLens's key/value cache.

Needs TransformerLens 3.x (``.venv-tl3/bin/python -m benchmarks.run generate_hooked``; in the
main environment the topic is skipped and its rows stay). The problem is ``bench_generate``'s:
SmolLM2 as a ``HookedTransformer`` completing eight 3-shot capitals prompts (one batch,
left-padded) greedily, 10 and 40 new tokens, no early stop. ``mp.generate`` with the cache (the
default there: the prompt once, then each new token alone) against the same call with
``use_cache=False`` (the whole sequence per token, the bridge's way) and Hugging Face's cached
``generate`` on a fresh copy of the weights; each as a ratio to one plain forward pass of the
prompts, alternated three times (medians). The detail says whether the tokens agree.
"""

from __future__ import annotations

from typing import Any

import torch

import mechprobe as mp
from benchmarks import Skipped
from benchmarks.bench_lens import _interleaved
from mechprobe.core import cache_dir, pad_id

COUNTRIES = ["France", "Poland", "Japan", "Chile", "Egypt", "Kenya", "Norway", "Peru"]


def run(ctx: Any) -> list[dict[str, Any]]:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except (ImportError, AttributeError):
        raise Skipped(
            "needs TransformerLens 3.x: .venv-tl3/bin/python -m benchmarks.run generate_hooked"
        ) from None
    from transformers import AutoModelForCausalLM

    model = mp.load_model(kind="hooked")
    task = mp.load_task("capitals").with_shots(3)
    prompts = [task.prompt(c) for c in COUNTRIES]
    hf = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-f32")
    batch = mp.tokenize(model, prompts, padding_side="left")
    width = batch.tokens.shape[1]
    rows = []
    got: dict[str, Any] = {}  # each side's last output, for the agreement check

    def forward() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    for n in (10, 40):

        def cached(n: int = n) -> None:
            got["ours"] = mp.generate(
                model, prompts, max_new_tokens=n, stop_at_eos=False, progress=False
            )

        def whole(n: int = n) -> None:
            got["whole"] = mp.generate(
                model, prompts, max_new_tokens=n, stop_at_eos=False, use_cache=False,
                progress=False,
            )  # fmt: skip

        def hugging_face(n: int = n) -> None:
            got["hf"] = hf.generate(
                batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=n,
                min_new_tokens=n, do_sample=False, pad_token_id=pad_id(model),
            )  # fmt: skip

        fns = {"ours": cached, "whole": whole, "hf": hugging_face, "forward": forward}
        timed = _interleaved(fns, repeat=3)
        (mine, _), (slow, _), (theirs, _), (fwd, _) = (
            timed[k] for k in ("ours", "whole", "hf", "forward")
        )
        hf_tokens = got["hf"][:, width:].tolist()
        agree = sum(t.tolist() == h for t, h in zip(got["ours"].tokens, hf_tokens, strict=True))
        same = sum(
            a.tolist() == b.tolist()
            for a, b in zip(got["ours"].tokens, got["whole"].tokens, strict=True)
        )
        detail = (
            f"HookedTransformer (TransformerLens {_tl_version()}); forward {fwd:.2f} s; cached "
            f"{mine:.2f} s, use_cache=False {slow:.2f} s, Hugging Face cached {theirs:.2f} s; "
            f"tokens equal Hugging Face's in {agree}/8 prompts and the uncached run's in {same}/8"
        )
        label = f"generate {n} tokens, 8 prompts, HookedTransformer"
        rows += [
            {
                "benchmark": f"{label} (mp.generate, key/value cache)",
                "ratio": mine / fwd,
                "baseline": "plain forward",
                "target": "none (report)",
                "detail": detail,
            },
            {
                "benchmark": f"{label}: use_cache=False / cached",
                "ratio": slow / mine,
                "baseline": "mp.generate (key/value cache)",
                "target": "none (report)",
                "detail": detail,
            },
            {
                "benchmark": f"{label}: cached against Hugging Face's cached generate",
                "ratio": mine / theirs,
                "baseline": "HF generate (KV cache)",
                "target": "none (report)",
                "detail": detail,
            },
        ]
    return rows


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")
