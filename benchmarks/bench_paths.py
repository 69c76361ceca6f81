"""Path patching: exact (``mp.path_patch``) against its gradient estimate (edge attribution,
``method="attribution"``).

The problem: every one of SmolLM2's 270 heads as a sender, on one-shot capitals pairs that differ
in the country, the sender's change passed on from the country's token to the last; receivers
the final residual stream alone (270 paths: the exact method needs no forward pass for them), and
the final residual with the q, k and v inputs of layer 23's heads 1, 4 and 5 (the heads direct
logit attribution finds moving the answer most; heads 4 and 5 share their key/value head, so 3
query and 4 key/value receivers: 1,719 paths with a direct path).
Both methods, with ``n_random=0``, at 1 and 4 pairs, as a ratio to one plain forward pass of the
pairs' prompts, alternated (medians of 3; the exact method with head receivers once, as it takes
tens of seconds). The detail gives the estimate's Pearson r against the exact effects over the
paths that have one, and how many of the 10 largest exact paths it gives the same sign.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import mechprobe as mp
from benchmarks.bench_lens import _interleaved, _row

COUNTRIES = ("France", "Poland", "Japan", "Chile", "Kenya", "Spain", "Egypt", "Peru")
CAPITALS = ("Paris", "Warsaw", "Tokyo", "Santiago", "Nairobi", "Madrid", "Cairo", "Lima")
TEMPLATE = "Q: What is the capital of {}?\nA:"


def _pairs(model: Any, n: int) -> tuple[list[str], list[str], Any, list[int]]:
    """``n`` (clean, corrupt) pairs of consecutive countries, their metric, and the positions
    from the country on (every country here is one token in SmolLM2, so the pairs align)."""
    clean = [TEMPLATE.format(COUNTRIES[2 * i]) for i in range(n)]
    corrupt = [TEMPLATE.format(COUNTRIES[2 * i + 1]) for i in range(n)]
    a, b = model.to_tokens(clean[0])[0].tolist(), model.to_tokens(corrupt[0])[0].tolist()
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(differ) != 1:
        raise RuntimeError(f"the pair differs at positions {differ}, not one country token")
    answers = [" " + CAPITALS[2 * i] for i in range(n)]
    wrongs = [" " + CAPITALS[2 * i + 1] for i in range(n)]
    return clean, corrupt, mp.logit_diff(answers, wrongs), list(range(differ[0] - len(a), 0))


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    heads = [  # 3 query heads share a k/v head: heads 4 and 5 read the same k and v
        mp.Site(kind, 23, head=h if kind == "q" else h // 3)
        for h in (1, 4, 5)
        for kind in ("q", "k", "v")
    ]
    receiver_sets = {"final": ["final"], "final + 7 q/k/v": ["final", *dict.fromkeys(heads)]}
    rows = []
    for n in (1, 4):
        clean, corrupt, metric, positions = _pairs(model, n)
        for label, receivers in receiver_sets.items():
            got: dict[str, Any] = {}
            args = (model, clean, corrupt, "head", receivers, metric)

            def call(
                method: str, args: tuple = args, got: dict = got, at: list = positions
            ) -> None:
                got[method] = mp.path_patch(
                    *args, positions=at, method=method, n_random=0, progress=False
                )

            def forward(prompts: list[str] = clean + corrupt) -> None:
                batch = mp.tokenize(model, prompts)
                with torch.no_grad():
                    model(batch.tokens, attention_mask=batch.attention_mask)

            slow = label != "final"
            timed = _interleaved(
                {
                    "exact": lambda: call("exact"),
                    "attribution": lambda: call("attribution"),
                    "forward": forward,
                },
                repeat=1 if slow else 3,
            )
            exact, est = got["exact"].effect, got["attribution"].effect
            ok = np.isfinite(exact)
            top = np.argsort(-np.abs(np.where(ok, exact, 0)).ravel())[:10]
            same_sign = int((np.sign(exact.ravel()[top]) == np.sign(est.ravel()[top])).sum())
            detail = (
                f"{n} one-shot capitals pair(s), 270 head senders, positions {positions[0]}..-1, "
                f"{int(ok.sum())} paths; estimate vs exact Pearson r = "
                f"{np.corrcoef(exact[ok], est[ok])[0, 1]:.3f}, {same_sign} of the 10 largest "
                f"exact paths with the same sign{'; exact timed once' if slow else ''}"
            )
            what = f"path patching, all heads -> {label}, {n} pair(s)"
            rows.append(
                _row(
                    f"{what} (mp.path_patch, exact)",
                    timed["exact"],
                    timed["forward"],
                    baseline="plain forward of the pairs",
                    target="none (report)",
                    detail=detail,
                )
            )
            rows.append(
                _row(
                    f"{what}, method='attribution'",
                    timed["attribution"],
                    timed["forward"],
                    baseline="plain forward of the pairs",
                    target="none (report)",
                    detail=detail,
                )
            )
            rows.append(
                _row(
                    f"{what}: exact / attribution",
                    timed["exact"],
                    timed["attribution"],
                    baseline="method='attribution'",
                    target="none (report)",
                    detail=detail,
                )
            )
    return rows
