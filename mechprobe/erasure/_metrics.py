"""Behavioural measurements for amnesic probing: the model on text and on a task, per condition.

A condition is the unmodified model or the model with one eraser hooked in at one site. For
each chunk of prompts the unmodified forward pass runs once and every condition is compared with
it right away, so only one chunk's log-probabilities are ever held (``[chunk, seq, vocab]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechprobe.core import (
    Batch,
    Intervention,
    Positions,
    Project,
    SiteLike,
    first_token_ids,
    forward,
    intervene,
    model_adapter,
    progress_bar,
    tokenize,
    top1_hit,
)
from mechprobe.erasure._eraser import Eraser
from mechprobe.erasure._result import AmnesicMeasure
from mechprobe.tasks import Task

#: Where an eraser acts: ``"all"`` positions, or an int / ints (negative: from each row's end).
ErasePositions: TypeAlias = int | Sequence[int] | Literal["all"]


@dataclass(frozen=True)
class Condition:
    """The model with ``eraser`` hooked in at the erased site (None: unmodified)."""

    name: str
    eraser: Eraser | None
    seed: int | None = None


def erasing(eraser: Eraser, positions: ErasePositions) -> Project:
    """The hook applying ``eraser`` at ``positions`` (``"all"``: every position)."""
    where: Positions = None if isinstance(positions, str) else positions
    return Project(eraser, positions=where)


def _logits(
    model: Any, batch: Batch, hook: SiteLike, condition: Condition, positions: ErasePositions
) -> Float[Tensor, "batch seq vocab"]:
    """One forward pass of ``batch`` under ``condition`` (float32 logits)."""
    if condition.eraser is None:
        return forward(model, batch).float()
    spec: dict[SiteLike, Intervention] = {hook: erasing(condition.eraser, positions)}
    with intervene(model, spec, batch=batch):
        return forward(model, batch).float()


def _from_first_erased(
    batch: Batch, positions: ErasePositions, real: Tensor
) -> Bool[Tensor, "batch seq"]:
    """Padded positions at or after each row's first erased position: all others predict the
    same under any erasure in a causal model."""
    if isinstance(positions, str):  # "all"
        return torch.ones_like(real)
    first = batch.positions(positions).amin(1)  # [batch] padded index
    index = torch.arange(real.shape[1], device=real.device)
    return index[None, :] >= first.to(real.device)[:, None]


def _kl(logp_orig: Tensor, logp: Tensor) -> Tensor:
    """``KL(p_orig || p)`` over the last axis, per position."""
    return (logp_orig.exp() * (logp_orig - logp)).sum(-1)


def text_measures(
    model: Any,
    hook: SiteLike,
    texts: Sequence[str],
    conditions: Sequence[Condition],
    *,
    positions: ErasePositions,
    batch_size: int | None,
    progress: bool,
) -> tuple[list[AmnesicMeasure], dict[str, int]]:
    """Next-token accuracy and loss, and KL from the intact run, on ``texts``; returns the counts
    of tokens they average over too (``text_tokens``: accuracy and loss; ``kl_tokens``: KL).

    Every measure is taken where the erasure can act: in a causal model a position before a
    row's first erased one predicts the same under any erasure, so counting it would only dilute
    the effect (and make it depend on the texts' lengths). Accuracy and loss are averaged over
    the real tokens from the first erased position on that have a next real token; the KL over
    the real tokens from the first erased position on (also the last, whose prediction an
    erasure at ``-1`` changes). With ``positions="all"`` that is every token. Where no erased
    position has a next token (``positions=-1``: the last token predicts nothing inside the
    text) accuracy and loss cannot change and are not reported; the KL still is.
    """
    batch = tokenize(model, list(texts))
    device = model_adapter(model).device  # where token ids go, as everywhere
    sums = {c.name + str(c.seed): [0.0, 0.0, 0.0] for c in conditions}
    n_pred, n_real, n_next = 0, 0, 0
    chunks = list(batch.chunks(batch_size))
    with torch.no_grad():
        for _, chunk in progress_bar(chunks, progress=progress, desc="amnesic: text"):
            chunk = chunk.to(device)
            real = chunk.attention_mask.bool()
            n_next += int((real[:, :-1] & real[:, 1:]).sum())
            mask = real & _from_first_erased(chunk, positions, real)
            has_next = mask[:, :-1] & real[:, 1:]
            targets = chunk.tokens[:, 1:]
            logp_orig = _logits(model, chunk, hook, Condition("intact", None), positions)
            logp_orig = logp_orig.log_softmax(-1)
            n_pred += int(has_next.sum())
            n_real += int(mask.sum())
            for c in conditions:
                logp = (
                    logp_orig
                    if c.eraser is None
                    else _logits(model, chunk, hook, c, positions).log_softmax(-1)
                )
                pred = logp[:, :-1]
                hit = top1_hit(pred, targets) & has_next
                token_nll = -pred.gather(-1, targets[..., None])[..., 0]
                acc = sums[c.name + str(c.seed)]
                acc[0] += float(hit.sum())
                acc[1] += float(token_nll[has_next].double().sum())
                acc[2] += float(_kl(logp_orig, logp)[mask].double().sum())
    if n_next == 0:
        raise ValueError(
            "The evaluation texts have no token with a next token: pass texts of two or more tokens."
        )
    out: list[AmnesicMeasure] = []
    for c in conditions:
        hits, nll, kl = sums[c.name + str(c.seed)]
        if n_pred:
            out.append(AmnesicMeasure("lm_accuracy", c.name, hits / n_pred, seed=c.seed))
            out.append(AmnesicMeasure("lm_loss", c.name, nll / n_pred, seed=c.seed))
        if c.eraser is not None:
            out.append(AmnesicMeasure("lm_kl", c.name, kl / n_real, seed=c.seed))
    return out, {"text_tokens": n_pred, "kl_tokens": n_real}


def task_measures(
    model: Any,
    hook: SiteLike,
    task: Task,
    conditions: Sequence[Condition],
    *,
    positions: ErasePositions,
    batch_size: int | None,
    progress: bool,
) -> list[AmnesicMeasure]:
    """Greedy first-token accuracy, first-token log-prob and KL at the prompt's last token.

    Positions of the erasure count in the prompt (``-1``: its last token, where the answer is
    predicted). Accuracy is the one :func:`mechprobe.score_task` reports.
    """
    batch = tokenize(model, task.prompts())
    answer = torch.as_tensor(first_token_ids(model, task.answers()))
    device = model_adapter(model).device  # where token ids go, as everywhere
    sums = {c.name + str(c.seed): [0.0, 0.0, 0.0] for c in conditions}
    chunks = list(batch.chunks(batch_size))
    with torch.no_grad():
        for rows, chunk in progress_bar(chunks, progress=progress, desc="amnesic: task"):
            chunk = chunk.to(device)
            index = torch.arange(len(chunk), device=chunk.tokens.device)
            last = chunk.last_index.to(chunk.tokens.device)
            target = answer[rows].to(chunk.tokens.device)
            logits = _logits(model, chunk, hook, Condition("intact", None), positions)
            logp_orig = logits[index, last].log_softmax(-1)
            for c in conditions:
                if c.eraser is None:
                    logp = logp_orig
                else:
                    logp = _logits(model, chunk, hook, c, positions)[index, last].log_softmax(-1)
                acc = sums[c.name + str(c.seed)]
                acc[0] += float(top1_hit(logp, target).sum())
                acc[1] += float(logp.gather(-1, target[:, None]).double().sum())
                acc[2] += float(_kl(logp_orig, logp).double().sum())
    n = len(batch)
    out: list[AmnesicMeasure] = []
    for c in conditions:
        hits, logprob, kl = sums[c.name + str(c.seed)]
        out.append(AmnesicMeasure("task_accuracy", c.name, hits / n, seed=c.seed))
        out.append(AmnesicMeasure("task_logprob", c.name, logprob / n, seed=c.seed))
        if c.eraser is not None:
            out.append(AmnesicMeasure("task_kl", c.name, kl / n, seed=c.seed))
    return out
