"""attention_patterns against the Hugging Face model's own attention weights (a twin of the tiny
model's weights, built apart from it); padding and batch independence; the chosen heads; the
summary's averages written plainly; bad input; the result protocol."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hf_of, hook_count

import mechprobe as mp
from mechprobe.patching import _attention

PROMPTS = ["The cat sat on the mat, the cat", "Hi", "A dog ran far away"]


def _hf_patterns(model, prompt: str) -> np.ndarray:
    """``[layers, heads, q, k]`` the Hugging Face twin's attention weights on one prompt alone
    (no padding), from its eager attention."""
    hf = hf_of(model)
    implementation = hf.config._attn_implementation
    hf.config._attn_implementation = "eager"  # sdpa returns no weights
    try:
        with torch.no_grad():
            out = hf(model.to_tokens(prompt), output_attentions=True)
    finally:
        hf.config._attn_implementation = implementation
    return torch.stack(out.attentions)[:, 0].double().numpy()


@pytest.fixture(scope="module")
def theirs(tiny) -> list[np.ndarray]:
    return [_hf_patterns(tiny, p) for p in PROMPTS]


def test_every_head_equals_the_hugging_face_weights(tiny, theirs) -> None:
    res = mp.attention_patterns(tiny, PROMPTS, progress=False)
    n_layers, n_heads = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert res.sites[:2] == ("pattern@0, head 0", "pattern@0, head 1")
    assert res.layers == tuple(np.repeat(range(n_layers), n_heads).tolist())
    assert res.heads == tuple(np.tile(range(n_heads), n_layers).tolist())
    for p, hf in enumerate(theirs):
        n = hf.shape[-1]
        assert res.lengths[p] == n and len(res.tokens[p]) == n
        mine = res.patterns[p, :, :n, :n].reshape(n_layers, n_heads, n, n)
        np.testing.assert_allclose(mine, hf, atol=1e-5)
        assert np.isnan(res.patterns[p, :, n:]).all() and np.isnan(res.patterns[p, :, :, n:]).all()
    assert res.tokens[1] == tuple(tiny.to_str_tokens("Hi"))
    assert res.prompts == tuple(PROMPTS)


def test_padding_side_and_batch_size_change_nothing(tiny) -> None:
    one = mp.attention_patterns(tiny, PROMPTS, batch_size=1, progress=False)
    for side in ("right", "left"):
        batch = mp.tokenize(tiny, PROMPTS, padding_side=side)
        many = mp.attention_patterns(tiny, batch, batch_size=None, progress=False)
        np.testing.assert_allclose(many.patterns, one.patterns, atol=1e-6)
        assert many.tokens == one.tokens and many.lengths == one.lengths


def test_chosen_heads_in_their_order_and_no_hook_left(tiny, theirs) -> None:
    before = hook_count(tiny)
    sites = ["pattern@2, head 1", mp.Site("pattern", 0, head=3)]
    res = mp.attention_patterns(tiny, PROMPTS, sites=sites, progress=False)
    assert res.sites == ("pattern@2, head 1", "pattern@0, head 3")
    assert (res.layers, res.heads) == ((2, 0), (1, 3))
    n = res.lengths[0]
    np.testing.assert_allclose(res.pattern("pattern@2, head 1"), theirs[0][2, 1], atol=1e-5)
    np.testing.assert_allclose(res.pattern(sites[1], prompt=2), theirs[2][0, 3], atol=1e-5)
    assert res.pattern(sites[0]).shape == (n, n)
    layer = mp.attention_patterns(tiny, PROMPTS, layers=[1], progress=False)
    assert layer.layers == (1,) * tiny.cfg.n_heads
    np.testing.assert_allclose(layer.patterns[0, :, :n, :n], theirs[0][1], atol=1e-5)
    assert hook_count(tiny) == before


def test_summary_frame_and_top_keys_written_plainly(tiny, theirs) -> None:
    res = mp.attention_patterns(tiny, PROMPTS, sites="pattern", layers=[0, 2], progress=False)
    hf = [t[[0, 2]].reshape(-1, *t.shape[-2:]) for t in theirs]  # [heads, q, k]
    first, previous, own, entropy, count, count_previous = 0.0, 0.0, 0.0, 0.0, 0, 0
    spread = 0.0  # entropy over that of a uniform spread on the q + 1 keys
    assert res.bos == (True,) * len(PROMPTS)  # the tiny models prepend BOS
    for w in hf:
        for q in range(1, w.shape[-1]):  # every query but the first
            row = w[:, q, : q + 1]
            first, own = first + row[:, 0], own + row[:, q]
            h = -np.sum(np.where(row > 0, row * np.log(row), 0.0), axis=1)
            entropy, spread = entropy + h, spread + h / np.log(q + 1)
            count += 1
            if q >= 2:  # query 1's previous token is BOS: a sink, not a previous-token head
                previous, count_previous = previous + row[:, q - 1], count_previous + 1
    summary = res.summary()
    assert summary["site"].tolist() == list(res.sites)
    for column, plain in [("first_token", first / count), ("previous_token", previous / count_previous),
                          ("own_token", own / count), ("entropy", entropy / count),
                          ("normalised_entropy", spread / count)]:  # fmt: skip
        np.testing.assert_allclose(summary[column], plain, atol=1e-5)
    assert ((summary["normalised_entropy"] > 0) & (summary["normalised_entropy"] <= 1)).all()

    frame = res.to_frame()
    lengths = np.asarray(res.lengths)
    assert len(frame) == len(res.sites) * int((lengths * (lengths + 1) // 2).sum())
    row = frame[(frame.prompt == 2) & (frame.site == "pattern@2, head 3")]
    row = row[(row.query_position == 4) & (row.key_position == 1)]
    assert row.weight.item() == pytest.approx(theirs[2][2, 3, 4, 1], abs=1e-5)
    assert row.key_token.item() == res.tokens[2][1]
    assert frame["layer"].dtype == "Int64" and frame["head"].dtype == "Int64"
    assert (
        frame.groupby(["prompt", "site", "query_position"])
        .weight.sum()
        .between(1 - 1e-5, 1 + 1e-5)
        .all()
    )

    top = res.top_keys(query=-1, k=2)
    assert len(top) == len(PROMPTS) * len(res.sites) * 2
    for p, w in enumerate(hf):
        for e, site in enumerate(res.sites):
            mine = top[(top.prompt == p) & (top.site == site)]
            last = w[e, -1]
            assert mine.key_position.tolist() == np.argsort(-last, kind="stable")[:2].tolist()
            np.testing.assert_allclose(mine.weight, np.sort(last)[::-1][:2], atol=1e-5)
    with pytest.raises(ValueError, match="outside prompt 1"):
        res.top_keys(query=5)


def test_bad_input_is_refused_before_the_model_runs(tiny, monkeypatch) -> None:
    before = hook_count(tiny)
    with pytest.raises(ValueError, match="pattern"):
        mp.attention_patterns(tiny, "Hi", sites="resid_post", progress=False)
    with pytest.raises(ValueError, match="head"):
        mp.attention_patterns(tiny, "Hi", sites="pattern@1, head 99", progress=False)
    monkeypatch.setattr(_attention, "MAX_BYTES", 1000)
    with pytest.raises(ValueError, match=r"GiB of patterns .*pass fewer heads"):
        mp.attention_patterns(tiny, PROMPTS, progress=False)
    monkeypatch.undo()
    res = mp.attention_patterns(tiny, "Hi there", layers=[1], progress=False)
    with pytest.raises(ValueError, match="not among this result's heads"):
        res.pattern("pattern@0, head 0")
    with pytest.raises(ValueError, match="one of the 1 prompts"):
        res.pattern("pattern@1, head 0", prompt=1)
    assert hook_count(tiny) == before


def test_an_exception_mid_forward_leaves_no_hook_and_the_outputs_unchanged(
    tiny, monkeypatch
) -> None:
    tokens = tiny.to_tokens("The cat sat")
    with torch.no_grad():
        before_logits = tiny(tokens)
    before = hook_count(tiny)

    def fail(self, selected, hook):
        raise KeyboardInterrupt

    monkeypatch.setattr(_attention._Keep, "edit", fail)
    with pytest.raises(KeyboardInterrupt):
        mp.attention_patterns(tiny, "The cat sat", progress=False)
    monkeypatch.undo()
    assert hook_count(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(tokens), before_logits)


def test_review_39a_inputs(tiny) -> None:
    # F8: a head parked on BOS is no previous-token head (query 1's previous token is BOS).
    sink = np.zeros((1, 1, 3, 3), np.float32)
    sink[0, 0, :, 0] = 1.0
    fake = mp.AttentionPatterns(sites=("pattern@0, head 0",), layers=(0,), heads=(0,),
                                patterns=sink, lengths=(3,), prompts=("ab",),
                                tokens=(("<s>", "a", "b"),), bos=(True,))  # fmt: skip
    row = fake.summary().iloc[0]
    assert (row.first_token, row.previous_token, row.own_token) == (1.0, 0.0, 0.0)
    # (layer, head) pairs and head_scores' (layer, head, score) triples name heads
    pairs = mp.attention_patterns(tiny, "Hi there", sites=[(2, 1), (0, 3, 0.5)], progress=False)
    assert pairs.sites == ("pattern@2, head 1", "pattern@0, head 3")
    assert mp.attention_patterns(tiny, "Hi", sites=(1, 2), progress=False).sites == (
        "pattern@1, head 2",
    )
    np.testing.assert_array_equal(pairs.pattern((2, 1)), pairs.pattern("pattern@2, head 1"))
    with pytest.raises(TypeError, match="not a head"):
        pairs.pattern(3)
    # F14: positions on a Site are refused, not ignored
    with pytest.raises(ValueError, match="carry positions"):
        mp.attention_patterns(tiny, "Hi", sites=mp.Site("pattern", 1, head=0, positions=[-1]),
                              progress=False)  # fmt: skip
    # F10, F11: ids outside the vocabulary, a row without tokens
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        mp.attention_patterns(tiny, mp.Batch.from_tokens(torch.tensor([[1, 5, 10**6]])),
                              progress=False)  # fmt: skip
    empty = mp.Batch.from_tokens(
        torch.tensor([[1, 5, 6], [1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])
    )
    with pytest.raises(ValueError, match=r"Prompts \[1\] have no tokens"):
        mp.attention_patterns(tiny, empty, progress=False)
    # F12, F13: an empty list of heads, several heads into one ax
    with pytest.raises(ValueError, match="sites is empty"):
        pairs.plot(sites=[])
    from matplotlib.figure import Figure

    with pytest.raises(ValueError, match="ax takes one head"):
        pairs.plot(Figure().subplots(), sites=[(2, 1), (0, 3)])
    # S9: one of each is said in the singular; one-token prompts warn before a NaN summary
    one = mp.attention_patterns(
        tiny, mp.Batch.from_tokens(torch.tensor([[1]])), sites=[(1, 2)], progress=False
    )
    assert "1 head in 1 layer on 1 prompt of 1 token)" in repr(one)
    with pytest.warns(UserWarning, match="one-token prompts"):
        assert one.summary().first_token.isna().all()


def test_the_figure_and_the_round_trip(tiny, tmp_path) -> None:
    res = mp.attention_patterns(tiny, PROMPTS, progress=False)
    assert len(res.sites) == 12
    with pytest.warns(UserWarning, match="first 12 of 12|first 4 of 12"):
        fig = res.plot(max_panels=4)
    assert len(fig.axes) == 4 + 1  # four maps and the colour bar
    one = res.plot(prompt=1, sites=["pattern@1, head 2"])
    image = one.axes[0].get_images()[0].get_array()
    drawn = res.pattern("pattern@1, head 2", prompt=1)
    later = np.triu(np.ones_like(drawn, dtype=bool), 1)
    assert np.array_equal(image.mask, later)  # keys after the query: grey, not weight 0
    np.testing.assert_allclose(image.data[~later], drawn[~later])
    from_last = res.plot(prompt=0, query=-1, sites=[(2, 1), (0, 3)])
    shown = np.asarray(from_last.axes[0].get_images()[0].get_array())
    n = res.lengths[0]
    np.testing.assert_allclose(shown[0], res.pattern((2, 1))[n - 1])  # a row per head
    np.testing.assert_allclose(shown[1], res.pattern((0, 3))[n - 1])
    assert [t.get_text() for t in from_last.axes[0].get_yticklabels()] == ["L2H1", "L0H3"]
    assert res.plot(query=3).axes[0].get_images()[0].get_array().shape == (12, 4)
    with pytest.raises(ValueError, match="outside prompt 1"):
        res.plot(prompt=1, query=5)
    own = res.plot(prompt=1, sites=["pattern@1, head 2"], vmax=None)
    assert own.axes[0].get_images()[0].get_clim() == (0.0, pytest.approx(drawn.max()))
    labels = [t.get_text() for t in one.axes[0].get_xticklabels()]
    assert labels == [mp.core.token_label(t, 10) for t in res.tokens[1]]
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    assert res.plot(ax).axes[0] is ax
    assert "12 heads in 3 layers on 3 prompts" in repr(res)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the notebook view draws its first heads without a word
        assert "<img" in res._repr_html_()
    back = mp.AttentionPatterns.load(res.save(tmp_path / "patterns.json"))
    np.testing.assert_array_equal(back.patterns, res.patterns)
    assert back.tokens == res.tokens and back.sites == res.sites
    pd.testing.assert_frame_equal(back.to_frame(), res.to_frame())
    pd.testing.assert_frame_equal(back.summary(), res.summary())


@pytest.mark.integration
def test_smollm2_patterns_equal_its_hugging_face_weights(smollm2) -> None:
    text = " The old man walked his dog to the park by the river." * 2
    sites = [mp.Site("pattern", 18, head=6), mp.Site("pattern", 16, head=0)]
    res = mp.attention_patterns(smollm2, [text, "Paris is the capital of"], sites=sites,
                                progress=False)  # fmt: skip
    # A Hugging Face model of its own, from the cache load_model read (the bridge's wraps its
    # attention modules and returns no weights), with eager attention (sdpa returns none).
    from transformers import AutoModelForCausalLM

    from mechprobe.core import _models

    folder = _models.cache_dir() / "smollm2-135m-f32"
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(smollm2.to_tokens(text), output_attentions=True)
    for site in sites:
        theirs = out.attentions[site.layer][0, site.head].double().numpy()
        np.testing.assert_allclose(res.pattern(site), theirs, atol=1e-4)
    # the induction head at its stripe: the second sentence's queries look at the token after
    # their own token's first copy
    w, half = res.pattern(sites[0]), (res.lengths[0] - 1) // 2
    q = np.arange(half + 1, res.lengths[0])
    assert w[q, q - half + 1].mean() > 0.4


def test_a_huge_frame_warns_with_the_fix(monkeypatch) -> None:
    """Review 39a: 270 heads on four 152-token prompts made 12.5M rows without a word."""
    res = mp.attention_patterns(mp.tiny_model(), PROMPTS, progress=False)
    rows = len(res.sites) * sum(n * (n + 1) // 2 for n in res.lengths)
    monkeypatch.setattr(_attention, "FRAME_ROWS", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(res.to_frame()) == rows  # at the limit: no warning
    monkeypatch.setattr(_attention, "FRAME_ROWS", rows - 1)
    with pytest.warns(UserWarning, match=rf"to_frame: {rows:,} rows .*sites="):
        assert len(res.to_frame()) == rows


def test_normalised_entropy_counts_a_sliding_window(tmp_path) -> None:
    """Review 40b F2: on a sliding-window layer a query sees its last ``window`` keys, so an
    even spread there scored below 1 (0.822 against 0.846 on this model) with log(q + 1)."""
    try:
        model = mp.tiny_model(architecture="gemma2")
    except ValueError as err:  # TransformerLens 3.x builds no Gemma 2 here
        pytest.skip(str(err))
    res = mp.attention_patterns(model, "abcdefghij" * 11, progress=False)  # 111 tokens > 64
    assert set(res.windows) == {0, 64}  # local layers' window, 0 on the global layer
    n, summary = res.lengths[0], res.summary()
    for e, window in enumerate(res.windows):
        plain = 0.0
        for q in range(1, n):
            row = res.patterns[0, e, q, : q + 1].astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):  # log(0), never taken
                h = -np.sum(np.where(row > 0, row * np.log(row), 0.0))
            plain += h / np.log(min(q + 1, window or n))
        assert summary["normalised_entropy"][e] == pytest.approx(plain / (n - 1), abs=1e-6)
    res.save(tmp_path / "p.json")
    assert mp.AttentionPatterns.load(tmp_path / "p.json").windows == res.windows


@pytest.mark.parametrize("side", ["right", "left"])
def test_chosen_queries_equal_those_rows_of_the_hugging_face_weights(tiny, theirs, side) -> None:
    """positions= keeps only the named queries of each prompt (negative from its own end,
    whatever the padding); every number equals the Hugging Face twin's at those rows."""
    batch = mp.tokenize(tiny, PROMPTS, padding_side=side)
    res = mp.attention_patterns(tiny, batch, positions=[0, -2, -1], batch_size=2, progress=False)
    n_layers, n_heads = tiny.cfg.n_layers, tiny.cfg.n_heads
    assert res.queries == tuple((0, n - 2, n - 1) for n in res.lengths)
    assert res.patterns.shape == (len(PROMPTS), n_layers * n_heads, 3, max(res.lengths))
    for p, hf in enumerate(theirs):
        n, rows = hf.shape[-1], [0, hf.shape[-1] - 2, hf.shape[-1] - 1]
        mine = res.patterns[p, :, :, :n].reshape(n_layers, n_heads, 3, n)
        np.testing.assert_allclose(mine, hf[:, :, rows], atol=1e-5)
        assert np.isnan(res.patterns[p, :, :, n:]).all()
        np.testing.assert_allclose(res.pattern((1, 2), prompt=p), hf[1, 2][rows], atol=1e-5)
    last = mp.attention_patterns(tiny, PROMPTS, sites=[(2, 1)], positions=-1, progress=False)
    assert last.queries == tuple((n - 1,) for n in last.lengths)
    for p, hf in enumerate(theirs):
        np.testing.assert_allclose(last.pattern((2, 1), prompt=p), hf[2, 1][-1:], atol=1e-5)
    assert "1 head in 1 layer on 3 prompts of 3-32 tokens, 1 query each" in repr(last)


def test_chosen_queries_summary_frame_and_top_keys_written_plainly(tiny, theirs) -> None:
    res = mp.attention_patterns(tiny, PROMPTS, layers=[0, 2], positions=[1, -1], progress=False)
    full = mp.attention_patterns(tiny, PROMPTS, layers=[0, 2], progress=False)
    hf = [t[[0, 2]].reshape(-1, *t.shape[-2:]) for t in theirs]  # [heads, q, k]
    first, previous, own, entropy, count, count_previous = 0.0, 0.0, 0.0, 0.0, 0, 0
    for w in hf:
        for q in sorted({1, w.shape[-1] - 1}):  # the kept queries (query 0 would be left out)
            row = w[:, q, : q + 1]
            first, own = first + row[:, 0], own + row[:, q]
            entropy = entropy - np.sum(np.where(row > 0, row * np.log(row), 0.0), axis=1)
            count += 1
            if q >= 2:  # query 1's previous token is BOS
                previous, count_previous = previous + row[:, q - 1], count_previous + 1
    summary = res.summary()
    for column, plain in [("first_token", first / count), ("own_token", own / count),
                          ("previous_token", previous / count_previous),
                          ("entropy", entropy / count)]:  # fmt: skip
        np.testing.assert_allclose(summary[column], plain, atol=1e-5)
    # the frame: the full result's rows at the kept queries, in the same order
    frame, whole = res.to_frame(), full.to_frame()
    kept = whole[
        [q in res.queries[p] for p, q in zip(whole.prompt, whole.query_position, strict=True)]
    ].reset_index(drop=True)
    pd.testing.assert_frame_equal(frame, kept)
    pd.testing.assert_frame_equal(res.top_keys(-1, k=2), full.top_keys(-1, k=2))
    pd.testing.assert_frame_equal(res.top_keys(1), full.top_keys(1))
    with pytest.raises(ValueError, match=r"query 2 \(position 2 of prompt 0\) was not kept"):
        res.top_keys(2)
    with pytest.raises(ValueError, match="was not kept"):
        res.plot(query=0)
    np.testing.assert_allclose(
        res.plot(query=-1, prompt=2).axes[0].get_images()[0].get_array(),
        full.plot(query=-1, prompt=2).axes[0].get_images()[0].get_array(),
    )
    # a map per head: a row per kept query, keys after it grey
    image = res.plot(prompt=0, sites=[(2, 1)]).axes[0].get_images()[0].get_array()
    n = res.lengths[0]
    later = np.arange(n)[None, :] > np.array([1, n - 1])[:, None]
    assert image.shape == (2, n) and np.array_equal(image.mask, later)
    np.testing.assert_allclose(image.data[~later], res.pattern((2, 1))[~later])
    # review 41a F1: one kept query over many keys drew at equal aspect, a 1-pixel strip
    long = mp.attention_patterns(tiny, "word " * 80, layers=[0], positions=-1, progress=False)
    fig = long.plot()
    assert fig.axes[0].get_aspect() == "auto" and fig.get_size_inches()[1] >= 1.4
    assert full.plot(prompt=0, sites=[(2, 1)]).axes[0].get_aspect() == 1.0  # whole maps: square


def test_chosen_queries_keep_memory_bad_positions_and_the_round_trip(
    tiny, monkeypatch, tmp_path
) -> None:
    shapes, rearrange = [], _attention.rearrange

    def record(tensor, pattern, **kwargs):
        shapes.append(tuple(tensor.shape))  # a row's [queries, heads, keys] as it is written
        return rearrange(tensor, pattern, **kwargs)

    monkeypatch.setattr(_attention, "rearrange", record)
    before = hook_count(tiny)
    res = mp.attention_patterns(tiny, PROMPTS, positions=-1, batch_size=None, progress=False)
    monkeypatch.undo()
    # one query per row copied from each layer, never the whole [q, k] map
    assert len(shapes) == len(PROMPTS) * tiny.cfg.n_layers and {s[0] for s in shapes} == {1}
    assert not hasattr(_attention._Keep, "value") and hook_count(tiny) == before
    assert res.patterns.shape[2] == 1
    # the memory check counts the kept queries: whole maps refused, the last query taken
    longest = max(mp.tokenize(tiny, PROMPTS).attention_mask.sum(1).tolist())
    heads = tiny.cfg.n_layers * tiny.cfg.n_heads
    monkeypatch.setattr(_attention, "MAX_BYTES", len(PROMPTS) * heads * longest * 4)
    with pytest.raises(ValueError, match=r"queries each, would hold .*positions=-1"):
        mp.attention_patterns(tiny, PROMPTS, progress=False)
    mp.attention_patterns(tiny, PROMPTS, positions=-1, progress=False)
    monkeypatch.undo()
    two = mp.Batch.from_tokens(torch.tensor([[1, 5, 6, 7], [1, 2, 0, 0]]),
                               attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"positions=\[0, 3\] reach outside 1 prompt \(1; the shortest has 2 tokens\)",
    ):
        mp.attention_patterns(tiny, two, positions=[0, 3], progress=False)
    with pytest.raises(ValueError, match=r"name one token twice in 1 prompt \(1; "):
        mp.attention_patterns(tiny, two, positions=[0, -2], progress=False)
    with pytest.raises(ValueError, match="carry positions"):
        mp.attention_patterns(tiny, two, sites=mp.Site("pattern", 0, head=0, positions=-1),
                              progress=False)  # fmt: skip
    res = mp.attention_patterns(tiny, two, positions=[-1, 0], progress=False)
    assert res.queries == ((0, 3), (0, 1))
    back = mp.AttentionPatterns.load(res.save(tmp_path / "q.npz"))
    assert back.queries == res.queries
    np.testing.assert_array_equal(back.patterns, res.patterns)
    pd.testing.assert_frame_equal(back.summary(), res.summary())
    # queries that disagree with the patterns are refused when the result is built or loaded
    import dataclasses

    for bad in [((0, 3),), ((3, 0), (0, 1)), ((0, 4), (0, 1)), ((0, 1, 2), (0, 1))]:
        with pytest.raises(ValueError, match=r"queries"):
            dataclasses.replace(res, queries=bad)
    with pytest.raises(ValueError, match="2-d array of shape"):
        mp.attention_patterns(tiny, two, positions=np.array([[0, 1]]), progress=False)
    # a result saved before queries were recorded kept every query
    old = dataclasses.replace(mp.attention_patterns(tiny, two, progress=False), queries=())
    assert old.pattern((0, 0), prompt=1).shape == (2, 2) and len(old.top_keys(-1)) > 0
