"""Models whose attention and MLP run in parallel (GPT-NeoX / Pythia, GPT-J, Phi): both read the
block's input, so there is no resid_mid and an MLP does not read its own layer's attention.

Runs on the tiny GPT-NeoX of each model class the suite runs on (a bridge under TransformerLens
4.x, a HookedTransformer under 3.x), against the Hugging Face model and hand-written hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_KINDS, bridge_of_config

import mechprobe as mp
from mechprobe.core import _models

CLEAN, CORRUPT = "The cat sat on", "The dog ran on"
METRIC = mp.logit_diff(70, 71)


@pytest.fixture(scope="module", params=TEST_KINDS)
def neox(request):
    return mp.tiny_model(architecture="neox", kind=request.param)


def test_tiny_neox_is_pythias_layout_and_computes_the_hf_models_logits(neox):
    hf = _models._tiny_hf(0, 3, 64, "neox")[0]  # the same weights, built apart from the model
    assert neox.cfg.parallel_attn_mlp
    assert not any(name.endswith("hook_resid_mid") for name in neox.hook_dict)
    tokens = neox.to_tokens(CLEAN)
    with torch.no_grad():
        torch.testing.assert_close(neox(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)


def test_a_layer_past_the_last_is_named_not_an_index_error(neox):
    with pytest.raises(ValueError, match=r"Unknown hook name 'blocks\.99\.hook_resid_mid'"):
        mp.run(neox, CLEAN, capture="blocks.99.hook_resid_mid", progress=False)


def test_resid_mid_is_refused_with_the_reason(neox):
    # The bare "not a hook of this model" listed resid_mid among the valid kinds.
    for site in (mp.Site("resid_mid", 0), "blocks.0.hook_resid_mid"):
        with pytest.raises(ValueError, match=r"run in parallel.*Read resid_pre"):
            mp.run(neox, CLEAN, capture=[site], progress=False)


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_an_mlp_reads_no_path_from_its_own_layers_attention(neox, method):
    # Same-layer attn_out -> mlp_in paths were reported (2.19, 3.57, 3.53 on a NeoX with random
    # biases) where the MLP reads the block's input, before its attention writes anything.
    res = mp.path_patch(
        neox, CLEAN, CORRUPT, "attn_out", "mlp_in", METRIC, method=method, progress=False
    )
    values = res.values  # [senders, receivers]
    assert np.isnan(np.diag(values)).all()
    assert np.isfinite(values[np.triu_indices(3, 1)]).all()


def test_a_path_to_the_next_mlp_equals_the_hand_computation(neox):
    # attn_out@0 -> mlp_in@1: the corrupt run with only the MLP of layer 1 reading the clean
    # attention output of layer 0 in place of the corrupt one (TransformerLens hooks, by hand).
    res = mp.path_patch(neox, CLEAN, CORRUPT, "attn_out", "mlp_in", METRIC, progress=False)
    clean, corrupt = neox.to_tokens(CLEAN), neox.to_tokens(CORRUPT)
    with torch.no_grad():
        _, clean_cache = neox.run_with_cache(clean)
        _, corrupt_cache = neox.run_with_cache(corrupt)
        delta = clean_cache["blocks.0.hook_attn_out"] - corrupt_cache["blocks.0.hook_attn_out"]

        def add(act, hook):
            return act + delta

        neox.set_use_hook_mlp_in(True)  # TransformerLens hooks mlp_in only when asked to
        try:
            logits = neox.run_with_hooks(corrupt, fwd_hooks=[("blocks.1.hook_mlp_in", add)])
        finally:
            neox.set_use_hook_mlp_in(False)
    want = float(logits[0, -1, 70] - logits[0, -1, 71])
    assert res.values[0, 1] == pytest.approx(want, abs=1e-4)


def test_a_tuned_lens_trains_the_residual_kinds_the_model_has(neox):
    text = ["The cat sat on the mat and looked at the dog. " * 20]
    lens = mp.train_tuned_lens(
        neox, text, n_tokens=64, seq_len=32, tokens_per_step=32, progress=False
    )
    assert sorted(lens.layers) == ["resid_post", "resid_pre"]
    # A trajectory's no-FFN reading needs a resid_mid translator, which no training can give.
    task = mp.load_task("capitals").subset(2)
    with pytest.raises(ValueError, match=r"resid_mid translators.*run in parallel.*'logit'") as err:
        mp.trajectory(neox, task, lens=lens, progress=False)
    assert "Train one" not in str(err.value)  # the lens's advice, which cannot be followed here
    # Other lens errors pass through as they are (the parallel note was added to every one).
    small = mp.tiny_model(architecture="neox", n_layers=2, kind=TEST_KINDS[0])
    with pytest.raises(ValueError, match="was made for 3 layers") as err:
        mp.trajectory(small, task, lens=lens, progress=False)
    assert "parallel" not in str(err.value)


@pytest.fixture(scope="module")
def gptj():
    if "bridge" not in TEST_KINDS:
        pytest.skip("a TransformerBridge of GPT-J (the suite runs HookedTransformers)")
    return bridge_of_config(
        "GPTJ", "EleutherAI/gpt-j-6B", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
        n_positions=512, initializer_range=0.15, tie_word_embeddings=False,
    )  # fmt: skip


def test_patching_numbers_do_not_depend_on_packing_where_the_bridge_misreads_it(gptj):
    # GPT-J's bridge reads a packed row's mask wrongly for every segment alike: the packing
    # check compared two packed reads, agreed, and packed patching was off by up to 0.75.
    packed = mp.patch(gptj, CLEAN, CORRUPT, "attn_out", -1, METRIC, progress=False)
    plain = mp.patch(gptj, CLEAN, CORRUPT, "attn_out", -1, METRIC, packed=False, progress=False)
    np.testing.assert_allclose(packed.values, plain.values, atol=1e-5)
    assert packed.clean_metric == pytest.approx(plain.clean_metric, abs=1e-5)


def test_an_mlp_input_hook_that_never_fires_is_refused(gptj):
    # GPT-J's attention and MLP share ln1: the bridge lists hook_mlp_in and never runs it, so a
    # capture came back empty (a bare AssertionError) and a patch there changed nothing.
    with pytest.raises(ValueError, match=r"never fires.*share one norm.*use resid_pre"):
        mp.run(gptj, CLEAN, capture=mp.Site("mlp_in", 1), progress=False)
    with pytest.raises(ValueError, match="never fires"):
        mp.patch(gptj, CLEAN, CORRUPT, "mlp_in", -1, METRIC, progress=False)


def test_q_receivers_on_attention_without_split_inputs_are_refused_before_any_pass(gptj):
    # GPT-J's bridge has no per-head q/k/v input: TransformerLens's NotImplementedError came
    # from inside the patching loop, after the senders had run.
    with pytest.raises(ValueError, match=r"each head's own q/k/v input.*receivers 'final'"):
        mp.path_patch(gptj, CLEAN, CORRUPT, "head", "q", METRIC, layers=[0], receiver_layers=[1])
    assert not gptj.cfg.use_split_qkv_input


@pytest.mark.parametrize("kind", TEST_KINDS)
def test_an_mlp_in_site_inside_another_intervention_runs_no_extra_pass(kind):
    # Whether mlp_in fires was learnt from a probe forward, run during site resolution inside
    # the user's own hooks: an outer intervene's batch check saw a (1, 2) pass and refused it.
    neox = mp.tiny_model(architecture="neox", kind=kind)  # fresh: nothing learnt about it yet
    batch = mp.tokenize(neox, [CLEAN, "Hi"])
    seen = []
    outer = mp.intervene(
        neox, {mp.Site("resid_pre", 0): lambda act, hook: seen.append(act.shape)}, batch=batch
    )
    inner = mp.intervene(neox, {mp.Site("mlp_in", 0): mp.Add(torch.zeros(64))})
    with outer, inner:
        neox(batch.tokens, attention_mask=batch.attention_mask)
    assert seen == [torch.Size([*batch.tokens.shape, 64])]


def test_resid_mid_advice_names_only_sites_the_model_fires(gptj):
    with pytest.raises(ValueError, match=r"Read resid_pre \(what both read\) or resid_post"):
        mp.run(gptj, CLEAN, capture=mp.Site("resid_mid", 0), progress=False)


def test_live_mlps_pass_the_change_through_the_next_blocks_mlp(neox):
    # attn_out@0 -> mlp_in@2 with freeze_mlps=False: MLP 1 reads layer 1's input, which carries
    # attention 0's change, and passes on what it makes of it (by hand: the corrupt run with every
    # attention output frozen, attention 0's clean; MLP 2's input read there, then put into the
    # corrupt run).
    res = mp.path_patch(
        neox, CLEAN, CORRUPT, "attn_out", "mlp_in", METRIC, freeze_mlps=False, progress=False
    )
    frozen = mp.path_patch(neox, CLEAN, CORRUPT, "attn_out", "mlp_in", METRIC, progress=False)
    clean, corrupt = neox.to_tokens(CLEAN), neox.to_tokens(CORRUPT)
    with torch.no_grad():
        _, clean_cache = neox.run_with_cache(clean)
        _, corrupt_cache = neox.run_with_cache(corrupt)
        kept = {}

        def frozen_attn(act, hook):
            layer = int(hook.name.split(".")[1])
            return (clean_cache if layer == 0 else corrupt_cache)[hook.name]

        def keep(act, hook):
            kept["mlp_in"] = act.clone()

        neox.set_use_hook_mlp_in(True)  # TransformerLens hooks mlp_in only when asked to
        try:
            attn = [(f"blocks.{layer}.hook_attn_out", frozen_attn) for layer in range(3)]
            neox.run_with_hooks(corrupt, fwd_hooks=[*attn, ("blocks.2.hook_mlp_in", keep)])
            logits = neox.run_with_hooks(
                corrupt, fwd_hooks=[("blocks.2.hook_mlp_in", lambda act, hook: kept["mlp_in"])]
            )
        finally:
            neox.set_use_hook_mlp_in(False)
    want = float(logits[0, -1, 70] - logits[0, -1, 71])
    assert res.values[0, 2] == pytest.approx(want, abs=1e-4)
    assert abs(res.values[0, 2] - frozen.values[0, 2]) > 1e-4  # MLP 1 passed something on
    np.testing.assert_allclose(res.values[1, 2], frozen.values[1, 2], atol=1e-5)  # none between
