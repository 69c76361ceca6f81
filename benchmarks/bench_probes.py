"""Layer-wise probing speed: ``probe_layers`` (one batched fit) against a scikit-learn loop.

Data: 20,000 examples x 30 layers x 576 features (SmolLM2's width), float32, 10 classes. Each layer
has its own class means, whose strength rises and falls with depth (held-out accuracy ~0.4 at the
ends, ~0.98 in the middle), plus anisotropic noise (a 32-direction low-rank part with decaying
scales, like a residual stream's outlier directions) and a per-layer offset. 80/20 stratified split.

mechprobe: ``probe_layers(X, y, l2=1e-3, tol=1e-4)``, all 30 layers, timed end to end (split,
per-layer standardisation, the fit, held-out scoring). Baseline: the loop a user would write, on
the same split: per layer ``StandardScaler`` on the training rows, then
``LogisticRegression(C=1 / (l2 * n_train), tol=1e-4, max_iter=1000)`` (lbfgs, multinomial; the
same objective and tolerance), then scoring, on all 30 layers (about 30 s); its accuracies are
compared with mechprobe's layer by layer. With ``MECHPROBE_BENCH_FULL=1``, also the peak memory of
``probe_layers`` on a 100k x 30 x 576 float16 memory map (3.2 GiB; about a minute to write).

Both sides run on one thread (torch and the BLAS under numpy/scikit-learn), and the ratio divides
process CPU seconds: on a small shared machine wall-clock time swings with the other processes
(two-thread runs erratically so), CPU time of a single-threaded run much less. Wall seconds are in
the detail. Note that scikit-learn keeps float32 input in float32 for lbfgs, so the baseline runs
at the same precision as mechprobe.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import mechprobe as mp
from benchmarks.run import one_thread

_N, _LAYERS, _D, _CLASSES = 20_000, 30, 576, 10
_L2, _TOL = 1e-3, 1e-4


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, _CLASSES, (_N,), generator=gen)
    X = torch.empty(_N, _LAYERS, _D)
    scales = torch.linspace(3, 0.3, 32)
    for layer in range(_LAYERS):
        strength = 0.3 + 0.7 * math.sin(math.pi * layer / (_LAYERS - 1))
        means = torch.randn(_CLASSES, _D, generator=gen) * (2.2 * strength / math.sqrt(_D))
        low_rank = torch.randn(_D, 32, generator=gen) * scales
        noise = torch.randn(_N, 32, generator=gen) @ low_rank.T / math.sqrt(32) * 2
        noise += torch.randn(_N, _D, generator=gen)
        X[:, layer] = means[y] + 0.5 * noise + 2 * torch.randn(_D, generator=gen)
    return X.numpy(), y.numpy()


def run(ctx: Any) -> list[dict[str, Any]]:
    with one_thread():
        rows = _run()
        if os.environ.get("MECHPROBE_BENCH_FULL") == "1":
            rows.append(_large_float16())
        return rows


def _large_float16(n: int = 100_000) -> dict[str, Any]:
    """Peak anonymous memory of ``probe_layers`` on a float16 memory map of n x 30 x 576.

    Anonymous memory (``RssAnon``), not RSS: reading a memory map makes its file pages resident
    too, but those are the page cache's, reclaimable, not allocations.
    """
    rng = np.random.default_rng(0)
    y = rng.integers(0, _CLASSES, n)
    means = rng.normal(size=(_LAYERS, _CLASSES, _D)).astype(np.float32) * 0.15
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "activations.npy"
        out = np.lib.format.open_memmap(path, "w+", np.float16, (n, _LAYERS, _D))
        for start in range(0, n, 5000):
            block = rng.normal(size=(min(5000, n - start), _LAYERS, _D)).astype(np.float32)
            block += means[:, y[start : start + 5000]].transpose(1, 0, 2)
            out[start : start + 5000] = block
        out.flush()
        del out
        X = np.load(path, mmap_mode="r")
        base = _anonymous()
        peak, done = base, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _anonymous())
                time.sleep(0.005)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        wall, cpu = time.perf_counter(), time.process_time()
        result = mp.probe_layers(X, y, l2=_L2, tol=_TOL, progress=False)
        seconds, cpu = time.perf_counter() - wall, time.process_time() - cpu
        done.set()
        thread.join()
        size = X.nbytes
        del X
    return {
        "benchmark": f"probe_layers on a float16 memory map, {n // 1000}k x 30 layers x 576",
        "ratio": (peak - base) / size,
        "baseline": "size of the float16 input",
        "target": "bounded (well under the input)",
        "detail": (
            f"peak anonymous memory +{(peak - base) / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB "
            f"input ({seconds:.1f} s, {cpu:.1f} CPU s, one thread; held-out accuracy "
            f"{result.accuracy.min():.3f}-{result.accuracy.max():.3f}). Layers are fitted in "
            "groups of at most 128 MiB of gathered rows; float16 rows become float32 as they are "
            "gathered."
        ),
    }


def _anonymous() -> int:
    """This process's resident anonymous memory in bytes (Linux ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("RssAnon not found in /proc/self/status (Linux only)")


def _run() -> list[dict[str, Any]]:
    X, y = _data()
    # One timing each (not ctx.time's warm-up + repeats): the scikit-learn loop takes a minute.
    wall, cpu = time.perf_counter(), time.process_time()
    result = mp.probe_layers(X, y, l2=_L2, tol=_TOL, progress=False)
    ours, ours_wall = time.process_time() - cpu, time.perf_counter() - wall

    train, test = train_test_split(np.arange(_N), test_size=0.2, random_state=0, stratify=y)
    layers = list(range(_LAYERS))
    sk_accuracy, sk_iters = [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for layer in layers:
        scaler = StandardScaler().fit(X[train, layer])
        clf = LogisticRegression(C=1.0 / (_L2 * len(train)), tol=_TOL, max_iter=1000)
        clf.fit(scaler.transform(X[train, layer]), y[train])
        sk_accuracy.append(clf.score(scaler.transform(X[test, layer]), y[test]))
        sk_iters.append(int(clf.n_iter_[0]))
    sklearn = time.process_time() - cpu
    sklearn_wall = time.perf_counter() - wall

    gap = (result.accuracy - np.array(sk_accuracy)) * 100  # points
    per_layer = ", ".join(
        f"L{layer} {ours_acc:.4f}/{ref:.4f}"
        for layer, ours_acc, ref in zip(layers, result.accuracy, sk_accuracy, strict=True)
        if layer % 5 == 0
    )
    return [
        {
            "benchmark": "probe_layers: 30 layers x 20k x 576, 10 classes",
            "ratio": sklearn / ours,
            "baseline": "sklearn LogisticRegression loop over layers",
            "target": ">= 10",
            "detail": (
                f"one thread each, CPU seconds (wall in brackets). mechprobe {ours:.1f}s "
                f"[{ours_wall:.1f}s] for all 30 layers (split, scaling, fit, scoring); "
                f"scikit-learn {sklearn:.1f}s [{sklearn_wall:.1f}s] for 30 layers (lbfgs "
                f"iterations {min(sk_iters)}-{max(sk_iters)} per layer); same objective (C = 1/(l2 n_train), l2={_L2}), "
                f"tol={_TOL}, float32. Held-out accuracy range {result.accuracy.min():.3f}-"
                f"{result.accuracy.max():.3f}."
            ),
        },
        {
            "benchmark": "probe_layers accuracy - sklearn accuracy (points, worst layer)",
            "ratio": float(np.abs(gap).max()),
            "baseline": "sklearn LogisticRegression on the same split",
            "target": "<= 1",
            "detail": (
                f"all 30 layers: mean gap {gap.mean():+.3f} points, max |gap| "
                f"{np.abs(gap).max():.3f}; accuracy mechprobe/sklearn at every 5th layer: "
                f"{per_layer}."
            ),
        },
    ]


if __name__ == "__main__":

    class _Ctx:
        pass

    for row in run(_Ctx()):
        print(f"{row['benchmark']}: {row['ratio']:.3f} (target {row['target']})\n  {row['detail']}")
