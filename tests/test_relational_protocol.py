"""Every relational result follows the result protocol: files, frames, summaries, figures, reprs.

And the analysis's steps are public functions whose results are the analysis's own.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import mechprobe as mp
from mechprobe.core import Result, load_result
from tests.conftest import hook_count
from tests.test_analogy import _planted

ARGS = [" Poland", " Chile", " Japan"]
ANSWERS = [" Warsaw", " Santiago", " Tokyo"]


@pytest.fixture(scope="module")
def results(tiny) -> dict[str, Result]:
    task = mp.load_task("capitals").with_shots(1).subset(4, seed=0)
    tp = mp.task_pass(tiny, task)
    o = mp.fit_ovector(tp, 1, only_correct=False)
    vecs = {"ovector": o, **mp.ovector_controls(tiny, o, n_random=2)}
    ctx = mp.random_word_contexts(ARGS, seed=0)
    groups = ["in_domain", "in_domain", "held_out"]
    sweep, tuned = mp.tuned_intervention(
        tiny, vecs, ctx, ANSWERS, layers=[range(1, 3), 2], scales=[1.0, 2.0], choose_on=[0, 1],
        swept=["ovector", "random_0"], arguments=ARGS, groups=groups,
    )  # fmt: skip
    relational = mp.relational_analysis(
        tiny, task, shots=1, layers=[1, 2], n_random=1, other_task=None, contrast_task=None,
        sweep_layers=[[2]], sweep_scales=[1.0], progress=False,
    )  # fmt: skip
    return {
        "TaskScore": tp.score,
        "Trajectory": tp.trajectory,
        "OVector": o,
        "OVectorEffect": tuned,
        "OVectorSweep": sweep,
        "AblationResult": mp.ffn_ablation(tiny, task, parts=2),
        "AnalogyResult": mp.offset_accuracy(*_planted()),  # the byte-level tiny model has none
        "RelationalResult": relational,
    }


NAMES = [
    "TaskScore",
    "Trajectory",
    "OVector",
    "OVectorEffect",
    "OVectorSweep",
    "AblationResult",
    "AnalogyResult",
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_load_round_trip_gives_equal_frames(results, tmp_path, name, suffix) -> None:
    result = results[name]
    path = result.save(tmp_path / f"r{suffix}")
    assert path == tmp_path / f"r{suffix}"
    back = type(result).load(path)
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())
    pd.testing.assert_frame_equal(back.summary(), result.summary())
    assert type(load_result(path)) is type(result)
    if suffix == ".json":
        data = json.loads(path.read_text())
        assert data["format"] == f"mechprobe.{name}" and isinstance(data["version"], int)


def test_ovector_files_keep_safetensors_and_read_the_old_format(results, tmp_path) -> None:
    o = results["OVector"]
    path = o.save(tmp_path / "o.safetensors")
    back = mp.OVector.load(path)
    assert torch.equal(back.vector, o.vector) and back.info == o.info
    from safetensors.torch import save_file

    # A file of the previous release (its own header tag, no version) still loads.
    old = {"format": "mechprobe.relational._ovector/1", "layer": "3", "source": "capitals",
           "n_prompts": "2", "model": "m", "info": "{}"}  # fmt: skip
    save_file({"vector": torch.ones(4)}, str(tmp_path / "old.safetensors"), metadata=old)
    assert mp.OVector.load(tmp_path / "old.safetensors").layer == 3
    newer = {**old, "format": "mechprobe.OVector", "version": "9"}
    save_file({"vector": torch.ones(4)}, str(tmp_path / "new.safetensors"), metadata=newer)
    with pytest.raises(ValueError, match="version"):
        mp.OVector.load(tmp_path / "new.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match=r"junk\.safetensors"):
        mp.OVector.load(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match=r"\.json, \.npz or \.safetensors"):
        o.save(tmp_path / "o.pt")
    with pytest.raises(FileNotFoundError, match="create it first"):
        o.save(tmp_path / "missing" / "o.safetensors")


def test_relational_files_expand_the_home(results, tmp_path, monkeypatch) -> None:
    # save("~/rel") made a literal ./~/rel/ folder, wrote result.json there, then failed writing
    # the o-vector to $HOME/rel; load did not expand ~ either.
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    result = results["RelationalResult"]
    assert result.save("~/rel", figures=False) == home / "rel"
    assert mp.RelationalResult.load("~/rel").to_dict() == result.to_dict()
    assert result.save("~/one.json") == home / "one.json"
    assert mp.RelationalResult.load("~/one.json").to_dict() == result.to_dict()
    o = results["OVector"]
    assert o.save("~/o.safetensors") == home / "o.safetensors"
    assert torch.equal(mp.OVector.load("~/o.safetensors").vector, o.vector)
    assert not list(work.iterdir())


def test_saving_into_a_used_folder_removes_the_earlier_figures(results, tmp_path) -> None:
    result = results["RelationalResult"]
    folder = result.save(tmp_path / "run")
    assert result.sweep is not None and (folder / "sweep.png").is_file()
    assert result.ablation is not None and (folder / "ablation.png").is_file()
    (folder / "notes.txt").write_text("mine")  # not a file save() writes: kept
    later = dataclasses.replace(result, sweep=None, tuned=None, ablation=None)
    later.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "intervention.png", "notes.txt", "ovector.safetensors", "report.md", "result.json",
        "x_plot.png",
    ]  # fmt: skip
    assert "sweep.png" not in (folder / "report.md").read_text()
    assert "ablation.png" not in (folder / "report.md").read_text()
    result.save(folder, figures=False)
    assert sorted(p.name for p in folder.iterdir()) == [
        "notes.txt", "ovector.safetensors", "report.md", "result.json",
    ]  # fmt: skip
    # A folder that held no result: a file of a figure's name is the user's, and stays (review 21d).
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "sweep.png").write_bytes(b"the user's own figure")
    result.save(shared, figures=False)
    assert (shared / "sweep.png").read_bytes() == b"the user's own figure"


def test_relational_result_folder_round_trip(results, tmp_path) -> None:
    result = results["RelationalResult"]
    folder = result.save(tmp_path / "run")
    data = json.loads((folder / "result.json").read_text())
    assert list(data)[:4] == ["format", "version", "task", "kind"]  # headline keys stay on top
    back = mp.RelationalResult.load(folder)
    assert back.to_dict() == result.to_dict()
    pd.testing.assert_frame_equal(back.summary(), result.summary())
    assert torch.equal(back.ovector.vector, result.ovector.vector)
    assert isinstance(load_result(folder / "result.json"), mp.RelationalResult)
    assert load_result(folder).to_dict() == result.to_dict()  # the folder save() wrote, as is
    with pytest.raises(FileExistsError, match="is a file"):
        result.save(folder / "report.md")  # a folder where a file is
    # A .json path is one file that load reads back (it used to become a folder load refused).
    single = result.save(tmp_path / "one" / "r.json")
    assert single.is_file() and mp.RelationalResult.load(single).to_dict() == result.to_dict()
    with pytest.raises(ValueError, match=r"folder .* or to one \.json file"):
        result.save(tmp_path / "r.npz")
    assert not (tmp_path / "r.npz").exists()
    assert result.save(tmp_path / "new" / "run", figures=False).joinpath("result.json").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "result.json").write_text(json.dumps({"task": "capitals"}))
    with pytest.raises(ValueError, match="not a readable RelationalResult"):
        mp.RelationalResult.load(tmp_path / "other")  # an untagged result.json of 0.1


@pytest.mark.parametrize("name", [*NAMES, "RelationalResult"])
def test_repr_summary_and_notebook_view(results, name) -> None:
    result = results[name]
    text = repr(result)
    assert text.startswith(f"{name}(") and len(text) < 150 and "array" not in text
    assert isinstance(result.summary(), pd.DataFrame) and len(result.summary()) >= 1
    page = result._repr_html_()
    assert "<table" in page
    assert ("<img" in page) == type(result)._html_figure
    # One marker for a missing value (review 26a F11: "<NA>", "None" and "—" side by side).
    assert "&lt;NA&gt;" not in page and "<td>None</td>" not in page and "<td>nan</td>" not in page


@pytest.mark.parametrize("name", [*NAMES, "RelationalResult"])
def test_plot_returns_its_figure_and_draws_into_given_axes(results, name) -> None:
    result = results[name]
    assert isinstance(result.plot(), Figure)
    fig = Figure()
    ax = fig.add_subplot()
    assert result.plot(ax=ax) is fig
    assert len(ax.get_children()) > 10  # something was drawn there
    with pytest.raises(TypeError, match="keyword-only"):
        result.plot("mrr")  # an old positional option is refused with the fix


def test_stages_reads_as_three_layers() -> None:
    assert repr(mp.Stages(15, 19, None)) == "Stages(argument 15, function 19, saturation -)"


def test_task_pass_is_the_score_and_trajectory_of_one_pass(tiny) -> None:
    task = mp.load_task("capitals").with_shots(1).subset(5, seed=1)
    calls = []
    handle = tiny.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        tp = mp.task_pass(tiny, task, batch_size=None)
        passes = len(calls)
        o = mp.fit_ovector(tp, -2, items=[0, 3], only_correct=False)
        assert len(calls) == passes  # fitting the o-vector runs the model no more
    finally:
        handle.remove()
    assert passes == len({len(ids) for ids in tp.score.answer_ids})  # one pass per answer length
    score, traj = mp.score_task(tiny, task), mp.trajectory(tiny, task)
    assert np.array_equal(tp.score.first_rank, score.first_rank)
    assert np.array_equal(tp.trajectory.answer_rank, traj.answer_rank)
    want = mp.extract_ovector(tiny, [task.prompts()[0], task.prompts()[3]], layer=1)
    assert o.layer == 1 and o.n_prompts == 2
    assert torch.allclose(o.vector, want.vector, atol=1e-5)
    with pytest.raises(ValueError, match="only_correct=False"):
        mp.fit_ovector(tp, 1)  # the random model answers nothing correctly
    with pytest.raises(ValueError, match="max_prompts"):
        mp.fit_ovector(tp, 1, only_correct=False, max_prompts=0)


def test_tuned_intervention_reruns_every_vector_at_the_chosen_cell(results, tiny) -> None:
    sweep, tuned = results["OVectorSweep"], results["OVectorEffect"]
    assert sweep.n_contexts == 2 and sweep.conditions == ("ovector", "random_0")
    cell, scale = sweep.best("ovector", "mrr")
    assert tuned.layers == cell and tuned.scale == scale
    # best() picks by MRR unless told otherwise, as the repr and tuned_intervention do (it
    # picked by top-1, and on a tiny model's 0-everywhere top-1 the first cell won by order).
    assert sweep.best() == sweep.best("ovector", "mrr")
    assert f"best MRR {sweep.mrr[0].max():.2f}" in repr(sweep)
    assert tuned.conditions == ("intact", "ovector", "random_0", "random_1")
    # The same as running the intervention there by hand.
    o = results["OVector"]
    vecs = {"ovector": o, **mp.ovector_controls(tiny, o, n_random=2)}
    ctx = mp.random_word_contexts(ARGS, seed=0)
    again = mp.ovector_intervention(tiny, vecs, ctx, ANSWERS, layers=list(cell), scale=scale)
    assert np.array_equal(again.rank, tuned.rank)


def test_ovector_controls_are_the_random_directions_and_the_other_task(tiny) -> None:
    o = mp.OVector(torch.randn(64), layer=1, source="capitals", n_prompts=3)
    other = mp.load_task("past_tense").with_shots(1).subset(3)
    controls = mp.ovector_controls(tiny, o, n_random=2, other_task=other, seed=5)
    assert list(controls) == ["random_0", "random_1", "other_task"]
    assert torch.equal(controls["random_1"].vector, mp.random_ovector(o, seed=6).vector)
    # The random model answers no past tense: the control averages all its items, and says so.
    assert controls["other_task"].info["only_correct"] is False
    want = mp.extract_ovector(tiny, other, 1)
    assert torch.allclose(controls["other_task"].vector, want.vector)


def test_old_names_and_keywords_still_work_with_a_warning(tiny) -> None:
    with pytest.warns(DeprecationWarning, match="OVectorEffect"):
        assert mp.InterventionResult is mp.OVectorEffect
    with pytest.warns(DeprecationWarning, match="OVectorSweep"):
        assert mp.SweepResult is mp.OVectorSweep
    with pytest.warns(DeprecationWarning, match="random_word_contexts"):
        assert mp.intervention_contexts is mp.random_word_contexts
    ctx = mp.random_word_contexts(ARGS[:2], seed=0)
    vecs = {"ovector": torch.randn(64, generator=torch.Generator().manual_seed(1))}
    new = mp.ovector_sweep(tiny, vecs, ctx, ANSWERS[:2], layers=[range(1, 3)], scales=[2.0])
    with pytest.warns(DeprecationWarning, match="layers="):
        old = mp.ovector_sweep(tiny, vecs, ctx, ANSWERS[:2], layer_ranges=[(1, 3)], scales=[2.0])
    assert old.layers == new.layers == ((1, 2),) and np.array_equal(old.mrr, new.mrr)
    with pytest.raises(TypeError, match="both layer_ranges= and layers="):
        mp.ovector_sweep(tiny, vecs, ctx, ANSWERS[:2], layers=[2], layer_ranges=[(1, 3)])
    with pytest.raises(TypeError, match=r"range\(1, 3\)"):
        mp.ovector_sweep(tiny, vecs, ctx, ANSWERS[:2], layers=[(1, 3)])  # ambiguous
    with pytest.warns(DeprecationWarning, match="positions='all'"):
        none = mp.ovector_intervention(tiny, vecs, ctx, ANSWERS[:2], layers=[2], positions=None)
    every = mp.ovector_intervention(tiny, vecs, ctx, ANSWERS[:2], layers=[2])
    assert none.positions == every.positions == "all" and np.array_equal(none.rank, every.rank)
    with pytest.warns(DeprecationWarning, match="metrics"):
        # assert_equal: the argument rates are NaN here (no arguments given), and NaN != NaN
        np.testing.assert_equal(every.summary("ovector"), every.metrics("ovector"))
    with pytest.raises(TypeError):
        mp.random_ovector(mp.OVector(torch.ones(4), layer=0, source="x", n_prompts=1), 3)  # type: ignore[misc]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spellings warn about nothing
        mp.random_word_contexts(ARGS)
        every.summary()


def test_relational_analysis_accepts_sweep_ranges_for_one_release(tiny) -> None:
    kwargs = dict(shots=1, n_items=4, n_random=0, other_task=None, ablation=False,
                  sweep_scales=[1.0], progress=False)  # fmt: skip
    with pytest.warns(DeprecationWarning, match="sweep_layers="):
        old = mp.relational_analysis(tiny, "capitals", sweep_ranges=[(1, 3)], **kwargs)
    assert old.sweep is not None and old.sweep.layers == ((1, 2),)
    assert old.tuned is not None and old.tuned.layers == (1, 2)


def test_the_record_says_where_the_sweep_cell_was_chosen() -> None:
    """The record said chosen_on "in_domain" where the analysis fell back to held-out ones."""
    import dataclasses

    res = mp.relational_analysis(mp.tiny_model(), "capitals", n_items=6, ablation=False,
                                 n_random=1, sweep_layers=[[1], [2]], sweep_scales=[1.0],
                                 progress=False)  # fmt: skip
    assert res.to_dict()["sweep"]["chosen_on"] == "in_domain"
    note = "No in-domain context: the sweep cell was chosen on held-out contexts."
    fell_back = dataclasses.replace(res, notes=(*res.notes, note))
    assert fell_back.to_dict()["sweep"]["chosen_on"] == "held_out"


def test_writers_name_the_mistakes_a_user_makes(tiny) -> None:
    """Review 16c: each of these ran into a raw Python error, read a string letter by letter,
    or (a pair of layers) silently edited two layers where the paper's span has six."""
    ctx = mp.random_word_contexts(ARGS[:2], seed=0)
    vecs = {"ovector": torch.randn(64, generator=torch.Generator().manual_seed(1))}
    mp.run(tiny, ["Hi"], progress=False)  # a bridge adds its own norm pre-hooks at a first pass
    before = hook_count(tiny)
    for kwargs, error, message in [
        (
            {"layers": (0, 2)},
            TypeError,
            r"ambiguous .* range\(0, 2\) for a span, or a list \[0, 2\]",
        ),
        ({"layers": [1], "scale": [1.0, 2.0]}, TypeError, r"scale is one number.*ovector_sweep"),
        ({"layers": [1], "contexts": ctx[0]}, TypeError, "contexts is one string: pass a list"),
        ({"layers": [1], "targets": [5, 6]}, TypeError, r"targets are strings .* entry 0 is int"),
    ]:
        args = {"contexts": ctx, "targets": ANSWERS[:2]} | kwargs
        with pytest.raises(error, match=message):
            mp.ovector_intervention(tiny, vecs, **args)
    # A list of the same two layers is what it says: exactly those layers.
    assert mp.ovector_intervention(tiny, vecs, ctx, ANSWERS[:2], layers=[0, 2]).layers == (0, 2)
    with pytest.raises(ValueError, match="Got 2 contexts and 1 targets"):  # was an IndexError
        mp.tuned_intervention(tiny, vecs, ctx, ANSWERS[:1], layers=[1])
    with pytest.raises(ValueError, match=r"condition 'ovector' is not swept \(swept=\['r'\]\)"):
        # Raised a KeyError after the whole sweep had run.
        mp.tuned_intervention(tiny, vecs | {"r": vecs["ovector"]}, ctx, ANSWERS[:2], layers=[1],
                              swept=["r"])  # fmt: skip
    with pytest.raises(TypeError, match=r"scale is one number.*sweep_scales"):
        mp.relational_analysis(tiny, "capitals", scale=[1.0, 2.0], progress=False)
    with pytest.raises(TypeError, match="ambiguous"):
        mp.relational_analysis(tiny, "capitals", layers=(0, 2), progress=False)
    o = mp.OVector(vecs["ovector"], layer=1, source="toy", n_prompts=1)
    with pytest.raises(TypeError, match=r"random_ovector takes an OVector"):
        mp.random_ovector(o.vector)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"fit_ovector takes mp.task_pass"):
        mp.fit_ovector(mp.load_task("capitals"), 1)  # type: ignore[arg-type]
    assert hook_count(tiny) == before


def test_trajectory_selection_and_layers_are_checked(tiny) -> None:
    traj = mp.trajectory(tiny, mp.load_task("capitals").subset(4), progress=False)
    with pytest.raises(ValueError, match=r"items must be between -4 and 3, got \[9\]"):
        traj.select([9])  # was "tuple index out of range"
    with pytest.raises(TypeError, match="layer"):
        traj.ffn_attribution(1.5)  # type: ignore[arg-type]
    assert traj.select([-1]).arguments == traj.arguments[-1:]


def test_collect_into_a_file_is_named(tiny, tmp_path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"out_dir .* is a file: pass a folder"):
        mp.collect(tiny, ["Hi"], out_dir=tmp_path / "a.txt", progress=False)
    acts = mp.collect(tiny, ["Hi there", "Ho"], labels=["a", "b"], progress=False)
    assert not any(a.flags.writeable for a in (acts.values, acts.position, acts.labels))
    # Read-only views: arrays given to the constructor stay the caller's, writable.
    mine = np.array(["x", "y"])
    again = mp.Activations(acts.values, mine, None, acts.text_index, acts.position, acts.token,
                           acts.sites)  # fmt: skip
    assert mine.flags.writeable and not again.labels.flags.writeable
    page = acts._repr_html_()
    assert page.startswith("<div><p>Activations(2 rows") and "<table" in page and ">b<" in page
