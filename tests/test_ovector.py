"""o-vector extraction against a hand-written cache; save/load; the random control."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mechprobe as mp

PROMPTS = ["Q: What is the capital of Poland?\nA:", "Hi", "The capital of Chile is"]


def test_extract_equals_mean_of_last_token_mlp_out(tiny):
    o = mp.extract_ovector(tiny, PROMPTS, layer=1, batch_size=2)
    rows = []
    for prompt in PROMPTS:
        _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        rows.append(cache["blocks.1.hook_mlp_out"][0, -1])
    assert torch.allclose(o.vector, torch.stack(rows).mean(0), atol=1e-5)
    assert o.n_prompts == 3 and o.layer == 1 and o.source == "prompts"
    one = mp.extract_ovector(tiny, PROMPTS[0], layer=-2)  # one prompt; layer counts from the end
    assert one.layer == 1 and torch.allclose(one.vector, rows[0], atol=1e-5)


def test_extract_from_task_and_only_correct(tiny):
    task = mp.load_task("capitals").with_shots(1).subset(3)
    o = mp.extract_ovector(tiny, task, layer=0)
    assert o.source == "capitals" and o.n_prompts == 3
    with pytest.raises(ValueError, match="none of the 3 items"):
        mp.extract_ovector(tiny, task, layer=0, only_correct=True)  # a random model
    with pytest.raises(ValueError, match="needs a Task"):
        mp.extract_ovector(tiny, PROMPTS, layer=0, only_correct=True)
    with pytest.raises(ValueError, match="out of range"):
        mp.extract_ovector(tiny, PROMPTS, layer=9)


def test_save_load_roundtrip_without_pickle(tmp_path):
    o = mp.OVector(torch.randn(16), layer=19, source="capitals", n_prompts=7, model="m",
                   info={"items": ["Poland"]})  # fmt: skip
    back = mp.OVector.load(o.save(tmp_path / "o.safetensors"))
    assert torch.equal(back.vector, o.vector)
    assert (back.layer, back.source, back.n_prompts, back.model, back.info) == (
        19, "capitals", 7, "m", {"items": ["Poland"]}
    )  # fmt: skip
    save_file({"vector": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a saved mechprobe OVector"):
        mp.OVector.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="1-D"):
        mp.OVector(torch.zeros(2, 3), layer=0, source="x", n_prompts=1)


def test_random_control_has_same_norm_and_is_seeded():
    o = mp.OVector(torch.randn(576) * 30, layer=5, source="capitals", n_prompts=4)
    a, b, c = (mp.random_ovector(o, seed=s) for s in (0, 0, 1))
    assert a.norm == pytest.approx(o.norm, rel=1e-5)
    assert torch.equal(a.vector, b.vector) and not torch.equal(a.vector, c.vector)
    assert a.layer == 5 and a.source == "random" and a.info["seed"] == 0
    cos = torch.nn.functional.cosine_similarity(a.vector, o.vector, dim=0)
    assert abs(float(cos)) < 0.2  # a random direction in 576 dimensions is nearly orthogonal


def test_an_ovector_from_another_model_is_refused_by_name(tiny):
    o = mp.extract_ovector(tiny, ["Q: capital of Poland?\nA:"], layer=1, progress=False)
    assert o.model == tiny.cfg.model_name
    other = dataclasses.replace(o, model="some-other-model")
    args = (["a b c"], [" d"])
    with pytest.raises(ValueError, match=r"extracted from 'some-other-model'.*pass its \.vector"):
        mp.ovector_intervention(tiny, {"o": other}, *args, layers=1, progress=False)
    with pytest.raises(ValueError, match="extracted from 'some-other-model'"):
        mp.ovector_sweep(tiny, {"o": other}, *args, layers=[1], progress=False)
    # Its plain vector is written on purpose, and gives what the model's own o-vector gives.
    plain = mp.ovector_intervention(tiny, {"o": other.vector}, *args, layers=1, progress=False)
    same = mp.ovector_intervention(tiny, {"o": o}, *args, layers=1, progress=False)
    assert plain.to_frame().equals(same.to_frame())


def test_only_random_seeds_are_pooled_into_one_family(tiny):
    """Vectors named ovector_1 and ovector_2 (say, read at two layers) were averaged into one
    "ovector" row of summary() and the repr; only random_<seed> controls are pooled."""
    contexts = mp.random_word_contexts([" Poland", " Chile", " Japan", " Peru"], seed=0)
    targets = [" Warsaw", " Santiago", " Tokyo", " Lima"]
    g = torch.Generator().manual_seed(0)
    vectors = {
        "ovector_1": torch.zeros(64),
        "ovector_2": 50 * torch.randn(64, generator=g),
        "random_0": torch.randn(64, generator=g),
        "random_1": torch.randn(64, generator=g),
    }
    eff = mp.ovector_intervention(tiny, vectors, contexts, targets, layers=[1, 2], progress=False)
    families = eff.families()
    assert families["ovector_1"] == ["ovector_1"] and families["ovector_2"] == ["ovector_2"]
    assert families["random"] == ["random_0", "random_1"]
    summary = eff.summary()
    rows = summary[summary["group"] == "all"] if "group" in summary else summary
    assert {"ovector_1", "ovector_2", "random"} <= set(rows["condition"])


def test_task_names_and_index_lists_are_read_as_meant(tiny):
    """A task name as other_task was the text of one prompt (an o-vector of the word); repeated
    indices (a 0/1 array) were merged into a set; a boolean choose_on was read as indices."""
    o = mp.extract_ovector(tiny, mp.load_task("capitals").subset(4), layer=1, progress=False)
    by_name = mp.ovector_controls(tiny, o, n_random=0, other_task="past_tense", progress=False)
    by_task = mp.ovector_controls(tiny, o, n_random=0, other_task=mp.load_task("past_tense"),
                                  progress=False)  # fmt: skip
    assert by_name["other_task"].source == "past_tense"
    torch.testing.assert_close(by_name["other_task"].vector, by_task["other_task"].vector)
    with pytest.warns(UserWarning, match="load_task"):
        mp.extract_ovector(tiny, "capitals", layer=1, progress=False)
    tp = mp.task_pass(tiny, mp.load_task("capitals").subset(6), progress=False)
    with pytest.raises(ValueError, match="repeat"):
        mp.fit_ovector(tp, 1, items=[1, 0, 1, 0, 1, 0], only_correct=False)
    ctx = mp.random_word_contexts([" Poland", " Chile", " Peru"], seed=0)
    targets = [" Warsaw", " Santiago", " Lima"]
    kw = {"layers": [range(1, 3)], "scales": [1.0], "progress": False}
    mask = mp.tuned_intervention(
        tiny, {"ovector": o}, ctx, targets, choose_on=[True, False, True], **kw
    )
    index = mp.tuned_intervention(tiny, {"ovector": o}, ctx, targets, choose_on=[0, 2], **kw)
    assert mask[0].n_contexts == index[0].n_contexts == 2
    with pytest.raises(ValueError, match="repeats"):
        mp.tuned_intervention(tiny, {"ovector": o}, ctx, targets, choose_on=[0, 0], **kw)
    with pytest.warns(UserWarning, match="no leading space"):
        mp.ovector_intervention(tiny, {"o": o}, ctx, ["Warsaw", "Santiago", "Lima"], layers=[1],
                                progress=False)  # fmt: skip
    res = mp.ovector_intervention(tiny, {"o": o}, ctx, targets, layers=[1], progress=False)
    with pytest.raises(ValueError, match="No context of group"):
        res.metrics("o", group="heldout")


def test_relational_analysis_runs_a_two_shot_task_as_the_command_does(tiny):
    task = mp.Task.from_dict({
        "name": "antonyms", "kind": "abstractive", "template": "{input} ->",
        "shots": [["hot", "cold"], ["up", "down"]],
        "items": [["big", "small"], ["fast", "slow"], ["old", "new"], ["wet", "dry"]],
    })  # fmt: skip
    res = mp.relational_analysis(tiny, task, n_random=1, ablation=False, other_task=None,
                                 contrast_task=None, progress=False)  # fmt: skip
    assert res.to_dict()["config"]["shots"] == 2  # shots=3 by default refused it
    # A name is read as the task (it raised AttributeError); the byte-level tiny tokenizer then
    # has no whole-word offsets, which is the error a name should reach.
    with pytest.raises(ValueError, match="distinct token pairs"):
        mp.offset_accuracy(tiny, "capitals")


def test_plot_decodes_the_vector_into_the_tokens_it_promotes(tiny) -> None:
    # A line of 576 values said nothing of what o means; Merullo et al. read it through the head.
    o = mp.extract_ovector(tiny, ["Hi there", "The cat"], 1)
    ax = o.plot(model=tiny, k=4).axes[0]
    with torch.no_grad():
        v = o.vector[None].to(tiny.W_U.dtype)
        logits = (tiny.ln_final(v) @ tiny.W_U + tiny.b_U)[0]  # by hand: final norm, unembedding
    top = torch.topk(logits, 4)
    widths = sorted((p.get_width() for p in ax.patches), reverse=True)
    np.testing.assert_allclose(widths, top.values.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="width"):
        mp.OVector(torch.ones(7), 1, "x", 1, "y").plot(model=tiny)


def test_an_effects_repr_counts_the_random_seeds_as_one_condition() -> None:
    # Review 26a F13: the repr said "5 conditions" (random_0 and random_1 apart) where the
    # summary and the figure show 4.
    names = ("intact", "ovector", "random_0", "random_1", "other_task")
    res = mp.OVectorEffect(
        contexts=("c",), targets=(" B",), target_ids=np.array([5]),
        argument_ids=np.array([-1]), groups=("all",), conditions=names,
        rank=np.array([[3], [0], [2], [4], [1]]), argument_rank=np.full((5, 1), -1),
        top=np.array([[7], [5], [6], [6], [8]]), norms=(0.0, 1.0, 1.0, 1.0, 1.0), layers=(1,),
        scale=1.0, mode="replace",
    )  # fmt: skip
    conditions = res.summary()["condition"].unique()
    assert len(conditions) == 4
    assert repr(res).startswith("OVectorEffect(4 conditions (random: 2 seeds) x 1 contexts,")
