"""Foundation figures: load_model cold and warm, capturing every layer's resid_post."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any

import mechprobe as mp
from benchmarks.bench_lens import _interleaved

PROMPTS = [
    f"Q: What is the capital of {c}?\nA:" for c in ["France", "Poland", "Japan", "Chile"]
] * 8


_LOAD = (
    "import time, mechprobe; w, c = time.perf_counter(), time.process_time(); "
    "mechprobe.load_model(); print(time.perf_counter() - w, time.process_time() - c)"
)


def _load_in_fresh_process(cache: str) -> tuple[float, float]:
    """``(wall, CPU)`` seconds of one ``load_model()`` in a new interpreter using ``cache``."""
    env = {**os.environ, "MECHPROBE_CACHE": cache, "MECHPROBE_PROGRESS": "0"}
    out = subprocess.run(
        [sys.executable, "-c", _LOAD], env=env, capture_output=True, text=True, check=True
    )
    wall, cpu = out.stdout.split()[-2:]
    return float(wall), float(cpu)


def run(ctx: Any) -> list[dict[str, Any]]:
    rows = []
    model = ctx.model
    forward = ctx.forward_seconds(PROMPTS)
    n = model.cfg.n_layers
    sites = [mp.Site("resid_post", layer) for layer in range(n)]
    batch = mp.tokenize(model, PROMPTS)

    def captured() -> None:
        mp.run(model, batch, capture=sites, logit_positions=-1, batch_size=None)

    def uncaptured() -> None:
        mp.run(model, batch, logit_positions=-1, batch_size=None)

    # The floor: the same run without the captures. A plain forward decodes every position's
    # logits, which a capture with logit_positions=-1 skips, so the ratio can fall below 1; the
    # capture's own cost is the distance from this floor. Alternated, so that both see the same
    # spells of load: medians of separate blocks put the capture below its floor.
    timed = _interleaved({"capture": captured, "floor": uncaptured}, repeat=5)
    capture, floor = timed["capture"][0], timed["floor"][0]
    rows.append(
        {
            "benchmark": f"capture resid_post at all {n} layers (32 prompts)",
            "ratio": capture / forward,
            "floor": floor / forward,
            "baseline": "plain forward",
            "target": "<= 1.15",
            "detail": f"forward {forward:.2f} s, capture {capture:.2f} s; floor {floor:.2f} s (the "
            "same mp.run without captures: logits at the last position only)",
        }
    )
    # Loading, each in a fresh process as a user meets it: a cold load (dequantising the GGUF into
    # an empty cache), then a warm one from that cache. Import time is not part of either.
    with tempfile.TemporaryDirectory() as tmp:
        cold, cold_cpu = _load_in_fresh_process(tmp)
        warm, warm_cpu = _load_in_fresh_process(tmp)
    one = ctx.forward_seconds(PROMPTS[:1])
    loads = [("cold", cold, cold_cpu, "~15 s"), ("warm", warm, warm_cpu, "<= 3 s")]
    for label, seconds, cpu, target in loads:
        rows.append(
            {
                "benchmark": f"load_model() {label}",
                # The same baseline as the capture row (32 prompts), named so: the detail's
                # one-prompt forward is for scale only.
                "ratio": seconds / forward,
                "baseline": "plain forward of 32 prompts",
                "target": target,
                "detail": f"{seconds:.1f} s, {cpu:.1f} CPU s, in a fresh process "
                f"(one-prompt forward {one * 1000:.0f} ms)",
            }
        )
    return rows
