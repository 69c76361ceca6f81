"""Amnesic probing: what the erasure hook adds to a forward pass (target: at most 5%)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

import mechprobe as mp

PROMPTS = [
    f"Q: What is the capital of {c}?\nA:" for c in ["France", "Poland", "Japan", "Chile"]
] * 8
LAYER = 20
# Forwards on a shared 2-core machine vary by 10-40% from call to call (0.82-1.54 s measured for
# this batch), more than the 5% target; medians of a few blocks of calls gave LEACE's hook
# anything from 0.95x to 1.06x for a projection that costs 1 ms of a 1 s forward.
ROUNDS = 16


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    batch = mp.tokenize(model, PROMPTS)
    d = int(model.cfg.d_model)
    site = mp.Site("resid_post", LAYER)

    def plain() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    # Ranks like the country-identity erasures in docs/amnesic.md: INLP removes a few hundred
    # directions (orthogonal), LEACE at most classes - 1 (affine, oblique).
    x = torch.randn(600, d)
    labels = torch.arange(600) % 20
    erasures = {
        "INLP-like, rank 290": mp.random_projection(d, 290, seed=0),
        "LEACE, rank 19": mp.leace(x + 3 * torch.nn.functional.one_hot(labels, d).float(), labels),
    }
    rows = []
    for label, projection in erasures.items():

        def hooked(p: mp.Eraser = projection) -> None:
            with torch.no_grad(), mp.intervene(model, {site: mp.Project(p)}, batch=batch):
                model(batch.tokens, attention_mask=batch.attention_mask)

        # One call of each, back to back, in alternating order, many times: the ratio is the
        # median of the pairs' ratios, so drift on a shared machine hits both sides alike.
        plain()
        hooked()
        base, with_hook = [], []
        for i in range(ROUNDS):
            pair = (hooked, plain) if i % 2 else (plain, hooked)
            seconds = {}
            for fn in pair:
                start = time.perf_counter()
                fn()
                seconds[fn] = time.perf_counter() - start
            base.append(seconds[plain])
            with_hook.append(seconds[hooked])
        forward, erased = statistics.median(base), statistics.median(with_hook)
        ratio = statistics.median(h / b for h, b in zip(with_hook, base, strict=True))
        # The erasure's own work on this batch's activations: what the hook adds at the least.
        acts = torch.randn(*batch.tokens.shape, d)
        alone = ctx.time(lambda p=projection, a=acts: p.apply(a), repeat=20)
        rows.append(
            {
                "benchmark": f"forward with the amnesic hook at layer {LAYER}, all positions "
                f"({label}; 32 prompts)",
                "ratio": ratio,
                "baseline": "plain forward",
                "target": "<= 1.05",
                "detail": f"plain {forward:.3f} s, hooked {erased:.3f} s (medians of {ROUNDS} "
                f"back-to-back pairs; the ratio is the median of the pairs' ratios); the projection "
                f"alone on the batch's activations {alone * 1000:.1f} ms",
            }
        )
    return rows
