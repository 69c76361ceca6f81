"""The o-vector intervention against manual hooks; contexts; metrics on planted ranks; the sweep."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.relational._contexts import FILLER_WORDS

ARGS = [" Poland", " Chile", " Japan"]
ANSWERS = [" Warsaw", " Santiago", " Tokyo"]


def test_contexts_follow_merullos_pattern_and_are_seeded():
    ctx = mp.random_word_contexts([" China"], seed=3)[0]
    words = ctx.split()
    assert len(words) == 11 and words[3] == words[7] == "China"
    assert words[:3] == words[4:7] == words[8:]  # F arg F arg F
    assert len(set(words[:3])) == 3 and set(words[:3]) <= set(FILLER_WORDS)
    assert mp.random_word_contexts(ARGS, seed=1) == mp.random_word_contexts(ARGS, seed=1)
    assert mp.random_word_contexts(ARGS, seed=1) != mp.random_word_contexts(ARGS, seed=2)
    assert mp.random_word_contexts([" brown"], n_filler=2, repeats=1)[0].split()[2] == "brown"
    with pytest.raises(ValueError, match="n_filler"):
        mp.random_word_contexts(ARGS, n_filler=0)


def _manual_logits(model, contexts, layers, value, mode):
    """A plain TransformerLens hook per layer, one context at a time (no padding)."""

    def hook(act, hook):
        return value.expand_as(act).clone() if mode == "replace" else act + value

    out = []
    for c in contexts:
        with torch.no_grad():
            logits = model.run_with_hooks(
                model.to_tokens(c),
                fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", hook) for layer in layers],
            )
        out.append(logits[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_intervention_equals_a_manual_hook_writing_the_vector(tiny, mode):
    contexts = mp.random_word_contexts(ARGS, seed=0)
    o = torch.randn(64, generator=torch.Generator().manual_seed(0))
    res = mp.ovector_intervention(
        tiny, {"ovector": o}, contexts, ANSWERS, layers=[1, 2], scale=2.5, mode=mode,
        arguments=ARGS, batch_size=2,
    )  # fmt: skip
    after = _manual_logits(tiny, contexts, [1, 2], 2.5 * o, mode)
    before = _manual_logits(tiny, contexts, [], o, mode)
    ids = [tiny.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in ANSWERS]
    for i, tok in enumerate(ids):
        assert res.rank[1, i] == int((after[i] > after[i, tok]).sum())
        assert res.rank[0, i] == int((before[i] > before[i, tok]).sum())
        assert res.top[1, i] == int(after[i].argmax())
        assert res.top[0, i] == int(before[i].argmax())
    assert res.conditions == ("intact", "ovector") and res.layers == (1, 2)
    assert res.norms[1] == pytest.approx(float(o.norm()))


def test_last_position_only_leaves_the_rest(tiny):
    contexts = mp.random_word_contexts(ARGS[:2], seed=0)
    o = torch.randn(64)
    res = mp.ovector_intervention(tiny, {"o": o}, contexts, ANSWERS[:2], layers=[2], positions=-1)

    def hook(act, hook):
        act = act.clone()
        act[:, -1] = o
        return act

    for i, c in enumerate(contexts):
        with torch.no_grad():
            logits = tiny.run_with_hooks(
                tiny.to_tokens(c), fwd_hooks=[("blocks.2.hook_mlp_out", hook)]
            )
        assert res.top[1, i] == int(logits[0, -1].argmax())


def _planted() -> mp.OVectorEffect:
    rank = np.array([[3, 0, 10, 1], [0, 0, 2, 5], [1, 4, 10, 0], [3, 0, 0, 1]])
    top = np.array([[7, 1, 9, 4], [5, 1, 3, 8], [6, 9, 9, 2], [7, 1, 8, 4]])
    return mp.OVectorEffect(
        contexts=("a", "b", "c", "d"),
        targets=(" A", " B", " C", " D"),
        target_ids=np.array([5, 1, 8, 2]),
        argument_ids=np.array([7, 6, 9, 4]),
        groups=("in_domain", "in_domain", "held_out", "held_out"),
        conditions=("intact", "ovector", "random_0", "random_1"),
        rank=rank,
        argument_rank=np.zeros_like(rank),
        top=top,
        norms=(0.0, 1.0, 1.0, 1.0),
        layers=(4, 5),
        scale=1.0,
        mode="replace",
    )


def test_summary_metrics_by_hand():
    res = _planted()
    s = res.metrics("ovector")
    assert s["top1_before"] == 0.25 and s["top1_after"] == 0.5
    assert s["mean_rank_before"] == pytest.approx(3.5) and s["mean_rank_after"] == pytest.approx(
        1.75
    )
    assert s["mrr_after"] == pytest.approx(np.mean([1, 1, 1 / 3, 1 / 6]))
    assert s["no_effect_rate"] == 0.25  # only context 1 keeps its top token
    pooled = res.metrics(["random_0", "random_1"])  # seeds pooled: 8 (context, seed) pairs
    assert pooled["top1_after"] == pytest.approx(3 / 8)
    assert pooled["no_effect_rate"] == pytest.approx(4 / 8)
    held = res.metrics("ovector", group="held_out")
    assert held["n"] == 2 and held["top1_before"] == 0.0 and held["mean_rank_after"] == 3.5
    assert res.families() == {"intact": ["intact"], "ovector": ["ovector"],
                              "random": ["random_0", "random_1"]}  # fmt: skip
    with pytest.raises(ValueError, match="No context of group 'nowhere'"):  # a typo: was NaN
        res.metrics("ovector", group="nowhere")
    with pytest.raises(KeyError, match="conditions"):
        res.metrics("missing")


def test_roundtrip_frame_plot():
    res = _planted()
    back = mp.OVectorEffect.from_dict(res.to_dict())
    assert back.metrics("ovector") == res.metrics("ovector")
    frame = res.to_frame()
    assert len(frame) == 16 and frame.query("condition == 'ovector'")["correct"].sum() == 2
    assert res.plot().axes


def test_bad_input_names_the_fix(tiny):
    ctx = mp.random_word_contexts(ARGS)
    with pytest.raises(ValueError, match="width 64"):
        mp.ovector_intervention(tiny, {"o": torch.zeros(3)}, ctx, ANSWERS, layers=[1])
    with pytest.raises(ValueError, match="one target per"):
        mp.ovector_intervention(tiny, {"o": torch.zeros(64)}, ctx, ANSWERS[:1], layers=[1])
    with pytest.raises(ValueError, match="reserved"):
        mp.ovector_intervention(tiny, {"intact": torch.zeros(64)}, ctx, ANSWERS, layers=[1])
    with pytest.raises(ValueError, match="out of range"):
        mp.ovector_intervention(tiny, {"o": torch.zeros(64)}, ctx, ANSWERS, layers=[5])
    with pytest.raises(ValueError, match="mode"):
        mp.ovector_intervention(tiny, {"o": torch.zeros(64)}, ctx, ANSWERS, layers=[1], mode="x")  # type: ignore[arg-type]


def test_sweep_cells_match_single_interventions(tiny):
    ctx = mp.random_word_contexts(ARGS, seed=0)
    vecs = {"ovector": torch.randn(64), "random_0": torch.randn(64)}
    grid = mp.ovector_sweep(tiny, vecs, ctx, ANSWERS, layers=[range(1, 3), [2]], scales=[1.0, 3.0])
    assert grid.top1.shape == (2, 2, 2)
    one = mp.ovector_intervention(tiny, vecs, ctx, ANSWERS, layers=[2], scale=3.0)
    for c, name in enumerate(["ovector", "random_0"]):
        s = one.metrics(name)
        assert grid.mean_rank[c, 1, 1] == pytest.approx(s["mean_rank_after"])
        assert grid.no_effect[c, 1, 1] == pytest.approx(s["no_effect_rate"])
    assert grid.before["mean_rank"] == pytest.approx(one.metrics("ovector")["mean_rank_before"])
    cell, scale = grid.best("ovector", "mean_rank")
    r, s_ = grid.layers.index(cell), grid.scales.index(scale)
    assert grid.mean_rank[0, r, s_] == grid.mean_rank[0].min()
    # no_effect is lower-is-better too: its best cell is where the vector changed most tops.
    planted = replace(grid, no_effect=np.array([[[1.0, 0.5], [0.0, 1.0]]] * 2))
    assert planted.best("ovector", "no_effect") == (grid.layers[1], grid.scales[0])
    assert mp.OVectorSweep.from_dict(grid.to_dict()).to_frame().equals(grid.to_frame())
    assert grid.plot().axes
    # rates on 0-1 whatever the data (scaled to the data, a 0.08 rate was drawn as bright as 1)
    for metric in ("top1", "mrr", "no_effect"):
        image = grid.plot(metric=metric).axes[0].images[0]
        assert (image.norm.vmin, image.norm.vmax) == (0.0, 1.0)
    ranks = grid.plot(metric="mean_rank").axes[0].images[0].norm
    assert ranks.vmax == max(grid.mean_rank.max(), grid.before["mean_rank"], 1.0)
    with pytest.raises(ValueError, match="empty"):
        mp.ovector_sweep(tiny, vecs, ctx, ANSWERS, layers=[range(2, 2)])


@pytest.mark.integration
def test_smollm2_intervention_and_controls_share_contexts(smollm2):
    task = mp.load_task("capitals").with_shots(3).subset(12, seed=0)
    o = mp.extract_ovector(smollm2, task, layer=24, only_correct=True)
    vecs = {"ovector": o, "random_0": mp.random_ovector(o, seed=0)}
    ctx = mp.random_word_contexts(task.arguments(), seed=0)
    res = mp.ovector_intervention(smollm2, vecs, ctx, task.answers(), layers=range(24, 30),
                                  arguments=task.arguments())  # fmt: skip
    assert res.rank.shape == (3, 12) and res.conditions == ("intact", "ovector", "random_0")
    # The random-word contexts work as intended: the intact model mostly repeats the argument.
    assert res.metrics("ovector")["argument_top1_before"] >= 0.5


def test_non_finite_vectors_scales_and_logits_raise(tiny):
    # A NaN compares false with every logit: before these checks every context ranked 0 (top-1).
    ctx = mp.random_word_contexts(ARGS)
    nan = torch.zeros(64)
    nan[5] = float("nan")
    with pytest.raises(ValueError, match="'o' holds 1 NaN or infinite"):
        mp.ovector_intervention(tiny, {"o": nan}, ctx, ANSWERS, layers=[1])
    with pytest.raises(ValueError, match="'o' holds 64 NaN or infinite"):
        mp.ovector_sweep(tiny, {"o": torch.full((64,), float("inf"))}, ctx, ANSWERS, layers=[1])
    for bad in [float("nan"), float("inf")]:
        with pytest.raises(ValueError, match="scale must be a finite number"):
            mp.ovector_intervention(tiny, {"o": torch.ones(64)}, ctx, ANSWERS, layers=[1],
                                    scale=bad)  # fmt: skip
        with pytest.raises(ValueError, match="scales must be a finite number"):
            mp.ovector_sweep(tiny, {"o": torch.ones(64)}, ctx, ANSWERS, layers=[1],
                             scales=[1.0, bad])  # fmt: skip
    with pytest.raises(ValueError, match=r"OVector\.vector holds"):
        mp.OVector(nan, layer=1, source="x", n_prompts=1)
    # A finite vector so large that the stream overflows is refused when its edit is built (the
    # ranks' own check, test_nan_model_logits_raise_in_every_ranking, caught it there before).
    with pytest.raises(ValueError, match=r"Add scale \* vector reaches 3e\+38.*overflow float32"):
        mp.ovector_intervention(tiny, {"o": torch.ones(64)}, ctx, ANSWERS, layers=[1, 2],
                                scale=3e38, mode="add")  # fmt: skip


def test_nan_model_logits_raise_in_every_ranking():
    model = mp.tiny_model(seed=3)
    with torch.no_grad():
        model.W_U[:, 7] = float("nan")
    ctx = mp.random_word_contexts(ARGS)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.ovector_intervention(model, {"o": torch.ones(64)}, ctx, ANSWERS, layers=[1])
    task = mp.load_task("capitals").with_shots(1).subset(2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.ffn_ablation(model, task, parts=1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.extract_ovector(model, task, 1, only_correct=True)
