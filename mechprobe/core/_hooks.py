"""Interventions and the context manager that applies them, always removing every hook it added.

Each intervention is a TransformerLens hook callback ``(activation, hook) -> Tensor | None`` that
acts on chosen token positions (``-1`` = each row's last real token, whatever the padding side):

- :class:`Capture` keeps a copy of the activation,
- :class:`Replace` writes a tensor (or what a Capture saw in another run),
- :class:`Add` adds ``scale * vector``,
- :class:`Ablate` zeroes it or sets it to a mean,
- :class:`Project` applies a matrix, removes a subspace, or calls a fitted projection's ``apply``,
- :class:`Gradient` keeps the activation and, after :func:`differentiate`, the gradient of a
  scalar with respect to it (attribution patching), leaving nothing on the model's parameters.

Head sites (:data:`mechprobe.core.HEAD_KINDS`) act on one head's slice: ``q``/``k``/``v``/``head``
select ``[..., head, :]`` of ``[batch, pos, head, d_head]``; ``pattern`` selects the head's rows of
attention weights (query positions are the positions, the last axis runs over key positions);
``head_out`` is the head's write ``z @ W_O[head]`` to the residual stream, read from ``hook_z`` and
edited where the heads' outputs are summed (``hook_attn_out``), so the other heads stay untouched.
A layer's whole pattern or attention scores, named by hook (``blocks.3.attn.hook_pattern``,
``hook_attn_scores``), is seen query-major too, ``[batch, query pos, head, key pos]``: positions
select query rows, and a Capture there holds that layout.

Example:
    >>> import torch, mechprobe as mp
    >>> model = mp.tiny_model()
    >>> batch = mp.tokenize(model, ["Hello there", "Hi"])
    >>> with mp.intervene(model, {mp.Site("mlp_out", 1): mp.Ablate()}, batch=batch):
    ...     logits = model(batch.tokens, attention_mask=batch.attention_mask)
"""

from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import numpy as np
import torch
from torch import Tensor

from mechprobe.core._adapter import model_adapter
from mechprobe.core._batching import Batch, bos_id, position_list
from mechprobe.core._sites import Positions, Site, SiteLike, is_attention_map, resolve_in, width
from mechprobe.core._validation import check_finite, check_float
from mechprobe.core._warning import warn

__all__ = [
    "Ablate",
    "Add",
    "Capture",
    "Gather",
    "Gradient",
    "Intervention",
    "Project",
    "Replace",
    "check_heads_sum",
    "differentiate",
    "gradients_enabled",
    "intervene",
    "intervention_spec",
    "is_pooled",
    "refuse_map_mean",
]


def _as_tensor(value: Any, name: str) -> Tensor:
    if isinstance(value, Tensor):
        # A tensor being trained keeps its graph (a steering vector learned through intervene:
        # detached, its .grad stayed None and the loop ran on, unchanged); others are detached.
        tensor = value if value.requires_grad else value.detach()
    elif isinstance(value, np.ndarray):
        # Results hold read-only arrays (``FunctionVectorResult.vector``): torch warns on those
        # and shares their memory, so they are copied (an intervention never writes its vector).
        tensor = torch.from_numpy(value if value.flags.writeable else value.copy())
    else:
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}."
        )
    # A NaN written into the model turns every logit after it NaN, and run() returned those
    # without a word (review 26b).
    check_finite(tensor.detach(), name)
    return tensor


def _check_magnitude(peak: float, width: int, dtype: torch.dtype, name: str) -> None:
    """Refuse a value written into the stream (a replacement, a mean, ``scale * vector``) whose
    largest entry ``peak`` the model cannot hold: above its dtype's largest number (a float16
    model's 65504 became inf), or, at a site of ``width`` values, above the point where their
    squares summed overflow float32, where the next norm (RMSNorm, LayerNorm) divides by inf and
    zeroes every later state: uniform logits and no NaN to warn of it (``Add(v, scale=1e20)``,
    review 26b L7). Checked per site before the forward pass, where width and dtype are known
    (a scalar broadcasts over the whole width; attention maps take -inf-like masks and are not
    checked)."""
    bound = min(math.sqrt(torch.finfo(torch.float32).max / width), torch.finfo(dtype).max)
    if peak > bound:
        raise ValueError(
            f"{name} reaches {peak:.3g}, above what a {width}-wide {dtype} site holds "
            f"({bound:.3g}: beyond it the value overflows, or its squares summed overflow "
            "float32 in the next norm, which zeroes every later state). Use a smaller scale "
            "or vector."
        )


def _peak(tensor: Tensor, scale: float = 1.0) -> float:
    """The largest magnitude ``scale * tensor`` writes (0 for an empty tensor)."""
    return abs(scale) * float(tensor.detach().abs().max()) if tensor.numel() else 0.0


class StopForward(Exception):
    """Raised by an intervention to end the forward pass once it has read what it needs.

    Readers such as the logit lens and ``collect`` need activations up to some block only: the
    blocks after it and the model's own unembedding of every position (about a fifth of SmolLM2's
    forward pass, and a ``[batch, seq, vocab]`` tensor) would be wasted. ``intervene`` removes its
    hooks as the exception passes through; the caller catches it around the forward call.
    """


class Intervention:
    """Base class: selects positions (and a head), edits the selection, writes it back.

    Subclasses implement :meth:`edit` (its docstring says what it receives and returns).

    Args:
        positions: Positions to act on (None: all; negative: from each row's last real token).
            When None, the Site's own ``positions`` apply.

    Example:
        >>> import torch, mechprobe as mp
        >>> class Negate(mp.Intervention):  # a new intervention edits the selected positions
        ...     def edit(self, selected, hook):
        ...         return -selected
        >>> model = mp.tiny_model()
        >>> out = mp.run(model, ["Hi there"], {mp.Site("resid_post", 0): Negate(positions=-1)})
        >>> out.logits.shape[-1] == model.cfg.d_vocab
        True
    """

    #: Set by :func:`mechprobe.run` on its copy for one chunk of prompts: ``(the chunk's rows,
    #: the number of prompts)``, so that a value with one row per prompt is cut to the chunk's.
    _chunk: tuple[slice, int] | None = None

    def __init__(self, positions: Positions = None) -> None:
        self.positions = positions

    def _for_chunk(self, value: Tensor, selected: Tensor) -> Tensor:
        """``value`` cut to this chunk's rows where it holds one row per prompt: as many axes as
        the selection (so its first axis is the prompts'), one row for each prompt run. A value
        with fewer axes broadcasts over the rows as it is (a ``[k, n_heads, d_head]`` vector at
        ``hook_z`` is one for every prompt, also when ``k`` equals the number of prompts)."""
        if self._chunk is not None:
            rows, n_rows = self._chunk
            if value.ndim == selected.ndim and value.shape[0] == n_rows:
                return value[rows]
        return value

    def edit(self, selected: Tensor, hook: Any) -> Tensor | None:
        """The new values of the selection: what a subclass implements.

        Args:
            selected: The activations at the chosen positions, ``[batch, k, ...]`` (``[batch,
                seq, ...]`` when ``positions`` is None; one head's ``[..., d_head]`` for a
                head's site).
            hook: TransformerLens's hook point (``hook.name`` is the hook's name).

        Returns:
            The new values, shaped as ``selected``; or None to keep the selection as it is:
            unchanged, or as the edit changed it in place (TransformerLens's habit, which takes
            effect at chosen positions too).
        """
        raise NotImplementedError

    def check_width(self, width: int) -> None:
        """Fail before the forward pass if a vector cannot fit an activation of this width."""

    def check_magnitude(self, width: int, dtype: torch.dtype) -> None:
        """Fail before the forward pass if a value it writes cannot be held at a site of this
        width and dtype (:func:`_check_magnitude`)."""

    def edit_masked(self, selected: Tensor, real: Tensor | None, hook: Any) -> Tensor | None:
        """:meth:`edit` with ``real [batch, k]``: which selected positions are real tokens (None:
        unknown). Interventions that pool over positions (mean-ablation) override this."""
        return self.edit(selected, hook)

    def _hook(
        self, index: Tensor | None, head: int | None, mask: Tensor | None = None
    ) -> Callable[..., Tensor | None]:
        """The TransformerLens callback, bound to resolved position indices, a head and the
        batch's attention mask (None without a batch)."""

        def fn(activation: Tensor, hook: Any) -> Tensor | None:
            rows = torch.arange(activation.shape[0], device=activation.device)[:, None]
            idx = None if index is None else index.to(activation.device)
            selected = activation if idx is None else activation[rows, idx]
            if head is not None:
                selected = selected[..., head, :]
            real = None
            if mask is not None:  # the text's tokens (no padding, no leading BOS) selected
                real = mask.to(activation.device).bool()
                real = real if idx is None else real[rows, idx]
            # Bumped by any in-place op on it (inference tensors keep no count).
            version = None if selected.is_inference() else selected._version
            new = self.edit_masked(selected, real, hook)
            if new is None:
                if idx is None or version is None or selected._version == version:
                    return None  # nothing changed, or the activation itself was edited in place
                # At chosen positions ``selected`` is a copy: an edit in place (TransformerLens's
                # habit) vanished there while it worked at every position (review 26b).
                new = selected
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

    Args:
        positions: Positions to keep (None: all, or the Site's own ``positions``; negative:
            from each row's last real token), as for every intervention. ``.value`` is then
            ``[batch, k, ...]`` for ``k`` positions.

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


class Gather(Intervention):
    """Keep the activation at chosen (row, position) places in ``.value``; with ``stop``, end the
    forward pass there (nothing after the site is needed): the reader of the lenses, the patching
    engine and :func:`mechprobe.run`'s readout.

    Args:
        rows: ``[n]`` row of each entry of ``cols`` (``value = activation[rows, cols]``, ``[n,
            ...]``); None: every row.
        cols: Padded positions: ``[n]`` with ``rows``; without, ``[rows, k]`` per row or ``[k]``
            for every row (``value`` ``[rows, k, ...]``, a copy). None: every position, and
            ``value`` is the activation itself, detached (no copy: an edit after it at the same
            hook shows in it).
        stop: Raise :class:`StopForward` once the value is kept.

    Example:
        >>> import torch, mechprobe as mp
        >>> model, keep = mp.tiny_model(), Gather(cols=torch.tensor([0, 2]), stop=True)
        >>> with mp.intervene(model, {"blocks.0.hook_resid_post": keep}):
        ...     try:
        ...         _ = model(model.to_tokens("Hi there"))
        ...     except StopForward:
        ...         pass
        >>> tuple(keep.value.shape)
        (1, 2, 64)
    """

    def __init__(
        self, *, rows: Tensor | None = None, cols: Tensor | None = None, stop: bool = False
    ) -> None:
        super().__init__(None)
        if rows is not None and cols is None:
            raise ValueError("Gather(rows=...) pairs each row with a position: pass cols= too.")
        self.rows, self.cols, self.stop = rows, cols, stop
        self.value: Tensor | None = None

    def edit(self, selected: Tensor, hook: Any) -> None:
        if self.cols is None:
            self.value = selected.detach()
        else:
            # Advanced indexing copies, so the forward pass's own buffers are not kept alive.
            cols = self.cols.to(selected.device)
            if self.rows is not None:
                self.value = selected[self.rows.to(selected.device), cols]
            elif cols.ndim == 2:
                rows = torch.arange(selected.shape[0], device=selected.device)[:, None]
                self.value = selected[rows, cols]
            else:
                self.value = selected[:, cols]
        if self.stop:
            raise StopForward


class Gradient(Intervention):
    """Keep the activation (``.value``) and, once :func:`differentiate` has run, the gradient of a
    scalar output with respect to it (``.grad``, the same shape).

    The hook adds a zero tensor that requires a gradient to the selection and lets the forward
    pass go on from the sum: the activation's value is unchanged, and the gradient with respect to
    that zero tensor is the total derivative of anything downstream with respect to the
    activation. Gradients come from :func:`torch.autograd.grad` on those tensors only, so nothing
    accumulates in the model's parameters' ``.grad``, and everything lives in the autograd graph
    of that one forward pass: after an exception nothing is left to clean up.

    Args:
        positions: Positions whose activation and gradient are kept, as for every
            intervention (``.value`` and ``.grad`` ``[batch, k, ...]``).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> g = mp.Gradient(positions=-1)
        >>> with mp.intervene(model, {mp.Site("resid_post", 1): g}):
        ...     logits = model(model.to_tokens("Hi"))
        >>> mp.differentiate(logits[0, -1, 100], [g])
        >>> tuple(g.grad.shape)
        (1, 1, 64)
    """

    def __init__(self, positions: Positions = None) -> None:
        super().__init__(positions)
        self.value: Tensor | None = None
        self.grad: Tensor | None = None
        self._probe: Tensor | None = None

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        if not torch.is_grad_enabled():
            raise RuntimeError(
                f"Gradient at {hook.name}: gradients are disabled here (torch.no_grad, "
                "torch.inference_mode or torch.set_grad_enabled(False)); run the forward pass "
                "inside `with torch.inference_mode(False), torch.enable_grad():`."
            )
        self.value = selected.detach()
        self.grad = None
        self._probe = torch.zeros_like(selected, requires_grad=True)
        return selected + self._probe


def differentiate(output: Tensor, gradients: Sequence[Gradient]) -> None:
    """Fill each :class:`Gradient`'s ``.grad`` with ``d output / d activation`` (zeros where the
    output does not depend on it). ``output`` is a scalar from the forward pass the Gradients saw.

    Nothing is written to any parameter's ``.grad``, and the graph is freed afterwards.

    Args:
        output: A scalar tensor computed in the forward pass the Gradients were hooked into
            (e.g. a logit difference summed over prompts).
        gradients: The :class:`Gradient` interventions to fill.

    Raises:
        ValueError: ``output`` is not a scalar, or a Gradient saw no forward pass.

    Example:
        >>> import mechprobe as mp
        >>> model, g = mp.tiny_model(), mp.Gradient()
        >>> with mp.intervene(model, {mp.Site("mlp_out", 0): g}):
        ...     out = model(model.to_tokens("Hi"))[0, -1].logsumexp(-1)
        >>> mp.differentiate(out, [g]); bool(g.grad.abs().sum() > 0)
        True
    """
    if output.numel() != 1:
        raise ValueError(
            f"differentiate needs a scalar output, got shape {tuple(output.shape)}: sum or pick one "
            "element first."
        )
    missing = [i for i, g in enumerate(gradients) if g._probe is None]
    if missing:
        raise ValueError(
            f"Gradient(s) {missing} saw no forward pass: run the model inside intervene() first."
        )
    probes = [g._probe for g in gradients]
    if not output.requires_grad:
        raise ValueError(
            "differentiate: the output has no gradient. Compute it from the model's outputs "
            "with torch operations, with gradients enabled (not under torch.no_grad())."
        )
    # With gradients off globally (torch.set_grad_enabled(False), as many notebooks begin), the
    # reshape below would cut the output from its graph.
    with torch.enable_grad():
        grads = torch.autograd.grad(output.reshape(()), probes, allow_unused=True)  # type: ignore[arg-type]
    for g, probe, grad in zip(gradients, probes, grads, strict=True):
        assert probe is not None
        g.grad = torch.zeros_like(probe) if grad is None else grad.detach()
        g._probe = None


@contextlib.contextmanager
def gradients_enabled() -> Iterator[None]:
    """Autograd on inside, whatever the caller set outside.

    Attribution patching, MLP and scalar-mix probes and tuned-lens training differentiate; many
    notebooks begin with ``torch.set_grad_enabled(False)`` or run under ``torch.inference_mode()``,
    where they would fail with "element 0 of tensors does not require grad". Also usable as a
    decorator. Tensors made under inference mode cannot be saved for backward: clone them inside.

    Example:
        >>> import torch
        >>> with torch.no_grad(), gradients_enabled():
        ...     torch.is_grad_enabled()
        True
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


class Replace(Intervention):
    """Write ``value`` (a tensor, or what a :class:`Capture` holds) in place of the activation.

    ``value`` broadcasts to the selection ``[batch, k, d]``: ``[d]``, ``[k, d]`` or ``[batch, k, d]``.

    Args:
        value: What to write: a tensor or array broadcasting to the selection, or a
            :class:`Capture` (its ``.value`` when the hook runs, e.g. from a clean run).
        positions: Positions to write at, as for every intervention.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> zero = mp.Replace(torch.zeros(64), positions=-1)  # one vector, broadcast to each row
        >>> out = mp.run(model, ["Hi there"], {mp.Site("mlp_out", 1): zero})
        >>> out.logits.shape[0]
        1
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
        value = self.value
        if not isinstance(value, Capture) and value.ndim and value.shape[-1] != width:
            raise ValueError(
                f"Replace value has width {value.shape[-1]} but the site's activations have "
                f"width {width}: pass a tensor whose last dimension is {width}."
            )

    def check_magnitude(self, width: int, dtype: torch.dtype) -> None:
        if isinstance(self.value, Tensor):
            _check_magnitude(_peak(self.value), width, dtype, "Replace value")

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        value = self._for_chunk(self._tensor(), selected).to(selected.device, selected.dtype)
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

    ``vector`` broadcasts to the selection ``[batch, k, d]``: ``[d]``, ``[k, d]`` or
    ``[batch, k, d]`` (one per prompt: as many axes as the selection, which
    :func:`mechprobe.run` cuts to each chunk's rows; at a hook with a head axis the selection
    is ``[batch, k, n_heads, d_head]``).
    A ``vector`` that requires a gradient keeps it (as the tensors of :class:`Replace`,
    ``Ablate(mean=)`` and ``Project(matrix)`` do), so a vector can be trained through
    :func:`intervene`, pyvene's ``AdditionIntervention``; the model's own parameters collect
    ``.grad`` too unless their ``requires_grad`` is turned off.

    Args:
        vector: ``[d]``, ``[k, d]`` or ``[batch, k, d]`` tensor or array to add.
        scale: Its multiplier (a finite float).
        positions: Positions to add at, as for every intervention.

    Example:
        >>> import torch, mechprobe as mp
        >>> add = mp.Add(torch.ones(64), scale=2.0, positions=-1)
    """

    def __init__(
        self, vector: Tensor | np.ndarray, scale: float = 1.0, positions: Positions = None
    ) -> None:
        super().__init__(positions)
        self.vector = _as_tensor(vector, "Add vector")
        self.scale = check_float(scale, "Add scale")

    def check_width(self, width: int) -> None:
        if self.vector.ndim and self.vector.shape[-1] != width:
            raise ValueError(
                f"Add vector has width {self.vector.shape[-1]} but the site's activations have "
                f"width {width}: pass a vector of length {width}."
            )

    def check_magnitude(self, width: int, dtype: torch.dtype) -> None:
        _check_magnitude(_peak(self.vector, self.scale), width, dtype, "Add scale * vector")

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        vector = self._for_chunk(self.vector, selected).to(selected.device, selected.dtype)
        return selected + self.scale * vector


class Ablate(Intervention):
    """Zero the activation, or set it to a mean (given, or the mean over the prompts run).

    Args:
        method: ``"zero"`` or ``"mean"``; by default ``"mean"`` when ``mean`` is given, else
            ``"zero"`` (``Ablate(mean=v)`` is a mean-ablation to ``v``).
        mean: The reference mean ``[d]`` for mean-ablation (e.g. over a dataset; ``[k, d]`` or
            ``[batch, k, d]`` broadcast as :class:`Replace`'s value). When None, the
            mean over the real tokens at the selected positions is used: in :func:`mechprobe.run`
            over all its prompts (one extra pass computes it first, so the result does not depend
            on ``batch_size``), under :func:`intervene` over the batch forwarded (which
            ``batch=`` must name). Several such mean-ablations are measured
            together first, with none of them applied (so a downstream mean is the intact
            model's, as in :func:`mechprobe.run`). Padded positions never count, nor does a
            leading BOS token (on models whose attention sinks into it, BOS is far longer than
            the text's states and would set the mean: SmolLM2's mlp_out@11 mean has norm 453
            with it, 11.8 without). So ``Ablate("mean", positions=-1)`` sets
            the last token to the mean of the last tokens, where
            :func:`mechprobe.ablate_cells`'s ``method="mean"`` takes the mean over every token
            unless ``reference_positions=-1`` (one head of SmolLM2 on induction prompts:
            effects -1.66 and -2.25); pass ``mean=`` to choose.
        positions: As for every intervention.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> out = mp.run(model, ["Hi", "Hello"], {mp.Site("mlp_out", 0): mp.Ablate("mean")})
    """

    def __init__(
        self,
        method: Literal["zero", "mean"] | None = None,
        mean: Tensor | np.ndarray | None = None,
        positions: Positions = None,
    ) -> None:
        super().__init__(positions)
        if method is None:
            method = "zero" if mean is None else "mean"
        if method not in ("zero", "mean"):
            raise ValueError(f"Ablate method must be 'zero' or 'mean', got {method!r}.")
        if method == "zero" and mean is not None:
            # The mean was dropped and the site zeroed, without a word (review 26b).
            raise ValueError(
                "Ablate('zero') with mean=: a zero-ablation reads no mean. Pass "
                "Ablate('mean', mean=...) (or Ablate(mean=...)) to set the site to it."
            )
        self.method = method
        self.mean = None if mean is None else _as_tensor(mean, "Ablate mean")

    def check_width(self, width: int) -> None:
        if self.mean is not None and self.mean.ndim and self.mean.shape[-1] != width:
            raise ValueError(
                f"Ablate mean has width {self.mean.shape[-1]}, the site has {width}: "
                f"pass a mean of length {width}."
            )

    def check_magnitude(self, width: int, dtype: torch.dtype) -> None:
        if self.mean is not None:
            _check_magnitude(_peak(self.mean), width, dtype, "Ablate mean")

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        return self.edit_masked(selected, None, hook)

    def edit_masked(self, selected: Tensor, real: Tensor | None, hook: Any) -> Tensor:
        if self.method == "zero":
            return torch.zeros_like(selected)
        if self.mean is not None:
            mean = self._for_chunk(self.mean, selected)
            return mean.to(selected.device, selected.dtype).expand(selected.shape)
        return masked_mean(selected, real).to(selected.dtype).expand(selected.shape)


class Project(Intervention):
    """Apply a linear map ``x -> x @ P.T``, remove a subspace, or call ``projection.apply(x)``.

    Args:
        matrix: ``P`` of shape ``[d, d]``, or any object with an ``apply(x)`` method (a fitted
            projection such as INLP's or LEACE's, which may be affine).
        remove: Alternatively, rows spanning the subspace to remove, ``[k, d]``: an orthonormal
            basis of their span is taken (singular values above ``1e-10`` of the largest; repeated,
            dependent or zero rows add nothing), and :attr:`rank` says how many directions are
            removed.
        positions: Token positions it acts on (``None``: its site's, else every position).

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
        self.apply_dim: int | None = None
        self.matrix: Tensor | None = None
        self.basis: Tensor | None = None
        if remove is not None:
            if isinstance(remove, Tensor) and remove.requires_grad:
                raise ValueError(
                    "Project(remove=) takes a basis of the rows' span by a rank-revealing SVD, "
                    "which is not trained: to learn a subspace, pass Project(matrix) built from "
                    "your parameters (e.g. torch.eye(d) - q.T @ q for orthonormal rows q), or "
                    "remove=rows.detach()."
                )
            rows = _as_tensor(remove, "Project remove").to(torch.float64)
            rows = rows[None, :] if rows.ndim == 1 else rows
            if rows.ndim != 2 or rows.shape[1] == 0:
                raise ValueError(f"Project remove must be [k, d] rows, got {tuple(rows.shape)}.")
            check_finite(rows, "Project remove")
            self.basis = _span(rows)  # [d, rank]
        elif hasattr(matrix, "apply") and callable(matrix.apply):
            self.apply_fn = matrix.apply
            dim = getattr(matrix, "dim", None)  # an Eraser says its width
            self.apply_dim = int(dim) if isinstance(dim, int) else None
        else:
            self.matrix = _as_tensor(matrix, "Project matrix")
            if self.matrix.ndim != 2 or self.matrix.shape[0] != self.matrix.shape[1]:
                raise ValueError(
                    f"Project matrix must be square [d, d], got {tuple(self.matrix.shape)}."
                )

    @property
    def rank(self) -> int | None:
        """Directions removed by ``remove=`` (the rank of the rows given); None for a matrix."""
        return None if self.basis is None else int(self.basis.shape[1])

    def check_width(self, width: int) -> None:
        have = self.matrix if self.matrix is not None else self.basis
        acts_on = have.shape[0] if have is not None else self.apply_dim
        if acts_on is not None and acts_on != width:
            raise ValueError(
                f"Project acts on width {acts_on} but the site has width {width}: "
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


_Edits: TypeAlias = Intervention | Sequence[Intervention]
# Three mappings, not one keyed by ``Site | str``: a mapping's key type is invariant, so a
# ``dict[Site, Ablate]`` a user built would not type-check against ``Mapping[Site | str, ...]``.
InterventionSpec: TypeAlias = (
    Mapping[Site, _Edits] | Mapping[str, _Edits] | Mapping[SiteLike, _Edits]
)


def intervention_spec(
    interventions: InterventionSpec | None,
) -> dict[SiteLike, Intervention | Sequence[Intervention]]:
    """``interventions`` as a dict, refusing what is not ``{site: intervention(s)}`` (a bare list
    of interventions says nothing about where they act).

    Example:
        >>> import torch
        >>> list(intervention_spec({"hook_embed": Add(torch.ones(64))}))
        ['hook_embed']
    """
    if interventions is None:
        return {}
    if not isinstance(interventions, Mapping):
        raise TypeError(
            f"interventions must map sites to interventions, got a {type(interventions).__name__}: "
            "pass {site: intervention or [interventions]}, e.g. "
            "{mp.Site('resid_post', 3): mp.Add(vector, positions=-1)}."
        )
    return {
        key: (
            [_as_intervention(key, v) for v in value]
            if isinstance(value, (list, tuple))
            else _as_intervention(key, value)
        )
        for key, value in interventions.items()
    }


def _as_intervention(site: Any, value: Any) -> Any:
    """A TransformerLens hook function becomes a :class:`_Callback`; anything else is checked
    where the hooks are built."""
    if isinstance(value, type) and issubclass(value, Intervention):
        raise TypeError(
            f"{value.__name__} at {site} is a class: pass an instance, e.g. {value.__name__}()."
        )
    if callable(value) and not isinstance(value, Intervention):
        return _Callback(site, value)
    return value


class _Callback(Intervention):
    """A hand-written TransformerLens hook ``fn(activation, hook)`` as an intervention.

    It receives what the site selects (the whole activation, as TransformerLens passes it, for a
    hook name or a Site without positions; one head's slice for a head Site) and returns the new
    values, or None after editing them in place. It edits a copy, which is written back, so the
    TransformerLens idiom ``act[:] = 0`` acts the same on every site and model class (where the
    selection is computed or selected, or where a bridge's MLP input is the residual stream).
    """

    def __init__(self, site: Any, fn: Callable[..., Tensor | None]) -> None:
        super().__init__(None)
        self.fn = fn
        self.label = f"hook {getattr(fn, '__name__', type(fn).__name__)}"
        # Hooks see attention maps query-major; a hand-written function at a map's hook name
        # indexes TransformerLens's [batch, head, query, key] (a[:, 0] is head 0 there).
        self.head_major = isinstance(site, str) and is_attention_map(site)
        try:  # TransformerLens calls fn(activation, hook=hook_point)
            inspect.signature(fn).bind(None, hook=None)
        except TypeError:
            raise TypeError(
                f"The hook function {self.label[5:]} at {site} must take (activation, hook), as "
                "a TransformerLens hook does: def fn(act, hook): ..."
            ) from None
        except ValueError:  # no signature to read (a builtin): let the call decide
            pass

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        # A copy: what a hook hands over may be shared (a bridge's MLP input is the residual
        # stream itself), or computed here (resid_mid, head_out), or a selection of positions.
        flip = self.head_major and selected.ndim == 4
        given = selected.transpose(1, 2) if flip else selected
        mine = given.clone()
        new = self.fn(mine, hook=hook)
        if new is None:
            new = mine  # edited in place, or not at all: the same values either way
        where = f"The hook function {self.label[5:]} at {getattr(hook, 'name', '?')}"
        if not isinstance(new, Tensor):
            raise TypeError(f"{where} returned a {type(new).__name__}: return a tensor or None.")
        if new.shape != given.shape:
            raise ValueError(
                f"{where} returned shape {tuple(new.shape)} for an activation of shape "
                f"{tuple(given.shape)}: return the same shape (or None after editing in place)."
            )
        return new.transpose(1, 2) if flip else new


def _span(rows: Tensor) -> Tensor:
    """Orthonormal basis ``[d, rank]`` of the span of ``rows [k, d]`` (rank-revealing SVD)."""
    _, values, vh = torch.linalg.svd(rows, full_matrices=False)
    if values.numel() == 0 or float(values[0]) == 0.0:
        return rows.new_zeros(rows.shape[1], 0)
    keep = values > 1e-10 * values[0]
    return vh[keep].T.contiguous()


def masked_mean(selected: Tensor, real: Tensor | None) -> Tensor:
    """Mean of ``selected [batch, k, ...]`` over rows and positions, real tokens only (``real
    [batch, k]`` bool; None: all count), accumulated in float64.

    Example:
        >>> x = torch.tensor([[[1.0], [3.0]], [[5.0], [99.0]]])
        >>> masked_mean(x, torch.tensor([[True, True], [True, False]])).tolist()
        [3.0]
    """
    flat = selected.reshape(-1, *selected.shape[2:]).double()
    if real is None:
        return flat.mean(dim=0)
    keep = real.reshape(-1).to(flat.device)
    if not bool(keep.any()):
        raise ValueError(
            "Mean-ablation over no token of the text: the selection holds only padding (and a "
            "leading BOS, left out of means)."
        )
    return flat[keep].mean(dim=0)


def is_hook_function(item: Any) -> bool:
    """Whether ``item`` is a plain TransformerLens hook function ``fn(activation, hook)`` taken as
    an intervention (which sees the padded activation as it is, positions and all).

    Example:
        >>> is_hook_function(_as_intervention("x", lambda act, hook: act)), is_hook_function(Add)
        (True, False)
    """
    return isinstance(item, _Callback)


def is_pooled(item: Any) -> bool:
    """Whether ``item`` is a mean-ablation without its own mean (the mean of the prompts run).

    Example:
        >>> is_pooled(Ablate("mean")), is_pooled(Ablate("mean", mean=torch.zeros(4)))
        (True, False)
    """
    return isinstance(item, Ablate) and item.method == "mean" and item.mean is None


def refuse_map_mean(site: SiteLike, item: Intervention) -> None:
    """Refuse a mean-ablation of an attention map that would average over the prompts run.

    The key axis of ``[batch, query, head, key]`` is the batch's padded layout: under left
    padding key ``j`` is a different token in each row, under right padding a short row's keys
    run into padding, so a mean over rows mixes tokens and depends on how the batch was padded.

    Example:
        >>> refuse_map_mean("blocks.0.attn.hook_pattern", Ablate())  # zero-ablation is fine
    """
    if is_pooled(item) and is_attention_map(site):
        raise ValueError(
            f"Ablate('mean') without mean= at {site}, an attention map: its key axis is the "
            "batch's padded layout (under left padding key j is a different token in each "
            "row), so a mean over the prompts would mix tokens and depend on the padding. Use "
            "mp.ablate_cells(model, prompts, 'pattern', positions, metric, method='mean') "
            "(the mean row per query position over the prompts that have it), or pass "
            "mean= of your own (one weight per key)."
        )


def _index(batch: Batch | None, positions: Positions) -> Tensor | None:
    if positions is None or (isinstance(positions, str) and positions == "all"):
        return None
    if batch is not None:
        return batch.positions(positions)
    # Without a batch, positions count in the one sequence forwarded (checked in the hook).
    return torch.as_tensor(position_list(positions))[None]


def _hooks_for(
    model: Any,
    spec: InterventionSpec,
    batch: Batch | None,
    key_mask: Tensor | None,
    hooks: Mapping[str, Any],
) -> list[tuple[str, Callable[..., Tensor | None]]]:
    """Validate every site and intervention against ``hooks`` (the model's ``hook_dict``), then
    build the callbacks (no forward pass yet)."""
    fwd: list[tuple[str, Callable[..., Tensor | None]]] = []
    model_dtype = model_adapter(model).dtype  # the embedding's: a first parameter need not be
    resolved = [
        (resolve_in(model, key, hooks), value) for key, value in intervention_spec(spec).items()
    ]
    # On a bridge, resid_mid's hook is inside the MLP's norm, after hook_mlp_in: where mlp_in is
    # edited, resid_mid is read through the attention output too, or it would see that edit.
    mlp_in_layers = {site.layer for (_, site), _ in resolved if site and site.kind == "mlp_in"}
    # resid_mid's edits made at hook_attn_out go after every intervention at attn_out itself, as
    # hook_resid_mid fires after hook_attn_out on a HookedTransformer: an attn_out capture keeps
    # the attention output, and the edit sees attn_out's own edits.
    after: list[tuple[str, Callable[..., Tensor | None]]] = []
    # Pooled means average the text's tokens: padding and a leading BOS left out.
    text = None if batch is None else batch.text_mask(bos_id(model))
    for (name, site), value in resolved:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if not isinstance(item, Intervention):
                raise TypeError(
                    f"{type(item).__name__} at {name} is not an intervention: use Capture, "
                    "Replace, Add, Ablate or Project, or a hook function fn(activation, hook)."
                )
            refuse_map_mean(name if site is None else site, item)
            site_width = width(model, site)
            if site_width is not None:  # None: an attention map or a hook of no site kind
                item.check_width(site_width)
                item.check_magnitude(site_width, model_dtype)
            positions = item.positions
            if positions is None and site is not None:
                positions = site.positions
            kind = None if site is None else site.kind
            # head_out edits a tensor made in the hook ([batch, pos, d_model]), with no head axis.
            head = site.head if site is not None and kind != "head_out" else None
            index = _index(batch, positions)
            mask = None if batch is None else batch.attention_mask
            if index is not None and batch is None:
                # No batch: positions are resolved per call, against the activation's length.
                fn = _relative_to_seq(index, item, head)
            else:
                fn = item._hook(index, head, text)
                if batch is not None:
                    fn = _checked_shape(fn, batch)
            if is_attention_map(name if site is None else site):
                causal = getattr(model.cfg, "attention_dir", "causal") == "causal"
                keys = key_mask if key_mask is not None else mask
                reads = isinstance(item, (Capture, Gradient))  # they write nothing to restore
                fn = _query_major(_keys_fit(fn, item), None if reads else (keys, causal))
            fn = _named(fn, name if site is None else site.hook_name)
            if kind == "head_out":
                assert site is not None and site.head is not None
                reader, fn = _head_out(model, site.layer, site.head, fn)
                fwd.append(reader)
            if kind == "resid_mid" and (
                not isinstance(item, Capture) or (site is not None and site.layer in mlp_in_layers)
            ):
                assert site is not None
                mlp_input = hooks.get(f"blocks.{site.layer}.ln2.hook_in")
                if mlp_input is not None and mlp_input is hooks[name]:
                    reader, fn = _resid_mid(site.layer, fn)
                    fwd.append(reader)
                    # This item only: the site's next interventions are placed on their own.
                    after.append((f"blocks.{site.layer}.hook_attn_out", fn))
                    continue
            fwd.append((name, fn))
    fwd += after
    if batch is not None and fwd:
        if "embed.hook_in" in hooks:  # a bridge's embedding sees the token ids themselves
            fwd.insert(0, ("embed.hook_in", _same_ids(batch)))
        elif "hook_embed" in hooks:
            fwd.insert(0, ("hook_embed", _same_tokens(model, batch)))
    return fwd


class _NamedHook:
    """A hook seen under the name the user gave: a bridge's HookPoints carry their own names
    (``blocks.1.hook_out`` for ``hook_resid_post``), which messages would otherwise show."""

    def __init__(self, hook: Any, name: str) -> None:
        self._hook, self.name = hook, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._hook, attr)


def _named(fn: Callable[..., Tensor | None], name: str) -> Callable[..., Tensor | None]:
    def named(activation: Tensor, hook: Any) -> Tensor | None:
        return fn(activation, _NamedHook(hook, name))

    return named


def _query_major(
    fn: Callable[..., Tensor | None], masked: tuple[Tensor | None, bool] | None
) -> Callable[..., Tensor | None]:
    """Run ``fn`` on an attention map seen as ``[batch, query pos, head, key pos]``, so that
    positions select query rows like every other site's, and give the result back in the hook's
    ``[batch, head, query pos, key pos]``.

    With ``masked = (mask, causal)``, entries the model masked keep the model's value whatever
    ``fn`` wrote there, in place or not: future keys (``causal``), padded keys and padded queries
    of ``mask [batch, seq]``, and scores already at the mask value (-inf, or the dtype's lowest
    on a bridge; a sliding window). Zero-ablating scores then means uniform attention over the
    keys a token may see, never attention to the future or to padding, whose amount would depend
    on the batch a prompt is run in. Readers (Capture, Gradient) pass ``None``: a Gradient's
    derivative at a masked entry is the model's own.
    """

    def transposed(activation: Tensor, hook: Any) -> Tensor | None:
        if masked is None:
            out = fn(activation.transpose(1, 2), hook)
            return None if out is None else out.transpose(1, 2)
        # Before fn: an edit in place (a TransformerLens idiom) would overwrite both.
        hidden, kept = _hidden(activation, *masked), activation.clone()
        out = fn(activation.transpose(1, 2), hook)
        if out is None:
            return (
                None
                if bool(torch.equal(activation, kept))
                else torch.where(hidden, kept, activation)
            )
        return torch.where(hidden, kept, out.transpose(1, 2))

    return transposed


def _keys_fit(fn: Callable[..., Tensor | None], item: Intervention) -> Callable[..., Tensor | None]:
    """Check ``item``'s vector against the keys of the pass (an attention map's width is known
    only then: it is the length of the chunk forwarded). A vector of width 1 (one value for
    every key) broadcasts, as it always did here."""

    def checked(activation: Tensor, hook: Any) -> Tensor | None:
        n_key = int(activation.shape[-1])
        try:
            item.check_width(n_key)
        except ValueError as error:
            with contextlib.suppress(ValueError):
                item.check_width(1)
                return fn(activation, hook)
            raise ValueError(
                f"{error} At {hook.name}, an attention map, the last axis holds the {n_key} keys "
                "of this forward pass in its padded layout (mp.run with batch_size trims each "
                "chunk's padding: batch_size=None keeps the whole batch's)."
            ) from None
        return fn(activation, hook)

    return checked


def _hidden(activation: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
    """Which entries of ``activation [batch, head, query, key]`` the model masked (bool,
    broadcastable to it)."""
    n_query, n_key = activation.shape[-2:]
    device = activation.device
    hidden = activation <= torch.finfo(activation.dtype).min  # scores at the mask value
    if causal:  # query i is key i + n_key - n_query (a cached generation step has one query)
        query = torch.arange(n_query, device=device)[:, None] + (n_key - n_query)
        hidden = hidden | (torch.arange(n_key, device=device)[None, :] > query)
    if mask is not None:
        if tuple(mask.shape) != (activation.shape[0], n_key):
            raise ValueError(
                f"The key mask has shape {tuple(mask.shape)}, the attention map "
                f"{activation.shape[0]} rows of {n_key} keys: pass key_mask=[rows, keys] for "
                "the keys the pass attends to (the cached ones included)."
            )
        real = mask.to(device).bool()
        hidden = hidden | ~real[:, None, None, :] | ~real[:, None, -n_query:, None]
    return hidden


def _through_attn_out(
    read: str,
    view: Callable[[Tensor, Tensor], Tensor],
    fn: Callable[..., Tensor | None],
    solve: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[tuple[str, Callable[..., None]], Callable[..., Tensor | None]]:
    """Edit a quantity made from the attention output: ``(the hook that keeps what hook ``read``
    saw, the callback for hook_attn_out)``. At ``hook_attn_out``, ``fn`` gets ``view(attn_out,
    seen)``, and what it changed there is added to the attention output, so the edit reaches
    everything downstream of it; with ``solve``, the attention output where ``fn`` changed the
    view is ``solve(new, seen)`` instead (exact where adding the change would round)."""
    seen: dict[str, Tensor] = {}

    def record(activation: Tensor, hook: Any) -> None:
        seen["value"] = activation

    def edit(attn_out: Tensor, hook: Any) -> Tensor | None:
        value = seen.pop("value", None)
        if value is None:
            raise RuntimeError(f"{hook.name}: {read} did not fire before it.")
        old = view(attn_out, value)
        # A copy: an edit in place must not move the value the change is measured from.
        new = fn(old.clone(), hook)
        if new is None:
            return None
        added = attn_out + (new - old)  # untouched entries: attn_out bit for bit
        if solve is None:
            return added
        # Edited entries are solved for exactly; both branches keep new's gradient path.
        return torch.where(new != old, solve(new, value), added)

    return (read, record), edit


def _head_out(
    model: Any, layer: int, head: int, fn: Callable[..., Tensor | None]
) -> tuple[tuple[str, Callable[..., None]], Callable[..., Tensor | None]]:
    """Callbacks for a ``head_out`` site: ``hook_z`` keeps the heads' ``z``; ``fn`` edits the
    head's write ``z[..., head, :] @ W_O[head]`` (see :func:`_through_attn_out`)."""

    attn = model.blocks[layer].attn

    def own(attn_out: Tensor, z: Tensor) -> Tensor:
        check_heads_sum(attn, z, attn_out, f"head_out at layer {layer}")
        return z[..., head, :] @ attn.W_O.to(z.device, z.dtype)[head]  # [d_head, d_model] slice

    return _through_attn_out(f"blocks.{layer}.attn.hook_z", own, fn)


def check_heads_sum(
    attn: Any,
    z: Tensor,
    attn_out: Tensor,
    where: str,
    *,
    dtype: torch.dtype | None = None,
    fix: str = "use the head's z (Site('head', ...), or 'head') instead",
) -> None:
    """Refuse editing one head's write (``head_out``) where the attention output is not the sum of
    the heads' ``z @ W_O`` (plus ``b_O``): a norm or scale between them (Gemma 2) would make the
    edit wrong. ``attn`` is a block's attention (``W_O [head, d_head, d_model]``), ``z [batch,
    pos, head, d_head]`` and ``attn_out [batch, pos, d_model]`` of one forward pass; ``where``
    opens the message (``"head_out at layer 3"``); ``dtype`` the model's (default ``z``'s), whose
    rounding the tolerance allows for (bfloat16 rounds ``attn_out`` by more than the 1e-3 kept
    for wider types); ``fix`` what the message advises.

    Example:
        >>> import torch, mechprobe as mp
        >>> attn = mp.tiny_model().blocks[0].attn
        >>> z = torch.randn(1, 2, 4, 16)
        >>> check_heads_sum(attn, z, torch.einsum("bshd,hdm->bsm", z, attn.W_O.detach()), "here")
    """
    total = torch.einsum("bshd,hdm->bsm", z.detach(), attn.W_O.detach().to(z.device, z.dtype))
    bias = getattr(attn, "b_O", None)
    if bias is not None:
        total = total + bias.detach().to(total.device, total.dtype)
    reference = attn_out.detach()
    kind = dtype if dtype is not None else z.dtype
    eps = torch.finfo(kind).eps if kind.is_floating_point else 0.0
    tolerance = max(1e-3, 4 * eps) * (float(reference.abs().max()) + 1.0)
    gap = float((total - reference).abs().max())
    if gap > tolerance:
        raise ValueError(
            f"{where}: this model's attention output is not the sum of its heads' "
            f"z @ W_O (off by {gap:.3g}, beyond the {tolerance:.3g} its {kind} rounding allows: "
            f"a norm or scale sits between them), so one head's write is not defined alone; "
            f"{fix}."
        )


def _resid_mid(
    layer: int, fn: Callable[..., Tensor | None]
) -> tuple[tuple[str, Callable[..., None]], Callable[..., Tensor | None]]:
    """Callbacks for a write (or gradient) at ``resid_mid`` where that hook is the MLP's input.

    On a TransformerBridge ``hook_resid_mid`` is ``ln2.hook_in``: a value written there feeds the
    MLP, while the residual add still takes the original sum, so the write would reach only the
    MLP branch. ``resid_mid = resid_pre + attn_out``, and ``attn_out`` feeds both, so ``fn`` edits
    that sum through the attention output (see :func:`_through_attn_out`). A gradient taken there
    is the residual stream's (``attn_out`` reaches everything downstream only through that sum).
    A written value ``v`` sets ``attn_out = v - resid_pre`` (``resid_pre + attn_out`` then is
    ``v``: a zero is exactly zero, where ``attn_out + (v - resid_mid)`` left a rounding remainder
    that the next norm blew up to unit scale).
    """
    return _through_attn_out(
        f"blocks.{layer}.hook_resid_pre",
        lambda attn_out, pre: pre + attn_out,
        fn,
        solve=lambda new, pre: new - pre,
    )


def _checked_shape(fn: Callable[..., Tensor | None], batch: Batch) -> Callable[..., Tensor | None]:
    """Refuse a forward pass whose rows or length are not those of ``batch``."""

    def checked(activation: Tensor, hook: Any) -> Tensor | None:
        if tuple(activation.shape[:2]) != tuple(batch.tokens.shape):
            raise ValueError(
                _WRONG_BATCH.format(got=tuple(activation.shape[:2]), want=tuple(batch.tokens.shape))
            )
        return fn(activation, hook)

    return checked


def _same_tokens(model: Any, batch: Batch) -> Callable[..., None]:
    """A check at the embedding: the tokens forwarded are those of ``batch`` (positions resolved
    against another batch's padding would read the wrong tokens silently)."""

    def check(activation: Tensor, hook: Any) -> None:
        if tuple(activation.shape[:2]) != tuple(batch.tokens.shape):
            raise ValueError(
                _WRONG_BATCH.format(got=tuple(activation.shape[:2]), want=tuple(batch.tokens.shape))
            )
        weight = model.W_E
        tokens = batch.tokens.to(weight.device)
        embed = getattr(model, "embed", None)
        # The model's own embedding of the batch where it has one (a HookedTransformer's Embed
        # applies Bloom's embedding norm, which W_E's rows alone do not), else W_E's rows.
        with torch.no_grad():
            expected = embed(tokens) if isinstance(embed, torch.nn.Module) else weight[tokens]
        expected = expected.to(activation.device, activation.dtype)
        real = batch.attention_mask.to(activation.device).bool()
        # Cosine, not equality: some architectures scale the embedding before this hook. A token
        # whose embedding row is zero (a padding token's, often also end-of-sequence) has no
        # direction: there the activation must be zero too.
        zero = expected.abs().amax(-1) == 0
        live, dead = real & ~zero, real & zero
        cos = torch.nn.functional.cosine_similarity(activation[live], expected[live], dim=-1)
        moved = bool(dead.any()) and bool(activation[dead].abs().amax() > 0)
        if bool((cos < 0.99).any()) or moved:
            raise ValueError(_NOT_THE_BATCH)

    return check


#: Where intervene() checks the batch: they do not run when a pass starts past the embedding.
_CHECKS = ("embed.hook_in", "hook_embed")


def _marked(fn: Callable[..., Any], name: str, fired: set[str]) -> Callable[..., Any]:
    """``fn``, noting in ``fired`` that hook ``name`` ran."""

    def call(activation: Tensor, hook: Any) -> Any:
        fired.add(name)
        return fn(activation, hook)

    return call


def _same_ids(batch: Batch) -> Callable[..., None]:
    """The check of :func:`_same_tokens` where the model shows its token ids (a bridge's
    ``embed.hook_in``): exact for every architecture, a norm before ``hook_embed`` (Bloom's)
    included, where comparing embeddings refused the right batch or took a near one."""

    def check(ids: Tensor, hook: Any) -> None:
        if tuple(ids.shape[:2]) != tuple(batch.tokens.shape):
            raise ValueError(
                _WRONG_BATCH.format(got=tuple(ids.shape[:2]), want=tuple(batch.tokens.shape))
            )
        real = batch.attention_mask.to(ids.device).bool()
        if not torch.equal(ids[real], batch.tokens.to(ids.device)[real]):
            raise ValueError(_NOT_THE_BATCH)

    return check


_NOT_THE_BATCH = (
    "The tokens forwarded are not those of the batch= given to intervene(): pass the batch you "
    "forward (model(batch.tokens, attention_mask=batch.attention_mask)), or use mp.run()."
)
_WRONG_BATCH = (
    "The forward pass has {got} rows x tokens but intervene(batch=...) was given a batch of "
    "{want}: forward that batch (model(batch.tokens, attention_mask=batch.attention_mask)), or "
    "use mp.run()."
)


def _relative_to_seq(
    index: Tensor, item: Intervention, head: int | None
) -> Callable[..., Tensor | None]:
    """``item``'s hook with ``index`` resolved against each activation's own length (no batch
    given, so no mask and no text mask either: one unpadded row)."""

    def wrapped(activation: Tensor, hook: Any) -> Tensor | None:
        if activation.shape[0] > 1:
            raise ValueError(
                f"{hook.name}: positions {index[0].tolist()} on {activation.shape[0]} rows forwarded "
                "without batch=: padded rows would be read at pad tokens. Pass "
                "intervene(..., batch=mp.tokenize(model, prompts)) and forward that batch, or use "
                "mp.run(), which does both."
            )
        seq = activation.shape[1]
        idx = torch.where(index < 0, index + seq, index).expand(activation.shape[0], -1)
        if bool(((idx < 0) | (idx >= seq)).any()):
            raise ValueError(f"Positions {index.tolist()} fall outside a sequence of {seq} tokens.")
        return item._hook(idx, head)(activation, hook)

    return wrapped


@contextlib.contextmanager
def intervene(
    model: Any,
    interventions: InterventionSpec,
    *,
    batch: Batch | None = None,
    key_mask: Tensor | None = None,
) -> Iterator[Any]:
    """Apply interventions for the duration of a ``with`` block; every hook is removed after.

    All sites and vector widths are checked before the block starts. The hooks go through the
    model's own ``hooks()`` context, and are removed in ``finally`` even when the forward pass or an
    intervention raises, so the model's outputs afterwards are exactly those before.

    Args:
        model: A TransformerLens model (``TransformerBridge`` or ``HookedTransformer``).
        interventions: ``{site: intervention or [interventions]}``; sites are :class:`Site` or
            hook-name strings. At one site, interventions apply in the order given. A plain
            TransformerLens hook function ``fn(activation, hook)`` counts as an intervention: it
            receives what the site selects (all of it for a hook name) and returns the new
            values (the same shape), or None after editing them in place (as ``act[:] = 0``
            does, on every site and model class); where ``Ablate("mean")`` measures its means
            first, it also runs in that pass. At an attention map's hook name it gets
            TransformerLens's ``[batch, head, query, key]``, and entries the model masks
            (future and padded keys) keep the model's value whatever it writes. The hook name
            ``blocks.L.hook_resid_mid`` means ``resid_mid`` (the residual stream after
            attention) on every model class, though TransformerLens 4's bridge fires that name
            at the MLP's input, where ``run_with_hooks`` edits the MLP alone:
            ``Site("mlp_in", L)`` is that edit here.
        batch: The batch that will be run; needed to find each row's last real token when the
            prompts are padded. Without it, negative positions count from the sequence's end.
        key_mask: ``[batch, keys]`` which keys are real tokens, for a pass that reads earlier
            keys from a key/value cache (one new token per row): an edit of an attention map
            keeps the padded keys masked there too (default: the batch's attention mask).

    Yields:
        The model, hooked.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> o = torch.randn(64)
        >>> with mp.intervene(model, {mp.Site("mlp_out", layer=1): mp.Add(o, scale=2.0)}):
        ...     logits = model(model.to_tokens("Hi"))
    """
    spec: InterventionSpec = intervention_spec(interventions)
    pooled = [
        key
        for key, value in spec.items()
        for item in (value if isinstance(value, (list, tuple)) else [value])
        if is_pooled(item)
    ]
    for key in pooled:  # an attention map's mean is refused for its own reason first
        refuse_map_mean(key, Ablate("mean"))
    if pooled and batch is None:
        # Without the batch a mean would average padding and BOS in (2.6 apart from run's on a
        # tiny model), silently.
        raise ValueError(
            f"{len(pooled)} mean-ablation(s) without mean= ({', '.join(map(str, pooled))}): "
            "pass batch= (the batch you will run), so that each mean is measured over the "
            "text's tokens (padding and BOS left out) as mp.run does, or give each Ablate its "
            "mean=."
        )
    if len(pooled) > 1 and batch is not None:
        # Each hook would average what it sees, after the mean-ablations upstream of it, where
        # run() measures every mean first with none of them applied: the same spec and batch
        # gave other numbers (a logit difference 0.23 apart on a tiny model). Measure them here
        # as run() does.
        from mechprobe.core._runner import batch_means  # _runner builds on this module

        spec = batch_means(model, batch, spec)
    fired: set[str] = set()
    points = model.hook_dict  # read once: TransformerLens 3.9's bridge rebuilds it on every read
    fwd = [
        (name, _marked(fn, name, fired))
        for name, fn in _hooks_for(model, spec, batch, key_mask, points)
    ]
    # model.hooks() adds the callbacks and removes exactly those it added in its own finally,
    # also when adding one of them fails halfway; hooks the user attached before stay untouched.
    names = [name for name, _ in fwd]
    # The hook points' own names too: a gated point named by an alias must switch its flag on,
    # as TransformerLens's filter path skips a gated-off point with a warning only.
    own = [getattr(points[name], "name", None) or name for name in names]
    with (
        _gated_hooks_fire(model, [*names, *own]),
        model.hooks(fwd_hooks=_one_hook_per_point(points, fwd)),
    ):
        try:
            yield model
        except StopForward:  # mp.run's own reader ends its passes at the last block
            _warn_unrun(names, fired)
            raise
    _warn_unrun(names, fired)


def _one_hook_per_point(
    points: Mapping[str, Any], fwd: Sequence[tuple[str, Callable[..., Tensor | None]]]
) -> list[tuple[Callable[[str], bool], Callable[..., Tensor | None]]]:
    """``fwd``'s callbacks as one ``(filter, hook)`` pair for ``model.hooks()``: a hook per hook
    point that runs that point's callbacks in the order given, each on what the one before it
    returned (as TransformerLens chains hooks on one point).

    Why not one ``(name, fn)`` pair each: TransformerLens 3.9's bridge rebuilds its
    ``hook_dict`` (8 ms on SmolLM2, 2-core EPYC) for every named hook it adds, so a per-head
    logit attribution (330 hooks) took 3.1 s, 0.25 s with a filter, which reads it once,
    on every model class. Two names of one point (an alias and its hook) share its one hook.
    ``points`` is the model's ``hook_dict``.
    """
    by_point: dict[int, list[Callable[..., Tensor | None]]] = {}
    for name, fn in fwd:
        by_point.setdefault(id(points[name]), []).append(fn)
    wanted = {name for name, _ in fwd}
    taken: set[int] = set()

    def wants(name: str) -> bool:
        # One hook per point even where a model's hooks() does not skip a point's other names
        # (HookedRootModule does not; the bridges do).
        if name not in wanted or id(points[name]) in taken:
            return False
        taken.add(id(points[name]))
        return True

    def run_all(activation: Tensor, hook: Any) -> Tensor | None:
        replaced = None
        for fn in by_point[id(hook)]:
            out = fn(activation, hook)
            if out is not None:
                activation = replaced = out
        return replaced

    return [(wants, run_all)] if fwd else []


def _warn_unrun(names: Sequence[str], fired: set[str]) -> None:
    """A hook the model lists but never runs (Bloom's bridge never fires ``hook_mlp_in``) made an
    edit there do nothing, silently. Said where a forward ran (something fired) and it did not;
    a pass stopped early (``stop_at_layer``) is the caller's choice, hence a warning."""
    unrun = sorted({name for name in names if name not in fired} - set(_CHECKS))
    if fired and unrun:
        warn(
            f"{', '.join(unrun)} never ran in the forward pass: this model lists the hook but "
            "does not run it (or the pass stopped before it), so the interventions there did "
            "nothing. Use another site.",
            UserWarning,
        )


# Hooks TransformerLens (the bridge and HookedTransformer) fires only with a cfg switch on, as
# they cost a copy or a per-head product: (name pattern, cfg flag, the model's setter).
_GATED = (
    (re.compile(r"blocks\.\d+\.hook_mlp_in$"), "use_hook_mlp_in", "set_use_hook_mlp_in"),
    # A bridge also lists the last two under the attention ("blocks.L.attn.hook_q_input").
    (re.compile(r"blocks\.\d+\.(?:attn\.)?hook_attn_in$"), "use_attn_in", "set_use_attn_in"),
    (
        re.compile(r"blocks\.\d+\.(?:attn\.)?hook_[qkv]_input$"),
        "use_split_qkv_input",
        "set_use_split_qkv_input",
    ),
    (re.compile(r"blocks\.\d+\.attn\.hook_result$"), "use_attn_result", "set_use_attn_result"),
)


@contextlib.contextmanager
def _gated_hooks_fire(model: Any, names: Sequence[str]) -> Iterator[None]:
    """Switch on the cfg flags of gated hooks (``hook_mlp_in``, ``hook_attn_in``, ``hook_q_input``
    .., ``attn.hook_result``) while hooks there are attached, then back off.

    Off, a hook there never runs: TransformerLens 3.x attached it and the intervention silently
    did nothing (the bridge refuses to attach it). A switch changes no output, and each one
    turned on here is turned off in ``finally``.
    """
    switched: list[Callable[[bool], None]] = []
    try:
        for pattern, flag, setter in _GATED:
            if not any(pattern.match(name) for name in names) or getattr(model.cfg, flag, False):
                continue
            switch = getattr(model, setter, None)
            if switch is None:
                raise ValueError(
                    f"{type(model).__name__} has no {setter}(), so its {flag} hooks never fire: "
                    "hook a site it always runs (mlp_in: use resid_mid, or resid_pre where "
                    "attention and MLP run in parallel)."
                )
            try:
                switch(True)
            except (AssertionError, ValueError) as err:  # e.g. attn_in under grouped-query heads
                raise ValueError(
                    f"TransformerLens refuses {setter}(True) on this model, so its {flag} hooks "
                    f"cannot fire: {err}"
                ) from err
            switched.append(switch)
        yield
    finally:
        for switch in reversed(switched):
            switch(False)
