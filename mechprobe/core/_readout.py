"""The one readout: the model's own final norm, unembedding and output-logits transform, applied to
any residual vectors (the lens, trajectories, patching metrics and ``run``'s logits all use it).

:func:`readout` returns the logits of a few vectors.

:class:`Readout` computes ``transform(ln_final(x) @ W_U + b_U)`` with the model's final-norm module,
its unembedding weights and its architecture's post-unembedding transform (identity for Llama),
which is exactly how the forward pass turns the last block's output into logits. Logits are written
into a ``[chunk, vocab]`` buffer made once: decoding never allocates a ``[rows, vocab]`` tensor per
chunk, so peak memory is fixed (two ``chunk x vocab`` float buffers and a few megabytes) whatever
the number of layers or positions, and whatever the allocator does with freed blocks (freed blocks
of 20-30 MB were seen to fragment the heap and grow it layer after layer).

The statistics (top-k, log-sum-exp, entropy, KL, target ranks) cost a few passes over each chunk of
logits on top of the unembedding, and every pass is a vectorised elementwise op or reduction of
PyTorch's own, never a BLAS call, so their speed does not hang on how a BLAS library treats odd
shapes (a batch of ``1 x V`` by ``V x 1`` products was 3x slower than a multiply and a sum on MKL,
and 400x less accurate):

- top-k from block maxima (:func:`_top_k`): one pass of maxima over blocks of 256 logits, then a
  top-k among the k best blocks only (a full top-k partially sorts every row);
- the softmax statistics a cache-sized block of rows at a time (:meth:`Readout._sweep`): the rows
  of logits come from memory once, and the softmax, the products with the logits and the rank
  counts read them from the cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechprobe.core._adapter import model_adapter
from mechprobe.core._warning import warn

__all__ = ["Readout", "readout"]


#: Logits per block of the top-k search: the top k of a row lie in its k blocks with the largest
#: maxima. 256 keeps both the maxima (V / 256 per row) and the candidates (256 k) small.
_TOP_BLOCK = 256

#: Bytes of logits per block of rows in :meth:`Readout._sweep`: the block and its probabilities
#: (twice this) stay in the last-level cache of any current server or desktop CPU, while blocks
#: stay large enough that each op's thread start-up is negligible.
_SWEEP_BYTES = 4 << 20


def _top_k(z: Float[Tensor, "n vocab"], k: int) -> tuple[Float[Tensor, "n k"], Int[Tensor, "n k"]]:
    """The k largest values of each row, in descending order, and their indices.

    Exact: the top k of a row lie in the k blocks of :data:`_TOP_BLOCK` logits with the largest
    maxima (a block holding none of them has a maximum below the k-th value, or ties it and is
    as good a source), so a top-k over those blocks' logits gives the same values as
    ``torch.topk``. Among equal values the index chosen may differ from ``torch.topk``'s (whose
    order among ties is unspecified); ``k == 1`` gives the first maximal index, as ``argmax``.
    The tail after the last whole block is always a candidate.

    Example:
        >>> z = torch.randn(3, 5000)
        >>> values, indices = _top_k(z, 4)
        >>> torch.equal(values, torch.topk(z, 4).values), torch.equal(z.gather(1, indices), values)
        (True, True)
    """
    n, vocab = z.shape
    blocks = vocab // _TOP_BLOCK
    if blocks <= 2 * k:  # few blocks: the search would cost more than it saves
        if k == 1:
            values, indices = z.max(-1, keepdim=True)
            return values, indices
        top = torch.topk(z, k, dim=-1)
        return top.values, top.indices
    whole = z[:, : blocks * _TOP_BLOCK].unflatten(1, (blocks, _TOP_BLOCK))
    maxima = whole.amax(-1)  # [n, blocks]: the one pass over every logit
    # k == 1: the first block holding the row's maximum
    best = maxima.argmax(-1, keepdim=True) if k == 1 else maxima.topk(k, dim=-1).indices
    offsets = torch.arange(_TOP_BLOCK, device=z.device)
    cand = whole.gather(1, best[:, :, None].expand(n, best.shape[1], _TOP_BLOCK)).flatten(1)
    cols = (best[:, :, None] * _TOP_BLOCK + offsets).flatten(1)
    if vocab > blocks * _TOP_BLOCK:
        tail = torch.arange(blocks * _TOP_BLOCK, vocab, device=z.device)
        cand = torch.cat([cand, z[:, blocks * _TOP_BLOCK :]], dim=1)
        cols = torch.cat([cols, tail.expand(n, -1)], dim=1)
    if k == 1:
        values, where = cand.max(-1, keepdim=True)  # candidates are in column order: first max
    else:
        values, where = torch.topk(cand, k, dim=-1)
    return values, cols.gather(1, where)


def _row_blocks(n: int, c: int, rows: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks ``(a, b, q0, q1)`` of at most ``rows`` rows of ``n = g * c`` rows (g entries of the
    same c queries): rows ``a:b`` are queries ``q0:q1`` of ``(b - a) // (q1 - q0)`` whole entries."""
    if c >= rows:  # split each entry's queries
        for start in range(0, n, c):
            for q0 in range(0, c, rows):
                q1 = min(q0 + rows, c)
                yield start + q0, start + q1, q0, q1
    else:  # several whole entries per block
        step = rows // c * c
        for a in range(0, n, step):
            yield a, min(a + step, n), 0, c


def target_rank(
    logits: Float[Tensor, "... vocab"], target: Float[Tensor, "... t"]
) -> Int[Tensor, "... t"]:
    """0-based rank of each target logit among ``logits``: the number of *other* tokens whose
    logit is at least the target's, so ties count against the target.

    A tie is no evidence for the target: a readout of a zeroed residual stream (every logit
    equal) ranks every target ``vocab - 1``, not top-1 as counting only larger logits would.
    Callers refuse NaN logits first (NaN compares false with everything).

    Example:
        >>> target_rank(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), torch.tensor([[3.0, 0.0]])).tolist()
        [[1, 3]]
        >>> target_rank(torch.zeros(1, 5), torch.zeros(1, 1)).tolist()
        [[4]]
    """
    return (logits[..., None, :] >= target[..., :, None]).sum(-1) - 1


def top1_hit(logits: Float[Tensor, "... vocab"], target: Int[Tensor, "..."]) -> Tensor:
    """Whether each ``target`` token alone has the largest logit: :func:`target_rank` 0, so a
    tie for first is no hit (``argmax == target`` would count it when the target is the lowest
    tied id).

    Example:
        >>> top1_hit(torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]), torch.tensor([1, 0])).tolist()
        [True, False]
    """
    picked = logits.gather(-1, target[..., None].to(logits.device))
    return target_rank(logits, picked)[..., 0] == 0


def _same_view(a: Tensor, b: Tensor) -> bool:
    """True when ``a`` and ``b`` are the same elements of the same memory (hence equal)."""
    return (
        a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.data_ptr() == b.data_ptr()
    )


def _collect(
    top_values: Tensor, top_ids: Tensor, sweep: dict[str, Tensor], kl: Tensor, z_t: Tensor
) -> dict[str, Tensor]:
    """The statistics of :meth:`Readout.grid` from a sweep's sums (``[rows, ...]`` each)."""
    lse = sweep["lse"]
    return {
        "top_ids": top_ids,
        "top_probs": (top_values - lse[:, None]).exp(),
        "entropy": lse - sweep["pz"],
        "kl": kl,
        # "greater" counts the target itself: target_rank's rule, other tokens at least as high
        "rank": sweep["greater"].long() - 1 if "greater" in sweep else z_t.long(),
        "logprob": z_t - lse[:, None],
    }


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
        skipped = self._adapter.attached_hooks("unembed")
        if skipped:
            # Said, not silently skipped: a patch's clean baseline was 2.57 where model(tokens),
            # with the user's hook on the logits, said 3.57 (review 21a).
            warn(
                f"A hook is attached at {', '.join(skipped)}: mechprobe decodes residual vectors "
                "with the unembedding's weights, so that hook does not act on these logits "
                "(mp.run and gradient-based analyses run the whole forward and do apply it). "
                "Put the edit at ln_final.hook_normalized, or remove the hook."
            )
        self.weight, self.bias = self._adapter.unembedding()  # [d_model, vocab], [vocab]
        vocab, device = self.weight.shape[1], self.weight.device
        # torch.empty only reserves: pages are touched (and counted) when first written. The
        # statistics' buffers are made on first use, so plain logits cost one buffer.
        self._logits = torch.empty(chunk, vocab, dtype=self.weight.dtype, device=device)
        self._buffers: dict[str, Tensor] = {}
        self._transform = self._adapter.output_transform

    def _buffer(self, name: str, rows: int) -> Tensor:
        if name not in self._buffers:
            shape = (rows, self.weight.shape[1])
            self._buffers[name] = torch.empty(shape, dtype=torch.float32, device=self.weight.device)
        return self._buffers[name]

    @property
    def _rows(self) -> int:
        """Rows per block of :meth:`_sweep` (4 MiB of logits: 21 rows of a 49,152-token vocabulary)."""
        return max(1, min(self.chunk, _SWEEP_BYTES // (4 * int(self.weight.shape[1]))))

    @property
    def _probs(self) -> Tensor:
        """``[rows, vocab]``: one block's probabilities, then its products with the logits."""
        return self._buffer("probs", self._rows)

    @property
    def _final(self) -> Tensor:
        """``[chunk, vocab]``: the final distribution of the queries being decoded, for the KL."""
        return self._buffer("final", self.chunk)

    @torch.no_grad()
    def logits(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n vocab"]:
        """Logits of at most ``chunk`` vectors (a view into the buffer, valid until the next call)."""
        # Vectors the caller holds (a CPU tensor, a saved o-vector) go to the model's device and
        # dtype: a bfloat16 model's LayerNorm (Pythia's) refuses float32 input.
        x = x.to(self.weight.device, self.weight.dtype)
        normed = self._adapter.final_norm(x[None])[0].to(self.weight.dtype)
        out = torch.addmm(self.bias, normed, self.weight, out=self._logits[: x.shape[0]])
        if self._transform is not None:  # identity for Llama; softcaps and logit scales elsewhere
            out = self._transform(out)
        return out.float()

    def _sweep(
        self,
        z: Float[Tensor, "n vocab"],
        top: Int[Tensor, "n 1"],
        *,
        entropy: bool = True,
        p_f: Float[Tensor, "c vocab"] | None = None,
        z_t: Float[Tensor, "n targets"] | None = None,
        keep: Float[Tensor, "n vocab"] | None = None,
    ) -> dict[str, Tensor]:
        """Softmax statistics of the rows of ``z``, a cache-sized block of rows at a time.

        ``z`` holds g entries of the same c queries (``n = g * c``); ``top`` is each row's maximal
        index. Keys: ``lse`` (log-sum-exp), ``pz`` (``<p, z>``, with ``entropy``), ``fz``
        (``<p_f, z>`` against the query's row of ``p_f``), ``greater`` (``[n, T]``: logits at
        least ``z_t``, the target's own included, as floats: exact below 2**24). ``keep`` receives the probabilities, normalised.

        Each block's rows come from memory once and every later pass over them reads the cache;
        the products are written into the probabilities' buffer and summed (a multiply and a sum:
        vectorised everywhere, and the sum is pairwise, so more exact than a BLAS dot). The
        softmax's own normaliser is rounded (sums of ``p`` were off by up to 1e-5 at V = 49,152);
        dividing by the exact sum ``s`` of ``p`` removes that: ``lse = z_top - log p_top + log s``.
        """
        n, vocab = z.shape
        c = n if p_f is None else p_f.shape[0]
        new = z.new_empty
        out = {"lse": new(n), "total": new(n), "p_top": new(n)}
        if entropy:
            out["pz"] = new(n)
        if p_f is not None:
            out["fz"] = new(n)
        if z_t is not None:
            out["greater"] = new(z_t.shape)
        scratch = self._probs
        for a, b, q0, q1 in _row_blocks(n, c, self._rows):
            zb = z[a:b]
            pb = scratch[: b - a] if keep is None else keep[a:b]
            work = scratch[: b - a]  # pb itself when keep is None: its products overwrite it
            torch.softmax(zb, -1, out=pb)
            torch.sum(pb, -1, out=out["total"][a:b])
            torch.gather(pb, 1, top[a:b], out=out["p_top"][a:b, None])
            if keep is not None:
                pb.div_(out["total"][a:b, None])
            if entropy:  # overwrites the probabilities unless they are kept
                torch.sum(torch.mul(pb, zb, out=work), -1, out=out["pz"][a:b])
            if p_f is not None:
                width = q1 - q0
                prod = torch.mul(
                    zb.view(-1, width, vocab), p_f[q0:q1], out=work.view(-1, width, vocab)
                )
                torch.sum(prod, -1, out=out["fz"][a:b].view(-1, width))
            if z_t is not None:
                for t in range(z_t.shape[1]):
                    # ties count against the target, as in target_rank
                    greater = torch.ge(zb, z_t[a:b, t : t + 1], out=work)
                    torch.sum(greater, -1, out=out["greater"][a:b, t])
        for key, probs, rows_per in (("pz", keep, n), ("fz", p_f, c)):
            if key in out and bool(torch.isnan(out[key]).any()):
                self._zero_times_minus_inf(out[key], z, probs, rows_per)
        total, p_top = out.pop("total"), out.pop("p_top")
        out["lse"] = z.gather(1, top).squeeze(1) - p_top.log() + total.log()
        if entropy and keep is None:  # kept probabilities were normalised before the products
            out["pz"].div_(total)
        return out

    def _zero_times_minus_inf(
        self, dots: Float[Tensor, " n"], z: Float[Tensor, "n vocab"], p_f: Tensor | None, c: int
    ) -> None:
        """Redo, in place, the products ``<p, z>`` that came out NaN: ``p`` is ``p_f``'s row
        ``i % c`` for row ``i``, or when ``p_f`` is None the softmax, as in the sweep before its
        division by the sum.

        A zero probability at a ``-inf`` logit gives ``0 * -inf = NaN``; in an entropy or a KL it
        counts as 0 (the limit of ``p log p``). Models rarely have such logits, so the sweep
        leaves them out and only the rows that came out NaN are redone, a block at a time.
        """
        bad = torch.isnan(dots).nonzero().flatten()
        inf = float("inf")
        for s in range(0, bad.shape[0], self._rows):
            rows = bad[s : s + self._rows]
            zr = z[rows]
            work = self._probs[: rows.shape[0]]
            if p_f is None:  # as in the sweep: products with the softmax, divided by its sum later
                torch.mul(torch.softmax(zr, -1, out=work), zr, out=work)
            else:
                torch.mul(zr, p_f[rows % c], out=work)
            dots[rows] = work.nan_to_num_(nan=0.0, posinf=inf, neginf=-inf).sum(-1)

    def _stats(
        self, z: Tensor, p_f: Tensor, a_f: Tensor, ids: Tensor, top_k: int
    ) -> dict[str, Tensor]:
        """Statistics of ``z [g*c, V]`` (g entries x c queries) against the final ``p_f [c, V]``.

        Entropy ``H = lse - <p, z>`` and ``KL(final || lens) = <p_f, log p_f> - <p_f, z> + lse``
        need one softmax and two row-wise dot products, no log-probability tensor.
        """
        c, n = p_f.shape[0], z.shape[0]
        top_values, top_ids = _top_k(z, top_k)
        z_t = z.gather(1, ids.clamp(min=0).repeat(n // c, 1).to(z.device))  # [g*c, T]
        sweep = self._sweep(z, top_ids[:, :1], p_f=p_f, z_t=z_t if z_t.shape[1] else None)
        kl = (a_f.repeat(n // c) - sweep["fz"] + sweep["lse"]).clamp(min=0.0)
        return _collect(top_values, top_ids, sweep, kl, z_t)

    def _decode_final(
        self, zf: Tensor, ids: Tensor, top_k: int, as_entry: bool
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """``sum p_f log p_f`` of the final logits ``zf [c, V]``, whose probabilities go into the
        final buffer, and with ``as_entry`` their statistics as an entry (KL 0: no second decode)."""
        top_values, top_ids = _top_k(zf, top_k if as_entry else 1)
        z_t = zf.gather(1, ids.clamp(min=0).to(zf.device))
        keep = self._final[: zf.shape[0]]
        sweep = self._sweep(
            zf, top_ids[:, :1], keep=keep, z_t=z_t if as_entry and z_t.shape[1] else None
        )
        a_f = sweep["pz"] - sweep["lse"]  # sum p_f log p_f (p_f normalised: no division by s)
        if not as_entry:
            return a_f, None
        return a_f, _collect(top_values, top_ids, sweep, torch.zeros_like(a_f), z_t)

    def grid(
        self,
        vecs: list[Float[Tensor, "n d_model"]],
        final: Float[Tensor, "n d_model"],
        ids: Int[Tensor, "n targets"],
        top_k: int,
        names: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """Full statistics of every entry's vectors, each ``[n, E, ...]``.

        Keys: ``top_ids``, ``top_probs`` ``[n, E, top_k]``; ``entropy``, ``kl`` ``[n, E]``;
        ``rank``, ``logprob`` ``[n, E, T]`` of the token ids ``ids`` (-1 = none, ignored later).
        ``final`` holds the last block's output at the same rows, for KL(final || lens). An entry
        that is ``final`` itself (the same view of the same tensor, as the lens passes the last
        layer's ``resid_post``) is decoded once, with the final distribution. ``names`` (one per
        entry) name an entry in the error.

        Raises:
            ValueError: Logits with NaN or +inf (from the vectors or a lens's weights): a NaN
                compares false with every logit, so its target's rank would read 0 (top-1).
        """
        n = final.shape[0]
        own = next((e for e, v in enumerate(vecs) if _same_view(v, final)), None)
        others = [e for e in range(len(vecs)) if e != own]
        per = max(1, min(n, self.chunk))
        group = max(1, self.chunk // per)
        parts: list[dict[str, Tensor]] = []
        for s in range(0, n, per):
            zf = self.logits(final[s : s + per])
            c = zf.shape[0]
            a_f, final_stats = self._decode_final(zf, ids[s : s + per], top_k, own is not None)
            _check_decoded(a_f, "the model's output (the last layer)")
            cols: dict[int, dict[str, Tensor]] = {}
            if own is not None and final_stats is not None:
                cols[own] = final_stats
            for e0 in range(0, len(others), group):
                chosen = others[e0 : e0 + group]
                x = torch.cat([vecs[e][s : s + per] for e in chosen])
                stats = self._stats(self.logits(x), self._final[:c], a_f, ids[s : s + per], top_k)
                for j, e in enumerate(chosen):
                    cols[e] = {k: v[j * c : (j + 1) * c] for k, v in stats.items()}
                    _check_decoded(cols[e]["entropy"], names[e] if names else f"entry {e}")
            keys = cols[0].keys()
            parts.append({k: torch.stack([cols[e][k] for e in range(len(vecs))], 1) for k in keys})
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
                _, top = _top_k(z, 1)
                lse = self._sweep(z, top, entropy=False)["lse"]
                _check_decoded(lse, "a layer (continuation tokens)")
                rows = tok.repeat(z.shape[0] // tok.shape[0]).to(z.device)
                lp = z.gather(1, rows[:, None]).squeeze(1) - lse
                cols.append(lp.reshape(-1, tok.shape[0]))
            parts.append(torch.cat(cols).T)
        return torch.cat(parts)


def _check_decoded(values: Tensor, where: str) -> None:
    """Refuse statistics of non-finite logits (an entropy or ``sum p log p`` is NaN or infinite
    exactly when a logit is NaN or +inf; -inf logits are handled and stay finite)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"The logits decoded at {where} hold NaN or infinity, so ranks, probabilities and KL "
            "would be meaningless (a NaN logit ranks its target top-1): the residual stream or "
            "the lens's weights hold NaN/inf; check the model's activations and any "
            "intervention or lens file in use."
        )


def readout(model: Any, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... vocab"]:
    """The model's logits for residual-stream vectors ``x``, as if each were the last block's output.

    ``transform(ln_final(x) @ W_U + b_U)`` in float32: exactly the path of the model's own logits
    (the transform is the architecture's post-unembedding step, e.g. Gemma 2's soft cap; identity
    for Llama). Hooks on ``ln_final`` fire; the unembedding's weights are read directly (with a
    warning where a hook is attached there). For
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
        # On the model's device, as the logits of a non-empty input, so that a torch.cat with
        # them works.
        adapter = model_adapter(model)
        return torch.empty(*shape, adapter.d_vocab, dtype=torch.float32, device=adapter.device)
    with torch.no_grad():
        logits = Readout(model, flat.shape[0]).logits(flat)
    return logits.reshape(*shape, logits.shape[-1])
