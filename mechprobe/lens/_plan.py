"""Planning a logit-lens run: validating sites, targets and positions; choosing rows and vectors.

Everything here is checked before any forward pass. The plan says which rows to run (each prompt,
or the prompt with a multi-token target appended for teacher forcing) and which vectors to decode:
the prompt-position grid (full statistics) and the positions that predict a target's later tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mechprobe.core import (
    Batch,
    Layers,
    PaddingSide,
    PositionSpec,
    SiteLike,
    expand_sites,
    pad_id,
    pad_rows,
    position_list,
    tokenize,
    tokenize_with_targets,
)
from mechprobe.lens._lens import LENS_KINDS

__all__ = ["LENS_KINDS", "Plan", "TargetSpec", "lens_entries", "make_plan", "normalise_targets"]

#: Targets: one string for every prompt, one string per prompt, or a list of strings per prompt.
TargetSpec = str | Sequence[str] | Sequence[Sequence[str]]


@dataclass
class Plan:
    """Which vectors to decode: grid queries (full statistics) and teacher-forcing queries."""

    batch: Batch  # the rows actually run (prompt, or prompt + a multi-token target)
    grid: np.ndarray  # [B, K'] unpadded prompt positions, -1 where a prompt has no such column
    shown: int  # K: columns returned (a hidden last-token column may follow)
    last_col: np.ndarray  # [B] column holding each prompt's last token
    row_of_prompt: np.ndarray  # [B] row whose prompt positions are decoded
    first_ids: np.ndarray  # [B, T] first token of each target, -1 where none
    # Continuation queries (target token j >= 1): row, unpadded position, token, prompt, target.
    cont: np.ndarray  # [n, 5] int


def lens_entries(
    model: Any, sites: SiteLike | Sequence[SiteLike], layers: Layers = "all"
) -> list[tuple[str, int]]:
    """Resolve ``sites`` into (kind, layer) pairs, in the order given, without duplicates."""
    found = expand_sites(model, sites, layers=layers, kinds=LENS_KINDS, layers_name="layers")
    for site in found:
        if site.positions is not None:
            raise ValueError(
                f"{site} carries positions={site.positions!r}; pass positions= to logit_lens "
                "instead (one grid of positions for every site)."
            )
    return [(site.kind, site.layer) for site in found]


def normalise_targets(targets: TargetSpec | None, n: int, one_prompt: bool) -> list[list[str]]:
    """Normalise ``targets`` into one list of strings per prompt, validating them."""
    if targets is None:
        return [[] for _ in range(n)]
    shape = (
        "targets takes a string, one per prompt, or a list of strings per prompt (e.g. "
        "[[' Warsaw', ' Poland']])"
    )
    if isinstance(targets, str):
        per = [[targets] for _ in range(n)]
    elif not isinstance(targets, Sequence):
        raise TypeError(f"{shape}; got {type(targets).__name__} {targets!r}.")
    else:
        items: list[Any] = list(targets)
        for i, item in enumerate(items):
            if not isinstance(item, (str, Sequence)):
                raise TypeError(f"{shape}; entry {i} is {type(item).__name__} {item!r}.")
        flat = all(isinstance(t, str) for t in items)
        if flat and one_prompt:
            per = [items]  # several targets for the one prompt given as a string
        elif len(items) != n:
            raise ValueError(
                f"Got {n} prompts and {len(items)} target entries: pass one target (or one list "
                "of targets) per prompt, a single string shared by every prompt, or e.g. "
                f"[[' Warsaw', ' Poland']] * {n} for several targets per prompt."
            )
        else:
            per = [[t] if isinstance(t, str) else list(t) for t in items]
    for i, group in enumerate(per):
        for j, text in enumerate(group):
            if not isinstance(text, str):
                raise TypeError(f"Target {j} of prompt {i} is {type(text).__name__}: pass str.")
            if not text:
                raise ValueError(
                    f"Target {j} of prompt {i} is empty: pass the continuation to score, "
                    "usually with its leading space (' Warsaw')."
                )
    return per


def _grid_positions(spec: PositionSpec, lengths: list[int]) -> np.ndarray:
    """Unpadded prompt positions ``[B, K]`` (-1 where a shorter prompt has no column)."""
    if isinstance(spec, str):
        if spec != "all":
            raise ValueError(f"positions must be an int, a list of ints or 'all', not {spec!r}.")
        grid = np.full((len(lengths), max(lengths)), -1, dtype=np.int64)
        for b, n in enumerate(lengths):
            grid[b, :n] = np.arange(n)
        return grid
    wanted = position_list(spec)  # the API's one reading of positions (a bool is no position)
    grid = np.empty((len(lengths), len(wanted)), dtype=np.int64)
    for b, n in enumerate(lengths):
        for k, p in enumerate(wanted):
            q = int(p) + n if p < 0 else int(p)
            if not 0 <= q < n:
                raise ValueError(
                    f"Position {p} falls outside prompt {b}, which has {n} tokens (valid: "
                    f"0..{n - 1} or -1..-{n}); positions refer to the prompt, not the target."
                )
            grid[b, k] = q
        if len(set(grid[b].tolist())) < len(wanted):  # its rows would be decoded twice
            named = [p for p, q in zip(wanted, grid[b], strict=True) if (grid[b] == q).sum() > 1]
            raise ValueError(
                f"positions {named} name the same token of prompt {b}, which has {n} tokens: "
                "pass positions that stay apart in every prompt (or decode that prompt alone)."
            )
    return grid


def _unpadded(batch: Batch, row: int) -> list[int]:
    return batch.tokens[row][batch.attention_mask[row].bool()].tolist()


def make_plan(
    model: Any,
    prompts: list[str],
    targets: list[list[str]],
    positions: PositionSpec,
    side: PaddingSide,
) -> tuple[Plan, list[list[int]], list[list[list[int]]]]:
    """Tokenise, choose the rows to run and the vectors to decode."""
    prompt_batch = tokenize(model, prompts, padding_side=side)
    prompt_ids = [_unpadded(prompt_batch, b) for b in range(len(prompts))]
    pairs = [(b, t) for b, group in enumerate(targets) for t in range(len(group))]
    target_ids: list[list[list[int]]] = [[] for _ in prompts]
    if pairs:
        flat_p = [prompts[b] for b, _ in pairs]
        flat_t = [targets[b][t] for b, t in pairs]
        pair_batch, start, length = tokenize_with_targets(model, flat_p, flat_t)
        for i, (b, _) in enumerate(pairs):
            ids = _unpadded(pair_batch, i)
            target_ids[b].append(ids[int(start[i]) : int(start[i]) + int(length[i])])
    # One row per multi-token target (teacher forcing); a prompt without one runs alone.
    rows: list[list[int]] = []
    row_prompts: list[str] = []
    row_of_prompt = np.empty(len(prompts), dtype=np.int64)
    cont: list[tuple[int, int, int, int, int]] = []
    for b, ids in enumerate(prompt_ids):
        row_of_prompt[b] = len(rows)
        multi = [t for t, tid in enumerate(target_ids[b]) if len(tid) > 1]
        for t in multi:
            for j, tok in enumerate(target_ids[b][t][1:], start=1):
                cont.append((len(rows), len(ids) + j - 1, tok, b, t))
            rows.append(ids + target_ids[b][t])
            row_prompts.append(prompts[b])
        if not multi:
            rows.append(ids)
            row_prompts.append(prompts[b])
    batch = pad_rows(rows, pad_id(model), side, row_prompts)
    lengths = [len(ids) for ids in prompt_ids]
    grid = _grid_positions(positions, lengths)
    shown = grid.shape[1]
    last = np.asarray(lengths) - 1
    has_last = grid == last[:, None]
    if not has_last.any(axis=1).all():  # teacher forcing needs the last token: a hidden column
        grid = np.concatenate([grid, last[:, None]], axis=1)
        has_last = grid == last[:, None]
    n_targets = max((len(g) for g in targets), default=0)
    first_ids = np.full((len(prompts), n_targets), -1, dtype=np.int64)
    for b, group in enumerate(target_ids):
        first_ids[b, : len(group)] = [ids[0] for ids in group]
    plan = Plan(
        batch=batch,
        grid=grid,
        shown=shown,
        last_col=has_last.argmax(axis=1),
        row_of_prompt=row_of_prompt,
        first_ids=first_ids,
        cont=np.asarray(cont, dtype=np.int64).reshape(-1, 5),
    )
    return plan, prompt_ids, target_ids
