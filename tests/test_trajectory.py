"""Early-decoding trajectories against per-layer decoding by hand; the stage rules on planted Xs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.relational._trajectory import Stages


def _rank(logits: torch.Tensor, token: int) -> int:
    return int((logits > logits[token]).sum())


def _task(n: int = 4) -> mp.Task:
    return mp.load_task("capitals").with_shots(1).subset(n, seed=2)


def test_trajectory_equals_per_layer_decoding_by_hand(tiny):
    task = _task()
    traj = mp.trajectory(tiny, task, batch_size=3)
    for i, (prompt, arg, ans) in enumerate(
        zip(task.prompts(), task.arguments(), task.answers(), strict=True)
    ):
        arg_id = tiny.tokenizer(arg, add_special_tokens=False)["input_ids"][0]
        ans_id = tiny.tokenizer(ans, add_special_tokens=False)["input_ids"][0]
        _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        for layer in range(tiny.cfg.n_layers):
            with torch.no_grad():
                post = tiny.unembed(tiny.ln_final(cache[f"blocks.{layer}.hook_resid_post"]))[0, -1]
                # resid_post - mlp_out is the stream between attention and FFN: resid_mid.
                mid = tiny.unembed(tiny.ln_final(cache[f"blocks.{layer}.hook_resid_mid"]))[0, -1]
            assert traj.argument_rank[i, layer] == _rank(post, arg_id)
            assert traj.answer_rank[i, layer] == _rank(post, ans_id)
            assert traj.argument_rank_no_ffn[i, layer] == _rank(mid, arg_id)
            assert traj.answer_rank_no_ffn[i, layer] == _rank(mid, ans_id)


def test_trajectory_agrees_with_the_logit_lens(tiny):
    task = _task(3)
    traj = mp.trajectory(tiny, task)
    targets = [[a, b] for a, b in zip(task.arguments(), task.answers(), strict=True)]
    lens = mp.logit_lens(tiny, task.prompts(), sites=["resid_post", "resid_mid"], targets=targets)
    post, mid = lens.entries("resid_post"), lens.entries("resid_mid")
    assert np.array_equal(lens.target_rank[:, post, 0], traj.argument_rank)
    assert np.array_equal(lens.target_rank[:, post, 1], traj.answer_rank)
    assert np.array_equal(lens.target_rank[:, mid, 0], traj.argument_rank_no_ffn)
    assert np.array_equal(lens.target_rank[:, mid, 1], traj.answer_rank_no_ffn)


def test_patchscope_reads_the_ffn_removed_stream_after_the_block(tiny):
    """Under a Patchscope the FFN-removed readout is resid_mid[l] placed where layer l's output
    goes in the target prompt; placed at resid_mid, the target's own FFN added the update back
    and both curves were identical on every model."""
    task = _task(3)
    scope = mp.Patchscope()
    traj = mp.trajectory(tiny, task, lens=scope)
    n = tiny.cfg.n_layers
    ids, place = scope.tokens(tiny)
    for i, (prompt, arg, ans) in enumerate(
        zip(task.prompts(), task.arguments(), task.answers(), strict=True)
    ):
        arg_id = tiny.tokenizer(arg, add_special_tokens=False)["input_ids"][0]
        ans_id = tiny.tokenizer(ans, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        for layer in range(n):
            mid = cache[f"blocks.{layer}.hook_resid_mid"][0, -1]

            def place_it(act, hook, v=mid):
                act[:, place] = v
                return act

            with torch.no_grad():
                logits = tiny.run_with_hooks(
                    torch.tensor([ids]), fwd_hooks=[(f"blocks.{layer}.hook_resid_post", place_it)]
                )[0, -1]
            assert traj.argument_rank_no_ffn[i, layer] == _rank(logits, arg_id)
            assert traj.answer_rank_no_ffn[i, layer] == _rank(logits, ans_id)
    assert not np.array_equal(traj.argument_rank_no_ffn, traj.argument_rank)


def test_last_layer_is_the_models_own_prediction(tiny):
    task = _task(5)
    traj = mp.trajectory(tiny, task)
    score = mp.score_task(tiny, task)
    # The lens at the last layer is the model's output: the answer's rank there is the score's.
    assert np.array_equal(traj.answer_rank[:, -1], score.first_rank)


def _planted(arg_rr: list[float], ans_rr: list[float], n: int = 3) -> mp.Trajectory:
    """A trajectory whose every item has the given reciprocal ranks (1 / (rank + 1))."""
    to_rank = lambda rr: np.rint(1.0 / np.asarray(rr) - 1.0).astype(np.int64)  # noqa: E731
    arg = np.tile(to_rank(arg_rr), (n, 1))
    ans = np.tile(to_rank(ans_rr), (n, 1))
    return mp.Trajectory(
        task="planted",
        arguments=(" a",) * n,
        answers=(" b",) * n,
        argument_rank=arg,
        answer_rank=ans,
        argument_rank_no_ffn=arg,
        answer_rank_no_ffn=ans,
        correct=np.ones(n, dtype=bool),
        distinct=np.ones(n, dtype=bool),
    )


def test_stage_rules_on_a_planted_x():
    # Layers:      0      1      2     3     4     5     6     7
    arg = [1 / 1000, 1 / 500, 1 / 4, 1 / 2, 1 / 3, 1 / 5, 1 / 8, 1 / 10]
    ans = [1 / 800, 1 / 900, 1 / 50, 1 / 9, 1 / 2, 1 / 2, 1 / 1, 1 / 1]
    st = _planted(arg, ans).stages()
    # Layer 0's answer is ahead by noise; the last crossing (layer 4) is the function layer.
    assert st == mp.Stages(argument_layer=3, function_layer=4, saturation_layer=6)
    assert _planted(arg, ans).stages(saturation=0.5).saturation_layer == 4


def test_invisible_tokens_do_not_decide_the_crossing():
    # Neither token is visible before layer 5; the answer is ahead there only by noise.
    arg = [1 / 5000, 1 / 3000, 1 / 4000, 1 / 2000, 1 / 1000, 1 / 900, 1 / 500, 1 / 3]
    ans = [1 / 4000, 1 / 2500, 1 / 3000, 1 / 1500, 1 / 800, 1 / 10, 1 / 3, 1 / 1]
    assert _planted(arg, ans).stages() == mp.Stages(None, 5, 7)  # no argument stage
    assert _planted(arg, ans).stages(visible=0.0) == mp.Stages(None, 0, 7)
    with pytest.raises(ValueError, match="visible"):
        _planted(arg, ans).stages(visible=2.0)


def test_stage_rules_when_answer_leads_from_the_start_and_when_it_never_does():
    st = _planted([1 / 9, 1 / 9, 1 / 9], [1 / 2, 1 / 1, 1 / 1]).stages()
    assert st == mp.Stages(None, 0, 1)  # extractive-like: no argument stage
    assert _planted([1, 1, 1], [1 / 2, 1 / 2, 1 / 2]).stages() == mp.Stages(None, None, None)


def test_ffn_attribution_counts_items(tiny):
    traj = _planted([1 / 3, 1 / 4], [1 / 2, 1 / 1])
    arg0 = traj.argument_rank.copy()
    ans0 = traj.answer_rank.copy()
    arg0[:2, 1], ans0[:2, 1] = 0, 5  # removing the FFN brings the argument back in 2 of 3 items
    planted = mp.Trajectory(
        **{**traj.__dict__, "argument_rank_no_ffn": arg0, "answer_rank_no_ffn": ans0}
    )
    out = planted.ffn_attribution(1)
    assert out["argument_top1_after_removal"] == pytest.approx(2 / 3)
    assert out["argument_above_answer_after_removal"] == pytest.approx(2 / 3)
    assert out["argument_top1_before_removal"] == 0.0 and out["n"] == 3
    with pytest.raises(ValueError, match="layer must be between -2 and 1, got 7"):
        planted.ffn_attribution(7)
    with pytest.raises(ValueError, match="pass layer="):
        mp.ffn_attribution(tiny, _task(2))  # the random model answers nothing correctly
    # The dict says which lens decoded it, as a Trajectory does (it did not).
    tuned = mp.ffn_attribution(tiny, _task(2), layer=1, lens=mp.TunedLens.identity(tiny))
    assert tuned["lens"] == mp.TunedLens.identity(tiny).describe() and tuned["layer"] == 1
    assert mp.ffn_attribution(tiny, _task(2), layer=1)["lens"] == "logit"


def test_roundtrip_frame_and_plot(tiny):
    traj = mp.trajectory(tiny, _task(3))
    back = mp.Trajectory.from_dict(traj.to_dict())
    assert traj.to_dict()["format"] == "mechprobe.Trajectory"
    assert np.array_equal(back.answer_rank_no_ffn, traj.answer_rank_no_ffn)
    frame = traj.to_frame()
    assert len(frame) == 4 * 3 * tiny.cfg.n_layers
    row = frame.query("item == 1 and layer == 2 and role == 'answer' and readout == 'resid_post'")
    assert int(row["rank"].iloc[0]) == traj.answer_rank[1, 2]
    assert traj.plot().axes
    # Stage labels inside the axes (above them they pushed the title up across white space)
    ax = traj.plot(stages=Stages(0, 2, 2)).axes[0]
    labels = {text.get_text(): text.get_position() for text in ax.texts}
    assert set(labels) == {"argument", "function = saturation"}
    assert all(y <= 1.0 for _, y in labels.values())


@pytest.mark.integration
def test_smollm2_capitals_x(smollm2):
    traj = mp.trajectory(smollm2, mp.load_task("capitals").with_shots(3).subset(12, seed=0))
    st = traj.stages()
    assert st.function_layer is not None and st.saturation_layer is not None
    assert st.saturation_layer >= st.function_layer
    # Correct items: the answer is the top token at the last layer.
    assert np.all(traj.answer_rank[traj.included, -1] == 0)


def test_nan_lens_logits_raise():
    # The lens readout ranks tokens by counting larger logits: a NaN one would rank everything 0.
    from mechprobe.relational._trajectory import _ranks

    model = mp.tiny_model(seed=3)
    with torch.no_grad():
        model.W_U[:, 7] = float("nan")
    with pytest.raises(ValueError, match="logit tensor at layer 0"):
        _ranks(
            model,
            torch.zeros(2, 3, 64),
            torch.zeros(2, 1, dtype=torch.long),
            mp.LogitLens(),
            "resid_post",
        )
