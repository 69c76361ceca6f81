"""predict against the Hugging Face model's own logits (a twin of the tiny model's weights, built
apart), each prompt and answer run alone; on SmolLM2, greedy against generate; bad input; the
protocol."""

from __future__ import annotations

import dataclasses
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hf_of, hook_count

import mechprobe as mp
from mechprobe.core._prediction import _percent

PROMPTS = ["The cat sat on the", "Hi", "A dog ran far"]
ANSWERS = [[" mat", " a"], " there", [" away", "x", " away now"]]


def _hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[seq, vocab]`` the Hugging Face twin's next-token log-probabilities on one row."""
    with torch.no_grad():
        logits = hf_of(model)(torch.tensor([ids])).logits[0].double()
    return logits.log_softmax(-1)


def _ids(model, text: str, bos: bool) -> list[int]:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([model.tokenizer.bos_token_id] if bos else []) + list(ids)


def test_top_tokens_and_answers_equal_the_hugging_face_model(tiny) -> None:
    before = hook_count(tiny)
    res = mp.predict(tiny, PROMPTS, ANSWERS, top_k=5, batch_size=2, progress=False)
    assert res.answers == (" mat", " a", " there", " away", "x", " away now")
    assert res.answer_prompt.tolist() == [0, 0, 1, 2, 2, 2]
    for p, prompt in enumerate(PROMPTS):
        row = _ids(tiny, prompt, bos=True)
        logp = _hf_logprobs(tiny, row)[-1]
        theirs = logp.topk(5)
        assert res.top_ids[p].tolist() == theirs.indices.tolist()
        np.testing.assert_allclose(res.top_probs[p], theirs.values.exp(), atol=1e-5)
        entropy = -(logp.exp() * logp).sum()
        assert res.entropy[p] == pytest.approx(float(entropy), abs=1e-4)
    for a, answer in enumerate(res.answers):
        prompt_ids = _ids(tiny, PROMPTS[res.answer_prompt[a]], bos=True)
        answer_ids = _ids(tiny, answer, bos=False)
        assert res.answer_ids[a] == tuple(answer_ids)
        logp = _hf_logprobs(tiny, prompt_ids + answer_ids)
        at = [len(prompt_ids) - 1 + j for j in range(len(answer_ids))]
        picked = torch.stack([logp[i, t] for i, t in zip(at, answer_ids, strict=True)])
        assert res.logprob[a] == pytest.approx(float(picked.sum()), abs=1e-4)
        assert res.first_prob[a] == pytest.approx(float(picked[0].exp()), abs=1e-6)
        # rank: how many other tokens are at least as probable (ties count against it)
        ranks = [
            int((logp[i] >= logp[i, t]).sum()) - 1 for i, t in zip(at, answer_ids, strict=True)
        ]
        assert res.token_ranks[a] == tuple(ranks)
        np.testing.assert_allclose(res.token_logprobs[a], picked.numpy(), atol=1e-5)
        # what the model would have said at each step: the argmax there
        assert res.token_top1[a] == tuple(int(logp[i].argmax()) for i in at)
        # the top-k at each step, ties in id order (a stable sort), the argmax first
        order = [torch.sort(logp[i], descending=True, stable=True) for i in at]
        assert res.token_top_ids[a] == tuple(tuple(o.indices[:5].tolist()) for o in order)
        np.testing.assert_allclose(res.token_top_logprobs[a], [o.values[:5] for o in order],
                                   atol=1e-5)  # fmt: skip
        assert res.token_top_ids[a][0][0] == res.token_top1[a][0]
        # each token's logit where it is predicted: the twin's own logits there
        with torch.no_grad():
            raw = hf_of(tiny)(torch.tensor([prompt_ids + answer_ids])).logits[0].double()
        want = [float(raw[i, t]) for i, t in zip(at, answer_ids, strict=True)]
        np.testing.assert_allclose(res.token_logits[a], want, atol=1e-4)
        assert res.token_logits[a][0] == pytest.approx(res.first_logit[a])
        np.testing.assert_allclose(res.token_top1_logprobs[a], [float(logp[i].max()) for i in at],
                                   atol=1e-5)  # fmt: skip
        assert res.first_rank[a] == ranks[0] and res.greedy[a] == all(r == 0 for r in ranks)
    assert res.candidate.tolist() == [0, 1, 0, 0, 1, 2]
    diff = res.logit_diff(0, 2)  # prompt 2's " away" against " away now": one first token
    assert np.isnan(diff[:2]).all() and diff[2] == 0.0
    assert res.logit_diff(1, 0)[0] == pytest.approx(res.first_logit[1] - res.first_logit[0])
    with pytest.raises(ValueError, match="same candidate"):
        res.logit_diff(1, 1)
    np.testing.assert_allclose(  # logits: the model's own at the last position
        res.top_logits[1], hf_of(tiny)(torch.tensor([_ids(tiny, "Hi", True)])).logits[0, -1]
        .detach().double().numpy()[res.top_ids[1]], atol=1e-4,
    )  # fmt: skip
    assert hook_count(tiny) == before


def test_prompts_without_bos_equal_the_hugging_face_model(tiny) -> None:
    """prepend_bos=False (text that starts as written): the prompts' and answers' tokens with no
    BOS before them, against the twin run on exactly those ids."""
    res = mp.predict(tiny, PROMPTS, ANSWERS, top_k=3, prepend_bos=False, progress=False)
    for p, prompt in enumerate(PROMPTS):
        logp = _hf_logprobs(tiny, _ids(tiny, prompt, bos=False))[-1]
        assert res.top_ids[p].tolist() == logp.topk(3).indices.tolist()
    for a, answer in enumerate(res.answers):
        prompt_ids = _ids(tiny, PROMPTS[res.answer_prompt[a]], bos=False)
        answer_ids = _ids(tiny, answer, bos=False)
        logp = _hf_logprobs(tiny, prompt_ids + answer_ids)
        at = range(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer_ids))
        want = sum(float(logp[i, t]) for i, t in zip(at, answer_ids, strict=True))
        assert res.logprob[a] == pytest.approx(want, abs=1e-4)
    with_bos = mp.predict(tiny, PROMPTS, ANSWERS, top_k=3, prepend_bos=True, progress=False)
    default = mp.predict(tiny, PROMPTS, ANSWERS, top_k=3, progress=False)
    np.testing.assert_array_equal(with_bos.logprob, default.logprob)
    assert not np.allclose(with_bos.logprob, res.logprob, atol=1e-3)
    with pytest.raises(TypeError, match="prepend_bos must be True or False"):
        mp.predict(tiny, PROMPTS, prepend_bos="no", progress=False)
    with pytest.raises(ValueError, match="prepend_bos applies to prompt text"):
        mp.predict(tiny, mp.tokenize(tiny, PROMPTS), prepend_bos=False, progress=False)


def test_a_prompt_starting_with_the_bos_text_warns(tiny) -> None:
    """Review 40b: a chat template's text starts with the BOS token's own text; a BOS prepended
    too made the model read it twice, visible only in the report's tokens."""
    bos = tiny.tokenizer.bos_token
    with pytest.warns(UserWarning, match=r"Prompts \[1\] start with .* reads it twice"):
        res = mp.predict(tiny, ["Hi", f"{bos}Hi"], progress=False)
    assert res.prompt_ids[1][:2] == (tiny.tokenizer.bos_token_id,) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mp.predict(tiny, [f"{bos}Hi"], prepend_bos=False, progress=False)


def test_padding_and_batch_size_change_nothing(tiny) -> None:
    one = mp.predict(tiny, PROMPTS, ANSWERS, batch_size=1, progress=False)
    all_at_once = mp.predict(tiny, PROMPTS, ANSWERS, batch_size=None, progress=False)
    np.testing.assert_allclose(all_at_once.top_probs, one.top_probs, atol=1e-6)
    np.testing.assert_allclose(all_at_once.logprob, one.logprob, atol=1e-5)
    assert all_at_once.token_ranks == one.token_ranks
    batch = mp.tokenize(tiny, PROMPTS, padding_side="left")
    left = mp.predict(tiny, batch, progress=False)
    assert np.array_equal(left.top_ids, one.top_ids) and left.prompts == tuple(PROMPTS)


def test_greedy_breaks_ties_as_generate_and_ranks_count_them_against() -> None:
    # Review 39b F5: bfloat16 logits tie; generate takes the lowest id among tied maxima.
    from mechprobe.core._prediction import _scores

    tied = torch.tensor([[[3.0, 3.0, 0.0]]])
    said = _scores(tied, torch.tensor([[0]]), 3)
    assert (said.ranks, said.greedy) == ((1,), True)  # a tie is no evidence; generate says it
    other = _scores(tied, torch.tensor([[1]]), 3)
    assert (other.ranks, other.greedy, other.top1) == ((1,), False, (0,))
    assert other.top_ids == ((0, 1, 2),)  # the top-k lists tied tokens in id order too
    # ties at the k-th value too: the lowest ids of the tied ones (review 40b F1: topk's order
    # made a bfloat16 report list ' sailed' first where generate said 's)
    from mechprobe.core._prediction import _top_in_id_order

    scores = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    assert _top_in_id_order(scores, 2).tolist() == [[1, 2], [2, 0]]


def test_passes_one_token_answers_and_chunks(tiny, monkeypatch) -> None:
    # Review 39b F10: one-token answers come from the prompts' own pass; multi-token answers
    # run batch_size rows at a time (F9: each chunk's logits reduced before the next).
    from mechprobe.core import _prediction

    calls = []
    real = _prediction.run

    def counted(model, batch, *args, **kwargs):
        calls.append(len(batch))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(_prediction, "run", counted)
    one = mp.predict(tiny, PROMPTS, [["a", "b"], "c", ["d"]], progress=False)
    assert calls == [3]
    calls.clear()
    many = mp.predict(tiny, PROMPTS, [[" ab", " cd", "e"], " fg", ["h"]], batch_size=2,
                      progress=False)  # fmt: skip
    assert calls == [3, 2, 1]  # the prompts in one call, then 3 answers of 3 tokens (2 + 1)
    assert one.greedy.dtype == bool and len(many.answers) == 5


def test_a_generation_is_scored_as_the_tokens_it_was_generated_as(tiny) -> None:
    # Review 39b F6: text re-encoded can be other tokens (the byte tokens of the tiny model's
    # partial characters, SmolLM2's "\n", "\n" for "\n\n"): the generation's own ids are scored.
    made = mp.generate(tiny, PROMPTS, max_new_tokens=4, progress=False)
    res = mp.predict(tiny, list(made.prompts), made, progress=False)
    assert res.answer_ids == tuple(tuple(int(t) for t in row) for row in made.tokens)
    assert res.greedy.all()  # each generated token the argmax, as generate picked it
    np.testing.assert_allclose(res.logprob, [float(lp.sum()) for lp in made.logprobs], atol=1e-4)
    assert res.answers == tuple("".join(t) for t in made.token_strings)
    spaced = mp.generate(tiny, "Hi ", max_new_tokens=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no advice to change a prompt the tokens followed
        assert mp.predict(tiny, "Hi ", spaced, progress=False).greedy.all()
    with pytest.raises(ValueError, match="GenerationResult of other prompts"):
        mp.predict(tiny, PROMPTS[:2], made, progress=False)
    steered = mp.generate(tiny, "Hi", {mp.Site("resid_post", 1): mp.Ablate()}, max_new_tokens=2,
                          progress=False)  # fmt: skip
    with pytest.warns(UserWarning, match="ran with interventions"):
        mp.predict(tiny, "Hi", steered, progress=False)


def test_bad_input_names_the_fix(tiny) -> None:
    with pytest.raises(ValueError, match="3 prompts and 2 answers"):
        mp.predict(tiny, PROMPTS, [" a", " b"], progress=False)
    with pytest.raises(ValueError, match="One answer string for 3 prompts"):
        mp.predict(tiny, PROMPTS, " a", progress=False)
    with pytest.raises(ValueError, match="non-empty strings"):
        mp.predict(tiny, ["Hi"], [[" a", ""]], progress=False)
    with pytest.raises(ValueError, match="non-empty strings"):
        mp.predict(tiny, ["Hi"], [[]], progress=False)
    with pytest.raises(ValueError, match="top_k"):
        mp.predict(tiny, "Hi", top_k=0, progress=False)
    with pytest.raises(ValueError, match="Batch of token ids takes none"):
        mp.predict(tiny, mp.tokenize(tiny, ["Hi"]), [" a"], progress=False)
    with pytest.raises(TypeError, match="not str"):
        mp.predict(tiny, ["Hi", 3], progress=False)
    # Review 39b F8: items that are not strings or lists, and unordered containers
    for bad in ([None], [1]):
        with pytest.raises(ValueError, match="non-empty strings"):
            mp.predict(tiny, ["Hi"], bad, progress=False)
    with pytest.raises(ValueError, match="non-empty strings"):
        mp.predict(tiny, "Hi", "", progress=False)
    for unordered in ({" a": 1}, {" a", " b"}):
        with pytest.raises(TypeError, match="no order"):
            mp.predict(tiny, "Hi", unordered, progress=False)
    # F7: a prompt and answer past the context is named, before any forward pass
    long = "a" * (tiny.cfg.n_ctx - 4)  # with BOS and " x" (2 byte tokens) it fits; " xyz" not
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=r"Prompt 1 with its answer ' xyz' is"):
        mp.predict(tiny, ["Hi", long], [[" x", " y"], [" x", " xyz"]], progress=False)
    assert hook_count(tiny) == before


def test_one_prompt_takes_a_list_of_candidates_as_test_prompt_does(tiny) -> None:
    alone = mp.predict(tiny, "Hi", [" a", " b"], progress=False)
    listed = mp.predict(tiny, ["Hi"], [[" a", " b"]], progress=False)
    assert alone.answers == listed.answers == (" a", " b")
    np.testing.assert_array_equal(alone.logprob, listed.logprob)
    with pytest.raises(ValueError, match="1 prompts and 2 answers"):
        mp.predict(tiny, ["Hi"], [" a", " b"], progress=False)  # a list: one answer per prompt


def test_a_prompt_ending_in_a_space_warns_about_the_prompt(tiny, monkeypatch) -> None:
    # Review 39b F11: the unspaced-answer advice (add a space) was wrong after a trailing space.
    said = []
    monkeypatch.setattr(
        "mechprobe.core._prediction.warn_unspaced", lambda m, a, what: said.append(list(a))
    )
    with pytest.warns(UserWarning, match=r"Prompts \[0\] end in whitespace"):
        mp.predict(tiny, ["Hi ", "Yo"], ["a", "b"], progress=False)
    assert said == [["b"]]


def test_an_unspaced_answer_that_is_a_token_of_its_own_warns(monkeypatch) -> None:
    # The tiny tokenizer is byte-level (no word is a token of its own): a stand-in that is.
    model = mp.tiny_model()
    called = []
    monkeypatch.setattr(
        "mechprobe.core._prediction.warn_unspaced",
        lambda m, answers, what: called.append(list(answers)),
    )
    mp.predict(model, ["Hi", "Yo"], ["Paris", " Rome"], progress=False)
    assert called == [["Paris", " Rome"]]


def test_the_figure_and_the_round_trip(tiny, tmp_path) -> None:
    res = mp.predict(tiny, PROMPTS, ANSWERS, top_k=4, progress=False)
    fig = res.plot(prompt=2)
    bars = fig.axes[0].patches
    np.testing.assert_allclose([b.get_width() for b in bars], res.top_probs[2])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert "not shown" in fig.axes[0].get_title()  # the byte answers rank below the top 4
    assert labels == [mp.core.token_label(res.token_text[i], 16) for i in res.top_ids[2]]
    with pytest.raises(ValueError, match="one of the 3 prompts"):
        res.plot(prompt=3)
    assert "3 prompts, top-4" in repr(res) and "<table" in res._repr_html_()
    back = mp.Predictions.load(res.save(tmp_path / "p.json"))
    pd.testing.assert_frame_equal(back.to_frame(), res.to_frame())
    pd.testing.assert_frame_equal(back.answers_frame(), res.answers_frame())
    pd.testing.assert_frame_equal(back.summary(), res.summary())
    summary = res.summary()
    assert summary.best_answer.tolist()[1] == " there"
    assert list(res.to_frame().columns) == [
        "prompt",
        "prompt_text",
        "rank",
        "decoded_token",
        "decoded_token_id",
        "prob",
        "logit",
    ]
    steps = res.tokens_frame()
    assert len(steps) == sum(len(ids) for ids in res.answer_ids)
    last = steps[(steps.prompt == 2) & (steps.candidate == 2)]
    assert last.step.tolist() == list(range(len(res.answer_ids[5])))
    np.testing.assert_allclose(last.logprob.sum(), res.logprob[5])
    assert last.token_id.tolist() == list(res.answer_ids[5])
    empty = mp.predict(tiny, "Hi", progress=False).answers_frame()
    assert empty.empty and empty["answer"].dtype == object and empty["n_tokens"].dtype == np.int64
    assert summary.first_rank.dtype == "Int64"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = mp.predict(tiny, "Hi", progress=False).summary()
    assert "best_answer" not in plain.columns


def test_the_report_prints_what_the_frames_hold(tiny) -> None:
    """The printed view (test_prompt's) against the frames: each top token's probability and
    logit, each answer token's rank and probability, the model's own token where it differs."""
    res = mp.predict(tiny, PROMPTS, ANSWERS, top_k=5, progress=False)
    text = res.report(k=3, alternatives=0)
    assert text.count("Prompt ") == len(PROMPTS)
    top = res.to_frame()
    for p in range(len(PROMPTS)):
        own = res.report(p, k=3, alternatives=0)
        assert own in text and own.startswith(f"Prompt {p}: {PROMPTS[p]!r}")
        lines = own.splitlines()
        ids = res.prompt_ids[p]
        assert list(ids) == _ids(tiny, PROMPTS[p], bos=True)
        assert lines[1].startswith(f"  tokens ({len(ids)}): ")
        assert lines[1].count("'") == 2 * len(ids)  # each token quoted, escapes shown once
        assert f"(entropy {res.entropy[p]:.2f} nats)" in lines[2]
        for r in range(3):
            row = top[(top.prompt == p) & (top["rank"] == r)].iloc[0]
            assert lines[3 + r].split()[0] == str(r)
            assert lines[3 + r].endswith(f"{row.prob:.2%} {row.logit:>8.2f}")
        assert len([line for line in lines if line.startswith("  answer ")]) == int(
            (res.answer_prompt == p).sum()
        )
    steps = [line.strip() for line in text.splitlines() if line.startswith("    step ")]
    tokens = res.tokens_frame()
    assert len(steps) == len(tokens)
    for line, row in zip(steps, tokens.itertuples(), strict=True):
        assert f"rank {row.rank}  logit {row.logit:.2f}  prob {_percent(row.prob)}" in line
        assert ("(top: " in line) == (row.top1_token != row.token)
    answer_lines = sum(1 + len(res.answer_ids[a]) for a in np.flatnonzero(res.answer_prompt == 0))
    lines = res.report(0, k=99, alternatives=0).splitlines()
    assert len(lines) == 3 + 5 + answer_lines  # top_k=5 rows at most
    # with alternatives, a line after each step: its most probable tokens, as stored
    listed = res.report(k=1, alternatives=99).splitlines()
    tops = [line.strip() for line in listed if line.startswith("      top: ")]
    assert len(tops) == int((tokens.step > 0).sum())  # step 0's: the next tokens listed above
    flat = [(a, j) for a in range(len(res.answers)) for j in range(1, len(res.answer_ids[a]))]
    for line, (a, j) in zip(tops, flat, strict=True):
        probs = np.exp(res.token_top_logprobs[a][j])
        assert line.count("%") == 5 and line.endswith(f"{probs[-1]:.2%}")
        first = res.token_text[res.token_top_ids[a][j][0]]
        assert line.startswith(f"top: {first[:16]!r} ")
    with pytest.raises(ValueError, match="prompt must index"):
        res.report(3)
    with pytest.raises(ValueError, match="k"):
        res.report(k=0)
    # a file saved before the prompts' tokens and each step's top-k were kept
    old = {key: v for key, v in res.to_dict().items() if key not in ("token_top_ids",
           "token_top_logprobs", "prompt_ids", "token_logits")}  # fmt: skip
    older = mp.Predictions.from_dict(old)
    assert older.prompt_ids == () and "tokens (" not in older.report()
    # a tie with the top token is said (ties count against the answer)
    a = 0  # ' mat', its first step made a tie with the top token
    steps = list(res.token_top1_logprobs[a])
    steps[0] = res.token_logprobs[a][0]
    ranks = (1, *res.token_ranks[a][1:])
    tie = dataclasses.replace(res, token_top1_logprobs=(tuple(steps), *res.token_top1_logprobs[1:]),
                              token_ranks=(ranks, *res.token_ranks[1:]))  # fmt: skip
    assert "step 0 ' '  rank 1 (tied with the top)" in tie.report(0)
    without = "\n".join(
        re.sub(r"  logit -?[0-9.]+", "", line)
        for line in text.splitlines()
        if not line.startswith("  tokens (")
    )
    assert older.report(k=3, alternatives=3) == without  # the top one where it differs, as before
    assert older.tokens_frame()["logit"].isna().all()


@pytest.mark.integration
def test_smollm2_knows_the_capital_of_france(smollm2) -> None:
    res = mp.predict(smollm2, ["The capital of France is", "The capital of Poland is"],
                     [[" Paris", " Berlin"], [" Warsaw", " Krakow"]], progress=False)  # fmt: skip
    frame = res.answers_frame()
    assert frame.first_rank.tolist()[0] == 0 and frame.first_rank.tolist()[2] == 0
    assert frame.greedy.tolist()[0] and frame.logprob[0] > frame.logprob[1]
    assert res.summary().best_answer.tolist() == [" Paris", " Warsaw"]
    # The next-token distribution against the model's own logits at the last position.
    with torch.no_grad():
        logits = smollm2(smollm2.to_tokens("The capital of France is"))[0, -1].double()
    probs = logits.softmax(-1)
    # predict ran both prompts in one padded float32 batch, this the prompt alone: the logits
    # agree to float32 rounding of other matrix shapes (about 1e-4, the tolerance the model-kind
    # comparisons use for top_probs), which moves a probability by at most a quarter of it. On
    # an AVX2 CPU the top probability differed by 1.8e-5 (atol 1e-5 held on an AVX-512 one).
    np.testing.assert_allclose(res.top_probs[0], probs.topk(10).values, atol=1e-4)
    # The model's own greedy continuation is greedy by definition; one changed word is not.
    made = mp.generate(smollm2, "The capital of France is", max_new_tokens=2, progress=False)
    said = made.completions[0]  # " Paris." (4 tokens end in "\n", "\n", which re-encode as one)
    assert smollm2.tokenizer(said, add_special_tokens=False)["input_ids"] == list(made.tokens[0])
    four = mp.generate(smollm2, "The capital of France is", max_new_tokens=4, progress=False)
    scored = mp.predict(smollm2, "The capital of France is", four, progress=False)
    assert scored.greedy.tolist() == [True]  # as generated: " Paris", ".", "\n", "\n"
    assert scored.logprob[0] == pytest.approx(float(four.logprobs[0].sum()), abs=1e-3)
    changed = said.replace(" Paris", " Lyon")
    assert said != changed
    again = mp.predict(smollm2, "The capital of France is", [[said, changed]], progress=False)
    assert again.greedy.tolist() == [True, False]
    assert again.logprob[0] == pytest.approx(float(made.logprobs[0].sum()), abs=1e-3)
