"""Positions by name (``{"S2": per-pair ints, "END": -1}``) in every patching function: each name
is one column, patched at its own index in each pair, and equals the same cell run pair by pair
at that index (review 33b F1: IOI's templates put S2 at different offsets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import mechprobe as mp
from tests.conftest import hook_count

# Byte-level tiny tokenizer, BOS first: the pairs differ at index 3 ("c"/"x") and at index 5
# ("d"/"y") of the second pair, two templates of different lengths.
CLEAN = ["A cat", "Say dog"]
CORRUPT = ["A xat", "Say dyg"]
X = [3, 6]  # the differing token's index in each pair
METRIC = mp.logit_diff(100, 101)


def _per_pair(run, at):
    """The same analysis run on each pair alone at its own int positions: ``(per_pair,
    random)`` with the pair axis joined."""
    parts = [run(c, k, ps) for c, k, ps in zip(CLEAN, CORRUPT, at, strict=True)]
    return (
        np.concatenate([p.per_pair for p in parts]),
        np.concatenate([p.random for p in parts], axis=1),
    )


def test_patch_by_name_equals_each_pair_at_its_index(tiny):
    named = mp.patch(
        tiny, CLEAN, CORRUPT, "mlp_out", {"X": X, "END": -1}, METRIC, n_random=2, progress=False
    )

    def alone(c, k, ps):
        return mp.patch(tiny, c, k, "mlp_out", ps, METRIC, n_random=2, progress=False)

    per_pair, random = _per_pair(alone, [[3, -1], [6, -1]])
    np.testing.assert_allclose(named.per_pair, per_pair, atol=1e-5)
    # controls are keyed by the pair's tokens, so they agree too
    np.testing.assert_allclose(named.random, random, atol=1e-5)
    frame = named.to_frame()
    assert frame["position"].tolist()[:2] == ["X", "END"]
    assert frame["position_label"].tolist()[:2] == ["X", "END"]
    assert named.positions == ("X", "END")
    # the patch at X moves the metric (the tokens differ there): not a column of zeros
    assert np.abs(named.effect[:, 0]).max() > 1e-3


def test_attribution_patch_by_name(tiny):
    named = mp.attribution_patch(
        tiny, CLEAN, CORRUPT, "head", {"X": X}, METRIC, n_random=1, progress=False
    )

    def alone(c, k, ps):
        return mp.attribution_patch(tiny, c, k, "head", ps, METRIC, n_random=1, progress=False)

    per_pair, random = _per_pair(alone, [[3], [6]])
    np.testing.assert_allclose(named.per_pair, per_pair, atol=1e-5)
    np.testing.assert_allclose(named.random, random, atol=1e-5)
    assert named.position_labels == ("X",)


def test_ablate_cells_by_name(tiny):
    # numpy per-prompt ints are taken as the list they hold
    named = mp.ablate_cells(
        tiny, CLEAN, "attn_out", {"X": np.array(X)}, METRIC, n_random=1, progress=False
    )
    parts = [
        mp.ablate_cells(tiny, c, "attn_out", p, METRIC, reference=CLEAN, n_random=1, progress=False)
        for c, p in zip(CLEAN, X, strict=True)
    ]
    np.testing.assert_allclose(
        named.per_pair, np.concatenate([p.per_pair for p in parts]), atol=1e-5
    )


def test_path_patch_by_name(tiny):
    named = mp.path_patch(
        tiny, CLEAN, CORRUPT, "head", "final", METRIC, positions={"X": X, "END": -1},
        n_random=1, progress=False,
    )  # fmt: skip

    def alone(c, k, ps):
        return mp.path_patch(
            tiny, c, k, "head", "final", METRIC, positions=ps, n_random=1, progress=False
        )

    per_pair, random = _per_pair(alone, [[3, -1], [6, -1]])
    np.testing.assert_allclose(named.per_pair, per_pair, atol=1e-5)
    np.testing.assert_allclose(named.random, random, atol=1e-5)
    assert named.positions == ("X", "END")


def test_templates_run_apart_join_by_name(tiny):
    """Per-template runs with the same names join into the run over every pair."""
    whole = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", {"X": X}, METRIC, progress=False)
    parts = [
        mp.patch(tiny, c, k, "mlp_out", {"X": p}, METRIC, progress=False)
        for c, k, p in zip(CLEAN, CORRUPT, X, strict=True)
    ]
    joined = mp.PatchResult.concat(parts)
    np.testing.assert_allclose(joined.values, whole.values, atol=1e-5)
    np.testing.assert_allclose(joined.normalised, whole.normalised, atol=1e-5)


def test_named_result_round_trips_and_draws(tiny, tmp_path):
    res = mp.patch(
        tiny, CLEAN, CORRUPT, "head", {"X": torch.tensor(X)}, METRIC, n_random=0, progress=False
    )
    res.save(tmp_path / "named.json")
    back = mp.PatchResult.load(tmp_path / "named.json")
    assert back.positions == ("X",)
    np.testing.assert_array_equal(back.values, res.values)
    assert isinstance(res.plot(), Figure)
    summary = res.summary()
    assert set(summary["position"].dropna()) == {"X"}


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ({}, "names no position"),
        ({"X": [3]}, r"one int per pair \(2 here\)"),
        ({3: 1}, "non-empty strings as names"),
        ({"": 1}, "non-empty strings as names"),
        ({"X": "3"}, "must be an int"),
        ({"X": [3, 2.0]}, "must be an int"),
        ({"X": [3, 40]}, r"positions\['X'\] is 40 for pair 1"),
        ({"X": -9}, r"positions\['X'\] is -9 for pair 0"),
    ],
)
def test_bad_named_positions_are_refused_before_any_pass(tiny, positions, message):
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=message):
        mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", positions, METRIC, progress=False)
    assert hook_count(tiny) == before


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_results_record_each_pairs_indices(tiny, tmp_path, direction):
    """Review 35a F3: a saved result said 'S2' and no longer which token each pair patched."""
    clean, corrupt = ["A cat", "Say dog"], ["A xat", "Say dogs"]  # pair 1: corrupt one longer
    named = {"X": X, "END": -1}
    want = ((3, 3), (5, 5)), ((6, 6), (7, 8))  # 6 and 8 tokens; 9 in the longer corrupt
    res = mp.patch(tiny, clean, corrupt, "mlp_out", named, METRIC, n_random=0,
                   direction=direction, progress=False)  # fmt: skip
    assert res.position_indices == want
    res.save(tmp_path / "r.json")
    assert mp.PatchResult.load(tmp_path / "r.json").position_indices == want
    estimate = mp.attribution_patch(tiny, clean, corrupt, "mlp_out", named, METRIC,
                                    direction=direction, progress=False)  # fmt: skip
    assert estimate.position_indices == want
    paths = mp.path_patch(tiny, clean, corrupt, "mlp_out", "final", METRIC, positions=named,
                          direction=direction, n_random=0, progress=False)  # fmt: skip
    assert paths.position_indices == want
    ablated = mp.ablate_cells(tiny, clean, "mlp_out", named, METRIC, n_random=0, progress=False)
    assert ablated.position_indices == (((3, 3), (5, 5)), ((6, 6), (7, 7)))
    joined = mp.PatchResult.concat(
        [mp.patch(tiny, c, k, "mlp_out", {"X": x, "END": -1}, METRIC, n_random=0,
                  direction=direction, progress=False)
         for c, k, x in zip(clean, corrupt, X, strict=True)]
    )  # fmt: skip
    assert joined.position_indices == want
    assert mp.patch(tiny, clean[0], corrupt[0], "mlp_out", -1, METRIC).position_indices == ()


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_a_pair_of_ints_names_the_clean_and_the_corrupt_index(tiny, direction):
    """Review 35a F8: a name whose token sits at different indices in the clean and the corrupt
    prompt (a longer name before it): (clean, corrupt) per pair, written by hand with mp.run."""
    clean, corrupt = "A cat sat", "A bbat sat"  # "sat" at 6 in clean, 7 in corrupt
    res = mp.patch(tiny, clean, corrupt, "mlp_out", {"sat": [(6, 7)]}, METRIC, n_random=0,
                   direction=direction, progress=False)  # fmt: skip
    assert res.position_indices == (((6, 7),),)
    source, run, at_source, at_run = (
        (clean, corrupt, 6, 7) if direction == "denoising" else (corrupt, clean, 7, 6)
    )
    for layer in range(tiny.cfg.n_layers):
        site = mp.Site("mlp_out", layer)
        value = mp.run(tiny, source, capture=[site])[site][0, at_source]
        out = mp.run(tiny, run, {site: mp.Replace(value, positions=at_run)}, logit_positions=-1)
        logits = torch.as_tensor(out.logits)[0, -1]
        expected = float(logits[100] - logits[101])
        assert res.per_pair[0, layer, 0] == pytest.approx(expected, abs=1e-4)
    # ablations have one prompt each: a pair of ints is refused there
    with pytest.raises(ValueError, match="one int per prompt"):
        mp.ablate_cells(tiny, clean, "mlp_out", {"sat": [(6, 7)]}, METRIC, progress=False)
