"""Run prompts with interventions and captures in one call: :func:`run` -> :class:`RunResult`."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core._adapter import model_adapter
from mechprobe.core._batching import (
    Batch,
    PaddingSide,
    PositionSpec,
    bos_id,
    check_token_ids,
    tokenize,
)
from mechprobe.core._eval_mode import evaluates
from mechprobe.core._hooks import (
    Ablate,
    Add,
    Capture,
    Gather,
    Gradient,
    Intervention,
    InterventionSpec,
    Replace,
    StopForward,
    intervene,
    intervention_spec,
    is_pooled,
    refuse_map_mean,
)
from mechprobe.core._progress import progress_bar
from mechprobe.core._readout import readout
from mechprobe.core._sites import (
    _KINDS,
    Site,
    SiteLike,
    expand_sites,
    is_attention_map,
    resolve_in,
)

__all__ = ["RunResult", "batch_means", "check_spec_positions", "forward", "refuse_gradient", "run"]


@dataclass(frozen=True, eq=False)
class RunResult:
    """Logits and captured activations of one :func:`run`.

    Attributes:
        logits: ``[batch, k, vocab]`` float32 at the requested positions (``k = seq`` for
            ``"all"``, in the batch's padded layout, zeros at padding), whatever the model's dtype.
        captures: ``{site: tensor}`` for each requested capture, ``[batch, k or seq, ...]`` (zeros
            at padding where every position is kept). An attention map is query-major and keeps
            every key: ``[batch, k or seq, seq]`` for a ``pattern`` Site, ``[batch, k or seq,
            head, seq]`` for a layer's ``hook_pattern`` or ``hook_attn_scores`` named by hook,
            zeros at padded keys too; scores hold -inf at future keys on every model class.
        batch: The tokenised prompts (padding, masks, last-real-token indices).
        logit_positions: The ``logit_positions`` the logits were kept at.
        bos_id: The tokenizer's BOS token id (None: it has none), which :meth:`mean` leaves out
            where a row begins with it.

    Example:
        >>> import mechprobe as mp
        >>> out = mp.run(mp.tiny_model(), ["Hi", "Hello there"], capture=["blocks.0.hook_resid_post"])
        >>> out.logits.shape[:2], out["blocks.0.hook_resid_post"].shape[-1]
        (torch.Size([2, 12]), 64)
    """

    logits: Float[Tensor, "batch k vocab"]
    captures: dict[SiteLike, Tensor] = field(default_factory=dict)
    batch: Batch | None = None
    logit_positions: PositionSpec = "all"
    bos_id: int | None = None

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.captures.items())
        return f"RunResult(logits {tuple(self.logits.shape)}, captures {{{shapes}}})"

    def loss(self, *, per_token: bool = False) -> Tensor:
        """Next-token cross-entropy (nats) over each prompt's real tokens: position ``i``
        predicting token ``i + 1``, so BOS is read but never predicted and padding never counts
        (the logits there hold zeros, which an unmasked mean would average in). Per prompt, the
        number TransformerLens's ``model(prompt, return_type="loss")`` gives for it alone, here
        under the run's interventions.

        Args:
            per_token: Return ``[batch, seq - 1]`` losses (NaN where no real token is predicted)
                instead of each prompt's mean ``[batch]`` (NaN for a prompt of one token).

        Returns:
            ``[batch]`` float32 mean losses, or with ``per_token`` the ``[batch, seq - 1]`` losses.

        Raises:
            ValueError: The run kept logits at some positions only: run with
                ``logit_positions="all"`` (the default).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> out = mp.run(model, ["Hi there", "Hello"], {mp.Site("mlp_out", 0): mp.Ablate()})
            >>> tuple(out.loss().shape), tuple(out.loss(per_token=True).shape)
            ((2,), (2, 8))
        """
        if self.batch is None or not (
            isinstance(self.logit_positions, str) and self.logit_positions == "all"
        ):
            raise ValueError(
                f"loss() needs the logits at every position; this run kept logit_positions="
                f"{self.logit_positions!r}: run with logit_positions='all' (the default)."
            )
        real = self.batch.attention_mask.bool().to(self.logits.device)
        predicted = real[:, :-1] & real[:, 1:]  # a real token that follows a real token
        targets = self.batch.tokens[:, 1:].to(self.logits.device)
        logprobs = self.logits[:, :-1].float().log_softmax(-1)
        nll = -logprobs.gather(-1, targets[..., None]).squeeze(-1)
        nll = nll.masked_fill(~predicted, float("nan"))
        if per_token:
            return nll
        # Padding is left out by the mask, not by nansum: NaN logits (a float16 overflow, a
        # NaN edit) gave a perfect 0.0 loss. 0 / 0: NaN for a one-token prompt.
        return torch.where(predicted, nll, 0.0).sum(1) / predicted.sum(1)

    def mean(self, site: SiteLike, *, per_prompt: bool = False, bos: bool = False) -> Tensor:
        """A capture's mean over the real tokens of the text it holds: padding, where the capture
        keeps zeros, never counts (a plain ``.mean`` over a padded batch averages them in), and
        neither does a BOS token the model put first (``collect``'s ``"all"`` leaves it out too).
        BOS is the same in every prompt but, on models whose attention sinks into it, far longer
        than the text's states (SmolLM2 at resid_post 15: norm 25,054 against 168): counted, it
        would not cancel in the usual steering vector ``out_a.mean(site) - out_b.mean(site)``,
        which sets of different lengths would point mostly along it. A Site with chosen
        positions counts every position chosen.

        Args:
            site: A captured site.
            per_prompt: ``[batch, ...]``, each prompt's own mean, instead of the mean over every
                real token of every prompt (each token weighs the same). A prompt of BOS alone
                has no mean (NaN).
            bos: Count a row's leading BOS token too.

        Returns:
            The mean in the capture's dtype: its trailing shape (``[d_model]`` for a residual site),
            or ``[batch, ...]`` with ``per_prompt``.

        Raises:
            KeyError: The site was not captured.
            ValueError: An attention map (a mean over its query rows mixes keys).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> out = mp.run(model, ["Hi there", "Hello"], capture=[mp.Site("resid_post", 0)])
            >>> tuple(out.mean(mp.Site("resid_post", 0)).shape)
            (64,)
        """
        value = self[site]
        if is_attention_map(site):
            raise ValueError(
                f"{site} is an attention map: a mean over its query rows mixes keys of other "
                "positions; average the rows you mean from the capture itself."
            )
        if self.batch is None or _positions_of(site) is not None:  # chosen positions: all real
            real = torch.ones(value.shape[:2], dtype=torch.bool, device=value.device)
        else:
            real = self.batch.text_mask(None if bos else self.bos_id).bool().to(value.device)
        weights = real.to(torch.float64).reshape(*real.shape, *[1] * (value.ndim - 2))
        totals = (value.double() * weights).sum(1)
        if per_prompt:
            return (totals / weights.sum(1)).to(value.dtype)
        if float(weights.sum()) == 0:  # the mean of nothing was a silent all-NaN vector
            raise ValueError(
                f"{site} holds no token of the text to average (padding and a leading BOS are "
                "left out): pass prompts with text, or bos=True to count BOS."
            )
        return (totals.sum(0) / weights.sum()).to(value.dtype)

    def __getitem__(self, site: SiteLike) -> Tensor:
        if site in self.captures:
            return self.captures[site]
        for key, value in self.captures.items():
            if _one_place(key, site):
                return value
        if isinstance(site, str) and site in _KINDS:  # capture="resid_post" took every layer's
            raise KeyError(
                f"{site!r} is a kind, one site per layer: index by a Site (out[Site({site!r}, "
                f"layer)]) or a hook name; captured: {[str(k) for k in self.captures]}."
            )
        raise KeyError(f"{site!r} was not captured; captured: {list(self.captures)}.")


def forward(model: Any, batch: Batch, **kwargs: Any) -> Tensor:
    """One padded forward pass with the batch's attention mask (logits ``[batch, seq, vocab]``),
    the token ids sent to the model's device."""
    device = model.W_E.device
    return model(batch.tokens.to(device), attention_mask=batch.attention_mask.to(device), **kwargs)


def _place(
    full: Tensor | None,
    part: Tensor,
    rows: slice,
    batch: Batch,
    spans_seq: bool,
    keys: bool = False,
    own: bool = False,
) -> Tensor:
    """Write a chunk's output into the full batch's layout (chunks trim shared padding); with
    ``keys``, the last axis runs over key positions (an attention map) and is placed too.

    ``own``: ``part`` is this run's own tensor (logits), returned as the result when it already
    is the whole batch's layout (one chunk, no trimmed padding): the logits ``[batch, seq,
    vocab]`` are the largest thing a run holds, and a copy doubled its peak (review 21e).
    """
    seq = batch.tokens.shape[1]
    whole = part.shape[0] == len(batch) and (not spans_seq or part.shape[1] == seq)
    if full is None and own and whole and not keys:
        return part
    if full is None:
        shape = [len(batch), seq if spans_seq else part.shape[1], *part.shape[2:]]
        if keys:
            shape[-1] = seq
        full = part.new_zeros(shape)

    def cols(width: int) -> slice:
        return slice(0, width) if batch.padding_side == "right" else slice(seq - width, seq)

    query = cols(part.shape[1]) if spans_seq else slice(None)
    if keys:
        full[rows, query, ..., cols(part.shape[-1])] = part
    else:
        full[rows, query] = part
    return full


def _capture_sites(model: Any, capture: SiteLike | Sequence[SiteLike]) -> list[SiteLike]:
    """``capture=`` as a list: a kind stands for every layer's Site; one Site or hook name is a
    list of one (a bare string was read as its letters: "Unknown hook name 'r'")."""
    items = [capture] if isinstance(capture, (str, Site)) else list(capture)
    listed: list[SiteLike] = []
    for item in items:
        kind = isinstance(item, str) and item in _KINDS
        for site in expand_sites(model, item) if kind else [item]:
            # A kind and one of its hook names name one place: captured once, as given first.
            if not any(_one_place(seen, site) for seen in listed):
                listed.append(site)
    return listed


@evaluates
def run(
    model: Any,
    prompts: Sequence[str] | str | Batch,
    interventions: InterventionSpec | None = None,
    *,
    capture: SiteLike | Sequence[SiteLike] = (),
    logit_positions: PositionSpec = "all",
    batch_size: int | None = 32,
    padding_side: PaddingSide = "right",
    progress: bool = True,
) -> RunResult:
    """Run prompts through ``model`` with interventions, returning logits and captured activations.

    Prompts are tokenised and padded once, then run in chunks of ``batch_size`` rows under
    ``torch.no_grad``. Captures at a site see the activation after that site's interventions.
    Logits come from the one readout (:func:`mechprobe.core.readout`) of the last block's output
    at the requested positions only: the forward pass stops after the last block, so asking for
    the last token's logits skips the unembedding of every other position (about a fifth of
    SmolLM2's forward pass). Interventions or captures after the last block (``ln_final.*``,
    ``unembed.*``) run the model's whole forward pass instead.

    Args:
        model: A TransformerLens model.
        prompts: Strings, or a :class:`Batch` from :func:`mechprobe.tokenize`.
        interventions: ``{site: intervention(s)}`` as for :func:`mechprobe.intervene`. An edit
            of an attention map keeps what the model masked (future and padded keys), so no
            prompt's result depends on its batch.
        capture: Sites to capture: Sites, hook names, or kinds (``"resid_post"``: every
            layer's); a Site's ``positions`` selects positions (all by default).
        logit_positions: Positions whose logits to keep (``-1``: last real token); ``"all"`` keeps
            every position, which costs ``batch * seq * vocab`` floats.
        batch_size: Rows per forward pass (None: all at once).
        padding_side: Padding of the batch built from strings.
        progress: Show a progress bar over chunks (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        A :class:`RunResult`; at padded positions its logits and captures hold zeros.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> out = mp.run(model, ["Hi", "Hello"], capture=[mp.Site("resid_post", 0)], logit_positions=-1)
        >>> tuple(out.logits.shape), tuple(out[mp.Site("resid_post", 0)].shape)
        ((2, 1, 259), (2, 6, 64))
    """
    if isinstance(prompts, Batch):
        check_token_ids(model, prompts.tokens)  # ids given by hand, before the embedding
    batch = (
        prompts
        if isinstance(prompts, Batch)
        else tokenize(model, prompts, padding_side=padding_side)
    )
    spec = intervention_spec(interventions)
    capture = _capture_sites(model, capture)
    hooks = model.hook_dict  # read once: TransformerLens 3.9's bridge rebuilds it on every read
    names = [resolve_in(model, site, hooks)[0] for site in [*spec, *capture]]  # validate first
    for key, value in spec.items():
        for item in _items(value):
            if not isinstance(item, Intervention):  # before anything reads its positions
                raise TypeError(
                    f"{type(item).__name__} at {key} is not an intervention: use Capture, "
                    "Replace, Add, Ablate or Project, or a hook function fn(activation, hook)."
                )
            refuse_gradient(key, item, "run()")
            refuse_map_mean(key, item)
    check_spec_positions(spec, batch)  # every prompt's positions, before the first chunk runs
    if _pooled_means(spec):
        spec = dict(batch_means(model, batch, spec, batch_size))
    early = not _past_the_blocks(names)
    # Hooks the user left on the unembedding act in model(tokens): the readout from the last
    # block would skip them (a patch's clean baseline 2.57 where the model says 3.57, review 21a).
    early = early and not model_adapter(model).attached_hooks(*_AFTER_BLOCKS)
    final_name = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    every = isinstance(logit_positions, str) and logit_positions == "all"
    if not every:
        batch.positions(logit_positions)  # a position outside some row fails before any pass
    logits: Tensor | None = None
    captured: dict[SiteLike, Tensor] = {}
    chunks = list(batch.chunks(batch_size))
    if len(chunks) > 1:
        _check_chunked(spec, len(batch))
    # A cause of NaN logits known for this model and padding (a float64 bridge, left-padded),
    # checked for; other NaN (an edit's, an overflow's) is the model's answer, returned as it is.
    left = batch.padding_side == "left"
    known_nan = model_adapter(model).known_nan_cause(batch.attention_mask, left)
    with torch.no_grad():
        for rows, chunk in progress_bar(chunks, progress=progress, desc="run"):
            caps = {site: Capture() for site in capture}
            merged: dict[SiteLike, list[Intervention]] = {}
            for key, value in spec.items():
                items = _items(value)
                merged.setdefault(key, []).extend(
                    _rows_of(item, rows, len(batch)) for item in items
                )
            for site, cap in caps.items():
                merged.setdefault(site, []).append(cap)
            local = None if every else chunk.positions(logit_positions)
            if early:  # after any write at that same hook
                final = Gather(cols=local, stop=True)
                merged.setdefault(final_name, []).append(final)
                try:
                    with intervene(model, merged, batch=chunk):
                        forward(model, chunk)
                except StopForward:
                    if final.value is None:
                        raise  # a caller's own reader ended the pass earlier: its to handle
                if final.value is None:
                    raise RuntimeError(f"{final_name} was not reached in the forward pass.")
                out = readout(model, final.value)
            else:
                with intervene(model, merged, batch=chunk):
                    out = forward(model, chunk)
                if local is not None:
                    out = out[torch.arange(len(chunk))[:, None], local]
                out = out.float()  # float32, as the readout's (after the index: a smaller copy)
            # The early pass's readout (or an index) made ``out``: run's own tensor, used in place.
            # The model's own forward's logits may be held by a user's hook on the unembedding.
            own = early or local is not None
            if local is None:
                out = _zero_padding(out, chunk, own=own)
            if known_nan and not bool(torch.isfinite(out).all()):
                raise ValueError(f"The logits hold NaN: {known_nan}.")
            logits = _place(logits, out, rows, batch, spans_seq=local is None, own=own)
            for site, cap in caps.items():
                if cap.value is None:  # was a bare AssertionError (Bloom's mlp_in)
                    raise ValueError(
                        f"{site} never ran in the forward pass: this model lists the hook but "
                        "does not run it, so nothing was captured. Capture another site."
                    )
                spans, keys = _positions_of(site) is None, is_attention_map(site)
                kept = _zero_padding(cap.value, chunk) if spans else cap.value
                if keys:  # an attention map: zeros at padded keys too
                    kept = _zero_padding(kept.transpose(1, -1), chunk).transpose(1, -1)
                    # Masked scores are -inf on a HookedTransformer, the dtype's lowest on a
                    # bridge: -inf on both, so that captures compare across model classes.
                    kept = kept.masked_fill(kept <= torch.finfo(kept.dtype).min, -torch.inf)
                captured[site] = _place(captured.get(site), kept, rows, batch, spans, keys)
    assert logits is not None
    return RunResult(logits, captured, batch, logit_positions, bos_id(model))


def _check_chunked(spec: InterventionSpec, n_rows: int) -> None:
    """Refuse what chunks would get wrong silently: a Capture among the interventions keeps the
    last chunk's rows only (and a Replace from it would write those rows into every prompt)."""
    for key, value in spec.items():
        for item in _items(value):
            if isinstance(item, Capture):
                raise ValueError(
                    f"A Capture passed in interventions= (at {key!r}) would keep only the last "
                    f"chunk's rows of {n_rows} prompts: pass the site in capture= instead "
                    "(RunResult.captures holds every row), or batch_size=None."
                )


def _rows_of(item: Intervention, rows: slice, n_rows: int) -> Intervention:
    """``item`` for one chunk: a copy of a Replace, Add or Ablate that cuts a value with one row
    per prompt to the chunk's rows when it runs (it knows the selection's shape there; every
    other value broadcasts over the chunk as it is)."""
    if isinstance(item, (Replace, Add, Ablate)):
        if item._chunk is not None:  # a chunk's copy already (generate's, then run's): rows in it
            outer, n_rows = item._chunk
            rows = slice(outer.start + rows.start, outer.start + rows.stop)
        chunked = copy.copy(item)
        chunked._chunk = (rows, n_rows)
        return chunked
    return item


def _pooled_means(spec: InterventionSpec) -> bool:
    return any(is_pooled(item) for value in spec.values() for item in _items(value))


def refuse_gradient(key: SiteLike, item: Any, where: str) -> None:
    """A Gradient needs a pass with gradients on; ``where`` runs under ``torch.no_grad``."""
    if isinstance(item, Gradient):
        raise ValueError(
            f"A Gradient at {key}: {where} runs without gradients, so it would have none to "
            "keep. Take gradients with `with mp.intervene(model, {site: g}): out = model(tokens)` "
            "and then mp.core.differentiate(metric_of(out), [g]), or use mp.attribution_patch."
        )


def _items(value: Intervention | Sequence[Intervention]) -> list[Intervention]:
    # A list or tuple holds several; anything else is one (checked to be an Intervention).
    return list(value) if isinstance(value, (list, tuple)) else [value]  # type: ignore[list-item]


class _MeanOf(Intervention):
    """Sum and count of an activation's real tokens at the selection of a mean-ablation."""

    def __init__(self, like: Intervention) -> None:
        super().__init__(like.positions)
        self.total: Tensor | None = None
        self.count = 0

    def edit_masked(self, selected: Tensor, real: Tensor | None, hook: Any) -> None:
        flat = selected.reshape(-1, *selected.shape[2:]).double()
        if real is not None:
            flat = flat[real.reshape(-1).to(flat.device)]
        part = flat.sum(0)
        self.total = part if self.total is None else self.total + part
        self.count += int(flat.shape[0])
        return None

    def edit(self, selected: Tensor, hook: Any) -> None:
        return self.edit_masked(selected, None, hook)


def batch_means(
    model: Any, batch: Batch, spec: InterventionSpec, batch_size: int | None = None
) -> dict[SiteLike, list[Intervention]]:
    """``spec`` with every ``Ablate("mean")`` given its mean over all prompts' real tokens.

    One pass measures the means with the other interventions in place (the mean-ablations not
    yet), so the result does not depend on how the prompts are chunked, and :func:`run` and
    :func:`intervene` agree.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> batch = mp.tokenize(model, ["Hi there", "Hello"])
        >>> spec = batch_means(model, batch, {mp.Site("mlp_out", 0): mp.Ablate("mean")})
        >>> tuple(spec[mp.Site("mlp_out", 0)][0].mean.shape)
        (64,)
    """
    measured: dict[int, _MeanOf] = {}
    probe: dict[SiteLike, list[Intervention]] = {}
    for key, value in spec.items():
        for item in _items(value):
            if is_pooled(item):
                measured[id(item)] = _MeanOf(item)
                probe.setdefault(key, []).append(measured[id(item)])
            else:
                probe.setdefault(key, []).append(item)
    final_name = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    # The measuring pass may end at the last block unless a mean is taken after it.
    names = model.hook_dict  # read once (the 3.9 bridge rebuilds it on every read)
    whole = _past_the_blocks(resolve_in(model, key, names)[0] for key in probe)
    with torch.no_grad():
        for rows, chunk in batch.chunks(batch_size):
            # Per-prompt values of the other interventions cut to the chunk, as run() cuts them.
            hooks: dict[SiteLike, list[Intervention]] = {
                key: [_rows_of(item, rows, len(batch)) for item in items]
                for key, items in probe.items()
            }
            if not whole:
                hooks[final_name] = [*probe.get(final_name, []), Gather(stop=True)]
            with contextlib.suppress(StopForward), intervene(model, hooks, batch=chunk):
                forward(model, chunk)
    resolved: dict[SiteLike, list[Intervention]] = {}
    for key, value in spec.items():
        for item in _items(value):
            if is_pooled(item):
                acc = measured[id(item)]
                if acc.total is None or acc.count == 0:
                    raise ValueError(
                        f"Mean-ablation at {key}: no token of the text was selected (padding "
                        "and a leading BOS are left out of means): pass prompts with text, or "
                        "mean= of your own."
                    )
                mean = (acc.total / acc.count).float()
                item = Ablate("mean", mean=mean, positions=item.positions)
            resolved.setdefault(key, []).append(item)
    return resolved


# Hooks that run after the last block: with any of them, run() needs the model's whole forward.
_AFTER_BLOCKS = ("ln_final", "unembed")


def _past_the_blocks(names: Iterable[str]) -> bool:
    """Whether any of the hooks ``names`` runs after the last block (a pass that ends there, as
    the readout's and the means' do, would never reach it)."""
    return any(name.startswith(_AFTER_BLOCKS) for name in names)


def _zero_padding(values: Tensor, chunk: Batch, own: bool = False) -> Tensor:
    """``values [rows, seq, ...]`` with zeros at the chunk's padded positions (in place where
    ``own``: the caller's own tensor, outside autograd, whose copy would double the logits)."""
    mask = chunk.attention_mask.to(values.device).bool()
    if bool(mask.all()):
        return values
    shape = (*mask.shape, *([1] * (values.ndim - 2)))
    if own and not values.requires_grad:
        return values.masked_fill_(~mask.reshape(shape), 0)
    return values.masked_fill(~mask.reshape(shape), 0)


def check_spec_positions(spec: InterventionSpec, batch: Batch) -> None:
    """Resolve every intervention's positions (its own, else its site's) on the whole batch, so
    that a position outside some prompt fails before any pass, naming that prompt.

    Raises:
        ValueError: A position falls outside some prompt's real tokens.
    """
    for key, value in spec.items():
        for item in _items(value):
            positions = item.positions if item.positions is not None else _positions_of(key)
            if positions is not None and not isinstance(positions, str):
                batch.positions(positions)


def _one_place(a: SiteLike, b: SiteLike) -> bool:
    """Whether two sites read one place: equal, or a Site without head or positions and its
    hook name."""
    return a == b or _same_place(a, b) or _same_place(b, a)


def _same_place(name: SiteLike, site: SiteLike) -> bool:
    """Whether hook name ``name`` is what ``site``, a Site without head or positions, reads."""
    return (
        isinstance(name, str)
        and isinstance(site, Site)
        and site.head is None
        and site.positions is None
        and site.hook_name == name
    )


def _positions_of(site: SiteLike) -> Any:
    """A Site's chosen positions; None where it spans the sequence (a hook name, no positions,
    or ``"all"``, which is every position: its capture is padded and masked like a span's)."""
    if isinstance(site, str) or site.positions == "all":
        return None
    return site.positions
