"""Interventions and the context manager that applies them, always removing every hook it added.

Each intervention is a TransformerLens hook callback ``(activation, hook) -> Tensor | None`` that
acts on chosen token positions (``-1`` = each row's last real token, whatever the padding side):

- :class:`Capture` keeps a copy of the activation,
- :class:`Replace` writes a tensor (or what a Capture saw in another run),
- :class:`Add` adds ``scale * vector``,
- :class:`Ablate` zeroes it or sets it to a mean,
- :class:`Project` applies a matrix, removes a subspace, or calls a fitted projection's ``apply``.

Example:
    >>> import torch, mechprobe as mp
    >>> model = mp.tiny_model()
    >>> batch = mp.tokenize(model, ["Hello there", "Hi"])
    >>> with mp.intervene(model, {mp.Site("mlp_out", 1): mp.Ablate()}, batch=batch):
    ...     logits = model(batch.tokens, attention_mask=batch.attention_mask)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor

from mechprobe.core._batching import Batch
from mechprobe.core._sites import Positions, SiteLike, resolve_site, width

__all__ = [
    "Ablate",
    "Add",
    "Capture",
    "Intervention",
    "Project",
    "Replace",
    "intervene",
]


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}.")


class StopForward(Exception):
    """Raised by an intervention to end the forward pass once it has read what it needs.

    Readers such as the logit lens and ``collect`` need activations up to some block only: the
    blocks after it and the model's own unembedding of every position (about a fifth of SmolLM2's
    forward pass, and a ``[batch, seq, vocab]`` tensor) would be wasted. ``intervene`` removes its
    hooks as the exception passes through; the caller catches it around the forward call.
    """


class Intervention:
    """Base class: selects positions (and a head), edits the selection, writes it back.

    Subclasses implement :meth:`edit`, which receives the selected activations
    ``[batch, k, ...]`` (or ``[batch, seq, ...]`` when ``positions`` is None) and returns the
    new values or None to leave them unchanged.

    Args:
        positions: Positions to act on (None: all; negative: from each row's last real token).
            When None, the Site's own ``positions`` apply.
    """

    def __init__(self, positions: Positions = None) -> None:
        self.positions = positions

    def edit(self, selected: Tensor, hook: Any) -> Tensor | None:
        raise NotImplementedError

    def check_width(self, width: int) -> None:
        """Fail before the forward pass if a vector cannot fit an activation of this width."""

    def _hook(self, index: Tensor | None, head: int | None) -> Callable[..., Tensor | None]:
        """The TransformerLens callback, bound to resolved position indices and a head."""

        def fn(activation: Tensor, hook: Any) -> Tensor | None:
            rows = torch.arange(activation.shape[0], device=activation.device)[:, None]
            idx = None if index is None else index.to(activation.device)
            selected = activation if idx is None else activation[rows, idx]
            if head is not None:
                selected = selected[..., head, :]
            new = self.edit(selected, hook)
            if new is None:
                return None
            if new.shape != selected.shape:
                new = new.expand(selected.shape)
            new = new.to(activation.dtype)
            if idx is None and head is None:
                return new
            out = activation.clone()  # never edit in place: the caller's tensors stay intact
            if idx is None:
                out[..., head, :] = new
            elif head is None:
                out[rows, idx] = new
            else:
                part = out[rows, idx]  # advanced indexing copies: edit the copy, write it back
                part[..., head, :] = new
                out[rows, idx] = part
            return out

        return fn


class Capture(Intervention):
    """Keep a detached copy of the activation (at the chosen positions) in ``.value``.

    Example:
        >>> import mechprobe as mp
        >>> model, cap = mp.tiny_model(), mp.Capture(positions=-1)
        >>> with mp.intervene(model, {"blocks.0.hook_resid_post": cap}):
        ...     _ = model(model.to_tokens("Hi"))
        >>> tuple(cap.value.shape)
        (1, 1, 64)
    """

    def __init__(self, positions: Positions = None) -> None:
        super().__init__(positions)
        self.value: Tensor | None = None

    def edit(self, selected: Tensor, hook: Any) -> None:
        self.value = selected.detach().clone()
        return None


class Replace(Intervention):
    """Write ``value`` (a tensor, or what a :class:`Capture` holds) in place of the activation.

    ``value`` broadcasts to the selection ``[batch, k, d]``: ``[d]``, ``[k, d]`` or ``[batch, k, d]``.
    """

    def __init__(self, value: Tensor | np.ndarray | Capture, positions: Positions = None) -> None:
        super().__init__(positions)
        self.value = value if isinstance(value, Capture) else _as_tensor(value, "Replace value")

    def _tensor(self) -> Tensor:
        if isinstance(self.value, Capture):
            if self.value.value is None:
                raise ValueError(
                    "Replace(capture) was applied before the Capture saw any activation: "
                    "run the source prompts with the Capture first."
                )
            return self.value.value
        return self.value

    def check_width(self, width: int) -> None:
        if not isinstance(self.value, Capture) and self.value.shape[-1] != width:
            raise ValueError(
                f"Replace value has width {self.value.shape[-1]} but the site's activations have "
                f"width {width}: pass a tensor whose last dimension is {width}."
            )

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        value = self._tensor().to(selected.device, selected.dtype)
        try:
            return torch.broadcast_to(value, selected.shape)
        except RuntimeError:
            raise ValueError(
                f"Replace value of shape {tuple(value.shape)} does not fit the selected "
                f"activations {tuple(selected.shape)} at {hook.name}: pass [d], [k, d] or "
                f"[batch, k, d] for k selected positions."
            ) from None


class Add(Intervention):
    """Add ``scale * vector`` to the activation (a steering vector, an FFN update o).

    Example:
        >>> import torch, mechprobe as mp
        >>> add = mp.Add(torch.ones(64), scale=2.0, positions=-1)
    """

    def __init__(
        self, vector: Tensor | np.ndarray, scale: float = 1.0, positions: Positions = None
    ) -> None:
        super().__init__(positions)
        self.vector = _as_tensor(vector, "Add vector")
        self.scale = float(scale)

    def check_width(self, width: int) -> None:
        if self.vector.shape[-1] != width:
            raise ValueError(
                f"Add vector has width {self.vector.shape[-1]} but the site's activations have "
                f"width {width}: pass a vector of length {width}."
            )

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        vector = self.vector.to(selected.device, selected.dtype)
        return selected + self.scale * vector


class Ablate(Intervention):
    """Zero the activation, or set it to a mean (given, or the batch's mean over the selection).

    Args:
        method: ``"zero"`` or ``"mean"``.
        mean: The reference mean ``[d]`` for mean-ablation (e.g. over a dataset); when None, the
            mean over the current batch's selected positions is used.
    """

    def __init__(
        self,
        method: Literal["zero", "mean"] = "zero",
        mean: Tensor | np.ndarray | None = None,
        positions: Positions = None,
    ) -> None:
        super().__init__(positions)
        if method not in ("zero", "mean"):
            raise ValueError(f"Ablate method must be 'zero' or 'mean', got {method!r}.")
        self.method = method
        self.mean = None if mean is None else _as_tensor(mean, "Ablate mean")

    def check_width(self, width: int) -> None:
        if self.mean is not None and self.mean.shape[-1] != width:
            raise ValueError(
                f"Ablate mean has width {self.mean.shape[-1]}, the site has {width}: "
                f"pass a mean of length {width}."
            )

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        if self.method == "zero":
            return torch.zeros_like(selected)
        if self.mean is not None:
            return self.mean.to(selected.device, selected.dtype).expand(selected.shape)
        flat = selected.reshape(-1, *selected.shape[2:])
        return flat.mean(dim=0).expand(selected.shape)


class Project(Intervention):
    """Apply a linear map ``x -> x @ P.T``, remove a subspace, or call ``projection.apply(x)``.

    Args:
        matrix: ``P`` of shape ``[d, d]``, or any object with an ``apply(x)`` method (a fitted
            projection such as INLP's or LEACE's, which may be affine).
        remove: Alternatively, rows spanning the subspace to remove, ``[k, d]`` (orthonormalised
            here, so any spanning set works).

    Example:
        >>> import torch, mechprobe as mp
        >>> drop_first = mp.Project(remove=torch.eye(64)[:1])
    """

    def __init__(
        self,
        matrix: Any = None,
        *,
        remove: Tensor | np.ndarray | None = None,
        positions: Positions = None,
    ) -> None:
        super().__init__(positions)
        if (matrix is None) == (remove is None):
            raise ValueError("Project takes exactly one of a matrix/projection or remove=<basis>.")
        self.apply_fn: Callable[[Tensor], Tensor] | None = None
        self.matrix: Tensor | None = None
        self.basis: Tensor | None = None
        if remove is not None:
            rows = _as_tensor(remove, "Project remove").to(torch.float64)
            rows = rows[None, :] if rows.ndim == 1 else rows
            q, _ = torch.linalg.qr(rows.T)  # orthonormal basis of the rows' span, [d, k]
            self.basis = q
        elif hasattr(matrix, "apply") and callable(matrix.apply):
            self.apply_fn = matrix.apply
        else:
            self.matrix = _as_tensor(matrix, "Project matrix")
            if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
                raise ValueError(
                    f"Project matrix must be square [d, d], got {tuple(self.matrix.shape)}."
                )

    def check_width(self, width: int) -> None:
        have = self.matrix if self.matrix is not None else self.basis
        if have is not None and have.shape[0] != width:
            raise ValueError(
                f"Project acts on width {have.shape[0]} but the site has width {width}: "
                f"fit the projection on activations of that site."
            )

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        if self.apply_fn is not None:
            return self.apply_fn(selected)
        if self.basis is not None:
            q = self.basis.to(selected.device, selected.dtype)
            return selected - (selected @ q) @ q.T
        assert self.matrix is not None
        return selected @ self.matrix.to(selected.device, selected.dtype).T


InterventionSpec: TypeAlias = Mapping[SiteLike, Intervention | Sequence[Intervention]]


def _index(batch: Batch | None, positions: Positions) -> Tensor | None:
    if positions is None:
        return None
    if batch is not None:
        return batch.positions(positions)
    # Without a batch we cannot see padding: positions count in the unpadded sequence, which is
    # only right for unpadded (or left-padded, for negative positions) inputs.
    return torch.as_tensor([positions] if isinstance(positions, int) else list(positions))[None]


def _hooks_for(
    model: Any, spec: InterventionSpec, batch: Batch | None
) -> list[tuple[str, Callable[..., Tensor | None]]]:
    """Validate every site and intervention, then build the callbacks (no forward pass yet)."""
    fwd: list[tuple[str, Callable[..., Tensor | None]]] = []
    for key, value in spec.items():
        name, site = resolve_site(model, key)
        items = [value] if isinstance(value, Intervention) else list(value)
        for item in items:
            if not isinstance(item, Intervention):
                raise TypeError(
                    f"{type(item).__name__} at {name} is not an intervention: use Capture, "
                    "Replace, Add, Ablate or Project."
                )
            site_width = width(model, site)
            if site_width is not None:
                item.check_width(site_width)
            positions = item.positions
            if positions is None and site is not None:
                positions = site.positions
            head = site.head if site is not None else None
            index = _index(batch, positions)
            fn = item._hook(index, head)
            if index is not None and batch is None:
                fn = _relative_to_seq(fn, index, item, head)
            fwd.append((name, fn))
    return fwd


def _relative_to_seq(
    fn: Callable[..., Tensor | None], index: Tensor, item: Intervention, head: int | None
) -> Callable[..., Tensor | None]:
    """Resolve negative positions against the activation's own length (no batch given)."""

    def wrapped(activation: Tensor, hook: Any) -> Tensor | None:
        seq = activation.shape[1]
        idx = torch.where(index < 0, index + seq, index).expand(activation.shape[0], -1)
        if bool(((idx < 0) | (idx >= seq)).any()):
            raise ValueError(f"Positions {index.tolist()} fall outside a sequence of {seq} tokens.")
        return item._hook(idx, head)(activation, hook)

    return wrapped


@contextlib.contextmanager
def intervene(
    model: Any, interventions: InterventionSpec, *, batch: Batch | None = None
) -> Iterator[Any]:
    """Apply interventions for the duration of a ``with`` block; every hook is removed after.

    All sites and vector widths are checked before the block starts. The hooks go through the
    model's own ``hooks()`` context, and are removed in ``finally`` even when the forward pass or an
    intervention raises, so the model's outputs afterwards are exactly those before.

    Args:
        model: A TransformerLens model (``TransformerBridge`` or ``HookedTransformer``).
        interventions: ``{site: intervention or [interventions]}``; sites are :class:`Site` or
            hook-name strings. At one site, interventions apply in the order given.
        batch: The batch that will be run; needed to find each row's last real token when the
            prompts are padded. Without it, negative positions count from the sequence's end.

    Yields:
        The model, hooked.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> o = torch.randn(64)
        >>> with mp.intervene(model, {mp.Site("mlp_out", layer=1): mp.Add(o, scale=2.0)}):
        ...     logits = model(model.to_tokens("Hi"))
    """
    fwd = _hooks_for(model, interventions, batch)
    # model.hooks() adds the callbacks and removes exactly those it added in its own finally,
    # also when adding one of them fails halfway; hooks the user attached before stay untouched.
    with model.hooks(fwd_hooks=fwd):
        yield model
