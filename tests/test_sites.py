from __future__ import annotations

import pytest
import torch

import mechprobe as mp
from mechprobe.core._sites import resolve_site, resolve_sites


def test_site_renders_hook_names():
    assert mp.Site("resid_pre", 0).hook_name == "blocks.0.hook_resid_pre"
    assert mp.Site("resid_mid", 2).hook_name == "blocks.2.hook_resid_mid"
    assert mp.Site("attn_out", 1).hook_name == "blocks.1.hook_attn_out"
    assert mp.Site("head", 1, head=3).hook_name == "blocks.1.attn.hook_z"
    assert mp.Site.parse("blocks.7.hook_mlp_out") == mp.Site("mlp_out", 7)


def test_every_site_kind_is_a_hook_of_the_bridge(tiny):
    for kind in ("resid_pre", "resid_mid", "mlp_in", "resid_post", "attn_out", "mlp_out"):
        for layer in range(tiny.cfg.n_layers):
            assert mp.Site(kind, layer).hook_name in tiny.hook_dict


def test_unknown_kind_suggests_the_closest():
    with pytest.raises(ValueError, match="mlp_out"):
        mp.Site("mlp_outt", 1)  # type: ignore[arg-type]


def test_out_of_range_layer_fails_before_running(tiny):
    with pytest.raises(ValueError, match=r"out of range.*3 layers"):
        resolve_site(tiny, mp.Site("resid_post", 3))
    assert resolve_site(tiny, mp.Site("resid_post", -1))[0] == "blocks.2.hook_resid_post"


def test_unknown_hook_string_lists_close_names(tiny):
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post"):
        resolve_site(tiny, "blocks.1.hook_resid_pots")


def test_head_validation(tiny):
    with pytest.raises(ValueError, match="head="):
        mp.Site("head", 0)
    with pytest.raises(ValueError, match="4 heads"):
        resolve_site(tiny, mp.Site("head", 0, head=9))
    with pytest.raises(ValueError, match="only applies"):
        mp.Site("mlp_out", 0, head=1)


def test_plain_strings_are_accepted(tiny):
    names = [n for n, _ in resolve_sites(tiny, ["hook_embed", "blocks.0.mlp.hook_post"])]
    assert names == ["hook_embed", "blocks.0.mlp.hook_post"]


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post", "attn_out", "mlp_out"])
def test_a_hook_points_own_name_is_its_site(tiny, kind):
    """A bridge's HookPoints carry their own names (hook_resid_post is blocks.1.hook_out), which
    its caches and messages show: those names are the same sites."""
    own = tiny.hook_dict[mp.Site(kind, 1).hook_name].name
    assert resolve_site(tiny, own) == (own, mp.Site(kind, 1))
    ours = mp.patch(tiny, "A cat", "A bat", own, -1, mp.logit_diff(1, 2), progress=False)
    theirs = mp.patch(tiny, "A cat", "A bat", mp.Site(kind, 1), -1, mp.logit_diff(1, 2))
    assert ours.sites == theirs.sites
    assert ours.values.tolist() == theirs.values.tolist()


def test_messages_name_the_site_not_the_bridges_own_hook(tiny):
    tokens = tiny.to_tokens("A cat")
    bad = mp.Replace(torch.zeros(3, 5, tiny.cfg.d_model))
    with (
        pytest.raises(ValueError, match=r"at blocks\.1\.hook_resid_post:"),
        mp.intervene(tiny, {mp.Site("resid_post", 1): bad}),
    ):
        tiny(tokens)
