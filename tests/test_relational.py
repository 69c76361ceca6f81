"""The whole relational analysis: result.json keys, consistency with its building blocks, CLI."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.cli import main as cli_main

SHAPE = {
    "layers",
    "scale",
    "top1_before",
    "top1_after",
    "mean_rank_before",
    "mean_rank_after",
    "no_effect_rate",
}


@pytest.fixture(scope="module")
def result(tiny):
    # Few items, a small other task and no contrast task keep the forward passes few.
    return mp.relational_analysis(
        tiny, "capitals", shots=1, n_items=6, layers=[1, 2], n_random=2, ablation=True,
        other_task=mp.load_task("past_tense").subset(3), contrast_task=None,
        sweep_layers=[range(1, 3), range(2, 3)], sweep_scales=[1.0, 2.0], progress=False,
    )  # fmt: skip


def test_result_json_has_the_contract_keys(result):
    data = result.to_dict()
    for key in ["task", "kind", "n_items", "accuracy", "argument_layer", "function_layer",
                "saturation_layer", "intervention", "controls"]:  # fmt: skip
        assert key in data
    assert (data["task"], data["kind"], data["n_items"]) == ("capitals", "abstractive", 6)
    assert set(data["intervention"]) >= SHAPE
    assert {"random", "other_task", "intact"} <= set(data["controls"])
    for control in data["controls"].values():
        assert set(data["intervention"]) <= set(control)  # the same shape, plus extras
        assert control["layers"] == [1, 2] and control["scale"] == 1.0
    intact = data["controls"]["intact"]
    assert intact["top1_after"] == intact["top1_before"] and intact["no_effect_rate"] == 1.0
    json.dumps(data, allow_nan=False)  # strict JSON


def test_controls_run_on_the_same_contexts_as_the_ovector(result):
    inter = result.intervention
    assert inter.conditions == ("intact", "ovector", "random_0", "random_1", "other_task")
    assert inter.rank.shape[0] == 5  # one row per condition, the same contexts in each column
    n = result.vectors_norms
    assert n["random_0"] == pytest.approx(n["ovector"], rel=1e-5)
    random = result.to_dict()["controls"]["random"]
    assert len(random["per_seed_top1_after"]) == 2
    assert random["top1_after"] == pytest.approx(np.mean(random["per_seed_top1_after"]))
    assert set(inter.groups) <= {"in_domain", "held_out"}


def test_ovector_is_the_mean_mlp_out_of_its_prompts(tiny, result):
    # The random model answers nothing, so the o-vector averages every fit item (and says so).
    assert any("averages all fit items" in n for n in result.notes)
    task = mp.load_task("capitals").with_shots(1).subset(6, seed=0)
    fit = [task.prompt(item) for item in result.ovector.info["items"]]
    manual = mp.extract_ovector(tiny, fit, layer=result.ovector.layer)
    assert torch.allclose(result.ovector.vector, manual.vector, atol=1e-5)
    # No function layer on a random model: o is read at the first edited layer.
    assert result.stages.function_layer is None and result.ovector.layer == 1


def test_ablation_and_sweep_are_included(result):
    assert result.ablation is not None and result.ablation.tasks == ("capitals",)
    assert [len(r) for r in result.ablation.removed] == [0, 1, 1, 2, 2, 3, 3]
    assert result.sweep is not None and result.sweep.conditions == ("ovector", "random_0")
    # The cell is chosen on the in-domain contexts, then every condition reruns there on all.
    n_in = sum(g == "in_domain" for g in result.intervention.groups)
    assert result.sweep.n_contexts == n_in > 0
    cell, scale = result.sweep.best("ovector", "mrr")
    assert result.tuned is not None and result.tuned.layers == cell
    assert result.tuned.scale == scale and result.tuned.contexts == result.intervention.contexts
    assert result.tuned.conditions == result.intervention.conditions
    sweep = result.to_dict()["sweep"]
    assert sweep["chosen_on"] == "in_domain" and sweep["best_scale"] == scale
    assert set(sweep["controls"]) == {"random", "other_task", "intact"}
    assert set(result.to_frame()["setting"]) == {"default", "tuned"}


def test_save_load_roundtrip(result, tmp_path):
    folder = result.save(tmp_path / "run")
    for name in ["result.json", "ovector.safetensors", "report.md", "x_plot.png",
                 "intervention.png", "ablation.png", "sweep.png"]:  # fmt: skip
        assert (folder / name).is_file(), name
    back = mp.RelationalResult.load(folder)
    assert back.to_json() == result.to_dict()
    assert torch.equal(back.ovector.vector, result.ovector.vector)
    report = (folder / "report.md").read_text()
    assert "random, same norm (2 seeds)" in report and "intact model" in report
    assert f"mechprobe {mp.__version__}, settings:" in report and "seed: 0" in report
    # One column per number of layers removed, as AblationResult.summary() (review 31a: the
    # tiny model's steps round to the same layers and the header repeated them).
    header = next(line for line in report.splitlines() if line.startswith("| task | kind |"))
    counts = header.strip("| ").split(" | ")[2:]
    assert counts == sorted(set(counts), key=int)
    removed = [c for c in result.ablation.summary().columns if c.startswith("removed ")]
    assert counts == [c.removeprefix("removed ") for c in removed]
    # The random model answers nothing: the report must not claim correct items or prompts.
    assert not result.trajectory.correct.any()
    assert "No item of the fitting split was answered correctly" in report
    assert "correctly answered items with distinct" not in report
    assert "prompts (none was answered correctly: all of them)" in report
    frame = result.to_frame()
    assert set(frame["condition"]) == {"ovector", "random", "other_task", "intact"}
    with pytest.raises(FileNotFoundError, match=r"no result\.json"):
        mp.RelationalResult.load(tmp_path)


def test_more_items_than_the_task_has_records_the_count_used(tiny):
    task = mp.load_task("capitals").subset(4, seed=0)
    res = mp.relational_analysis(
        tiny, task, shots=1, n_items=500, layers=[2], n_random=0, ablation=False,
        other_task=None, contrast_task=None, progress=False,
    )  # fmt: skip
    assert res.config["n_items"] == 4 == res.n_items
    assert any("n_items=500" in note for note in res.notes)


def test_bad_arguments_name_the_fix(tiny):
    with pytest.raises(ValueError, match="at most that many"):
        mp.relational_analysis(tiny, "capitals", shots=9, progress=False)
    with pytest.raises(ValueError, match="test_size"):
        mp.relational_analysis(
            tiny, "capitals", n_items=3, test_size=1.0, ablation=False, progress=False
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"other_task": "capitals"}, "other_task is 'capitals', the task analysed"),
        ({"contrast_task": "capitals"}, "contrast_task is 'capitals', the task analysed"),
        ({"contrast_task": "past_tense", "ablation": False}, "ablation=False runs no ablation"),
    ],
)
def test_controls_that_control_nothing_are_refused(tiny, kwargs, message):
    # The other-task control used to be the task's own o-vector, without a note.
    with pytest.raises(ValueError, match=message):
        mp.relational_analysis(tiny, "capitals", n_items=6, n_random=0, progress=False, **kwargs)


def test_holdout_is_the_old_name_of_test_size(tiny):
    # Every other split of the API says test_size; holdout= is accepted for one release.
    common = {"n_items": 6, "ablation": False, "n_random": 0, "other_task": None,
              "progress": False}  # fmt: skip
    new = mp.relational_analysis(tiny, "capitals", test_size=0.34, **common)
    with pytest.warns(DeprecationWarning, match=r"holdout=.*test_size="):
        old = mp.relational_analysis(tiny, "capitals", holdout=0.34, **common)
    assert old.config["test_size"] == new.config["test_size"] == 0.34
    assert old.to_frame().equals(new.to_frame())
    with pytest.raises(TypeError, match="both holdout= and test_size="):
        mp.relational_analysis(tiny, "capitals", holdout=0.5, test_size=0.5, **common)


def test_cli_relation_on_the_tiny_model(tmp_path, capsys):
    code = cli_main(["relation", "--task", "capitals", "--model", "tiny", "--out",
                     str(tmp_path / "cli"), "--n-items", "4", "--shots", "1", "--layers", "1-2",
                     "--n-random", "1", "--no-ablation", "--other-task", "none", "--quiet"])  # fmt: skip
    assert code == 0
    data = json.loads((tmp_path / "cli" / "result.json").read_text())
    assert data["n_items"] == 4 and data["intervention"]["layers"] == [1, 2]
    assert set(data["controls"]) == {"random", "intact"}
    assert "o-vector (capitals" in capsys.readouterr().out
    assert cli_main(["relation", "--task", "nope", "--model", "tiny", "--out", str(tmp_path)]) == 2


@pytest.mark.integration
def test_smollm2_capitals_analysis(smollm2, tmp_path):
    from tests.test_scoring import WELL_KNOWN

    task = mp.load_task("capitals")
    task = task.subset([task.inputs().index(c) for c in WELL_KNOWN[:16]])
    res = mp.relational_analysis(smollm2, task, ablation=False, n_random=2, progress=False,
                                 other_task=mp.load_task("past_tense").subset(8))  # fmt: skip
    data = res.to_dict()
    assert data["accuracy"] >= 0.9 and data["function_layer"] is not None
    assert data["intervention"]["layers"][0] == data["function_layer"]
    assert data["intervention"]["n"] == data["controls"]["random"]["n"] > 0
    assert data["controls"]["other_task"]["n"] == data["intervention"]["n"]
    assert res.save(tmp_path / "smol").joinpath("result.json").is_file()


# --- bad input: non-finite numbers, output folders (issue 12, section 3, items 1 and 9) ----------


def test_non_finite_scales_raise_before_any_forward_pass(tiny):
    calls = []
    handle = tiny.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        for bad in [float("nan"), float("inf")]:
            with pytest.raises(ValueError, match="scale must be a finite number"):
                mp.relational_analysis(tiny, "capitals", n_items=4, scale=bad, progress=False)
        with pytest.raises(ValueError, match="sweep_scales must be a finite number"):
            mp.relational_analysis(
                tiny, "capitals", n_items=4, sweep_layers="auto", sweep_scales=[1.0, float("nan")]
            )
    finally:
        handle.remove()
    assert not calls


def test_nan_logits_from_a_model_raise_instead_of_ranking_first():
    model = mp.tiny_model(seed=3)
    with torch.no_grad():
        model.W_U[:, 7] = float("nan")  # one token's logit is NaN for every input
    task = mp.load_task("capitals").with_shots(1).subset(3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.score_task(model, task)
    with pytest.raises(ValueError, match="NaN or infinite"):
        mp.relational_analysis(model, task, shots=1, progress=False)


def _no_model(name):
    raise AssertionError("the model was loaded before --out was checked")


@pytest.mark.parametrize("case", ["file", "file_above", "unwritable"])
def test_cli_relation_checks_out_before_any_work(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("mechprobe.cli.relation.load", _no_model)
    (tmp_path / "taken").write_text("x")
    if case == "file":
        out, want = tmp_path / "taken", "is a file, not a folder"
    elif case == "file_above":
        out, want = tmp_path / "taken" / "run", "is a file, not a folder"
    else:
        out, want = tmp_path / "locked" / "run", "is not writable"
        (tmp_path / "locked").mkdir()
        real = os.access
        # Root may write into any folder whatever its mode bits, so the refusal is simulated.
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if p == tmp_path / "locked" else real(p, mode)
        )
    code = cli_main(["relation", "--task", "capitals", "--model", "tiny", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and want in err and "--out" in err and err.count("\n") == 1


def test_cli_relation_refuses_a_nan_scale(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["relation", "--task", "capitals", "--model", "tiny", "--out", "x",
                  "--scale", "nan"])  # fmt: skip
    assert stop.value.code == 2 and "finite number" in capsys.readouterr().err


def test_held_out_items_share_no_argument_with_the_fitted_ones():
    from mechprobe.relational._split import held_out_items as _split

    task = mp.load_task("uppercase").with_shots(3).subset(100, seed=0)
    args = np.asarray(task.arguments())
    held = _split(list(args), 0.5, 0)
    assert not set(args[held]) & set(args[~held])  # 13 of 14 overlapped before
    assert 40 <= held.sum() <= 60
    capitals = mp.load_task("capitals").with_shots(3).subset(100, seed=0).arguments()
    old = np.zeros(100, dtype=bool)
    old[np.random.default_rng(0).permutation(100)[:50]] = True
    np.testing.assert_array_equal(_split(capitals, 0.5, 0), old)  # distinct arguments: as before


def test_split_by_argument_stays_near_the_fraction():
    from mechprobe.relational._split import held_out_items as _split

    uneven = ["x"] * 15 + list("abcde")  # one argument of 15 items, five of one
    for seed in range(5):
        assert _split(uneven, 0.25, seed).sum() == 5  # not the 15 of "x" (19 of 20 before)
    assert _split(["x"] * 20, 0.5, 0).sum() == 0  # one argument: nothing can be held out


def test_stages_are_read_off_the_fitting_items_only(tiny, monkeypatch):
    # The held-out items judge the o-vector, but the stages (whose function layer sets where o is
    # read and written) were read off every item: on SmolLM2 capitals, layer 24 from all items
    # and 26 from the fitting ones (held-out top-1 0.20 at 24, 0.00 at 26).
    from mechprobe.relational._split import held_out_items as _split
    from mechprobe.relational._trajectory import Trajectory

    seen: list[tuple[str, ...]] = []
    real = Trajectory.stages

    def recording(self, *args, **kwargs):
        seen.append(self.arguments)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trajectory, "stages", recording)
    res = mp.relational_analysis(
        tiny, "capitals", n_items=12, ablation=False, other_task=None, contrast_task=None,
        n_random=1, seed=3, progress=False,
    )  # fmt: skip
    task = mp.load_task("capitals").with_shots(3).subset(12, seed=3)
    held = _split(task.arguments(), 0.5, 3)
    fitted = tuple(a for a, h in zip(task.arguments(), held, strict=True) if not h)
    assert 0 < len(fitted) < 12 and res.trajectory.arguments == tuple(task.arguments())
    assert seen[0] == fitted


def test_the_intervention_figure_says_which_row_is_which(result):
    # Two rows of panels, the pre-set setting and the sweep's best cell, said neither; groups
    # gave no n, so "held-out top-1 0.08" could not be read as k of n.
    fig = result.plot_intervention()
    titles = [axis.get_title(loc="left") for axis in fig.axes if axis.get_title(loc="left")]
    assert titles[0].startswith("default: ") and titles[1].startswith("tuned on the sweep: ")
    assert fig.get_suptitle().startswith("capitals")
    groups = result.intervention.groups
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [
        f"{g.replace('_', '-')} (n={groups.count(g)})" for g in ("in_domain", "held_out")
    ]


def test_the_x_plot_and_report_are_of_the_items_that_gave_the_stages(result, tmp_path):
    # Review 26a F1: the stages come from the fitting split, but the X plot drew every correct
    # item's curves under them and report.md said they came from all of those items.
    from mechprobe.relational._split import held_out_items

    held = held_out_items(result.trajectory.arguments, 0.5, 0)
    assert 0 < held.sum() < len(held)
    np.testing.assert_array_equal(result.fitted, ~held)
    fitted = result.fitted_trajectory()
    assert len(fitted.arguments) == int((~held).sum()) and fitted.stages() == result.stages
    fig = result.plot()
    assert fig.axes[0].get_title().endswith("correct items of the fitting split (the stages')")
    report = result.save(tmp_path / "run").joinpath("report.md").read_text()
    assert "No item of the fitting split was answered correctly" in report  # a random model
    old = dataclasses.replace(result, config={})  # a file without the split's settings
    assert old.fitted is None and old.fitted_trajectory() is old.trajectory
