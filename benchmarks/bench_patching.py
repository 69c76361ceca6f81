"""Activation patching: batched cells against TransformerLens's one forward pass per cell.

Both sweeps run in full on TransformerLens's side as on ours (no figure is scaled from a subset):
``mlp_out`` at the last position of every layer, and ``resid_pre`` at every layer x every
position of a one-shot pair (390 cells, ``get_act_patch_resid_pre``: about 20 s). Each pair of
numbers is compared cell by cell.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch
from transformer_lens import patching as tl_patching

import mechprobe as mp

SHOTS = (
    "Q: What is the capital of Japan?\nA: Tokyo\n"
    "Q: What is the capital of Chile?\nA: Santiago\n"
    "Q: What is the capital of Kenya?\nA: Nairobi\n"
)
CLEAN = SHOTS + "Q: What is the capital of France?\nA:"
CORRUPT = SHOTS + "Q: What is the capital of Poland?\nA:"


ONE_SHOT_CLEAN = "Q: What is the capital of France?\nA:"
ONE_SHOT_CORRUPT = "Q: What is the capital of Poland?\nA:"


def _tl_seconds(ctx: Any, model: Any, clean: str, corrupt: str, n_cells: int) -> tuple[float, Any]:
    """TransformerLens: clean run_with_cache + get_act_patch_mlp_out over ``n_cells`` layers at
    the last position (one forward per cell). Returns (seconds, values)."""
    clean_t, corrupt_t = model.to_tokens(clean), model.to_tokens(corrupt)
    seq = clean_t.shape[1]
    paris, warsaw = (
        model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (" Paris", " Warsaw")
    )
    index = pd.DataFrame({"layer": range(n_cells), "pos": [seq - 1] * n_cells})

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, paris] - logits[0, -1, warsaw]

    def sweep() -> torch.Tensor:
        with torch.no_grad():
            cache = model.run_with_cache(clean_t)[1]
            # TL asserts index_axis_names is None whenever an index_df is given.
            return tl_patching.get_act_patch_mlp_out(
                model, corrupt_t, cache, tl_metric, index_axis_names=None, index_df=index
            )

    return ctx.time(sweep, repeat=1), sweep()


def run(ctx: Any) -> list[dict[str, Any]]:
    model = ctx.model
    n = model.cfg.n_layers
    metric = mp.logit_diff(" Paris", " Warsaw")
    seq = model.to_tokens(CLEAN).shape[1]

    def ours() -> mp.PatchResult:
        # The same cells as TL (no random controls: n_random=3 by default runs 4x the cells).
        return mp.patch(model, CLEAN, CORRUPT, "mlp_out", -1, metric, n_random=0)

    t_tl, theirs = _tl_seconds(ctx, model, CLEAN, CORRUPT, n)
    t_ours = ctx.time(ours, repeat=5)
    diff = float((theirs - torch.tensor(ours().values[:, 0])).abs().max())
    rows = [
        {
            "benchmark": f"patch mlp_out, {n} layers x last position (France/Poland 3-shot, "
            f"{seq} tokens)",
            "ratio": t_tl / t_ours,
            "baseline": "speed-up: TL (run_with_cache + get_act_patch_mlp_out) time / ours",
            "target": ">= 10",
            "detail": f"TL {t_tl:.2f} s, ours {t_ours:.3f} s; max |TL - ours| = {diff:.1e} "
            f"(logit diffs up to {float(theirs.abs().max()):.1f})",
        }
    ]
    # Every layer x every position of resid_pre (one-shot pair): all cells on both sides.
    one_seq = model.to_tokens(ONE_SHOT_CLEAN).shape[1]
    forward = ctx.forward_seconds([ONE_SHOT_CLEAN, ONE_SHOT_CORRUPT])
    start = time.perf_counter()
    grid = mp.patch(model, ONE_SHOT_CLEAN, ONE_SHOT_CORRUPT, "resid_pre", "all", metric, n_random=0)
    t_grid = time.perf_counter() - start
    t_tl_grid, tl_grid = _tl_resid_pre_seconds(model, ONE_SHOT_CLEAN, ONE_SHOT_CORRUPT)
    grid_diff = float((tl_grid - torch.tensor(grid.values)).abs().max())
    cells = grid.values.size
    rows.append(
        {
            "benchmark": f"patch resid_pre, {n} layers x all {one_seq} positions "
            f"({cells} cells, one-shot pair)",
            "ratio": t_grid / forward,
            "baseline": "plain forward of the pair",
            "target": f"< {cells} (TL: one forward per cell)",
            "detail": f"ours {t_grid:.1f} s, forward {forward * 1000:.0f} ms",
        }
    )
    rows.append(
        {
            "benchmark": f"TL get_act_patch_resid_pre, all {cells} cells ({n} layers x "
            f"{one_seq} positions)",
            "ratio": t_tl_grid / t_grid,
            "baseline": "speed-up: TL time / ours (both sweeps run in full)",
            "target": ">= 1",
            "detail": f"TL {t_tl_grid:.1f} s ({tl_grid.numel()} forward passes, one run), ours "
            f"{t_grid:.1f} s; max |TL - ours| = {grid_diff:.1e} over all cells",
        }
    )
    rows += [
        _heads_row(ctx, model),
        _attribution_row(ctx, model),
        _attribution_pairs_row(ctx, model),
    ]
    rows.append(_long_prompt_row(ctx, model))
    return rows


LONG_TOKENS = 256


def _attribution_pairs_row(ctx: Any, model: Any, n_pairs: int = 32) -> dict[str, Any]:
    """Attribution patching of ``n_pairs`` capital pairs (each country's prompt against the next
    country's), pairs run together where their lengths agree (the default ``batch_size``),
    against one pair a pass and against a plain forward of all the prompts."""
    items = mp.load_task("capitals").items[: n_pairs + 1]
    prompts = [f"Q: What is the capital of {item.input}?\nA:" for item in items]
    clean, corrupt = prompts[:-1], prompts[1:]
    # each answer's first token (several capitals are two tokens)
    first = [model.tokenizer(f" {item.output}", add_special_tokens=False)["input_ids"][0]
             for item in items]  # fmt: skip
    metric = mp.logit_diff(first[:-1], first[1:])
    sites = ["resid_pre", "head_out", "mlp_out"]
    forward = ctx.forward_seconds(clean + corrupt)

    def ours(batch_size: int | None) -> mp.PatchResult:
        return mp.attribution_patch(
            model, clean, corrupt, sites, [-3, -2, -1], metric, batch_size=batch_size,
            progress=False,
        )  # fmt: skip

    t_batched = ctx.time(lambda: ours(32), repeat=3)
    t_single = ctx.time(lambda: ours(1), repeat=1)
    batched, single = ours(32), ours(1)
    diff = float(abs(batched.values - single.values).max())
    lengths = {
        (len(model.to_tokens(a)[0]), len(model.to_tokens(b)[0]))
        for a, b in zip(clean, corrupt, strict=True)
    }
    return {
        "benchmark": f"attribution patching of {n_pairs} capital pairs (resid_pre, head_out, "
        f"mlp_out at the last 3 positions: {batched.values.size} cells, 3 random controls a "
        f"cell), pairs of one length a pass ({len(lengths)} lengths)",
        "ratio": t_batched / forward,
        "baseline": f"plain forward of the {2 * n_pairs} prompts",
        "target": "<= 5",
        "detail": f"ours {t_batched:.2f} s; one pair a pass (batch_size=1) {t_single:.2f} s, "
        f"{t_single / t_batched:.1f}x longer (max |difference| {diff:.1e}); forward "
        f"{forward * 1000:.0f} ms",
    }


def _long_prompt_row(ctx: Any, model: Any) -> dict[str, Any]:
    """Every layer at the middle position of one long pair (a held-out State of the Union text,
    one token changed at the middle), against a plain forward of it: the case review 21e found
    growing with the square of the prompt length (256 cells a pass, rows three prompts wide)."""
    ids = model.to_tokens(mp.english_text("heldout")[0])[0, : LONG_TOKENS + 1]
    corrupt = ids.clone()
    middle = LONG_TOKENS // 2
    corrupt[middle] = model.to_tokens(" the", prepend_bos=False)[0, 0]
    with torch.no_grad():
        answer = int(model(ids[None])[0, -1].argmax())
        # The corrupt run's favourite (or the clean run's second) as the other answer, so the
        # two runs' metrics differ and recovery is defined.
        wrong = model(corrupt[None])[0, -1].topk(2).indices.tolist()
    metric = mp.logit_diff(answer, wrong[0] if wrong[0] != answer else wrong[1])

    def forward() -> None:
        with torch.no_grad():
            model(ids[None])

    t_forward, m_forward = ctx.peak_memory(forward)
    t_forward = ctx.time(forward, repeat=3)
    budget = 1 << 30

    def ours() -> mp.PatchResult:
        return mp.patch(
            model, ids, corrupt, "resid_pre", [middle], metric, memory_budget=budget, progress=False
        )

    t_ours, m_ours = ctx.peak_memory(ours)
    cells = model.cfg.n_layers * 4  # with the default 3 random controls
    return {
        "benchmark": f"patch resid_pre, {model.cfg.n_layers} layers x the middle position of a "
        f"{len(ids)}-token pair ({cells} cells with the 3 controls)",
        "ratio": t_ours / t_forward,
        "baseline": "plain forward of the clean prompt",
        "target": f"<= {cells} (one forward per cell), memory <= the 1 GiB budget",
        "detail": f"ours {t_ours:.1f} s, forward {t_forward * 1000:.0f} ms; peak RSS "
        f"+{m_ours / 2**20:.0f} MiB (memory_budget 1024 MiB; a plain forward +"
        f"{m_forward / 2**20:.0f} MiB)",
    }


def _tl_resid_pre_seconds(model: Any, clean: str, corrupt: str) -> tuple[float, torch.Tensor]:
    """TransformerLens: clean run_with_cache + get_act_patch_resid_pre over every layer and
    position (one forward per cell), timed once. Returns (seconds, values [layers, pos])."""
    clean_t, corrupt_t = model.to_tokens(clean), model.to_tokens(corrupt)
    paris, warsaw = (
        model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (" Paris", " Warsaw")
    )

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, paris] - logits[0, -1, warsaw]

    start = time.perf_counter()
    with torch.no_grad():
        cache = model.run_with_cache(clean_t)[1]
        values = tl_patching.get_act_patch_resid_pre(model, corrupt_t, cache, tl_metric)
    return time.perf_counter() - start, values


def _heads_row(ctx: Any, model: Any) -> dict[str, Any]:
    """All (layer, head) cells of z at the last position against TransformerLens's
    get_act_patch_attn_head_out_by_pos (one forward per cell), restricted to that position."""
    clean_t, corrupt_t = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    seq, n_layers, n_heads = clean_t.shape[1], model.cfg.n_layers, model.cfg.n_heads
    paris, warsaw = (
        model.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in (" Paris", " Warsaw")
    )
    index = pd.DataFrame(
        [(layer, seq - 1, h) for layer in range(n_layers) for h in range(n_heads)],
        columns=["layer", "pos", "head_index"],
    )

    def tl_metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, paris] - logits[0, -1, warsaw]

    def theirs() -> torch.Tensor:
        with torch.no_grad():
            cache = model.run_with_cache(clean_t)[1]
            return tl_patching.get_act_patch_attn_head_out_by_pos(
                model, corrupt_t, cache, tl_metric, index_axis_names=None, index_df=index
            )

    def ours() -> mp.PatchResult:
        return mp.patch(
            model,
            CLEAN,
            CORRUPT,
            "head",
            -1,
            mp.logit_diff(" Paris", " Warsaw"),
            n_random=0,
            progress=False,
        )

    start = time.perf_counter()  # one run: 270 forward passes are minutes on a shared CPU
    tl_values = theirs()
    t_tl = time.perf_counter() - start
    t_ours = ctx.time(ours, repeat=3)
    diff = float((tl_values - torch.tensor(ours().values[:, 0])).abs().max())
    start = time.perf_counter()
    mp.patch(model, CLEAN, CORRUPT, "head", -1, mp.logit_diff(" Paris", " Warsaw"), progress=False)
    t_controls = time.perf_counter() - start
    return {
        "benchmark": f"patch all {len(index)} (layer, head) z cells x last position "
        f"(France/Poland 3-shot, {seq} tokens)",
        "ratio": t_tl / t_ours,
        "baseline": "speed-up: TL (run_with_cache + get_act_patch_attn_head_out_by_pos) / ours",
        "target": ">= 10",
        "detail": f"TL {t_tl:.2f} s, ours {t_ours:.3f} s (n_random=0, the same cells); "
        f"max |TL - ours| = {diff:.1e}; with the default 3 random controls per cell ours "
        f"takes {t_controls:.2f} s",
    }


ALL_KINDS = (
    "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out",
    "head", "q", "k", "v", "pattern", "head_out",
)  # fmt: skip


def _attribution_row(ctx: Any, model: Any) -> dict[str, Any]:
    """Attribution patching of every layer x position x site kind (heads included) of one pair
    against a plain forward of the pair."""
    forward = ctx.forward_seconds([ONE_SHOT_CLEAN, ONE_SHOT_CORRUPT])
    metric = mp.logit_diff(" Paris", " Warsaw")

    def ours(n_random: int) -> mp.PatchResult:
        return mp.attribution_patch(
            model,
            ONE_SHOT_CLEAN,
            ONE_SHOT_CORRUPT,
            list(ALL_KINDS),
            "all",
            metric,
            n_random=n_random,
            progress=False,
        )

    t_bare = ctx.time(lambda: ours(0), repeat=3)
    t_controls = ctx.time(lambda: ours(3), repeat=1)
    cells = ours(0).values.size
    return {
        "benchmark": f"attribution patching, every layer x position x site kind ({len(ALL_KINDS)} "
        f"kinds incl. q/k/v/pattern/head_out per head: {cells} cells), one-shot pair",
        "ratio": t_bare / forward,
        "baseline": "plain forward of the pair",
        "target": "<= 5",
        "detail": f"ours {t_bare * 1000:.0f} ms (one clean forward, one corrupt forward+backward), "
        f"{t_controls * 1000:.0f} ms with 3 random controls per cell; forward "
        f"{forward * 1000:.0f} ms",
    }
