"""Lenses past the logit lens (issue 15): decoding through a tuned lens or a Patchscope, and the
cost of training a tuned lens, as ratios to plain forward passes timed in the same run.

Decoding: the 32 one-shot capital prompts of ``bench_lens`` at their last token, ``resid_post`` at
all 30 layers. The tuned lens's cost does not depend on its values, so a lens of the right shape
(identity translators, every affine map still applied) stands for a trained one. Training:
:func:`mechprobe.train_tuned_lens` on 2,048 tokens in windows of 128 (8 steps; the default was
2,048 until it became 16,384, whose cost per token is the same), every residual site kind: 60
translators, against plain forwards over the same windows.
"""

from __future__ import annotations

import time
from typing import Any

import torch

import mechprobe as mp
from benchmarks.bench_lens import PROMPTS, _interleaved, _row


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    n_layers = int(model.cfg.n_layers)
    batch = mp.tokenize(model, PROMPTS)
    tuned = mp.TunedLens.identity(model)
    scope = mp.Patchscope()

    def forward() -> None:
        with torch.no_grad():
            model(batch.tokens, attention_mask=batch.attention_mask)

    timed = _interleaved(
        {
            "forward": forward,
            "logit": lambda: mp.logit_lens(model, PROMPTS),
            "tuned": lambda: mp.logit_lens(model, PROMPTS, lens=tuned),
        },
        repeat=3,
    )
    patch = _interleaved(
        {"forward": forward, "patchscope": lambda: mp.logit_lens(model, PROMPTS, lens=scope)},
        repeat=1,
    )
    rows = [
        _row(
            f"tuned lens, last token, {n_layers} layers (top-10, entropy, KL)",
            timed["tuned"],
            timed["forward"],
            baseline="plain forward",
            target="<= 1.3",
            detail=f"32 prompts x {n_layers} resid_post; the logit lens on the same run: "
            f"{timed['logit'][0] / timed['forward'][0]:.2f}x",
        ),
        _row(
            f"Patchscope (token identity), last token, {n_layers} layers",
            patch["patchscope"],
            patch["forward"],
            baseline="plain forward",
            target="none (one target-prompt forward per decoded vector)",
            detail=f"{32 * n_layers} target-prompt rows of {len(scope.tokens(model)[0])} tokens",
        ),
    ]

    # Training on 2,048 tokens, against plain forwards over the same windows.
    from mechprobe.lens._text import token_windows

    windows = token_windows(model, "train", seq_len=128, n_windows=16, seed=0)
    start_cpu, start = time.process_time(), time.perf_counter()
    lens = mp.train_tuned_lens(model, n_tokens=2048, progress=False)
    train = (time.perf_counter() - start, time.process_time() - start_cpu)

    def forwards() -> None:
        with torch.no_grad():
            for s in range(0, len(windows), 2):  # the training's rows per step: 2 x 128 tokens
                model(windows[s : s + 2])

    fwd = _interleaved({"forwards": forwards}, repeat=3)["forwards"]
    tokens = int(lens.info["tokens"])
    rows.append(
        _row(
            "tuned lens training, 2,048 tokens (8 steps, 60 translators)",
            train,
            fwd,
            baseline="plain forwards over the same tokens",
            target="none (report)",
            detail=f"{tokens / train[0]:.1f} tokens/s, wall {train[0]:.0f} s; every token is "
            "decoded and back-propagated through the 49k-word unembedding once per translator",
        )
    )
    return rows
