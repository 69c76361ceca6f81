"""Batching prompts of different lengths: padding, attention masks, last-real-token indices.

Padding bugs are the commonest defect in interpretability code: reading position ``-1`` of a
right-padded row reads a pad token. A :class:`Batch` therefore carries the attention mask and resolves
positions *per row* in the unpadded prompt: ``-1`` is always the last real token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, overload

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from mechprobe.core._adapter import model_adapter
from mechprobe.core._validation import as_int
from mechprobe.core._warning import warn

__all__ = [
    "Batch",
    "PaddingSide",
    "PositionSpec",
    "check_positions",
    "check_token_ids",
    "first_token_ids",
    "pad_id",
    "pad_rows",
    "position_list",
    "tokenize",
    "tokenize_with_targets",
    "writer_positions",
]

PaddingSide = Literal["left", "right"]
#: ``"all"``, one position or a list; negative positions count back from the last real token.
PositionSpec = int | Sequence[int] | Literal["all"]


@dataclass(frozen=True)
class Batch:
    """Tokenised prompts, padded to one length.

    Attributes:
        tokens: ``[batch, seq]`` token ids, pad id where ``attention_mask`` is 0.
        attention_mask: ``[batch, seq]`` 1 for real tokens, 0 for padding.
        padding_side: ``"left"`` or ``"right"``.
        prompts: The source strings (empty strings if built from tokens).
        origin: Each row's index among the prompts it was selected from (None: its own order),
            so that a chunk's errors name the prompt the user passed, not the chunk's row.

    Example:
        >>> import mechprobe as mp
        >>> batch = tokenize(mp.tiny_model(), ["Hi", "Hello"])
        >>> batch.lengths.tolist(), batch.last_index.tolist()
        ([3, 6], [2, 5])
    """

    tokens: Int[Tensor, "batch seq"]
    attention_mask: Int[Tensor, "batch seq"]
    padding_side: PaddingSide
    prompts: tuple[str, ...]
    origin: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real tokens per row (BOS included where the model prepends one)."""
        return self.attention_mask.sum(dim=1)

    @property
    def offset(self) -> Int[Tensor, " batch"]:
        """Padded index of each row's first real token (0 for right padding)."""
        if self.padding_side == "right":
            return torch.zeros_like(self.lengths)
        return self.tokens.shape[1] - self.lengths

    def text_mask(self, bos_id: int | None) -> Int[Tensor, "batch seq"]:
        """``attention_mask`` without a row's leading ``bos_id`` token: the text's own tokens,
        which pooled means average (a BOS that a model's attention sinks into is far longer than
        the text's states, and would set the mean).

        Args:
            bos_id: The BOS token id (:func:`bos_id`), or None: nothing is left out.

        Returns:
            ``[batch, seq]`` integer mask: ``attention_mask`` with 0 at each row's first real
            token where that token is ``bos_id``.

        Example:
            >>> batch = pad_rows([[7, 3, 4], [3, 5]], fill=0, padding_side="left", prompts=["", ""])
            >>> batch.text_mask(7).tolist(), batch.text_mask(None).tolist()
            ([[0, 1, 1], [0, 1, 1]], [[1, 1, 1], [0, 1, 1]])
        """
        mask = self.attention_mask.clone()
        if bos_id is not None and len(self):
            rows, first = torch.arange(len(self)), self.offset
            leads = self.tokens[rows, first] == bos_id
            mask[rows[leads], first[leads]] = 0
        return mask

    @property
    def last_index(self) -> Int[Tensor, " batch"]:
        """Padded index of each row's last real token."""
        return self.offset + self.lengths - 1

    def positions(self, spec: PositionSpec) -> Int[Tensor, "batch k"]:
        """Padded indices ``[batch, k]`` of prompt positions ``spec`` (negative: from the end).

        ``"all"`` is only defined when every row has the same length; use it on a batch of equal
        lengths, or ask for explicit positions.

        Args:
            spec: ``"all"``, one position or a list of them; negative positions count back from
                each row's last real token.

        Returns:
            ``[batch, k]`` long tensor of padded column indices, one column per position asked.

        Raises:
            ValueError: A position falls outside some row's real tokens, or ``"all"`` on rows
                of different lengths.
        """
        lengths = self.lengths
        if isinstance(spec, str):
            if spec != "all":
                only = (
                    " ('generated', the new tokens, is mp.generate's)"
                    if spec == "generated"
                    else ""
                )
                raise ValueError(
                    f"Positions must be an int, a list of ints or 'all', not {spec!r}{only}."
                )
            if not bool((lengths == lengths[0]).all()):
                raise ValueError(
                    "positions='all' on prompts of different lengths has no common grid; "
                    "run them one length at a time, or ask for positions relative to the end "
                    "(e.g. [-3, -2, -1])."
                )
            spec = list(range(int(lengths[0])))
        wanted = torch.as_tensor(position_list(spec), dtype=torch.long, device=lengths.device)
        rel = torch.where(wanted[None, :] < 0, lengths[:, None] + wanted[None, :], wanted[None, :])
        bad = (rel < 0) | (rel >= lengths[:, None])
        if bool(bad.any()):
            row = int(bad.any(dim=1).nonzero()[0])
            number = row if self.origin is None else self.origin[row]
            listed = wanted[bad[row]].tolist()
            outside = str(listed)
            if len(listed) > 8:  # a range past the prompt: its ends, not every position
                outside = f"[{listed[0]}, {listed[1]}, ..., {listed[-1]}] ({len(listed)})"
            raise ValueError(
                f"Position(s) {outside} fall outside prompt {number}, which has "
                f"{int(lengths[row])} tokens (valid: 0..{int(lengths[row]) - 1} or -1..-"
                f"{int(lengths[row])})."
            )
        return rel + self.offset[:, None]

    @classmethod
    def from_tokens(
        cls,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        padding_side: PaddingSide = "right",
    ) -> Batch:
        """Token ids as a Batch: ``model.to_tokens(...)`` output, or ids for a model without a
        tokenizer (``run`` and ``intervene`` take it; functions that tokenise take strings).

        Args:
            tokens: ``[batch, seq]`` (or ``[seq]``) integer ids.
            attention_mask: ``[batch, seq]`` 1 for real tokens (default: every token is real).
            padding_side: Where the padding is, if ``attention_mask`` has any.

        Returns:
            The :class:`Batch` (long ids, empty prompt strings).

        Raises:
            ValueError: Rows of different lengths, ids that are not ``[batch, seq]`` integers, a
                mask of another shape, or a mask that is not padded at ``padding_side``.

        Example:
            >>> import torch
            >>> Batch.from_tokens(torch.tensor([[1, 5, 9]])).last_index.tolist()
            [2]
        """
        if isinstance(tokens, (list, tuple)) and len(tokens) > 1:
            lengths = {len(row) for row in tokens if isinstance(row, (list, tuple, Tensor))}
            if len(lengths) > 1:  # torch said "expected sequence of length 3 at dim 1 (got 4)"
                raise ValueError(
                    f"tokens rows have different lengths ({sorted(lengths)}): pad them to one "
                    "length and pass attention_mask (1 for real tokens), or pass strings."
                )
        ids = torch.as_tensor(tokens)
        ids = ids[None] if ids.ndim == 1 else ids
        if ids.ndim != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"tokens must be [batch, seq] integer ids, got {tuple(ids.shape)} {ids.dtype}."
            )
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask is {tuple(mask.shape)} but tokens are {tuple(ids.shape)}."
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        mask = mask.long()
        # Each row's real tokens must be one run at its padding side: a left-padded mask read
        # as right padding put the last real token in the padding (wrong positions, silently).
        lengths = mask.sum(dim=1, keepdim=True)
        cols = torch.arange(mask.shape[1])[None]
        real = cols < lengths if padding_side == "right" else cols >= mask.shape[1] - lengths
        if not torch.equal(mask.bool(), real):
            other = "left" if padding_side == "right" else "right"
            raise ValueError(
                f"attention_mask is not {padding_side}-padded (each row's real tokens one run at "
                f"its {'start' if padding_side == 'right' else 'end'}): pass "
                f"padding_side={other!r} if the batch is {other}-padded."
            )
        return cls(ids.long(), mask, padding_side, ("",) * len(ids))

    def select(self, rows: slice | Sequence[int]) -> Batch:
        """A sub-batch of the given rows, with padding columns no row uses trimmed off.

        Args:
            rows: A slice of rows, or row indices.

        Returns:
            The sub-:class:`Batch`; its ``origin`` keeps each row's index in the batch it came
            from (so that errors name the prompt the user passed).
        """
        index = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows)
        mask = self.attention_mask[index]
        used = mask.any(dim=0).nonzero().flatten()
        cols = slice(int(used.min()), int(used.max()) + 1) if used.numel() else slice(0, 0)
        return Batch(
            tokens=self.tokens[index][:, cols],
            attention_mask=mask[:, cols],
            padding_side=self.padding_side,
            prompts=tuple(self.prompts[int(i)] for i in index),
            origin=tuple((self.origin or range(len(self)))[int(i)] for i in index),
        )

    def chunks(self, batch_size: int | None) -> Iterator[tuple[slice, Batch]]:
        """Consecutive sub-batches of at most ``batch_size`` rows with their row slices.

        Args:
            batch_size: Rows per sub-batch, a positive int (None: the whole batch at once).

        Yields:
            ``(rows, sub_batch)``: the slice of this batch's rows and their :class:`Batch`.

        Raises:
            TypeError: ``batch_size`` is not an int or None.
            ValueError: ``batch_size`` is not positive.
        """
        # 1.5 or True were truncated to 1 rows per pass: an int (numpy ints too) or None only.
        size = len(self) if batch_size is None else as_int(batch_size)
        if size is None:  # a TypeError, as check_int gives where None is not allowed
            raise TypeError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        if size <= 0:
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        for start in range(0, len(self), size):
            rows = slice(start, min(start + size, len(self)))
            yield rows, (self if size >= len(self) else self.select(rows))

    def texts(self) -> list[str]:
        """The prompts as strings, for the functions that tokenise (and pad) by themselves:
        ``logit_lens`` (which appends targets) and ``collect``.

        Raises:
            TypeError: A batch built from token ids, with no strings to give.

        Example:
            >>> import mechprobe as mp
            >>> tokenize(mp.tiny_model(), ["Hi", "Hello"]).texts()
            ['Hi', 'Hello']
        """
        if not self.prompts or not all(self.prompts):
            raise TypeError(
                "This Batch was built from token ids and holds no prompt strings; pass the "
                "strings (this function tokenises them itself)."
            )
        return list(self.prompts)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on another device.

        Args:
            device: The device (``"cpu"``, ``"cuda"``, a ``torch.device``).

        Returns:
            A :class:`Batch` with its tokens and mask moved, its other fields kept.
        """
        # replace keeps every other field: origin was dropped, and a moved chunk's errors named
        # its own row instead of the prompt the user passed.
        return replace(
            self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device)
        )


def position_list(spec: Any) -> list[int]:
    """Positions as a list of Python ints: one int, or a non-empty sequence of ints (numpy
    integers and 0-d integer tensors count as ints; a 1-d tensor or array as a sequence).

    Raises:
        ValueError: Not an int or a non-empty sequence of ints, or a position named twice.

    Example:
        >>> import numpy as np
        >>> position_list(np.int64(-1)), position_list(torch.tensor([0, 2]))
        ([-1], [0, 2])
    """
    single = as_int(spec)
    if single is not None:
        return [single]
    given = spec
    if isinstance(spec, (torch.Tensor, np.ndarray)):
        if spec.ndim != 1:  # a [rows, positions] array: one list for every row
            raise ValueError(
                f"Positions must be an int, a non-empty list of ints or 'all', got a "
                f"{spec.ndim}-d array of shape {tuple(spec.shape)}: pass one 1-d list, which "
                "every row reads (negative positions count from each row's end)."
            )
        spec = spec.tolist()
    items = [as_int(p) for p in spec] if isinstance(spec, (list, tuple, range)) else []
    if not items or any(p is None for p in items):
        raise ValueError(
            f"Positions must be an int, a non-empty list of ints or 'all', got {given!r}."
        )
    out = [int(p) for p in items if p is not None]
    repeated = sorted({p for p in out if out.count(p) > 1})
    if repeated:
        # [0, 0] collected each row twice (a probe's split could then put one copy in training
        # and the other in its test set) and decoded it twice; patching refused it already.
        raise ValueError(f"positions repeat {repeated}: name each position once.")
    return out


@overload
def check_positions(
    value: Any, *, single: Literal[True], why: str = "", name: str = "positions"
) -> int: ...


@overload
def check_positions(
    value: Any, *, single: bool = False, why: str = "", name: str = "positions"
) -> int | list[int] | Literal["all"]: ...


def check_positions(
    value: Any, *, single: bool = False, why: str = "", name: str = "positions"
) -> int | list[int] | Literal["all"]:
    """``positions=`` read the one way every analysis reads it: ``"all"``, one position (an int;
    numpy integers and 0-d integer tensors count), or several (a non-empty list, tuple, range, or
    1-d array or tensor of distinct ints). Callers with a meaning of their own (``collect``'s
    ``"word_last"``, the deprecated ``None``) read it before calling this.

    Args:
        value: What the caller was given.
        single: Only one position (an int) is taken here (``"all"`` and lists are refused).
        why: With ``single``, why one position only: said in the error.
        name: The argument's name in messages.

    Returns:
        ``"all"``, an ``int`` for one position, or a ``list[int]`` for several.

    Raises:
        TypeError: ``single`` and not one int.
        ValueError: Not a form of positions, or a position named twice.

    Example:
        >>> import numpy as np
        >>> check_positions(np.int64(-1)), check_positions(range(-2, 0)), check_positions("all")
        (-1, [-2, -1], 'all')
    """
    one = as_int(value)
    if one is not None:
        return one
    if single:
        reason = f": {why}" if why else ""
        raise TypeError(f"{name} takes one position (an int) here, not {value!r}{reason}.")
    if isinstance(value, str):
        if value == "all":
            return "all"
        raise ValueError(f"{name} must be 'all', an int or a list of ints, not {value!r}.")
    return position_list(value)


def writer_positions(value: Any, caller: str) -> int | list[int] | Literal["all"]:
    """``positions=`` of a function that writes (an intervention, an erasure), read as
    :func:`check_positions` reads it; its old ``None``, every position, is ``"all"`` with a
    DeprecationWarning that names ``caller`` (for one release).

    Example:
        >>> writer_positions(-1, "f"), writer_positions(range(2), "f"), writer_positions("all", "f")
        (-1, [0, 1], 'all')
    """
    if value is None:
        warn(
            f"{caller}(positions=None) is deprecated and will be removed in the next release; "
            "every position is spelled positions='all' (the default).",
            DeprecationWarning,
        )
        return "all"
    return check_positions(value)


def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("The prompt list is empty: pass at least one prompt string.")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(
                f"Prompt {i} is {type(p).__name__}, not str: pass strings (token ids go to run() "
                "as mechprobe.Batch.from_tokens(tokens))."
            )
    return prompts


def _encode(model: Any, texts: Sequence[str]) -> list[list[int]]:
    tokenizer = model_adapter(model).tokenizer
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def bos_id(model: Any) -> int | None:
    """The tokenizer's BOS token id; None without one (or without a tokenizer: ids are run).

    Example:
        >>> import mechprobe as mp
        >>> bos_id(mp.tiny_model()) == mp.tiny_model().tokenizer.bos_token_id
        True
    """
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)
    return None if bos is None else int(bos)


def _prepend_bos(model: Any, prepend_bos: bool | None) -> int | None:
    adapter = model_adapter(model)
    if prepend_bos is None:
        prepend_bos = adapter.prepend_bos
    if not prepend_bos:
        return None
    bos = adapter.tokenizer.bos_token_id
    if bos is None:
        raise ValueError("This tokenizer has no BOS token; pass prepend_bos=False.")
    return int(bos)


def pad_rows(
    rows: list[list[int]], fill: int, padding_side: PaddingSide, prompts: Sequence[str]
) -> Batch:
    """Pad token-id rows to one length (the one padding routine every reader uses).

    Args:
        rows: Token ids of each row, unpadded and non-empty.
        fill: The id written at padded positions (:func:`pad_id`).
        padding_side: ``"left"`` or ``"right"``.
        prompts: The source text of each row (kept on the batch).

    Example:
        >>> pad_rows([[1, 5], [1]], 2, "left", ["a", ""]).tokens.tolist()
        [[1, 5], [2, 1]]
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
        tokens[i, cols] = torch.as_tensor(row, dtype=torch.long)
        mask[i, cols] = 1
    return Batch(tokens, mask, padding_side, tuple(prompts))


def pad_id(model: Any) -> int:
    """The id written at padded positions: the tokenizer's pad token, else EOS, else 0."""
    tok = model_adapter(model).tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad if pad is not None else 0)


def tokenize(
    model: Any,
    prompts: Sequence[str] | str,
    *,
    padding_side: PaddingSide = "right",
    prepend_bos: bool | None = None,
) -> Batch:
    """Tokenise prompts like ``model.to_tokens`` does, padded into one :class:`Batch`.

    Args:
        model: A TransformerLens model with a tokenizer.
        prompts: One prompt or a non-empty list of prompts.
        padding_side: Where padding goes; results never depend on it.
        prepend_bos: Prepend BOS; ``None`` follows ``model.cfg.default_prepend_bos``.

    Returns:
        A :class:`Batch`: ``tokens`` and ``attention_mask`` of shape ``[n_prompts, seq]`` (``seq``
        the longest prompt's length), one row per prompt.

    Raises:
        ValueError: The prompt list is empty, a prompt is empty and the model adds no BOS, a
            prompt is longer than the model's context, or BOS is asked of a tokenizer without
            one.
        TypeError: A prompt is not a string.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> bool((tokenize(model, "Hi").tokens == model.to_tokens("Hi")).all())
        True
    """
    prompts = _check_prompts(prompts)
    bos = _prepend_bos(model, prepend_bos)
    rows = [([bos] if bos is not None else []) + ids for ids in _encode(model, prompts)]
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"Prompt {i} is empty and the model adds no BOS: pass non-empty text.")
    _check_context(model, rows)
    return pad_rows(rows, pad_id(model), padding_side, prompts)


def tokenize_with_targets(
    model: Any,
    prompts: Sequence[str] | str,
    targets: Sequence[str] | str,
    *,
    padding_side: PaddingSide = "right",
    prepend_bos: bool | None = None,
) -> tuple[Batch, Int[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Tokenise ``prompt + target`` pairs for teacher forcing.

    Prompt and target are tokenised separately and concatenated, so the prompt's tokens are exactly
    those of :func:`tokenize` and the target's tokens are what a scorer would feed one by one.

    Args:
        model: A TransformerLens model with a tokenizer.
        prompts: One prompt or a non-empty list of prompts.
        targets: The text that follows each prompt: one string per prompt (a single string
            goes with a single prompt), ``[n_prompts]``, each non-empty and tokenised on its own
            without BOS (so a leading space is kept as the target's own).
        padding_side: Where padding goes; results never depend on it.
        prepend_bos: Prepend BOS to each prompt; ``None`` follows
            ``model.cfg.default_prepend_bos``.

    Returns:
        ``(batch, target_start, target_length)``: the :class:`Batch` of ``prompt + target`` rows
        (``[n_prompts, seq]``, its ``prompts`` the prompts alone), and two ``[n_prompts]``
        integer tensors. ``target_start[i]`` is the position in the unpadded row of the first
        target token; the prediction of target token ``j`` is read at prompt position
        ``target_start + j - 1``. ``target_length[i]`` is the number of target tokens.

    Raises:
        ValueError: The numbers of prompts and targets differ, a target is empty, or a row is
            longer than the model's context.

    Example:
        >>> import mechprobe as mp
        >>> batch, start, n = tokenize_with_targets(mp.tiny_model(), ["Hi"], [" there"])
        >>> start.tolist(), n.tolist()
        ([3], [6])
    """
    prompts = _check_prompts(prompts)
    targets = [targets] if isinstance(targets, str) else list(targets)
    if len(targets) != len(prompts):
        raise ValueError(
            f"Got {len(prompts)} prompts and {len(targets)} targets: pass one target per prompt."
        )
    bos = _prepend_bos(model, prepend_bos)
    prompt_ids = [([bos] if bos is not None else []) + ids for ids in _encode(model, prompts)]
    target_ids = _encode(model, targets)
    for i, ids in enumerate(target_ids):
        if not ids:
            raise ValueError(f"Target {i} ({targets[i]!r}) is empty: pass a non-empty string.")
    rows = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
    _check_context(model, rows, " with its target")
    batch = pad_rows(rows, pad_id(model), padding_side, prompts)
    start = torch.as_tensor([len(p) for p in prompt_ids], dtype=torch.long)
    length = torch.as_tensor([len(t) for t in target_ids], dtype=torch.long)
    return batch, start, length


def _check_context(model: Any, rows: Sequence[Sequence[int]], what: str = "") -> None:
    """Refuse rows longer than the model's context (positions past it are not trained)."""
    n_ctx = model_adapter(model).n_ctx
    if n_ctx is None:
        return
    for i, row in enumerate(rows):
        if len(row) > int(n_ctx):
            raise ValueError(
                f"Prompt {i}{what} is {len(row)} tokens, longer than the model's context of "
                f"{int(n_ctx)} tokens: shorten it or split it into windows."
            )


def check_token_ids(
    model: Any, rows: Tensor | Sequence[Tensor] | Sequence[Sequence[int]], what: str = "prompt"
) -> None:
    """Refuse token ids outside the model's embedding, naming the row and the position.

    Torch's embedding raised a bare "IndexError: index out of range in self" (a device-side
    assert on a GPU), and a negative id an OverflowError in the tokenizer; strings never hold
    such ids, token ids given by hand can.

    Args:
        model: The model the ids are for.
        rows: ``[batch, seq]`` ids (padding included: it reaches the embedding too), or one 1-D
            tensor or list of ids per row.
        what: What a row is called in the message (``"prompt"``, ``"corrupt prompt"``).

    Raises:
        ValueError: An id below 0 or at least the model's ``d_vocab``.

    Example:
        >>> import mechprobe as mp
        >>> check_token_ids(mp.tiny_model(), torch.tensor([[1, 600, 61]]))
        Traceback (most recent call last):
        ...
        ValueError: Prompt 0 holds token id 600 at position 1, outside the model's vocabulary (0..258): pass token ids of this model, or strings.
    """
    vocab = int(model.cfg.d_vocab)  # the embedding's rows (not the logits' width)
    if isinstance(rows, Tensor) and not bool(((rows < 0) | (rows >= vocab)).any()):
        return  # one pass over a whole batch: a row-by-row loop only to name the culprit
    for i, row in enumerate(rows):
        row = torch.as_tensor(row)
        outside = ((row < 0) | (row >= vocab)).nonzero().flatten()
        if len(outside):
            pos = int(outside[0])
            raise ValueError(
                f"{what[:1].upper()}{what[1:]} {i} holds token id {int(row[pos])} at position "
                f"{pos}, outside the model's vocabulary (0..{vocab - 1}): pass token ids of this "
                "model, or strings."
            )


def warn_unspaced(model: Any, answers: Sequence[str], what: str) -> None:
    """Warn where an answer without a leading space is a token of its own and so is the word
    after a space: ``logit_diff("Paris", "Rome")`` scored the bare tokens, not the " Paris" that
    follows "The capital of France is" (a clean logit difference of 5.27 for 6.21 on SmolLM2).

    Example:
        >>> import mechprobe as mp
        >>> warn_unspaced(mp.tiny_model(), [" a"], "Answer") is None  # spaced: nothing to say
        True
    """
    tokenizer = model.tokenizer
    for answer in dict.fromkeys(a for a in answers if a and not a[0].isspace()):
        spaced = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            warn(
                f"{what} {answer!r} has no leading space: it is scored as the token {answer!r}, "
                f"not {' ' + answer!r} (id {spaced[0]}), the word that follows a space. Pass "
                f"{' ' + answer!r} unless the prompt ends in a space or a newline."
            )
            return


def first_token_ids(model: Any, texts: Sequence[str]) -> list[int]:
    """The first token id of each text, tokenised without special tokens (as answers are).

    Answers and arguments follow a prompt, so they are tokenised on their own, leading space
    included, without BOS: exactly the tokens :func:`tokenize_with_targets` appends.

    Raises:
        ValueError: A text tokenises to nothing.

    Example:
        >>> from mechprobe.core import tiny_model
        >>> first_token_ids(tiny_model(), [" Paris", "a"])
        [223, 67]
    """
    ids = model_adapter(model).tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    for text, row in zip(texts, ids, strict=True):
        if not row:
            raise ValueError(f"{text!r} tokenises to nothing: give a non-empty answer/argument.")
    return [int(row[0]) for row in ids]
