"""Interventions against hand-written hooks; cleanup after exceptions; padding independence."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from conftest import hf_of, hook_count

import mechprobe as mp

PROMPTS = ["The cat sat on the mat", "Hi there", "Paris is in"]


def _logits(model, batch):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask)


def _manual(model, batch, name, fn):
    """The same edit written as a plain TransformerLens hook, for comparison."""
    with torch.no_grad():
        return model.run_with_hooks(
            batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(name, fn)]
        )


def test_add_at_last_real_token_equals_manual_hook(tiny):
    batch = mp.tokenize(tiny, PROMPTS, padding_side="right")
    o = torch.randn(64, generator=torch.Generator().manual_seed(0))
    last = batch.last_index

    def manual(act, hook):
        act = act.clone()
        act[torch.arange(len(batch)), last] += 2.0 * o
        return act

    expected = _manual(tiny, batch, "blocks.1.hook_mlp_out", manual)
    with mp.intervene(tiny, {mp.Site("mlp_out", 1): mp.Add(o, 2.0, positions=-1)}, batch=batch):
        got = _logits(tiny, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, _logits(tiny, batch), atol=1e-3)


def test_replace_with_capture_from_another_run(tiny):
    source = mp.tokenize(tiny, ["Berlin is big"])
    target = mp.tokenize(tiny, ["Rome is older"])  # same length: replace every position
    cap = mp.Capture()
    with mp.intervene(tiny, {mp.Site("resid_post", 0): cap}, batch=source):
        _logits(tiny, source)
    with mp.intervene(tiny, {mp.Site("resid_post", 0): mp.Replace(cap)}, batch=target):
        patched = _logits(tiny, target)
    # Replacing the whole residual stream after block 0 makes the rest of the run the source's.
    assert torch.allclose(patched, _logits(tiny, source), atol=1e-5)


def test_ablate_zero_and_mean_and_project(tiny):
    batch = mp.tokenize(tiny, ["abcdef"])
    name = "blocks.2.hook_attn_out"
    zero = _manual(tiny, batch, name, lambda a, hook: torch.zeros_like(a))
    # The mean of the text's tokens: BOS (position 0) is left out.
    mean = _manual(tiny, batch, name, lambda a, hook: a[:, 1:].mean(dim=(0, 1)).expand_as(a))
    basis = torch.linalg.qr(torch.randn(64, 3, generator=torch.Generator().manual_seed(1)))[0]
    proj = _manual(tiny, batch, name, lambda a, hook: a - a @ basis @ basis.T)
    for intervention, expected in [
        (mp.Ablate("zero"), zero),
        (mp.Ablate("mean"), mean),
        (mp.Project(remove=basis.T), proj),
        (mp.Project(torch.eye(64) - basis @ basis.T), proj),
    ]:
        with mp.intervene(tiny, {name: intervention}, batch=batch):
            assert torch.allclose(_logits(tiny, batch), expected, atol=1e-5)


def test_head_site_edits_only_that_head(tiny):
    batch = mp.tokenize(tiny, ["abcdef"])

    def manual(act, hook):
        act = act.clone()
        act[:, :, 2, :] = 0.0
        return act

    expected = _manual(tiny, batch, "blocks.1.attn.hook_z", manual)
    with mp.intervene(tiny, {mp.Site("head", 1, head=2): mp.Ablate()}, batch=batch):
        assert torch.allclose(_logits(tiny, batch), expected, atol=1e-5)


class Boom(Exception):
    pass


class _Exploding(mp.Intervention):
    def edit(self, selected, hook):
        raise Boom("injected")


@pytest.mark.parametrize(
    "make",
    [
        lambda: mp.Capture(),
        lambda: mp.Replace(torch.zeros(64), positions=-1),
        lambda: mp.Add(torch.ones(64), 3.0),
        lambda: mp.Ablate("mean"),
        lambda: mp.Project(remove=torch.eye(64)[:2]),
    ],
)
@pytest.mark.parametrize("where", ["in_intervention", "after_forward"])
def test_exceptions_leave_no_hooks_and_same_outputs(tiny, make, where):
    batch = mp.tokenize(tiny, PROMPTS)
    before_hooks, before = hook_count(tiny), _logits(tiny, batch)
    spec = {mp.Site("mlp_out", 0): make(), mp.Site("resid_post", 1): [make()]}
    if where == "in_intervention":
        spec[mp.Site("resid_pre", 2)] = _Exploding()
    with pytest.raises(Boom), mp.intervene(tiny, spec, batch=batch):
        _logits(tiny, batch)
        raise Boom("after the forward pass")
    assert hook_count(tiny) == before_hooks
    assert torch.equal(_logits(tiny, batch), before)


@pytest.mark.parametrize(
    "bad, message",
    [
        (mp.Add(torch.ones(10)), "width 10"),
        (mp.Replace(torch.ones(7)), "width 7"),
        (mp.Project(torch.eye(5)), "width 5"),
        (mp.Project(mp.random_projection(32, 2, seed=0)), "width 32"),  # failed mid-forward
        (mp.Ablate("mean", mean=torch.zeros(3)), "width 3"),
    ],
)
def test_wrong_width_fails_before_the_forward_pass(tiny, bad, message):
    tiny(tiny.to_tokens("warm-up"))  # the bridge wires its own permanent hooks on first use
    before = hook_count(tiny)
    calls = []
    spy = mp.Capture()
    spy.edit = lambda selected, hook: calls.append(1)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=message):  # noqa: SIM117
        with mp.intervene(tiny, {"hook_embed": spy, mp.Site("mlp_out", 0): bad}):
            tiny(tiny.to_tokens("x"))
    assert calls == [] and hook_count(tiny) == before


def test_replace_of_wrong_shape_names_the_shapes(tiny):
    batch = mp.tokenize(tiny, ["abcdef"])
    with pytest.raises(ValueError, match=r"does not fit"):  # noqa: SIM117
        with mp.intervene(
            tiny, {mp.Site("mlp_out", 0): mp.Replace(torch.ones(5, 64))}, batch=batch
        ):
            _logits(tiny, batch)


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched_with_interventions(tiny, side):
    o = torch.randn(64, generator=torch.Generator().manual_seed(3))
    spec = {mp.Site("mlp_out", 1): mp.Add(o, 1.5, positions=-1)}
    cap = mp.Site("resid_post", 2, positions=-1)
    batched = mp.run(tiny, PROMPTS, spec, capture=[cap], logit_positions=-1, padding_side=side)
    for i, prompt in enumerate(PROMPTS):
        one = mp.run(tiny, [prompt], spec, capture=[cap], logit_positions=-1)
        assert torch.allclose(batched.logits[i], one.logits[0], atol=1e-4)
        assert torch.allclose(batched[cap][i], one[cap][0], atol=1e-4)


def test_run_chunks_equal_one_batch(tiny):
    site = mp.Site("resid_mid", 1)
    whole = mp.run(tiny, PROMPTS, capture=[site], batch_size=None, padding_side="left")
    chunked = mp.run(tiny, PROMPTS, capture=[site], batch_size=1, padding_side="left")
    mask = whole.batch.attention_mask.bool()
    assert torch.allclose(whole.logits[mask], chunked.logits[mask], atol=1e-4)
    assert torch.allclose(whole[site][mask], chunked[site][mask], atol=1e-4)
    with pytest.raises(KeyError, match="not captured"):
        whole[mp.Site("resid_mid", 0)]


@pytest.mark.integration
@pytest.mark.parametrize("side", ["left", "right"])
def test_smollm2_padding_independent(smollm2, side):
    prompts = [
        "Q: What is the capital of Poland?\nA:",
        "Hello",
        "The Eiffel Tower is in the city of",
    ]
    o = torch.randn(576, generator=torch.Generator().manual_seed(0))
    spec = {mp.Site("mlp_out", 20): mp.Add(o, 4.0, positions=-1)}
    batched = mp.run(smollm2, prompts, spec, logit_positions=-1, padding_side=side)
    plain = mp.run(smollm2, prompts, logit_positions=-1, padding_side=side)
    for i, prompt in enumerate(prompts):
        one = mp.run(smollm2, [prompt], spec, logit_positions=-1)
        assert (batched.logits[i] - one.logits[0]).abs().max().item() <= 1e-4
        with torch.no_grad():
            reference = smollm2(smollm2.to_tokens(prompt))[0, -1]
        assert (plain.logits[i, 0] - reference).abs().max().item() <= 1e-4


# --- issue 12: silent wrong answers that now raise or are right ----------------------------------


def test_project_remove_removes_the_rank_of_what_was_given(tiny) -> None:
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    twice = mp.Project(remove=torch.stack([v, v]))
    assert twice.rank == 1
    with_zero = mp.Project(remove=torch.stack([v, torch.zeros(64)]))
    assert with_zero.rank == 1
    assert mp.Project(remove=torch.zeros(2, 64)).rank == 0
    x = torch.randn(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    unit = (v / v.norm()).double()
    expected = x - (x @ unit)[:, None] * unit
    # The basis is kept in v's float32: the projection is exact to float32's rounding of the
    # unit vector (~6e-8 relative per entry, summed over 64 entries), not to float64's.
    close = {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(twice.edit(x, None), expected, **close)
    torch.testing.assert_close(with_zero.edit(x, None), expected, **close)
    torch.testing.assert_close(mp.Project(remove=torch.zeros(1, 64)).edit(x, None), x)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.Project(remove=torch.full((1, 64), float("nan")))


def test_mean_ablation_ignores_padding_and_batch_size(tiny) -> None:
    prompts = ["Hello there, my friend", "Hi", "A middling prompt"]
    site = mp.Site("mlp_out", 1)
    results = [
        mp.run(
            tiny,
            prompts,
            {site: mp.Ablate("mean")},
            logit_positions=-1,
            padding_side=side,
            batch_size=size,
        ).logits
        for side in ("right", "left")
        for size in (1, 2, 3)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-5, rtol=0)
    # independently: the mean over the text's tokens (BOS left out) of the unpadded prompts,
    # then ablate with it
    rows = [mp.run(tiny, p, capture=[site])[site][0, 1:] for p in prompts]
    mean = torch.cat(rows).double().mean(0).float()
    explicit = mp.run(tiny, prompts, {site: mp.Ablate("mean", mean=mean)}, logit_positions=-1)
    torch.testing.assert_close(results[0], explicit.logits, atol=1e-5, rtol=0)


def test_mean_ablation_under_intervene_masks_padding(tiny) -> None:
    site = mp.Site("mlp_out", 0)
    batch = mp.tokenize(tiny, ["Hello there, my friend", "Hi"])
    with mp.intervene(tiny, {site: mp.Ablate("mean")}, batch=batch):
        right = tiny(batch.tokens, attention_mask=batch.attention_mask)
    left_batch = mp.tokenize(tiny, ["Hello there, my friend", "Hi"], padding_side="left")
    with mp.intervene(tiny, {site: mp.Ablate("mean")}, batch=left_batch):
        left = tiny(left_batch.tokens, attention_mask=left_batch.attention_mask)
    n = int(batch.lengths[1])
    torch.testing.assert_close(right[1, n - 1], left[1, -1], atol=1e-4, rtol=0)


def test_intervene_refuses_padding_it_cannot_see_and_a_batch_it_was_not_given(tiny) -> None:
    batch = mp.tokenize(tiny, ["Hello there", "Hi"])
    edit = {mp.Site("resid_post", 0): mp.Add(torch.ones(64), positions=-1)}
    with pytest.raises(ValueError, match="without batch="), mp.intervene(tiny, edit):
        tiny(batch.tokens, attention_mask=batch.attention_mask)
    other = mp.tokenize(tiny, ["Hello world", "Ho"])  # same shape, other tokens
    with (
        pytest.raises(ValueError, match="not those of the batch="),
        mp.intervene(tiny, edit, batch=other),
    ):
        tiny(batch.tokens, attention_mask=batch.attention_mask)
    short = mp.tokenize(tiny, ["Hi", "Hey"])
    before = hook_count(tiny)
    with pytest.raises(ValueError, match="rows x tokens"), mp.intervene(tiny, edit, batch=short):
        tiny(batch.tokens, attention_mask=batch.attention_mask)
    assert hook_count(tiny) == before


@pytest.mark.parametrize("position", [np.int64(-1), torch.tensor(-1), [np.int32(-1)]])
def test_numpy_and_tensor_positions_work_like_ints(tiny, position) -> None:
    prompts = ["Hello there", "Hi"]
    want = mp.run(tiny, prompts, logit_positions=-1).logits
    torch.testing.assert_close(mp.run(tiny, prompts, logit_positions=position).logits, want)
    batch = mp.tokenize(tiny, prompts)
    cap = mp.Capture(positions=position)
    with mp.intervene(tiny, {"blocks.0.hook_resid_post": cap}, batch=batch):
        tiny(batch.tokens, attention_mask=batch.attention_mask)
    assert cap.value is not None and cap.value.shape == (2, 1, 64)
    res = mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", position, mp.logit_diff(1, 2))
    assert res.values.shape == (3, 1)


def test_a_write_at_resid_mid_reaches_the_residual_stream(tiny):
    """resid_mid = resid_pre + attn_out feeds the MLP *and* the residual add. On a bridge its hook
    is the MLP's input (ln2.hook_in): a write there used to reach the MLP only."""
    tokens = tiny.to_tokens("Hello cat sat")
    last = tiny.cfg.n_layers - 1
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {}
        for kind in ("resid_mid", "attn_out"):  # adding v to either is the same edit
            with mp.intervene(tiny, {mp.Site(kind, 1): mp.Add(v, positions=-1)}):
                logits[kind] = tiny(tokens)[0, -1]
        torch.testing.assert_close(logits["resid_mid"], logits["attn_out"], atol=1e-4, rtol=1e-4)
        # Zeroed at the last block of a bias-free model, nothing is left to decode.
        with mp.intervene(tiny, {mp.Site("resid_mid", last): mp.Ablate("zero", positions=-1)}):
            zeroed = tiny(tokens)[0, -1]
    if tiny.cfg.normalization_type == "RMS":  # the Llama ones: no biases anywhere
        assert zeroed.abs().max() < 1e-3
    # The gradient there is the residual stream's: the same as at attn_out.
    grads = {kind: mp.Gradient(positions=-1) for kind in ("resid_mid", "attn_out")}
    with mp.intervene(tiny, {mp.Site(kind, 1): g for kind, g in grads.items()}):
        out = tiny(tokens)[0, -1, 7]
    mp.core.differentiate(out, list(grads.values()))
    torch.testing.assert_close(grads["resid_mid"].grad, grads["attn_out"].grad)


def _mlp_norm(hf, layer: int) -> torch.nn.Module:
    """The Hugging Face block's norm in front of its MLP (Llama's, GPT-2's)."""
    if hasattr(hf, "model"):
        return hf.model.layers[layer].post_attention_layernorm
    return hf.transformer.h[layer].ln_2


def test_a_write_at_mlp_in_reaches_the_mlp_alone(tiny):
    """mlp_in reads resid_mid; a write there feeds the MLP only (Hugging Face: a pre-hook on the
    MLP's norm), and TransformerLens's use_hook_mlp_in switch is back off afterwards."""
    tokens = tiny.to_tokens("Hello cat sat")
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    mid, mlp_in = mp.Capture(), mp.Capture()
    with torch.no_grad():
        with mp.intervene(tiny, {mp.Site("resid_mid", 1): mid, mp.Site("mlp_in", 1): mlp_in}):
            tiny(tokens)
        with mp.intervene(tiny, {"blocks.1.hook_mlp_in": mp.Add(v, positions=-1)}):
            ours = tiny(tokens)[0]
        with mp.intervene(tiny, {mp.Site("resid_mid", 1): mp.Add(v, positions=-1)}):
            whole = tiny(tokens)[0]

        def add_last(module, args):
            x = args[0].clone()
            x[:, -1] += v
            return (x, *args[1:])

        handle = _mlp_norm(hf_of(tiny), 1).register_forward_pre_hook(add_last)
        try:
            reference = hf_of(tiny)(tokens).logits[0]
        finally:
            handle.remove()
    torch.testing.assert_close(mlp_in.value, mid.value)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    assert (ours[-1] - whole[-1]).abs().max() > 1e-2  # not resid_mid's edit
    torch.testing.assert_close(ours[:-1], whole[:-1], atol=1e-4, rtol=1e-4)
    # resid_mid, read beside an edit of mlp_in, is still what the residual stream holds.
    beside = mp.Capture()
    with (
        torch.no_grad(),
        mp.intervene(tiny, {mp.Site("mlp_in", 1): mp.Ablate(), mp.Site("resid_mid", 1): beside}),
    ):
        tiny(tokens)
    torch.testing.assert_close(beside.value, mid.value)
    assert not tiny.cfg.use_hook_mlp_in
    before = hook_count(tiny)
    with (
        pytest.raises(RuntimeError, match="boom"),
        mp.intervene(tiny, {mp.Site("mlp_in", 0): mp.Ablate()}),
    ):
        raise RuntimeError("boom")
    assert not tiny.cfg.use_hook_mlp_in and hook_count(tiny) == before


def test_several_interventions_at_resid_mid_apply_in_order(tiny):
    """A list at one resid_mid site: each item acts on what the previous left (on a bridge the
    first write moved the next items to hook_attn_out, where they saw attn_out alone)."""
    tokens = tiny.to_tokens("Hello cat sat")
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(2))
    site = mp.Site("resid_mid", 1)
    seen, after_two = mp.Capture(), mp.Capture()
    with torch.no_grad():
        with mp.intervene(tiny, {site: [mp.Ablate(positions=-1), seen]}):
            tiny(tokens)
        with mp.intervene(tiny, {site: [mp.Add(v, positions=-1), mp.Add(v, positions=-1)]}):
            twice = tiny(tokens)[0, -1]
        with mp.intervene(tiny, {site: [mp.Add(v, scale=2.0, positions=-1), after_two]}):
            once = tiny(tokens)[0, -1]
    assert seen.value[0, -1].abs().max() < 1e-5 and seen.value[0, 0].abs().max() > 0.1
    torch.testing.assert_close(twice, once, atol=1e-4, rtol=1e-4)
    assert after_two.value is not None and after_two.value.shape[-1] == tiny.cfg.d_model


def test_zeroing_resid_mid_is_exact_and_attn_out_reads_stay_unedited(tiny):
    """On a bridge a resid_mid write is made through attn_out: a zero left a rounding remainder
    that the next norm scaled up (|logits| summed to 509 instead of 0 at layer 0), and a capture of
    attn_out at that layer saw the write (2302 instead of 1600)."""
    prompts = ["The cat sat on the mat", "Hi"]
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    plain = mp.run(tiny, prompts, {}, capture=[mp.Site("attn_out", 1)], progress=False)
    for edit in (mp.Add(v), mp.Ablate()):
        spec = {mp.Site("resid_mid", 1): edit}
        edited = mp.run(tiny, prompts, spec, capture=[mp.Site("attn_out", 1)], progress=False)
        for key, value in plain.captures.items():
            torch.testing.assert_close(
                torch.as_tensor(edited.captures[key]), torch.as_tensor(value)
            )
    if tiny.cfg.normalization_type == "RMS":  # no biases anywhere: nothing is left to decode
        for layer in (0, 1):
            zeroed = mp.run(
                tiny, prompts, {mp.Site("resid_mid", layer): mp.Ablate()}, progress=False
            )
            assert float(torch.as_tensor(zeroed.logits).abs().max()) == 0.0


@pytest.mark.parametrize(
    ("name", "flag"),
    [
        ("blocks.1.hook_q_input", "use_split_qkv_input"),
        ("blocks.1.hook_attn_in", "use_attn_in"),
        ("blocks.1.attn.hook_result", "use_attn_result"),
        # a bridge's own spellings of the first two (review 40a: silently skipped)
        ("blocks.1.attn.hook_q_input", "use_split_qkv_input"),
        ("blocks.1.attn.hook_v_input", "use_split_qkv_input"),
        ("blocks.1.attn.hook_attn_in", "use_attn_in"),
    ],
)
def test_gated_hooks_fire_while_hooked(tiny, name, flag):
    """TransformerLens runs these only with a cfg switch on: on a HookedTransformer an
    intervention there silently did nothing (the bridge refused to attach it)."""
    if name not in tiny.hook_dict:
        pytest.skip(f"{type(tiny).__name__} does not list {name}")
    tokens = tiny.to_tokens("Hello cat sat")
    with torch.no_grad():
        tiny(tokens)  # a bridge adds its own hooks on a first pass
        before, plain = hook_count(tiny), tiny(tokens)
        seen = mp.Capture()
        try:
            with mp.intervene(tiny, {name: [mp.Ablate(), seen]}):
                ablated = tiny(tokens)
        except ValueError as err:  # TransformerLens 3: no attn_in under grouped-query attention
            assert "refuses" in str(err) and "GroupedQueryAttention" in str(err)
            assert not getattr(tiny.cfg, flag) and hook_count(tiny) == before
            return
    assert (ablated - plain).abs().max() > 1e-3 and float(seen.value.abs().max()) == 0.0
    assert not getattr(tiny.cfg, flag) and hook_count(tiny) == before


def test_a_hook_that_never_fires_is_refused(tiny):
    if tiny.cfg.positional_embedding_type == "standard":
        pytest.skip("learned positions: hook_pos_embed fires")
    if "hook_pos_embed" not in tiny.hook_dict:
        pytest.skip("this model lists no hook_pos_embed")
    with (
        pytest.raises(ValueError, match="hook_pos_embed never fires"),
        mp.intervene(tiny, {"hook_pos_embed": mp.Ablate()}),
    ):
        pass


def test_a_read_only_array_from_a_result_is_taken_without_a_warning(tiny):
    """Results freeze their arrays (FunctionVectorResult.vector): Add(res.vector) gave torch's
    'NumPy array is not writable' warning, and shared the result's memory."""
    vector = np.linspace(-1, 1, 64, dtype=np.float32)
    vector.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add = mp.Add(vector, positions=-1)
        out = mp.run(tiny, PROMPTS, {mp.Site("mlp_out", 1): add}, logit_positions=-1)
    writable = mp.run(
        tiny, PROMPTS, {mp.Site("mlp_out", 1): mp.Add(vector.copy(), positions=-1)},
        logit_positions=-1,
    )  # fmt: skip
    torch.testing.assert_close(out.logits, writable.logits, rtol=0, atol=0)
    assert not np.shares_memory(add.vector.numpy(), vector)


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_positions_at_an_attention_map_hook_name_select_query_rows(tiny, name):
    # [batch, head, q, k]: positions=-1 used to pick the last *head* of a hook named by string.
    tokens = tiny.to_tokens("Hello there")
    fill = 0.0 if name.endswith("pattern") else -30.0

    def by_hand(value, hook):
        value = value.clone()
        value[:, :, -1, :] = fill
        return value

    with torch.no_grad():
        want = tiny.run_with_hooks(tokens, fwd_hooks=[(name, by_hand)])
        edit = mp.Replace(torch.full((tiny.cfg.n_heads, tokens.shape[1]), fill), positions=-1)
        with mp.intervene(tiny, {name: edit}):
            got = tiny(tokens)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, _logits(tiny, mp.tokenize(tiny, "Hello there")))


def test_a_plain_transformerlens_hook_function_is_an_intervention(tiny):
    # A ported notebook's hook: fn(activation, hook) returning the new activation, or editing in
    # place and returning None. It raised "'function' object is not iterable".
    batch = mp.tokenize(tiny, PROMPTS)
    name = "blocks.1.hook_resid_pre"

    def scale(act, hook):
        return act * 0.5 + 1.0

    def in_place(act, hook):
        act[:, 1:] = 0.0

    # TransformerLens 4.3's run_with_hooks leaves hooks of its own on a bridge: count after it.
    references = {fn: _manual(tiny, batch, name, fn) for fn in (scale, in_place)}
    before = hook_count(tiny)
    for fn, expected in references.items():
        got = mp.run(tiny, batch, {name: fn}, batch_size=2).logits
        for i, n in enumerate(batch.lengths.tolist()):
            torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-5, rtol=0)
        with mp.intervene(tiny, {name: [fn]}, batch=batch):
            torch.testing.assert_close(_logits(tiny, batch), expected, atol=1e-5, rtol=0)
    # At a head Site the function receives that head's slice, [batch, seq, d_head].
    shapes = []
    mp.run(tiny, batch, {mp.Site("head", 0, head=1): lambda z, hook: shapes.append(z.shape)})
    assert shapes == [(len(PROMPTS), batch.tokens.shape[1], tiny.cfg.d_head)]
    with pytest.raises(TypeError, match=r"is a class: pass an instance, e.g. Ablate\(\)"):
        mp.run(tiny, batch, {name: mp.Ablate})
    assert hook_count(tiny) == before


@pytest.mark.parametrize(
    "site",
    [
        "blocks.1.hook_resid_mid",  # a bridge hands the function a tensor it computed
        mp.Site("mlp_in", 1),  # on a bridge the MLP's input is the residual stream itself
        mp.Site("head_out", 1, head=0),
        mp.Site("resid_post", 1, positions=-1),
        mp.Site("head", 1, head=2, positions=[0, -1]),
    ],
    ids=str,
)
def test_a_hook_function_editing_in_place_acts_where_its_selection_is_a_copy(tiny, site):
    # `act[:] = 0` returning None was a silent no-op wherever the function received a copy.
    batch = mp.tokenize(tiny, PROMPTS)

    def in_place(act, hook):
        act[:] = 0.0

    def returned(act, hook):
        return torch.zeros_like(act)

    intact = mp.run(tiny, batch).logits
    expected = mp.run(tiny, batch, {site: returned}).logits
    assert (expected - intact).abs().max() > 0.1
    torch.testing.assert_close(mp.run(tiny, batch, {site: in_place}).logits, expected)
    with mp.intervene(tiny, {site: in_place}, batch=batch):
        got = _logits(tiny, batch)
    for i, n in enumerate(batch.lengths.tolist()):  # run leaves padding zero
        torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-5, rtol=0)


def test_a_hook_function_returning_the_wrong_thing_is_named(tiny):
    # A shorter tensor raised torch's bare "expanded size" error; one row of a two-row batch was
    # broadcast to every prompt (each prompt ran on the first one's activation), silently.
    batch, name = mp.tokenize(tiny, PROMPTS), "blocks.1.hook_resid_post"
    intact = mp.run(tiny, batch).logits
    before = hook_count(tiny)  # after a forward: a bridge's first one adds hooks of its own
    cases = {
        (lambda act, hook: act[:, :-1]): (ValueError, r"returned shape \(3, \d+, 64\) for an"),
        (lambda act, hook: act[:1]): (ValueError, "return the same shape"),
        (lambda act, hook: [act]): (TypeError, "returned a list: return a tensor or None"),
    }
    for fn, (error, message) in cases.items():
        with pytest.raises(error, match=f"hook function <lambda> at {name}.*{message}"):
            mp.run(tiny, batch, {name: fn})
    with pytest.raises(TypeError, match=r"must take \(activation, hook\)"):
        mp.run(tiny, batch, {name: lambda act: act})
    assert hook_count(tiny) == before
    torch.testing.assert_close(mp.run(tiny, batch).logits, intact)


def test_mean_ablations_in_series_agree_under_run_and_intervene(tiny):
    # intervene let each hook average what it saw, after the mean-ablation upstream of it, while
    # run measured every mean first: the same spec and batch differed (0.18 in the logits).
    spec = {mp.Site("mlp_out", 0): mp.Ablate("mean"), mp.Site("head", 1, head=2): mp.Ablate("mean")}
    batch = mp.tokenize(tiny, PROMPTS)
    out = mp.run(tiny, batch, spec, batch_size=2)
    with mp.intervene(tiny, spec, batch=batch):
        got = _logits(tiny, batch)
    # By hand: both means from the intact model's real tokens, then both written at once.
    _, cache = tiny.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    real = batch.attention_mask.bool()
    real[:, 0] = False  # BOS, first in each right-padded row, is left out of pooled means
    mean_mlp = cache["blocks.0.hook_mlp_out"][real].mean(0)
    mean_z = cache["blocks.1.attn.hook_z"][:, :, 2][real].mean(0)

    def mlp(act, hook):
        return mean_mlp.expand_as(act).clone()

    def head(z, hook):
        z = z.clone()
        z[:, :, 2] = mean_z
        return z

    with torch.no_grad():
        expected = tiny.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            fwd_hooks=[("blocks.0.hook_mlp_out", mlp), ("blocks.1.attn.hook_z", head)],
        )
    for i, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(out.logits[i, :n], expected[i, :n], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-5, rtol=0)
    before = hook_count(tiny)
    refused = pytest.raises(ValueError, match=r"2 mean-ablation\(s\) without mean=.*pass batch=")
    with refused, mp.intervene(tiny, spec):
        pass
    # One alone averaged padding and BOS in, silently (2.6 apart from run's).
    one = {mp.Site("mlp_out", 0): mp.Ablate("mean")}
    alone = pytest.raises(ValueError, match=r"1 mean-ablation\(s\).*padding and BOS left out")
    with alone, mp.intervene(tiny, one):
        pass
    assert hook_count(tiny) == before


@pytest.mark.parametrize("value", [3, [mp.Ablate(), "x"]])
def test_what_is_no_intervention_is_named_in_every_entry_point(tiny, value):
    # run raised "'int' object has no attribute 'positions'", intervene "'int' object is not
    # iterable".
    spec = {"blocks.0.hook_resid_pre": value}
    message = r"at blocks.0.hook_resid_pre is not an intervention"
    with pytest.raises(TypeError, match=message):
        mp.run(tiny, ["Hi"], spec)
    with pytest.raises(TypeError, match=message), mp.intervene(tiny, spec):
        pass
    with pytest.raises(TypeError, match=message):
        mp.generate(tiny, ["Hi"], spec, max_new_tokens=1)


def test_a_tensor_being_trained_keeps_its_gradient_through_every_intervention(tiny):
    # Every intervention detached its tensor: a steering vector trained through Add kept
    # .grad None and its loss unchanged, with no error (pyvene's AdditionIntervention habit).
    batch, name = mp.tokenize(tiny, ["Hi there", "A cat sat"]), "blocks.1.hook_resid_post"
    d = tiny.cfg.d_model
    start = torch.randn(d, generator=torch.Generator().manual_seed(3))
    edits = {
        "add": (lambda v: mp.Add(v, scale=2.0, positions=-1), lambda a, v: a + 2.0 * v),
        "replace": (lambda v: mp.Replace(v, positions=-1), lambda a, v: v.expand_as(a)),
        "mean": (lambda v: mp.Ablate("mean", mean=v, positions=-1), lambda a, v: v.expand_as(a)),
        "matrix": (lambda v: mp.Project(torch.eye(d) + torch.outer(v, v), positions=-1),
                   lambda a, v: a @ (torch.eye(d) + torch.outer(v, v)).T),
    }  # fmt: skip
    last = batch.last_index
    for make, by_hand in edits.values():
        ours = start.clone().requires_grad_(True)
        with mp.intervene(tiny, {name: make(ours)}, batch=batch):
            logits = tiny(batch.tokens, attention_mask=batch.attention_mask)
        logits[torch.arange(2), last].logsumexp(-1).sum().backward()
        theirs = start.clone().requires_grad_(True)

        def hook(act, hook, v=theirs, edit=by_hand):
            act = act.clone()
            rows = torch.arange(act.shape[0])
            act[rows, last] = edit(act[rows, last], v)
            return act

        logits = tiny.run_with_hooks(
            batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=[(name, hook)]
        )
        logits[torch.arange(2), last].logsumexp(-1).sum().backward()
        assert ours.grad is not None and float(ours.grad.norm()) > 0
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4)
    tiny.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"Project\(remove=\) .* is not trained"):
        mp.Project(remove=start[None].requires_grad_(True))


@pytest.mark.parametrize("name", ["blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_a_hook_function_at_an_attention_map_gets_transformerlens_layout(tiny, name):
    # It got the query-major [batch, query, head, key] hooks use inside: `a[:, 0] = 0`, head 0
    # in TransformerLens, zeroed query row 0 of every head (2.5 apart in the logits).
    tokens = tiny.to_tokens("The cat sat on")
    shapes = []

    def head0(a, hook):
        shapes.append(tuple(a.shape))
        if hook.name.endswith("pattern"):
            a[:, 0] = 0.0  # no key masked: the same as TransformerLens's in-place edit
        else:
            a[:, 0] = a[:, 0] * 0.5  # scaled scores keep -inf at future keys

    with torch.no_grad():
        expected = tiny.run_with_hooks(tokens, fwd_hooks=[(name, head0)])
    got = mp.run(tiny, mp.Batch.from_tokens(tokens), {name: head0}).logits
    assert shapes[-1] == (1, tiny.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    assert (expected - mp.run(tiny, mp.Batch.from_tokens(tokens)).logits).abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_mean_ablation_at_chosen_positions_leaves_bos_out_too(tiny):
    # positions=[0, 1, 2] averaged BOS in (SmolLM2's mlp_out@11: norm 8376, 91.5 without).
    batch, site = mp.tokenize(tiny, PROMPTS), mp.Site("mlp_out", 1)
    out = mp.run(tiny, batch, {site: mp.Ablate("mean", positions=[0, 1, 2])}, batch_size=2)
    _, cache = tiny.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    mean = cache[site.hook_name][:, 1:3].reshape(-1, tiny.cfg.d_model).double().mean(0).float()
    by_hand = mp.run(tiny, batch, {site: mp.Replace(mean, positions=[0, 1, 2])}, batch_size=2)
    torch.testing.assert_close(out.logits, by_hand.logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no token of the text was selected"):
        mp.run(tiny, batch, {site: mp.Ablate("mean", positions=[0])})


def test_a_hook_function_taking_hook_by_keyword_works_as_in_transformerlens(tiny):
    # TransformerLens calls fn(activation, hook=...): `def f(act, *, hook)` was refused.
    batch = mp.tokenize(tiny, PROMPTS)

    def zero(act, *, hook):
        return torch.zeros_like(act)

    name = "blocks.1.hook_mlp_out"
    expected = mp.run(tiny, batch, {name: lambda act, hook: torch.zeros_like(act)}).logits
    torch.testing.assert_close(mp.run(tiny, batch, {name: zero}).logits, expected)


def test_ablate_with_a_mean_is_a_mean_ablation(tiny):
    # Review 26b: Ablate(mean=v) kept method="zero" and zeroed the site, dropping v unseen.
    # Not a constant vector: a LayerNorm (GPT-2) subtracts a constant offset and hides it.
    site, v = mp.Site("mlp_out", 0), torch.linspace(-1.0, 1.0, tiny.cfg.d_model)
    given = mp.run(tiny, PROMPTS, {site: mp.Ablate(mean=v)}).logits
    spelled = mp.run(tiny, PROMPTS, {site: mp.Ablate("mean", mean=v)}).logits
    zeroed = mp.run(tiny, PROMPTS, {site: mp.Ablate()}).logits
    torch.testing.assert_close(given, spelled, rtol=0, atol=0)
    assert (given - zeroed).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"Ablate\('zero'\) with mean=: a zero-ablation reads"):
        mp.Ablate("zero", mean=v)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: mp.Add(v),
        lambda v: mp.Replace(v),
        lambda v: mp.Ablate(mean=v),
        lambda v: mp.Project(torch.diag(v)),
        lambda v: mp.Project(remove=v[None]),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_vector_is_refused_when_built(make, bad):
    # Review 26b: mp.run with Add(NaN) returned all-NaN logits without a word.
    v = torch.ones(64)
    v[3] = bad
    with pytest.raises(ValueError, match="holds 1 NaN or infinite value"):
        make(v)
    with pytest.raises(ValueError, match="Add scale must be a finite number"):
        mp.Add(torch.ones(64), scale=bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda v: mp.Add(v, scale=1e20),
        lambda v: mp.Add(v * 1e20),
        lambda v: mp.Add(torch.tensor(1e19)),  # a scalar broadcasts over the whole width
        lambda v: mp.Replace(v * 1e20),
        lambda v: mp.Ablate(mean=v * 1e20),
    ],
)
def test_a_value_whose_square_overflows_the_next_norm_is_refused(tiny, make):
    # Review 26b L7: Add(v, scale=1e20) is finite, but its square summed over d_model overflows
    # float32 in the next RMSNorm, which then zeroes every later state: uniform logits, no word.
    v = torch.ones(tiny.cfg.d_model)
    site, hooks = mp.Site("resid_post", 0), hook_count(tiny)
    with pytest.raises(ValueError, match="squares summed overflow float32 in the next norm"):
        mp.run(tiny, PROMPTS, {site: make(v)})
    assert hook_count(tiny) == hooks  # refused before any hook was attached
    # the bound is float32's: 1e17 (squares summed 6.4e35) still runs, with finite logits
    assert torch.isfinite(mp.run(tiny, PROMPTS, {site: mp.Add(v, scale=1e17)}).logits).all()


def test_the_magnitude_bound_follows_the_models_dtype_and_spares_attention_masks():
    # Review 27a: a float16 model turned Add(v, scale=1e5) into inf (65504 is its largest
    # number) and run() returned NaN logits; an additive -3.4e38 mask on attention scores (Hugging
    # Face's convention) is no stream value and was refused.
    half = mp.tiny_model().to(torch.float16)
    site = mp.Site("resid_post", 1)
    with pytest.raises(ValueError, match=r"above what a 64-wide torch.float16 site holds"):
        mp.run(half, PROMPTS, {site: mp.Add(torch.ones(64), scale=1e5)})
    assert torch.isfinite(
        mp.run(half, PROMPTS, {site: mp.Add(torch.ones(64), scale=1e3)}).logits
    ).all()
    model = mp.tiny_model()
    scores = "blocks.1.attn.hook_attn_scores"
    mask = torch.zeros(1)
    mask[0] = torch.finfo(torch.float32).min
    out = mp.run(model, "Hi cat", {scores: mp.Add(mask, positions=-1)})
    assert torch.isfinite(out.logits).all()


class _InPlace(mp.Intervention):
    def edit(self, selected, hook):  # TransformerLens's habit: edit the tensor, return nothing
        selected.zero_()


@pytest.mark.parametrize("positions", [None, "all", -1, [0, 1]])
def test_an_edit_in_place_that_returns_none_works_at_every_position(tiny, positions):
    # Review 26b: with no positions it took effect (the selection is the activation), at chosen
    # positions it vanished (the selection is a copy) and the run equalled the intact one.
    site = mp.Site("mlp_out", 1)
    got = mp.run(tiny, PROMPTS, {site: _InPlace(positions=positions)}).logits
    want = mp.run(tiny, PROMPTS, {site: mp.Ablate(positions=positions)}).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hooks_attach_with_a_few_reads_of_hook_dict(tiny, monkeypatch):
    """TransformerLens 3.9's bridge rebuilds ``hook_dict`` on every read (8 ms on SmolLM2) and
    read it for each named hook it attached; with a read per site here too, a per-head logit
    attribution's 330 hooks took 3 s against a 0.1 s forward pass. One filter, one read."""
    cls = type(tiny)
    prop = inspect.getattr_static(cls, "hook_dict", None)
    if not isinstance(prop, property):
        pytest.skip(f"{cls.__name__}.hook_dict is a plain attribute: a read costs nothing")
    reads = []

    def counted(self):
        reads.append(1)
        return prop.fget(self)

    monkeypatch.setattr(cls, "hook_dict", property(counted))
    n_layers = int(tiny.cfg.n_layers)
    many = [
        mp.Site(kind, layer)
        for kind in ("resid_post", "mlp_out", "attn_out")
        for layer in range(n_layers)
    ]
    many += [mp.Site("head", layer, head=h) for layer in range(n_layers) for h in range(2)]
    counts = []
    for sites in ([many[0]], many):
        reads.clear()
        out = mp.run(tiny, PROMPTS, capture=sites, progress=False)
        assert len(out.captures) == len(sites)
        counts.append(len(reads))
    assert counts[1] == counts[0] <= 8, f"hook_dict reads for 1 and {len(many)} sites: {counts}"


def test_two_names_of_one_hook_point_both_apply_in_order(tiny):
    """An alias and its hook name are one hook point: both edits run there, in the order given,
    the second seeing the first's result (as TransformerLens chains two hooks on one point)."""
    alias, canonical = "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_out"
    if canonical not in tiny.hook_dict or tiny.hook_dict[canonical] is not tiny.hook_dict[alias]:
        pytest.skip(f"{type(tiny).__name__} has no second name for {alias}")
    batch = mp.tokenize(tiny, PROMPTS)
    seen = []

    def double(act, hook):
        return act * 2.0

    def record(act, hook):
        seen.append(act.clone())

    with mp.intervene(tiny, {alias: double, canonical: record}, batch=batch):
        got = _logits(tiny, batch)
    expected = _manual(tiny, batch, alias, double)
    assert torch.allclose(got, expected, atol=1e-5)
    plain = mp.run(tiny, batch, capture=alias, progress=False).captures[alias]
    assert len(seen) == 1
    mask = batch.attention_mask.bool()
    assert torch.allclose(seen[0][mask], 2.0 * plain[mask], atol=1e-5)
