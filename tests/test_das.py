"""Distributed alignment search: a planted subspace is found, and every accuracy equals the same
interchange written by hand with plain TransformerLens hooks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hook_count

import mechprobe as mp

LAYER = 1


def _words(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    letters = list("abcdefghijklmnopqrstuvwxyz ")
    return ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(n)]


def _sharpened(tiny):
    """``tiny``'s weights with the final norm's weight x30: the same top tokens, sharper
    probabilities, so cross-entropy training aims at the top token (random weights leave the
    next-token distribution nearly flat). A fresh copy: the shared fixture is left alone."""
    kind = mp.core.model_adapter(tiny).kind
    model = mp.tiny_model(kind=kind)
    weight = [p for name, p in model.ln_final.named_parameters() if name.endswith(("w", "weight"))]
    with torch.no_grad():
        weight[0].mul_(30.0)
    return model


def _last(model, prompts, hooks=()):
    """Next-token logits at each prompt's last token, one prompt at a time (no padding), with
    plain TransformerLens hooks ``[(name, fn(activation, hook))]``."""
    rows = []
    for i, prompt in enumerate(prompts):
        tokens = model.to_tokens(prompt)
        bound = [(name, lambda act, hook, fn=fn, i=i: fn(act, i)) for name, fn in hooks]
        with torch.no_grad():
            rows.append(model.run_with_hooks(tokens, fwd_hooks=bound)[0, -1])
    return torch.stack(rows)


def _source_vectors(model, prompts, name):
    vectors = []
    for prompt in prompts:
        _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=name)
        vectors.append(cache[name][0, -1])
    return torch.stack(vectors)


def _setter(src, basis):
    """A plain hook body: the last token's ``h -> h + Bᵀ B (s_i - h)``."""
    basis = torch.tensor(basis)

    def fn(act, i):
        act = act.clone()
        h = act[0, -1]
        act[0, -1] = h + basis.T @ (basis @ (src[i] - h))
        return act

    return fn


def _interchange_by_hand(model, base, src, basis, name):
    """Top tokens of ``base`` with its last-token activation at ``name`` set to
    ``h + Bᵀ B (s - h)`` (B None: ``s``), written as a plain hook."""

    def fn(act, i):
        act = act.clone()
        h = act[0, -1]
        if basis is None:
            act[0, -1] = src[i]
        else:
            act[0, -1] = h + basis.T @ (basis @ (src[i] - h))
        return act

    return _last(model, base, [(name, fn)]).argmax(-1)


@pytest.fixture(scope="module")
def planted(tiny):
    """Pairs whose counterfactual is the top token after interchanging one planted direction
    ``u`` (the main axis of the source-minus-base differences) at resid_post 1; only pairs where
    that changes the top token."""
    model = _sharpened(tiny)
    name = f"blocks.{LAYER}.hook_resid_post"
    words = _words(1200, 0)
    base, source = words[:600], words[600:]
    b, s = _source_vectors(model, base, name), _source_vectors(model, source, name)
    diff = (s - b) - (s - b).mean(0)
    u = torch.linalg.svd(diff, full_matrices=False).Vh[0]
    label = _interchange_by_hand(model, base, s, u[None], name)
    keep = (label != _last(model, base).argmax(-1)).numpy()
    pick = lambda xs: [x for x, k in zip(xs, keep, strict=True) if k]  # noqa: E731
    return model, pick(base), pick(source), label[keep].tolist(), u


def test_a_planted_direction_is_found_and_carries_the_counterfactuals(planted):
    model, base, source, label, u = planted
    assert len(base) > 150
    res = mp.das(
        model, base, source, label, mp.Site("resid_post", LAYER), epochs=40, lr=0.02,
        progress=False,
    )  # fmt: skip
    assert abs(float(torch.tensor(res.rotation[0]) @ u)) > 0.95  # the planted axis
    assert res.iia_train > 0.95 and res.iia["das"] > 0.7
    assert res.iia["random"] < 0.25 and res.iia["intact"] == 0.0
    assert res.loss[-1] < 0.2 * res.loss[0]


def test_batch_size_changes_the_memory_not_the_subspace(tiny):
    # batch_size was also the Adam step's size: the learned subspace moved with it. Now a
    # minibatch adds up its chunks' gradients (float rounding apart, the same steps).
    words = _words(40, 1)
    label = [int(t) for t in _last(tiny, words[20:]).argmax(-1)]
    common = {"k": 2, "epochs": 4, "minibatch": 16, "n_random": 0, "progress": False}
    site = f"blocks.{LAYER}.hook_resid_post"
    one = mp.das(tiny, words[:20], words[20:], label, site, batch_size=3, **common)
    other = mp.das(tiny, words[:20], words[20:], label, site, batch_size=32, **common)
    assert one.minibatch == 16
    # One step per epoch (10 training pairs): the first loss is read before any step. Chunks
    # pad differently, so gradients differ by rounding (~1e-6 relative), which Adam passes on
    # at its own scale. Turning R within its span (k = 2) has gradient 0 and rounding there used
    # to become a step of ~lr (0.01-0.02 in the subspace); those coordinates are held now.
    assert one.loss[0] == pytest.approx(other.loss[0], rel=1e-5)
    np.testing.assert_allclose(one.rotation, other.rotation, atol=1e-4)
    np.testing.assert_allclose(one.loss, other.loss, rtol=1e-4)
    steps = mp.das(tiny, words[:20], words[20:], label, site, **{**common, "minibatch": 2})
    assert (
        np.abs(steps.rotation - other.rotation).max() > 0.1
    )  # 0.18-0.23 seen: the step size does matter


def test_every_accuracy_equals_the_interchange_written_by_hand(tiny):
    words = _words(40, 1)
    base, source = words[:20], words[20:]
    name = f"blocks.{LAYER}.hook_resid_post"
    label = [int(t) for t in _last(tiny, source).argmax(-1)]  # the source's own answer
    res = mp.das(
        tiny, base, source, label, name, k=3, epochs=3, n_random=2, batch_size=7, progress=False
    )
    src = _source_vectors(tiny, source, name)
    test = res.test_pairs.copy()  # a result holds read-only arrays
    want = torch.tensor(label)[test]
    pick = lambda xs: [xs[i] for i in test]  # noqa: E731
    hand = _interchange_by_hand(tiny, pick(base), src[test], torch.tensor(res.rotation), name)
    np.testing.assert_array_equal(res.hits, (hand == want).numpy())
    full = _interchange_by_hand(tiny, pick(base), src[test], None, name)
    assert res.iia["full"] == pytest.approx(float((full == want).float().mean()))
    intact = _last(tiny, pick(base)).argmax(-1)
    assert res.iia["intact"] == pytest.approx(float((intact == want).float().mean()))
    # With each base's own answer, a hit is the counterfactual's logit above the answer's.
    answer = [int(t) for t in _last(tiny, base).argmax(-1)]
    keep = [i for i in range(len(base)) if answer[i] != label[i]]
    two = mp.das(
        tiny, [base[i] for i in keep], [source[i] for i in keep], [label[i] for i in keep], name,
        answer=[answer[i] for i in keep], k=3, epochs=3, n_random=0, progress=False,
    )  # fmt: skip
    rows = [keep[i] for i in two.test_pairs]
    logits = _last(tiny, [base[i] for i in rows], [(name, _setter(src[rows], two.rotation))])
    cf, own = torch.tensor([label[i] for i in rows]), torch.tensor([answer[i] for i in rows])
    by_hand = logits.gather(1, cf[:, None]) > logits.gather(1, own[:, None])
    np.testing.assert_array_equal(two.hits, by_hand[:, 0].numpy())
    assert two.two_way and two.iia["intact"] == 0.0  # no base prefers another's answer intact
    # The learned rows are orthonormal.
    rot = torch.tensor(res.rotation).double()
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    assert len(res.iia_random) == 2 and len(test) == 10 and res.k == 3


def test_a_fit_is_deterministic_and_leaves_the_model_as_it_was(tiny):
    words = _words(16, 2)
    tokens = tiny.to_tokens("Hi there")
    before_logits, before_hooks = tiny(tokens).detach(), hook_count(tiny)
    flags = [p.requires_grad for p in tiny.parameters()]
    kw = {"epochs": 2, "progress": False}
    one = mp.das(tiny, words[:8], words[8:], 5, mp.Site("resid_post", 0), **kw)
    two = mp.das(tiny, words[:8], words[8:], 5, mp.Site("resid_post", 0), **kw)
    np.testing.assert_array_equal(one.rotation, two.rotation)
    other = mp.das(tiny, words[:8], words[8:], 5, mp.Site("resid_post", 0), seed=1, **kw)
    assert not np.array_equal(other.rotation, one.rotation)
    assert hook_count(tiny) == before_hooks
    assert all(p.grad is None for p in tiny.parameters())  # only the subspace was trained
    assert [p.requires_grad for p in tiny.parameters()] == flags
    torch.testing.assert_close(tiny(tokens).detach(), before_logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    "switched_off",
    [torch.no_grad, torch.inference_mode, lambda: torch.set_grad_enabled(False)],
    ids=["no_grad", "inference_mode", "set_grad_enabled"],
)
def test_a_fit_with_gradients_switched_off_by_the_caller_is_the_same_fit(tiny, switched_off):
    # Notebooks often switch gradients off at the top: the subspace trains all the same.
    words = _words(8, 3)
    kw = {"epochs": 2, "progress": False}
    plain = mp.das(tiny, words[:4], words[4:], 5, mp.Site("resid_post", 0), **kw)
    with switched_off():
        inside = mp.das(tiny, words[:4], words[4:], 5, mp.Site("resid_post", 0), **kw)
    np.testing.assert_array_equal(inside.rotation, plain.rotation)
    np.testing.assert_array_equal(inside.loss, plain.loss)


def test_an_exception_mid_training_leaves_no_hook(tiny, monkeypatch):
    from mechprobe.patching import _das

    calls = {"n": 0}
    edit = _das._Interchange.edit

    def failing(self, selected, hook):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return edit(self, selected, hook)

    monkeypatch.setattr(_das._Interchange, "edit", failing)
    tokens = tiny.to_tokens("Hi there")
    before, hooks = tiny(tokens).detach(), hook_count(tiny)
    words = _words(16, 3)
    with pytest.raises(RuntimeError, match="boom"):
        mp.das(
            tiny, words[:8], words[8:], 5, "blocks.0.hook_resid_post", batch_size=2, progress=False
        )
    assert calls["n"] == 3 and hook_count(tiny) == hooks
    torch.testing.assert_close(tiny(tokens).detach(), before, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((["a b", "c d"], ["e f"], 5, "blocks.0.hook_resid_post"), {}, "one source per base"),
        (("a b", "c d", 5, "blocks.0.hook_resid_post"), {}, "at least two pairs"),
        ((["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"), {"k": 65}, "k=65"),
        ((["a b", "c d"], ["e f", "g h"], 5, mp.Site("pattern", 0, head=1)), {}, "fixed width"),
        (
            (["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"),
            {"positions": -9},
            "outside",
        ),
        ((["a b", "c d"], ["e f", "g h"], "hello", "blocks.0.hook_resid_post"), {}, "tokens"),
        ((["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"), {"lr": 0}, "lr"),
        # Review 26b L4: accepted (one pair fitted), where function_vector refuses it.
        (
            (["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"),
            {"test_size": 1.0},
            r"test_size must be a fraction in \(0, 1\), got 1\.0",
        ),
        (  # a count, as function_vector takes: the message said "(0.0, 1.0]" (review 42a S5)
            (["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"),
            {"test_size": 3},
            r"test_size must be a fraction in \(0, 1\), got 3\.0",
        ),
        (
            (["a b", "c d"], ["e f", "g h"], 5, "blocks.0.hook_resid_post"),
            {"answer": 5},
            "same token",
        ),
        # Position 1 is "x" in both prompts of every pair: it trained at a constant loss and
        # reported an accuracy of 0 everywhere, silently.
        (
            (["xa b", "xc d"], ["xe f", "xg h"], 5, "blocks.0.hook_resid_post"),
            {"positions": 1},
            r"same tokens up to position 1 \('x' in pair 0\).*changes nothing",
        ),
    ],
)
def test_bad_input_fails_before_any_pass(tiny, args, kwargs, message):
    hooks = hook_count(tiny)
    with pytest.raises(ValueError, match=message):
        mp.das(tiny, *args, progress=False, **kwargs)
    assert hook_count(tiny) == hooks


def test_result_protocol_and_round_trip(tiny, tmp_path):
    words = _words(12, 4)
    res = mp.das(
        tiny, words[:6], words[6:], 5, mp.Site("resid_post", 0), k=2, epochs=2, progress=False
    )
    frame = res.to_frame()
    assert list(frame["condition"]) == [
        "das",
        "random",
        "random",
        "random",
        "full",
        "intact",
        "das",
    ]
    # each random subspace by the seed that drew it (das's seed 0: 1, 2, 3)
    assert frame["seed"].tolist()[1:4] == [1, 2, 3] and frame["seed"].isna().sum() == 4
    assert res.summary()["k"][0] == 2 and "held-out IIA" in repr(res)
    assert "<table" in res._repr_html_() and len(res.plot().axes[0].patches) == 4
    ax = res.plot().axes[0]  # values on the bars (an IIA of 0 is no bar), n in the title
    assert [t.get_text() for t in ax.texts] == [
        f"{res.iia[c]:.2f}" for c in ("das", "random", "full", "intact")
    ]
    assert f"{len(res.hits)} held-out pairs" in ax.get_title()
    for suffix in (".json", ".npz", ".safetensors"):
        back = mp.DASResult.load(res.save(tmp_path / f"das{suffix}"))
        np.testing.assert_array_equal(back.rotation, res.rotation)
        assert back.iia == res.iia and back.site == res.site
        np.testing.assert_array_equal(back.test_pairs, res.test_pairs)
    erased = mp.run(
        tiny, words[:2], {mp.Site("resid_post", 0): mp.Project(remove=res.rotation)},
        progress=False,
    )  # fmt: skip
    assert erased.logits.shape[0] == 2  # the subspace erases like any other basis


def test_frames_say_the_site_as_every_result_frame_does():
    """The summary's ``site`` was a hook name for a layer's site and a label for a head's, and
    the frame had no site at all: a merge with other analyses on ``site`` matched nothing (review
    23a F1). Both now lead with the site's label, kind, layer, head and hook name, and ``k``;
    the stored field (hook names in files of every version) stays as it was."""
    res = mp.DASResult(
        site="blocks.3.hook_resid_post", positions=-1, k=2, rotation=np.eye(2, 8),
        loss=np.array([0.7, 0.5]), iia_train=0.9,
        iia={"das": 0.8, "random": 0.1, "full": 1.0, "intact": 0.0}, iia_random=np.array([0.1]),
        hits=np.array([True, False]), test_pairs=np.array([0, 1]), epochs=2, lr=0.01,
    )  # fmt: skip
    where = ["site", "kind", "layer", "head", "hook"]
    frame, summary = res.to_frame(), res.summary()
    assert frame.columns.tolist() == [*where, "k", "positions", "condition", "seed", "split", "iia"]
    assert summary.columns.tolist()[:7] == [*where, "k", "positions"]
    assert summary["random_value"].tolist() == [0.1] and "random" not in summary
    for table in (frame, summary):
        assert set(table["site"]) == {"resid_post@3"} and set(table["kind"]) == {"resid_post"}
        assert set(table["layer"]) == {3} and table["head"].isna().all()
        assert set(table["hook"]) == {"blocks.3.hook_resid_post"} and set(table["k"]) == {2}
        assert str(table["layer"].dtype) == str(table["head"].dtype) == "Int64"
    other = pd.DataFrame(mp.core.site_columns([mp.Site("resid_post", 3)])).assign(effect=0.4)
    assert summary.merge(other, on=where)["effect"].tolist() == [0.4]
    assert frame.loc[frame["split"] == "train", "iia"].tolist() == [0.9]


def test_a_head_site_interchanges_that_heads_z_only(tiny):
    words = _words(24, 5)
    base, source = words[:12], words[12:]
    name, head = "blocks.1.attn.hook_z", 2
    label = [int(t) for t in _last(tiny, source).argmax(-1)]
    res = mp.das(
        tiny, base, source, label, mp.Site("head", 1, head=head), k=2, epochs=2, n_random=0,
        progress=False,
    )  # fmt: skip
    assert res.rotation.shape == (2, tiny.cfg.d_head)
    assert res.site == "head@1, head 2"  # the head is part of the site
    where = res.to_frame()[["site", "kind", "layer", "head", "hook"]].drop_duplicates()
    assert where.values.tolist() == [["head@1, head 2", "head", 1, 2, name]]
    src = _source_vectors(tiny, source, name)[:, head]  # [n, d_head]
    basis = torch.tensor(res.rotation)
    test = res.test_pairs.copy()

    def fn(act, i):
        act = act.clone()
        h = act[0, -1, head]
        act[0, -1, head] = h + basis.T @ (basis @ (src[test[i]] - h))
        return act

    logits = _last(tiny, [base[i] for i in test], [(name, fn)])
    want = torch.tensor(label)[test]
    np.testing.assert_array_equal(res.hits, (logits.argmax(-1) == want).numpy())


def test_pairs_with_equal_prefixes_are_named_in_a_warning(tiny):
    base, source = ["xa b", "ya b", "za b"], ["xc d", "qc d", "rc d"]
    with pytest.warns(UserWarning, match=r"In 1 of 3 pairs base and source hold the same"):
        mp.das(tiny, base, source, 5, "blocks.0.hook_resid_post", positions=1, epochs=1,
               n_random=0, progress=False)  # fmt: skip


def test_a_file_saved_when_the_intact_run_was_none_reads_as_intact(tmp_path):
    # The unedited run is "intact" in every frame (review 26a F3); DAS files said "none".
    res = mp.DASResult(
        site="blocks.3.hook_resid_post", positions=-1, k=2, rotation=np.eye(2, 8),
        loss=np.array([0.7]), iia_train=0.9,
        iia={"das": 0.8, "random": 0.1, "full": 1.0, "intact": 0.25}, iia_random=np.array([0.1]),
        hits=np.array([True]), test_pairs=np.array([0]), epochs=1, lr=0.01,
    )  # fmt: skip
    data = res.to_dict()
    data["iia"] = {("none" if c == "intact" else c): v for c, v in data["iia"].items()}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))
    back = mp.DASResult.load(path)
    assert back.iia == res.iia and "intact 0.25" in repr(back)
    assert back.to_frame()["condition"].tolist() == res.to_frame()["condition"].tolist()
