"""The one readout: every reader of hidden states gives the model's own logits, also on an
architecture whose logits pass through a transform after the unembedding (Gemma 2's soft cap)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core import readout

PROMPTS = ["Hello there, my friend", "Hi"]


@pytest.fixture(scope="module")
def capped() -> Any:
    model = mp.tiny_model(architecture="gemma2")
    assert model.cfg.output_logits_soft_cap == 2.0
    return model


def _model_logits(model: Any, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(prompt))[0].float()


def test_the_soft_cap_is_real(capped) -> None:
    logits = _model_logits(capped, PROMPTS[0])
    assert float(logits.abs().max()) < 2.0  # 2 tanh(z / 2): every logit is capped
    _, cache = capped.run_with_cache(capped.to_tokens(PROMPTS[0]))
    final = cache[f"blocks.{capped.cfg.n_layers - 1}.hook_resid_post"][0]
    uncapped = capped.unembed(capped.ln_final(final[None]))[0].detach()
    assert float(uncapped.abs().max()) > 2.5  # reading the stream without the cap is wrong
    torch.testing.assert_close(readout(capped, final), logits, atol=1e-5, rtol=0)


def test_run_and_the_lens_give_the_models_logits(capped) -> None:
    out = mp.run(capped, PROMPTS, logit_positions=-1)
    lens = mp.logit_lens(capped, PROMPTS, layers=-1, top_k=5)
    for b, prompt in enumerate(PROMPTS):
        want = _model_logits(capped, prompt)[-1]
        torch.testing.assert_close(out.logits[b, 0], want, atol=1e-5, rtol=0)
        top = torch.softmax(want, -1).topk(5)
        np.testing.assert_array_equal(lens.top_ids[b, 0, 0], top.indices.numpy())
        np.testing.assert_allclose(lens.top_probs[b, 0, 0], top.values.numpy(), atol=1e-5)
        assert abs(float(lens.kl_to_final[b, 0, 0])) < 1e-5


def test_trajectory_and_scoring_rank_the_models_logits(capped) -> None:
    task = mp.load_task("capitals").with_shots(1).subset(3)
    traj = mp.trajectory(capped, task, progress=False)
    score = mp.score_task(capped, task, progress=False)
    for i, prompt in enumerate(task.prompts()):
        logits = _model_logits(capped, prompt)[-1]
        answer = score.answer_ids[i][0]
        rank = int((logits > logits[answer]).sum())
        assert score.first_rank[i] == rank == traj.answer_rank[i, -1]
        assert score.predicted[i] == int(logits.argmax())


def test_patching_metrics_read_the_models_logits(capped) -> None:
    res = mp.patch(capped, "Hi cat", "Hi bat", "mlp_out", -1, mp.logit_diff(5, 7), progress=False)
    clean, corrupt = _model_logits(capped, "Hi cat")[-1], _model_logits(capped, "Hi bat")[-1]
    assert res.clean[0] == pytest.approx(float(clean[5] - clean[7]), abs=1e-5)
    assert res.corrupt[0] == pytest.approx(float(corrupt[5] - corrupt[7]), abs=1e-5)
