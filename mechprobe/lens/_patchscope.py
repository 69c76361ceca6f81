"""Patchscopes (Ghandeharioun et al., ICML 2024): decode a hidden state by patching it elsewhere.

The token-identity Patchscope reads what a hidden state predicts by writing it into a target
prompt of few-shot identity pairs, ``"cat -> cat; 1135 -> 1135; hello -> hello; ?"``, in place
of the placeholder ``"?"``'s hidden state at the same site (by default at the same layer: no layer
shift), and letting the model finish the forward pass. The model's next-token distribution at the
target prompt's last token is the decoding. As a :class:`~mechprobe.lens._lens.Lens` it translates
each vector into the last block's output at that token, which the one readout turns into logits,
so every statistic of the logit lens (ranks, KL, teacher forcing of several-token targets: each
position's vector is patched in turn) comes out of the same code.

The paper prints the prompt with "; " between pairs; its released notebook
(PAIR-code/interpretability, ``next_token_prediction.ipynb``) separates them with newlines
(``Patchscope(prompt="cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?")``) and tokenises with
the tokenizer alone, so with no BOS where it adds none (GPT-2, Pythia), where mechprobe
tokenises the target prompt as :func:`mechprobe.tokenize` does, BOS first. Each choice moves the
decodings a little.

Cost: one forward pass of the target prompt (22 tokens for SmolLM2) per decoded vector, batched.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    Batch,
    Gather,
    Replace,
    Site,
    StopForward,
    check_batch_size,
    check_int,
    evaluates,
    run,
    tokenize,
    warn,
)
from mechprobe.lens._lens import RESIDUAL_KINDS, Lens

__all__ = ["IDENTITY_PROMPT", "Patchscope"]

#: The token-identity target prompt; the placeholder "?" is its last token.
IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ?"


class Patchscope(Lens):
    """The token-identity Patchscope, or any target prompt with a placeholder.

    Args:
        prompt: The target prompt.
        placeholder: The text whose (last) token's hidden state is replaced; its last occurrence
            in ``prompt`` is used.
        target_layer: The layer patched in the target prompt (None: the source vector's own
            layer, no shift; negative counts from the end).
        transform: A map applied to each vector before it is written, called as
            ``transform(x, layer)`` with ``x`` ``[n, d_model]`` read at ``layer`` (None: the
            vector as read). The paper's affine mappings from layer ``l`` to the target layer
            are such maps (fitted, e.g., by least squares on hidden states of other prompts).
        batch_size: Vectors (target-prompt rows) per forward pass (None: all at once).

    The decoding is read at the target prompt's last token: with the default prompt that is the
    placeholder itself, as in the paper's next-token experiments. A prompt such as ``"... ? ->"``
    reads one token later instead (what the model copies of the patched token).

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> scope = mp.Patchscope()
        >>> scope
        Patchscope(patchscope ('cat -> cat; 1135 -> 1135; hello -> hello; ?' at '?', same layer))
        >>> x = torch.randn(2, 64)
        >>> scope.translate(model, "resid_post", 1, x).shape
        torch.Size([2, 64])
    """

    kinds = RESIDUAL_KINDS
    continues_forward = True

    def __init__(
        self,
        prompt: str = IDENTITY_PROMPT,
        placeholder: str = "?",
        *,
        target_layer: int | None = None,
        transform: Callable[[Tensor, int], Tensor] | None = None,
        batch_size: int | None = 32,
    ) -> None:
        if transform is not None and not callable(transform):
            raise TypeError(
                f"transform must be a function of (x [n, d_model], layer), got {transform!r}."
            )
        if not isinstance(prompt, str) or not isinstance(placeholder, str) or not placeholder:
            raise TypeError("prompt and placeholder must be strings (the placeholder non-empty).")
        if placeholder not in prompt:
            raise ValueError(
                f"The placeholder {placeholder!r} does not occur in the target prompt {prompt!r}."
            )
        self.prompt = prompt
        self.placeholder = placeholder
        self.target_layer = (
            None if target_layer is None else check_int(target_layer, "target_layer")
        )
        self.transform = transform
        self.batch_size = check_batch_size(batch_size)
        # Per model (weakly: a model's id can be reused by another once it is gone).
        self._tokens: weakref.WeakKeyDictionary[Any, tuple[list[int], int]] = (
            weakref.WeakKeyDictionary()
        )

    def describe(self) -> str:
        where = "same layer" if self.target_layer is None else f"layer {self.target_layer}"
        mapped = "" if self.transform is None else ", transformed"
        return f"patchscope ({self.prompt!r} at {self.placeholder!r}, {where}{mapped})"

    def tokens(self, model: Any) -> tuple[list[int], int]:
        """The target prompt's token ids and the placeholder's position (its last token).

        Args:
            model: The model whose tokenizer reads the target prompt (cached per model).

        Returns:
            ``(ids, position)``: the target prompt's token ids (BOS included where the model
            prepends one) and the index among them of the placeholder's last token.

        Raises:
            ValueError: The placeholder does not start or end on a token boundary of the prompt.
        """
        key = model
        if key not in self._tokens:
            batch = tokenize(model, [self.prompt])
            ids = batch.tokens[0][batch.attention_mask[0].bool()].tolist()
            cut = self.prompt.rindex(self.placeholder) + len(self.placeholder)
            head = tokenize(model, [self.prompt[:cut]])
            head_ids = head.tokens[0][head.attention_mask[0].bool()].tolist()
            if ids[: len(head_ids)] != head_ids:
                raise ValueError(
                    f"The placeholder {self.placeholder!r} does not end on a token boundary of "
                    f"{self.prompt!r} for this tokenizer: put a space or punctuation after it."
                )
            # The text before it, without its trailing space (BPE puts a space into the next
            # token), must tokenise as a strict prefix of the prompt up to the placeholder.
            pre = tokenize(model, [self.prompt[: cut - len(self.placeholder)].rstrip()])
            pre_ids = pre.tokens[0][pre.attention_mask[0].bool()].tolist()
            if len(pre_ids) >= len(head_ids) or head_ids[: len(pre_ids)] != pre_ids:
                # "s" in "I like cats" is part of the token " cats": that token was patched.
                raise ValueError(
                    f"The placeholder {self.placeholder!r} does not start on a token boundary of "
                    f"{self.prompt!r} for this tokenizer (it merges with the text before it): "
                    "put a space before it or choose another placeholder."
                )
            self._tokens[key] = (ids, len(head_ids) - 1)
        return self._tokens[key]

    def _target(self, model: Any, layer: int) -> int:
        n = int(model.cfg.n_layers)
        t = layer if self.target_layer is None else self.target_layer
        if not -n <= t < n:
            raise ValueError(f"target_layer {t} is out of range for {n} layers.")
        return t % n

    def check(self, model: Any, entries: Sequence[tuple[str, int]]) -> None:
        super().check(model, entries)
        ids, place = self.tokens(model)
        last = int(model.cfg.n_layers) - 1
        # After the last attention, a state reaches no other token: read at a later token, such
        # a patch leaves every decode the same whatever the hidden state was.
        dead = sorted(
            {
                f"{kind} {last}"
                for kind, layer in entries
                if self._target(model, layer) == last and kind in ("resid_mid", "resid_post")
            }
        )
        if dead and place != len(ids) - 1:
            warn(
                f"This Patchscope reads its prompt's last token, after the placeholder, and a "
                f"state written at {', '.join(dead)} (the last layer, after its attention) reaches "
                "no later token: those decodes do not depend on the hidden state. Pass an "
                "earlier target_layer, or a prompt that ends with the placeholder.",
                UserWarning,
            )
        if (
            self.target_layer is not None
            and self.target_layer % (last + 1) == last
            and place == len(ids) - 1
            and any(kind == "resid_post" for kind, _ in entries)
        ):
            # Written where it is read, after every block: nothing of the target prompt acts on
            # it (review 37a), so the "Patchscope" is the logit lens under another name.
            warn(
                f"This Patchscope writes resid_post vectors at the last layer ({last}) at the "
                "token it reads: no block runs after them, so it decodes them exactly as the "
                "logit lens does. Pass an earlier target_layer.",
                UserWarning,
            )

    @evaluates
    def translate(
        self, model: Any, kind: str, layer: int, x: Float[Tensor, "n d_model"]
    ) -> Float[Tensor, "n d_model"]:
        ids, place = self.tokens(model)
        if self.transform is not None:
            mapped = self.transform(x, layer)
            if not isinstance(mapped, Tensor) or mapped.shape != x.shape:
                raise ValueError(
                    f"transform(x, {layer}) must return a tensor of x's shape {tuple(x.shape)}, "
                    f"got {getattr(mapped, 'shape', type(mapped).__name__)}."
                )
            x = mapped
        target = Site(kind, self._target(model, layer))  # type: ignore[arg-type]
        final = Site("resid_post", int(model.cfg.n_layers) - 1)
        out = torch.empty_like(x)
        row = torch.tensor(ids, dtype=torch.long)
        size = max(1, x.shape[0]) if self.batch_size is None else self.batch_size
        for s in range(0, x.shape[0], size):
            chunk = x[s : s + size]
            tokens = row.expand(chunk.shape[0], -1).contiguous()
            batch = Batch(tokens, torch.ones_like(tokens), "right", ("",) * chunk.shape[0])
            keep = Gather(cols=torch.tensor([len(ids) - 1]), stop=True)
            patch = Replace(chunk[:, None, :], positions=place)
            spec: dict[Any, Any] = (
                {target: [patch, keep]}
                if target == final
                else {
                    target: patch,
                    final: keep,
                }
            )
            with torch.no_grad(), contextlib.suppress(StopForward):
                run(model, batch, spec, logit_positions=-1, batch_size=None, progress=False)
            if keep.value is None:
                raise RuntimeError("The Patchscope's read-out site was not reached.")
            out[s : s + chunk.shape[0]] = keep.value[:, 0].to(out.dtype)
        return out
