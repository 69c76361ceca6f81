"""Task scoring against per-prompt teacher forcing written by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.relational._scoring import _forced_pass


def _task(n: int = 5, shots: int = 1) -> mp.Task:
    # Capital names of different lengths: several answer-length groups and padding in each.
    return mp.load_task("capitals").with_shots(shots).subset(n, seed=1)


def _manual(model, prompt: str, answer: str):
    """Teacher forcing one prompt at a time, no padding: logits at each answer token."""
    prompt_ids = model.to_tokens(prompt)[0].tolist()
    answer_ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(tokens)[0]
    start = len(prompt_ids)
    preds = logits[start - 1 : start - 1 + len(answer_ids)]
    logp = preds.log_softmax(-1)[torch.arange(len(answer_ids)), answer_ids].sum().item()
    first = preds[0]
    rank = int((first > first[answer_ids[0]]).sum())
    exact = bool((preds.argmax(-1) == torch.tensor(answer_ids)).all())
    return int(first.argmax()), rank, logp, exact, answer_ids


def test_score_equals_manual_teacher_forcing(tiny):
    task = _task()
    score = mp.score_task(tiny, task, batch_size=2)
    assert len({len(ids) for ids in score.answer_ids}) > 1  # several length groups
    for i, (prompt, answer) in enumerate(zip(task.prompts(), task.answers(), strict=True)):
        pred, rank, logp, exact, ids = _manual(tiny, prompt, answer)
        assert score.predicted[i] == pred
        assert score.first_rank[i] == rank
        assert score.logprob[i] == pytest.approx(logp, abs=1e-3)
        assert bool(score.exact[i]) == exact
        assert list(score.answer_ids[i]) == ids
    first = np.array([ids[0] for ids in score.answer_ids])
    assert score.accuracy == pytest.approx(float(np.mean(score.predicted == first)))
    assert np.array_equal(score.correct, score.first_rank == 0)


def test_captures_are_the_prompts_last_token(tiny):
    """The teacher-forced pass reads the prompt's last token: same as running the prompt alone."""
    task = _task(4)
    forced = _forced_pass(tiny, task, kinds=("resid_post", "mlp_out"), batch_size=3)
    for i, prompt in enumerate(task.prompts()):
        _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        for layer in range(tiny.cfg.n_layers):
            want = cache[f"blocks.{layer}.hook_resid_post"][0, -1]
            assert torch.allclose(forced.captures["resid_post"][i, layer], want, atol=1e-4)
            want = cache[f"blocks.{layer}.hook_mlp_out"][0, -1]
            assert torch.allclose(forced.captures["mlp_out"][i, layer], want, atol=1e-4)


def test_batch_size_does_not_change_scores(tiny):
    task = _task(5)
    a = mp.score_task(tiny, task, batch_size=1)
    b = mp.score_task(tiny, task, batch_size=None)
    assert np.array_equal(a.predicted, b.predicted)
    assert np.allclose(a.logprob, b.logprob, atol=1e-3)


def test_roundtrip_frame_and_plot(tiny, tmp_path):
    score = mp.score_task(tiny, _task(3))
    back = mp.TaskScore.load(score.save(tmp_path / "score.json"))
    assert back.inputs == score.inputs and back.answer_ids == score.answer_ids
    assert np.array_equal(back.first_rank, score.first_rank)
    assert np.allclose(back.logprob, score.logprob)
    frame = score.to_frame()
    assert list(frame["n_tokens"]) == [len(ids) for ids in score.answer_ids]
    assert frame["correct"].mean() == score.accuracy
    assert score.plot().axes


def test_an_answer_tied_for_the_top_logit_is_counted_apart(tiny, tmp_path):
    # In bfloat16 two of 165 capitals tied for first and nothing said so (review 20b); read
    # from argmax, a tie the answer's id did not win (argmax takes the lowest) went uncounted.
    score = mp.score_task(tiny, mp.load_task("capitals").subset(3))
    assert score.at_top is not None and (score.at_top == (score.first_rank == 0)).all()
    at_top, ranks, predicted = score.at_top.copy(), score.first_rank.copy(), score.predicted.copy()
    at_top[0], ranks[0] = True, 1  # another token's logit equals the answer's
    predicted[0] = score.answer_ids[0][0] - 1  # ... and has the lower id, so argmax took it
    tied = dataclasses.replace(score, at_top=at_top, first_rank=ranks, predicted=predicted)
    assert tied.tied.tolist() == [True, False, False] and not tied.correct[0]
    assert tied.summary()["tied_first"].item() == 1
    back = mp.TaskScore.load(tied.save(tmp_path / "score.json"))
    assert back.tied.tolist() == [True, False, False]
    old = dataclasses.replace(tied, at_top=None)  # a file saved before at_top was kept
    assert old.tied.tolist() == [False, False, False]  # its answer did not win the argmax


def test_bad_task_argument_names_the_fix(tiny):
    with pytest.raises(TypeError, match="load_task"):
        mp.score_task(tiny, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="No built-in task"):
        mp.score_task(tiny, "no_such_task")


# Twenty well-known countries, fixed before measuring. SmolLM2-135M does not know most of the 165
# capitals (docs/relational.md reports the whole task); the issue's >= 90% is checked here.
WELL_KNOWN = ["Germany", "Spain", "Poland", "Russia", "China", "Egypt", "Greece", "Portugal",
              "Sweden", "Norway", "Ireland", "Austria", "Hungary", "the Netherlands", "Denmark",
              "Finland", "Belgium", "Cuba", "Thailand", "the United Kingdom"]  # fmt: skip


@pytest.mark.integration
def test_smollm2_capitals_three_shots_accuracy(smollm2):
    task = mp.load_task("capitals").with_shots(3)
    task = task.subset([task.inputs().index(c) for c in WELL_KNOWN])
    score = mp.score_task(smollm2, task)
    assert score.accuracy >= 0.9
    # A correct first token is the top of the distribution: its rank is 0.
    assert np.all(score.first_rank[score.correct] == 0)
    assert score.mean_logprob < 0
