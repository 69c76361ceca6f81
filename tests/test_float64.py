"""float64 models: numbers agree with a float64 hand computation, and TransformerLens 4.3's NaN on
left-padded float64 bridges is named, not returned.

A float64 TransformerBridge gives NaN on every left-padded row (its attention masks with -inf: a
padding query sees no key, and 0 * NaN spreads). mp.run(padding_side="left") returned those NaN
logits silently, das trained on a NaN loss and reported an IIA of 0.0, and generate blamed "a
float16 overflow" (review 21a).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEST_KINDS

import mechprobe as mp

PROMPTS = ["Hi there cat", "Yo"]


@pytest.fixture(scope="module")
def model64(request):
    kind = "bridge" if "bridge" in TEST_KINDS else "hooked"
    return mp.tiny_model(kind=kind).to(torch.float64)


def test_run_of_a_float64_model_agrees_with_its_own_forward(model64):
    batch = mp.tokenize(model64, PROMPTS)  # right padding
    got = mp.run(model64, batch, logit_positions=-1).logits  # [2, 1, vocab]
    with torch.no_grad():
        for i, prompt in enumerate(PROMPTS):
            hand = model64(model64.to_tokens(prompt))[0, -1]
            # run's readout is float32 (documented): agreement to float32 rounding.
            torch.testing.assert_close(got[i, 0].double(), hand, rtol=0, atol=2e-5)
    # With an edit after the blocks the model's own forward makes the logits: float32 too (they
    # came back float64 there, float32 without the edit).
    late = mp.run(model64, batch, {"ln_final.hook_normalized": mp.Add(torch.zeros(64))})
    assert got.dtype == late.logits.dtype == torch.float32


def test_left_padding_on_a_float64_bridge_is_refused_by_name(model64):
    if "bridge" not in TEST_KINDS:
        pytest.skip("TransformerLens 3's HookedTransformer has no such NaN")
    batch = mp.tokenize(model64, PROMPTS, padding_side="left")
    with torch.no_grad():  # the premise: the bridge's own forward is NaN there
        raw = model64(batch.tokens, attention_mask=batch.attention_mask)
    assert bool(torch.isnan(raw[1]).all())
    with pytest.raises(ValueError, match="left-padded row of a float64 model"):
        mp.run(model64, batch)
    with pytest.raises(ValueError, match="left-padded row of a float64 model"):
        mp.das(model64, PROMPTS, ["Hi there dog", "Ya"], [70, 71], mp.Site("resid_post", 1),
               k=1, epochs=1)  # fmt: skip
    with pytest.raises(ValueError, match="left-padded row of a float64 model"):
        mp.generate(model64, PROMPTS, max_new_tokens=2)
    # Prompts of one length need no padding: fine.
    assert bool(torch.isfinite(mp.run(model64, ["Hi cat", "Yo a"]).logits).all())


def test_left_padding_on_a_float64_hooked_transformer_is_fine():
    if "hooked" not in TEST_KINDS:
        pytest.skip("runs in the TransformerLens 3 suite")
    model = mp.tiny_model(kind="hooked").to(torch.float64)
    left = mp.run(model, mp.tokenize(model, PROMPTS, padding_side="left"), logit_positions=-1)
    right = mp.run(model, mp.tokenize(model, PROMPTS), logit_positions=-1)
    assert bool(torch.isfinite(left.logits).all())
    torch.testing.assert_close(left.logits, right.logits, rtol=0, atol=2e-5)
