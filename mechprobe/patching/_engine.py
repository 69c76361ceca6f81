"""The batched cell engine behind every patching analysis: many edited runs in one forward pass.

A *plan* has sources (token sequences run unedited, whose activations cells copy), bases (token
sequences run with their own edits, e.g. noise on the subject's embeddings) and cells. A cell is
one edited run of a base: a few :class:`Edit` s, each writing one activation at one position of the
base (copied from a source, a source's change in a random direction of the same norm, a given
value, or a value added). The engine reads the last token's logits of every base, source and cell
and returns a metric of each.

How cells share forward passes: an edit at position ``p`` changes nothing before ``p``, so every
cell of a base shares one copy of the base's run and adds only its suffix ``start .. end``
(``start`` = its first edited position) to the same row, as a segment that attends, through a 4D
attention mask with the original position ids, to the base segment's positions ``< start`` and
causally to itself. Sources ride in the same forward pass, so their activations are copied into
the cells at that very hook call. A ``HookedTransformer`` takes neither a 4D mask nor position
ids: its forward applies them through hooks (``ModelAdapter.forward``). A model whose attention
ignores custom masks is detected once and run with one full row per cell instead
(``packed=False``).

Sharing pays where a cell's suffix is short: a packed row's attention is dense over all its
segments, so a cell editing near the start (a suffix of nearly the whole prompt) runs as its own
row, and packed rows stop at the width that costs least per cell (:class:`_Costs`). A forward
pass takes at most ``cells_per_batch`` cells and no more than fit ``memory_budget`` bytes by the
same estimate, so memory stays bounded whatever the prompt length (time does not: patching every
position of every layer is ``layers * positions`` runs of up to the whole prompt).

Edits by layout of the hooked tensor:

- ``"vector"``: ``[batch, pos, d]`` (residual stream, attn_out, mlp_out, embeddings);
- ``"head"``: ``[batch, pos, head, d]`` (z, q, k, v, the split q/k/v inputs);
- ``"pattern"``: ``[batch, query, head, key]`` (hooks see a pattern query-major); a write replaces
  one query row over the keys the position sees, which the engine maps between a source's row and
  a packed cell's row;
- ``"head_out"``: at ``hook_attn_out``: one head's write ``z @ W_O[head]`` (``z`` read at the same
  layer's ``hook_z`` in the same pass) is replaced, the other heads' are kept.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    HEAD_KINDS,
    Gather,
    Intervention,
    Site,
    SiteLike,
    StopForward,
    check_heads_sum,
    intervene,
    keyed_seeds,
    model_adapter,
    progress_enabled,
    readout,
    warn,
    weighted_progress_bar,
    width,
)
from mechprobe.patching._metrics import check_unpatched

__all__ = [
    "ADD",
    "COPY",
    "RANDOM",
    "SET",
    "Base",
    "Cell",
    "Edit",
    "Layout",
    "Plan",
    "PlanValues",
    "control_key",
    "edit_width",
    "packing_works",
    "pair_unit_vectors",
    "run_plan",
    "site_edit",
    "unit_vectors",
]

Layout: TypeAlias = Literal["vector", "head", "pattern", "head_out"]

#: Edit operations: copy a source's activation; the base's activation moved by a unit vector
#: (the payload) times the norm of the source's difference from it (a same-norm random control);
#: set a value (the payload); add a value (the payload).
COPY, RANDOM, SET, ADD = range(4)


@dataclass(frozen=True, eq=False)
class Edit:
    """One write of a cell at one hook and one position of its base.

    Attributes:
        hook: The hook name written.
        layout: How the hooked tensor is laid out (module docstring).
        position: Position in the base sequence that is written.
        op: :data:`COPY`, :data:`RANDOM`, :data:`SET` or :data:`ADD`.
        head: Head index for the head layouts (-1 otherwise).
        source_position: Position read in the cell's source (COPY and RANDOM).
        payload: The unit vector (RANDOM) or value (SET, ADD), of the written slice's width.
        target: For a RANDOM edit without a source: the value whose distance from the base's
            activation sets the norm (a random control of an ablation).
        layer: The layer whose ``W_O`` a ``head_out`` edit uses.
    """

    hook: str
    layout: Layout
    position: int
    op: int = COPY
    head: int = -1
    source_position: int = -1
    payload: Tensor | None = None
    target: Tensor | None = None
    layer: int = -1


@dataclass(frozen=True, eq=False)
class Base:
    """A run that cells edit: its tokens, the edits every copy of it carries, its metric group."""

    tokens: Tensor
    group: int
    edits: tuple[Edit, ...] = ()


@dataclass(frozen=True, eq=False)
class Cell:
    """One edited run of ``bases[base]``, reading activations of ``sources[source]``."""

    key: Any
    base: int
    edits: tuple[Edit, ...]
    source: int = -1

    @property
    def start(self) -> int:
        """The first position its edits write: the base's run is unchanged before it."""
        return min(e.position for e in self.edits)


@dataclass(eq=False)
class Plan:
    """Everything one analysis runs: sources (with their metric groups), bases and cells."""

    sources: list[Tensor] = field(default_factory=list)
    source_groups: list[int] = field(default_factory=list)
    bases: list[Base] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)


def unit_vectors(
    seed: int, widths: Sequence[int], *, sum_zero: Sequence[bool] | None = None
) -> list[Tensor]:
    """Random unit vectors of the given widths, drawn in order from one generator seeded with
    ``seed`` (so a cell's vector does not depend on how cells are chunked). Where ``sum_zero`` is
    set the vector is orthogonal to the all-ones vector (a change of attention weights that keeps
    their sum).

    Example:
        >>> [round(float(v.norm()), 6) for v in unit_vectors(0, [3, 5])]
        [1.0, 1.0]
    """
    gen = torch.Generator().manual_seed(int(seed))
    out = []
    for i, size in enumerate(widths):
        vec = torch.randn(int(size), generator=gen, dtype=torch.float64)
        if sum_zero is not None and sum_zero[i] and size > 1:
            vec = vec - vec.mean()
        out.append((vec / vec.norm().clamp_min(1e-30)).float())
    return out


def backward_rows(model: Any, width: int, memory_budget: int, extra: int = 0) -> int:
    """How many rows of ``width`` tokens one forward and backward pass may take within
    ``memory_budget`` bytes (at least one): autograd keeps every layer's activations of each row
    for the backward pass, estimated as the number of layers times a forward pass's peak per row
    (:class:`_Costs`), plus the vocabulary's logits three times over (the logits, their softmax
    and gradient, in float32) and ``extra`` bytes a row that the caller keeps (captures and
    gradients of its hooks).

    Example:
        >>> import mechprobe as mp
        >>> backward_rows(mp.tiny_model(), 8, 1 << 30) > backward_rows(mp.tiny_model(), 64, 1 << 30)
        True
    """
    logits = 3 * width * int(model.cfg.d_vocab) * 4
    per_row = int(model.cfg.n_layers) * _Costs.of(model).row_bytes(width) + logits + extra
    return max(1, memory_budget // max(1, per_row))


def hook_bytes(model: Any, hooks: Sequence[str], width: int, copies: int) -> int:
    """Bytes ``copies`` copies of ``hooks``' activations take for one row of ``width`` tokens in
    the model's dtype: a pattern ``n_heads x width`` a token, every other hook at most
    ``d_model`` wide (a head's z, q or k/v heads, the residual stream, a write).

    Example:
        >>> import mechprobe as mp
        >>> hook_bytes(mp.tiny_model(), ["blocks.0.hook_resid_pre"], 10, 3)
        7680
    """
    adapter = model_adapter(model)
    itemsize = torch.empty((), dtype=adapter.dtype).element_size()
    widths = [
        adapter.n_heads * width if h.endswith("hook_pattern") else adapter.d_model for h in hooks
    ]
    return copies * width * sum(widths) * itemsize


def length_passes(
    lengths: Sequence[tuple[int, ...]], rows: Callable[[int], int]
) -> list[list[int]]:
    """The prompts (or pairs) of each gradient pass: those whose prompts have the same lengths
    run together (no padding, so an entry's numbers do not depend on its neighbours), at most
    ``rows(width)`` a pass (``width`` the longest of the entry's lengths), in order of their
    first entry.

    Example:
        >>> length_passes([(3, 5), (4, 5), (3, 5), (3, 5)], lambda width: 2)
        [[0, 2], [3], [1]]
    """
    by_length: dict[tuple[int, ...], list[int]] = {}
    for i, key in enumerate(lengths):
        by_length.setdefault(tuple(key), []).append(i)
    out = []
    for key, same in by_length.items():
        step = max(1, rows(max(key)))
        out += [same[k : k + step] for k in range(0, len(same), step)]
    return out


def control_key(site: Site, position: int, source: int | None = None) -> bytes:
    """What a random control's direction is drawn for, beside its prompts: a site (its kind,
    layer and head) at a position of the run it is written into, and the source's position
    where it differs (two named positions read at one token are two cells; review 42b).

    Example:
        >>> control_key(Site("head", 2, head=1), 5), control_key(Site("head", 2, head=1), 5, 5)
        (b"('head', 2, 1, 5)", b"('head', 2, 1, 5)")
        >>> control_key(Site("mlp_out", 1), 5, 9)
        b"('mlp_out', 1, None, 5, 9)"
    """
    cell: tuple[Any, ...] = (site.kind, site.layer, site.head, int(position))
    if source is not None and int(source) != int(position):
        cell += (int(source),)
    return repr(cell).encode()


def pair_unit_vectors(
    seed: int,
    prompts: Sequence[Sequence[Tensor]],
    pair_of_cell: Sequence[int],
    widths: Sequence[int],
    keys: Sequence[bytes],
    *,
    sum_zero: Sequence[bool] | None = None,
) -> list[Tensor]:
    """Random unit vectors for cells of several pairs: cell ``n`` of pair ``i`` is drawn from
    ``keyed_seed(seed, prompts[i], keys[n])`` (see :func:`control_key`), so a cell's random
    control depends on its pair and itself only, not on the other pairs or cells run beside it,
    their number or their order: re-running a subset of cells gives their controls again.

    Args:
        seed: The control's seed (``(seed + j) % 2**32`` for control ``j``).
        prompts: Per pair, the token ids it is keyed by (clean and corrupt, or one prompt).
        pair_of_cell: The pair of each cell.
        widths: Each cell's width.
        keys: Each cell's key (:func:`control_key`).
        sum_zero: As for :func:`unit_vectors`.

    Example:
        >>> k = [control_key(Site("mlp_out", layer), -1) for layer in range(3)]
        >>> both = pair_unit_vectors(0, [[[1, 2]], [[3, 4]]], [0, 1, 1], [3, 3, 3], k)
        >>> alone = pair_unit_vectors(0, [[[3, 4]]], [0], [3], k[2:])
        >>> torch.equal(both[2], alone[0])
        True
    """
    cells_of: list[list[int]] = [[] for _ in prompts]
    for n, pair in enumerate(pair_of_cell):
        cells_of[pair].append(n)
    seeds = [0] * len(widths)
    for pair, cells in enumerate(cells_of):
        drawn = keyed_seeds(seed, prompts[pair], [keys[n] for n in cells])
        for n, cell_seed in zip(cells, drawn, strict=True):
            seeds[n] = cell_seed
    return [
        unit_vectors(cell_seed, [size], sum_zero=None if sum_zero is None else [sum_zero[n]])[0]
        for n, (cell_seed, size) in enumerate(zip(seeds, widths, strict=True))
    ]


@dataclass(frozen=True, eq=False)
class _Move:
    """An edit placed in a batch: where it writes, where its source is (-1: none), and for a
    pattern row the key indices it writes and reads."""

    dst_row: int
    dst_idx: int
    src_row: int
    src_idx: int
    edit: Edit
    dst_keys: list[int]
    src_keys: list[int]


class _Rows:
    """The rows of one forward pass, built from segments of token sequences."""

    def __init__(self) -> None:
        self.tokens: list[list[int]] = []
        self.pos: list[list[int]] = []
        self.seg: list[list[int]] = []
        self.parent: list[int] = []  # per segment: the segment it sees before its start, or -2
        self.start: list[int] = []
        self.reads: list[tuple[int, int, int]] = []  # (row, index, metric group)
        # (hook, layout) -> op -> moves
        self.moves: dict[tuple[str, str], dict[int, list[_Move]]] = {}

    def new_row(self) -> int:
        for rows in (self.tokens, self.pos, self.seg):
            rows.append([])
        return len(self.tokens) - 1

    def add(self, row: int, ids: Tensor, start: int, parent: int) -> tuple[int, int]:
        """Append ``ids[start:]`` (positions ``start..``) to ``row``: (offset, segment id)."""
        offset, sid, n = len(self.tokens[row]), len(self.parent), len(ids) - start
        self.parent.append(parent)
        self.start.append(start)
        self.tokens[row] += ids[start:].tolist()
        self.pos[row] += range(start, len(ids))
        self.seg[row] += [sid] * n
        return offset, sid

    def move(
        self,
        edit: Edit,
        dst: tuple[int, int],
        src: tuple[int, int] | None,
        keys: tuple[list[int], list[int]] = ([], []),
    ) -> None:
        row, idx = src if src is not None else (-1, -1)
        moves = self.moves.setdefault((edit.hook, edit.layout), {}).setdefault(edit.op, [])
        moves.append(_Move(dst[0], dst[1], row, idx, edit, keys[0], keys[1]))

    def inputs(self, packed: bool, device: Any) -> dict[str, Tensor]:
        width = max(len(t) for t in self.tokens)

        def pad(rows: list[list[int]], fill: int) -> Tensor:
            return torch.as_tensor([r + [fill] * (width - len(r)) for r in rows], device=device)

        tokens, pos, seg = pad(self.tokens, 0), pad(self.pos, 0), pad(self.seg, -1)
        if not packed:  # one segment per row, right-padded: a plain padding mask
            return {"input": tokens, "attention_mask": (seg >= 0).long()}
        parent = torch.as_tensor([*self.parent, -2], device=device)[seg]  # seg -1 -> -2
        start = torch.as_tensor([*self.start, 0], device=device)[seg]
        sq, sk = seg[:, :, None], seg[:, None, :]
        pq, pk = pos[:, :, None], pos[:, None, :]
        allowed = ((sk == sq) & (pk <= pq)) | (
            (sk == parent[:, :, None]) & (pk < start[:, :, None])
        )
        allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding sees itself
        return {"input": tokens, "attention_mask": allowed[:, None], "position_ids": pos}


class _ZRecorder(Intervention):
    """Keeps a layer's ``z`` for the ``head_out`` writer at the same layer's ``hook_attn_out``."""

    def __init__(self) -> None:
        super().__init__(positions=None)
        self.value: Tensor | None = None

    def edit(self, selected: Tensor, hook: Any) -> None:
        self.value = selected
        return None


class _Writer(Intervention):
    """Applies one (hook, layout)'s moves inside one batch; sources are read from the activation
    before any write."""

    def __init__(
        self,
        layout: str,
        moves: dict[int, list[_Move]],
        attn: Any = None,
        z: _ZRecorder | None = None,
    ) -> None:
        super().__init__(positions=None)
        self.layout, self.moves, self.attn, self.z = layout, moves, attn, z
        self.w_o = None if attn is None else attn.W_O.detach()  # [head, d_head, d_model]

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        if self.layout == "head_out":
            assert self.z is not None and self.z.value is not None
            check_heads_sum(self.attn, self.z.value, selected, f"head_out at {hook.name}")
        out = selected.clone()
        if self.layout == "pattern":
            self._pattern(selected, out)
            return out
        for op, moves in self.moves.items():
            dev, dtype = selected.device, selected.dtype
            dr, di, sr, si, head = torch.as_tensor(
                [(m.dst_row, m.dst_idx, m.src_row, m.src_idx, m.edit.head) for m in moves],
                device=dev,
            ).T.unbind(0)
            payload = _stack([m.edit.payload for m in moves], dev, dtype)
            target = _stack([m.edit.target for m in moves], dev, dtype)
            if self.layout == "head_out":
                self._head_out(op, out, (dr, di, sr, si, head), payload, target)
                continue
            dst = (dr, di, head) if self.layout == "head" else (dr, di)
            src = (sr, si, head) if self.layout == "head" else (sr, si)
            base = selected[dst]
            if op == COPY:
                out[dst] = selected[src]
            elif op == SET:
                assert payload is not None
                out[dst] = payload
            elif op == ADD:
                assert payload is not None
                out[dst] = base + payload
            else:
                other = target if target is not None else selected[src]
                out[dst] = base + payload * (other - base).norm(dim=-1, keepdim=True)
        return out

    def _head_out(
        self, op: int, out: Tensor, idx: tuple[Tensor, ...], payload: Any, target: Any
    ) -> None:
        dr, di, sr, si, head = idx
        assert self.z is not None and self.z.value is not None and self.w_o is not None
        z = self.z.value
        w_o = self.w_o.to(z.device, z.dtype)[head]  # [moves, d_head, d_model]
        own = torch.einsum("nd,ndm->nm", z[dr, di, head], w_o)
        if op == COPY:
            change = torch.einsum("nd,ndm->nm", z[sr, si, head], w_o) - own
        elif op == SET:
            change = payload - own
        elif op == ADD:
            change = payload
        else:
            other = (
                target if target is not None else torch.einsum("nd,ndm->nm", z[sr, si, head], w_o)
            )
            change = payload * (other - own).norm(dim=-1, keepdim=True)
        out.index_put_((dr, di), change.to(out.dtype), accumulate=True)

    def _pattern(self, selected: Tensor, out: Tensor) -> None:
        dev, dtype = selected.device, selected.dtype
        for op, moves in self.moves.items():
            for m in moves:
                head, dk = m.edit.head, torch.as_tensor(m.dst_keys, device=dev)
                base = selected[m.dst_row, m.dst_idx, head, dk]
                vec = None if m.edit.payload is None else m.edit.payload.to(dev, dtype)
                other: Tensor | None
                if op in (COPY, RANDOM) and m.src_row >= 0:
                    sk = torch.as_tensor(m.src_keys, device=dev)
                    other = selected[m.src_row, m.src_idx, head, sk]
                else:
                    assert m.edit.target is not None or op in (SET, ADD)
                    other = None if m.edit.target is None else m.edit.target.to(dev, dtype)
                new: Tensor | None
                if op == COPY:
                    new = other
                elif op == RANDOM:
                    assert vec is not None and other is not None
                    new = base + vec * (other - base).norm()
                elif op == SET:
                    new = vec
                else:
                    assert vec is not None
                    new = base + vec
                assert new is not None
                out[m.dst_row, m.dst_idx, head] = 0  # keys outside the cell's view: no weight
                out[m.dst_row, m.dst_idx, head, dk] = new


def _stack(values: list[Tensor | None], device: Any, dtype: torch.dtype) -> Tensor | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    assert len(present) == len(values), "edits of one operation at one hook mix payloads"
    return torch.stack(present).to(device, dtype)


@dataclass
class _Layout:
    rows: _Rows
    keys: list[tuple[str, int]]  # per read: ("source"|"base"|"cell", index)


@dataclass(frozen=True)
class _Costs:
    """What a forward pass of ``rows`` rows padded to ``width`` tokens costs, for one model.

    Memory, measured on SmolLM2's bridge (peak resident memory of one pass): per key and query
    the attention's scores, softmax and masks took 75 bytes (8 per head) with a packed row's 4D
    mask and 150 with a padding mask, which TransformerLens expands; per token 46-65 KB (ten to
    sixteen ``d_model`` and a few ``d_mlp`` activations). The estimate takes the larger of each:
    ``4 * heads * max(itemsize, 4) + 16`` bytes per key and query (softmax runs in float32),
    ``16 * d_model + 4 * d_mlp`` activations per token.

    Time, per row: ``width * (1 + width / crossover)`` in units of one token's dense layers: the
    attention's part grows with the row's width and equals the dense layers' at ``crossover``
    tokens. Measured on SmolLM2 on a CPU: ~700 tokens (eager attention's masking, softmax and
    hooks cost far more than its matrix products), modelled as the dense layers' multiplies per
    token over 600 per head and key.
    """

    n_heads: int
    d_model: int
    d_mlp: int
    itemsize: int
    crossover: float
    # The widest row the model takes (a HookedTransformer's context: its positions are looked up
    # by index before they are moved), or None.
    max_width: int | None = None

    @classmethod
    def of(cls, model: Any) -> _Costs:
        adapter = model_adapter(model)
        d_model, n_heads = adapter.d_model, adapter.n_heads
        d_mlp = int(getattr(model.cfg, "d_mlp", None) or 4 * d_model)
        dense = 4 * d_model * d_model + 3 * d_model * d_mlp
        itemsize = torch.empty((), dtype=adapter.dtype).element_size()
        max_width = int(model.cfg.n_ctx) if adapter.kind == "hooked" else None
        return cls(n_heads, d_model, d_mlp, itemsize, dense / (600 * n_heads), max_width)

    def row_time(self, width: float) -> float:
        """The time of one row of ``width`` tokens, in units of one token's dense layers."""
        return width * (1 + width / self.crossover)

    def row_bytes(self, width: int) -> int:
        """Bytes one row of ``width`` tokens holds at the peak of a forward pass."""
        attention = width * width * (4 * self.n_heads * max(self.itemsize, 4) + 16)
        return attention + width * (16 * self.d_model + 4 * self.d_mlp) * self.itemsize

    def packed_width(self, n_tok: int) -> float:
        """The width of a packed row (a base of ``n_tok`` tokens and its cells' suffixes) that
        costs least per cell: ``n + sqrt(n (n + crossover))``, where the base's share per cell
        balances the attention's growth."""
        return n_tok + (n_tok * (n_tok + self.crossover)) ** 0.5

    def rows_for(self, n_tok: int, total: int) -> int:
        """How many rows a base of ``n_tok`` tokens and packed cells of ``total`` suffix tokens
        in all cost least in: ``k`` rows of ``n + total / k`` tokens each, ``k`` near
        ``total / sqrt(n (n + crossover))`` (rows of :meth:`packed_width`), at least one. A
        sweep at the last position of a 55-token prompt (270 one-token cells) is one row."""
        ideal = max(1.0, total / (self.packed_width(n_tok) - n_tok))

        def cost(k: int) -> float:
            return k * self.row_time(n_tok + total / k)

        return min(sorted({max(1, int(ideal)), int(ideal) + 1}), key=cost)

    def packs(self, n_tok: int, suffix: int) -> bool:
        """Whether a cell with a ``suffix``-token run after its first edit costs less in a packed
        row of :meth:`packed_width` than as its own row of ``n_tok`` tokens (a cell editing
        early costs more packed: its suffix is nearly the whole prompt, and the row repeats the
        base)."""
        width = self.packed_width(n_tok)
        if self.max_width is not None and 2 * width > self.max_width:
            # a base's rows reach twice that at most (rows_for rounds their number down, and
            # a row may pass its share by one suffix): run whole rows instead
            return False
        shared = width - n_tok  # the cells' tokens in such a row
        return self.row_time(width) * suffix / shared <= self.row_time(n_tok)


@dataclass
class _Row:
    """One row of a pass: ``("source", s)`` segments, or a base's row: ``("base", b)`` then its
    packed ``("cell", c)`` segments, or one cell run whole (``("whole", c)``)."""

    segments: list[tuple[str, int]]
    width: int


class _Packer:
    """The cells of one forward pass and how they are laid out, from token counts alone:
    :func:`_chunks` adds cells while :meth:`nbytes` stays within the memory budget, and
    :meth:`rows` lays them out once the pass is complete (a base's packed cells share as many
    rows as :meth:`_Costs.rows_for` finds cheapest for their total length)."""

    def __init__(
        self, plan: Plan, packed: bool, costs: _Costs, read: Sequence[int] | set[int] = ()
    ) -> None:
        self.plan, self.packed, self.costs = plan, packed, costs
        self.read = set(read)  # bases an earlier pass ran: a whole cell does not need them
        self.cells: list[int] = []
        self.whole_cells: list[int] = []
        self.packed_cells: dict[int, list[int]] = {}  # base -> its packed cells
        self.suffixes: dict[int, tuple[int, int]] = {}  # base -> (sum, largest) of suffixes
        self.lone_bases: dict[int, None] = {}  # bases run alone (for their read), in order
        self.sources: dict[int, None] = {}
        self.widest_whole = 0

    def _n_tok(self, c: int) -> int:
        return len(self.plan.bases[self.plan.cells[c].base].tokens)

    def _suffix(self, c: int) -> int:
        return self._n_tok(c) - self.plan.cells[c].start

    def whole(self, c: int) -> bool:
        """Whether cell ``c`` runs as its own row (else after its base's row, sharing its
        prefix)."""
        return not self.packed or not self.costs.packs(self._n_tok(c), self._suffix(c))

    def add(self, c: int) -> None:
        cell = self.plan.cells[c]
        base = cell.base
        self.cells.append(c)
        if self.whole(c):
            self.whole_cells.append(c)
            self.widest_whole = max(self.widest_whole, self._n_tok(c))
            if base not in self.read and base not in self.packed_cells:
                self.lone_bases[base] = None  # read once per plan
        else:
            self.packed_cells.setdefault(base, []).append(c)
            total, largest = self.suffixes.get(base, (0, 0))
            suffix = self._suffix(c)
            self.suffixes[base] = (total + suffix, max(largest, suffix))
            self.lone_bases.pop(base, None)  # its packed rows carry it
        if cell.source >= 0:
            self.sources[cell.source] = None

    def bases_run(self) -> set[int]:
        return set(self.packed_cells) | set(self.lone_bases)

    def nbytes(self) -> int:
        """The pass's estimated peak: every row is padded to the widest. A base's packed rows
        are at most one suffix wider than their even share."""
        n_rows = len(self.whole_cells) + len(self.lone_bases)
        widths = [self.widest_whole, 0]
        widths += [len(self.plan.bases[b].tokens) for b in self.lone_bases]
        for base, (total, largest) in self.suffixes.items():
            n_tok = len(self.plan.bases[base].tokens)
            k = self.costs.rows_for(n_tok, total)
            n_rows += k
            widths.append(n_tok + -(-total // k) + largest)
        lengths = [len(self.plan.sources[s]) for s in self.sources]
        width = max(widths + lengths)
        return (n_rows + len(self._source_rows(lengths, width))) * self.costs.row_bytes(width)

    def time(self) -> float:
        """The pass's estimated time (:meth:`_Costs.row_time`, rows padded to the widest): what
        the progress bar advances by, so that its remaining time holds where passes of long
        whole rows and of packed short cells alternate."""
        rows = self.rows()
        return len(rows) * self.costs.row_time(max(row.width for row in rows))

    def _source_rows(self, lengths: list[int], width: int) -> list[list[int]]:
        """Sources are independent segments: a row takes several while it stays within the
        pass's widest row (they fill padding there); one each where rows are not packed."""
        rows: list[list[int]] = []
        used = width
        for i, n in enumerate(lengths):
            if not self.packed or used + n > width:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows

    def rows(self) -> list[_Row]:
        """The pass's rows: each base's packed cells (in the order added) over its
        :meth:`_Costs.rows_for` rows of about equal width, lone bases, whole cells, sources."""
        rows: list[_Row] = []
        for base, cells in self.packed_cells.items():
            n_tok = len(self.plan.bases[base].tokens)
            total = self.suffixes[base][0]
            k = self.costs.rows_for(n_tok, total)
            share, made, placed = total / k, 1, 0
            row = _Row([("base", base)], n_tok)
            for c in cells:
                suffix = self._suffix(c)
                # Cut where the running total passes the next share, so no row is left the
                # remainder of every other row's rounding.
                if len(row.segments) > 1 and placed + suffix > made * share and made < k:
                    rows.append(row)
                    row, made = _Row([("base", base)], n_tok), made + 1
                row.segments.append(("cell", c))
                row.width += suffix
                placed += suffix
            rows.append(row)
        rows += [_Row([("base", b)], len(self.plan.bases[b].tokens)) for b in self.lone_bases]
        rows += [_Row([("whole", c)], self._n_tok(c)) for c in self.whole_cells]
        sources = list(self.sources)
        lengths = [len(self.plan.sources[s]) for s in sources]
        width = max([row.width for row in rows] + lengths)
        for group in self._source_rows(lengths, width):
            segments = [("source", sources[i]) for i in group]
            rows.append(_Row(segments, sum(lengths[i] for i in group)))
        return rows


def _chunks(
    plan: Plan, packed: bool, costs: _Costs, cells_per_batch: int, memory_budget: int
) -> list[_Packer]:
    """The forward passes: at most ``cells_per_batch`` cells each, and no more than fit
    ``memory_budget`` (one cell always runs).

    Rows of a pass are padded to its widest, so cells run whole (as long as their prompt) and
    cells packed after their base go in separate passes, and a base's packed cells in order of
    their first edited position. A base runs in the first pass that has its cells and again only
    where its packed cells share its prefix.
    """
    judge = _Packer(plan, packed, costs)
    whole = [judge.whole(c) for c in range(len(plan.cells))]

    def key(c: int) -> tuple[bool, int, int, int]:
        cell = plan.cells[c]
        n_tok = len(plan.bases[cell.base].tokens)
        return whole[c], n_tok if whole[c] else 0, cell.base, cell.start

    passes: list[_Packer] = []
    read: set[int] = set()
    packer = _Packer(plan, packed, costs, read)

    def close(done: _Packer) -> _Packer:
        passes.append(done)
        read.update(done.bases_run())
        return _Packer(plan, packed, costs, read)

    for c in sorted(range(len(plan.cells)), key=key):
        chunk = packer.cells
        if chunk and (len(chunk) == cells_per_batch or whole[c] != whole[chunk[0]]):
            packer = close(packer)
        packer.add(c)
        if len(packer.cells) > 1 and packer.nbytes() > memory_budget:
            # The pass without ``c``, rebuilt as it stood (adding is not undone in place).
            done = _Packer(plan, packed, costs, packer.read)
            for kept in packer.cells[:-1]:
                done.add(kept)
            packer = close(done)
            packer.add(c)
    return [*passes, packer] if packer.cells else passes


def _layout(plan: Plan, packer: _Packer) -> _Layout:
    """Rows for one forward pass, as ``packer`` placed them."""
    rows, keys = _Rows(), list[tuple[str, int]]()
    src_at: dict[int, tuple[int, int]] = {}
    # Source rows first: a cell's copies name where its source sits.
    ordered = sorted(packer.rows(), key=lambda row: row.segments[0][0] != "source")
    for desc in ordered:
        row = rows.new_row()
        b_off, b_sid = 0, -2
        for kind, index in desc.segments:
            if kind == "source":
                ids = plan.sources[index]
                offset, _ = rows.add(row, ids, 0, -2)
                src_at[index] = (row, offset)
                rows.reads.append((row, offset + len(ids) - 1, plan.source_groups[index]))
                keys.append(("source", index))
            elif kind == "base":
                base = plan.bases[index]
                b_off, b_sid = rows.add(row, base.tokens, 0, -2)
                for edit in base.edits:
                    rows.move(edit, (row, b_off + edit.position), None)
                rows.reads.append((row, b_off + len(base.tokens) - 1, base.group))
                keys.append(("base", index))
            else:
                _place_cell(
                    plan, rows, row, index, src_at, (b_off, b_sid) if kind == "cell" else None
                )
                keys.append(("cell", index))
    return _Layout(rows, keys)


def _place_cell(
    plan: Plan,
    rows: _Rows,
    row: int,
    c: int,
    src_at: dict[int, tuple[int, int]],
    base_at: tuple[int, int] | None,
) -> None:
    """Append cell ``c`` to ``row``: its suffix after the base segment at ``base_at`` (offset,
    segment id), or (None) its whole sequence."""
    cell = plan.cells[c]
    base = plan.bases[cell.base]
    ids, n_tok = base.tokens, len(base.tokens)
    start = 0 if base_at is None else cell.start
    b_off, b_sid = (0, -2) if base_at is None else base_at
    off, _ = rows.add(row, ids, start, b_sid)
    for edit in base.edits:
        if edit.position >= start:
            rows.move(edit, (row, off + edit.position - start), None)
    for edit in cell.edits:
        dst = (row, off + edit.position - start)
        src = None
        if edit.op in (COPY, RANDOM) and cell.source >= 0:
            s_row, s_off = src_at[cell.source]
            src = (s_row, s_off + edit.source_position)
        view: tuple[list[int], list[int]] = ([], [])
        if edit.layout == "pattern":
            seen = [b_off + k for k in range(start)]  # the base segment's, before the suffix
            seen += [off + k - start for k in range(start, edit.position + 1)]
            first = -1 if src is None else src[1] - edit.source_position
            view = (seen, [first + k for k in range(edit.source_position + 1)])
        rows.move(edit, dst, src, view)
    rows.reads.append((row, off + n_tok - start - 1, base.group))


def _forward_reads(
    model: Any, rows: _Rows, packed: bool, extra_hooks: dict[SiteLike, list[Intervention]]
) -> Float[Tensor, "reads vocab"]:
    """Run the rows with their moves; logits at the read positions only."""
    adapter = model_adapter(model)
    inputs = rows.inputs(packed, adapter.device)
    last = adapter.final_hook
    r, i, _ = torch.as_tensor(rows.reads).unbind(1)
    # The last block's output at the read positions, and the pass ends there: the model's own
    # norm and unembedding of every position (``[rows, width, vocab]``) would be thrown away.
    final = Gather(rows=r, cols=i, stop=True)
    spec: dict[SiteLike, list[Intervention]] = {k: list(v) for k, v in extra_hooks.items()}
    recorders: dict[int, _ZRecorder] = {}
    for (hook, layout), moves in rows.moves.items():
        if layout == "head_out":
            layer = int(hook.split(".")[1])
            recorder = recorders.setdefault(layer, _ZRecorder())
            writer = _Writer(layout, moves, model.blocks[layer].attn, recorder)
            # First at hook_attn_out: the attention output it checks against z is then the one z
            # made, before other cells' attn_out writes in the same pass change their rows.
            spec.setdefault(hook, []).insert(0, writer)
        else:
            spec.setdefault(hook, []).append(_Writer(layout, moves))
    for layer, recorder in recorders.items():
        # Last at hook_z: the z the attention output is made from, after other cells' z writes
        # (a head_out cell's own rows and its sources are never another cell's destination).
        spec.setdefault(f"blocks.{layer}.attn.hook_z", []).append(recorder)
    spec.setdefault(last, []).append(final)  # after any write at that same hook
    with torch.no_grad(), contextlib.suppress(StopForward), intervene(model, spec):
        adapter.forward(
            inputs["input"],
            inputs["attention_mask"],
            position_ids=inputs.get("position_ids"),
        )
    assert final.value is not None
    with torch.no_grad():
        return readout(model, final.value)


# Per model, the verdict of each (dtype, device) it was checked in: a model checked in float32
# and moved to bfloat16 kept its verdict, and packed cells then drifted by 0.07 (review 40c).
_PACKING: weakref.WeakKeyDictionary[Any, dict[tuple[Any, Any], bool]] = weakref.WeakKeyDictionary()


def _packing_tolerance(dtype: torch.dtype) -> float:
    """How far, relative to the logits' scale, a packed read may be from the plain run: 1e-4 in
    float32, and in half precision 4 rounding steps (``4 * eps``) where packing adds no
    rounding of its own. Longer rows round softmax sums and products differently (the check's
    13 reads on SmolLM2 in float16: 3.0 eps on the HookedTransformer, 1.8 on the bridge; 0 in
    bfloat16 on both), while a structural error moves the check's reads by 6.5 eps
    or more on the tiny models in bfloat16 (a position off by one on a NeoX with partial
    rotary; a segment seeing its base's tokens, a blind mask: 13-115 eps; review 41b).

    Example:
        >>> _packing_tolerance(torch.float32), _packing_tolerance(torch.bfloat16)
        (0.0001, 0.03125)
    """
    if not dtype.is_floating_point:
        return 1e-4
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def _check_ids(model: Any) -> Tensor:
    """Eight token ids of ordinary text for the packing check (ids 3-10 without a tokenizer).
    The check ran ids 3-10, which on SmolLM2 are special tokens: their activations put its
    bfloat16 plain run 44% of the logits' scale from float32 (2.3% on text), so the rounding
    the check tolerates was measured where no analysis reads."""
    tokenizer: Any = getattr(model, "tokenizer", None)
    try:
        # no tokenizer (None), or any failure of one: the check falls back to fixed ids
        # rather than stop an analysis over a tokenizer it only borrows (review 41b F5)
        ids = [int(i) for i in tokenizer(_CHECK_TEXT, add_special_tokens=False)["input_ids"]]
    except Exception:
        ids = []
    if len(ids) >= 8 and min(ids[:8]) >= 0 and max(ids[:8]) < int(model.cfg.d_vocab):
        return torch.tensor(ids[:8])
    return torch.arange(3, 11)


_CHECK_TEXT = " The cat sat on the mat and looked out of the window at the rain"


def packing_works(model: Any) -> bool:
    """Once per model: does a packed segment reproduce the unpacked run (masks, position ids)?

    Example:
        >>> from mechprobe.core import tiny_model
        >>> packing_works(tiny_model())
        True
    """
    adapter = model_adapter(model)
    if not adapter.packs_rows:  # e.g. a HookedTransformer with ALiBi positions
        return False
    state = (adapter.dtype, str(adapter.device))
    if state not in _PACKING.get(model, {}):
        # A user's hook left on the model (on unembed.hook_out, say) acts on the plain forward
        # and may not on the packed reads: a verdict reached with one attached is not kept, or
        # packing stayed off for the model's life (a test order showed it).
        keep = not model_adapter(model).attached_hooks()
        # A base and a segment after its first three tokens, with tokens of its own from there
        # (with the base's, a segment reading the base's copies instead of its own went
        # unseen, review 41b), every position read against each one's plain run.
        ids = _check_ids(model)
        own = torch.cat([ids[:3], ids.flip(0)[:5]])
        rows = _Rows()
        row = rows.new_row()
        _, sid = rows.add(row, ids, 0, -2)
        offset, _ = rows.add(row, own, 3, sid)
        rows.reads = [(row, i, 0) for i in range(8)] + [(row, offset + i, 0) for i in range(5)]
        try:
            logits = _forward_reads(model, rows, True, {})
            # Against the plain forward too: GPT-J's and OPT's bridges misread the packed mask
            # (or derive positions from it) the same way for both segments, which agreed.
            with torch.no_grad():
                device = model_adapter(model).device
                plain = torch.cat(
                    [model(ids[None].to(device))[0], model(own[None].to(device))[0, 3:]]
                ).float()
            scale = float(plain.abs().max()) + 1.0
            gap = float((logits.float() - plain).abs().max())
            works = gap <= _packing_tolerance(adapter.dtype) * scale
        except (TypeError, ValueError, RuntimeError):
            # not kept: a transient failure (a GPU out of memory) turned packing off for the
            # model's life (review 41b); a model that always fails pays three 8-token passes
            return False
        if not keep:
            return works
        _PACKING.setdefault(model, {})[state] = works
    return _PACKING[model][state]


@dataclass
class PlanValues:
    """The metric of every cell, base and source of a plan (NaN where not run)."""

    cells: Tensor
    bases: Tensor
    sources: Tensor


def run_plan(
    model: Any,
    plan: Plan,
    metric_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    packed: bool | None = None,
    cells_per_batch: int = 256,
    memory_budget: int = 1 << 30,
    progress: bool = True,
    desc: str = "patch",
    hooks: Callable[[], contextlib.AbstractContextManager[dict[SiteLike, list[Intervention]]]]
    | None = None,
) -> PlanValues:
    """Run every cell of ``plan`` (``cells_per_batch`` per forward pass) and return the metric of
    each cell, base and source.

    Args:
        model: A TransformerLens model.
        plan: Sources, bases and cells.
        metric_fn: ``fn(logits [reads, vocab], group [reads]) -> [reads]``.
        packed: Share each base's unedited prefix between its cells (None: when the model
            supports it, checked once).
        cells_per_batch: Cells per forward pass, at most.
        memory_budget: Bytes a forward pass may hold at its peak, estimated from its rows'
            attention and activations (:class:`_Costs`): a pass takes fewer cells when they
            are long. One cell always runs, whatever it costs.
        progress: A progress bar counting the plan's cells (edited runs), advanced by each
            pass's estimated time.
        desc: The bar's label.
        hooks: A context manager factory entered around each forward pass, yielding extra hooks
            (e.g. path patching's split q/k/v inputs); the model is restored when it exits.

    Raises:
        ValueError: The metric returned the wrong shape, or ``packed=True`` on a model that
            ignores custom attention masks.
    """
    # A packed row's 4D mask replaces a sliding window (Gemma 2's local layers): exact only
    # where no sequence is longer than the window.
    window = model_adapter(model).sliding_window
    lengths = [len(b.tokens) for b in plan.bases] + [len(s) for s in plan.sources]
    longest = max(lengths, default=0)
    if packed is None:
        # A hook already on the model (the user's, or an outer intervene's) edits by index: in
        # a packed row its index is another token's (a +0.5 at index 2 moved the clean metric
        # by 0.07 on a tiny model, review 40c), so rows stay whole while one is attached.
        packed = (
            packing_works(model)
            and (window is None or longest <= window)
            and not model_adapter(model).attached_hooks()
        )
    elif packed and model_adapter(model).attached_hooks():
        # A hook of one's own edits by index (another token's, in a packed row), and on a
        # HookedTransformer one at hook_rot_q/k was overwritten by the packed rotation (review
        # 41b F1): packed=None runs whole rows then; packed=True cannot be honoured.
        attached = model_adapter(model).attached_hooks()
        shown = ", ".join(attached[:3]) + (", ..." if len(attached) > 3 else "")
        raise ValueError(
            f"packed=True with hooks attached to the model ({shown}): a hook edits by index, "
            "which in a packed row is another token's. Pass packed=None (whole rows while "
            "hooks are attached) or packed=False, or remove the hooks (model.reset_hooks())."
        )
    elif packed and not packing_works(model):
        raise ValueError(
            "packed=True, but this model's packed rows do not reproduce its plain run (the "
            "check mechprobe runs once per model and dtype failed: e.g. a HookedTransformer "
            "whose positions hooks cannot move, as ALiBi's, or a bridge that ignores custom "
            "masks or position ids): pass packed=False (one row per cell; the same numbers)."
        )
    elif packed and window is not None and longest > window:
        raise ValueError(
            f"packed=True, but a prompt of {longest} tokens is longer than this model's sliding "
            f"attention window ({window}), which packed rows' masks do not apply: pass "
            "packed=False (or leave packed unset)."
        )
    nan = float("nan")
    values = PlanValues(
        torch.full((len(plan.cells),), nan, dtype=torch.float64),
        torch.full((len(plan.bases),), nan, dtype=torch.float64),
        torch.full((len(plan.sources),), nan, dtype=torch.float64),
    )
    costs = _Costs.of(model)
    passes: list[_Packer | None] = [*_chunks(plan, packed, costs, cells_per_batch, memory_budget)]
    passes = passes or [None]  # no cell: the bases and sources are still measured
    bar = weighted_progress_bar(
        passes,
        # Passes differ in cost by orders of magnitude (a few whole rows of a long prompt, or
        # hundreds of packed one-token cells): the bar advances by each pass's estimated time.
        # (Laid out only for a bar that shows: each estimate lays out its pass's rows.)
        weights=[1.0 if p is None or not progress_enabled(progress) else p.time() for p in passes],
        # The plan's cells: one edited run per pair, result cell and control.
        counts=[0 if p is None else len(p.cells) for p in passes],
        unit="runs",
        progress=progress,
        desc=desc,
    )
    for packer in bar:
        layout = _bare(plan) if packer is None else _layout(plan, packer)
        with _hooks(hooks) as extra:
            logits = _forward_reads(model, layout.rows, packed, extra)
        group = torch.as_tensor([g for _, _, g in layout.rows.reads], device=logits.device)
        got = torch.as_tensor(metric_fn(logits, group)).detach()  # [rows], checked by bind_metric
        for (kind, index), value in zip(layout.keys, got.double().cpu(), strict=True):
            target = {"cell": values.cells, "base": values.bases, "source": values.sources}[kind]
            if kind != "cell":
                check_unpatched(value, kind)
            if kind == "cell" or torch.isnan(target[index]):
                target[index] = value
    bad = int((~torch.isfinite(values.cells)).sum())
    if bad:
        warn(
            f"The metric is not finite in {bad} of {values.cells.numel()} patched cells (NaN or "
            "inf in the result).",
            RuntimeWarning,
        )
    return values


@contextlib.contextmanager
def _hooks(
    factory: Callable[[], contextlib.AbstractContextManager[dict[SiteLike, list[Intervention]]]]
    | None,
) -> Iterator[dict[SiteLike, list[Intervention]]]:
    if factory is None:
        yield {}
    else:
        with factory() as extra:
            yield extra


def _bare(plan: Plan) -> _Layout:
    """Rows for the bases and sources alone (a plan without cells)."""
    rows, keys = _Rows(), list[tuple[str, int]]()
    for s, ids in enumerate(plan.sources):
        row = rows.new_row()
        rows.add(row, ids, 0, -2)
        rows.reads.append((row, len(ids) - 1, plan.source_groups[s]))
        keys.append(("source", s))
    for b, base in enumerate(plan.bases):
        row = rows.new_row()
        rows.add(row, base.tokens, 0, -2)
        for edit in base.edits:
            rows.move(edit, (row, edit.position), None)
        rows.reads.append((row, len(base.tokens) - 1, base.group))
        keys.append(("base", b))
    return _Layout(rows, keys)


def site_edit(
    site: Site,
    position: int,
    op: int,
    *,
    source_position: int = -1,
    payload: Tensor | None = None,
    target: Tensor | None = None,
) -> Edit:
    """The :class:`Edit` that writes ``site`` (a resolved Site) at ``position`` of a base.

    Example:
        >>> site_edit(Site("q", 1, head=2), 4, COPY, source_position=4).hook
        'blocks.1.attn.hook_q'
    """
    if site.kind == "head_out":
        layout: Layout = "head_out"
    elif site.kind == "pattern":
        layout = "pattern"
    elif site.kind in HEAD_KINDS:
        layout = "head"
    else:
        layout = "vector"
    return Edit(
        hook=site.hook_name,
        layout=layout,
        position=position,
        op=op,
        head=-1 if site.head is None else site.head,
        source_position=source_position,
        payload=payload,
        target=target,
        layer=site.layer,
    )


def edit_width(model: Any, site: Site, position: int) -> int:
    """Width of the slice an edit of ``site`` at ``position`` writes (a pattern row: the keys
    ``0..position``)."""
    if site.kind == "pattern":
        return position + 1
    found = width(model, site)
    assert found is not None
    return found
