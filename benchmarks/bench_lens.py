"""Logit-lens figures: against a plain forward pass, TransformerLens's own logit lens, a hand loop.

32 one-shot capital prompts of 27-31 tokens on SmolLM2-135M-Instruct (30 layers, vocab 49,152).
Every ratio divides two timings taken in this run, interleaved round by round; the CPU-time ratio
is in the detail too (on a shared machine it is often steadier than wall-clock time).

Each lens row also has a floor: the work no lens can avoid, as a ratio to the same baseline. That is
the forward pass up to the last block (``mp.run`` with the last position's logits: no unembedding
of every position) plus the bare unembedding of exactly the vectors the row decodes (final norm and
one matmul per 256 vectors into a buffer made once, no statistics). The distance from the floor to
the ratio is what the lens's own statistics, gathers and bookkeeping cost.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import mechprobe as mp
from mechprobe.core import pad_id, pad_rows

_TASK = mp.load_task("capitals").with_shots(1)
PROMPTS = _TASK.prompts()[:32]
ANSWERS = _TASK.answers()[:32]


def _interleaved(fns: dict[str, Callable[[], Any]], repeat: int) -> dict[str, tuple[float, float]]:
    """``{name: (wall s, CPU s)}``: medians over ``repeat`` rounds that run every function in turn.

    Interleaving puts each ratio's two timings side by side in time, so load drifting on a shared
    machine moves both; one warm-up run of each comes first.
    """
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            gc.collect()
            start_cpu, start = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in fns}


def _row(
    name: str,
    num: tuple[float, float],
    den: tuple[float, float],
    floor: tuple[float, float] | None = None,
    **kw: str,
) -> dict:
    row = {
        "benchmark": name,
        "ratio": num[0] / den[0],
        "baseline": kw["baseline"],
        "target": kw["target"],
        "detail": f"{kw['detail']}; CPU-time ratio {num[1] / den[1]:.2f}"
        f" ({num[0]:.2f} s vs {den[0]:.2f} s wall)",
    }
    if floor is not None:
        row["floor"] = floor[0] / den[0]
        row["detail"] += f"; floor {floor[0]:.2f} s (CPU-time floor {floor[1] / den[1]:.2f})"
    return row


def _sum(*timings: tuple[float, float]) -> tuple[float, float]:
    return sum(t[0] for t in timings), sum(t[1] for t in timings)


def _bare_unembedding(model: Any, x: torch.Tensor) -> Callable[[], None]:
    """The unembedding of the rows of ``x [n, d_model]`` alone: final norm and one matmul per 256
    rows into a buffer made once (what the lens's readout does before any statistic)."""
    weight, bias = model.W_U, model.b_U
    out = torch.empty(256, weight.shape[1])

    def unembed() -> None:
        with torch.no_grad():
            for s in range(0, x.shape[0], 256):
                normed = model.ln_final(x[None, s : s + 256])[0]
                torch.addmm(bias, normed, weight, out=out[: normed.shape[0]])

    return unembed


def _to_last_block(model: Any, batch: Any) -> Callable[[], None]:
    """The forward pass a lens needs: up to the last block, only the last position decoded."""
    return lambda: mp.run(model, batch, logit_positions=-1, batch_size=None)


def run(ctx: Any) -> list[dict[str, Any]]:
    from transformer_lens.tools.analysis import logit_lens as tl_logit_lens

    model = ctx.model
    n_layers, vocab = int(model.cfg.n_layers), int(model.cfg.d_vocab)
    batch = mp.tokenize(model, PROMPTS)
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(n_layers)]

    def forward() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    def ours_last() -> mp.LensResult:
        return mp.logit_lens(model, PROMPTS)

    def ours_targets() -> mp.LensResult:
        return mp.logit_lens(model, PROMPTS, targets=ANSWERS)

    def ours_all() -> mp.LensResult:
        return mp.logit_lens(model, PROMPTS, positions="all", top_k=1)

    def hand_last() -> None:
        # The obvious loop: cache every resid_post, decode each layer at the last real token.
        with torch.no_grad():
            _, cache = model.run_with_cache(
                batch.tokens, attention_mask=batch.attention_mask, names_filter=names
            )
            rows = torch.arange(len(batch))
            final = None
            for name in reversed(names):
                x = cache[name][rows, batch.last_index]
                logprobs = model.unembed(model.ln_final(x[None]))[0].log_softmax(-1)
                if final is None:
                    final = logprobs
                logprobs.topk(10)
                -(logprobs.exp() * logprobs).sum(-1)
                (final.exp() * (final - logprobs)).sum(-1)

    captured = mp.run(model, batch, capture=names, logit_positions=-1)
    real = batch.attention_mask.bool()
    rows_b = torch.arange(len(batch))
    last_vecs = torch.cat([captured[name][rows_b, batch.last_index] for name in names])
    all_vecs = torch.cat([captured[name][real] for name in names])

    def bare_unembed() -> None:
        # The work no all-positions lens can avoid: unembed every layer at every real position.
        with torch.no_grad():
            for name in names:
                x = captured[name][real]
                for s in range(0, x.shape[0], 256):
                    model.unembed(model.ln_final(x[None, s : s + 256]))

    # The teacher-forced rows: prompt + answer where the answer spans several tokens.
    answer_ids = [t[0] for t in ours_targets().target_tokens]
    prompt_ids = [batch.tokens[b, real[b]].tolist() for b in range(len(batch))]
    forced = [p + list(a) if len(a) > 1 else p for p, a in zip(prompt_ids, answer_ids, strict=True)]
    forced_batch = pad_rows(forced, pad_id(model), "right", list(PROMPTS))
    n_forced = sum(len(a) - 1 for a in answer_ids)
    forced_vecs = torch.cat([last_vecs, all_vecs[: n_forced * n_layers]])  # the same count

    first = _interleaved(
        {
            "forward": forward,
            "to_last": _to_last_block(model, batch),
            "unembed_last": _bare_unembedding(model, last_vecs),
            "to_last_forced": _to_last_block(model, forced_batch),
            "unembed_forced": _bare_unembedding(model, forced_vecs),
            "last": ours_last,
            "targets": ours_targets,
            "hand": hand_last,
            "tl": lambda: tl_logit_lens(model, PROMPTS, top_k=10),
        },
        repeat=3,
    )
    second = _interleaved(
        {
            "forward": forward,
            "bare": bare_unembed,
            "to_last": _to_last_block(model, batch),
            "unembed_all": _bare_unembedding(model, all_vecs),
            "all": ours_all,
            "tl": lambda: tl_logit_lens(model, PROMPTS, positions=None, top_k=1),
        },
        repeat=2,
    )
    fwd, last, targeted, hand, tl_last = (
        first[k] for k in ("forward", "last", "targets", "hand", "tl")
    )
    fwd2, bare, every, tl_all = (second[k] for k in ("forward", "bare", "all", "tl"))
    floor_last = _sum(first["to_last"], first["unembed_last"])
    floor_targets = _sum(first["to_last_forced"], first["unembed_forced"])
    floor_all = _sum(second["to_last"], second["unembed_all"])
    answer_tokens = [len(a) for a in answer_ids]
    n_multi, n_cont = sum(n > 1 for n in answer_tokens), sum(n - 1 for n in answer_tokens)
    positions = int(real.sum())
    rows = [
        _row(
            f"logit lens, last token, {n_layers} layers (top-10, entropy, KL)",
            last,
            fwd,
            floor_last,
            baseline="plain forward",
            target="<= 1.3",
            detail=f"32 prompts x {n_layers} resid_post",
        ),
        _row(
            "logit lens, last token + teacher-forced answers",
            targeted,
            fwd,
            floor_targets,
            baseline="plain forward",
            target="none (more work than a forward: one decode per answer token and layer)",
            detail=f"{n_multi}/32 answers span several tokens ({n_cont} tokens after the first): "
            "those rows run prompt + answer, and each such token costs one more full-vocabulary "
            f"decode per layer ({n_cont * n_layers} decodes on top of {32 * (n_layers + 1)})",
        ),
        _row(
            "logit lens, all positions (top-1, entropy, KL)",
            every,
            _sum(fwd2, bare),
            floor_all,
            baseline="plain forward + bare unembedding",
            target="<= 1.3",
            detail=f"{positions} positions x {n_layers} layers; bare unembedding {bare[0]:.2f} s",
        ),
        _row(
            "TransformerLens tools.analysis.logit_lens, last token, top-10",
            tl_last,
            last,
            baseline="mechprobe logit_lens",
            target=">= 1.0",
            detail="TL reads position -1 of right-padded rows (pad tokens for shorter prompts)",
        ),
        _row(
            "TransformerLens tools.analysis.logit_lens, all positions, top-1",
            tl_all,
            every,
            baseline="mechprobe logit_lens",
            target=">= 1.0",
            detail="TL also decodes padding positions",
        ),
        _row(
            "hand-written per-layer loop (run_with_cache), last token",
            hand,
            last,
            baseline="mechprobe logit_lens",
            target=">= 1.0",
            detail="log_softmax, top-10, entropy, KL per layer",
        ),
    ]
    n_long = int(mp.tokenize(model, LONG_PROMPT).lengths[0])
    rows += _memory(n_layers, vocab, int(batch.tokens.shape[1]), positions, n_long)
    return rows


LONG_PROMPT = " ".join(PROMPTS[:16])  # one prompt of ~420 tokens


def _workload(model: Any, kind: str) -> Callable[[], Any]:
    batch = mp.tokenize(model, PROMPTS if kind.endswith("32") else LONG_PROMPT)

    def forward() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    if kind.startswith("forward"):
        return forward
    prompts = PROMPTS if kind.endswith("32") else [LONG_PROMPT]
    return lambda: mp.logit_lens(model, prompts, positions="all", top_k=1)


def _fresh_peak(kind: str) -> int:
    """Peak resident memory of one call of a workload, in a fresh process.

    In the benchmark's own process the allocator keeps memory freed by earlier runs, so a later
    run's peak would hide in it; a new process (model loaded, then one call) shows the real peak.
    """
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_lens", "peak", kind],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


def _memory(
    n_layers: int, vocab: int, width: int, positions: int, n_long: int
) -> list[dict[str, Any]]:
    mib = 2**20
    peaks = {kind: _fresh_peak(kind) for kind in ("forward32", "lens32", "forward1", "lens1")}
    full = 32 * n_layers * width * vocab * 4
    long_full = n_layers * n_long * vocab * 4
    return [
        {
            "benchmark": "peak memory, all-positions lens (32 prompts)",
            "ratio": peaks["lens32"] / full,
            "baseline": "[batch, layers, pos, vocab] float32",
            "target": "< 1 (bounded)",
            "detail": f"peak +{peaks['lens32'] / mib:.0f} MiB vs {full / mib:.0f} MiB for the full "
            f"tensor ({positions} real positions, padded width {width}); a plain forward of the "
            f"same batch peaks at +{peaks['forward32'] / mib:.0f} MiB (fresh processes)",
        },
        {
            "benchmark": f"peak memory, all-positions lens, one {n_long}-token prompt",
            "ratio": peaks["lens1"] / long_full,
            "baseline": "[layers, pos, vocab] float32",
            "target": "< 1 (bounded)",
            "detail": f"peak +{peaks['lens1'] / mib:.0f} MiB vs {long_full / mib:.0f} MiB; a plain "
            f"forward of it peaks at +{peaks['forward1'] / mib:.0f} MiB (fresh processes)",
        },
    ]


if __name__ == "__main__" and sys.argv[1:2] == ["peak"]:
    from benchmarks.run import Context

    _model = mp.load_model()
    with torch.no_grad():  # page every weight in first: only the workload's own memory counts
        _model(_model.to_tokens("Hi"))
        _model.unembed(_model.ln_final(torch.zeros(1, 1, _model.cfg.d_model)))
    _, _peak = Context.peak_memory(_workload(_model, sys.argv[2]))
    print(json.dumps({"peak": _peak}))
