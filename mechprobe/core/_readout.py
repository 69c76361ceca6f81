"""The one readout: the model's own final norm, unembedding and output-logits transform, applied to
any residual vectors (the lens, trajectories, patching metrics and ``run``'s logits all use it).

:func:`readout` returns the logits of a few vectors.

:class:`Readout` computes ``transform(ln_final(x) @ W_U + b_U)`` with the model's final-norm module,
its unembedding weights and its architecture's post-unembedding transform (identity for Llama),
which is exactly how the forward pass turns the last block's output into logits. Logits and
probabilities are written into ``[chunk, vocab]`` buffers made once: decoding never allocates a
``[rows, vocab]`` tensor per chunk, so peak memory is fixed (about three ``chunk x vocab`` float
buffers) whatever the number of layers or positions, and whatever the allocator does with freed
blocks (freed blocks of 20-30 MB were seen to fragment the heap and grow it layer after layer).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechprobe.core._adapter import model_adapter

__all__ = ["Readout", "readout"]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot product ``[n, v] x [n, v] -> [n]`` without an ``[n, v]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).flatten()


class Readout:
    """Decode residual-stream vectors the way the model decodes its last block's output.

    Args:
        model: A ``TransformerBridge`` or ``HookedTransformer``.
        chunk: Rows per unembedding matmul (the buffers' height).

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> x = torch.randn(5, model.cfg.d_model)
        >>> ref = model.unembed(model.ln_final(x[None]))[0]
        >>> bool(torch.allclose(Readout(model, 8).logits(x), ref, atol=1e-5))
        True
    """

    def __init__(self, model: Any, chunk: int) -> None:
        self.model = model
        self.chunk = chunk
        # The adapter answers for a TransformerBridge and a HookedTransformer alike: the final norm
        # (weightless when folded), the unembedding (views of the model's own weights) and the
        # architecture's post-unembedding transform.
        self._adapter = model_adapter(model)
        self.weight, self.bias = self._adapter.unembedding()  # [d_model, vocab], [vocab]
        vocab, device = self.weight.shape[1], self.weight.device
        # torch.empty only reserves: pages are touched (and counted) when first written. The
        # statistics' buffers are made on first use, so plain logits cost one buffer.
        self._logits = torch.empty(chunk, vocab, dtype=self.weight.dtype, device=device)
        self._buffers: dict[str, Tensor] = {}
        self._transform = self._adapter.output_transform

    def _buffer(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        if name not in self._buffers:
            shape = (self.chunk, self.weight.shape[1])
            self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.weight.device)
        return self._buffers[name]

    @property
    def _probs(self) -> Tensor:
        return self._buffer("probs")

    @property
    def _final(self) -> Tensor:
        return self._buffer("final")

    @property
    def _mask(self) -> Tensor:
        return self._buffer("mask", torch.bool)

    @torch.no_grad()
    def logits(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
        """Logits of at most ``chunk`` vectors (a view into the buffer, valid until the next call)."""
        normed = self._adapter.final_norm(x[None])[0].to(self.weight.dtype)
        out = torch.addmm(self.bias, normed, self.weight, out=self._logits[: x.shape[0]])
        if self._transform is not None:  # identity for Llama; softcaps and logit scales elsewhere
            out = self._transform(out)
        return out.float()

    def _lse(self, z: Tensor, probs: Tensor, top: Tensor) -> Tensor:
        """log-sum-exp from the softmax at the top token, ``z_top - log p_top`` (p_top >= 1/V)."""
        return z.gather(1, top).squeeze(1) - probs.gather(1, top).squeeze(1).log()

    def _stats(
        self, z: Tensor, p_f: Tensor, a_f: Tensor, ids: Tensor, top_k: int
    ) -> dict[str, Tensor]:
        """Statistics of ``z [g*c, V]`` (g entries x c queries) against the final ``p_f [c, V]``.

        Entropy ``H = lse - <p, z>`` and ``KL(final || lens) = <p_f, log p_f> - <p_f, z> + lse``
        need one softmax and two row-wise dot products, no log-probability tensor.
        """
        c, n = p_f.shape[0], z.shape[0]
        top = torch.topk(z, top_k, dim=-1)
        p = torch.softmax(z, dim=-1, out=self._probs[:n])
        lse = self._lse(z, p, top.indices[:, :1])
        entropy = lse - _dot(p, z)
        kl = torch.cat([a_f - _dot(p_f, z[e : e + c]) for e in range(0, n, c)]) + lse
        z_t = z.gather(1, ids.clamp(min=0).repeat(n // c, 1).to(z.device))  # [g*c, T]
        rank = torch.empty(z_t.shape, dtype=torch.long, device=z.device)
        for t in range(ids.shape[1]):
            greater = torch.gt(z, z_t[:, t : t + 1], out=self._mask[:n])
            rank[:, t] = greater.sum(-1, dtype=torch.int32)
        return {
            "top_ids": top.indices,
            "top_probs": (top.values - lse[:, None]).exp(),
            "entropy": entropy,
            "kl": kl.clamp(min=0.0),
            "rank": rank,
            "logprob": z_t - lse[:, None],
        }

    def grid(
        self,
        vecs: list[Float[Tensor, "n d_model"]],
        final: Float[Tensor, "n d_model"],
        ids: Int[Tensor, "n targets"],
        top_k: int,
    ) -> dict[str, Tensor]:
        """Full statistics of every entry's vectors, each ``[n, E, ...]``.

        Keys: ``top_ids``, ``top_probs`` ``[n, E, top_k]``; ``entropy``, ``kl`` ``[n, E]``;
        ``rank``, ``logprob`` ``[n, E, T]`` of the token ids ``ids`` (-1 = none, ignored later).
        ``final`` holds the last block's output at the same rows, for KL(final || lens).
        """
        n = final.shape[0]
        per = max(1, min(n, self.chunk))
        group = max(1, self.chunk // per)
        parts: list[dict[str, Tensor]] = []
        for s in range(0, n, per):
            zf = self.logits(final[s : s + per])
            c = zf.shape[0]
            p_f = torch.softmax(zf, dim=-1, out=self._final[:c])
            top_f = zf.argmax(-1, keepdim=True)
            a_f = _dot(p_f, zf) - self._lse(zf, p_f, top_f)  # sum p_f log p_f
            cols = []
            for e0 in range(0, len(vecs), group):
                x = torch.cat([v[s : s + per] for v in vecs[e0 : e0 + group]])
                stats = self._stats(self.logits(x), p_f, a_f, ids[s : s + per], top_k)
                g = x.shape[0] // c
                cols.append({k: v.reshape(g, c, *v.shape[1:]) for k, v in stats.items()})
            parts.append({k: torch.cat([col[k] for col in cols]).transpose(0, 1) for k in cols[0]})
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def token_logprobs(
        self, vecs: list[Float[Tensor, "n d_model"]], tokens: Int[Tensor, " n"]
    ) -> Float[Tensor, "n E"]:
        """Log-probability of ``tokens[i]`` under each entry's decoding of ``vecs[e][i]``."""
        n = tokens.shape[0]
        per = max(1, min(n, self.chunk))
        group = max(1, self.chunk // per)
        parts = []
        for s in range(0, n, per):
            tok = tokens[s : s + per]
            cols = []
            for e0 in range(0, len(vecs), group):
                x = torch.cat([v[s : s + per] for v in vecs[e0 : e0 + group]])
                z = self.logits(x)
                p = torch.softmax(z, dim=-1, out=self._probs[: z.shape[0]])
                lse = self._lse(z, p, z.argmax(-1, keepdim=True))
                rows = tok.repeat(z.shape[0] // tok.shape[0]).to(z.device)
                lp = z.gather(1, rows[:, None]).squeeze(1) - lse
                cols.append(lp.reshape(-1, tok.shape[0]))
            parts.append(torch.cat(cols).T)
        return torch.cat(parts)


def readout(model: Any, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """The model's logits for residual-stream vectors ``x``, as if each were the last block's output.

    ``transform(ln_final(x) @ W_U + b_U)`` in float32: exactly the path of the model's own logits
    (the transform is the architecture's post-unembedding step, e.g. Gemma 2's soft cap; identity
    for Llama). Hooks on ``ln_final`` fire; the unembedding's weights are read directly. For
    statistics over many vectors without a ``[rows, vocab]`` tensor per chunk, use
    :class:`Readout`.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> tokens = model.to_tokens("Hi")
        >>> _, cache = model.run_with_cache(tokens)
        >>> last = cache["blocks.2.hook_resid_post"][0]
        >>> bool(torch.allclose(readout(model, last), model(tokens)[0], atol=1e-5))
        True
    """
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 0:
        return torch.empty(*shape, model_adapter(model).d_vocab)
    with torch.no_grad():
        logits = Readout(model, flat.shape[0]).logits(flat)
    return logits.reshape(*shape, logits.shape[-1])
