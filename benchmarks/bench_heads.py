"""Head scores: ``mp.head_scores`` against the cache a TransformerLens user reads them from.

The problem: every one of SmolLM2's 270 heads scored as a previous-token, duplicate-token and
induction head on Olsson et al.'s repeated random tokens (BOS and ``seq_len`` random tokens
twice), at 10 x 50, 40 x 50 and 8 x 200 (prompts x half length). mechprobe reduces each layer's
pattern to per-head sums inside its hook; the hand-written way caches every layer's pattern
(``run_with_cache`` with a ``names_filter``, one batch) and reads the three diagonals. Both as a
ratio to one plain forward pass of the same tokens, alternated three times (medians). The detail
gives the largest difference between the two sides' scores and the peak of the patterns the
cache holds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import mechprobe as mp
from benchmarks.bench_lens import _interleaved, _row


def _from_cache(model: Any, tokens: torch.Tensor, n: int) -> np.ndarray:
    """``[3, layers, heads]`` the three scores read off a pattern cache by hand: the previous
    token from query 2 on, and the diagonals ``n`` and ``n - 1`` back over the repeated half."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    q = torch.arange(n + 1, 2 * n + 1)
    prev = torch.arange(2, 2 * n + 1)
    out = np.zeros((3, int(model.cfg.n_layers), int(model.cfg.n_heads)))
    for layer in range(int(model.cfg.n_layers)):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()  # [batch, head, q, k]
        out[0, layer] = pattern[:, :, prev, prev - 1].mean((0, 2)).numpy()
        out[1, layer] = pattern[:, :, q, q - n].mean((0, 2)).numpy()
        out[2, layer] = pattern[:, :, q, q - n + 1].mean((0, 2)).numpy()
    return out


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    rows = []
    got: dict[str, Any] = {}  # each side's last output, for the agreement check
    for n_prompts, seq_len in ((10, 50), (40, 50), (8, 200)):
        first = mp.head_scores(model, seq_len=seq_len, n_prompts=n_prompts, progress=False)
        tokens = torch.tensor(np.stack(first.tokens))

        def ours(n_prompts: int = n_prompts, seq_len: int = seq_len) -> None:
            got["ours"] = mp.head_scores(
                model, seq_len=seq_len, n_prompts=n_prompts, progress=False
            )

        def by_hand(tokens: torch.Tensor = tokens, seq_len: int = seq_len) -> None:
            with torch.no_grad():
                got["tl"] = _from_cache(model, tokens, seq_len)

        def forward(tokens: torch.Tensor = tokens) -> None:
            with torch.no_grad():
                model(tokens)

        timed = _interleaved({"ours": ours, "tl": by_hand, "forward": forward}, repeat=3)
        gap = float(np.abs(got["ours"].scores - got["tl"]).max())
        seq = 2 * seq_len + 1
        cached = int(model.cfg.n_layers) * n_prompts * int(model.cfg.n_heads) * seq * seq * 4
        detail = (
            f"{n_prompts} x (BOS + 2 x {seq_len}) random tokens, 270 heads, 3 kinds; largest "
            f"|ours - the cache's diagonals| {gap:.1e}; the cache holds {cached / 2**20:.0f} MiB "
            "of patterns, ours none"
        )
        label = f"head scores, {n_prompts} x {seq_len} repeated random tokens"
        rows.append(
            _row(
                f"{label} (mp.head_scores)",
                timed["ours"],
                timed["forward"],
                baseline="plain forward of the tokens",
                target="none (report)",
                detail=detail,
            )
        )
        rows.append(
            _row(
                f"{label}: run_with_cache of the patterns + diagonals by hand / ours",
                timed["tl"],
                timed["ours"],
                baseline="mp.head_scores",
                target="none (report)",
                detail=detail,
            )
        )
    return rows
