"""Results do not depend on torch's global default dtype.

A notebook that ran ``torch.set_default_dtype(torch.float64)`` (for a float64 computation of its
own) changed mechprobe's seeded draws, made in the default dtype: causal_trace's corrupted metric
moved from [0.031, 0.043] to [0.056, 0.112] with the same seed; logit_lens and train_tuned_lens
crashed on buffers of the wrong dtype (review 21a). Each call here runs twice on the same float32
model, under each default, and must give the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp

TEXT = ["The cat sat on the mat and the dog ran to the park. " * 8]
CLEAN, CORRUPT = ["Hi cat sat", "Hi dog ran"], ["Hi dog sat", "Hi cat ran"]


def _numbers(out):
    if isinstance(out, np.ndarray):
        return out
    if isinstance(out, mp.TunedLens):
        return torch.cat([w.flatten() for w in out.weights.values()]).numpy()
    return out.to_frame().select_dtypes("number").to_numpy(dtype=float)


_CALLS = {
    "logit_lens": lambda m: mp.logit_lens(m, CLEAN, progress=False),
    "patchscope": lambda m: mp.logit_lens(m, CLEAN, lens=mp.Patchscope(), progress=False),
    "train_tuned_lens": lambda m: mp.train_tuned_lens(
        m, TEXT, n_tokens=64, seq_len=32, tokens_per_step=32, progress=False
    ),
    "causal_trace": lambda m: mp.causal_trace(m, CLEAN, ["cat", "dog"], n_noise=2, n_random=1),
    "das": lambda m: mp.das(m, CLEAN, CORRUPT, [70, 71], mp.Site("resid_post", 1), k=1, epochs=1),
    "function_vector": lambda m: mp.function_vector(m, "capitals", n_prompts=4, n_random=2),
    "mlp_probe": lambda m: (
        mp.MLPProbe(hidden_size=8, max_iter=5)
        .fit(np.linspace(-1, 1, 120).reshape(30, 4), np.arange(30) % 2)
        .predict_proba(np.linspace(1, -1, 40).reshape(10, 4))
    ),
    "patch": lambda m: mp.patch(m, CLEAN, CORRUPT, "resid_pre", -1, mp.logit_diff(70, 71)),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_an_analysis_gives_the_same_numbers_under_a_float64_default_dtype(tiny, name):
    torch.manual_seed(0)
    reference = _numbers(_CALLS[name](tiny))
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        got = _numbers(_CALLS[name](tiny))
    finally:
        torch.set_default_dtype(torch.float32)
    # The same float32 model and draws: equal but for the order of float32 sums.
    np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_a_tiny_model_is_the_same_model_under_a_float64_default_dtype(tiny):
    # Its weights were drawn in the default dtype: another model, 0.91 apart (review 21d).
    kind = mp.core.model_adapter(tiny).kind
    reference = mp.tiny_model(kind=kind, seed=0)
    torch.set_default_dtype(torch.float64)
    try:
        built = mp.tiny_model(kind=kind, seed=0)
        assert torch.get_default_dtype() == torch.float64  # the caller's setting is kept
    finally:
        torch.set_default_dtype(torch.float32)
    assert built.W_E.dtype == torch.float32
    for (name, a), (_, b) in zip(
        reference.named_parameters(), built.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
