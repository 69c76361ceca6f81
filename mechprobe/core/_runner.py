"""Run prompts with interventions and captures in one call: :func:`run` -> :class:`RunResult`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechprobe.core._batching import Batch, PaddingSide, PositionSpec, tokenize
from mechprobe.core._hooks import Capture, Intervention, InterventionSpec, intervene
from mechprobe.core._sites import SiteLike, resolve_site

__all__ = ["RunResult", "forward", "run"]


@dataclass(frozen=True)
class RunResult:
    """Logits and captured activations of one :func:`run`.

    Attributes:
        logits: ``[batch, k, vocab]`` at the requested positions (``k = seq`` for ``"all"``, in the
            batch's padded layout, zeros at padding).
        captures: ``{site: tensor}`` for each requested capture, ``[batch, k or seq, ...]``.
        batch: The tokenised prompts (padding, masks, last-real-token indices).
    """

    logits: Float[Tensor, "batch k vocab"]
    captures: dict[SiteLike, Tensor] = field(default_factory=dict)
    batch: Batch | None = None

    def __getitem__(self, site: SiteLike) -> Tensor:
        try:
            return self.captures[site]
        except KeyError:
            raise KeyError(f"{site!r} was not captured; captured: {list(self.captures)}.") from None


def forward(model: Any, batch: Batch, **kwargs: Any) -> Tensor:
    """One padded forward pass with the batch's attention mask (logits ``[batch, seq, vocab]``)."""
    return model(batch.tokens, attention_mask=batch.attention_mask, **kwargs)


def _place(full: Tensor | None, part: Tensor, rows: slice, batch: Batch, spans_seq: bool) -> Tensor:
    """Write a chunk's output into the full batch's layout (chunks trim shared padding)."""
    if full is None:
        shape = (len(batch), batch.tokens.shape[1] if spans_seq else part.shape[1], *part.shape[2:])
        full = part.new_zeros(shape)
    if spans_seq:
        width = part.shape[1]
        cols = slice(0, width) if batch.padding_side == "right" else slice(-width, None)
        full[rows, cols] = part
    else:
        full[rows] = part
    return full


def run(
    model: Any,
    prompts: Sequence[str] | str | Batch,
    interventions: InterventionSpec | None = None,
    *,
    capture: Sequence[SiteLike] = (),
    logit_positions: PositionSpec = "all",
    batch_size: int | None = 32,
    padding_side: PaddingSide = "right",
    progress: bool = False,
) -> RunResult:
    """Run prompts through ``model`` with interventions, returning logits and captured activations.

    Prompts are tokenised and padded once, then run in chunks of ``batch_size`` rows under
    ``torch.no_grad``. Captures at a site see the activation after that site's interventions.

    Args:
        model: A TransformerLens model.
        prompts: Strings, or a :class:`Batch` from :func:`mechprobe.tokenize`.
        interventions: ``{site: intervention(s)}`` as for :func:`mechprobe.intervene`.
        capture: Sites to capture; a Site's ``positions`` selects positions (all by default).
        logit_positions: Positions whose logits to keep (``-1``: last real token); ``"all"`` keeps
            every position, which costs ``batch * seq * vocab`` floats.
        batch_size: Rows per forward pass (None: all at once).
        padding_side: Padding of the batch built from strings.
        progress: Show a progress bar over chunks.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> out = mp.run(model, ["Hi", "Hello"], capture=[mp.Site("resid_post", 0)], logit_positions=-1)
        >>> tuple(out.logits.shape), tuple(out[mp.Site("resid_post", 0)].shape)
        ((2, 1, 259), (2, 6, 64))
    """
    batch = (
        prompts
        if isinstance(prompts, Batch)
        else tokenize(model, prompts, padding_side=padding_side)
    )
    spec = dict(interventions or {})
    for site in capture:  # validate before any forward pass
        resolve_site(model, site)
    logit_index = None if logit_positions == "all" else batch.positions(logit_positions)
    logits: Tensor | None = None
    captured: dict[SiteLike, Tensor] = {}
    chunks = list(batch.chunks(batch_size))
    with torch.no_grad():
        for rows, chunk in tqdm(chunks, disable=not progress, desc="run"):
            caps = {site: Capture() for site in capture}
            merged: dict[SiteLike, list[Intervention]] = {}
            for key, value in spec.items():
                merged.setdefault(key, []).extend(
                    [value] if isinstance(value, Intervention) else value
                )
            for site, cap in caps.items():
                merged.setdefault(site, []).append(cap)
            with intervene(model, merged, batch=chunk):
                out = forward(model, chunk)
            if logit_index is None:
                logits = _place(logits, out, rows, batch, spans_seq=True)
            else:
                local = chunk.positions(logit_positions)
                logits = _place(
                    logits, out[torch.arange(len(chunk))[:, None], local], rows, batch, False
                )
            for site, cap in caps.items():
                assert cap.value is not None
                spans = _positions_of(site) is None
                captured[site] = _place(captured.get(site), cap.value, rows, batch, spans)
    assert logits is not None
    del logit_index
    return RunResult(logits=logits, captures=captured, batch=batch)


def _positions_of(site: SiteLike) -> Any:
    return None if isinstance(site, str) else site.positions
