"""Groups of sites written as one cell (``sites={"circuit": [...]}``) in patch, ablate_cells and
attribution_patch, against the same edits written by hand with mechprobe.run (review 33b F2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import mechprobe as mp
from tests.conftest import hook_count

CLEAN = ["A cat", "Say dog"]
CORRUPT = ["A xat", "Say dyg"]
ANS, WRONG = 100, 101
METRIC = mp.logit_diff(ANS, WRONG)
HEADS = [mp.Site("head", 0, head=0), mp.Site("head", 1, head=1)]
GROUPS = {"circuit": HEADS, "late": ["mlp_out@1", "attn_out@2"]}


def _last_metric(out) -> np.ndarray:
    logits = torch.as_tensor(out.logits)[:, -1].double()
    return (logits[:, ANS] - logits[:, WRONG]).numpy()


def _patched_by_hand(model, sites, position: int) -> np.ndarray:
    """Each pair's corrupt run with every site set, at ``position``, to the clean run's value."""
    values = []
    for clean, corrupt in zip(CLEAN, CORRUPT, strict=True):
        caught = mp.run(model, clean, capture=sites)
        edits = {
            mp.Site.parse(site) if isinstance(site, str) else site: mp.Replace(
                caught[site][:, position], positions=position
            )
            for site in sites
        }
        values.append(_last_metric(mp.run(model, corrupt, edits, logit_positions=-1))[0])
    return np.array(values)


def test_patch_group_equals_every_site_patched_at_once(tiny):
    res = mp.patch(tiny, CLEAN, CORRUPT, GROUPS, -1, METRIC, n_random=1, progress=False)
    for row, sites in enumerate(GROUPS.values()):
        np.testing.assert_allclose(
            res.per_pair[:, row, 0], _patched_by_hand(tiny, sites, -1), atol=1e-4
        )
    assert res.sites == ("circuit", "late")
    assert res.kinds == ("group", "group")
    assert res.members[0] == ("head@0, head 0", "head@1, head 1")
    frame = res.to_frame()
    assert frame["layer"].isna().all() and frame["head"].isna().all()
    # a group is not the sum of its parts: each site's own cell differs from the group's
    alone = mp.patch(tiny, CLEAN, CORRUPT, HEADS, -1, METRIC, n_random=0, progress=False)
    assert not np.allclose(alone.per_pair[:, 0, 0], res.per_pair[:, 0, 0])


def test_ablate_group_equals_run_with_both_ablations(tiny):
    """Review 33b F2's failing case: one row equal to mp.run with both Ablates."""
    res = mp.ablate_cells(tiny, CLEAN, {"c": HEADS}, None, METRIC, method="zero", n_random=0)
    out = mp.run(tiny, CLEAN, {site: mp.Ablate("zero") for site in HEADS}, logit_positions=-1)
    np.testing.assert_allclose(res.per_pair[:, 0, 0], _last_metric(out), atol=1e-4)
    assert res.values.shape == (1, 1)


def test_mean_ablate_group_uses_each_sites_mean(tiny):
    res = mp.ablate_cells(tiny, CLEAN, {"c": HEADS}, -1, METRIC, n_random=0, progress=False)
    # each head's mean over every token of the prompts but the leading BOS, by hand
    means = {
        site: torch.cat([mp.run(tiny, p, capture=[site])[site][0, 1:] for p in CLEAN]).mean(0)
        for site in HEADS
    }
    out = mp.run(
        tiny,
        CLEAN,
        {site: mp.Ablate(mean=means[site], positions=-1) for site in HEADS},
        logit_positions=-1,
    )
    np.testing.assert_allclose(res.per_pair[:, 0, 0], _last_metric(out), atol=1e-4)


def test_attribution_of_a_group_is_the_sum_of_its_sites(tiny):
    sites = [*HEADS, mp.Site("mlp_out", 1)]
    grouped = mp.attribution_patch(
        tiny, CLEAN, CORRUPT, {"all": sites}, -1, METRIC, n_random=0, progress=False
    )
    alone = mp.attribution_patch(tiny, CLEAN, CORRUPT, sites, -1, METRIC, progress=False)
    base = alone.corrupt[:, None]
    np.testing.assert_allclose(
        grouped.per_pair[:, 0, 0], base[:, 0] + (alone.per_pair[:, :, 0] - base).sum(1), atol=1e-5
    )


def test_group_result_round_trips_and_draws(tiny, tmp_path):
    res = mp.patch(tiny, CLEAN, CORRUPT, GROUPS, [-2, -1], METRIC, n_random=0, progress=False)
    res.save(tmp_path / "groups.json")
    back = mp.PatchResult.load(tmp_path / "groups.json")
    assert back.members == res.members and back.layers == (None, None)
    assert isinstance(res.plot(), Figure)
    mixed = mp.patch(
        tiny, CLEAN, CORRUPT, {"c": HEADS, **{"one": ["mlp_out@0"]}}, [-2, -1], METRIC,
        n_random=0, progress=False,
    )  # fmt: skip
    assert isinstance(mixed.plot(), Figure)


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        ({}, "names no group"),
        ({"": HEADS}, "non-empty strings"),
        ({"c": []}, "empty|no site|at least"),
        ({"c": ["nope@1"]}, "nope"),
    ],
)
def test_bad_groups_are_refused_before_any_pass(tiny, sites, message):
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=message):
        mp.patch(tiny, CLEAN, CORRUPT, sites, -1, METRIC, progress=False)
    assert hook_count(tiny) == before
