"""The default capitals analysis on 150 items, as a multiple of one plain forward over those items.

Contract (issue 5): the default analysis (one layer range, one scale, three random seeds, the
other-task control and the top-down FFN ablation beside the extractive task) costs at most 40
plain forward passes over the same 150 prompts. The analysis runs once (it is minutes long; the
model is already warm from the baseline), the baseline is the median of three.
"""

from __future__ import annotations

import time
from typing import Any

import mechprobe as mp

N_ITEMS = 150


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    task = mp.load_task("capitals").with_shots(3).subset(N_ITEMS, seed=0)
    forward = ctx.forward_seconds(task.prompts())
    stages: dict[str, float] = {}

    start = time.perf_counter()
    result = mp.relational_analysis(model, task, progress=False)
    total = time.perf_counter() - start
    # The one teacher-forced pass alone, for scale (not part of the ratio).
    start = time.perf_counter()
    mp.trajectory(model, task)
    stages["scoring+trajectory pass"] = time.perf_counter() - start
    parts = ", ".join(f"{k} {v / forward:.1f}x" for k, v in stages.items())
    return [
        {
            "benchmark": f"relational_analysis, capitals, {N_ITEMS} items (default settings)",
            "ratio": total / forward,
            "baseline": "plain forward over the same 150 prompts",
            "target": "<= 40",
            "detail": f"forward {forward:.1f} s, analysis {total:.1f} s "
            f"({len(result.intervention.contexts)} contexts x {len(result.intervention.conditions)} "
            f"conditions); alone: {parts}",
        }
    ]
