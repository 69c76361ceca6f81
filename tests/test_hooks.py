"""Interventions against hand-written hooks; cleanup after exceptions; padding independence."""

from __future__ import annotations

import pytest
import torch

import mechprobe as mp
from tests.conftest import hook_count

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
    mean = _manual(tiny, batch, name, lambda a, hook: a.mean(dim=(0, 1)).expand_as(a))
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
