"""Degenerate but legal inputs get an honest NaN, None or a warning, never a plausible number.

Each case was found by a review that fed every analysis such inputs (2026-12-04): before these
fixes each returned a number a researcher would read as a finding.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import mechprobe as mp

METRIC = mp.logit_diff(1, 2)


def test_a_mean_over_one_reference_token_warns_that_ablating_to_it_is_a_no_op(tiny):
    with pytest.warns(UserWarning, match="over 1 reference token") as caught:
        res = mp.ablate_cells(
            tiny, ["Hi cat sat"], "mlp_out", -1, METRIC, reference_positions=-1, n_random=0,
            progress=False,
        )  # fmt: skip
    assert caught[0].filename == __file__  # it points at the user's call
    assert np.abs(res.values - res.clean_metric).max() < 1e-4  # the no-op the warning names
    with warnings.catch_warnings():  # real ablations: no warning
        warnings.simplefilter("error")
        res = mp.ablate_cells(
            tiny, ["Hi cat sat"], "mlp_out", -1, METRIC, n_random=0, progress=False
        )  # fmt: skip  (the mean over every token)
        assert np.abs(res.values - res.clean_metric).max() > 1e-3
        other = mp.ablate_cells(tiny, ["Hi cat sat"], "mlp_out", 1, METRIC, n_random=0,
                                reference_positions=-1, progress=False)  # fmt: skip
        assert np.abs(other.values - other.clean_metric).max() > 1e-3  # another token's value
        ref = mp.ablate_cells(tiny, ["Hi cat sat"], "mlp_out", -1, METRIC, n_random=0,
                              reference=["The dog ran far"], reference_positions=-1,
                              progress=False)  # fmt: skip
        assert np.abs(ref.values - ref.clean_metric).max() > 1e-3
        mp.ablate_cells(tiny, "Hi cat sat", "pattern", -1, METRIC, layers=[0], n_random=0,
                        reference=["The dog ran far away"], progress=False)  # fmt: skip


def test_a_mean_over_no_reference_token_is_refused(tiny):
    # Review 42a S6: a BOS-only prompt as its own reference gave NaN in every cell, and only
    # "the metric is not finite" was said.
    with pytest.raises(ValueError, match=r"reference prompts \(1\) have no token after their BOS"):
        mp.ablate_cells(tiny, [""], "mlp_out", -1, METRIC, n_random=0, progress=False)
    res = mp.ablate_cells(tiny, [""], "mlp_out", -1, METRIC, reference=["Hi cat"], n_random=0,
                          progress=False)  # fmt: skip
    assert np.isfinite(res.values).all()


def test_a_pattern_mean_from_one_prompt_warns(tiny):
    with pytest.warns(UserWarning, match="comes from the one prompt ablated"):
        mp.ablate_cells(tiny, "Hi cat sat", "pattern", -1, METRIC, layers=[0], n_random=0,
                        progress=False)  # fmt: skip


def test_a_constant_control_task_is_skipped():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3, 8))
    y = rng.integers(0, 2, 200)
    X[:, 1, 0] += 3 * y
    with pytest.warns(UserWarning, match="same label"):
        res = mp.probe_layers(X, y, groups=np.zeros(200, int), progress=False)
    frame = res.to_frame()
    assert frame["control_accuracy"].isna().all() and frame["selectivity"].isna().all()


def test_argument_rates_are_nan_when_no_argument_is_known(tiny):
    o = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    contexts, targets = ["Hi there", "A cat"], [" a", " b"]
    res = mp.ovector_intervention(tiny, {"o": o}, contexts, targets, layers=[1], progress=False)
    got = res.metrics("o")
    assert np.isnan(got["argument_top1_before"]) and np.isnan(got["argument_top1_after"])
    known = mp.ovector_intervention(
        tiny, {"o": o}, contexts, targets, layers=[1], arguments=[" x", " y"], progress=False
    ).metrics("o")
    assert 0.0 <= known["argument_top1_before"] <= 1.0


def test_ffn_attribution_skips_items_whose_argument_is_their_answer():
    ranks = np.array([[5, 2, 0]] * 3)
    traj = mp.Trajectory(
        task="copy", arguments=(" a", " b", " c"), answers=(" a", " b", " c"),
        argument_rank=ranks, answer_rank=ranks, argument_rank_no_ffn=ranks + 1,
        answer_rank_no_ffn=ranks + 1, correct=np.ones(3, bool), distinct=np.zeros(3, bool),
    )  # fmt: skip
    got = traj.ffn_attribution(2)
    assert got["n"] == 0
    assert all(np.isnan(v) for k, v in got.items() if k != "n")


def test_no_largest_gain_layer_without_a_gain():
    y = np.random.default_rng(0).integers(0, 2, 200)
    summary = mp.cumulative_scores(np.zeros((200, 4, 8)), y, progress=False).summary()
    assert summary["largest_gain_layer"].iloc[0] is None


def test_one_layer_has_no_largest_gain_layer():
    # A single prefix has no gain (its delta is NaN); the summary named layer 0 regardless.
    X = np.random.default_rng(0).normal(size=(120, 1, 4))
    scores = mp.cumulative_scores(X, X[:, 0, 0] > 0, progress=False)
    assert np.isnan(scores.deltas[0]) and scores.scores[0] > 0.9
    assert scores.summary()["largest_gain_layer"].iloc[0] is None


def test_path_patch_with_equal_runs_warns_and_summaries_do_not_anchor_a_scale(tiny):
    with pytest.warns(UserWarning, match="normalised recovery is undefined"):
        res = mp.path_patch(tiny, "Hi cat", "Hi cat", "head", "final", METRIC, layers=[0],
                            n_random=0, progress=False)  # fmt: skip
    assert np.isnan(res.normalised).all()
    with pytest.warns(UserWarning, match="normalised recovery is undefined"):
        patched = mp.patch(tiny, "Hi cat", "Hi cat", "mlp_out", -1, METRIC, n_random=0,
                           progress=False)  # fmt: skip
    assert patched.summary()["normalised"].isna().all()
