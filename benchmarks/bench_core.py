"""Foundation figures: load_model cold and warm, capturing every layer's resid_post."""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import mechprobe as mp

PROMPTS = [
    f"Q: What is the capital of {c}?\nA:" for c in ["France", "Poland", "Japan", "Chile"]
] * 8


def run(ctx: Any) -> list[dict[str, Any]]:
    rows = []
    model = ctx.model
    forward = ctx.forward_seconds(PROMPTS)
    n = model.cfg.n_layers
    sites = [mp.Site("resid_post", layer) for layer in range(n)]
    batch = mp.tokenize(model, PROMPTS)
    capture = ctx.time(
        lambda: mp.run(model, batch, capture=sites, logit_positions=-1, batch_size=None)
    )
    rows.append(
        {
            "benchmark": f"capture resid_post at all {n} layers (32 prompts)",
            "ratio": capture / forward,
            "baseline": "plain forward",
            "target": "<= 1.15",
            "detail": f"forward {forward:.2f} s, capture {capture:.2f} s",
        }
    )
    # Loading: a cold load (dequantising the GGUF into an empty cache) and a warm one.
    with tempfile.TemporaryDirectory() as tmp:
        saved = os.environ.get("MECHPROBE_CACHE")
        os.environ["MECHPROBE_CACHE"] = tmp
        try:
            start = time.perf_counter()
            mp.load_model()
            cold = time.perf_counter() - start
            start = time.perf_counter()
            mp.load_model()
            warm = time.perf_counter() - start
        finally:
            if saved is None:
                os.environ.pop("MECHPROBE_CACHE")
            else:
                os.environ["MECHPROBE_CACHE"] = saved
    one = ctx.forward_seconds(PROMPTS[:1])
    for label, seconds, target in [("cold", cold, "~15 s"), ("warm", warm, "<= 3 s")]:
        rows.append(
            {
                "benchmark": f"load_model() {label}",
                "ratio": seconds / forward,
                "baseline": "plain forward",
                "target": target,
                "detail": f"{seconds:.1f} s (one-prompt forward {one * 1000:.0f} ms)",
            }
        )
    return rows
