"""Batched activation patching against one-cell-at-a-time hooks and TransformerLens's own patching."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import typing
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from transformer_lens import patching as tl_patching

import mechprobe as mp
from mechprobe.core import model_adapter
from mechprobe.patching import _engine
from mechprobe.patching._engine import packing_works as _packing_works
from tests.conftest import TEST_KINDS, hook_count

# Byte-level tiny tokenizer: these differ in exactly one token (c/b), at position 3 (BOS first).
CLEAN, CORRUPT = "A cat", "A bat"
DIFF_POS = 3
ANS, WRONG = 100, 101  # two arbitrary token ids: the metric is their logit difference
METRIC = mp.logit_diff(ANS, WRONG)


def _metric(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, ANS] - logits[:, -1, WRONG]


def _site_list(model, kind):
    n = model.cfg.n_layers
    if kind == "head":
        return [
            mp.Site("head", layer, head=h) for layer in range(n) for h in range(model.cfg.n_heads)
        ]
    return [mp.Site(kind, layer) for layer in range(n)]


def _by_hand(model, run_tokens, source_tokens, sites, pairs, metric=_metric):
    """One forward per cell with a plain TransformerLens hook (model.run_with_hooks).

    ``pairs`` is a list of (source position, patched position) per result column.
    """
    # TransformerLens fires hook_mlp_in only when switched on (plain TL, as a user would).
    mlp_in = any(site.kind == "mlp_in" for site in sites)
    if mlp_in:
        model.set_use_hook_mlp_in(True)
    try:
        return _by_hand_hooked(model, run_tokens, source_tokens, sites, pairs, metric)
    finally:
        if mlp_in:
            model.set_use_hook_mlp_in(False)


def _by_hand_hooked(model, run_tokens, source_tokens, sites, pairs, metric):
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens)
        out = torch.zeros(len(sites), len(pairs))
        for r, site in enumerate(sites):
            for c, (ps, pb) in enumerate(pairs):

                def hook(act, hook, site=site, ps=ps, pb=pb):
                    act = act.clone()
                    src = cache[site.hook_name]
                    if site.head is None:
                        act[:, pb] = src[:, ps]
                    else:
                        act[:, pb, site.head] = src[:, ps, site.head]
                    return act

                hooks = [(site.hook_name, hook)]
                if site.kind == "resid_mid":
                    # resid_mid = resid_pre + attn_out feeds the MLP and the residual add; on a
                    # bridge its hook is the MLP's input alone, so the residual is set through
                    # attn_out: attn_out' = source resid_mid - this run's resid_pre.
                    seen = {}

                    def keep(act, hook, seen=seen):
                        seen["pre"] = act

                    def mid(act, hook, site=site, ps=ps, pb=pb, seen=seen):
                        act = act.clone()
                        act[:, pb] = cache[site.hook_name][:, ps] - seen["pre"][:, pb]
                        return act

                    layer = site.layer
                    hooks = [
                        (f"blocks.{layer}.hook_resid_pre", keep),
                        (f"blocks.{layer}.hook_attn_out", mid),
                    ]
                logits = model.run_with_hooks(run_tokens, fwd_hooks=hooks)
                out[r, c] = metric(logits)[0]
    return out.numpy()


@functools.lru_cache
def _reference(model, kind):
    """One-cell-at-a-time denoising values for CLEAN/CORRUPT (heads: two positions only)."""
    seq = model.to_tokens(CLEAN).shape[1]
    positions = [DIFF_POS, -1] if kind == "head" else list(range(seq))
    cols = [(p % seq, p % seq) for p in positions]
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    return positions, _by_hand(model, corrupt, clean, _site_list(model, kind), cols)


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize(
    "kind", ["resid_pre", "resid_mid", "mlp_in", "resid_post", "attn_out", "mlp_out", "head"]
)
def test_batched_equals_one_cell_at_a_time(tiny, kind, packed, cell_packing):
    if packed and not model_adapter(tiny).packs_rows:
        pytest.skip("this model runs one sequence per row (test_adapter covers refusals)")
    positions, expected = _reference(tiny, kind)
    spec = "all" if kind != "head" else positions
    res = mp.patch(tiny, CLEAN, CORRUPT, kind, spec, METRIC, packed=packed, cells_per_batch=10)
    assert res.values.shape == expected.shape
    assert np.abs(expected).max() > 0.05  # the comparison is not between zeros
    np.testing.assert_allclose(res.values, expected, atol=1e-5)
    assert res.positions == tuple(positions)


def test_noising_runs_clean_and_writes_corrupt(tiny):
    res = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", [2, -1], METRIC, direction="noising")
    seq = tiny.to_tokens(CLEAN).shape[1]
    expected = _by_hand(
        tiny,
        tiny.to_tokens(CLEAN),
        tiny.to_tokens(CORRUPT),
        _site_list(tiny, "mlp_out"),
        [(2, 2), (seq - 1, seq - 1)],
    )
    np.testing.assert_allclose(res.values, expected, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(res.clean, _metric(tiny(tiny.to_tokens(CLEAN))), atol=1e-5)
        np.testing.assert_allclose(res.corrupt, _metric(tiny(tiny.to_tokens(CORRUPT))), atol=1e-5)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ("mlp_out", tl_patching.get_act_patch_mlp_out),
        ("resid_pre", tl_patching.get_act_patch_resid_pre),
    ],
)
def test_equals_transformerlens_patching(tiny, ours, theirs):
    clean, corrupt = tiny.to_tokens(CLEAN), tiny.to_tokens(CORRUPT)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(clean)

        def metric(logits):
            return _metric(logits)[0]

        grid = theirs(tiny, corrupt, cache, metric)  # every layer x position
        seq = clean.shape[1]
        index = pd.DataFrame(
            {"layer": range(tiny.cfg.n_layers), "pos": [seq - 1] * tiny.cfg.n_layers}
        )
        # TL asserts index_axis_names is None whenever an index_df is passed.
        last = theirs(tiny, corrupt, cache, metric, index_axis_names=None, index_df=index)
    np.testing.assert_allclose(
        mp.patch(tiny, clean, corrupt, ours, "all", METRIC).values, grid, atol=1e-4
    )
    np.testing.assert_allclose(
        mp.patch(tiny, clean, corrupt, ours, -1, METRIC).values[:, 0], last, atol=1e-4
    )


def test_every_position_at_once_equals_transformerlens_all_pos_patching(tiny, tmp_path):
    # positions=None: one cell per site writing every position (the per-head figure of IOI
    # work); patch refused None and a Site's positions, so it took a hand loop.
    clean, corrupt = tiny.to_tokens(CLEAN), tiny.to_tokens(CORRUPT)
    with torch.no_grad():
        _, cache = tiny.run_with_cache(clean)
        theirs = tl_patching.get_act_patch_attn_head_out_all_pos(
            tiny, corrupt, cache, lambda logits: _metric(logits)[0]
        )  # [layers, heads]
    res = mp.patch(tiny, clean, corrupt, "head", None, METRIC, n_random=1)
    assert res.positions == (None,) and res.position_labels == ("all positions",)
    assert res.values.shape == (tiny.cfg.n_layers * tiny.cfg.n_heads, 1)
    np.testing.assert_allclose(res.values[:, 0], theirs.reshape(-1), atol=1e-4)
    frame = res.to_frame()
    assert frame["position"].isna().all() and (frame["position_label"] == "all positions").all()
    assert res.plot().axes[0].get_title().replace("\n", " ").endswith("(all positions)")
    # head_matrix lays the cells out as TransformerLens's [layers, heads] grid.
    np.testing.assert_allclose(res.head_matrix(normalised=False), theirs.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="one head kind; this result has none"):
        mp.patch(tiny, clean, corrupt, "mlp_out", -1, METRIC, n_random=0).head_matrix()
    # An ablation has no normalised recovery: its default grid was all NaN; it is the change
    # of the metric each knocked-out head makes (what its plot draws).
    knocked = mp.ablate_cells(tiny, [CLEAN, "The dog ran"], "head", None, METRIC, method="zero")
    grid = knocked.head_matrix()
    assert np.isfinite(grid).all()
    np.testing.assert_allclose(grid.ravel(), knocked.effect[:, 0])
    np.testing.assert_allclose(knocked.head_matrix(normalised=False).ravel(), knocked.values[:, 0])
    saved = mp.load_result(res.save(tmp_path / "whole.json"))
    assert saved.positions == (None,) and np.array_equal(saved.values, res.values)
    # Pairs of different lengths, each pair's prompts of one length: a hand hook per pair.
    pairs = [("A cat sat", "A bat sat"), ("The dog ran far", "The fog ran far")]
    both = mp.patch(tiny, *zip(*pairs, strict=True), "mlp_out", None, METRIC, n_random=0)
    for i, (c, x) in enumerate(pairs):
        _, source = tiny.run_with_cache(tiny.to_tokens(c))
        for layer in range(tiny.cfg.n_layers):
            name = f"blocks.{layer}.hook_mlp_out"
            with torch.no_grad():
                logits = tiny.run_with_hooks(
                    tiny.to_tokens(x),
                    fwd_hooks=[(name, lambda a, hook, source=source: source[hook.name])],
                )
            assert both.per_pair[i, layer, 0] == pytest.approx(float(_metric(logits)[0]), abs=1e-4)
    with pytest.raises(ValueError, match="positions=None patches every position at once"):
        mp.patch(tiny, "A cat", "A big bat", "mlp_out", None, METRIC)


def test_ablating_every_position_at_once_equals_hand_hooks(tiny):
    prompts = ["A cat sat on", "The dog ran far away"]
    res = mp.ablate_cells(tiny, prompts, "head", None, METRIC, method="zero", n_random=1)
    assert res.positions == (None,) and res.values.shape == (res.per_pair.shape[1], 1)
    n_heads = tiny.cfg.n_heads
    for i, prompt in enumerate(prompts):
        for layer in range(tiny.cfg.n_layers):
            for h in range(n_heads):

                def zero(z, hook, h=h):
                    z = z.clone()
                    z[:, :, h] = 0.0
                    return z

                with torch.no_grad():
                    logits = tiny.run_with_hooks(
                        tiny.to_tokens(prompt), fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero)]
                    )
                got = res.per_pair[i, layer * n_heads + h, 0]
                assert got == pytest.approx(float(_metric(logits)[0]), abs=1e-4)


def test_clean_into_clean_changes_nothing(tiny):
    with pytest.warns(UserWarning, match="normalised recovery is undefined"):
        res = mp.patch(tiny, CLEAN, CLEAN, "resid_pre", "all", METRIC)
    with torch.no_grad():
        clean = float(_metric(tiny(tiny.to_tokens(CLEAN)))[0])
    np.testing.assert_allclose(res.values, clean, atol=1e-5)
    np.testing.assert_allclose(res.clean, res.corrupt, atol=1e-5)
    assert np.isnan(res.normalised).all()
    assert isinstance(res.plot(), Figure)  # falls back to the raw metric


def test_exact_recovery_invariants(tiny):
    # The prompts differ only at DIFF_POS: writing the clean residual there at layer 0 makes the
    # whole input clean; at any other position it writes what is already there.
    res = mp.patch(tiny, CLEAN, CORRUPT, mp.Site("resid_pre", 0), "all", METRIC)
    others = [p for p in range(len(res.positions)) if p != DIFF_POS]
    np.testing.assert_allclose(res.values[0, DIFF_POS], res.clean_metric, atol=1e-5)
    np.testing.assert_allclose(res.normalised[0, DIFF_POS], 1.0, atol=1e-4)
    np.testing.assert_allclose(res.values[0, others], res.corrupt_metric, atol=1e-5)
    # The last block's output at the last position is all the logits there depend on.
    last = mp.patch(tiny, CLEAN, CORRUPT, mp.Site("resid_post", -1), -1, METRIC)
    np.testing.assert_allclose(last.normalised, 1.0, atol=1e-4)
    assert "c/b" in res.position_labels[DIFF_POS]


def test_several_pairs_average_and_keep_each(tiny):
    clean, corrupt = [CLEAN, "A dog"], [CORRUPT, "A fog"]
    metric = mp.logit_diff([ANS, 102], [WRONG, 103])
    both = mp.patch(tiny, clean, corrupt, "attn_out", [-1, -3], metric, cells_per_batch=4)
    for i in range(2):
        one = mp.patch(
            tiny,
            clean[i],
            corrupt[i],
            "attn_out",
            [-1, -3],
            mp.logit_diff(metric.answer[i], metric.wrong[i]),
        )
        np.testing.assert_allclose(both.per_pair[i], one.values, atol=1e-5)
        np.testing.assert_allclose(both.clean[i], one.clean[0], atol=1e-5)
    np.testing.assert_allclose(both.values, both.per_pair.mean(0))
    expected = (both.values - both.corrupt.mean()) / (both.clean.mean() - both.corrupt.mean())
    np.testing.assert_allclose(both.normalised, expected)


def test_different_lengths_with_positions_from_the_end(tiny):
    clean, corrupt = "A cat", "A big bat"
    res = mp.patch(tiny, clean, corrupt, "mlp_out", [-1, -2, 1], METRIC)
    cs, xs = tiny.to_tokens(clean).shape[1], tiny.to_tokens(corrupt).shape[1]
    pairs = [(cs - 1, xs - 1), (cs - 2, xs - 2), (1, 1)]
    expected = _by_hand(
        tiny, tiny.to_tokens(corrupt), tiny.to_tokens(clean), _site_list(tiny, "mlp_out"), pairs
    )
    np.testing.assert_allclose(res.values, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"same token length.*positions=\[-3, -2, -1\]"):
        mp.patch(tiny, clean, corrupt, "mlp_out", "all", METRIC)
    with pytest.raises(ValueError, match="outside pair 0"):
        mp.patch(tiny, clean, corrupt, "mlp_out", [30], METRIC)


def test_chunking_and_packing_do_not_change_results(tiny, cell_packing):
    packs = model_adapter(tiny).packs_rows  # False on a HookedTransformer: chunking only
    runs = [
        mp.patch(tiny, CLEAN, CORRUPT, "head", [1, -1], METRIC, cells_per_batch=n, packed=packed)
        for n, packed in [(1, packs), (7, packs), (1000, packs), (5, False)]
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other.values, runs[0].values, atol=1e-5)
    assert _packing_works(tiny) == packs


def test_prompts_longer_than_a_sliding_window_are_not_packed():
    """A packed row's 4D mask replaced Gemma 2's sliding window: prompts longer than it (64 in
    the tiny model) gave baselines off by 0.28 and cells by 0.38. Such plans run unpacked."""
    model = mp.tiny_model(architecture="gemma2")
    assert model_adapter(model).sliding_window == 64
    text = ("the quick brown fox jumps over the lazy dog and " * 4)[:150]
    clean, corrupt = "A cat: " + text, "A dog: " + text
    metric = mp.logit_diff(86, 58)
    with torch.no_grad():
        own = [model(model.to_tokens(p))[0, -1] for p in (clean, corrupt)]
    res = mp.patch(model, clean, corrupt, "resid_pre", [3, 40, -1], metric, n_random=0)
    assert res.clean_metric == pytest.approx(float(own[0][86] - own[0][58]), abs=1e-4)
    assert res.corrupt_metric == pytest.approx(float(own[1][86] - own[1][58]), abs=1e-4)
    one_by_one = mp.patch(
        model, clean, corrupt, "resid_pre", [3, 40, -1], metric, n_random=0, packed=False
    )
    np.testing.assert_allclose(res.values, one_by_one.values, atol=1e-5)
    with pytest.raises(ValueError, match="sliding attention window"):
        mp.patch(model, clean, corrupt, "resid_pre", -1, metric, n_random=0, packed=True)
    short = mp.patch(model, "A cat sat", "A dog sat", "resid_pre", -1, metric, packed=True)
    assert np.isfinite(short.values).all()  # within the window, packing stays


def test_a_padded_token_batch_is_refused(tiny):
    """model.to_tokens pads prompts of different lengths; read as tokens, the pads moved the
    clean metric from 4.43 to 4.05 and a cell from 0.18 to 3.89."""
    clean = tiny.to_tokens(["The cat sat", "A cat sat on the mat"])
    corrupt = tiny.to_tokens(["The dog sat", "A dog sat on the mat"])
    with pytest.raises(ValueError, match=r"row 0 has 9 pad tokens .* pass the prompts as strings"):
        mp.patch(tiny, clean, corrupt, "mlp_out", -1, METRIC)
    same = tiny.to_tokens(["The cat sat", "The cow sat"])  # equal lengths: no padding
    assert np.isfinite(mp.patch(tiny, same, same, "mlp_out", -1, METRIC).values).all()
    # The pad token is also end-of-text here: a prompt may end in one of its own.
    assert tiny.tokenizer.pad_token_id == tiny.tokenizer.eos_token_id
    ended = same.clone()
    ended[0, -1] = tiny.tokenizer.eos_token_id
    assert np.isfinite(mp.patch(tiny, ended, same, "mlp_out", -1, METRIC).values).all()


def test_tokens_and_callable_metrics(tiny):
    tokens = torch.cat([tiny.to_tokens(CLEAN), tiny.to_tokens(CORRUPT)])
    ref = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, METRIC)
    by_ids = mp.patch(
        tiny, tokens[0], tokens[1], "mlp_out", -1, lambda lg: lg[:, ANS] - lg[:, WRONG]
    )
    with_pair = mp.patch(
        tiny,
        tokens[:1],
        tokens[1:],
        "mlp_out",
        -1,
        lambda lg, pair: lg[:, ANS] - lg[:, WRONG] + pair,
    )
    np.testing.assert_allclose(by_ids.values, ref.values, atol=1e-6)
    np.testing.assert_allclose(with_pair.values, ref.values, atol=1e-6)
    prob = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, mp.answer_prob(ANS))
    with torch.no_grad():
        expected = tiny(tiny.to_tokens(CLEAN))[0, -1].softmax(-1)[ANS]
    np.testing.assert_allclose(prob.clean, [float(expected)], rtol=1e-5)
    assert ((prob.values > 0) & (prob.values < 1)).all()
    # Unpadded ids of different lengths, one tensor per prompt (they were refused, pointing at run)
    clean, corrupt = ["A cat", "Hi there dog"], ["A bat", "Hi there fog"]
    ragged = [tiny.to_tokens(p)[0] for p in clean], [tiny.to_tokens(p)[0] for p in corrupt]
    by_list = mp.ablate_cells(tiny, ragged[0], "mlp_out", -1, METRIC, n_random=0)
    by_text = mp.ablate_cells(tiny, clean, "mlp_out", -1, METRIC, n_random=0)
    np.testing.assert_allclose(by_list.per_pair, by_text.per_pair, atol=1e-6)
    both = mp.patch(tiny, *ragged, "mlp_out", -1, METRIC, n_random=0)
    np.testing.assert_allclose(
        both.per_pair,
        mp.patch(tiny, clean, corrupt, "mlp_out", -1, METRIC, n_random=0).per_pair,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="prompt 1: a list of token ids takes one non-empty 1-D"):
        mp.patch(tiny, [ragged[0][0], ragged[0][1][None]], ragged[1], "mlp_out", -1, METRIC)
    with pytest.raises(ValueError, match="prompt 0: a list of token ids"):
        mp.patch(tiny, [torch.tensor([], dtype=torch.long)], ragged[1][:1], "mlp_out", -1, METRIC)
    with pytest.raises(ValueError, match="mix token-id tensors and other things"):
        mp.patch(tiny, [ragged[0][0], "Hi"], corrupt, "mlp_out", -1, METRIC)
    # the rows of a padded batch, listed, are still a padded batch (pair 0 was read at a pad)
    with pytest.raises(ValueError, match="padded batch"):
        mp.patch(
            tiny, list(tiny.to_tokens(clean)), list(tiny.to_tokens(corrupt)), "mlp_out", -1, METRIC
        )


def test_no_hooks_left_after_an_exception_in_the_metric(tiny):
    before = hook_count(tiny)

    def bad(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        mp.patch(tiny, CLEAN, CORRUPT, "resid_pre", "all", bad)
    with pytest.raises(ValueError, match="one value per row"):
        mp.patch(tiny, CLEAN, CORRUPT, "resid_pre", "all", lambda lg: lg.sum())
    # A metric ported from TransformerLens's patching functions indexes [batch, seq, vocab].
    with pytest.raises(IndexError, match=r"shape \[rows, vocab\].*write lg\[:, a\]"):
        mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, lambda lg: lg[:, -1, ANS] - lg[:, -1, WRONG])
    assert hook_count(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(tiny.to_tokens(CLEAN)), tiny(tiny.to_tokens(CLEAN)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": mp.logit_diff("cat", "dog")}, "single-token answer"),
        ({"metric": mp.logit_diff(-1, 2)}, "outside the vocabulary"),
        ({"metric": mp.answer_prob(10**6)}, "outside the vocabulary"),
        ({"metric": mp.logit_diff(1.5, 2)}, "strings or token ids"),
        ({"metric": mp.logit_diff([1, 2, 3], 4)}, "3 entries for 1 prompt pairs"),
        ({"metric": mp.logit_diff(" ", 223)}, r"same token \(. ., id 223\) .*different wrong"),
        ({"sites": "blocks.0.attn.hook_q"}, "is a hook but not a site"),
        ({"sites": "blocks.1.attn.hook_z"}, r"Site.parse\('blocks.1.attn.hook_z', head=0\)"),
        ({"sites": "blocks.1.attn.hook_k"}, r"every key/value head of layer 1"),
        ({"sites": [mp.Site("mlp_out", 0, positions=-1)]}, "pass positions= to patch"),
        ({"sites": "mlp_out", "positions": "last"}, "same token length|'all'"),
        ({"cells_per_batch": 0}, "cells_per_batch must be at least 1, got 0"),
        ({"direction": "forward"}, "denoising"),
        ({"corrupt": [CORRUPT, CORRUPT]}, "one corrupt prompt per clean"),
        ({"metric": "logit_diff"}, "must be logit_diff"),
        # These ran: two identical columns, and a raw IndexError inside the embedding.
        ({"positions": [-1, 2, -1]}, r"positions repeat \[-1\]"),
        (
            {"corrupt": torch.tensor([1, 2, 10**6])},
            r"Corrupt prompt 0 holds token id 1000000 at position 2, outside the model's",
        ),
        # A metric not finite on the model's own logits made every recovery NaN, silently.
        ({"metric": lambda lg: torch.log(lg[:, 5] * 0)}, r"gave -inf on an unpatched"),
    ],
)
def test_bad_input_fails_before_running(tiny, kwargs, message):
    args = {"sites": "mlp_out", "positions": -1, "metric": METRIC, "corrupt": CORRUPT} | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        mp.patch(tiny, CLEAN, **args)


def test_a_metric_not_finite_in_some_cells_warns(tiny):
    seen = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, lambda lg: lg[:, 5], n_random=0)
    unpatched = torch.tensor([float(seen.clean[0]), float(seen.corrupt[0])], dtype=torch.float64)

    def finite_unpatched(logits):  # NaN wherever a patch moved the logit
        value = logits[:, 5].double()
        known = (value[:, None] - unpatched).abs().min(1).values < 1e-6
        return torch.where(known, value, torch.nan)

    with pytest.warns(RuntimeWarning, match="not finite in .* patched cells"):
        res = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, finite_unpatched, n_random=0)
    assert np.isnan(res.values).any() and np.isfinite(res.clean).all()


def test_result_frame_plot_and_json(tiny, tmp_path):
    res = mp.patch(tiny, CLEAN, CORRUPT, "head", -1, METRIC)
    frame = res.to_frame()
    assert list(frame.columns) == [
        "site",
        "kind",
        "layer",
        "head",
        "position",
        "position_label",
        "value",
        "normalised",
        "effect",
        "spread",
        "random_value",
        "random_effect",
        "random_std",
        "random_normalised",
        "metric",
        "direction",
    ]
    assert len(frame) == res.values.size == 12
    np.testing.assert_allclose(frame["value"], res.values.ravel())
    np.testing.assert_allclose(
        frame["random_effect"], (res.random_values - res.corrupt_metric).ravel()
    )
    assert set(frame["metric"]) == {res.metric} and set(frame["direction"]) == {"denoising"}
    assert frame.loc[5, "layer"] == 1 and frame.loc[5, "head"] == 1
    fig = res.plot()
    assert isinstance(fig, Figure) and fig.axes[0].get_ylabel() == "layer"
    res.save(tmp_path / "patch.json")
    back = mp.PatchResult.load(tmp_path / "patch.json")
    assert back.sites == res.sites and back.heads == res.heads and back.kind == "head"
    np.testing.assert_array_equal(back.per_pair, res.per_pair)
    np.testing.assert_array_equal(back.normalised, res.normalised)
    grid = mp.patch(tiny, CLEAN, CORRUPT, "resid_pre", "all", METRIC)
    assert isinstance(grid.plot(), Figure)
    with pytest.warns(UserWarning):
        same = mp.patch(tiny, CLEAN, CLEAN, "mlp_out", -1, METRIC)
    same.save(tmp_path / "nan.json")  # NaN normalised survives the round trip
    assert np.isnan(mp.PatchResult.load(tmp_path / "nan.json").normalised).all()


def test_figures_and_labels_of_several_kinds_and_pairs(tiny):
    # Several kinds were one tall stack titled "of mixed"; columns were labelled with pair 0's
    # tokens while averaging pairs that hold other tokens there.
    clean, corrupt = ["A cat", "A dog"], ["A bat", "A fog"]
    res = mp.attribution_patch(tiny, clean, corrupt, ["resid_pre", "mlp_out"], "all", METRIC)
    bos = mp.core.model_adapter(tiny).token_text(int(tiny.to_tokens("A")[0, 0]))
    # the tiny tokenizer is char-level: "A cat" is BOS, "A", " ", "c", "a", "t"
    assert res.position_labels == (bos, "A", "␣", "3: c/b…", "4: a…", "5: t…")  # " " shown
    fig = res.plot()
    panels = [axis for axis in fig.axes if axis.images]
    assert [axis.get_title() for axis in panels] == ["resid_pre", "mlp_out"]
    assert fig.get_suptitle().startswith(
        "attribution patching (estimated denoising) of resid_pre, mlp_out"
    )
    for axis, kind in zip(panels, ["resid_pre", "mlp_out"], strict=True):
        rows = [i for i, k in enumerate(res.kinds) if k == kind]
        np.testing.assert_allclose(axis.images[0].get_array(), res.normalised[rows])
        assert axis.images[0].norm.vmax == panels[0].images[0].norm.vmax  # one scale
    # Noising draws damage, 1 - recovery: cells a patch left alone were dark, those that matter pale
    noised = mp.patch(tiny, CLEAN, CORRUPT, "resid_pre", "all", METRIC, direction="noising")
    image = noised.plot().axes[0].images[0]
    np.testing.assert_allclose(image.get_array(), 1 - noised.normalised)
    assert np.isnan(noised.spread).all()  # over one pair: undefined, not 0 ("consistent")
    assert noised.plot().axes[1].get_ylabel().startswith("normalised damage")
    ablated = mp.ablate_cells(tiny, clean, "mlp_out", [1, -1], METRIC, n_random=0)
    summary = ablated.summary()
    assert "normalised" not in summary
    # one key/value head: the grid's one column is a head, not a position
    mqa = mp.patch(mp.tiny_model(n_kv_heads=1), "ab", "ac", "k", -1, METRIC, n_random=0)
    assert mqa.plot().axes[0].get_xlabel() == "head"
    long = "The quick brown fox jumps over the lazy dog and then sleeps in the sun all day"
    wide = mp.patch(
        tiny, long + " cat", long + " bat", ["resid_pre", "mlp_out"], "all", METRIC, n_random=0
    )
    assert wide.plot().get_size_inches()[0] <= 17.0  # capped: 83 positions x 2 kinds drew 54 in
    # whole positions beside <NA> (a dash in the notebook), not 3.0 nor an object column
    positions = summary["position"]
    assert positions.dtype == "Int64" and positions.isna().iloc[0] and positions.notna().iloc[-1]
    assert "&lt;NA&gt;" not in ablated._repr_html_()


@pytest.mark.integration
def test_smollm2_capitals_batched_equals_one_cell_at_a_time(smollm2):
    clean = "Q: What is the capital of France?\nA:"
    corrupt = "Q: What is the capital of Poland?\nA:"
    paris, warsaw = (
        smollm2.tokenizer(a, add_special_tokens=False)["input_ids"][0]
        for a in [" Paris", " Warsaw"]
    )
    res = mp.patch(smollm2, clean, corrupt, "mlp_out", -1, mp.logit_diff(" Paris", " Warsaw"))
    seq = smollm2.to_tokens(clean).shape[1]
    expected = _by_hand(
        smollm2,
        smollm2.to_tokens(corrupt),
        smollm2.to_tokens(clean),
        _site_list(smollm2, "mlp_out"),
        [(seq - 1, seq - 1)],
        metric=lambda lg: lg[:, -1, paris] - lg[:, -1, warsaw],
    )
    assert res.values.shape == (30, 1)
    np.testing.assert_allclose(res.values, expected, atol=1e-4)
    assert res.clean_metric > 0 > res.corrupt_metric  # Paris wins on France, Warsaw on Poland
    # "Paris" without its space is a token of its own: scored silently, a clean logit
    # difference of 5.27 instead of 6.21 (review 24a). The spaced answers above said nothing.
    with pytest.warns(UserWarning, match=r"answer 'Paris' has no leading space.*Pass ' Paris'"):
        mp.logit_diff("Paris", " Warsaw").bind(smollm2, n_pairs=1)


def test_an_unspaced_answer_warns_only_where_the_spaced_word_is_one_token() -> None:
    from types import SimpleNamespace

    from mechprobe.core import warn_unspaced

    vocab = {"Paris": [1], " Paris": [2], "Nairobi": [3, 4], " Nairobi": [5, 6], "\n": [7]}
    model = SimpleNamespace(tokenizer=lambda text, **_: {"input_ids": vocab.get(text, [9, 9])})
    with pytest.warns(UserWarning, match=r"wrong 'Paris' has no leading space.*\(id 2\)"):
        warn_unspaced(model, ["Paris", " Rome"], "wrong")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unspaced(model, [" Paris", "Nairobi", "\n"], "answer")  # nothing to say


def test_reference_means_over_more_prompts_than_one_pass_takes() -> None:
    """The reference pass runs 32 prompts at a time (it was one pass over all of them, unbounded
    memory): the means over 40 prompts of mixed lengths equal the plain mean of each prompt's
    own cache."""
    from mechprobe.patching._activation import _means

    model = mp.tiny_model()
    prompts = [("ab" * (1 + i % 5)) + str(i) for i in range(40)]
    ids = [model.to_tokens(p)[0] for p in prompts]
    site = mp.Site("mlp_out", 1)
    got = _means(model, [site], ids)[site]
    rows = []
    for t in ids:
        _, cache = model.run_with_cache(t[None])
        rows.append(cache[site.hook_name][0, 1:].double())  # BOS left out
    torch.testing.assert_close(got, torch.cat(rows).mean(0).float(), atol=1e-6, rtol=1e-5)


PAIRS = [("A cat", "A bat"), ("Hi dog", "Hi fog"), ("So red", "So rod")]
REFERENCE = ["A bat", "Hi fog", "So rod"]  # one mean for every run below


@pytest.mark.parametrize(
    "analysis",
    [
        lambda m, c, k: mp.patch(m, c, k, ["mlp_out", "pattern"], [-2, -1], METRIC),
        lambda m, c, k: mp.patch(m, c, k, "head", -1, METRIC, direction="noising"),
        lambda m, c, k: mp.ablate_cells(m, c, "head", [-2, -1], METRIC, reference=REFERENCE),
        lambda m, c, k: mp.attribution_patch(m, c, k, ["head", "pattern"], [-3, -1], METRIC),
        lambda m, c, k: mp.path_patch(
            m, c, k, ["mlp_out", mp.Site("head", 0, head=1)], "q", METRIC, positions=[-2, -1]
        ),
    ],
    ids=["patch", "noising", "ablate", "attribution", "path"],
)
def test_a_pairs_random_controls_do_not_depend_on_the_other_pairs(tiny, analysis):
    """Control ``j`` of a pair is drawn from ``seed + j`` and the pair's tokens: running a pair
    alone, after others or in another order gives it the same controls (as causal tracing does
    per prompt), so runs split over jobs can be joined. Before, the draws ran through the whole
    grid, so pair 2's controls changed when pair 0 was dropped."""
    clean, corrupt = [c for c, _ in PAIRS], [k for _, k in PAIRS]
    together = analysis(tiny, clean, corrupt)
    alone = analysis(tiny, clean[2:], corrupt[2:])
    reordered = analysis(tiny, clean[::-1], corrupt[::-1])
    assert np.isfinite(together.random).any()  # path patching: NaN where no path runs
    np.testing.assert_allclose(alone.random[:, 0], together.random[:, 2], atol=1e-5)
    np.testing.assert_allclose(reordered.random[:, ::-1], together.random, atol=1e-5)
    # Controls are draws, not copies: other pairs and other seeds move them.
    assert not np.allclose(together.random[:, 0], together.random[:, 1], atol=1e-3)
    # So runs split over pairs join into the one run (concat recomputes means and recovery).
    joined = type(together).concat([analysis(tiny, clean[:2], corrupt[:2]), alone])
    for name in ("per_pair", "random", "values", "normalised", "clean", "corrupt"):
        np.testing.assert_allclose(getattr(joined, name), getattr(together, name), atol=1e-5)
    pd.testing.assert_frame_equal(joined.to_frame(), together.to_frame(), atol=1e-5)


@pytest.mark.parametrize(
    "analysis",
    [
        lambda m, c, k, metric: mp.patch(m, c, k, "mlp_out", -1, metric),
        lambda m, c, k, metric: mp.ablate_cells(m, c, "mlp_out", -1, metric),
        lambda m, c, k, metric: mp.attribution_patch(m, c, k, "mlp_out", -1, metric),
        lambda m, c, k, metric: mp.path_patch(m, c, k, "mlp_out", "final", metric, positions=-1),
    ],
    ids=["patch", "ablate", "attribution", "path"],
)
def test_a_result_records_its_pairs_and_answers_and_concat_warns_of_a_repeated_pair(
    tiny, tmp_path, analysis
):
    # A saved result said neither which pairs nor which answers it measured, so a shared file
    # could not be traced and concat([a, a]) counted every pair twice (review 21b).
    clean, corrupt = ["A cat", "Hi dog"], ["A bat", "Hi fog"]
    res = analysis(tiny, clean, corrupt, mp.logit_diff([1, 3], 2))
    tokenizer = model_adapter(tiny).tokenizer
    bos = tokenizer.decode([tiny.to_tokens("")[0, 0].item()])
    assert res.clean_prompts == tuple(bos + p for p in clean)
    ablation = res.direction.endswith("ablation")
    assert res.corrupt_prompts == (() if ablation else tuple(bos + p for p in corrupt))
    assert (res.answer_ids, res.wrong_ids) == ((1, 3), (2, 2))
    back = type(res).load(res.save(tmp_path / "res.json"))
    assert (back.clean_prompts, back.corrupt_prompts) == (res.clean_prompts, res.corrupt_prompts)
    assert (back.answer_ids, back.wrong_ids) == (res.answer_ids, res.wrong_ids)
    with pytest.warns(UserWarning, match="is in part 0 and part 1: it counts twice"):
        twice = type(res).concat([res, back])
    assert twice.clean_prompts == res.clean_prompts * 2  # joined as asked: a dataset may repeat
    # Parts on other pairs join, their records with them; a metric function reads no ids.
    other = analysis(tiny, ["Yo cat"], ["Yo bat"], mp.logit_diff(1, 2))
    joined = type(res).concat([res, other])
    assert joined.clean_prompts == (*res.clean_prompts, *other.clean_prompts)
    assert joined.answer_ids == (1, 3, 1)
    assert (
        analysis(tiny, clean, corrupt, lambda logits: logits[:, 1] - logits[:, 2]).answer_ids == ()
    )


def test_concat_refuses_parts_of_different_analyses(tiny, tmp_path):
    one = mp.patch(tiny, "A cat", "A bat", "mlp_out", -1, METRIC, progress=False)
    two = mp.patch(tiny, "Hi dog", "Hi fog", "mlp_out", -1, METRIC, progress=False)
    path = tmp_path / "two.json"
    two.save(path)
    joined = mp.PatchResult.concat([one, mp.PatchResult.load(path)])  # saved parts join too
    assert joined.per_pair.shape == (2, tiny.cfg.n_layers, 1)
    assert joined.position_labels == one.position_labels  # pair 0's tokens
    for other, field in [
        (mp.patch(tiny, "Hi dog", "Hi fog", "mlp_out", -1, METRIC, seed=1), "seed"),
        (mp.patch(tiny, "Hi dog", "Hi fog", "attn_out", -1, METRIC), "sites"),
        (mp.patch(tiny, "Hi dog", "Hi fog", "mlp_out", -2, METRIC), "positions"),
        (mp.patch(tiny, "Hi dog", "Hi fog", "mlp_out", -1, mp.answer_prob(3)), "metric"),
        (mp.patch(tiny, "Hi dog", "Hi fog", "mlp_out", -1, METRIC, n_random=1), "random"),
    ]:
        with pytest.raises(ValueError, match=f"Cannot join: .*{field}"):
            mp.PatchResult.concat([one, other])
    with pytest.raises(TypeError, match="takes PatchResults"):
        mp.PatchResult.concat([])
    path_result = mp.path_patch(tiny, "A cat", "A bat", "mlp_out", "final", METRIC)
    with pytest.raises(TypeError, match="PathPatchResult"):
        mp.PatchResult.concat([one, path_result])


def _passes(monkeypatch, model):
    """Record (rows, width) of every forward pass the patching engine runs."""
    shapes: list[tuple[int, int]] = []
    adapter = type(model_adapter(model))
    forward = adapter.forward

    def spy(self, tokens, *args, **kwargs):
        shapes.append(tuple(tokens.shape))
        return forward(self, tokens, *args, **kwargs)

    monkeypatch.setattr(adapter, "forward", spy)
    return shapes


def test_passes_stay_within_the_memory_budget_and_rows_stay_short(tiny, monkeypatch):
    """A pass held 256 cells whatever the prompt length, and cells editing early positions were
    packed two or three to a row three prompts wide: on SmolLM2, +22 GiB for one 513-token pair
    at every position (review 21e). Rows now stop at the width that costs least per cell, cells
    editing early run as their own rows, and passes fit ``memory_budget``; numbers unchanged."""
    torch.manual_seed(0)
    clean = torch.randint(5, 90, (40,))
    corrupt = clean.clone()
    corrupt[20] = 3
    costs = _engine._Costs.of(tiny)
    args = (tiny, clean, corrupt, "resid_pre", "all", METRIC)
    kwargs = {"layers": [0, 1], "n_random": 1, "progress": False}
    shapes = _passes(monkeypatch, tiny)
    default = mp.patch(*args, **kwargs)
    n_cells = 2 * 40 * 2
    # Rows near the cost model's packed width (40 tokens: 88; a row may pass its even share by one
    # cell's suffix), not 512.
    assert max(width for _, width in shapes) <= 2 * costs.packed_width(40)
    assert sum(rows for rows, _ in shapes) < 2 * n_cells  # not one row (plus a base) per cell
    shapes.clear()
    budget = 3 * costs.row_bytes(60)
    small = mp.patch(*args, memory_budget=budget, **kwargs)
    assert len(shapes) > 10  # the budget split the passes
    for rows, width in shapes:
        assert rows * costs.row_bytes(width) <= budget
    np.testing.assert_allclose(small.values, default.values, atol=1e-5)
    np.testing.assert_allclose(small.random, default.random, atol=1e-5)
    # A budget below one cell's rows still runs, a cell at a time.
    shapes.clear()
    one = mp.patch(
        tiny,
        clean,
        corrupt,
        "resid_pre",
        [5, -1],
        METRIC,
        layers=[0],
        n_random=0,
        memory_budget=1,
        progress=False,
    )
    # Pass 1: the base with the last position's cell packed after it, and the source; pass 2:
    # position 5's cell whole and the source again (the base ran in pass 1). One row per
    # sequence where the model cannot pack rows.
    packs = _packing_works(tiny)
    assert [rows for rows, _ in shapes] == ([2, 2] if packs else [3, 2])
    np.testing.assert_allclose(one.values, default.values[:1, [5, -1]], atol=1e-5)


class _Bar:
    """Stands in for tqdm: records the bar's total, its updates and its unit (where the count is shown)."""

    made: typing.ClassVar[list[_Bar]] = []

    def __init__(self, iterable=None, total=None, unit="it", **kwargs):
        self.iterable, self.total, self.unit = iterable, total, unit
        self.updates: list[float] = []
        _Bar.made.append(self)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.updates.append(1.0)

    def update(self, n=1):
        self.updates.append(n)

    def close(self):
        pass


def test_the_progress_bar_counts_runs_and_advances_by_each_pass_time(tiny, monkeypatch):
    """The bar counted forward passes, whose costs differ by orders of magnitude (a few whole
    rows of a long prompt, or hundreds of packed short cells), so its remaining time was wrong
    and it did not say how much was done. It now counts edited runs (a result cell's, per pair
    and control) and advances by each pass's estimated time: rows x the cost model's time of a
    row as wide as the pass's widest."""
    from mechprobe.core import _progress

    monkeypatch.setattr(_progress, "tqdm", _Bar)
    monkeypatch.delenv("MECHPROBE_PROGRESS", raising=False)
    _Bar.made.clear()
    torch.manual_seed(0)
    clean = torch.randint(5, 90, (40,))
    corrupt = clean.clone()
    corrupt[20] = 3
    costs = _engine._Costs.of(tiny)
    _packing_works(tiny)  # its own check runs a forward pass: before the spy
    shapes = _passes(monkeypatch, tiny)
    mp.patch(
        tiny,
        clean,
        corrupt,
        "resid_pre",
        "all",
        METRIC,
        layers=[0, 1],
        n_random=0,
        memory_budget=3 * costs.row_bytes(60),
    )
    (bar,) = _Bar.made
    assert len(shapes) > 5  # several passes of different shapes
    times = [rows * width * (1 + width / costs.crossover) for rows, width in shapes]
    np.testing.assert_allclose(bar.updates, times, rtol=1e-9)
    assert bar.total == pytest.approx(sum(times))
    assert bar.unit == f"{2 * 40}/{2 * 40} runs"


@pytest.mark.parametrize("n_tok", [5, 40, 500, 5000])
def test_a_cell_shares_its_base_row_only_where_its_suffix_is_short(tiny, n_tok):
    # the cost model alone: a HookedTransformer's context cap has its own test
    costs = dataclasses.replace(_engine._Costs.of(tiny), max_width=None)
    packs = [costs.packs(n_tok, suffix) for suffix in range(1, n_tok + 1)]
    assert packs[0] and not packs[-1]  # the last position shares; the first runs whole
    assert packs == sorted(packs, reverse=True)  # one threshold: shorter suffixes share
    assert n_tok < costs.packed_width(n_tok) <= 2 * n_tok + costs.crossover


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (0, ValueError, "memory_budget must be at least 1, got 0"),
        (-5, ValueError, "memory_budget must be at least 1, got -5"),
        (1.5, TypeError, r"memory_budget must be an int, got float 1\.5"),
        (True, TypeError, "memory_budget must be an int, got bool True"),
        ("1GiB", TypeError, "memory_budget must be an int, got str '1GiB'"),
    ],
)
def test_a_bad_memory_budget_is_refused(tiny, value, error, message):
    with pytest.raises(error, match=message):
        mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", -1, METRIC, memory_budget=value)


def test_numpy_and_tensor_counts_are_counts(tiny):
    # cells_per_batch=np.int64(8) was refused as "must be a positive int, got np.int64(8)"
    # (review 28a E3): the counts are read as core.check_int reads every count.
    want = mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", "all", METRIC, cells_per_batch=2)
    for count in (np.int64(2), torch.tensor(2)):
        got = mp.patch(
            tiny, "Hi cat", "Hi bat", "mlp_out", "all", METRIC, cells_per_batch=count,
            memory_budget=np.int64(1 << 30),
        )  # fmt: skip
        np.testing.assert_allclose(got.values, want.values, atol=1e-5)


def test_a_bases_packed_cells_take_the_number_of_rows_that_costs_least():
    """Rows of ``n + total / k`` tokens: brute force over k against the engine's choice."""
    costs = _engine._Costs(n_heads=9, d_model=576, d_mlp=1536, itemsize=4, crossover=737.0)

    def cost(n_tok, total, k):
        width = n_tok + total / k
        return k * width * (1 + width / costs.crossover)

    for n_tok, total in [(14, 1000), (55, 270), (129, 5000), (513, 20000), (40, 1)]:
        k = costs.rows_for(n_tok, total)
        best = min(cost(n_tok, total, j) for j in range(1, 4 * k + 10))
        assert cost(n_tok, total, k) == pytest.approx(best)
    # 270 heads at the last position of a 55-token prompt: one row (two rows of half the cells
    # each repeated the prompt, and the pass padded both).
    assert costs.rows_for(55, 270) == 1


def test_packed_rows_stay_within_a_hooked_transformers_context(tiny):
    """A HookedTransformer looks its positions up by index before they are moved (GPT-2's
    learned positions, 1,024): a base whose packed rows could pass its context runs whole."""
    free = _engine._Costs(n_heads=12, d_model=768, d_mlp=3072, itemsize=4, crossover=1311.0)
    capped = dataclasses.replace(free, max_width=1024)
    assert free.packs(300, 1) and not capped.packs(300, 1)
    assert capped.packs(60, 1) and 2 * capped.packed_width(60) <= 1024
    assert _engine._Costs.of(tiny).max_width == (
        int(tiny.cfg.n_ctx) if model_adapter(tiny).kind == "hooked" else None
    )
    if model_adapter(tiny).kind == "hooked":  # a plan past the context runs whole rows
        long_clean = "a b " * 60
        long_corrupt = "a c " * 60
        res = mp.patch(tiny, long_clean, long_corrupt, "resid_pre", -1, METRIC, n_random=0)
        ref = mp.patch(tiny, long_clean, long_corrupt, "resid_pre", -1, METRIC, n_random=0,
                       packed=False)  # fmt: skip
        np.testing.assert_allclose(res.values, ref.values, atol=1e-5)


def test_a_silent_bar_lays_out_no_pass_twice(tiny, monkeypatch):
    """The bar's time estimate lays out each pass's rows once more: only where a bar shows."""
    calls = []
    time = _engine._Packer.time
    monkeypatch.setattr(_engine._Packer, "time", lambda self: calls.append(1) or time(self))
    mp.patch(tiny, "Hi cat sat", "Hi bat sat", "mlp_out", "all", METRIC, progress=False)
    assert calls == []
    monkeypatch.delenv("MECHPROBE_PROGRESS", raising=False)
    mp.patch(tiny, "Hi cat sat", "Hi bat sat", "mlp_out", "all", METRIC, progress=True)
    assert calls


def test_a_users_hook_does_not_turn_packing_off_for_good(tiny):
    # packing_works caches its verdict per model: reached with a user's hook on unembed.hook_out
    # it was False for the model's life, and patch(packed=True) refused it ever after.
    if not model_adapter(tiny).packs_rows:
        pytest.skip("a HookedTransformer never packs rows")
    model = mp.tiny_model(seed=3)  # a model whose verdict no other test has reached
    model.add_hook("unembed.hook_out", lambda logits, hook: logits + 1.0 * (logits > 0))
    try:
        _packing_works(model)
    finally:
        model.reset_hooks()
    assert _packing_works(model)
    mp.patch(model, ["Hi there"], ["Hi where"], "resid_pre", -1, METRIC, packed=True)


_ARGMAX = lambda lg: lg.argmax(-1)  # noqa: E731
_NONE = lambda lg: None  # noqa: E731


@pytest.mark.parametrize(
    "call",
    [
        lambda m, f: mp.patch(m, CLEAN, CORRUPT, "mlp_out", -1, f, n_random=0),
        lambda m, f: mp.ablate_cells(m, CLEAN, "mlp_out", -1, f, method="zero", n_random=0),
        lambda m, f: mp.causal_trace(m, "The cat sat", "cat", metric=f, n_noise=2, n_random=0),
        lambda m, f: mp.path_patch(m, "A cat sat", "A bat sat", "head", "final", f, n_random=0),
    ],
    ids=["patch", "ablate_cells", "causal_trace", "path_patch"],
)
def test_a_metric_of_token_ids_or_none_is_refused(tiny, call):
    # Review 26b L1: an argmax metric was averaged into "clean 134, corrupt 205" (mean token ids);
    # L2: a metric returning None gave torch's "Could not infer dtype of NoneType".
    with pytest.raises(TypeError, match=r"returned torch.int64 values: return float scores"):
        call(tiny, _ARGMAX)
    with pytest.raises(TypeError, match=r"The metric returned None: return one float per row"):
        call(tiny, _NONE)


def test_a_bool_metric_is_a_hit_rate(tiny):
    top = int(mp.run(tiny, CLEAN).logits[0, -1].argmax())
    res = mp.patch(tiny, [CLEAN, CORRUPT], [CORRUPT, CLEAN], "mlp_out", -1,
                   lambda lg: lg.argmax(-1) == top, n_random=0)  # fmt: skip
    # A share of hits: 1 on the clean prompt where the top token is `top`, a float array.
    assert res.clean.dtype == np.float64 and res.clean[0] == 1.0


@pytest.mark.parametrize("fn", ["patch", "attribution_patch", "ablate_cells"])
def test_layers_with_only_explicit_sites_is_refused(tiny, fn):
    # Review 26b L10: Site("resid_pre", 1) with layers=[2] patched layer 1 alone, silently.
    call = {
        "patch": lambda s, **kw: mp.patch(tiny, CLEAN, CORRUPT, s, -1, METRIC, n_random=0, **kw),
        "attribution_patch": lambda s, **kw: mp.attribution_patch(
            tiny, CLEAN, CORRUPT, s, -1, METRIC, n_random=0, **kw
        ),
        "ablate_cells": lambda s, **kw: mp.ablate_cells(
            tiny, CLEAN, s, -1, METRIC, method="zero", n_random=0, **kw
        ),
    }[fn]
    for sites in (mp.Site("resid_pre", 1), ["blocks.1.hook_resid_pre", "mlp_out@0"]):
        with pytest.raises(ValueError, match=r"layers=\[2\] is given, but every entry of sites"):
            call(sites, layers=[2])
    # Where layers chooses the layers of a kind beside them, it applies there, as before.
    res = call([mp.Site("resid_pre", 1), "mlp_out"], layers=[2])
    assert [str(s) for s in res.sites] == ["resid_pre@1", "mlp_out@2"]


def test_a_single_positions_tick_is_upright_and_says_the_position(tiny):
    # Review 26a F13: an ablation at -1 drew its one tick, ":", rotated 90 degrees: a dot pair.
    res = mp.patch(tiny, "ab", "ac", "mlp_out", -1, mp.logit_diff(1, 2), progress=False)
    (tick,) = res.plot().axes[0].get_xticklabels()
    assert tick.get_text() == f"'{res.position_labels[0]}' (position -1)"
    assert tick.get_rotation() == 0
    every = mp.patch(tiny, "ab", "ac", "mlp_out", "all", mp.logit_diff(1, 2), progress=False)
    ticks = every.plot().axes[0].get_xticklabels()
    # each token with its position (26a F13: a few-shot prompt repeats its tokens)
    assert [t.get_text() for t in ticks] == [
        f"{label} ({at})" for at, label in enumerate(every.position_labels)
    ]
    assert {t.get_rotation() for t in ticks} == {90}


def test_titles_name_the_metrics_tokens(tiny, tmp_path):
    # Review 26a F10: titles said "denoising patching of resid_pre: logit_diff" and the colour bar
    # "change of logit_diff"; a figure on a slide no longer said which answer.
    import dataclasses

    res = mp.patch(tiny, "ab cd", "ab ce", "resid_pre", "all", mp.logit_diff("x", "y"),
                   progress=False)  # fmt: skip
    assert (res.answer_tokens, res.wrong_tokens) == (("x",), ("y",))
    title = res.plot().axes[0].get_title().replace("\n", " ")
    assert title.endswith("resid_pre: logit['x'] - logit['y']")
    raw = res.plot(normalised=False)
    assert raw.axes[1].get_ylabel() == "change of logit['x'] - logit['y']"
    for suffix in (".json", ".npz"):  # the tokens are kept; an older file (none) keeps the name
        back = mp.PatchResult.load(res.save(tmp_path / f"p{suffix}"))
        assert back.answer_tokens == ("x",) and back.wrong_tokens == ("y",)
    older = dataclasses.replace(res, answer_tokens=(), wrong_tokens=())
    assert older.plot().axes[0].get_title().replace("\n", " ").endswith(": logit_diff")
    prob = mp.ablate_cells(tiny, "ab cd", "mlp_out", -1, mp.answer_prob("x"), progress=False)
    assert prob.plot().axes[0].get_title().endswith("mlp_out: p('x')")
    other = mp.patch(tiny, "ab cf", "ab cg", "resid_pre", "all", mp.logit_diff("z", "y"),
                     progress=False)  # fmt: skip
    joined = mp.PatchResult.concat([res, other])  # the tokens join as the ids do
    assert (joined.answer_tokens, joined.wrong_tokens) == (("x", "z"), ("y", "y"))
    assert joined.plot().axes[0].get_title().endswith("logit[answer] - logit['y']")
    per_pair = mp.patch(tiny, ["ab cd", "ab cf"], ["ab ce", "ab cg"], "mlp_out", -1,
                        mp.logit_diff(["x", "y"], "z"), progress=False)  # fmt: skip
    assert per_pair.plot().axes[0].get_title().endswith("logit[answer] - logit['z']")
    own = mp.patch(tiny, "ab cd", "ab ce", "mlp_out", -1, lambda lg: lg[:, 5], progress=False)
    assert not own.answer_tokens and own.plot().axes[0].get_title().endswith(": <lambda>")


def test_a_head_grid_says_the_position_its_heads_were_patched_at(tiny):
    # Review 26a: the layer x head grid has no position axis, and its title said none.
    res = mp.patch(tiny, "ab", "ac", "head", -1, mp.logit_diff(1, 2), n_random=0)
    title = res.plot().axes[0].get_title().replace("\n", " ")
    assert f"at position -1 ('{res.position_labels[0]}')" in title


def test_heads_at_several_positions_draw_a_grid_per_position(tiny):
    """Review 33b F7: 12 heads x 2 positions drew one 12-row strip per position; now a layer x
    head grid per position, each panel that column's head_matrix, on one colour scale."""
    res = mp.patch(tiny, "ab cd", "ab ce", "head", {"S": 2, "END": -1}, mp.logit_diff(1, 2),
                   n_random=0, progress=False)  # fmt: skip
    fig = res.plot()
    panels = [axis for axis in fig.axes if axis.images]
    assert [axis.get_title() for axis in panels] == ["S", "END"]
    for column, axis in enumerate(panels):
        drawn = np.asarray(axis.images[0].get_array())
        np.testing.assert_allclose(drawn, res.head_matrix(position=column), equal_nan=True)
    limits = {axis.images[0].get_clim() for axis in panels}
    assert len(limits) == 1  # one colour scale
    np.testing.assert_array_equal(res.head_matrix(position="END"), res.head_matrix(position=1))
    with pytest.raises(ValueError, match=r"its named positions: \['S', 'END'\]"):
        res.head_matrix(position="S2")
    # more positions than panels: one heatmap of every head row, as before
    many = mp.patch(tiny, "ab cd efgh", "ab ce efgh", "head", list(range(9)),
                    mp.logit_diff(1, 2), n_random=0, progress=False)  # fmt: skip
    assert len([axis for axis in many.plot().axes if axis.images]) == 1


def test_a_metric_evaluates_on_prompts_as_the_model_reads_them(tiny):
    """PatchMetric.evaluate (review 33b F2: checking that the model solves the clean prompts took
    logits indexed by hand): each prompt alone through the model, its last token's logits, for
    prompts of several lengths in one padded batch, per-pair answers matched in order."""
    prompts = ["Hi cat", "A much longer prompt here", "Yo"]
    answers, wrongs = [5, 7, 9], [6, 8, 10]
    got = mp.logit_diff(answers, wrongs).evaluate(tiny, prompts, batch_size=2)
    prob = mp.answer_prob(answers).evaluate(tiny, prompts)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            last = tiny(tiny.to_tokens(prompt))[0, -1]
        assert got[i] == pytest.approx(float(last[answers[i]] - last[wrongs[i]]), abs=1e-5)
        assert prob[i] == pytest.approx(float(last.softmax(-1)[answers[i]]), abs=1e-6)
    assert mp.logit_diff(5, 6).evaluate(tiny, "Hi cat").shape == (1,)
    with pytest.raises(ValueError, match="3 entries for 2 prompt pairs"):
        mp.logit_diff(answers, wrongs).evaluate(tiny, prompts[:2])


@pytest.mark.filterwarnings("ignore:reference_positions='same' takes each position's mean")
def test_a_position_wise_mean_ablation_equals_hand_hooks(tiny):
    # Wang et al.'s mean ablation: each position set to the mean over prompts of one template of
    # the activation at that position (the reference's per-position mean, not one mean over
    # every token). Prompts and references of one length; a longer reference has positions
    # that only it reaches, and its mean there is its own.
    prompts = ["A cat sat on", "A dog ran by"]
    reference = ["The fox ate it", "My hen saw us", "One bee flew up now"]
    site = "blocks.1.hook_mlp_out"
    caches = [tiny.run_with_cache(tiny.to_tokens(r))[1][site][0] for r in reference]
    width = max(len(c) for c in caches)
    means = [torch.stack([c[p] for c in caches if len(c) > p]).double().mean(0).float()
             for p in range(width)]  # fmt: skip
    res = mp.ablate_cells(tiny, prompts, "mlp_out", "all", METRIC, reference=reference,
                          reference_positions="same", layers=[1], n_random=0,
                          progress=False)  # fmt: skip
    whole = mp.ablate_cells(tiny, prompts, "mlp_out", None, METRIC, reference=reference,
                            reference_positions="same", layers=[1], n_random=0,
                            progress=False)  # fmt: skip
    for i, prompt in enumerate(prompts):
        tokens = tiny.to_tokens(prompt)
        for p in range(tokens.shape[1]):

            def one(a, hook, p=p):
                a = a.clone()
                a[0, p] = means[p]
                return a

            with torch.no_grad():
                logits = tiny.run_with_hooks(tokens, fwd_hooks=[(site, one)])
            assert res.per_pair[i, 0, p] == pytest.approx(float(_metric(logits)[0]), abs=1e-4)

        def every(a, hook, n=tokens.shape[1]):
            return torch.stack(means[:n])[None].to(a.dtype)

        with torch.no_grad():
            logits = tiny.run_with_hooks(tokens, fwd_hooks=[(site, every)])
        assert whole.per_pair[i, 0, 0] == pytest.approx(float(_metric(logits)[0]), abs=1e-4)
    # the position-wise mean is not the mean over every token: the ablations differ
    pooled = mp.ablate_cells(tiny, prompts, "mlp_out", "all", METRIC, reference=reference,
                             layers=[1], n_random=0, progress=False)  # fmt: skip
    assert np.abs(pooled.per_pair - res.per_pair).max() > 1e-3
    # one prompt as its own reference: every position's mean is its own activation
    with pytest.warns(UserWarning, match="changes nothing"):
        alone = mp.ablate_cells(tiny, prompts[0], "mlp_out", "all", METRIC, layers=[1],
                                reference_positions="same", n_random=0,
                                progress=False)  # fmt: skip
    np.testing.assert_allclose(alone.values[0], alone.clean_metric, atol=1e-4)
    # a prompt longer than every reference: no mean at its last positions
    with pytest.raises(ValueError, match="position 20: no reference prompt has 21 tokens"):
        mp.ablate_cells(tiny, "A cat sat on the mat", "mlp_out", -1, METRIC,
                        reference=reference[:2], reference_positions="same", n_random=0,
                        progress=False)  # fmt: skip


def test_a_position_wise_mean_warns_where_positions_do_not_line_up(tiny):
    # Review 38a: prompts of several lengths mix token roles position by position, and a position
    # only the ablated prompt reaches is its own mean there (the cell reads "no effect").
    short, long = "A dog ran", "A cat sat on"
    with pytest.warns(UserWarning) as caught:
        res = mp.ablate_cells(tiny, [long, short], "mlp_out", None, METRIC, layers=[1],
                              reference_positions="same", n_random=0, progress=False)  # fmt: skip
    said = " ".join(str(w.message) for w in caught)
    n_short, n_long = (tiny.to_tokens(p).shape[1] for p in (short, long))
    assert f"2 lengths ({n_short}, {n_long} tokens)" in said
    assert f"Position(s) {list(range(n_short, n_long))} are reached by one prompt only" in said
    assert np.isfinite(res.values).all()
    with warnings.catch_warnings():  # one template, one length: nothing to say
        warnings.simplefilter("error")
        mp.ablate_cells(tiny, [long, "A dog ran by"], "mlp_out", None, METRIC, layers=[1],
                        reference_positions="same", n_random=0, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"takes 'all', 'same' \(a position-wise mean\)"):
        mp.ablate_cells(tiny, long, "mlp_out", -1, METRIC, reference_positions="sam")
    with pytest.warns(UserWarning, match="method='zero' reads no reference prompts"):
        mp.ablate_cells(tiny, long, "mlp_out", -1, METRIC, method="zero", layers=[1],
                        reference_positions="same", n_random=0, progress=False)  # fmt: skip


def test_a_users_hook_keeps_rows_whole(tiny):
    """Review 40c F1: a user's hook that edits by index saw another token's index in a packed
    row (a +0.5 at index 2 moved the values by 0.016 and the clean metric by 0.068)."""
    clean = ["The cat sat on the mat today", "A dog ran far away"]
    corrupt = ["The bat sat on the hat today", "A fog ran far away"]

    def nudge(resid, hook):
        resid = resid.clone()
        resid[:, 2] += 0.5
        return resid

    tiny.add_hook("blocks.1.hook_resid_pre", nudge, is_permanent=True)
    try:
        default = mp.patch(tiny, clean, corrupt, "resid_pre", [-2, -1], METRIC, progress=False)
        whole = mp.patch(tiny, clean, corrupt, "resid_pre", [-2, -1], METRIC, packed=False,
                         progress=False)  # fmt: skip
    finally:
        tiny.reset_hooks(including_permanent=True)
    np.testing.assert_allclose(default.values, whole.values, atol=1e-5)
    np.testing.assert_allclose(default.clean, whole.clean, atol=1e-5)


def test_packing_is_checked_again_in_another_dtype():
    """Review 40c F3: the verdict was kept per model, so a model checked in float32 and moved to
    bfloat16 stayed packed (cells 0.07 off a hooked Llama's unpacked run)."""
    model = mp.tiny_model(seed=5, kind=TEST_KINDS[0])
    _packing_works(model)
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the move
        model.to(torch.bfloat16)
    _packing_works(model)
    assert {dtype for dtype, _ in _engine._PACKING[model]} == {torch.float32, torch.bfloat16}


def _half(model: typing.Any, dtype: torch.dtype) -> typing.Any:
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the move
        return model.to(dtype)


PROMPT_PAIRS = (
    ["The cat sat on the mat today", "A dog ran far away"],
    ["The bat sat on the hat today", "A fog ran far away"],
)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_packs_as_close_to_float32_as_whole_rows(dtype, monkeypatch):
    """Packing was checked at 1e-4 of the logits' scale in every dtype, so a half-precision
    HookedTransformer (its rotary queries and keys turned twice) failed by 2-4 rounding steps
    and ran whole rows. Now it packs, its cells no further from the float32 model's than whole
    rows' (twice as far at most), and a forward that ignores the packed mask is still caught."""
    reference = mp.tiny_model(seed=5, kind=TEST_KINDS[0])
    model = _half(mp.tiny_model(seed=5, kind=TEST_KINDS[0]), dtype)
    assert _packing_works(model)
    args = (*PROMPT_PAIRS, "resid_pre", [-3, -2, -1], METRIC)
    f32 = mp.patch(reference, *args, n_random=0, progress=False).values
    packed = mp.patch(model, *args, packed=True, n_random=0, progress=False).values
    whole = mp.patch(model, *args, packed=False, n_random=0, progress=False).values
    eps = torch.finfo(dtype).eps
    assert np.abs(packed - f32).max() <= 2 * np.abs(whole - f32).max() + eps

    forward = type(model_adapter(model)).forward

    def blind(self, tokens, attention_mask=None, **kwargs):
        if attention_mask is not None and attention_mask.ndim > 2:  # segments see each other
            attention_mask = None
        return forward(self, tokens, attention_mask, **kwargs)

    monkeypatch.setattr(type(model_adapter(model)), "forward", blind)
    _engine._PACKING.pop(model, None)
    assert not _packing_works(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_check_sees_a_segment_read_its_bases_tokens(dtype, monkeypatch):
    """Review 41b F2: the check's second segment held its base's tokens, so a mask that let a
    segment read the base's copies of its own positions changed nothing there (values 1-7.6%
    off in analyses). Its segment now has tokens of its own, and every position is read."""
    model = _half(mp.tiny_model(seed=5, kind=TEST_KINDS[0]), dtype)
    inputs = _engine._Rows.inputs

    def leaky(self, packed, device):
        out = inputs(self, packed, device)
        if packed:  # a segment reads its base's tokens at its own positions, not its own
            width = out["input"].shape[1]
            seg = torch.as_tensor([r + [-1] * (width - len(r)) for r in self.seg])
            pos = torch.as_tensor([r + [0] * (width - len(r)) for r in self.pos])
            parent = torch.as_tensor([*self.parent, -2])[seg][:, :, None]  # per query
            sq, sk, pq, pk = seg[:, :, None], seg[:, None, :], pos[:, :, None], pos[:, None, :]
            instead = (parent >= 0) & (sk == parent) & (pk <= pq)
            own = (parent >= 0) & (sk == sq)
            mask = out["attention_mask"][:, 0].cpu()
            out["attention_mask"] = ((mask & ~own) | instead)[:, None].to(device)
        return out

    assert _packing_works(model)
    monkeypatch.setattr(_engine._Rows, "inputs", leaky)
    _engine._PACKING.pop(model, None)
    assert not _packing_works(model)


def test_packed_true_with_a_users_hook_is_refused():
    """Review 41b F1: with packed=True, a user's hook on a HookedTransformer's hook_rot_k was
    overwritten by the packed rotation (values 0.22 where whole rows gave 0.08); any hook of
    one's own edits by index, another token's in a packed row."""
    model = mp.tiny_model(seed=5, kind=TEST_KINDS[0])
    assert _packing_works(model)  # a verdict reached before the hook, as a session has one
    name = (
        "blocks.1.attn.hook_k"
        if model_adapter(model).kind == "bridge"
        else "blocks.1.attn.hook_rot_k"
    )
    model.add_hook(name, lambda k, hook: k * 3)
    try:
        with pytest.raises(ValueError, match=r"packed=True with hooks attached to the model \("):
            mp.patch(model, *PROMPT_PAIRS, "resid_pre", [-1], METRIC, packed=True, progress=False)
        whole = mp.patch(
            model, *PROMPT_PAIRS, "resid_pre", [-1], METRIC, packed=False, progress=False
        )
        default = mp.patch(model, *PROMPT_PAIRS, "resid_pre", [-1], METRIC, progress=False)
    finally:
        model.reset_hooks()
    np.testing.assert_array_equal(default.values, whole.values)


def _hooked_with(seed: int, **changes: typing.Any) -> typing.Any:
    """The tiny Llama-like HookedTransformer with ``changes`` to its config (a query-key norm, a
    clamp) and its weights, query-key norm gains drawn around one."""
    try:
        base = mp.tiny_model(seed=seed, kind="hooked")
    except mp.ModelLoadError as err:  # TransformerLens 4.x builds no HookedTransformer here
        pytest.skip(str(err))
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config = HookedTransformerConfig.from_dict({**base.cfg.to_dict(), **changes})
    model = HookedTransformer(config, tokenizer=base.tokenizer, move_to_device=False)
    model.load_state_dict(base.state_dict(), strict=False)  # all but the norms' gains
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("q_norm.w", "k_norm.w")):
                weight.copy_(1 + 0.5 * torch.randn_like(weight))
    model.cfg.model_name = base.cfg.model_name
    return model


ROTARY_VARIANTS = {
    "partial rotary": {"rotary_dim": 8},
    "per-head query-key norm": {"use_qk_norm": True},  # Qwen 3's, Gemma 3's
    "OLMo's query-key norm": {"original_architecture": "Olmo2ForCausalLM"},
    "clamp": {"clip_qkv": 0.5},
    "OLMo's norm and a clamp": {"original_architecture": "Olmo2ForCausalLM", "clip_qkv": 0.5},
}


@pytest.mark.parametrize("variant", sorted(ROTARY_VARIANTS))
def test_a_hooked_transformer_packs_bit_for_bit_whatever_comes_before_its_rotation(variant):
    """A HookedTransformer's packed rows rotate each token's queries and keys at its position
    with TransformerLens's own rotation of what the model rotates: hook_q/hook_k's value or,
    where a query-key norm comes between (Qwen 3, Gemma 3, OLMo), the norm's output with its
    last steps replayed, and any clamp. Packed rows used to turn the index's rotation on by the
    difference there, rounding once more (1.8x further from float32 than whole rows in
    bfloat16, review 41b F4), so such models ran whole rows in half precision."""
    model = _hooked_with(3, **ROTARY_VARIANTS[variant])
    has_norm = model.blocks[0].attn.q_norm is not None
    assert has_norm is (variant not in ("partial rotary", "clamp"))
    args = (model, *PROMPT_PAIRS, "q", [-2, -1], METRIC)
    assert _packing_works(model)
    packed = mp.patch(*args, layers=[0, 1], packed=True, n_random=0, progress=False)
    whole = mp.patch(*args, layers=[0, 1], packed=False, n_random=0, progress=False)
    np.testing.assert_allclose(packed.values, whole.values, atol=1e-5, rtol=0)
    _half(model, torch.bfloat16)
    assert _packing_works(model)
    packed = mp.patch(*args, layers=[0, 1], packed=True, n_random=0, progress=False)
    whole = mp.patch(*args, layers=[0, 1], packed=False, n_random=0, progress=False)
    # The plain run's rotation of the plain run's values: whole rows' cells bit for bit.
    np.testing.assert_array_equal(packed.values, whole.values)
