"""Activation datasets: collect() against a plain forward pass, and its peak memory when streaming.

1. ``collect`` of every token of 32 texts of about 30 tokens at all 30 layers' resid_post, divided
   by a plain forward pass over the same 32 texts (target <= 1.2).
2. Peak resident memory of ``collect`` streaming float16 rows to a folder (memory budget 1 MiB), at
   two sizes, to show it does not grow with the number of tokens. Collecting 100k tokens takes
   about five minutes on a 2-core CPU, so only ``MECHPROBE_BENCH_FULL=1`` measures 100k tokens;
   no size is extrapolated.
"""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import mechprobe as mp

N_TEXTS = 32
REPEAT = 5
TARGET_TOKENS = 100_000
FULL = os.environ.get("MECHPROBE_BENCH_FULL") == "1"
STREAM_TOKENS = (2_000, 6_000, TARGET_TOKENS) if FULL else (2_000, 6_000)


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the last block (the collect floor)."""


def _texts(model: Any, n: int, min_tokens: int, max_tokens: int) -> list[str]:
    """The first ``n`` POS sentences (joined in pairs where short) of min..max tokens."""
    out: list[str] = []
    pending = ""
    for text in mp.pos_dataset(min_count=1).texts:
        pending = f"{pending} {text}".strip()
        length = len(model.tokenizer(pending, add_special_tokens=False)["input_ids"])
        if length >= min_tokens:
            if length <= max_tokens:
                out.append(pending)
            pending = ""
        if len(out) == n:
            return out
    raise RuntimeError("Not enough sentences for the benchmark.")


def _stream_texts(model: Any, tokens: int) -> list[str]:
    texts = list(mp.pos_dataset(min_count=1).texts)
    out: list[str] = []
    total = 0
    while total < tokens:
        text = texts[len(out) % len(texts)]
        out.append(text)
        total += len(model.tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    layers = model.cfg.n_layers
    texts = _texts(model, N_TEXTS, 26, 34)
    n_tokens = int(mp.tokenize(model, texts).lengths.sum()) - len(texts)  # without BOS
    batch = mp.tokenize(model, texts)

    def plain_forward() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    def collect() -> None:
        mp.collect(model, texts, "resid_post", positions="all", batch_size=N_TEXTS, progress=False)

    last = f"blocks.{layers - 1}.hook_resid_post"

    def to_last_block() -> None:
        # collect's floor: the forward pass up to the last block's output, where collect stops
        # (it never unembeds); a plain forward also decodes every position's logits.
        def stop(activation: torch.Tensor, hook: Any) -> None:
            raise _Stop

        with torch.no_grad(), contextlib.suppress(_Stop):
            model.run_with_hooks(
                batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(last, stop)]
            )

    # Interleaved pairs, wall and CPU time: on a shared machine the load drifts between runs, and
    # the median of per-pair ratios is far steadier than a ratio of two separate medians.
    plain_forward()  # warm-up
    collect()
    to_last_block()
    wall, cpu, floor, fwd_s, col_s = [], [], [], [], []
    for _ in range(REPEAT):
        (fw, fc), (cw, cc) = _timed(plain_forward), _timed(collect)
        (lw, _) = _timed(to_last_block)
        wall.append(cw / fw)
        cpu.append(cc / fc)
        floor.append(lw / fw)
        fwd_s.append(fw)
        col_s.append(cw)
    rows = [
        {
            "benchmark": f"collect all {n_tokens} tokens x {layers} layers ({N_TEXTS} texts)",
            "ratio": float(np.median(wall)),
            "floor": float(np.median(floor)),
            "baseline": "plain forward",
            "target": "<= 1.2",
            "detail": f"median of {REPEAT} interleaved pairs; forward {np.median(fwd_s):.2f} s, "
            f"collect {np.median(col_s):.2f} s; CPU-time ratio {np.median(cpu):.2f}; floor: the "
            "forward to the last block's output, where collect stops (it never unembeds)",
        }
    ]
    # What one plain forward pass of a 32-text chunk costs in memory: collect's floor.
    _, chunk_peak = ctx.peak_memory(plain_forward)
    for tokens in STREAM_TOKENS:
        stream = _stream_texts(model, tokens)
        with tempfile.TemporaryDirectory() as folder:
            secs, peak = ctx.peak_memory(
                lambda stream=stream, folder=folder: mp.collect(
                    model,
                    stream,
                    "resid_post",
                    positions="all",
                    dtype="float16",
                    memory_budget=1 << 20,
                    out_dir=folder,
                    progress=False,
                )
            )
        size = tokens * layers * model.cfg.d_model * 2
        rows.append(
            {
                "benchmark": f"collect {tokens // 1000}k tokens x {layers} layers, float16 to disk "
                "(measured)",
                "ratio": peak / size,
                "baseline": "size of the float16 result",
                "target": "flat in tokens",
                "detail": f"peak RSS +{peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB result "
                f"(one plain forward of a 32-text chunk: +{chunk_peak / 2**20:.0f} MiB), "
                f"{secs:.0f} s ({tokens / secs:.0f} tokens/s)",
            }
        )
    return rows
