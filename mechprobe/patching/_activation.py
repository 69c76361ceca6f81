"""Activation patching and ablation, batched over cells: :func:`patch` and :func:`ablate_cells`
-> :class:`PatchResult`.

A *cell* is one site (an activation kind at one layer, or one attention head's ``z``, ``q``,
``k``, ``v``, pattern or output) at one token position. Patching a cell runs one prompt, writes at
that cell only the activation the other prompt had there, and reads a metric from the next-token
logits at the last token. ``direction="denoising"`` (the default, as in TransformerLens's
``get_act_patch_*``) runs the corrupt prompt and writes clean activations; ``"noising"`` runs the
clean prompt and writes corrupt ones. Ablating a cell writes zeros or a mean instead.

Every cell comes with controls: ``n_random`` runs of the same cell in which the activation is
moved by the same distance in a random direction (control ``j`` of a pair drawn from
``(seed + j) % 2**32``, the pair's tokens and the cell's site and position: the same whatever
other pairs and cells run beside it), so an effect can be told apart from "anything of that
size written there"; and every value is kept per prompt pair, for the spread over prompts.

All cells of a pair share forward passes (:mod:`mechprobe.patching._engine`): ``mlp_out`` at every
layer at the last position is one forward pass over ``2 * seq + n_layers`` tokens instead of
``n_layers`` passes over ``seq``; the 270 heads of SmolLM2 at the last position are one pass too.

Heads under grouped-query attention: ``k`` and ``v`` sites name a *key/value* head (SmolLM2: 3 per
layer, each read by 3 of the 9 query heads; :func:`mechprobe.core.query_heads` says which), so a
``k``/``v`` patch changes what all of its query heads see.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, get_args

import numpy as np
import torch
from torch import Tensor

from mechprobe.core import (
    Batch,
    Layers,
    PositionSpec,
    Site,
    SiteKind,
    SiteLike,
    as_int,
    check_int,
    check_seed,
    check_token_ids,
    control_seed,
    evaluates,
    expand_sites,
    model_adapter,
    position_list,
    run,
    token_label,
    tokenize,
    warn,
)
from mechprobe.patching._engine import (
    COPY,
    RANDOM,
    SET,
    Base,
    Cell,
    Edit,
    Plan,
    control_key,
    edit_width,
    pair_unit_vectors,
    run_plan,
    site_edit,
)
from mechprobe.patching._metrics import MetricFn, PatchMetric, bind_metric
from mechprobe.patching._result import PatchResult, normalised_recovery, pair_records

__all__ = [
    "NamedPositions",
    "Prompts",
    "Rows",
    "SiteGroups",
    "ablate_cells",
    "named_groups",
    "named_indices",
    "patch",
    "position_pairs",
    "site_rows",
    "token_rows",
]

Direction: TypeAlias = Literal["denoising", "noising"]
Prompts: TypeAlias = str | Sequence[str] | Batch | Tensor | Sequence[Tensor]
#: Positions by name, each one column: ``{"S2": [10, 10, 12], "END": -1}`` (an int for every
#: pair, or one int per pair; negative from each prompt's last token).
NamedPositions: TypeAlias = Mapping[str, int | Sequence[int]]
#: Sites by group, each group written as one cell:
#: ``{"name movers": [Site("head", 9, head=9), "head@10, head 0"]}``.
SiteGroups: TypeAlias = Mapping[str, SiteKind | SiteLike | Sequence[SiteLike]]


def _sites(model: Any, sites: Any, layers: Layers, what: str = "patch()") -> list[Site]:
    found = expand_sites(model, sites, layers=layers, layers_name="layers")
    for site in found:
        if site.positions is not None:
            raise ValueError(f"{site} carries positions: pass positions= to {what} instead.")
    return found


@dataclass(frozen=True)
class Rows:
    """The rows of a patching result: single sites, or named groups of sites written as one cell.

    Attributes:
        names: Per row, the group's name (None for a single site).
        groups: Per row, the sites written together (one for a single site).
    """

    names: list[str | None]
    groups: list[list[Site]]

    @property
    def sites(self) -> list[Site]:
        """Every site a row writes, each once, in order."""
        return list(dict.fromkeys(site for group in self.groups for site in group))

    def __len__(self) -> int:
        return len(self.groups)


def site_rows(model: Any, sites: Any, layers: Layers, what: str = "patch()") -> Rows:
    """The rows ``sites`` asks for: each site alone, or with a mapping ``{name: sites}`` each
    named group as one row whose cells write all its sites at once.

    Example:
        >>> from mechprobe.core import tiny_model
        >>> rows = site_rows(tiny_model(), {"early": ["mlp_out@0", "head@1, head 2"]}, "all")
        >>> rows.names, [str(s) for s in rows.groups[0]]
        (['early'], ['mlp_out@0', 'head@1, head 2'])
    """
    example = "{'name movers': ['head@9, head 9', 'head@10, head 0']}"
    # a site named twice in a group counts once (expand_sites keeps each once)
    return Rows(*named_groups(sites, lambda items: _sites(model, items, layers, what), example))


def named_groups(
    items: Any, parse: Callable[[Any], list[Any]], example: str, what: str = "sites"
) -> tuple[list[str | None], list[list[Any]]]:
    """``(names, groups)``: each parsed item alone (name None, a group of one), or with a
    mapping ``{name: items}`` each named group's parsed items; ``example`` goes into errors.

    Example:
        >>> named_groups({"a": [1, 2]}, list, "{'a': [1, 2]}")
        (['a'], [[1, 2]])
    """
    if not isinstance(items, Mapping):
        found = parse(items)
        return [None] * len(found), [[item] for item in found]
    if not items:
        raise ValueError(f"{what}={{}} names no group: name at least one, e.g. {example}.")
    names: list[str | None] = []
    groups = []
    for name, members in items.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"Groups of {what} take non-empty strings as names, got {name!r}.")
        names.append(name)
        groups.append(parse(members))
    return names, groups


def token_pairs(model: Any, clean: Prompts, corrupt: Prompts) -> tuple[list[Tensor], list[Tensor]]:
    """Unpadded token ids of the clean and the corrupt prompts, one corrupt prompt per clean one."""
    clean_ids, corrupt_ids = (
        token_rows(model, clean, "clean"),
        token_rows(model, corrupt, "corrupt"),
    )
    if len(clean_ids) != len(corrupt_ids):
        raise ValueError(
            f"Got {len(clean_ids)} clean and {len(corrupt_ids)} corrupt prompts: pass one corrupt "
            "prompt per clean prompt."
        )
    return clean_ids, corrupt_ids


def token_rows(model: Any, prompts: Prompts, what: str) -> list[Tensor]:
    """Unpadded token ids of each prompt (strings are tokenised with the model's BOS).

    Example:
        >>> from mechprobe.core import tiny_model
        >>> [len(t) for t in token_rows(tiny_model(), ["Hi", "Hello"], "prompts")]
        [3, 6]
    """
    if isinstance(prompts, (list, tuple)) and any(isinstance(p, Tensor) for p in prompts):
        # one 1-D tensor per prompt, of any lengths: unpadded ids as they are
        if not all(isinstance(p, Tensor) for p in prompts):
            raise ValueError(
                f"{what} prompts mix token-id tensors and other things: pass one kind, a list of "
                "1-D torch tensors of ids or a list of strings."
            )
        tensors = [p for p in prompts if isinstance(p, Tensor)]
        bad = [
            i
            for i, p in enumerate(tensors)
            if p.ndim != 1 or p.is_floating_point() or p.dtype == torch.bool or p.numel() == 0
        ]
        if bad:
            raise ValueError(
                f"{what} prompt {bad[0]}: a list of token ids takes one non-empty 1-D integer "
                "tensor per prompt (unpadded)."
            )
        rows = [p.long().cpu() for p in tensors]
        check_token_ids(model, rows, f"{what} prompt")
        # list(model.to_tokens([...])) is a padded batch too: its pads would be read as tokens
        _refuse_padding(model, rows, what)
        return rows
    if isinstance(prompts, Tensor):
        if prompts.ndim not in (1, 2) or prompts.is_floating_point():
            raise ValueError(
                f"{what} tokens must be integer ids [seq] or [pairs, seq] (unpadded), or a list "
                "of 1-D id tensors of any lengths."
            )
        rows = list(prompts.long().reshape(-1, prompts.shape[-1]).cpu())
        check_token_ids(model, rows, f"{what} prompt")
        _refuse_padding(model, rows, what)
        return rows
    # What is left are strings (a list holding other things fails in tokenize, naming it).
    batch = prompts if isinstance(prompts, Batch) else tokenize(model, prompts)  # type: ignore[arg-type]
    rows = [
        t[m.bool()] for t, m in zip(batch.tokens.cpu(), batch.attention_mask.cpu(), strict=True)
    ]
    check_token_ids(model, rows, f"{what} prompt")  # a Batch of ids given by hand
    return rows


def _refuse_padding(model: Any, rows: list[Tensor], what: str) -> None:
    """Rows that end (or start) in different numbers of pad tokens are a padded batch, such as
    ``model.to_tokens`` makes of prompts of different lengths: its pads would be read as tokens.

    Where the pad token is also the end-of-text or BOS token (SmolLM2, GPT-2), a prompt may end
    (or start) in one of its own: a difference of one is let through there, so a batch whose
    prompts differ by a single token is not caught.
    """
    tokenizer = getattr(model, "tokenizer", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None or len(rows) < 2:
        return
    shared = pad in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(tokenizer, "bos_token_id", None),
    )
    allowed = 1 if shared else 0

    def trailing(row: Tensor) -> int:  # pad tokens at the end of a row
        return int(torch.cumprod((row.flip(0) == pad).int(), 0).sum())

    for ends in ([trailing(r) for r in rows], [trailing(r.flip(0)) for r in rows]):
        if max(ends) - min(ends) > allowed:
            row = max(range(len(rows)), key=lambda i: ends[i])
            raise ValueError(
                f"{what} tokens: row {row} has {ends[row]} pad tokens (id {pad}) at one end where "
                f"others have {min(ends)}, a padded batch (model.to_tokens pads prompts of "
                "different lengths): pass the prompts as strings, or tensors of equally long "
                "prompts, unpadded."
            )


def position_pairs(
    spec: Any, src: list[int], base: list[int], unit: str = "pair", swap: bool = False
) -> tuple[list[int | str], list[list[tuple[int, int]]]]:
    """Requested positions (ints, or names for :data:`NamedPositions`) and, per pair,
    ``[(p_src, p_base)]`` in each unpadded sequence.

    Example:
        >>> position_pairs(-1, [4], [6])
        ([-1], [[(3, 5)]])
        >>> position_pairs({"S2": [1, 2], "END": -1}, [4, 5], [4, 5])
        (['S2', 'END'], [[(1, 1), (3, 3)], [(2, 2), (4, 4)]])
    """
    if isinstance(spec, Mapping):
        return _named_pairs(spec, src, base, unit, swap)
    if isinstance(spec, str):
        lengths = set(src) | set(base)
        if spec != "all":
            raise ValueError(f"positions must be an int, a list of ints or 'all', not {spec!r}.")
        if len(lengths) != 1:
            raise ValueError(
                f"positions={spec!r} needs every clean and corrupt prompt to have the same token "
                f"length (got {sorted(lengths)}): pick prompts that tokenise to equally many "
                "tokens, or patch positions counted from the end, e.g. positions=[-3, -2, -1]."
            )
        spec = list(range(lengths.pop()))
    wanted = position_list(spec)  # refuses repeated positions (each a column, patched alike)
    resolved = []
    for i, (s, b) in enumerate(zip(src, base, strict=True)):
        pairs = [(p + s if p < 0 else p, p + b if p < 0 else p) for p in wanted]
        for p, (ps, pb) in zip(wanted, pairs, strict=True):
            if not (0 <= ps < s and 0 <= pb < b):
                raise ValueError(
                    f"Position {p} is outside pair {i}, whose prompts have {s} and {b} tokens: "
                    f"use positions within -{min(s, b)}..{min(s, b) - 1}."
                )
        resolved.append(pairs)
    return list(wanted), resolved


def _named_pairs(
    spec: Mapping[Any, Any], src: list[int], base: list[int], unit: str, swap: bool = False
) -> tuple[list[int | str], list[list[tuple[int, int]]]]:
    """:func:`position_pairs` for positions by name: each name one column, at an int for every
    pair or at one entry per pair (IOI's S2 sits at different offsets in different templates):
    an int for both prompts, or a ``(clean, corrupt)`` pair of ints where they differ (names of
    other lengths). ``src`` is the clean prompts' lengths unless ``swap``; ``unit`` is what errors
    call a pair (``"prompt"`` where there is one prompt each, and a pair of ints is refused)."""
    n_pairs = len(src)
    example = "e.g. positions={'S2': [10, 10, 12], 'END': -1}"
    if not spec:
        raise ValueError(f"positions={{}} names no position: name at least one, {example}.")
    per_name: dict[str, list[tuple[int, int]]] = {}
    for name, value in spec.items():
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"positions by name take non-empty strings as names, got {name!r}: {example}."
            )
        single = as_int(value)
        if single is not None:
            per_name[name] = [(single, single)] * n_pairs
            continue
        if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 1:
            value = value.tolist()
        items = [_entry(p, unit) for p in value] if isinstance(value, (list, tuple, range)) else []
        if len(items) != n_pairs or any(p is None for p in items):
            also = " (or a (clean, corrupt) pair of ints)" if unit == "pair" else ""
            raise ValueError(
                f"positions[{name!r}] must be an int (for every {unit}) or one int per {unit} "
                f"({n_pairs} here){also}, got {value!r}: {example}."
            )
        per_name[name] = [p for p in items if p is not None]
    resolved = []
    for i, (s, b) in enumerate(zip(src, base, strict=True)):
        pairs = []
        for name, at in per_name.items():
            clean_at, corrupt_at = at[i]
            p_src, p_base = (corrupt_at, clean_at) if swap else (clean_at, corrupt_at)
            ps, pb = p_src + s if p_src < 0 else p_src, p_base + b if p_base < 0 else p_base
            if not (0 <= ps < s and 0 <= pb < b):
                p = clean_at if clean_at == corrupt_at else (clean_at, corrupt_at)
                tokens = f"prompts have {s} and {b}" if unit == "pair" else f"{unit} has {s}"
                raise ValueError(
                    f"positions[{name!r}] is {p} for {unit} {i}, whose {tokens} tokens: use "
                    f"positions within -{min(s, b)}..{min(s, b) - 1}."
                )
            pairs.append((ps, pb))
        resolved.append(pairs)
    return list(per_name), resolved


def _entry(value: Any, unit: str) -> tuple[int, int] | None:
    """One pair's entry of a named position: an int for both prompts, or (pairs only) a
    ``(clean, corrupt)`` pair of ints; None for anything else."""
    single = as_int(value)
    if single is not None:
        return single, single
    if unit == "pair" and isinstance(value, (tuple, list)) and len(value) == 2:
        clean, corrupt = as_int(value[0]), as_int(value[1])
        if clean is not None and corrupt is not None:
            return clean, corrupt
    return None


def named_indices(
    wanted: Sequence[int | str | None], pairs: Sequence[Sequence[tuple[int, int]]], swap: bool
) -> dict[str, Any]:
    """A result's ``position_indices`` where positions were named: per pair, each column's
    ``(clean, corrupt)`` token index (``pairs`` hold ``(source, run)``; ``swap`` where the source
    is the corrupt prompt). Empty otherwise: ints say their indices themselves."""
    if not any(isinstance(w, str) for w in wanted):
        return {}
    return {
        "position_indices": tuple(
            tuple((b, a) if swap else (a, b) for a, b in pair) for pair in pairs
        )
    }


def _columns(
    spec: Any, src: list[int], base: list[int], unit: str = "pair", swap: bool = False
) -> tuple[list[int | str | None], list[list[tuple[tuple[int, int], ...]]]]:
    """Like :func:`position_pairs`, but each column is a tuple of ``(p_src, p_base)`` written
    together: one position each, or with ``spec=None`` every position of the pair at once (its
    two prompts then need the same length).

    Example:
        >>> _columns(None, [3], [3])
        ([None], [[((0, 0), (1, 1), (2, 2))]])
    """
    if spec is not None:
        wanted, resolved = position_pairs(spec, src, base, unit, swap)
        return list(wanted), [[(pair,) for pair in pairs] for pairs in resolved]
    for i, (s, b) in enumerate(zip(src, base, strict=True)):
        if s != b:
            raise ValueError(
                f"positions=None patches every position at once, position for position, but pair "
                f"{i}'s prompts have {s} and {b} tokens: use prompts of equal length, or "
                "positions counted from the end (e.g. positions=-1)."
            )
    return [None], [[tuple((p, p) for p in range(s))] for s in src]


def _check_common(
    cells_per_batch: Any, memory_budget: Any, n_random: Any, seed: Any
) -> tuple[int, int, int]:
    """Check the arguments every patching function shares; returns ``(cells_per_batch,
    memory_budget, seed)`` as ints (numpy and 0-d tensor integers read as the ints they hold)."""
    check_int(n_random, "n_random", 0)
    return (
        check_int(cells_per_batch, "cells_per_batch", 1),
        check_int(memory_budget, "memory_budget", 1),
        check_seed(seed),
    )


@evaluates
def patch(
    model: Any,
    clean: Prompts,
    corrupt: Prompts,
    sites: SiteKind | SiteLike | Sequence[SiteLike] | SiteGroups,
    positions: PositionSpec | NamedPositions | None,
    metric: PatchMetric | MetricFn,
    *,
    layers: Layers = "all",
    direction: Direction = "denoising",
    n_random: int = 3,
    seed: int = 0,
    cells_per_batch: int = 256,
    memory_budget: int = 1 << 30,
    packed: bool | None = None,
    progress: bool = True,
) -> PatchResult:
    """Patch every (site, position) cell, many cells per forward pass, each beside random controls.

    Args:
        model: A ``TransformerBridge`` or ``HookedTransformer`` (whose forward takes packed rows
            through hooks that mask its attention scores and move its positions; where its
            positions cannot move, e.g. ALiBi, it runs with ``packed=False``, the same numbers).
        clean: Clean prompt(s): a string, a list (one per pair), a :class:`Batch`, or unpadded token
            ids ``[seq]`` / ``[pairs, seq]``.
        corrupt: Corrupt prompt(s), as many as ``clean``.
        sites: A kind (``"resid_pre"``, ``"resid_mid"``, ``"resid_post"``, ``"attn_out"``,
            ``"mlp_out"``: every layer; a head kind ``"head"`` (z), ``"q"``, ``"k"``, ``"v"``,
            ``"pattern"``, ``"head_out"``: every layer x head, key/value heads for k and v), or
            Site(s) / hook names. Or groups by name, ``{"circuit": [Site("head", 1, head=0),
            "mlp_out@2"]}``: each group one row whose cells patch all its sites at once.
        positions: ``-1`` (last token of each prompt), a list of ints (negative from the end),
            ``"all"`` (each position a cell; every clean and corrupt prompt must then have the
            same token length) or None (one cell per site that writes every position at once, as
            TransformerLens's ``get_act_patch_*_all_pos``; each pair's prompts must then have
            the same length, and a random control moves every position by its own patch's
            distance). Or positions by name, one column each, at an int for every pair or one
            int per pair: ``{"S2": [10, 10, 12], "END": -1}`` (templates that put a word at
            different offsets; the frame's ``position`` and ``position_label`` are the names;
            ``position_indices`` records each pair's indices); a pair's entry may be a
            ``(clean, corrupt)`` pair of ints where the prompts hold the word at different
            indices.
            Pattern cells write a query position's whole row of attention weights, so the clean
            and corrupt prompts must see equally many keys there (the same position from the
            start).
        metric: :func:`logit_diff`, :func:`answer_prob`, or a callable ``fn(logits [rows, vocab])
            -> [rows]`` of the last position's logits (``fn(logits, pair)`` receives each row's
            pair index too). With several pairs, results are averaged over pairs (``per_pair``
            keeps them) and recovery is normalised on the averages.
        layers: The layers a kind in ``sites`` covers (int, range, list or ``"all"``).
        direction: ``"denoising"`` runs corrupt and writes clean activations (TransformerLens's
            ``get_act_patch_*`` convention); ``"noising"`` runs clean and writes corrupt ones.
        n_random: Random controls per cell: the activation moved by the patch's own distance
            ``||a_source - a_run||`` in a random direction (control ``j`` of a pair drawn from
            ``(seed + j) % 2**32``, the pair's tokens and the cell's site and position, so the same
            whatever other pairs and cells run beside it; for a pattern row, a direction that
            keeps the row's sum). 0 skips them (and runs
            ``1 + n_random`` times fewer cells).
        seed: Seed of the random directions.
        cells_per_batch: Cells per forward pass, at most (fewer where ``memory_budget`` binds).
        memory_budget: Bytes a forward pass may hold at its peak, estimated from its rows'
            attention (quadratic in their length) and activations: passes take fewer cells on
            long prompts, so memory stays near it whatever the length (one cell always runs).
            Time still grows with ``layers x positions x`` the prompt length for ``"all"``.
        packed: Share each pair's unpatched prefix between cells (None: when the model supports
            it, checked once); False runs one full row per cell.
        progress: Show a progress bar over forward passes.

    Returns:
        A :class:`PatchResult` (values, per-pair values, normalised recovery, the random controls).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.patch(model, "Hi cat", "Hi bat", "mlp_out", -1, mp.logit_diff(1, 2))
        >>> res.values.shape, res.random.shape
        ((3, 1), (3, 1, 3, 1))
    """
    if direction not in get_args(Direction):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    cells_per_batch, memory_budget, seed = _check_common(
        cells_per_batch, memory_budget, n_random, seed
    )
    clean_ids, corrupt_ids = token_pairs(model, clean, corrupt)
    n_pairs = len(clean_ids)
    src, base = (clean_ids, corrupt_ids) if direction == "denoising" else (corrupt_ids, clean_ids)
    rows = site_rows(model, sites, layers)
    wanted, columns = _columns(
        positions, [len(t) for t in src], [len(t) for t in base], swap=direction == "noising"
    )
    for i, pair_columns in enumerate(columns):
        for ps, pb in (pos for column in pair_columns for pos in column):
            if ps != pb and any(s.kind == "pattern" for s in rows.sites):
                raise ValueError(
                    f"Pattern cells at position {ps} of pair {i}'s source and {pb} of its run: a "
                    "pattern row is as long as its position, so both prompts must have the "
                    "position at the same index; use prompts of equal length, or other sites."
                )
    metric_fn, metric_name = bind_metric(model, metric, n_pairs)
    plan = Plan(
        sources=list(src),
        source_groups=list(range(n_pairs)),
        bases=[Base(t, i) for i, t in enumerate(base)],
    )
    grid = [
        (i, r, c, group, column)
        for i, pair_columns in enumerate(columns)
        for r, group in enumerate(rows.groups)
        for c, column in enumerate(pair_columns)
    ]
    # One slot per (cell, site, position) a cell writes: one each, every position with None,
    # every site of a group.
    slots = [
        (n, site, ps, pb)
        for n, (*_, group, column) in enumerate(grid)
        for site in group
        for ps, pb in column
    ]
    widths = [edit_width(model, site, pb) for _, site, _, pb in slots]
    sum_zero = [site.kind == "pattern" for _, site, _, _ in slots]
    pair_tokens = list(zip(clean_ids, corrupt_ids, strict=True))
    pair_of_slot = [grid[n][0] for n, *_ in slots]
    keys = [control_key(site, pb, ps) for _, site, ps, pb in slots]
    for j in range(-1, n_random):
        units = (
            pair_unit_vectors(
                control_seed(seed, j), pair_tokens, pair_of_slot, widths, keys, sum_zero=sum_zero
            )
            if j >= 0
            else None
        )
        edits: list[list[Edit]] = [[] for _ in grid]
        for k, (n, site, ps, pb) in enumerate(slots):
            op, payload = (COPY, None) if units is None else (RANDOM, units[k])
            edits[n].append(site_edit(site, pb, op, source_position=ps, payload=payload))
        for n, (i, r, c, _, _) in enumerate(grid):
            plan.cells.append(Cell((j, i, r, c), base=i, edits=tuple(edits[n]), source=i))
    got = run_plan(
        model,
        plan,
        metric_fn,
        packed=packed,
        cells_per_batch=cells_per_batch,
        memory_budget=memory_budget,
        progress=progress,
    )
    shape = (n_pairs, len(rows), len(wanted))
    per_pair, random = np.full(shape, np.nan), np.full((n_random, *shape), np.nan)
    for cell, value in zip(plan.cells, got.cells.tolist(), strict=True):
        j, i, r, c = cell.key
        (per_pair if j < 0 else random[j])[i, r, c] = value
    src_m, base_m = got.sources.cpu().numpy(), got.bases.cpu().numpy()
    clean_m, corrupt_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)
    return _result(
        model,
        rows,
        wanted,
        per_pair,
        random,
        clean_m,
        corrupt_m,
        metric_name,
        direction,
        seed,
        labels=_labels(model, clean_ids, corrupt_ids, wanted),
        records=pair_records(model, clean_ids, corrupt_ids, metric)
        | named_indices(wanted, [[c[0] for c in cs] for cs in columns], direction == "noising"),
    )


def _result(
    model: Any,
    rows: Rows,
    wanted: Sequence[int | str | None],
    per_pair: np.ndarray,
    random: np.ndarray,
    clean_m: np.ndarray,
    corrupt_m: np.ndarray,
    metric_name: str,
    direction: str,
    seed: int,
    labels: tuple[str, ...],
    records: dict[str, tuple[Any, ...]],
) -> PatchResult:
    values_mean = per_pair.mean(axis=0)
    named = list(zip(rows.names, rows.groups, strict=True))
    normalised = np.full_like(values_mean, np.nan)
    if not direction.endswith("ablation"):
        normalised = normalised_recovery(
            values_mean, clean_m, corrupt_m, metric_name, dtype=model_adapter(model).dtype
        )
    return PatchResult(
        values=values_mean,
        per_pair=per_pair,
        normalised=normalised,
        clean=clean_m,
        corrupt=corrupt_m,
        # a group's row is its name, of kind "group", at no one layer or head
        sites=tuple(str(g[0]) if n is None else n for n, g in named),
        kinds=tuple(g[0].kind if n is None else "group" for n, g in named),
        layers=tuple(g[0].layer if n is None else None for n, g in named),
        heads=tuple(g[0].head if n is None else None for n, g in named),
        members=tuple(tuple(str(s) for s in g) for g in rows.groups),
        positions=tuple(wanted),
        position_labels=labels,
        metric=metric_name,
        direction=direction,
        random=random,
        seed=seed,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        **records,
    )


Method: TypeAlias = Literal["zero", "mean"]


@evaluates
def ablate_cells(
    model: Any,
    prompts: Prompts,
    sites: SiteKind | SiteLike | Sequence[SiteLike] | SiteGroups,
    positions: PositionSpec | NamedPositions | None,
    metric: PatchMetric | MetricFn,
    *,
    method: Method = "mean",
    reference: Prompts | None = None,
    reference_positions: PositionSpec | Literal["same"] = "all",
    layers: Layers = "all",
    n_random: int = 3,
    seed: int = 0,
    cells_per_batch: int = 256,
    memory_budget: int = 1 << 30,
    packed: bool | None = None,
    progress: bool = True,
) -> PatchResult:
    """Ablate every (site, position) cell alone, many cells per forward pass, beside random
    controls: the metric when that one activation is zeroed or set to its mean.

    Args:
        model: A TransformerLens model.
        prompts: The prompt(s) run (a string, a list, a :class:`Batch` or unpadded token ids).
        sites: As for :func:`patch`: kinds, head kinds (``"head"``, ``"q"``, ``"k"``, ``"v"``,
            ``"pattern"``, ``"head_out"``), Sites or hook names, or groups by name (each group
            one row ablating all its sites at once: a circuit's heads knocked out together).
        positions: ``-1``, a list of ints (negative from each prompt's end), ``"all"`` (every
            prompt must then have the same length), None (one cell per site ablating every
            position of the prompt at once: a head or an MLP knocked out), or positions by name
            as for :func:`patch` (one int per prompt).
        metric: As for :func:`patch` (one pair per prompt).
        method: ``"zero"``, or ``"mean"``: the site's mean activation over every token of the
            ``reference`` texts (a leading BOS left out, see :class:`mechprobe.Ablate`; for a
            pattern: the mean row at the same query position over the reference prompts long
            enough to have it). :class:`mechprobe.Ablate` ``("mean")`` averages the positions it
            edits instead: ``reference_positions=-1`` matches it at ``-1``.
        reference: Prompts the mean is taken over (default: ``prompts``).
        reference_positions: The reference prompts' positions the mean is taken over: ``"all"``
            (every real token), ints counted from each prompt's start, negative from its end
            (``-1``: the mean of the last tokens, as function vectors' mean head outputs; not for
            pattern sites), or ``"same"``: a position-wise mean, each position ablated to the
            mean over the reference prompts of their activation at that position (counted from
            the start; Wang et al.'s mean ablation over prompts of one template, where position
            p holds the same role in every prompt; a pattern's mean is always position-wise).
            With ``"same"`` pass prompts of one length, and references as text or unpadded
            ids (a padded tensor's rows are read from their first token); prompts or references
            of several lengths warn, and named positions are ablated to the mean at their own
            index in each prompt, not at the role's.
        layers: The layers a kind covers.
        n_random: Random controls per cell: the activation moved by the ablation's own distance
            in a random direction (control ``j`` of a prompt drawn from ``(seed + j) % 2**32``,
            the prompt's tokens and the cell's site and position, so the same whatever other
            prompts and cells run beside it).
        seed: Seed of the random directions.
        cells_per_batch: Cells per forward pass, at most.
        memory_budget: As for :func:`patch`.
        packed: As for :func:`patch`.
        progress: Show a progress bar.

    Returns:
        A :class:`PatchResult` with ``direction`` ``"zero-ablation"`` or ``"mean-ablation"``:
        ``clean`` holds the intact run's metric, ``corrupt`` NaN, and ``effect`` the change each
        ablation makes.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.ablate_cells(mp.tiny_model(), "Hi cat", "head", -1, mp.logit_diff(1, 2))
        >>> res.values.shape, res.direction
        ((12, 1), 'mean-ablation')
    """
    if method not in get_args(Method):
        raise ValueError(f"method must be 'zero' or 'mean', got {method!r}.")
    cells_per_batch, memory_budget, seed = _check_common(
        cells_per_batch, memory_budget, n_random, seed
    )
    ids = token_rows(model, prompts, "prompts")
    rows = site_rows(model, sites, layers, "ablate_cells()")
    site_list = rows.sites
    if isinstance(reference_positions, str) and reference_positions not in ("all", "same"):
        raise ValueError(
            f"reference_positions takes 'all', 'same' (a position-wise mean), an int or a list "
            f"of ints; got {reference_positions!r}."
        )
    if not isinstance(reference_positions, str):
        # a list of ints from here: a numpy array compared with "all" is an array (review 42a)
        reference_positions = position_list(reference_positions)
    per_position = reference_positions == "same"
    if method == "zero" and (reference is not None or reference_positions != "all"):
        warn(
            "method='zero' reads no reference prompts: reference= and reference_positions= "
            "are unused (they set the mean of method='mean')."
        )
    if reference_positions not in ("all", "same") and any(s.kind == "pattern" for s in site_list):
        raise ValueError(
            "reference_positions applies to vector and head sites; a pattern's mean is taken "
            "per query position: leave reference_positions='all' for pattern sites."
        )
    lengths = [len(t) for t in ids]
    wanted, columns = _columns(positions, lengths, lengths, "prompt")
    metric_fn, metric_name = bind_metric(model, metric, len(ids))
    means: dict[Site, Any] = {}
    if method == "mean":
        ref_ids = ids if reference is None else token_rows(model, reference, "reference")
        means = _means(model, site_list, ref_ids, reference_positions)
        if reference is None and len(ids) == 1:
            ablated = sorted({p for column in columns[0] for _, p in column})
            _warn_if_self_mean(site_list, ablated, lengths[0], reference_positions)
        elif per_position:
            _warn_if_positions_disagree(lengths, [len(t) for t in ref_ids], columns, reference)
    plan = Plan(bases=[Base(t, i) for i, t in enumerate(ids)])
    grid = [
        (i, r, c, group, column)
        for i, prompt_columns in enumerate(columns)
        for r, group in enumerate(rows.groups)
        for c, column in enumerate(prompt_columns)
    ]
    # One slot per (cell, site, position) a cell writes: one each, every position with None,
    # every site of a group.
    slots = [
        (n, site, p)
        for n, (*_, group, column) in enumerate(grid)
        for site in group
        for _, p in column
    ]
    values: list[Tensor] = []
    for _, site, p in slots:
        if method == "zero":
            values.append(torch.zeros(edit_width(model, site, p), dtype=torch.float32))
        elif site.kind == "pattern" or per_position:
            by_position = means[site]
            if p not in by_position:
                raise ValueError(
                    f"Mean-ablation of {site} at position {p}: no reference prompt has {p + 1} "
                    "tokens; pass longer reference prompts, or method='zero'."
                )
            values.append(by_position[p])
        else:
            values.append(means[site])
    widths = [len(v) for v in values]
    sum_zero = [site.kind == "pattern" for _, site, _ in slots]
    pair_tokens, pair_of_slot = [[t] for t in ids], [grid[n][0] for n, _, _ in slots]
    keys = [control_key(site, p) for _, site, p in slots]
    for j in range(-1, n_random):
        units = (
            pair_unit_vectors(
                control_seed(seed, j), pair_tokens, pair_of_slot, widths, keys, sum_zero=sum_zero
            )
            if j >= 0
            else None
        )
        edits: list[list[Edit]] = [[] for _ in grid]
        for k, (n, site, p) in enumerate(slots):
            if units is None:
                edits[n].append(site_edit(site, p, SET, payload=values[k]))
            else:
                edits[n].append(site_edit(site, p, RANDOM, payload=units[k], target=values[k]))
        for n, (i, r, c, _, _) in enumerate(grid):
            plan.cells.append(Cell((j, i, r, c), base=i, edits=tuple(edits[n])))
    got = run_plan(
        model,
        plan,
        metric_fn,
        packed=packed,
        cells_per_batch=cells_per_batch,
        memory_budget=memory_budget,
        progress=progress,
        desc="ablate",
    )
    shape = (len(ids), len(rows), len(wanted))
    per_pair, random = np.full(shape, np.nan), np.full((n_random, *shape), np.nan)
    for cell, value in zip(plan.cells, got.cells.tolist(), strict=True):
        j, i, r, c = cell.key
        (per_pair if j < 0 else random[j])[i, r, c] = value
    intact = got.bases.cpu().numpy()
    return _result(
        model,
        rows,
        wanted,
        per_pair,
        random,
        intact,
        np.full_like(intact, np.nan),
        metric_name,
        f"{method}-ablation",
        seed,
        labels=_labels(model, ids, ids, wanted),
        records=pair_records(model, ids, None, metric)
        | named_indices(wanted, [[c[0] for c in cs] for cs in columns], False),
    )


def _warn_if_self_mean(
    site_list: list[Site],
    ablated: list[int],
    length: int,
    reference_positions: PositionSpec | Literal["same"],
) -> None:
    """Warn where one prompt is its own reference and a mean is that very activation: ablating
    to it changes nothing, and the random controls, moved the same zero distance, agree, so
    those cells would read "no effect"."""
    if reference_positions == "same":
        warn(
            "A position-wise mean (reference_positions='same') over the one prompt ablated is "
            "its own activation at every position: ablating to it changes nothing. Pass "
            "reference prompts (reference=...) of the same template, or use method='zero'.",
        )
        return
    if any(site.kind == "pattern" for site in site_list):
        warn(
            f"The mean pattern row at the ablated query position(s) {ablated} comes from the one "
            "prompt ablated: ablating it there changes nothing. Pass reference prompts "
            "(reference=...) or use method='zero'.",
        )
    if reference_positions != "all" and any(site.kind != "pattern" for site in site_list):
        taken = {p % length for p in position_list(reference_positions)}
        if len(taken) == 1 and taken <= set(ablated):
            warn(
                f"The mean activation is taken over 1 reference token, position {taken.pop()}, "
                "which is the position ablated: ablating it to its own value changes nothing. "
                "Pass reference prompts (reference=...), reference_positions='all', or use "
                "method='zero'.",
            )


def _warn_if_positions_disagree(
    lengths: list[int],
    ref_lengths: list[int],
    columns: list[list[tuple[tuple[int, int], ...]]],
    reference: Prompts | None,
) -> None:
    """A position-wise mean counts positions from each prompt's start, so it means "the same
    token role" only for prompts of one template and length: warn where lengths differ, and
    where a prompt is its own reference at a position no other prompt reaches (its mean there
    is its own activation: that cell reads "no effect")."""
    sizes = sorted(set(ref_lengths) | set(lengths))
    if len(sizes) > 1:
        warn(
            f"reference_positions='same' takes each position's mean over the reference prompts "
            f"that reach it, counted from their start, and these prompts have {len(sizes)} "
            f"lengths ({', '.join(map(str, sizes[:6]))}{' ...' if len(sizes) > 6 else ''} "
            "tokens): a position then holds different tokens in different prompts. Use prompts "
            "of one template and length (group them and run each group), or "
            "reference_positions='all'."
        )
    if reference is not None:
        return
    alone = sorted(
        {
            p
            for i, prompt_columns in enumerate(columns)
            for column in prompt_columns
            for _, p in column
            if sum(n > p for n in ref_lengths) == 1 and lengths[i] > p
        }
    )
    if alone:
        warn(
            f"Position(s) {alone[:8]}{' ...' if len(alone) > 8 else ''} are reached by one "
            "prompt only, which is its own reference there: its mean is its own activation and "
            "ablating to it changes nothing. Pass reference prompts (reference=...) at least as "
            "long, or use method='zero'."
        )


def _means(
    model: Any,
    site_list: list[Site],
    ids: list[Tensor],
    positions: PositionSpec | Literal["same"] = "all",
) -> dict[Site, Any]:
    """Each site's mean activation over the real tokens of ``ids`` (or those at ``positions`` of
    each prompt; pattern sites and ``positions="same"``: ``{position: mean}``, each position's
    mean over the prompts long enough to have it)."""
    lengths = torch.as_tensor([len(t) for t in ids])
    width = int(lengths.max())
    tokens = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for i, t in enumerate(ids):
        tokens[i, : len(t)], mask[i, : len(t)] = t, 1
    batch = Batch(tokens, mask, "right", ("",) * len(ids))
    # 32 prompts per forward pass bound the pass's memory; the captures land in one padded grid.
    captured = run(
        model, batch, capture=site_list, logit_positions=-1, batch_size=32, progress=False
    )
    real = batch.text_mask(captured.bos_id).bool()  # a BOS would set the mean: left out
    if positions not in ("all", "same"):
        real = torch.zeros_like(real)
        for i, n in enumerate(lengths.tolist()):
            for p in position_list(positions):
                if not -n <= p < n:
                    raise ValueError(
                        f"reference_positions {p} is outside reference prompt {i} ({n} tokens)."
                    )
                real[i, p % n] = True
    elif positions == "all" and not real.any():
        # a mean of nothing: every cell was NaN, with only "the metric is not finite" said
        raise ValueError(
            f"The reference prompts ({len(ids)}) have no token after their BOS to take the mean "
            "over: pass reference prompts with text (reference=...), or method='zero'."
        )
    out: dict[Site, Any] = {}
    for site in site_list:
        value = captured[site]
        if site.kind == "pattern":  # [rows, query, key]
            out[site] = {
                p: value[lengths > p, p, : p + 1].double().mean(0).float() for p in range(width)
            }
        elif positions == "same":  # [rows, pos, ...]: the mean at each position
            out[site] = {
                p: value[lengths.to(value.device) > p, p].double().mean(0).float().cpu()
                for p in range(width)
            }
        else:
            out[site] = value[real.to(value.device)].double().mean(0).float().cpu()
    return out


def _labels(
    model: Any,
    clean: Sequence[Tensor],
    corrupt: Sequence[Tensor],
    wanted: Sequence[int | str | None],
) -> tuple[str, ...]:
    """Each position's token (``clean/corrupt`` where they differ); ids without a tokenizer; a
    named position's name.

    Where pairs hold different tokens at a position, the label is the position and pair 0's
    token with an ellipsis (``3: iffel…``): a column averages every pair, and pair 0's token
    alone read as if every pair had it.
    """
    adapter = model_adapter(model)
    out = []
    for p in wanted:
        if p is None:  # every position at once
            out.append("all positions")
            continue
        if isinstance(p, str):  # a name says what the column is better than pair 0's token
            out.append(p)
            continue
        seen = []
        for a, b in zip(clean, corrupt, strict=True):
            # "\n" and " " made visible: a newline's column had a blank label
            texts = (
                token_label(adapter.token_text(int(a[p])), 40),
                token_label(adapter.token_text(int(b[p])), 40),
            )
            seen.append(texts[0] if texts[0] == texts[1] else "/".join(texts))
        out.append(seen[0] if len(set(seen)) == 1 else f"{p}: {seen[0]}…")
    return tuple(out)
