"""Models in bfloat16 and float16, as researchers load them on GPUs: analyses run, compute their
metrics in float32, and agree with the float32 model to the half-precision rounding."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import TEST_KINDS

import mechprobe as mp
from mechprobe.core import _models

pytestmark = pytest.mark.skipif("bridge" not in TEST_KINDS, reason="bridges built in half")

TEXT = ["The cat sat on the mat and looked at the dog. " * 20]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_tuned_lens_trains_on_a_half_precision_layernorm_model(dtype):
    # Pythia's final norm is a LayerNorm, which refuses float32 input in a half model: the
    # float32 translators' output crashed it ("mixed dtype"); RMSNorm upcasts and hid it.
    hf, tokenizer = _models._tiny_hf(0, 3, 64, "neox")
    neox = _models._bridge(hf.to(dtype), tokenizer, _models._TINY_ARCHITECTURES["neox"], None)
    lens = mp.train_tuned_lens(
        neox, TEXT, n_tokens=64, seq_len=32, tokens_per_step=32, progress=False
    )
    assert all(bool(torch.isfinite(w).all()) for w in lens.weights.values())
    decoded = mp.logit_lens(neox, "The cat sat", lens=lens)
    assert np.isfinite(decoded.kl_to_final).all()


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16])
def half(request):
    # As load_model(dtype=...) builds it: a bridge of a half-precision Hugging Face model (whose
    # cfg.dtype TransformerLens leaves at float32), not a float32 bridge cast afterwards.
    hf, tokenizer = _models._tiny_hf(0, 3, 64)
    model = _models._bridge(
        hf.to(request.param), tokenizer, _models._TINY_ARCHITECTURES["llama"], None
    )
    assert model.W_E.dtype == request.param
    return model


def test_the_adapter_and_cfg_name_the_weights_dtype(half):
    assert mp.core.model_adapter(half).dtype == half.W_E.dtype
    assert half.cfg.dtype == half.W_E.dtype


def test_direct_logit_attribution_runs_and_sums_to_the_models_own_metric(half, monkeypatch):
    # Read cfg.dtype (float32): the sum check's tolerance was float32's, and refused with "a
    # norm after a sub-layer, as in Gemma 2". A bridge a user boots keeps cfg.dtype float32.
    monkeypatch.setattr(half.cfg, "dtype", torch.float32)
    metric = mp.logit_diff(70, 71)
    res = mp.direct_logit_attribution(half, ["The cat sat on"], metric, heads=True)
    with torch.no_grad():
        logits = half(half.to_tokens("The cat sat on"))[0, -1].float()
    own = float(logits[70] - logits[71])
    eps = torch.finfo(half.W_E.dtype).eps
    assert res.logit_diff[0] == pytest.approx(own, abs=8 * eps * (abs(own) + 1))


def test_a_tuned_lens_trains_in_float32_on_a_half_precision_model(half):
    # The captured half activations met float32 translators: "Input dtypes must be the same".
    lens = mp.train_tuned_lens(
        half, TEXT, sites="resid_post", n_tokens=64, seq_len=32, tokens_per_step=32,
        progress=False,
    )  # fmt: skip
    weights = lens.weights["resid_post"]
    assert weights.dtype == torch.float32 and bool(torch.isfinite(weights).all())
    decoded = mp.logit_lens(half, "The cat sat", lens=lens)
    assert np.isfinite(decoded.kl_to_final).all() and (decoded.kl_to_final > -1e-6).all()


def test_probes_fit_on_a_half_precision_models_captures(half):
    # LinearProbe, MLPProbe and ScalarMixProbe raised "Got unsupported ScalarType BFloat16" on
    # what mp.run captures from a bfloat16 model, where probe_layers took it.
    prompts = [f"The {w} sat" for w in ("cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee")]
    acts = mp.run(half, prompts, capture="resid_post", logit_positions=-1, progress=False)
    X = torch.stack([acts[mp.Site("resid_post", i)][:, 1] for i in range(3)], dim=1)
    assert X.dtype == half.W_E.dtype
    y = np.arange(len(prompts)) % 2
    for probe, data in ((mp.LinearProbe(), X[:, 1]), (mp.ScalarMixProbe(), X)):
        want = type(probe)().fit(data.float(), y).predict(data.float())
        np.testing.assert_array_equal(probe.fit(data, y).predict(data), want)


def test_recovery_within_a_half_models_rounding_is_flagged():
    # bfloat16: a clean-corrupt gap of 0.03 at metrics near 3 is a few rounding steps, and its
    # recoveries read 12.0 and -6.0 without a word.
    from mechprobe.patching._result import normalised_recovery

    values, clean, corrupt = np.array([3.59]), np.array([3.25]), np.array([3.22])
    with pytest.warns(UserWarning, match="rounding steps of this bfloat16 model"):
        got = normalised_recovery(values, clean, corrupt, "logit_diff", dtype=torch.bfloat16)
    np.testing.assert_allclose(got, (3.59 - 3.22) / 0.03)  # reported, with the warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normalised_recovery(values, clean, corrupt, "logit_diff", dtype=torch.float32)
        normalised_recovery(values, clean, np.array([2.5]), "logit_diff", dtype=torch.bfloat16)
