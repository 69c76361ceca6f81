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


def _hooked(**cfg):
    """A HookedTransformer built from its own config (TransformerLens 3.x only)."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except (ImportError, AttributeError):
        pytest.skip("HookedTransformer needs TransformerLens 3.x (make test-tl3)")
    base = {"n_layers": 2, "d_model": 16, "n_ctx": 16, "d_head": 4, "n_heads": 4, "d_vocab": 50}
    torch.manual_seed(0)
    return HookedTransformer(HookedTransformerConfig(**{**base, "act_fn": "gelu", **cfg}))


def test_mlp_sites_of_an_attention_only_model_are_refused():
    # TransformerLens lists blocks.L.hook_mlp_out for attn_only models and never fires it: a patch
    # there returned the corrupt metric in every cell and an Add there changed nothing.
    model = _hooked(attn_only=True)
    assert "blocks.0.hook_mlp_out" in model.hook_dict
    clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    for call in (
        lambda: mp.patch(model, clean, corrupt, "mlp_out", "all", lambda lg: lg[:, 5], n_random=0),
        lambda: mp.run(model, mp.Batch(clean, torch.ones_like(clean), "right", ("",)),
                       {"blocks.0.hook_mlp_out": mp.Ablate()}),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="never fires: this model is attention-only"):
            call()
    patched = mp.patch(model, clean, corrupt, "attn_out", "all", lambda lg: lg[:, 5], n_random=0)
    assert patched.values.shape == (2, 4)  # layers x positions
    # Without a tokenizer the pairs are recorded as their ids (decoding them crashed).
    assert patched.clean_prompts == ("token ids [1, 2, 3, 4]",)


def test_ungrouped_key_value_heads_are_one_per_query_head():
    # With ungroup_grouped_query_attention, hook_k holds n_heads heads: mechprobe counted
    # n_key_value_heads (2), so k/v heads 2-3 were unreachable and head 1 was labelled as the
    # key of query heads (2, 3) while the patch wrote the slot query head 1 alone reads.
    model = _hooked(
        n_key_value_heads=2, ungroup_grouped_query_attention=True,
        positional_embedding_type="rotary",
    )  # fmt: skip
    _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    assert cache["blocks.0.attn.hook_k"].shape[2] == 4
    assert mp.core.head_count(model, "k") == 4
    assert mp.core.query_heads(model, mp.Site("k", 0, head=1)) == (1,)
    assert resolve_site(model, mp.Site("v", 1, head=3))[0] == "blocks.1.attn.hook_v"


def test_token_ids_beyond_a_smaller_output_vocabulary_are_refused():
    # d_vocab_out < d_vocab: ids were checked against the input vocabulary, and failed later
    # with a raw IndexError (a device-side assert on a GPU).
    tokenizer = mp.tiny_model().tokenizer
    model = _hooked(d_vocab=len(tokenizer), d_vocab_out=40)
    model.set_tokenizer(tokenizer)
    clean, corrupt = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
    with pytest.raises(ValueError, match=r"token id 45 is outside the vocabulary \(0..39\)"):
        mp.patch(model, clean, corrupt, "resid_pre", -1, mp.logit_diff(45, 7), n_random=0)
    high = tokenizer.decode([len(tokenizer) - 1])
    with pytest.raises(ValueError, match="beyond the model's 40 logits"):
        mp.logit_lens(model, "Hi", targets=high, progress=False)


def test_layers_take_ints_ranges_lists_arrays_or_all_and_refuse_the_rest() -> None:
    import numpy as np

    from mechprobe.core import resolve_layers

    model = mp.tiny_model()
    for layers, want in (("all", [0, 1, 2]), (-1, [2]), (range(1, 3), [1, 2]), ((0, -1), [0, 2]),
                         (np.array([0, 2]), [0, 2]), (torch.tensor([1]), [1]),
                         (np.int64(1), [1]), (torch.tensor(2), [2])):  # fmt: skip
        assert resolve_layers(model, layers) == want, layers
    # 1.0 and True gave a bare "'float' object is not iterable"; a set an arbitrary order.
    for bad in (1.0, True, {0, 1}, None, torch.tensor(1.0), np.array([[0]])):
        with pytest.raises(TypeError, match="layers must be an int, a range, a list of ints"):
            resolve_layers(model, bad)
    with pytest.raises(TypeError, match=r"layers holds 1\.5"):
        resolve_layers(model, [0, 1.5])
    for bad, message in (([], "empty"), ([0, 0], "repeats"), ([3], "out of range")):
        with pytest.raises(ValueError, match=message):
            resolve_layers(model, bad)


def test_sites_of_the_wrong_type_are_named() -> None:
    # None or 3 gave "'NoneType' object is not iterable"; a Site in causal_trace or
    # train_tuned_lens "'Site' object is not iterable"; amnesic(model, "resid_post") called the
    # kind an unknown hook name while listing it among the kinds.
    model = mp.tiny_model()
    metric = mp.logit_diff(1, 2)
    for bad in (None, 3):
        with pytest.raises(TypeError, match="sites must be a site kind such as 'resid_post'"):
            mp.patch(model, "Hi cat", "Hi bat", bad, -1, metric, progress=False)
        with pytest.raises(TypeError, match="sites must be a site kind"):
            mp.collect(model, ["Hi"], bad, progress=False)
    with pytest.raises(ValueError, match=r"sites takes state kinds here .*got Site\("):
        mp.causal_trace(model, "The cat sat", "cat", sites=mp.Site("mlp_out", 1), progress=False)
    with pytest.raises(ValueError, match=r"translates the residual stream .*not Site\("):
        mp.train_tuned_lens(model, "train", sites=mp.Site("resid_post", 1), progress=False)
    with pytest.raises(ValueError, match=r"'resid_post' is a kind without its layer.*Site\("):
        mp.amnesic(model, "resid_post", mp.random_projection(64, 2), text=["Hi there"])


@pytest.mark.parametrize(("name", "kind"), [("z", "'head'"), ("result", "'head_out'")])
def test_transformerlens_short_names_point_at_the_kind(tiny, name, kind) -> None:
    # "result" was answered "Did you mean ['resid_post']?", "z" with no suggestion at all.
    with pytest.raises(ValueError, match=f"In TransformerLens '{name}' names what here is {kind}"):
        mp.patch(tiny, "Hi cat", "Hi bat", name, -1, mp.logit_diff(1, 2))
    with pytest.raises(ValueError, match=f"In TransformerLens '{name}' names what here is {kind}"):
        mp.Site(name, 0)
    # run and intervene, which take any hook name, said only "Unknown hook name".
    with pytest.raises(ValueError, match=f"In TransformerLens '{name}' names what here is {kind}"):
        mp.run(tiny, "Hi", capture=[name])


def test_a_block_hook_without_its_block_names_the_full_hook(tiny) -> None:
    # "hook_z" was answered "Closest valid names: ['hook_embed']".
    with pytest.raises(ValueError, match=r"carry their block: e.g. 'blocks.0.attn.hook_z'"):
        mp.run(tiny, "Hi", {"hook_z": mp.Ablate()})


def test_site_positions_from_index_arrays_are_plain_ints(tiny) -> None:
    # An index array (np.where, argmax) built a Site that failed on use: "unhashable type".
    import numpy as np

    for given, want in ((np.array([2]), (2,)), (torch.tensor([0, -1]), (0, -1)),
                        (np.int64(3), 3), (torch.tensor(-1), -1)):  # fmt: skip
        site = mp.Site("resid_post", 1, positions=given)
        assert site.positions == want and type(hash(site)) is int
    out = mp.run(tiny, "Hi there", capture=[mp.Site("resid_post", 1, positions=np.array([2]))])
    torch.testing.assert_close(
        out[mp.Site("resid_post", 1, positions=[2])],
        mp.run(tiny, "Hi there", capture=["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"][
            :, 2:3
        ],
    )


def test_a_capture_is_found_by_its_site_or_its_hook_name(tiny) -> None:
    # Captured as Site("resid_post", 1), looked up by "blocks.1.hook_resid_post": KeyError.
    site, name = mp.Site("resid_post", 1), "blocks.0.hook_mlp_out"
    out = mp.run(tiny, ["Hi there", "Yo"], capture=[site, name])
    assert out["blocks.1.hook_resid_post"] is out[site]
    assert out[mp.Site("mlp_out", 0)] is out[name]
    with pytest.raises(KeyError, match="was not captured"):
        out[mp.Site("resid_post", 1, positions=-1)]  # another selection: not the same capture


def test_a_long_run_of_positions_outside_a_prompt_is_named_by_its_ends(tiny) -> None:
    # The message listed every one of 194 positions.
    edit = mp.Add(torch.ones(tiny.cfg.d_model), positions=list(range(1, 200)))
    with pytest.raises(ValueError, match=r"Position\(s\) \[3, 4, \.\.\., 199\] \(197\) fall"):
        mp.run(tiny, "Hi", {mp.Site("resid_post", 1): edit})


def test_a_sites_label_parses_back_to_it() -> None:
    """Frames write a site as its label (``str(Site)``); Site.parse reads it back, for every kind
    and negative layers, and refuses what is no label, naming the form."""
    import typing

    for kind in typing.get_args(mp.core.SiteKind):
        head = 2 if kind in mp.core.HEAD_KINDS else None
        for layer in (0, 7, -1):
            site = mp.Site(kind, layer, head=head)
            assert mp.Site.parse(str(site)) == site
    assert mp.Site.parse("head@3", head=1) == mp.Site("head", 3, head=1)  # a label without head
    for bad in ["foo@1", "resid_post@x", "resid_post@٣", " resid_post@1", "mlp_out@1, head 2"]:
        with pytest.raises(ValueError, match=r"site label|head= only applies"):
            mp.Site.parse(bad)
    with pytest.raises(ValueError, match="the label says head 2"):
        mp.Site.parse("head@3, head 2", head=1)


def test_a_label_copied_from_a_frame_names_that_site(tiny) -> None:
    """``sites="mlp_out@1"`` was refused ("Did you mean ['mlp_out', 'mlp_in']?"): a label read
    off a result's frame now names its site wherever a Site does."""
    metric = mp.logit_diff(1, 2)
    label = mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", -1, metric, layers=[1], n_random=0)
    res = mp.patch(tiny, "Hi cat", "Hi bat", label.to_frame()["site"].tolist(), -1, metric,
                   n_random=0)  # fmt: skip
    assert res.sites == ("mlp_out@1",)
    assert res.values[0, 0] == pytest.approx(label.values[0, 0], abs=1e-6)
    assert resolve_site(tiny, "head@1, head 2") == (
        "blocks.1.attn.hook_z",
        mp.Site("head", 1, head=2),
    )
    zeroed = mp.run(tiny, "Hi cat", {"mlp_out@1": mp.Ablate()}).logits
    by_site = mp.run(tiny, "Hi cat", {mp.Site("mlp_out", 1): mp.Ablate()}).logits
    assert torch.equal(zeroed, by_site)
    with pytest.raises(ValueError, match="not a site label"):
        mp.patch(tiny, "Hi cat", "Hi bat", "mlp@1", -1, metric)


def test_a_site_takes_numpy_and_tensor_integers_as_every_layers_argument_does() -> None:
    # Site("mlp_out", np.int64(1)) was refused (a layer read off np.argsort of scores or a
    # result's layers array) while every layers= argument took it; head= took 2.0 and True.
    import numpy as np

    site = mp.Site("head_out", np.int64(1), head=torch.tensor(2))
    assert site == mp.Site("head_out", 1, head=2) and hash(site) == hash(mp.Site("head_out", 1, 2))
    assert type(site.layer) is int and type(site.head) is int and str(site) == "head_out@1, head 2"
    for layer, head in ((1.0, None), (True, None), (1, 2.0), (1, True)):
        kind = "mlp_out" if head is None else "head_out"
        with pytest.raises(TypeError, match=r"Site (layer|head) must be an int"):
            mp.Site(kind, layer, head=head)  # type: ignore[arg-type]


def test_a_site_passed_as_layers_is_named_as_a_site(tiny):
    # layer_sweep(model, data, "resid_post") (layers is its third argument) said only "layers
    # must be an int, ..."; the message now says where a site goes.
    from mechprobe.core._sites import resolve_layers

    for wrong in ("resid_post", "mlp_out@1", "blocks.0.hook_resid_post"):
        with pytest.raises(ValueError, match="that names a site; pass it as sites="):
            resolve_layers(tiny, wrong)
    with pytest.raises(ValueError, match=r"not 'al'\.$"):
        resolve_layers(tiny, "al")


def test_a_kind_where_one_site_goes_is_named_a_kind_without_its_layer(tiny):
    # das(site="resid_post") said "Unknown hook name 'resid_post'" and listed that very kind
    # among the valid ones; amnesic said it right (review 24b F10).
    with pytest.raises(ValueError, match=r"'resid_post' is a site kind without its layer"):
        mp.das(tiny, ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"], [5, 6], "resid_post",
               progress=False)  # fmt: skip
    with (
        pytest.raises(ValueError, match=r"pass Site\('mlp_out', layer\), its label 'mlp_out@"),
        mp.intervene(tiny, {"mlp_out": mp.Ablate()}),
    ):
        pass
