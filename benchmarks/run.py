"""``make bench``: every figure as a ratio to a baseline measured in the same run.

Each ``benchmarks/bench_<topic>.py`` exposes ``run(ctx) -> list[dict]`` with keys ``benchmark``,
``ratio``, ``baseline``, ``target`` and ``detail``. This runner times them, writes
``benchmarks/results.json`` and prints a markdown table for the README. Absolute seconds drift on
shared machines, ratios much less; absolute figures appear only in ``detail``.

Run one topic with ``python -m benchmarks.run lens`` (names after ``bench_``).
"""

from __future__ import annotations

import gc
import importlib
import json
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import torch
from threadpoolctl import threadpool_limits

import mechprobe as mp

HERE = Path(__file__).parent


@contextmanager
def one_thread() -> Iterator[None]:
    """torch and the BLAS under numpy/scikit-learn on one thread each, restored afterwards: the
    scikit-learn comparisons divide CPU seconds, which a single-threaded run keeps steady on a
    shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


class Context:
    """What a benchmark needs: a lazily loaded SmolLM2, timers, a plain-forward baseline."""

    def __init__(self) -> None:
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = mp.load_model()
        return self._model

    @staticmethod
    def time(fn: Callable[[], Any], repeat: int = 3) -> float:
        """Median wall-clock seconds of ``fn`` over ``repeat`` runs, after one warm-up."""
        fn()
        times = []
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def forward_seconds(self, prompts: Sequence[str], repeat: int = 3) -> float:
        """A plain padded forward pass over ``prompts`` (one batch, no hooks, no grad)."""
        batch = mp.tokenize(self.model, list(prompts))

        def fwd() -> None:
            with torch.no_grad():
                self.model(batch.tokens, attention_mask=batch.attention_mask)

        return self.time(fwd, repeat)

    @staticmethod
    def peak_memory(fn: Callable[[], Any]) -> tuple[float, int]:
        """``(seconds, peak resident bytes above the start)`` of one call, sampled every 5 ms."""
        proc = psutil.Process()
        gc.collect()
        base = proc.memory_info().rss
        peak = base
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        start = time.perf_counter()
        try:
            fn()
        finally:
            seconds = time.perf_counter() - start
            done.set()
            thread.join()
        return seconds, max(0, peak - base)


def _topics(argv: Sequence[str]) -> list[str]:
    found = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [t for t in found if not argv or t in argv]


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | ratio | baseline | target | detail |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['ratio']:.2f}x | {r['baseline']} | {r['target']} | "
            f"{r['detail']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    torch.manual_seed(0)
    ctx = Context()
    rows: list[dict[str, Any]] = []
    for topic in _topics(argv):
        print(f"== {topic}", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.bench_{topic}")
        for row in module.run(ctx):
            row = {"topic": topic, **row}
            rows.append(row)
            print(f"   {row['benchmark']}: {row['ratio']:.2f}x ({row['detail']})", file=sys.stderr)
    path = HERE / "results.json"
    previous = json.loads(path.read_text()) if path.exists() and argv else {"rows": []}
    kept = [r for r in previous.get("rows", []) if r.get("topic") not in set(argv)]
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{psutil.cpu_count()} cores, torch {torch.__version__}"
    )
    result = {"machine": machine, "rows": kept + rows}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(kept + rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
