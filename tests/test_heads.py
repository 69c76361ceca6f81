"""Head-level patching and ablation (z, q, k, v, pattern, head output) against hand-written hooks on
a grouped-query tiny model, and against TransformerLens's own head patchers without GQA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

import mechprobe as mp
from mechprobe.core import keyed_seed, model_adapter, query_heads
from mechprobe.patching._engine import control_key, unit_vectors
from tests.conftest import hook_count

CLEAN, CORRUPT = "A cat sat", "A bat sat"  # differ at position 3 (BOS first)
DIFF_POS = 3
ANS, WRONG = 100, 101
METRIC = mp.logit_diff(ANS, WRONG)
KINDS = ("head", "q", "k", "v", "pattern", "head_out")


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, ANS] - logits[:, -1, WRONG]


@pytest.fixture(scope="module")
def mha():
    """The tiny model without grouped-query attention (4 query heads, 4 key/value heads)."""
    return mp.tiny_model(seed=1, n_kv_heads=4)


def _hand_patch(model, site: mp.Site, position: int) -> float:
    """Denoising one head cell with plain TransformerLens hooks and one forward pass."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        layer, h, p = site.layer, site.head, position
        if site.kind == "head_out":
            w_o = model.blocks[layer].attn.W_O[h]
            seen = {}

            def keep(z, hook):
                seen["z"] = z

            def write(out, hook):
                out = out.clone()
                change = (cache[f"blocks.{layer}.attn.hook_z"][:, p, h] - seen["z"][:, p, h]) @ w_o
                out[:, p] += change
                return out

            hooks = [
                (f"blocks.{layer}.attn.hook_z", keep),
                (f"blocks.{layer}.hook_attn_out", write),
            ]
        else:

            def write(act, hook):
                act = act.clone()
                if site.kind == "pattern":  # [batch, head, query, key]
                    act[:, h, p] = cache[hook.name][:, h, p]
                else:  # [batch, pos, head, d_head]
                    act[:, p, h] = cache[hook.name][:, p, h]
                return act

            hooks = [(site.hook_name, write)]
        logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
    return float(_metric(logits)[0])


@pytest.mark.parametrize("kind", KINDS)
def test_head_kinds_equal_hand_written_hooks_on_gqa(tiny, kind, cell_packing):
    res = mp.patch(tiny, CLEAN, CORRUPT, kind, [DIFF_POS, -1], METRIC, n_random=0)
    seq = tiny.to_tokens(CLEAN).shape[1]
    adapter = model_adapter(tiny)  # the Llama-style tiny models: 4 query heads, 2 key/value heads
    n_heads = adapter.n_kv_heads if kind in ("k", "v") else adapter.n_heads
    assert len(res.sites) == tiny.cfg.n_layers * n_heads
    expected = np.array(
        [
            [_hand_patch(tiny, mp.Site(k, layer, head=h), p) for p in (DIFF_POS, seq - 1)]
            for k, layer, h in zip(res.kinds, res.layers, res.heads, strict=True)
        ]
    )
    assert np.abs(expected - res.corrupt_metric).max() > 0.01  # some cell moves the metric
    np.testing.assert_allclose(res.values, expected, atol=1e-5)
    unpacked = mp.patch(
        tiny, CLEAN, CORRUPT, kind, [DIFF_POS, -1], METRIC, n_random=0, packed=False
    )
    np.testing.assert_allclose(unpacked.values, expected, atol=1e-5)


def test_head_out_equals_z_patching(tiny):
    # A head's write is z @ W_O[head]: patching either gives the same numbers.
    z = mp.patch(tiny, CLEAN, CORRUPT, "head", "all", METRIC, n_random=0)
    out = mp.patch(tiny, CLEAN, CORRUPT, "head_out", "all", METRIC, n_random=0)
    np.testing.assert_allclose(out.values, z.values, atol=1e-5)


@pytest.mark.parametrize("positions", [-1, None])
def test_head_out_beside_attn_out_and_z_cells_in_one_pass(tiny, positions):
    # Other cells' attn_out and z writes share head_out's forward pass (other rows): the check
    # that a head's write is z @ W_O read their rows and refused the call (off by 0.6 to 1.2).
    sites = ["attn_out", "head", "head_out"]
    for name in ("patch", "ablate_cells"):
        run = getattr(mp, name)
        args = (CLEAN, CORRUPT) if name == "patch" else ([CLEAN, "A dog ran far"],)
        together = run(tiny, *args, sites, positions, METRIC, n_random=1)
        alone = run(tiny, *args, sites, positions, METRIC, n_random=1, cells_per_batch=1)
        np.testing.assert_allclose(together.values, alone.values, atol=1e-5)
        np.testing.assert_allclose(together.random, alone.random, atol=1e-5)
        n = tiny.cfg.n_heads * tiny.cfg.n_layers
        head, head_out = together.values[-2 * n : -n], together.values[-n:]
        np.testing.assert_allclose(head_out, head, atol=1e-5)  # z @ W_O, either way


@pytest.mark.parametrize("kind", ["k", "v"])
def test_a_key_value_head_feeds_exactly_its_query_heads(tiny, kind):
    tokens = tiny.to_tokens(CLEAN)
    adapter = model_adapter(tiny)
    group = adapter.n_heads // adapter.n_kv_heads  # query heads per key/value head (1: no GQA)
    layer, kv_head = 1, 1
    site = mp.Site(kind, layer, head=kv_head)
    fed = tuple(range(kv_head * group, (kv_head + 1) * group))
    assert query_heads(tiny, site) == fed  # Llama-style tiny models: (2, 3) of 4 query heads
    others = [h for h in range(adapter.n_heads) if h not in fed]
    before, after = mp.Capture(), mp.Capture()
    with torch.no_grad():
        with mp.intervene(tiny, {f"blocks.{layer}.attn.hook_z": before}):
            tiny(tokens)
        noise = torch.randn(adapter.d_head, generator=torch.Generator().manual_seed(0))
        spec = {site: mp.Replace(noise, positions=1), f"blocks.{layer}.attn.hook_z": after}
        with mp.intervene(tiny, spec):
            tiny(tokens)
    changed = (after.value - before.value).abs().amax(dim=(0, 1, 3))  # per query head
    assert changed[others].max() == 0
    assert changed[list(fed)].min() > 1e-3


def _tl_index(model, positions, pattern):
    """TransformerLens's index for its by-position head patchers: (layer, pos, head), except for
    patterns, which it indexes (layer, head, destination position)."""
    rows = [
        (layer, h, p) if pattern else (layer, p, h)
        for layer in range(model.cfg.n_layers)
        for p in positions
        for h in range(model.cfg.n_heads)
    ]
    columns = ["layer", "head_index", "dest_pos"] if pattern else ["layer", "pos", "head_index"]
    return pd.DataFrame(rows, columns=columns)


@pytest.mark.parametrize("kind", ["head", "q", "k", "v", "pattern"])
def test_equals_transformerlens_head_patching_without_gqa(mha, kind):
    name = {"head": "out"}.get(kind, kind)
    theirs = getattr(tl_patching, f"get_act_patch_attn_head_{name}_by_pos")
    clean, corrupt = mha.to_tokens(CLEAN), mha.to_tokens(CORRUPT)
    seq = clean.shape[1]
    positions = [DIFF_POS, seq - 1]
    index = _tl_index(mha, positions, pattern=kind == "pattern")
    with torch.no_grad():
        _, cache = mha.run_with_cache(clean)
        tl = theirs(
            mha,
            corrupt,
            cache,
            lambda logits: _metric(logits)[0],
            index_axis_names=None,
            index_df=index,
        )
    res = mp.patch(mha, clean, corrupt, kind, positions, METRIC, n_random=0)
    ours = {
        (layer, p, h): res.values[r, c]
        for r, (layer, h) in enumerate(zip(res.layers, res.heads, strict=True))
        for c, p in enumerate(positions)
    }
    cells = index.itertuples(index=False)
    if kind == "pattern":
        expected = [ours[(int(a), int(p), int(h))] for a, h, p in cells]
    else:
        expected = [ours[(int(a), int(p), int(h))] for a, p, h in cells]
    assert float(tl.abs().max()) > 0.01
    np.testing.assert_allclose(np.asarray(tl), expected, atol=1e-5)


def test_random_control_moves_the_same_distance_in_a_seeded_direction(tiny):
    site = mp.Site("mlp_out", 1)
    res = mp.patch(tiny, CLEAN, CORRUPT, site, -1, METRIC, n_random=2, seed=7)
    assert res.random.shape == (2, 1, 1, 1)
    clean, corrupt = tiny.to_tokens(CLEAN), tiny.to_tokens(CORRUPT)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(clean)
        for j in range(2):
            # Control j of the pair: seed 7 + j keyed by the pair's token ids and the cell
            # (the site at the corrupt run's last position).
            cell = control_key(site, corrupt.shape[1] - 1)
            key = keyed_seed(7 + j, [clean[0], corrupt[0]], cell)
            unit = unit_vectors(key, [tiny.cfg.d_model])[0]

            def write(act, hook, unit=unit):
                act = act.clone()
                distance = (cache[hook.name][0, -1] - act[0, -1]).norm()
                act[0, -1] = act[0, -1] + unit * distance
                return act

            logits = tiny.run_with_hooks(corrupt, fwd_hooks=[(site.hook_name, write)])
            np.testing.assert_allclose(res.random[j, 0, 0, 0], float(_metric(logits)[0]), atol=1e-5)
    assert res.random[0, 0, 0, 0] != res.random[1, 0, 0, 0]
    # Where clean and corrupt agree (before the changed token), the patch moves nothing, and nor
    # does its control.
    early = mp.patch(tiny, CLEAN, CORRUPT, mp.Site("resid_pre", 0), [1], METRIC, n_random=3)
    np.testing.assert_allclose(early.random[:, 0, 0, 0], early.corrupt_metric, atol=1e-5)


def test_a_cells_controls_do_not_depend_on_the_other_cells_run(tiny):
    """Review 42a S1: a cell's random controls were drawn in cell order from one generator per
    pair, so patching mlp_out@1 alone gave other controls than patching it beside mlp_out@0, or
    at -1 beside -2; re-running a subset of cells to check a number gave other controls.
    Each cell now draws from the pair's tokens and its own key, as causal tracing's do."""
    pairs = (["A cat sat on", "The dog ran to"], ["A bat sat on", "The fog ran to"])
    kw = {"n_random": 2, "seed": 5, "progress": False}

    one = mp.Site("mlp_out", 1)
    runs = {
        "patch": lambda sites, pos: mp.patch(tiny, *pairs, sites, pos, METRIC, **kw),
        "ablate_cells": lambda sites, pos: mp.ablate_cells(tiny, pairs[0], sites, pos, METRIC,
                                                           **kw),
        "attribution_patch": lambda sites, pos: mp.attribution_patch(tiny, *pairs, sites, pos,
                                                                     METRIC, **kw),
    }  # fmt: skip
    for name, run in runs.items():
        alone = run([one], [-1])
        wide = run([mp.Site("mlp_out", 0), one, mp.Site("head", 1, head=2)], [-2, -1])
        # the same directions: equal up to the rounding of other rows in the forward pass
        np.testing.assert_allclose(
            alone.random[..., 0, 0], wide.random[..., 1, 1], atol=1e-5, rtol=0, err_msg=name
        )
        assert not np.allclose(wide.random[..., 1, 1], wide.random[..., 1, 0]), name
    heads = mp.attribution_patch(tiny, *pairs, "head", [-1], METRIC, layers=[1], **kw)
    head = mp.attribution_patch(tiny, *pairs, mp.Site("head", 1, head=2), [-1], METRIC, **kw)
    np.testing.assert_allclose(heads.random[..., 2, 0], head.random[..., 0, 0], atol=1e-5)
    senders = [mp.Site("head", 0, head=1), mp.Site("head", 1, head=0)]
    path = lambda s: mp.path_patch(tiny, *pairs, s, "final", METRIC, positions=[-1], **kw)  # noqa: E731
    np.testing.assert_allclose(path(senders[1:]).random[..., 0, 0],
                               path(senders).random[..., 1, 0], atol=1e-5)  # fmt: skip


def test_controls_and_spread_do_not_depend_on_chunking(tiny, cell_packing):
    clean, corrupt = [CLEAN, "A dog ran"], [CORRUPT, "A fog ran"]
    packs = model_adapter(tiny).packs_rows  # a HookedTransformer runs one sequence per row
    runs = [
        mp.patch(tiny, clean, corrupt, k, [-1, 2], METRIC, cells_per_batch=n, packed=packed)
        for k, n, packed in [("q", 1, packs), ("q", 1000, packs), ("q", 7, False)]
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other.random, runs[0].random, atol=1e-5)
        np.testing.assert_allclose(other.per_pair, runs[0].per_pair, atol=1e-5)
    first = runs[0]
    np.testing.assert_allclose(first.spread, first.per_pair.std(axis=0, ddof=1))
    frame = first.to_frame()
    np.testing.assert_allclose(frame["random_value"], first.random.mean(axis=(0, 1)).ravel())
    assert {"spread", "random_value"} <= set(first.summary().columns)


@pytest.mark.parametrize("kind", ["head", "v", "pattern", "head_out", "mlp_out"])
@pytest.mark.parametrize("method", ["zero", "mean"])
def test_ablate_cells_equals_one_intervention_at_a_time(tiny, kind, method, cell_packing):
    prompts = [CLEAN, "A dog ran far"]
    reference = ["Some other text", "A cat sat", "Hello there world"]
    layers = [1]
    res = mp.ablate_cells(
        tiny, prompts, kind, [-1, 2], METRIC, method=method, reference=reference, layers=layers
    )
    ref_batch = mp.tokenize(tiny, reference)
    for r, (layer, h) in enumerate(zip(res.layers, res.heads, strict=True)):
        site = mp.Site(kind, layer, head=h)  # type: ignore[arg-type]
        if method == "mean" and kind != "pattern":
            cap = mp.run(tiny, ref_batch, capture=[site], logit_positions=-1)[site]
            real = ref_batch.attention_mask.bool()
            real[:, 0] = False  # BOS is no part of the text: left out of the mean
            value = cap[real].double().mean(0).float()
        for c, pos in enumerate([-1, 2]):
            for i, prompt in enumerate(prompts):
                batch = mp.tokenize(tiny, [prompt])
                p = pos % int(batch.lengths[0])
                if method == "zero":
                    intervention = mp.Ablate("zero", positions=[p])
                elif kind == "pattern":
                    pat = mp.run(
                        tiny, reference, capture=[site], logit_positions=-1, batch_size=None
                    )
                    long_enough = ref_batch.lengths > p
                    row = pat[site][long_enough, p, : p + 1].double().mean(0).float()
                    full = torch.zeros(int(batch.lengths[0]))
                    full[: p + 1] = row
                    intervention = mp.Replace(full, positions=[p])
                else:
                    intervention = mp.Replace(value, positions=[p])
                out = mp.run(tiny, batch, {site: intervention}, logit_positions=-1)
                expected = float(out.logits[0, 0, ANS] - out.logits[0, 0, WRONG])
                np.testing.assert_allclose(res.per_pair[i, r, c], expected, atol=1e-5)
    assert res.direction == f"{method}-ablation" and np.isnan(res.corrupt).all()
    assert np.isfinite(res.random).all()
    np.testing.assert_allclose(res.effect, res.values - res.clean.mean())


def test_head_sites_validate_against_the_model(tiny):
    n_kv = model_adapter(tiny).n_kv_heads
    with pytest.raises(ValueError, match=f"{n_kv} key/value heads"):
        mp.patch(tiny, CLEAN, CORRUPT, mp.Site("k", 0, head=n_kv), -1, METRIC)
    # A query head's number for its keys: the message names the key/value head it reads
    # (query heads 2 and 3 read key/value head 1 of 2; review 33b F5).
    n_q = model_adapter(tiny).n_heads
    if n_kv < n_q:
        kv = (n_q - 1) // (n_q // n_kv)
        with pytest.raises(
            ValueError, match=rf"reads key/value head {kv}: Site\('v', 0, head={kv}\)"
        ):
            mp.patch(tiny, CLEAN, CORRUPT, mp.Site("v", 0, head=n_q - 1), -1, METRIC)
    with pytest.raises(ValueError, match="needs head="):
        mp.Site("pattern", 0)
    with pytest.raises(ValueError, match="same index"):
        mp.patch(tiny, "A cat", "A big cat", "pattern", [-1], METRIC)
    with pytest.raises(ValueError, match="n_random"):
        mp.patch(tiny, CLEAN, CORRUPT, "q", -1, METRIC, n_random=-1)


def test_head_out_refuses_a_norm_after_attention():
    gemma = mp.tiny_model(architecture="gemma2")
    with torch.no_grad():
        gemma(gemma.to_tokens("Hi"))  # the bridge adds its own hooks on a first pass
    before = hook_count(gemma)
    with (
        pytest.raises(ValueError, match="not the sum of its heads"),
        torch.no_grad(),
        mp.intervene(gemma, {mp.Site("head_out", 0, head=1): mp.Ablate()}),
    ):
        gemma(gemma.to_tokens("Hi"))
    assert hook_count(gemma) == before
    # patch() edits head_out in its own engine: it refused nothing and returned numbers up to
    # 0.35 away from patching the heads' z (which agree to 1e-6 on the Llama model).
    for packed in (True, False):
        with pytest.raises(ValueError, match="not the sum of its heads"):
            mp.patch(gemma, CLEAN, CORRUPT, "head_out", -1, METRIC, packed=packed)
    assert hook_count(gemma) == before


@pytest.mark.integration
def test_smollm2_key_value_heads_against_hand_written_hooks(smollm2):
    """SmolLM2's 3 key/value heads per layer: a k patch names one and changes what its three
    query heads read; the batched values equal one hand-hooked forward pass per cell."""
    clean = "Q: What is the capital of France?\nA:"
    corrupt = "Q: What is the capital of Poland?\nA:"
    metric = mp.logit_diff(" Paris", " Warsaw")
    paris, warsaw = (
        smollm2.tokenizer(a, add_special_tokens=False)["input_ids"][0]
        for a in (" Paris", " Warsaw")
    )
    res = mp.patch(smollm2, clean, corrupt, "k", -1, metric, n_random=0, progress=False)
    assert res.values.shape == (30 * 3, 1)
    assert query_heads(smollm2, mp.Site("k", 0, head=2)) == (6, 7, 8)
    clean_t, corrupt_t = smollm2.to_tokens(clean), smollm2.to_tokens(corrupt)
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(clean_t)
        for layer, head in [(0, 1), (14, 0), (29, 2)]:

            def write(k, hook, head=head):
                k = k.clone()
                k[:, -1, head] = cache[hook.name][:, -1, head]
                return k

            logits = smollm2.run_with_hooks(
                corrupt_t, fwd_hooks=[(f"blocks.{layer}.attn.hook_k", write)]
            )
            expected = float(logits[0, -1, paris] - logits[0, -1, warsaw])
            np.testing.assert_allclose(res.values[3 * layer + head, 0], expected, atol=1e-4)
