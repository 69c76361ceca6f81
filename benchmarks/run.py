"""``make bench``: every figure as a ratio to a baseline measured in the same run.

Each ``benchmarks/bench_<topic>.py`` exposes ``run(ctx) -> list[dict]`` with keys ``benchmark``,
``ratio``, ``baseline``, ``target`` and ``detail``, and optionally ``floor``: the least the ratio
could be (the unavoidable work as a ratio to the same baseline), printed beside it. This runner
times them, writes ``benchmarks/results.json`` (with the CPU model and flags, the thread count and
the torch build: :func:`describe_cpu`; each row also records the date, CPU and mode of the run
that measured it) and prints a markdown table for the README. Absolute seconds
drift on shared machines, ratios much less; absolute figures appear only in ``detail``.

Run one topic with ``python -m benchmarks.run lens`` (names after ``bench_``).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
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
from benchmarks import Skipped

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


#: The CPU features that decide which kernels PyTorch, MKL and oneDNN run (``/proc/cpuinfo`` names).
CPU_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "hypervisor",
)


def describe_cpu() -> dict[str, Any]:
    """The machine the figures come from: CPU model and flags, threads, and the torch build.

    Ratios move with the CPU (a GEMM-bound baseline gains from AVX-512 or AMX where a memory-bound
    statistic does not), so ``results.json`` records what ran them.
    """
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux; elsewhere the model comes from platform and flags are unknown
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = set(info.get("flags", "").split())
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "vendor": info.get("vendor_id", ""),
        "flags": {flag: flag in flags for flag in CPU_FLAGS} if flags else None,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": {
            "physical": psutil.cpu_count(logical=False),
            "logical": psutil.cpu_count(),
            "usable": len(affinity(0)) if affinity else psutil.cpu_count(),
        },
        "threads": {
            "torch": torch.get_num_threads(),
            "torch_interop": torch.get_num_interop_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS"),
        },
        "torch": {
            "version": torch.__version__,
            "git": torch.version.git_version,
            "blas": blas.group(1) if blas else None,
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "openmp": torch.backends.openmp.is_available(),
        },
        "python": platform.python_version(),
    }


def _commit() -> str | None:
    """The checkout's commit, ``+changes`` when its tracked files differ from it (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "diff", "--quiet", "HEAD", "--", ".", ":!benchmarks/results.json"],
            cwd=HERE.parent,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode else "")


def _topics(argv: Sequence[str]) -> list[str]:
    found = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [t for t in found if not argv or t in argv]


def _ratio(row: dict[str, Any]) -> str:
    """``1.15x``, or ``1.15x (floor 1.04x)`` for a row that knows the least its ratio could be."""
    floor = f" (floor {row['floor']:.2f}x)" if row.get("floor") is not None else ""
    return f"{row['ratio']:.2f}x{floor}"


def _same_cpu(row: dict[str, Any] | None, run: dict[str, Any]) -> bool:
    """Whether a row's record and this run name the same CPU model, flags and torch capability."""
    keys = ("cpu", "cpu_flags", "cpu_capability")
    return row is not None and all(row.get(k) == run[k] for k in keys)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| benchmark | ratio | baseline | target | detail |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            # A "|" inside a cell (|TL - ours|) would split it: markdown needs it escaped.
            "| "
            + " | ".join(
                str(v).replace("|", "\\|")
                for v in (r["benchmark"], _ratio(r), r["baseline"], r["target"], r["detail"])
            )
            + " |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    torch.manual_seed(0)
    cpu = describe_cpu()
    flags = [f for f, on in (cpu["flags"] or {}).items() if on and f != "hypervisor"]
    print(
        f"== {cpu['model']} ({', '.join(flags) or 'flags unknown'}; torch "
        f"{cpu['torch']['version']}, {cpu['torch']['blas']}, {cpu['torch_cpu_capability']}; "
        f"{cpu['threads']['torch']} threads)",
        file=sys.stderr,
        flush=True,
    )
    ctx = Context()
    rows: list[dict[str, Any]] = []
    # Each row says which run measured it: a partial run (some topics) keeps the other topics'
    # rows from earlier runs, possibly on another machine.
    measured = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu["model"],
        "cpu_flags": flags,
        "cpu_capability": cpu["torch_cpu_capability"],
        "threads": cpu["threads"]["torch"],
        "full": os.environ.get("MECHPROBE_BENCH_FULL") == "1",
        "commit": _commit(),
    }
    skipped: set[str] = set()
    for topic in _topics(argv):
        print(f"== {topic}", file=sys.stderr, flush=True)
        module = importlib.import_module(f"benchmarks.bench_{topic}")
        try:
            measured_rows = module.run(ctx)
        except Skipped as why:  # its rows from the environment it needs stay
            print(f"   skipped: {why}", file=sys.stderr, flush=True)
            skipped.add(topic)
            continue
        for row in measured_rows:
            row = {"topic": topic, **row, "measured": measured}
            rows.append(row)
            print(f"   {row['benchmark']}: {_ratio(row)} ({row['detail']})", file=sys.stderr)
    path = HERE / "results.json"
    previous = json.loads(path.read_text()) if path.exists() else {"rows": []}
    ran = set(_topics(argv)) - skipped
    # A run replaces its topics' rows measured on this kind of CPU; rows from another kind (the
    # README's second table) stay until a run there replaces them.
    kept = [
        r
        for r in previous.get("rows", [])
        if r.get("topic") not in ran or not _same_cpu(r.get("measured"), measured)
    ]
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{psutil.cpu_count()} cores, torch {torch.__version__}"
    )
    if argv and "cpu" in previous:  # the top level describes the last run of every topic
        machine, cpu = previous["machine"], previous["cpu"]
    result = {"machine": machine, "cpu": cpu, "rows": kept + rows}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(_table(kept + rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
