"""Analyses run the model in eval mode and give it back in the mode they found it in.

A GPT-2-style bridge keeps Hugging Face's dropout (0.1 on the residual, attention and embedding):
left in train mode, every analysis gave other numbers on each call, with no warning (logits 4.6
apart, patching cells 1.3; review 21a). The references here are the same calls on the model in
eval mode; the model's modes afterwards are those the user set.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from conftest import TEST_KINDS

import mechprobe as mp
from mechprobe.core import eval_mode

# Public functions that take a model but run no forward pass of their own: intervene leaves the
# mode to the forward its caller runs inside it (perhaps a training step).
_NOT_ANALYSES = {"intervene", "save_model", "tokenize", "tokenize_with_targets"}

CLEAN, CORRUPT = ["Hi cat sat", "Hi dog ran"], ["Hi dog sat", "Hi cat ran"]


@pytest.fixture(scope="module")
def dropout_model():
    """A tiny GPT-2 with live dropout (p=0.1 in every block) when put in train mode."""
    if "bridge" not in TEST_KINDS:
        pytest.skip("TransformerLens 3's HookedTransformer has no dropout modules")
    model = mp.tiny_model(architecture="gpt2", seed=3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    assert len(drops) >= 9  # else this test checks nothing
    return model


def _numbers(out):
    if isinstance(out, mp.RunResult):
        return out.logits.detach().numpy()
    if isinstance(out, torch.Tensor):
        return out.detach().float().numpy()
    frame = out.to_frame()
    return frame.select_dtypes("number").to_numpy(dtype=float)


_CALLS = {
    "run": lambda m: mp.run(m, CLEAN),
    "generate": lambda m: mp.generate(m, "Hi", max_new_tokens=4),
    "logit_lens": lambda m: mp.logit_lens(m, CLEAN, progress=False),
    "patch": lambda m: mp.patch(m, CLEAN, CORRUPT, "resid_pre", -1, mp.logit_diff(70, 71)),
    "attribution_patch": lambda m: mp.attribution_patch(
        m, CLEAN, CORRUPT, "resid_pre", -1, mp.logit_diff(70, 71)
    ),
    "causal_trace": lambda m: mp.causal_trace(m, CLEAN, ["cat", "dog"], n_noise=2, n_random=1),
    "collect": lambda m: torch.tensor(mp.collect(m, CLEAN, progress=False).values),
    "Patchscope.translate": lambda m: mp.Patchscope().translate(
        m, "resid_post", 1, torch.linspace(-1, 1, 128).reshape(2, 64)
    ),
}


@pytest.mark.parametrize("name", sorted(_CALLS))
def test_an_analysis_of_a_model_left_in_train_mode_gives_the_eval_mode_numbers(dropout_model, name):
    call = _CALLS[name]
    torch.manual_seed(0)
    reference = _numbers(call(dropout_model.eval()))
    dropout_model.train()
    dropout_model.blocks[1].training = False  # a mode the user set module by module ...
    try:
        torch.manual_seed(1)  # dropout would draw other masks than the reference's
        got = _numbers(call(dropout_model))
        modes = [m.training for m in dropout_model.modules()]
    finally:
        dropout_model.eval()
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-5, equal_nan=True)
    dropout_model.train()
    dropout_model.blocks[1].training = False
    # ... comes back as it was: the call measured with dropout off and restored every flag.
    assert modes == [m.training for m in dropout_model.modules()]
    dropout_model.eval()


def test_eval_mode_restores_every_module_when_the_analysis_raises(dropout_model):
    dropout_model.train()
    modules = [*dropout_model.modules(), *dropout_model.original_model.modules()]
    before = [m.training for m in modules]
    try:
        with pytest.raises(ValueError, match="boom"):
            mp.patch(dropout_model, CLEAN, CORRUPT, "resid_pre", -1, lambda *_: _raise())
        assert [m.training for m in modules] == before and any(before)
    finally:
        dropout_model.eval()


def _raise():
    raise ValueError("boom")


def test_eval_mode_reaches_the_hugging_face_model_a_bridge_wraps(dropout_model):
    # The bridge's pass runs the wrapped model's top-level embedding dropout, outside its modules.
    hf = dropout_model.original_model
    hf.train()
    try:
        with eval_mode(dropout_model):
            assert not hf.training and not hf.transformer.drop.training
        assert hf.training and hf.transformer.drop.training
    finally:
        hf.eval()


def test_every_analysis_that_takes_a_model_runs_it_in_eval_mode():
    # A new analysis must not forget it: each public function (and method) with a model argument
    # is wrapped by mechprobe.core.evaluates.
    missing = []
    for name in mp.__all__:
        obj = getattr(mp, name)
        members = (
            [(f"{name}.{m}", f) for m, f in inspect.getmembers(obj, inspect.isfunction)]
            if inspect.isclass(obj)
            else [(name, obj)]
        )
        for label, fn in members:
            if not callable(fn) or label in _NOT_ANALYSES or label.split(".")[-1].startswith("_"):
                continue
            try:
                params = inspect.signature(fn).parameters
            except (TypeError, ValueError):
                continue
            if "model" in params and not getattr(fn, "runs_in_eval_mode", False):
                missing.append(label)
    # Methods that read vectors through the unembedding only (no dropout in a readout: the lenses,
    # OVector.plot), and the metric binding and lens checks, which run no pass; a lens's export
    # reads the unembedding's weights for their hash.
    allowed = {
        "Lens.check", "Lens.translate", "LogitLens.check", "LogitLens.translate",
        "TunedLens.check", "TunedLens.translate", "Patchscope.check", "Patchscope.tokens",
        "PatchMetric.bind", "OVector.plot", "TunedLens.save_tuned_lens",
    }  # fmt: skip
    assert sorted(set(missing) - allowed) == []


def test_an_analysis_inside_another_does_not_list_the_modules_again(tiny, monkeypatch):
    # Listing SmolLM2's ~4,000 modules takes ~3 ms: generate's run per step paid it every step.
    from mechprobe.core import _eval_mode

    calls = []
    listing = _eval_mode._modules
    monkeypatch.setattr(_eval_mode, "_modules", lambda model: calls.append(1) or listing(model))
    mp.generate(tiny, "Hi", max_new_tokens=4)
    assert len(calls) == 1
    mp.run(tiny, "Hi")  # the next call lists them again: modes may have changed in between
    assert len(calls) == 2
