"""Early decoding: every layer's residual stream (or a component's write) read through a lens.

With ``lens="logit"`` (the default) this is the logit lens: each vector is decoded as if it were
the last block's output. With a :class:`~mechprobe.lens._tuned.TunedLens` or a
:class:`~mechprobe.lens._patchscope.Patchscope` each vector is first translated by that lens
(:meth:`~mechprobe.lens._lens.Lens.translate`) and then decoded the same way, so every statistic
below means the same thing whatever the lens.

:func:`logit_lens` runs the prompts once through :func:`mechprobe.run`, with one small intervention
per decoded site that keeps only the vectors it will decode (never a full ``[batch, layers,
positions, vocab]`` tensor), and reads them through the model's own final norm and unembedding
(:class:`~mechprobe.core._readout.Readout`) in fixed-size chunks. Targets of several tokens are scored
by teacher forcing: the prompt is run with the target appended and each layer's lens gives the
summed log-probability of the whole target. The result is a
:class:`~mechprobe.lens._result.LensResult` (frame, figures, JSON / npz files).

Example:
    >>> import mechprobe as mp
    >>> model = mp.tiny_model()
    >>> lens = mp.logit_lens(model, ["Hello there"], targets=" you", top_k=3)
    >>> lens.top_ids.shape, lens.target_logprob.shape  # [prompt, layer, position, k], [p, l, t]
    ((1, 3, 1, 3), (1, 3, 1))
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, get_args

import numpy as np
import torch

from mechprobe.core import (
    Batch,
    Gather,
    Intervention,
    Layers,
    PaddingSide,
    PositionSpec,
    Readout,
    Site,
    SiteKind,
    SiteLike,
    StopForward,
    check_batch_size,
    check_int,
    evaluates,
    model_adapter,
    progress_bar,
    run,
    token_texts,
)
from mechprobe.lens._lens import LensSpec, as_lens
from mechprobe.lens._plan import TargetSpec, lens_entries, make_plan, normalise_targets
from mechprobe.lens._result import LensResult

__all__ = ["LensResult", "logit_lens"]


@evaluates
def logit_lens(
    model: Any,
    prompts: str | Sequence[str] | Batch,
    *,
    sites: SiteKind | SiteLike | Sequence[SiteLike] = "resid_post",
    layers: Layers = "all",
    positions: PositionSpec = -1,
    targets: TargetSpec | None = None,
    top_k: int = 10,
    batch_size: int | None = 32,
    chunk_size: int = 256,
    padding_side: PaddingSide = "right",
    lens: LensSpec = "logit",
    progress: bool = True,
) -> LensResult:
    """Decode each layer's activations through a lens (default: the model's final norm and
    unembedding, the logit lens).

    One forward pass (in chunks of ``batch_size`` rows) serves every layer and target; it stops
    after the last block, whose output the lens decodes itself. Each decoded vector goes through
    ``model.ln_final``, the unembedding's own ``W_U`` and ``b_U`` and the architecture's
    post-unembedding transform (identity for Llama), exactly the path of the model's logits, so
    the last layer's ``resid_post`` reproduces the model's output distribution. Vectors are decoded
    ``chunk_size`` at a time into buffers made once: peak memory holds about three
    ``[chunk_size, vocab]`` float buffers, never ``[batch, layers, positions, vocab]``. Hooks a user
    put on ``ln_final`` apply; hooks on ``unembed`` do not (its weights are read directly).

    Args:
        model: A ``TransformerBridge`` or ``HookedTransformer`` with a tokenizer.
        prompts: One prompt, a non-empty list of prompts, or a :class:`Batch` (its strings).
        sites: Site kinds decoded at every layer (``"resid_pre"``, ``"resid_mid"``,
            ``"resid_post"``, and the writes ``"attn_out"``, ``"mlp_out"``, each decoded on its
            own, final norm included), or Sites / hook names for single layers, or a list of both.
        layers: The layers a kind in ``sites`` is decoded at: an int, a range, a list (negative
            counts from the end) or ``"all"``.
        positions: Prompt positions to decode: ``-1`` (each prompt's last real token, whatever the
            padding), a list (negative counts back from the last token) or ``"all"`` (every
            prompt token, BOS included; prompts may differ in length). Positions always refer to
            the prompt, never to an appended target.
        targets: Continuations to score: a string for every prompt, one string per prompt, or a
            list of strings per prompt (several side by side, e.g. the argument and the answer).
            With a single prompt string, a list of strings is several targets for it. A target of
            several tokens is scored by teacher forcing: ``target_logprob`` is the summed
            log-probability of all its tokens under each layer's lens; ranks and probabilities are
            those of its first token. Nothing is truncated.
        top_k: Tokens kept per decoded vector, with their probabilities.
        batch_size: Rows per forward pass (None: all at once).
        chunk_size: Vectors per unembedding matmul (buffers: ~3 x chunk_size x vocab floats).
        padding_side: Padding of the batch; results do not depend on it.
        lens: ``"logit"``, a :class:`TunedLens` (its translator for each site kind and layer is
            applied before the readout) or a :class:`Patchscope` (each vector is patched into
            its target prompt, one target-prompt forward pass per vector). Tuned lenses and
            Patchscopes read the residual stream (``resid_pre``, ``resid_mid``,
            ``resid_post``); the result records the lens in ``lens``.
        progress: Show a progress bar over forward chunks.

    Returns:
        A :class:`LensResult`. Entropy and ``kl_to_final`` = KL(final || lens) are in nats; the
        final distribution is the model's own at the same position. A rank counts the other
        tokens whose logit is at least the target's (0 = top-1 alone; ties count against the
        target, so a flat readout is no hit).

    Raises:
        ValueError: Unknown or undecodable site, empty prompts or targets, a wrong number of
            targets, positions outside a prompt, or a bad ``top_k``.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> lens = mp.logit_lens(model, "Hi", positions="all", targets=[" a", " bc"], top_k=2)
        >>> lens.positions.tolist(), lens.target_logprob.shape
        ([[0, 1, 2]], (1, 3, 2))
    """
    if isinstance(prompts, Batch):  # its strings, tokenised here with the targets appended
        prompts = prompts.texts()
    one_prompt = isinstance(prompts, str)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("The prompt list is empty: pass at least one prompt string.")
    for i, p in enumerate(prompt_list):
        if not isinstance(p, str):
            raise TypeError(f"Prompt {i} is {type(p).__name__}, not str: pass strings.")
    d_vocab = model_adapter(model).d_vocab  # the logits' width (d_vocab_out where it differs)
    top_k = check_int(top_k, "top_k", 1, d_vocab)
    batch_size = check_batch_size(batch_size)
    chunk_size = check_int(chunk_size, "chunk_size", 1)
    if padding_side not in get_args(PaddingSide):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
    entries = lens_entries(model, sites, layers)
    decoder = as_lens(lens)
    decoder.check(model, entries)
    target_lists = normalise_targets(targets, len(prompt_list), one_prompt)
    plan, prompt_ids, target_ids = make_plan(
        model, prompt_list, target_lists, positions, padding_side
    )
    for b, group in enumerate(target_ids):
        for t, target in enumerate(group):
            if any(i >= d_vocab for i in target):  # a tokenizer larger than the unembedding
                raise ValueError(
                    f"Target {target_lists[b][t]!r} has token ids {list(target)}, beyond the "
                    f"model's {d_vocab} logits (cfg.d_vocab_out): pass targets the model can "
                    "predict."
                )
    final_site = ("resid_post", int(model.cfg.n_layers) - 1)
    run_sites = [*entries, *([final_site] if final_site not in entries else [])]
    n_b, n_k = plan.grid.shape
    n_e, n_t = len(entries), plan.first_ids.shape[1]
    nan = float("nan")
    top_ids = torch.full((n_b, n_e, n_k, top_k), -1, dtype=torch.long)
    # float32 whatever torch's default dtype: the readout's statistics are float32.
    f32 = torch.float32
    top_probs = torch.full((n_b, n_e, n_k, top_k), nan, dtype=f32)
    entropy = torch.full((n_b, n_e, n_k), nan, dtype=f32)
    kl = torch.full((n_b, n_e, n_k), nan, dtype=f32)
    rank = torch.full((n_b, n_e, n_k, n_t), -1, dtype=torch.long)
    logprob = torch.full((n_b, n_e, n_k, n_t), nan, dtype=f32)
    cont_lp = torch.zeros((n_b, n_e, n_t), dtype=f32)
    readout = Readout(model, chunk_size)
    q_b, q_k = np.nonzero(plan.grid >= 0)
    q_row = plan.row_of_prompt[q_b]
    with torch.no_grad():
        for rows, chunk in progress_bar(
            list(plan.batch.chunks(batch_size)), progress=progress, desc="lens"
        ):
            grid_here = (q_row >= rows.start) & (q_row < rows.stop)
            cont_here = (plan.cont[:, 0] >= rows.start) & (plan.cont[:, 0] < rows.stop)
            gb, gk = q_b[grid_here], q_k[grid_here]
            cont = plan.cont[cont_here]
            local = np.concatenate([q_row[grid_here], cont[:, 0]]) - rows.start
            pos = np.concatenate([plan.grid[gb, gk], cont[:, 1]])
            local_t = torch.as_tensor(local, dtype=torch.long)
            cols = chunk.offset[local_t] + torch.as_tensor(pos, dtype=torch.long)
            gathers = [
                Gather(rows=local_t, cols=cols, stop=site == final_site) for site in run_sites
            ]
            spec: dict[SiteLike, Intervention | Sequence[Intervention]] = {
                Site(kind, layer): g  # type: ignore[arg-type]
                for (kind, layer), g in zip(run_sites, gathers, strict=True)
            }
            with contextlib.suppress(StopForward):
                run(model, chunk, spec, logit_positions=-1, batch_size=None)
            vecs = [g.value for g in gathers if g.value is not None]
            if len(vecs) != len(gathers):  # a hook that never fired would shift every entry
                raise RuntimeError("A lens site was not reached in the forward pass.")
            n_g = len(gb)
            # The reference is the model's own output: the last layer as it is, before a lens
            # (a Patchscope reading it into another layer or prompt) translates it as an entry.
            final = vecs[run_sites.index(final_site)][:n_g]
            # Each entry's vectors through the lens (the logit lens returns them unchanged).
            vecs[:n_e] = [
                decoder.translate(model, kind, layer, v)
                for (kind, layer), v in zip(entries, vecs[:n_e], strict=True)
            ]
            if n_g:
                ids = torch.as_tensor(plan.first_ids[gb])
                grid_vecs = [v[:n_g] for v in vecs[:n_e]]
                names = [f"{kind} layer {layer}" for kind, layer in entries]
                stats = readout.grid(grid_vecs, final, ids, top_k, names)
                b_t, k_t = torch.as_tensor(gb), torch.as_tensor(gk)
                top_ids[b_t, :, k_t] = stats["top_ids"].cpu()
                top_probs[b_t, :, k_t] = stats["top_probs"].cpu()
                entropy[b_t, :, k_t] = stats["entropy"].cpu()
                kl[b_t, :, k_t] = stats["kl"].cpu()
                rank[b_t, :, k_t] = stats["rank"].cpu()
                logprob[b_t, :, k_t] = stats["logprob"].cpu()
            if len(cont):
                tokens = torch.as_tensor(cont[:, 2])
                lp = readout.token_logprobs([v[n_g:] for v in vecs[:n_e]], tokens)
                index = (torch.as_tensor(cont[:, 3]), torch.as_tensor(cont[:, 4]))
                cont_lp.permute(0, 2, 1).index_put_(index, lp.cpu(), accumulate=True)
    missing = torch.as_tensor(plan.first_ids < 0)  # [B, T]: prompts with fewer targets
    rank[missing[:, None, None, :].expand_as(rank)] = -1
    logprob[missing[:, None, None, :].expand_as(logprob)] = nan
    last = torch.as_tensor(plan.last_col)
    rows_b = torch.arange(n_b)
    end_rank = rank[rows_b, :, last]  # [B, E, T]
    end_lp = logprob[rows_b, :, last]
    shown = slice(0, plan.shown)
    used = {int(i) for i in top_ids[:, :, shown].unique().tolist() if i >= 0}
    used |= {i for group in target_ids for ids in group for i in ids}
    order = sorted(used)
    texts = token_texts(model.tokenizer, order)
    return LensResult(
        prompts=tuple(prompt_list),
        prompt_tokens=tuple(tuple(token_texts(model.tokenizer, ids)) for ids in prompt_ids),
        sites=tuple(kind for kind, _ in entries),
        layers=tuple(layer for _, layer in entries),
        positions=plan.grid[:, shown].copy(),
        top_ids=top_ids[:, :, shown].cpu().numpy(),
        top_probs=top_probs[:, :, shown].cpu().numpy(),
        entropy=entropy[:, :, shown].cpu().numpy(),
        kl_to_final=kl[:, :, shown].cpu().numpy(),
        targets=tuple(tuple(group) for group in target_lists),
        target_tokens=tuple(tuple(tuple(ids) for ids in group) for group in target_ids),
        position_rank=rank[:, :, shown].cpu().numpy(),
        position_prob=logprob[:, :, shown].exp().cpu().numpy(),
        target_rank=end_rank.cpu().numpy(),
        target_prob=end_lp.exp().cpu().numpy(),
        target_logprob=(end_lp + cont_lp).cpu().numpy(),
        token_text=dict(zip(order, texts, strict=True)),
        model_name=str(getattr(model.cfg, "model_name", "")),
        model_dtype=model_adapter(model).dtype_name,
        lens=decoder.describe(),
    )
