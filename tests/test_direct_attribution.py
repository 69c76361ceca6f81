"""Direct logit attribution, against the writes of a Hugging Face model read with its own forward
hooks and decoded by hand, and against TransformerLens's own ``logit_attrs``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TEST_KINDS, bridge_of_config, hf_of, hf_of_config, hook_count, tiny_of

import mechprobe as mp
from mechprobe.core import _models

PROMPTS = ["Hi there cat", "Yo", "what is it now"]
ANSWER, WRONG = [5, 40, 77], 6


def _twin(tiny, arch: str):
    """The tiny model of ``tiny``'s kind (bridge or HookedTransformer) and architecture ``arch``."""
    kind = "hooked" if mp.core.model_adapter(tiny).kind == "hooked" else "bridge"
    if arch == "llama":
        return tiny_of(kind)
    return tiny_of(f"{kind}-gpt2")


def _hf_parts(hf):
    """(embedding module, decoder layers, attention's name, output projection's name, final norm)
    of a Hugging Face Llama or GPT-2."""
    if hf.config.model_type == "llama":
        return hf.model.embed_tokens, hf.model.layers, "self_attn", "o_proj", hf.model.norm
    return None, hf.transformer.h, "attn", "c_proj", hf.transformer.ln_f


def _by_hand(hf, ids: list[int], answer: int, wrong: int) -> dict[str, float]:
    """Each write's direct effect on ``logit[answer] - logit[wrong]`` at the last token, read with
    forward hooks on the Hugging Face modules and decoded by hand in float64: the frozen-scale
    final norm of TransformerLens's ``apply_ln_to_stack``, written out."""
    _, layers, attn_name, proj_name, norm = _hf_parts(hf)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name):
        def hook(module, args, output):
            seen[name] = (output[0] if isinstance(output, tuple) else output)[0, -1].double()

        return hook

    def keep_input(name):
        def hook(module, args):
            seen[name] = args[0][0, -1].double()

        return hook

    for i, layer in enumerate(layers):
        attn = getattr(layer, attn_name)
        handles.append(attn.register_forward_hook(keep(f"attn{i}")))
        handles.append(getattr(attn, proj_name).register_forward_pre_hook(keep_input(f"z{i}")))
        handles.append(layer.mlp.register_forward_hook(keep(f"mlp{i}")))
    handles.append(norm.register_forward_pre_hook(keep_input("final")))
    try:
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():  # parameters require gradients
        x = seen["final"]
        unembed = hf.get_output_embeddings().weight.double()  # [vocab, d_model]
        direction = unembed[answer] - unembed[wrong]
        weight = norm.weight.double()
        if hf.config.model_type == "llama":
            scale = (x.pow(2).mean() + norm.variance_epsilon).sqrt()
            frozen = lambda c: weight * c / scale  # noqa: E731
            const = 0.0
        else:
            scale = (x - x.mean()).pow(2).mean().add(norm.eps).sqrt()
            frozen = lambda c: weight * (c - c.mean()) / scale  # noqa: E731
            const = float(norm.bias.double() @ direction)
        parts = {"embed": out.hidden_states[0][0, -1].double()}
        n_heads, d_model = hf.config.num_attention_heads, hf.config.hidden_size
        d_head = d_model // n_heads
        for i, layer in enumerate(layers):
            parts[f"L{i} attn"] = seen[f"attn{i}"]
            proj = getattr(getattr(layer, attn_name), proj_name)
            # Llama's o_proj is a Linear ([d_model, heads * d_head]); GPT-2's c_proj a Conv1D
            # ([heads * d_head, d_model]) with a bias.
            w_o = (
                proj.weight.double() if hf.config.model_type == "llama" else proj.weight.double().T
            )
            for h in range(n_heads):
                cols = slice(h * d_head, (h + 1) * d_head)
                parts[f"L{i}H{h}"] = w_o[:, cols] @ seen[f"z{i}"][cols]
            if getattr(proj, "bias", None) is not None:
                parts[f"L{i} attn_bias"] = proj.bias.double()
            parts[f"L{i} mlp"] = seen[f"mlp{i}"]
        values = {name: float(frozen(v) @ direction) for name, v in parts.items()}
        values["bias"] = const
        logits = out.logits[0, -1].double()
        values["total"] = float(logits[answer] - logits[wrong])
        return values


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("heads", [False, True])
def test_attributions_equal_the_hugging_face_models_own_writes_decoded_by_hand(tiny, arch, heads):
    model = _twin(tiny, arch)
    hooked = mp.core.model_adapter(model).kind == "hooked"
    # The reference is built apart from the model: every change below goes into both (a bridge
    # keeps its weights in its own Hugging Face model, a HookedTransformer in copies).
    copies = [hf_of(model)] + ([] if hooked else [model.original_model])
    generator = torch.Generator().manual_seed(7)
    # The tiny models' final norms have unit weights and zero biases: random ones make leaving
    # the weight out (as TransformerLens 4.3's logit_attrs does on a bridge) fail here.
    weight = 1 + 0.5 * torch.randn(model.cfg.d_model, generator=generator)
    norm_bias = 0.3 * torch.randn(model.cfg.d_model, generator=generator)
    with torch.no_grad():
        for hf in copies:
            final = _hf_parts(hf)[4]
            final.weight.copy_(weight)
            if getattr(final, "bias", None) is not None:
                final.bias.copy_(norm_bias)
            if arch == "gpt2":  # GPT-2's attention has an output bias; its tiny model's are zeros
                for layer in range(model.cfg.n_layers):
                    bias = torch.randn(
                        model.cfg.d_model, generator=torch.Generator().manual_seed(layer)
                    )
                    hf.transformer.h[layer].attn.c_proj.bias.copy_(bias)
        if hooked:
            model.ln_final.w.copy_(weight)
            if arch == "gpt2":
                model.ln_final.b.copy_(norm_bias)
                for layer in range(model.cfg.n_layers):
                    model.blocks[layer].attn.b_O.copy_(
                        copies[0].transformer.h[layer].attn.c_proj.bias
                    )
    res = mp.direct_logit_attribution(
        model, PROMPTS, mp.logit_diff(ANSWER, WRONG), heads=heads, batch_size=2, progress=False
    )
    hf = hf_of(model)
    assert (
        len(res.components)
        == 1 + model.cfg.n_layers * (1 + (model.cfg.n_heads + (arch == "gpt2") if heads else 1)) + 1
    )
    for i, prompt in enumerate(PROMPTS):
        want = _by_hand(hf, model.to_tokens(prompt)[0].tolist(), ANSWER[i], WRONG)
        got = dict(zip(res.components, res.attributions[i].tolist(), strict=True))
        for name, value in got.items():
            assert value == pytest.approx(want[name], abs=2e-5), (prompt, name)
        assert res.logit_diff[i] == pytest.approx(want["total"], abs=2e-5)
        # The split is exact: a row sums to the model's own logit difference.
        assert sum(got.values()) == pytest.approx(want["total"], abs=2e-5)
        assert res.answers[i] == model.tokenizer.decode([ANSWER[i]])


def test_results_do_not_depend_on_batching_or_padding(tiny):
    metric = mp.logit_diff(ANSWER, WRONG)
    one = mp.direct_logit_attribution(tiny, PROMPTS, metric, heads=True, progress=False)
    for kwargs in ({"batch_size": 1}, {"padding_side": "left"}):
        other = mp.direct_logit_attribution(
            tiny, PROMPTS, metric, heads=True, progress=False, **kwargs
        )
        np.testing.assert_allclose(other.attributions, one.attributions, atol=1e-5)
        np.testing.assert_allclose(other.logit_diff, one.logit_diff, atol=1e-5)
    # Heads and their bias add up to the layer's attention write.
    whole = mp.direct_logit_attribution(tiny, PROMPTS, metric, progress=False)
    layer = np.asarray(
        [one.layer[i] for i, k in enumerate(one.kinds) if k in ("head", "attn_bias")]
    )
    heads = one.attributions[:, np.isin(one.kinds, ["head", "attn_bias"])]
    for n in range(tiny.cfg.n_layers):
        attn = whole.attributions[:, whole.components.index(f"L{n} attn")]
        np.testing.assert_allclose(heads[:, layer == n].sum(1), attn, atol=1e-5)


def test_hooked_transformer_matches_transformerlens_logit_attrs(tiny):
    if mp.core.model_adapter(tiny).kind != "hooked":
        pytest.skip("TransformerLens's ActivationCache.logit_attrs: a HookedTransformer's")
    prompt, answer, wrong = PROMPTS[2], ANSWER[2], WRONG
    res = mp.direct_logit_attribution(
        tiny, prompt, mp.logit_diff(answer, wrong), heads=True, progress=False
    )
    _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
    # logit_attrs applies the final norm's cached scale itself: the stack goes in without it.
    stack, labels = cache.get_full_resid_decomposition(
        pos_slice=-1, apply_ln=False, expand_neurons=False, return_labels=True
    )
    attrs = cache.logit_attrs(
        stack, tokens=torch.tensor([answer]), incorrect_tokens=torch.tensor([wrong]), pos_slice=-1
    )[:, 0]
    theirs = dict(zip(labels, attrs.tolist(), strict=True))
    ours = dict(zip(res.components, res.attributions[0].tolist(), strict=True))
    for n in range(tiny.cfg.n_layers):
        for h in range(tiny.cfg.n_heads):
            assert ours[f"L{n}H{h}"] == pytest.approx(theirs[f"L{n}H{h}"], abs=2e-5)
        assert ours[f"L{n} mlp"] == pytest.approx(theirs[f"{n}_mlp_out"], abs=2e-5)
    embeds = sum(v for k, v in theirs.items() if k in ("embed", "pos_embed"))
    assert ours["embed"] == pytest.approx(embeds, abs=2e-5)


@pytest.mark.parametrize(
    ("metric", "error", "message"),
    [
        (mp.answer_prob(5), TypeError, "only a logit difference"),
        (lambda logits: logits[:, 5], TypeError, "mp.logit_diff"),
        (mp.logit_diff(10**6, 6), ValueError, "outside the vocabulary"),
        (mp.logit_diff([5, 6], 6), ValueError, "2 entries for 3"),
        # Every attribution was 0 without a word.
        (mp.logit_diff([5, 6, 7], 6), ValueError, r"same token .* pair\(s\) \[1\]"),
    ],
)
def test_bad_metrics_fail_before_any_pass(tiny, metric, error, message):
    before = hook_count(tiny)
    with pytest.raises(error, match=message):
        mp.direct_logit_attribution(tiny, PROMPTS, metric, progress=False)
    assert hook_count(tiny) == before


TOY = mp.Task(
    "toy",
    "abstractive",
    "Q: capital of {input}?\nA:",
    shots=[["France", "Paris"]],
    items=[["Poland", "Warsaw"], ["Chad", "Ndjamena"], ["Peru", "Lima"]],
)


def test_a_task_sets_each_answer_against_its_argument(tiny, monkeypatch):
    # The tiny tokenizer spells " " on its own, so every answer and argument start alike: a
    # stand-in first-token map (one id per word, " Ndjamena" and " Chad" made to coincide)
    # exercises the selection; the attributions are the model's own.
    ids = {" Warsaw": 50, " Poland": 51, " Ndjamena": 60, " Chad": 60, " Lima": 70, " Peru": 71}
    monkeypatch.setattr(
        "mechprobe.patching._direct.first_token_ids", lambda model, texts: [ids[t] for t in texts]
    )
    with pytest.warns(UserWarning, match=r"1 of 3 items left out.*'Chad'"):
        res = mp.direct_logit_attribution(tiny, TOY, progress=False)
    prompts = [TOY.prompts()[0], TOY.prompts()[2]]
    want = mp.direct_logit_attribution(
        tiny, prompts, mp.logit_diff([50, 70], [51, 71]), progress=False
    )
    assert res.prompts == tuple(prompts)
    np.testing.assert_array_equal(res.attributions, want.attributions)
    given = mp.direct_logit_attribution(tiny, TOY, mp.logit_diff(5, 6), progress=False)
    assert given.prompts == tuple(TOY.prompts())  # a metric given: every item, that metric


def test_a_task_whose_answers_all_start_like_their_arguments_is_refused(tiny):
    with pytest.raises(ValueError, match=r"Every item of task 'toy'.*Pass metric="):
        mp.direct_logit_attribution(tiny, TOY, progress=False)  # " " starts every one here
    with pytest.raises(TypeError, match="only a Task has a default"):
        mp.direct_logit_attribution(tiny, PROMPTS, progress=False)


def test_a_bfloat16_model_splits_into_heads_within_its_rounding(tiny):
    # The heads-sum check allows for the model's rounding (bfloat16's eps is 7.8e-3, above the
    # 1e-3 kept for wider types): it refused every bfloat16 model before.
    kind = mp.core.model_adapter(tiny).kind
    model = mp.tiny_model(kind=kind).to(torch.bfloat16)
    res = mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(5, 6), heads=True,
                                      progress=False)  # fmt: skip
    layers = mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(5, 6), progress=False)
    np.testing.assert_allclose(res.logit_diff, layers.logit_diff)
    # A layer's heads add up to its attention output up to that output's bfloat16 rounding
    # (the heads are decoded from z in float64): a few eps of the largest write.
    eps = torch.finfo(torch.bfloat16).eps
    for layer in range(model.cfg.n_layers):
        parts = [i for i, c in enumerate(res.components) if c.startswith(f"L{layer}H")]
        whole = layers.attributions[:, layers.components.index(f"L{layer} attn")]
        got = res.attributions[:, parts].sum(1)
        np.testing.assert_allclose(got, whole, atol=4 * eps * float(np.abs(whole).max()))


def test_a_float64_model_splits_exactly_into_its_writes(tiny):
    # Hugging Face's RMSNorm computes in float32 inside a float64 model: the norm check's
    # float64 tolerance refused it ("off by 1.38e-07", review 21a).
    kind = mp.core.model_adapter(tiny).kind
    model = mp.tiny_model(kind=kind).to(torch.float64)
    res = mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(5, 6), progress=False)
    with torch.no_grad():
        logits = model(model.to_tokens(PROMPTS[0]))[0, -1].double()
    hand = float(logits[5] - logits[6])
    assert res.logit_diff[0] == pytest.approx(hand, abs=1e-5)
    np.testing.assert_allclose(res.attributions.sum(1), res.logit_diff, atol=1e-5)


def test_bad_arguments_of_the_call_and_the_summary_are_refused(tiny):
    with pytest.raises(TypeError, match="heads must be True or False"):
        mp.direct_logit_attribution(tiny, PROMPTS, mp.logit_diff(5, 6), heads="yes")
    res = mp.direct_logit_attribution(tiny, PROMPTS, mp.logit_diff(5, 6), progress=False)
    with pytest.raises(ValueError, match="top must be at least 0"):
        res.summary(top=-1)


def test_a_norm_that_is_not_the_one_assumed_is_refused(monkeypatch):
    model = tiny_of("bridge") if _has_bridge() else tiny_of("hooked")
    monkeypatch.setattr(model.cfg, "eps", 10.0)  # the frozen scale no longer reproduces the norm
    with pytest.raises(ValueError, match="final norm"):
        mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(5, 6), progress=False)


def test_a_residual_stream_that_is_not_the_sum_of_the_writes_is_refused(tiny):
    # A model hook rescaling the stream after layer 1 (as a norm after a sub-layer would) makes
    # the last residual vector something other than the sum of the captured writes.
    tiny.add_hook("blocks.1.hook_resid_post", lambda resid, hook: resid * 1.5)
    try:
        with pytest.raises(ValueError, match="not the sum of its embedding"):
            mp.direct_logit_attribution(tiny, PROMPTS, mp.logit_diff(5, 6), progress=False)
    finally:
        tiny.reset_hooks()


def test_soft_capped_logits_are_refused():
    if _has_bridge():
        pytest.skip("a soft cap is set on a HookedTransformer's config")
    model = tiny_of("hooked")
    model.cfg.output_logits_soft_cap = 30.0
    with pytest.raises(ValueError, match="soft cap"):
        mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(5, 6), progress=False)


def test_a_logit_scale_is_folded_into_the_attributions():
    # Cohere multiplies its logits by logit_scale after the unembedding: linear, so the split is
    # exact once scaled (it was refused as "a soft cap").
    if "bridge" not in TEST_KINDS:
        pytest.skip("a TransformerBridge of Cohere (the suite runs HookedTransformers)")
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "logit_scale": 0.25,
              "use_qk_norm": False}  # fmt: skip
    cohere = bridge_of_config("Cohere", "CohereForAI/c4ai-command-r-v01", **config)
    res = mp.direct_logit_attribution(cohere, PROMPTS, mp.logit_diff(5, 6), progress=False)
    hf, _ = hf_of_config("Cohere", **config)
    with torch.no_grad():
        logits = [hf(cohere.to_tokens(p)).logits[0, -1] for p in PROMPTS]
    want = np.array([float(lg[5] - lg[6]) for lg in logits])
    np.testing.assert_allclose(res.logit_diff, want, atol=1e-5)
    np.testing.assert_allclose(res.attributions.sum(1), want, atol=1e-4)


def test_a_norm_that_scales_by_one_plus_its_weight_is_split_exactly():
    # Gemma's RMSNorm multiplies by 1 + w: refused as "not a LayerNorm or RMSNorm".
    if "bridge" not in TEST_KINDS:
        pytest.skip("a TransformerBridge of Gemma (the suite runs HookedTransformers)")
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    # A final-norm weight far from zero, so that 1 + w and w differ plainly; the reference is
    # built apart (a bridge rewires the Hugging Face model it wraps).
    weight = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.5
    (hf, tokenizer), (twin, _) = hf_of_config("Gemma", **config), hf_of_config("Gemma", **config)
    with torch.no_grad():
        hf.model.norm.weight.copy_(weight)
        twin.model.norm.weight.copy_(weight)
    gemma = _models._bridge(twin, tokenizer, "google/gemma-2b", None)
    res = mp.direct_logit_attribution(gemma, PROMPTS, mp.logit_diff(5, 6), progress=False)
    with torch.no_grad():
        logits = [hf(gemma.to_tokens(p)).logits[0, -1] for p in PROMPTS]
    want = np.array([float(lg[5] - lg[6]) for lg in logits])
    np.testing.assert_allclose(res.attributions.sum(1), want, atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_one_plus_weight_norm_is_read_right_in_bfloat16(shift):
    # In bfloat16 the tolerance let the w reading pass for 1 + w when w is a few units (trained
    # Gemma norms): attributions summed to 0.64, 0.51 and -1.88 times the logit difference.
    if "bridge" not in TEST_KINDS:
        pytest.skip("a TransformerBridge of Gemma (the suite runs HookedTransformers)")
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    weight = shift + torch.randn(64, generator=torch.Generator().manual_seed(0)) * 0.5
    hf, tokenizer = hf_of_config("Gemma", **config)
    with torch.no_grad():
        hf.model.norm.weight.copy_(weight)
    gemma = _models._bridge(hf.to(torch.bfloat16), tokenizer, "google/gemma-2b", None)
    res = mp.direct_logit_attribution(gemma, PROMPTS, mp.logit_diff(5, 6), progress=False)
    # bfloat16 rounds each of the ~10 parts' logit contributions by about 2^-8 of its size
    size = np.abs(res.attributions).max()
    np.testing.assert_allclose(res.attributions.sum(1), res.logit_diff, atol=0.05 * size)


def test_result_protocol_and_round_trip(tiny, tmp_path):
    res = mp.direct_logit_attribution(
        tiny, PROMPTS, mp.logit_diff(ANSWER, WRONG), heads=True, progress=False
    )
    frame = res.to_frame()
    assert len(frame) == len(PROMPTS) * len(res.components)
    np.testing.assert_allclose(
        frame.groupby("prompt")["attribution"].sum().to_numpy(), res.logit_diff, atol=1e-5
    )
    summary = res.summary(top=4)
    assert summary["mean"].abs().is_monotonic_decreasing and len(summary) == 4
    assert res.head_matrix().shape == (tiny.cfg.n_layers, tiny.cfg.n_heads)
    assert res.head_matrix()[1, 2] == pytest.approx(res.mean[res.components.index("L1H2")])
    assert res.plot().axes[0].images
    assert "components" in repr(res) and "<table" in res._repr_html_()
    for suffix in (".json", ".npz", ".safetensors"):
        back = mp.LogitAttributionResult.load(res.save(tmp_path / f"dla{suffix}"))
        np.testing.assert_array_equal(back.attributions, res.attributions)
        assert back.components == res.components and back.heads
    flat = mp.direct_logit_attribution(tiny, PROMPTS, mp.logit_diff(5, 6), progress=False)
    assert len(flat.plot().axes[0].patches) == len(flat.components)
    with pytest.raises(ValueError, match="heads=True"):
        flat.head_matrix()


def _has_bridge() -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.integration
def test_smollm2_capital_answer_splits_exactly_into_its_writes(smollm2):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(_models.cache_dir() / "smollm2-135m-f32")
    prompt = mp.load_task("capitals").with_shots(3).prompt("Poland")
    res = mp.direct_logit_attribution(
        smollm2, prompt, mp.logit_diff(" Warsaw", " Paris"), heads=True, progress=False
    )
    want = _by_hand(
        fresh,
        smollm2.to_tokens(prompt)[0].tolist(),
        *smollm2.to_tokens(" Warsaw Paris", prepend_bos=False)[0].tolist(),
    )
    assert res.logit_diff[0] > 0  # SmolLM2 answers Warsaw
    got = dict(zip(res.components, res.attributions[0].tolist(), strict=True))
    for name, value in got.items():
        assert value == pytest.approx(want[name], abs=2e-3 * (1 + abs(want[name]))), name
    assert sum(got.values()) == pytest.approx(want["total"], abs=1e-3)
    # A task: each capital against its country, the rows still the model's own differences.
    task = mp.load_task("capitals").with_shots(3).subset(8, seed=0)
    by_task = mp.direct_logit_attribution(smollm2, task, progress=False)
    logits = mp.run(smollm2, list(by_task.prompts), logit_positions=-1, progress=False).logits
    ans = mp.core.first_token_ids(smollm2, task.answers())
    arg = mp.core.first_token_ids(smollm2, task.arguments())
    own = logits[torch.arange(8), 0, ans] - logits[torch.arange(8), 0, arg]
    np.testing.assert_allclose(by_task.logit_diff, own.numpy(), atol=1e-4)
    np.testing.assert_allclose(by_task.attributions.sum(1), own.numpy(), atol=1e-3)
    assert by_task.answers == tuple(smollm2.tokenizer.decode([a]) for a in ans)


def test_an_earlier_position_splits_the_prefix_that_ends_there(tiny):
    # causal: position -2 of "Hi cat" reads the same prefix as the last token of "Hi ca"
    metric = mp.logit_diff(5, 6)
    earlier = mp.direct_logit_attribution(
        tiny, ["Hi cat", "Hello dog"], metric, heads=True, positions=-2, progress=False
    )
    prefix = mp.direct_logit_attribution(
        tiny, ["Hi ca", "Hello do"], metric, heads=True, progress=False
    )
    assert earlier.position == -2 and prefix.position == -1
    np.testing.assert_allclose(earlier.attributions, prefix.attributions, atol=1e-5)
    np.testing.assert_allclose(earlier.logit_diff, prefix.logit_diff, atol=1e-5)
    with pytest.raises(TypeError, match=r"one position \(an int\)"):
        mp.direct_logit_attribution(tiny, "Hi", metric, positions=[0, 1], progress=False)
    with pytest.raises(ValueError, match="prompt 0"):
        mp.direct_logit_attribution(tiny, "Hi", metric, positions=-40, progress=False)


def test_the_bar_figure_names_every_layer(tiny):
    # Every third of 62 bars had a label: most writes could not be named from the figure.
    res = mp.direct_logit_attribution(tiny, PROMPTS, mp.logit_diff(ANSWER, WRONG), progress=False)
    ax = res.plot().axes[0]
    labels = [tick.get_text() for tick in ax.get_xticklabels()]
    assert labels == ["embed", *map(str, range(tiny.cfg.n_layers)), "bias"]
    bars = {(round(p.get_x() + p.get_width() / 2, 3), round(p.get_height(), 6)) for p in ax.patches}
    want = {
        (round(float(layer) + {"attn": -0.2, "mlp": 0.2}.get(kind, 0.0), 3), round(float(m), 6))
        for layer, kind, m in zip(res.layer, res.kinds, res.mean, strict=True)
    }
    assert bars == want
    assert ax.get_ylabel() == "direct effect (logits)"
    assert res.summary()["spread"].notna().all()
    one = mp.direct_logit_attribution(
        tiny, PROMPTS[:1], mp.logit_diff(ANSWER[:1], WRONG), progress=False
    )
    assert one.summary()["spread"].isna().all()  # a spread over one prompt is undefined, not 0


def test_an_attention_bias_row_keeps_its_block_in_the_frames():
    """With heads, a layer's attention bias is a row of its own (GPT-2, Pythia): the frames gave
    it no layer (<NA>, as the embedding), so grouping by layer left the biases out."""
    model = mp.tiny_model(architecture="gpt2")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_O.add_(0.05)
    res = mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(ANSWER, WRONG), heads=True,
                                      progress=False)  # fmt: skip
    frame = res.to_frame()
    bias = frame[frame["component"].str.endswith("attn_bias")]
    assert bias["layer"].tolist() == list(range(model.cfg.n_layers)) * len(PROMPTS)
    assert (
        bias["kind"].isna().all() and frame.loc[frame["component"] == "embed", "layer"].isna().all()
    )
    whole = mp.direct_logit_attribution(model, PROMPTS, mp.logit_diff(ANSWER, WRONG),
                                        progress=False).to_frame()  # fmt: skip
    attention = frame[frame["component"].str.contains("H|attn_bias")]
    per_layer = attention.groupby(["prompt", "layer"])["attribution"].sum().to_numpy()
    want = whole[whole["kind"] == "attn_out"].sort_values(["prompt", "layer"])["attribution"]
    np.testing.assert_allclose(per_layer, want.to_numpy(), atol=1e-5)


def test_the_head_map_has_each_layers_mlp_and_bars_have_their_spread(tiny):
    # Review 26a F9: with heads=True the MLPs were in no figure (SmolLM2's largest writer, L29's
    # MLP, among them); over several prompts the bars had no error bars.
    prompts, metric = ["Hi there", "Hello you", "abc"], mp.logit_diff(5, 6)
    res = mp.direct_logit_attribution(tiny, prompts, metric, heads=True, progress=False)
    ax = res.plot().axes[0]
    image = ax.images[0].get_array()
    n_heads = res.head_matrix().shape[1]
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "MLP"
    mlp = [res.mean[res.components.index(f"L{layer} mlp")] for layer in range(res.n_layers)]
    np.testing.assert_allclose(image[:, n_heads + 1], mlp, rtol=1e-6)
    np.testing.assert_allclose(image[:, :n_heads], res.head_matrix(), rtol=1e-6)
    bars = mp.direct_logit_attribution(tiny, prompts, metric, progress=False).plot().axes[0]
    from matplotlib.container import BarContainer

    drawn = [c for c in bars.containers if isinstance(c, BarContainer)]
    assert drawn and all(c.errorbar is not None for c in drawn)
    assert "mean ± sd over 3 prompts" in bars.get_title()


def test_head_results_join_on_layer_and_head(tiny) -> None:
    """README: a head's z (patching) and its write (DLA) are two sites, so head results join on
    layer and head: every head of the model, once (review 33b F3: on "site" nothing joined)."""
    metric = mp.logit_diff(5, 6)
    dla = mp.direct_logit_attribution(tiny, "A cat sat", metric, heads=True, progress=False)
    heads = dla.to_frame().query("kind == 'head_out'")
    patched = mp.patch(tiny, "A cat sat", "A bat sat", "head", -1, metric, n_random=0,
                       progress=False).to_frame()  # fmt: skip
    joined = patched.merge(heads, on=["layer", "head"])
    n = tiny.cfg.n_layers * tiny.cfg.n_heads
    assert len(joined) == n and len(joined[["layer", "head"]].drop_duplicates()) == n
    assert patched.merge(heads, on="site").empty  # two sites: the README says which to join on
