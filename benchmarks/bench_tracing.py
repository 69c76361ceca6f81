"""Causal tracing (ROME's noise restoration) against the loop a user would write.

The problem: SmolLM2 on "The Eiffel Tower is located in the city of" (subject "The Eiffel
Tower"), ``resid_post`` restored at every position of the traced layers, 10 noise samples. The
loop: one hooked forward per (layer, position, noise sample), noise added to the subject's
embeddings and the clean state written back, as one writes it with ``run_with_hooks``.
``causal_trace`` runs the same restorations batched. Both sides run every cell in full; no
figure is scaled from a subset, and every cell's mean over the samples is compared. A second row
compares with ROME's own loop, which batches a cell's noise samples (with the clean prompt) into
one forward.

The loop costs one forward per cell (178 ms each timed on the AVX-512 EPYC, 233 ms on the
AVX2-only one), so the default run traces every fifth layer (6 layers: 660 forwards, a few
minutes); ``MECHPROBE_BENCH_FULL=1`` traces all 30 layers (3,300 forwards: 770 s on the AVX2 CPU).
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

import mechprobe as mp

PROMPT, SUBJECT = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
N_NOISE = 10
_FULL = os.environ.get("MECHPROBE_BENCH_FULL") == "1"


def _loop(
    model: Any, layers: list[int], span: tuple[int, int], level: float, answer: int
) -> np.ndarray:
    """The loop a user writes: ``[layers, positions, samples]`` answer probabilities, one hooked
    forward per (layer, position, noise sample): noise on the subject's embeddings, resid_post
    at (layer, position) restored from the clean run."""
    tokens = model.to_tokens(PROMPT)
    start, stop = span
    noise = mp.trace_noise(tokens[0], N_NOISE, stop - start, model.cfg.d_model, level, seed=0)
    out = np.zeros((len(layers), tokens.shape[1], N_NOISE))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for i, layer in enumerate(layers):
            for p in range(tokens.shape[1]):
                for k in range(N_NOISE):

                    def corrupt(emb: torch.Tensor, hook: Any, k: int = k) -> torch.Tensor:
                        emb = emb.clone()
                        emb[0, start:stop] += noise[k]
                        return emb

                    def restore(act: torch.Tensor, hook: Any, p: int = p) -> torch.Tensor:
                        act = act.clone()
                        act[0, p] = cache[hook.name][0, p]
                        return act

                    hooks = [("hook_embed", corrupt), (f"blocks.{layer}.hook_resid_post", restore)]
                    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                    out[i, p, k] = float(logits[0, -1].softmax(-1)[answer])
    return out


def _rome_loop(
    model: Any, layers: list[int], span: tuple[int, int], level: float, answer: int
) -> np.ndarray:
    """ROME's own loop (``trace_with_patch`` in kmeng01/rome's ``causal_trace.py``, re-written
    here from its description): one forward per (layer, position) on a batch of the clean prompt
    and its ``N_NOISE`` noised copies, the hooked state of every noised row overwritten with the
    clean row's at that position. ``[layers, positions, samples]`` answer probabilities."""
    tokens = model.to_tokens(PROMPT).repeat(N_NOISE + 1, 1)  # row 0 clean, rows 1.. noised
    start, stop = span
    noise = mp.trace_noise(tokens[0], N_NOISE, stop - start, model.cfg.d_model, level, seed=0)
    out = np.zeros((len(layers), tokens.shape[1], N_NOISE))

    def corrupt(emb: torch.Tensor, hook: Any) -> torch.Tensor:
        emb = emb.clone()
        emb[1:, start:stop] += noise.to(emb.dtype)
        return emb

    with torch.no_grad():
        for i, layer in enumerate(layers):
            for p in range(tokens.shape[1]):

                def restore(act: torch.Tensor, hook: Any, p: int = p) -> torch.Tensor:
                    act = act.clone()
                    act[1:, p] = act[0, p]
                    return act

                hooks = [("hook_embed", corrupt), (f"blocks.{layer}.hook_resid_post", restore)]
                logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                out[i, p] = logits[1:, -1].softmax(-1)[:, answer].double().cpu().numpy()
    return out


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if _FULL else list(range(0, n_layers, 5))

    def ours() -> Any:
        return mp.causal_trace(
            model,
            PROMPT,
            SUBJECT,
            sites="resid_post",
            layers=layers,
            n_noise=N_NOISE,
            n_random=0,
            progress=False,
        )

    ours()  # warm-up
    start = time.perf_counter()
    res = ours()
    t_ours = time.perf_counter() - start
    seq = len(res.tokens[0])
    with torch.no_grad():  # the traced answer: the clean model's top token, as causal_trace
        answer = int(model(model.to_tokens(PROMPT))[0, -1].argmax())
    start = time.perf_counter()
    looped = _loop(model, layers, res.subjects[0], res.noise_level, answer)
    t_loop = time.perf_counter() - start
    diff = float(np.abs(looped.mean(-1) - res.scores[0][0]).max())
    forwards = looped.size
    start = time.perf_counter()
    batched = _rome_loop(model, layers, res.subjects[0], res.noise_level, answer)
    t_rome = time.perf_counter() - start
    diff_rome = float(np.abs(batched.mean(-1) - res.scores[0][0]).max())
    which = f"all {n_layers} layers" if _FULL else f"{len(layers)} of {n_layers} layers (every 5th)"
    note = "MECHPROBE_BENCH_FULL=1" if _FULL else "MECHPROBE_BENCH_FULL=1 runs all layers"
    return [
        {
            "benchmark": f"causal tracing, resid_post x {which} x all {seq} positions x "
            f"{N_NOISE} noise samples (one prompt)",
            "ratio": t_loop / t_ours,
            "baseline": "speed-up: the loop of one hooked forward per (cell, sample) / ours, both "
            "run in full",
            "target": ">= 5",
            "detail": f"ours {t_ours:.1f} s; loop {t_loop:.0f} s ({forwards} hooked forwards, "
            f"{t_loop / forwards * 1000:.0f} ms each); max |loop - ours| over all "
            f"{looped.shape[0] * seq} cells' means {diff:.1e} (answer probability clean "
            f"{res.clean[0]:.3f}); {note}",
        },
        {
            "benchmark": f"causal tracing, resid_post x {which} (the cells above), vs ROME's loop "
            "(noise samples batched)",
            "ratio": t_rome / t_ours,
            "baseline": "speed-up: ROME's loop of one forward per cell on the clean prompt and its "
            f"{N_NOISE} noised copies / ours",
            "target": "reported (the 5x goal is against the loop a user writes, row above)",
            "detail": f"ours {t_ours:.1f} s (row above); ROME's loop {t_rome:.1f} s "
            f"({looped.shape[0] * seq} forwards of {N_NOISE + 1} rows); max |ROME - ours| over "
            f"the cells' means {diff_rome:.1e}; measured in the same run as the row above",
        },
    ]
