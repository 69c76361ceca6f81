"""One answer to every question the analyses ask a model, whichever TransformerLens model it is.

mechprobe runs on two model types:

- ``TransformerBridge`` (TransformerLens 4.x, also present in 3.x): a Hugging Face model with
  TransformerLens hook points around its modules.
- ``HookedTransformer`` (TransformerLens 3.x; removed in 4.0): TransformerLens's own implementation,
  with weights converted from Hugging Face and optionally processed (layer norm folded, writing
  weights and the unembedding centred).

They share most of their surface (``cfg``, the hook names of every site kind, ``hooks()``,
``W_E``/``W_U``, ``tokenizer``), and analyses use that shared surface directly. Where they differ,
:class:`ModelAdapter` answers instead, so that no analysis asks which type it has:

- the output-logits transform: the bridge's architecture adapter applies it
  (``apply_output_logits_transform``, e.g. Gemma 2's soft cap), a ``HookedTransformer`` applies
  ``cfg.output_logits_soft_cap`` inside its forward;
- the final norm: a ``HookedTransformer`` without normalisation has no ``ln_final`` at all, and with
  folded layer norm its ``ln_final`` is a weightless ``RMSNormPre``/``LayerNormPre`` whose weights
  live in ``W_U``: decoding ``ln_final(x) @ W_U + b_U`` is right in every case;
- the forward's inputs: the bridge takes 4D attention masks, ``position_ids`` and
  ``logits_to_keep`` (packed rows); a ``HookedTransformer`` takes a ``[batch, pos]`` mask only and
  derives positions from it;
- the key/value head count: ``cfg.n_key_value_heads`` is None without grouped-query attention.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any, Literal, TypeAlias

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core._sites import _HOOK_OF_KIND

__all__ = ["ModelAdapter", "ModelKind", "model_adapter"]

ModelKind: TypeAlias = Literal["bridge", "hooked"]

#: The TransformerLens classes mechprobe runs on, by class name (found in the model's MRO, so
#: subclasses such as SAELens's ``HookedSAETransformer`` count too) -> the adapter's kind.
_CLASSES: dict[str, ModelKind] = {"TransformerBridge": "bridge", "HookedTransformer": "hooked"}


def _kind_of(model: Any) -> ModelKind | None:
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformer_lens") and cls.__name__ in _CLASSES:
            return _CLASSES[cls.__name__]
    return None


class ModelAdapter:
    """What mechprobe needs from a ``TransformerBridge`` or a ``HookedTransformer``.

    Build one with :func:`model_adapter`. Answers are read from the model on every access, so they
    follow later changes (``enable_compatibility_mode()``, a cfg field set by hand).

    Attributes:
        model: The model.
        kind: ``"bridge"`` or ``"hooked"``, for messages and tests; analyses never branch on it.
    """

    def __init__(self, model: Any, kind: ModelKind) -> None:
        self.model = model
        self.kind: ModelKind = kind

    def __repr__(self) -> str:
        return f"ModelAdapter({self.kind}, {self.name!r}, {self.n_layers} layers)"

    # --- sizes -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The model's name (``cfg.model_name``)."""
        return str(getattr(self.model.cfg, "model_name", type(self.model).__name__))

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        """Width of the logits (``W_U``'s columns)."""
        return int(self.model.W_U.shape[-1])

    @property
    def n_heads(self) -> int:
        return int(self.model.cfg.n_heads)

    @property
    def d_head(self) -> int:
        return int(self.model.cfg.d_head)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads: fewer than :attr:`n_heads` under grouped-query attention.

        Both model types say None in ``cfg.n_key_value_heads`` when every head has its own keys
        and values; ``hook_k``/``hook_v`` then have ``n_heads`` heads.
        """
        n = getattr(self.model.cfg, "n_key_value_heads", None)
        return self.n_heads if n is None else int(n)

    @property
    def parallel_blocks(self) -> bool:
        """Whether attention and MLP both read a block's input (``cfg.parallel_attn_mlp``: GPT-NeoX
        and Pythia, GPT-J, Phi): such a block has no ``resid_mid``, and its MLP reads ``resid_pre``
        (at ``hook_mlp_in``), not its attention's write."""
        return bool(getattr(self.model.cfg, "parallel_attn_mlp", False))

    @property
    def n_ctx(self) -> int | None:
        n = getattr(self.model.cfg, "n_ctx", None)
        return None if n is None else int(n)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the embedding's): a bridge's ``cfg.dtype`` stays float32 when its
        Hugging Face model was loaded in bfloat16."""
        return self.model.W_E.dtype

    @property
    def dtype_name(self) -> str:
        """:attr:`dtype` without its ``torch.`` prefix (``"bfloat16"``), as results record it."""
        return str(self.dtype).removeprefix("torch.")

    def attached_hooks(self, *prefixes: str) -> list[str]:
        """The hook points whose names start with one of ``prefixes`` (any name, with none) that
        hold a forward hook now (the user's, or an intervention's in force).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> model.add_hook("unembed.hook_out", lambda logits, hook: logits)
            >>> model_adapter(model).attached_hooks("unembed", "ln_final")
            ['unembed.hook_out']
            >>> bool(model_adapter(model).attached_hooks())  # any hook point
            True
            >>> model.reset_hooks()
        """
        return [
            name
            for name, point in self.model.hook_dict.items()
            if (not prefixes or name.startswith(prefixes)) and point.fwd_hooks
        ]

    def known_nan_cause(
        self, attention_mask: Tensor | None = None, left: bool = False
    ) -> str | None:
        """A known reason this model gives NaN logits on a batch with ``attention_mask`` (padded
        on the ``left``, or not), for an error message; None where none is known.

        Example:
            >>> import mechprobe as mp
            >>> model_adapter(mp.tiny_model()).known_nan_cause() is None
            True
        """
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if self.kind == "bridge" and self.dtype == torch.float64 and left and padded:
            # TransformerLens 4.3 masks with -inf in float64: a padding query sees no key, its
            # softmax is NaN, and 0 * NaN spreads it through every later position of the row.
            return (
                "TransformerLens 4.3's TransformerBridge gives NaN on every left-padded row of a "
                "float64 model: pass prompts of one length (or one at a time), pad on the right "
                "where the call takes padding_side=, or run the model in float32"
            )
        return None

    def nan_causes(self, attention_mask: Tensor | None = None, left: bool = False) -> str:
        """:meth:`known_nan_cause`, or the usual causes where none is known (for a message).

        Example:
            >>> import mechprobe as mp
            >>> model_adapter(mp.tiny_model()).nan_causes()
            'a float16 overflow, or an edit that wrote NaN'
        """
        known = self.known_nan_cause(attention_mask, left)
        return known or "a float16 overflow, or an edit that wrote NaN"

    @property
    def device(self) -> torch.device:
        """Where token ids go: the embedding's device."""
        return self.model.W_E.device

    # --- text --------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer.

        Raises:
            ValueError: The model has none (a ``HookedTransformer`` built without one).
        """
        tokenizer = getattr(self.model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError(
                "This model has no tokenizer: pass token ids instead of strings (a "
                "mechprobe.Batch to run, logit_lens and collect; id tensors to patch and "
                "attribution_patch), or give it one (HookedTransformer(cfg, tokenizer=...) or "
                "model.set_tokenizer(tokenizer))."
            )
        return tokenizer

    def token_text(self, token: int) -> str:
        """One token's text, or ``<id>`` for a model without a tokenizer (labels only).

        A token holding part of a character's UTF-8 bytes decodes to "�" alone: its bytes are
        written out instead (``"<0xE2><0x80>"``), so tokens stay apart in tables and figures.
        """
        tokenizer = getattr(self.model, "tokenizer", None)
        return f"<{int(token)}>" if tokenizer is None else token_texts(tokenizer, [token])[0]

    @property
    def padding_side(self) -> str:
        """The side the model's own tokenizer pads (``to_tokens``); mechprobe's batches choose
        their own and pass the attention mask, so no result depends on it."""
        return str(getattr(self.tokenizer, "padding_side", None) or "right")

    @property
    def prepend_bos(self) -> bool:
        """Whether text gets a BOS token first by default (``cfg.default_prepend_bos``)."""
        return bool(getattr(self.model.cfg, "default_prepend_bos", True))

    @property
    def prepended_bos(self) -> int | None:
        """The BOS id the model puts before a text by default; None where it puts none (or has
        no tokenizer, or its tokenizer no BOS token)."""
        tokenizer = getattr(self.model, "tokenizer", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        return int(bos) if bos is not None and self.prepend_bos else None

    # --- hooks -------------------------------------------------------------------------------

    def hook_name(self, kind: str, layer: int) -> str:
        """The hook name of site kind ``kind`` at block ``layer`` (e.g. ``blocks.3.hook_mlp_out``).

        Both model types fire these hooks at the same place with the same values (the bridge's
        names are its compatibility aliases; tests compare every kind against the Hugging Face
        modules on both).

        Raises:
            ValueError: Not a site kind, or the model has no such hook.
        """
        if kind not in _HOOK_OF_KIND:
            raise ValueError(f"Unknown site kind {kind!r}; kinds: {', '.join(_HOOK_OF_KIND)}.")
        name = _HOOK_OF_KIND[kind].format(layer=layer)
        if name not in self.model.hook_dict:
            raise ValueError(f"This {self.kind} model has no hook {name!r}.")
        return name

    @property
    def final_hook(self) -> str:
        """The last block's output, the residual stream the unembedding reads."""
        return self.hook_name("resid_post", self.n_layers - 1)

    # --- decoding ----------------------------------------------------------------------------

    def final_norm(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The model's own final norm (a module call: hooks on ``ln_final`` fire).

        With folded layer norm its weights live in the unembedding, so ``final_norm`` followed by
        :meth:`unembedding` is the model's decoding either way; a model without a final norm
        (``normalization_type=None``) returns ``x``.
        """
        if self.kind == "hooked" and self.model.cfg.normalization_type is None:
            return x
        norm = getattr(self.model, "ln_final", None)
        if norm is None:
            # OPT-350m's bridge: post-norm blocks, no final norm, and a projection (project_out)
            # before the unembedding, which ln_final -> W_U would leave out.
            raise ValueError(
                f"{self.name} has no final norm (ln_final): mechprobe reads logits from the "
                "residual stream as ln_final then the unembedding, which this architecture does "
                "not compute (OPT-350m's post-norm layout projects the stream before "
                "unembedding it). Use a model with a final norm."
            )
        return norm(x)

    def unembedding(self) -> tuple[Float[Tensor, "d_model vocab"], Float[Tensor, " vocab"]]:
        """``(W_U, b_U)``: views of the model's own unembedding (centred if it was processed)."""
        return self.model.W_U, self.model.b_U

    @property
    def output_transform(self) -> Callable[[Tensor], Tensor] | None:
        """The architecture's step after the unembedding (Gemma 2's ``cap * tanh(z / cap)``), or
        None where there is none; the model's own logits pass through it."""
        if self.kind == "bridge":
            transform = getattr(
                getattr(self.model, "adapter", None), "apply_output_logits_transform", None
            )
            return transform if callable(transform) else None
        cap = getattr(self.model.cfg, "output_logits_soft_cap", None)
        if cap is None or float(cap) <= 0:
            return None
        return _SoftCap(float(cap))

    @property
    def embedding(self) -> Float[Tensor, "vocab d_model"]:
        """``W_E``: the token embedding (what ``hook_embed`` reads, up to an architecture's scale)."""
        return self.model.W_E

    @property
    def weights_processed(self) -> bool:
        """Whether TransformerLens's weight processing (layer norm folded, weights centred) was
        applied: ``HookedTransformer.from_pretrained`` does by default, a bridge after
        ``enable_compatibility_mode()``. Logits may then differ from the unprocessed model's by a
        constant per position (centred unembedding); probabilities do not."""
        if self.kind == "hooked":
            return str(self.model.cfg.normalization_type) in ("LNPre", "RMSPre")
        return bool(getattr(self.model, "_weights_processed", False))

    # --- running -----------------------------------------------------------------------------

    @property
    def packs_rows(self) -> bool:
        """Whether :meth:`forward` takes 4D attention masks and ``position_ids`` (several segments
        per row, as batched patching packs them). A bridge passes them to the Hugging Face model.
        A ``HookedTransformer`` takes neither, so the forward applies them through its hooks
        (:func:`_packed_hooks`): where its positions are rotary or learned, its attention causal
        and unwindowed, and no position rescales it (dynamic NTK, log-n scaling)."""
        if self.kind == "bridge":
            return True
        cfg = self.model.cfg
        return (
            cfg.positional_embedding_type in ("rotary", "standard")
            and getattr(cfg, "attention_dir", "causal") == "causal"
            and not getattr(cfg, "use_dynamic_ntk_rope", False)
            and not getattr(cfg, "use_logn_attn", False)
            and self.sliding_window is None
        )

    @property
    def sliding_window(self) -> int | None:
        """The attention window of the model's sliding-window layers (Gemma 2's local layers,
        Mistral), or None where every layer attends to the whole prefix. A 4D attention mask, as
        packed rows pass, replaces the window: packing is exact only for sequences within it."""
        if self.kind == "hooked":
            # TransformerLens applies local attention only with use_local_attn set
            if not getattr(self.model.cfg, "use_local_attn", False):
                return None
            types = getattr(self.model.cfg, "attn_types", None) or ()
            window = getattr(self.model.cfg, "window_size", None)
            return int(window) if window and "local" in types else None
        config = getattr(getattr(self.model, "original_model", None), "config", None)
        window = getattr(config, "sliding_window", None)
        if not window or getattr(config, "use_sliding_window", True) is False:
            return None
        types = getattr(config, "layer_types", None)
        if types is not None and "sliding_attention" not in types:
            return None
        return int(window)

    def attention_window(self, layer: int) -> int | None:
        """How many keys up to and including its own a query of ``layer`` sees (a key ``k`` is
        visible from query ``q`` where ``q - k < window``), or None where the layer attends to
        the whole prefix: Gemma 2 alternates sliding and full layers, Mistral slides in all."""
        window = self.sliding_window
        if window is None:
            return None
        if self.kind == "hooked":
            types = getattr(self.model.cfg, "attn_types", None) or ()
            return window if types and types[layer] == "local" else None
        config = self.model.original_model.config
        types = getattr(config, "layer_types", None)
        return window if types is None or types[layer] == "sliding_attention" else None

    def forward(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position_ids: Tensor | None = None,
        logits_to_keep: int | None = None,
    ) -> Tensor:
        """The model's forward pass: logits ``[batch, seq or logits_to_keep, vocab]``.

        Raises:
            ValueError: Packed inputs (a 4D mask, ``position_ids``) on a model that cannot take
                them (see :attr:`packs_rows`).
        """
        packed = position_ids is not None or (
            attention_mask is not None and attention_mask.ndim > 2
        )
        if packed and not self.packs_rows:
            raise ValueError(
                f"A {self.kind} model takes a [batch, pos] attention mask only, not packed rows "
                "(4D masks, position_ids): run one sequence per row."
            )
        device = self.device
        if packed and self.kind == "hooked":
            hooks = _packed_hooks(self.model, tokens.shape, attention_mask, position_ids, device)
            with self.model.hooks(fwd_hooks=hooks):
                logits = self.model(tokens.to(device))
            return logits if logits_to_keep is None else logits[:, -logits_to_keep:]
        extra: dict[str, Any] = {}
        if position_ids is not None:
            extra["position_ids"] = position_ids.to(device)
        if logits_to_keep is not None and self.kind == "bridge":
            extra["logits_to_keep"] = logits_to_keep
        mask = None if attention_mask is None else attention_mask.to(device)
        logits = self.model(tokens.to(device), attention_mask=mask, **extra)
        if logits_to_keep is not None and self.kind != "bridge":
            logits = logits[:, -logits_to_keep:]
        return logits


def _packed_hooks(
    model: Any,
    shape: torch.Size,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    device: Any,
) -> list[tuple[str, Callable[..., Tensor]]]:
    """A ``HookedTransformer``'s hooks that make a plain forward of ``shape [rows, width]``
    tokens a packed one: each layer's attention scores masked by the 4D ``attention_mask``
    ``[rows, 1, query, key]`` (segments see their own keys and their base's prefix, as a
    bridge's Hugging Face model applies the mask), and each token at its ``position_ids``:
    rotary queries and keys rotated there by TransformerLens's own rotation of what the model
    rotates (:func:`_rotary_at`), or learned position embeddings looked up at those positions.
    The engine checks once per model, dtype and device that a packed segment gives the plain
    run's logits (``packing_works``) and runs whole rows where it does not.
    """
    rows, width = int(shape[0]), int(shape[1])
    if width > int(model.cfg.n_ctx):
        raise ValueError(f"A packed row of {width} tokens is longer than the model's context.")
    index = torch.arange(width, device=device)
    positions = index.expand(rows, -1) if position_ids is None else position_ids.to(device)
    hooks: list[tuple[str, Callable[..., Tensor]]] = []
    if attention_mask is not None:
        allowed = attention_mask.to(device).bool()

        def mask(scores: Tensor, hook: Any) -> Tensor:
            return scores.masked_fill(~allowed, float("-inf"))

        hooks += [(f"blocks.{i}.attn.hook_attn_scores", mask) for i in range(model.cfg.n_layers)]
    if model.cfg.positional_embedding_type == "rotary":
        for i, block in enumerate(model.blocks):
            for name in ("q", "k"):
                kept_at, keep, rotate = _rotary_at(block.attn, name, positions)
                hooks += [(f"blocks.{i}.attn.{kept_at}", keep)]
                hooks += [(f"blocks.{i}.attn.hook_rot_{name}", rotate)]
    else:
        w_pos = model.W_pos

        def learned(embedded: Tensor, hook: Any) -> Tensor:
            return w_pos[positions].to(embedded.dtype)

        hooks.append(("hook_pos_embed", learned))
    return hooks


def _query_key_norm(attn: Any, name: str) -> Any:
    """The RMSNorm a ``HookedTransformer``'s attention applies to its queries (``name="q"``) or
    keys (``"k"``) between ``hook_q``/``hook_k`` and the rotation (``use_qk_norm``, per head;
    OLMo 2's and 3's and OLMoE's, over all heads at once), or None."""
    olmo = str(getattr(attn.cfg, "original_architecture", "")).startswith(
        ("Olmo2", "Olmo3", "Olmoe")
    )
    if not (getattr(attn.cfg, "use_qk_norm", False) or olmo):
        return None
    return getattr(attn, f"{name}_norm", None)


def _rotary_at(
    attn: Any, name: str, positions: Tensor
) -> tuple[str, Callable[..., Tensor], Callable[..., Tensor]]:
    """Two hooks that rotate queries (``name="q"``) or keys (``"k"``) ``[rows, width, heads,
    d_head]`` at ``positions`` ``[rows, width]`` instead of at their index, and the hook point
    (under the attention) the first goes on. The first keeps what the model rotates, as the
    last hook before the rotation passes it on: ``hook_q``/``hook_k``'s value, or where a
    query-key norm comes between (Qwen 3's, Gemma 3's, OLMo's), its ``hook_normalized``'s, the
    rest of TransformerLens's RMSNorm (the cast to the model's dtype, the weight) and any
    ``clip_qkv`` clamp replayed as TransformerLens computes them. The second replaces the
    rotation at ``hook_rot_q``/``hook_rot_k`` with TransformerLens's own (``apply_rotary``: its
    tables, pairing and operations, in the model's dtype). So each token's rotation is the plain
    run's bit for bit; turning the index's rotation on by the difference instead rounded once
    more (in bfloat16 SmolLM2's packed head patches were 1.7x further from float32 than whole
    rows), and calling the norm again would fire its hooks twice.
    """
    kept: list[Tensor] = []
    dim = int(attn.cfg.rotary_dim)
    norm = _query_key_norm(attn, name)
    clip = getattr(attn.cfg, "clip_qkv", None)

    def keep(x: Tensor, hook: Any) -> Tensor:
        kept[:] = [x]
        return x

    def rotate(rotated: Tensor, hook: Any) -> Tensor:
        x = kept.pop()
        if norm is not None:  # RMSNorm.forward after hook_normalized, then back to the heads
            x = x.to(norm.cfg.dtype).to(norm.w.device) * norm.w
        x = x.reshape(rotated.shape)
        if clip is not None:
            x = x.clamp(min=-clip, max=clip)
        x = x.to(rotated.device)
        part, rest = x[..., :dim], x[..., dim:]
        cos = attn.rotary_cos[positions.to(attn.rotary_cos.device), None, :]
        sin = attn.rotary_sin[positions.to(attn.rotary_sin.device), None, :]
        return torch.cat([part * cos + attn.rotate_every_two(part) * sin, rest], dim=-1)

    return (f"hook_{name}" if norm is None else f"{name}_norm.hook_normalized"), keep, rotate


class _SoftCap:
    """``cap * tanh(z / cap)``: a ``HookedTransformer``'s ``output_logits_soft_cap``, computed as
    its forward computes it (so decoded logits equal the model's own bit for bit)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __call__(self, logits: Tensor) -> Tensor:
        return self.cap * torch.tanh(logits / self.cap)


def model_adapter(model: Any) -> ModelAdapter:
    """The :class:`ModelAdapter` of a ``TransformerBridge`` or a ``HookedTransformer``.

    Raises:
        TypeError: Any other object, naming what to pass instead.

    Example:
        >>> import mechprobe as mp
        >>> adapter = model_adapter(mp.tiny_model())
        >>> adapter.kind, adapter.n_heads, adapter.n_kv_heads, adapter.hook_name("mlp_out", 1)
        ('bridge', 4, 2, 'blocks.1.hook_mlp_out')
    """
    if isinstance(model, ModelAdapter):
        return model
    kind = _kind_of(model)
    if kind is None:
        raise TypeError(
            f"mechprobe runs on TransformerLens models, got {type(model).__name__}: pass a "
            "TransformerBridge (TransformerLens 4.x; mp.load_model()) or a HookedTransformer "
            "(TransformerLens 3.x; mp.load_model(kind='hooked'))."
        )
    return ModelAdapter(model, kind)


def token_texts(tokenizer: Any, ids: Any) -> list[str]:
    """Each token's own text, as a label: ``tokenizer.decode([id])``, except that a token holding
    part of a character's UTF-8 bytes (which decodes to "�" alone, whichever part) is written
    as its bytes, ``"<0xE2><0x80>"`` (as SentencePiece writes byte tokens), so such tokens stay
    apart in frames and figures.

    Example:
        >>> import mechprobe as mp
        >>> token_texts(mp.tiny_model().tokenizer, [5, 130])
        ['#', '<0xC3>']
    """
    ids = [int(i) for i in ids]
    texts = [str(tokenizer.decode([i])) for i in ids]
    for k, (token, text) in enumerate(zip(ids, texts, strict=True)):
        if "\ufffd" in text:
            raw = _token_bytes(tokenizer, token)
            if raw is not None:
                texts[k] = raw.decode("utf-8", errors=_BYTES_SHOWN)
    return texts


def _show_bytes(error: UnicodeError) -> tuple[str, int]:
    """Undecodable bytes as SentencePiece writes its byte tokens: ``<0xE2><0x80>``."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    bad = error.object[error.start : error.end]
    return "".join(f"<0x{b:02X}>" for b in bad), error.end


_BYTES_SHOWN = "mechprobe.show_bytes"
codecs.register_error(_BYTES_SHOWN, _show_bytes)


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-level BPE alphabet (each byte drawn as a printable
    character: "Ġ" for a space), as its tokenizers build it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_DECODER = _byte_decoder()


def _token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """The bytes a token stands for: a SentencePiece byte token (``<0xE2>``) or a byte-level
    BPE token (GPT-2, Llama 3, SmolLM2); None for other vocabularies."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    try:
        piece = convert(token) if convert is not None else None
    except Exception:  # a custom tokenizer's own failure: keep what decode said
        return None
    if not isinstance(piece, str) or not piece:
        return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            return None
    if all(c in _BYTE_DECODER for c in piece):
        return bytes(_BYTE_DECODER[c] for c in piece)
    return None
