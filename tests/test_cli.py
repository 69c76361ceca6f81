"""The command line's shared vocabulary (--layers, --shots, answers per pair) and its checks made
before any model loads."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.cli import main as cli_main
from mechprobe.cli._arguments import layers_type

_ERASE = ["erase", "--site", "resid_post", "--layers", "1"]
_TRACE = ["trace", "--prompt", "a b", "--subject", "a"]
_RELATION = ["relation", "--task", "capitals"]
_PATCH = ["patch", "--clean", "a", "--corrupt", "b", "--answer", "1"]  # one prompt pair


def _no_model(*_):
    raise AssertionError("the model must not load when the arguments are bad")


def test_layers_read_the_same_everywhere():
    assert layers_type("0-2,5") == [0, 1, 2, 5]
    assert layers_type("all") == "all"
    assert layers_type("-2--1") == [-2, -1]
    # -1-2 ran the last layer then 0..2, and 0--1 advised "write -1-0", which parses to [-1, 0]:
    # a range's ends are counted one way.
    for mixed in ("-1-2", "0--1"):
        with pytest.raises(argparse.ArgumentTypeError, match="both ends from the start"):
            layers_type(mixed)


def test_dla_positions_take_last_and_say_why_one(capsys):
    from mechprobe.cli._arguments import single_position

    assert single_position("last") == -1 and single_position("-2") == -2
    with pytest.raises(argparse.ArgumentTypeError, match="run once per position"):
        single_position("all")


def test_patch_takes_one_answer_per_pair(tmp_path):
    pairs = ["--clean", "A cat sat", "--corrupt", "A bat sat"]
    pairs += ["--clean", "The dog ran", "--corrupt", "The fox ran"]
    answers = ["--answer", "1", "--wrong", "2", "--answer", "3", "--wrong", "4"]
    args = ["patch", *pairs, *answers, "--sites", "mlp_out", "--layers", "0-1", "--model", "tiny"]
    # --positions whole: each site one cell over every position (the API's positions=None)
    for flag, positions in ((None, -1), ("whole", None)):  # None: the default, the last token
        out = tmp_path / str(flag)
        chosen = [] if flag is None else ["--positions", flag]
        assert cli_main([*args, *chosen, "--quiet", "--out", str(out)]) == 0
        saved = mp.load_result(out / "result.json")
        direct = mp.patch(
            mp.tiny_model(),
            ["A cat sat", "The dog ran"],
            ["A bat sat", "The fox ran"],
            "mlp_out",
            positions,
            mp.logit_diff(["1", "3"], ["2", "4"]),
            layers=[0, 1],
            progress=False,
        )
        np.testing.assert_allclose(saved.values, direct.values, atol=1e-6)
        assert saved.values.shape[0] == 2  # layers 0 and 1
        assert saved.positions == (positions,)
        if flag:  # the report echoes what was typed (it said "positions: None")
            assert "positions: 'whole'" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    ("command", "module", "message"),
    [
        (
            [
                "patch",
                "--clean",
                "a",
                "--corrupt",
                "b",
                "--clean",
                "c",
                "--corrupt",
                "d",
                "--answer",
                "1",
                "--answer",
                "2",
                "--answer",
                "3",
            ],
            "patch",
            "3 --answer for 2 prompt pairs",
        ),
        ([*_PATCH, "--wrong", "2", "--wrong", "3"], "patch", "2 --wrong for 1 prompt pairs"),
        # said "Positions must be an int, ... or 'all', got None" after loading the model
        (
            [*_PATCH, "--receivers", "q", "--positions", "whole"],
            "patch",
            "which path patching (--receivers) does not do",
        ),
        (["trace", "--task", "capitals", "--subject", "x"], "trace", "drop --subject"),
        # kinds the analysis refuses were told only after the model had loaded (review 30a F2);
        # tests/test_cli_causal.py checks that the API refuses each of them too
        ([*_TRACE, "--sites", "head"], "trace", "(heads: mechprobe patch), not 'head'"),
        ([*_TRACE, "--sites", "q@1"], "trace", "not 'q@1'"),
        # review 32a F4: trace takes kinds only; a head label is cut at its comma
        ([*_TRACE, "--sites", "mlp_out@1"], "trace", "pick the layers with --layers"),
        ([*_TRACE, "--sites", "blocks.1.hook_mlp_out"], "trace", "takes site kinds"),
        ([*_PATCH, "--sites", "head_out@1, head 2"], "patch", "cannot be given in it"),
        ([*_PATCH, "--receivers", "final", "--sites", "resid_pre"], "patch", "as senders, not"),
        (
            [*_PATCH, "--receivers", "resid_pre"],
            "patch",
            "--receivers takes q, k, v, mlp_in, final",
        ),
        ([*_PATCH, "--receivers", "mlp_out@1"], "patch", "not 'mlp_out@1'"),
        ([*_PATCH, "--receivers", "blocks.1.hook_resid_mid"], "patch", "not 'blocks.1.hook_resid"),
        ([*_PATCH, "--receivers", "final", "--receiver-layers", "1"], "patch", "final only"),
        (["lens", "Hi", "--sites", "head"], "lens", "with --lens logit, not 'head'"),
        # review 31a F5, F7, F11: refused after the load (--folds after every activation)
        (["probe", "--dataset", "number", "--site", "pattern"], "probe", "not 'pattern'"),
        (["probe", "--dataset", "number", "--site", "resid_psot@1"], "probe", "not a site label"),
        (["probe", "--dataset", "number", "--site", "head_out@1"], "probe", "name the head"),
        (
            ["probe", "--dataset", "number", "--site", "blocks.1.hook_resid_post", "--layers", "0"],
            "probe",
            "names one site: drop --layers",
        ),
        (["probe", "--dataset", "number", "--folds", "401"], "probe", "than the 400 examples"),
        (["erase", "--site", "resid_psot@1"], "erase", "not a site label"),
        ([*_RELATION, "--other-task", "capitals"], "relation", "is the task analysed"),
        ([*_RELATION, "--contrast-task", "capitals"], "relation", "is the task analysed"),
        ([*_ERASE, "--dataset", "number", "--shots", "2"], "erase", "scores none"),
        (["erase", "--site", "head_out", "--layers", "1"], "erase", "'head_out@20, head 3'"),
        (["lens", "Hi", "--sites", "mlp_out", "--lens", "patchscope"], "lens", "not 'mlp_out'"),
        ([*_TRACE, "--n-items", "3"], "trace", "--n-items"),
        (["relation", "--task", "capitals", "--shots", "9"], "relation", "--shots 9"),
        (
            ["erase", "--site", "blocks.1.hook_resid_post", "--layers", "0,2"],
            "erase",
            "--layers applies to a site kind",
        ),
        (["erase", "--site", "resid_post"], "erase", "pass the layers with --layers"),
        (["erase", "--site", "head", "--layers", "1"], "erase", "heads one at a time"),
        (["erase", "--site", "resid_post", "--layers", "1", "--shots", "9"], "erase", "--shots 9"),
        (["lens", "Hi", "--plot", "{tmp}/heatmap.xyz"], "lens", "use .png, .pdf or .svg"),
        (["probe", "--dataset", "pos", "--positions", "all"], "probe", "labels words"),
        # collect's "sites: unknown site 'resid_post,mlp_out'" named no flag of the shell
        (["probe", "--dataset", "pos", "--site", "resid_post,mlp_out"], "probe", "one site kind"),
        # options that did nothing were accepted without a word
        ([*_ERASE, "--method", "leace", "--iterations", "3"], "erase", "with --method leace"),
        ([*_ERASE, "--dataset", "number", "--n-countries", "5"], "erase", "with --dataset number"),
        # named by the library's arguments, n_countries and seed
        ([*_ERASE, "--n-countries", "1000"], "erase", "--n-countries must be between 2 and 165"),
        (
            ["relation", "--task", "capitals", "--no-ablation", "--ablation-method", "mean"],
            "relation",
            "--ablation-method with --no-ablation",
        ),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(
    tmp_path, capsys, monkeypatch, command, module, message
):
    monkeypatch.setattr(f"mechprobe.cli.{module}.load", _no_model)
    command = [part.format(tmp=tmp_path) for part in command]
    out = [] if module == "lens" else ["--out", str(tmp_path / "out")]
    assert cli_main([*command, "--model", "tiny", *out]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no empty output folder left behind


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--n-texts", "-3", "must be 0 or a positive integer"),  # ran as 0 before
        ("--iterations", "0", "must be a positive integer"),  # named n_iterations
        ("--n-countries", "0", "must be a positive integer"),
    ],
)
def test_erase_counts_are_checked_by_the_parser(tmp_path, capsys, flag, value, message):
    args = [*_ERASE, flag, value]
    with pytest.raises(SystemExit):
        cli_main([*args, "--model", "tiny", "--out", str(tmp_path / "out")])
    assert f"{flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "module", ["lens", "patch", "trace", "relation", "probe", "erase", "train_lens", "predict"]
)
def test_every_command_loads_the_model_on_device_in_dtype(tmp_path, capsys, monkeypatch, module):
    seen = []

    def record(name, device=None, dtype="float32", kind=None):
        seen.append((name, device, dtype, kind))
        raise mp.ModelLoadError("stop here")

    monkeypatch.setattr(f"mechprobe.cli.{module}.load", record)
    args = {
        "lens": ["lens", "Hi"],
        "patch": ["patch", "--clean", "Hi cat", "--corrupt", "Hi bat", "--answer", "a",
                  "--wrong", "b", "--site", "mlp_out"],
        "trace": ["trace", "--prompt", "The cat sat", "--subject", "cat"],
        "relation": ["relation", "--task", "capitals"],
        "probe": ["probe", "--dataset", "pos"],
        "erase": ["erase", "--site", "resid_post", "--layers", "1"],
        "train_lens": ["train-lens", "--save", str(tmp_path / "lens.safetensors")],
        "predict": ["predict", "--prompt", "Hi"],
    }[module]  # fmt: skip
    out = [] if module in ("lens", "train_lens") else ["--out", str(tmp_path / "out")]
    code = cli_main([*args, "--model", "tiny", "--device", "cuda:1", "--dtype", "bfloat16",
                     "--kind", "hooked", *out])  # fmt: skip
    assert seen == [("tiny", "cuda:1", "bfloat16", "hooked")], capsys.readouterr().err
    assert code != 0 and "stop here" in capsys.readouterr().err


def test_settings_a_parser_can_check_are_checked_before_the_model_loads(tmp_path, capsys):
    # Review 25b: probe --l2 -1 / --max-iter 0 were refused after every activation was collected
    # (46 s on SmolLM2); erase --site resid_psot blamed --layers; dla without --wrong said "got 0
    # --wrong ...: pass one for every prompt, or one per prompt".
    out = ["--model", "tiny", "--out", str(tmp_path / "out")]
    for flag, value, message in (("--l2", "-1", "must be a finite number above 0"),
                                 ("--l2", "nan", "must be a finite number above 0"),
                                 ("--max-iter", "0", "must be a positive integer")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli_main(["probe", "--dataset", "pos", flag, value, *out])
        assert f"{flag}: {message}" in capsys.readouterr().err
    assert cli_main(["erase", "--site", "resid_psot", "--layers", "1", *out]) == 2
    assert "'resid_psot' is no site kind, label or hook name. Did you mean 'resid_post'" in (
        capsys.readouterr().err
    )
    assert cli_main(["dla", "--prompt", "Hi", "--answer", "a", *out]) == 2
    assert "--wrong is required with --prompt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # --layers 5-3 said "layers is empty" after the model loaded; --color rank without a
    # heatmap to colour was ignored without a word.
    with pytest.raises(SystemExit):
        cli_main(["lens", "Hi", "--model", "tiny", "--layers", "5-3"])
    assert "the range 5-3 runs backwards: write 3-5" in capsys.readouterr().err
    assert cli_main(["lens", "Hi", "--model", "tiny", "--color", "rank"]) == 2
    assert "--color colours the heatmap of --plot or --out" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["lens", "patch", "trace", "probe"])
def test_a_misspelt_site_kind_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                                module):  # fmt: skip
    # Review 25b: "--sites resid_psot" was told after the model had loaded (~9 s on SmolLM2).
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(f"mechprobe.cli.{module}.load", never)
    out = ["--out", str(tmp_path / "out")]
    argv = {
        "lens": ["lens", "Hi", "--sites", "resid_post,resid_psot"],
        "patch": ["patch", "--clean", "a", "--corrupt", "b", "--answer", "x", "--receivers",
                  "final,finl", *out],
        "trace": [*_TRACE, "--sites", "mlp_ot", *out],
        "probe": ["probe", "--dataset", "pos", "--site", "mlp_otu", *out],
    }[module]  # fmt: skip
    assert cli_main([*argv, "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "Unknown site kind" in err and "did you mean" in err
    assert ("--receivers also takes 'final'" in err) == (module == "patch")
    assert not (tmp_path / "out").exists()


def test_every_choice_option_says_its_default_in_help(capsys):
    # patch --method/--direction, erase --method and relation --mode had no help line at all.
    for command in ("patch", "erase", "relation"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in {"patch": ("--method", "--direction"), "erase": ("--method",),
                       "relation": ("--mode",)}[command]:  # fmt: skip
            said = text.rsplit(option + " {", 1)[1].split(" --", 1)[0]  # the options list
            assert "(default" in said, f"{command} {option}: {said!r}"


def test_dtype_reaches_the_model(capsys, monkeypatch):
    # A GPU user's bfloat16 had no flag: every command loaded float32.
    loaded = []

    def spy(name, **kwargs):
        loaded.append(kwargs["dtype"])
        raise mp.ModelLoadError("stop here")

    monkeypatch.setattr(mp, "load_model", spy)
    assert cli_main(["lens", "Hi", "--dtype", "float16"]) != 0
    assert loaded == [torch.float16]
    capsys.readouterr()
    assert cli_main(["lens", "Hi", "--model", "tiny", "--dtype", "bfloat16"]) == 0
    assert "Changing model dtype" not in capsys.readouterr().out  # TransformerLens's own print
    with pytest.raises(SystemExit):
        cli_main(["lens", "Hi", "--model", "tiny", "--dtype", "half"])
    assert "invalid choice: 'half'" in capsys.readouterr().err


def test_device_reaches_the_tiny_model(capsys):
    assert cli_main(["lens", "Hi", "--model", "tiny", "--device", "cpu"]) == 0
    assert cli_main(["lens", "Hi", "--model", "tiny", "--device", "gpu9"]) != 0
    assert "not a device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra", [["--layers", "7"], ["--layers", "1", "--positions", "99"]], ids=["layer", "position"]
)
def test_erase_refused_after_the_model_loads_leaves_no_folder(tmp_path, capsys, extra):
    out = tmp_path / "out"
    args = ["erase", "--site", "resid_post", *extra, "--n-texts", "2", "--model", "tiny"]
    assert cli_main([*args, "--out", str(out)]) == 2
    assert not out.exists(), capsys.readouterr().err


def test_a_task_with_fewer_shots_runs_with_all_of_them(tmp_path):
    task = {
        "name": "antonyms",
        "kind": "abstractive",
        "template": "The opposite of {input} is",
        "shots": [["hot", "cold"], ["up", "down"]],
        "items": [["big", "small"], ["fast", "slow"], ["old", "new"], ["tall", "short"]],
    }
    path = tmp_path / "antonyms.json"
    path.write_text(json.dumps(task))
    from mechprobe.cli._arguments import task_shots

    assert task_shots(mp.load_task(path), None) == 2
    assert task_shots(mp.load_task("capitals"), None) == 3
    with pytest.raises(ValueError, match="--shots 3"):
        task_shots(mp.load_task(path), 3)


def test_load_result_is_public(tmp_path):
    lens = mp.logit_lens(mp.tiny_model(), "Hi", progress=False)
    assert type(mp.load_result(lens.save(tmp_path / "lens.json"))) is mp.LensResult


def test_probe_prints_the_scalar_mix_it_fitted(tmp_path, capsys):
    args = ["probe", "--dataset", "templated_pos", "--model", "tiny", "--scalar-mix"]
    assert cli_main([*args, "--max-examples", "200", "--quiet", "--out", str(tmp_path)]) == 0
    saved = mp.load_result(tmp_path / "result.json")
    assert f"scalar mix: accuracy {saved.mix_accuracy:.3f}" in capsys.readouterr().out


def test_probe_splits_by_text_when_asked(tmp_path):
    args = ["probe", "--dataset", "pos", "--model", "tiny", "--max-examples", "60", "--quiet"]
    assert cli_main([*args, "--split-by-text", "--out", str(tmp_path / "t")]) == 0
    saved = mp.load_result(tmp_path / "t" / "result.json")
    assert saved.split == "holdout(test_size=0.2, by text)"
    acts = mp.collect(mp.tiny_model(), mp.pos_dataset().sample(60, seed=0), "resid_post",
                      progress=False)  # fmt: skip
    direct = mp.probe_layers(acts, split_groups="text", progress=False)
    np.testing.assert_allclose(saved.accuracy, direct.accuracy)


def test_probe_numbers_the_layers_it_probed(tmp_path, capsys):
    args = ["probe", "--dataset", "templated_pos", "--model", "tiny", "--layers", "1-2"]
    assert cli_main([*args, "--max-examples", "200", "--quiet", "--out", str(tmp_path)]) == 0
    saved = mp.load_result(tmp_path / "result.json")
    assert saved.layers.tolist() == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["layers"] == [1, 2]
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == ["1", "2"]
    # The scalar mix's weights are named by the layers probed (it said "layer 0" for layer 1).
    out = tmp_path / "mix"
    assert (
        cli_main([*args, "--scalar-mix", "--max-examples", "200", "--quiet", "--out", str(out)])
        == 0
    )
    saved = mp.load_result(out / "result.json")
    best = int(saved.layers[int(np.argmax(saved.mix_weights))])
    assert f"largest weights layer {best}:" in capsys.readouterr().out
    heads = tmp_path / "heads"
    args = ["probe", "--dataset", "templated_pos", "--model", "tiny", "--site", "head_out"]
    assert (
        cli_main([*args, "--layers", "2", "--max-examples", "200", "--quiet", "--out", str(heads)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "head_out@2, head 3" in printed and printed.splitlines()[1].split()[0] == "site"
    assert json.loads((heads / "summary.json").read_text())["sites"][0] == "head_out@2, head 0"


def test_relation_takes_a_lens(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["relation", "--task", "capitals", "--model", "tiny", "--n-items", "8", "--quiet"]
    args += ["--no-ablation", "--other-task", "none", "--contrast-task", "none", "--n-random", "1"]
    scope = ["--lens", "patchscope", "--patchscope-layer", "1"]
    assert cli_main([*args, *scope, "--out", str(out)]) == 0
    config = json.loads((out / "result.json").read_text())["config"]
    assert config["lens"].startswith("patchscope") and config["lens"].endswith("layer 1)")
    monkeypatch.setattr("mechprobe.cli.relation.load", _no_model)  # a bad lens: before loading
    assert cli_main([*args, "--lens", str(tmp_path / "nope.safetensors"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mechprobe relation: error" in err and "LENS is 'logit', 'patchscope'" in err


def test_probe_folds_of_one_is_refused_by_its_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mechprobe.cli.probe.load", _no_model)
    with pytest.raises(SystemExit):
        cli_main(["probe", "--dataset", "pos", "--folds", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "--folds" in err and "at least 2" in err and "n_folds" not in err


def test_lens_writes_a_run_folder_like_the_other_subcommands(tmp_path, capsys):
    out = tmp_path / "new" / "lens"  # created with its parents, as --out is everywhere
    args = ["lens", "A cat sat", "--target", " on", "--positions", "last", "--model", "tiny"]
    assert cli_main([*args, "--quiet", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "lens.png", "report.md"}
    saved = mp.load_result(out / "result.json")
    direct = mp.logit_lens(mp.tiny_model(), ["A cat sat"], targets=[[" on"]], progress=False)
    np.testing.assert_allclose(saved.target_prob, direct.target_prob, atol=1e-6)
    np.testing.assert_allclose(saved.kl_to_final, direct.kl_to_final, atol=1e-6)
    (tmp_path / "file").write_text("x")
    assert cli_main(["lens", "Hi", "--model", "tiny", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["lens", "Hi"],
        ["probe", "--dataset", "pos"],
        ["relation", "--task", "capitals"],
        [*_ERASE],
        ["heads"],
        ["dla", "--prompt", "Hi", "--answer", "a"],
        ["predict", "--prompt", "Hi"],
    ],
)
def test_every_batch_size_flag_is_checked_by_the_parser(tmp_path, capsys, command):
    # erase, lens, probe and relation took --batch-size 0 and failed later naming batch_size.
    with pytest.raises(SystemExit):
        cli_main([*command, "--batch-size", "0", "--out", str(tmp_path / "out")])
    assert "--batch-size: must be a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npz", ".safetensors", ".json"])
def test_relation_out_is_a_folder_checked_before_the_model_loads(
    tmp_path, capsys, monkeypatch, suffix
):
    # .npz ran the whole analysis, then a traceback; .json wrote one file and printed folder paths.
    monkeypatch.setattr("mechprobe.cli.relation.load", _no_model)
    out = tmp_path / f"run{suffix}"
    assert cli_main(["relation", "--task", "capitals", "--model", "tiny", "--out", str(out)]) == 2
    assert "--out is the folder that gets result.json, report.md" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("command", "message"),
    [
        # (--window 0, --n-noise 0, --top-k 0 and --test-size nan are now the parser's)
        (["lens", "Hi", "--top-k", "100000"], "--top-k must be between 1 and 259"),
    ],
)
def test_library_messages_name_the_flags_typed(tmp_path, capsys, command, message):
    # These said window, n_noise, top_k, test_size: the library's names, not the shell's.
    out = [] if command[0] == "lens" else ["--out", str(tmp_path / "out")]
    assert cli_main([*command, "--model", "tiny", *out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_library_warnings_reach_the_shell_as_one_line(tmp_path, capsys):
    # They came in Python's format: file, line number, "UserWarning:" and the source line.
    command = ["trace", "--task", "capitals", "--n-items", "2", "--n-noise", "2", "--layers", "0"]
    assert cli_main([*command, "--model", "tiny", "--quiet", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "mechprobe trace: warning: causal_trace traces an answer's first token" in err
    assert "UserWarning" not in err and ".py:" not in err


def test_a_lens_write_that_fails_after_the_run_is_one_line(tmp_path, capsys, monkeypatch):
    # A full disk after the run gave a traceback (review 16d reproduced it with /proc).
    def full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mp.LensResult, "save", full)
    assert cli_main(["lens", "Hi", "--model", "tiny", "--json", str(tmp_path / "x.json")]) == 2
    assert "mechprobe lens: error: cannot write the output: [Errno 28] No space left" in (
        capsys.readouterr().err
    )


def test_every_number_option_has_a_type_that_checks_its_range():
    # `type=int` took --top-k 0, --n-noise 0, --seed -1, --n-items -2 (and --test-size 1.5 as a
    # float), refused only after the model loaded, naming the library's argument.
    from mechprobe.cli import _parser

    signed = {("dla", "--positions"), ("lens", "--patchscope-layer"),
              ("relation", "--patchscope-layer"), ("fv", "--layer")}  # fmt: skip
    sub = next(a for a in _parser()._actions if a.dest == "command")
    bare = [
        (name, action.option_strings[0])
        for name, parser in sub.choices.items()
        for action in parser._actions
        if action.type in (int, float) and (name, action.option_strings[0]) not in signed
    ]
    assert bare == []


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["lens", "Hi", "--top-k", "0"], "--top-k", "must be a positive integer"),
        ([*_ERASE, "--n-random", "-1"], "--n-random", "must be 0 or a positive integer"),
        ([*_ERASE, "--shots", "-1"], "--shots", "must be 0 or a positive integer"),
        ([*_TRACE, "--n-noise", "0"], "--n-noise", "must be a positive integer"),
        ([*_TRACE, "--window", "0"], "--window", "must be a positive integer"),
        ([*_ERASE, "--seed", "-1"], "--seed", "must be an integer between 0 and 4294967295"),
        ([*_TRACE, "--seed", "-1"], "--seed", "must be an integer between 0 and 4294967295"),
        (
            [*_RELATION, "--test-size", "1.5"],
            "--test-size/--holdout",
            "must be a fraction in [0, 1)",
        ),
        (
            [*_RELATION, "--test-size", "nan"],
            "--test-size/--holdout",
            "must be a fraction in [0, 1)",
        ),
        ([*_RELATION, "--n-items", "-2"], "--n-items", "must be a positive integer"),
        ([*_RELATION, "--ovector-prompts", "0"], "--ovector-prompts", "must be a positive integer"),
        (
            ["probe", "--dataset", "pos", "--max-examples", "0"],
            "--max-examples",
            "must be a positive integer",
        ),
        (
            ["dla", "--task", "capitals", "--n-items", "0"],
            "--n-items",
            "must be a positive integer",
        ),
    ],
)
def test_counts_seeds_and_shares_are_checked_by_the_parser(tmp_path, capsys, argv, flag, message):
    out = [] if argv[0] == "lens" else ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit):
        cli_main([*argv, "--model", "tiny", *out])
    assert f"argument {flag}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--other-task", "pasttense"], "--other-task: No built-in task or file named 'pasttense'"),
        (["--contrast-task", "pasttense"], "--contrast-task: No built-in task or file named"),
        (["--contrast-task", "past_tense", "--no-ablation"], "but --no-ablation runs no ablation"),
    ],
)
def test_relation_control_tasks_are_checked_before_the_model_loads(
    tmp_path, capsys, monkeypatch, extra, message
):
    # Review 25b: each was refused only after the model had loaded (7-8 s on SmolLM2).
    monkeypatch.setattr("mechprobe.cli.relation.load", _no_model)
    argv = ["relation", "--task", "capitals", *extra, "--model", "tiny"]
    assert cli_main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_lens_refuses_a_rank_colour_without_a_target_and_saves_safetensors(tmp_path, capsys):
    # --color rank without --target ran the whole lens, then died in the plot with a traceback
    # and left --out holding result.json alone; checked before the model loads now.
    nowhere = str(tmp_path / "no-model")
    assert cli_main(["lens", "Hi", "--color", "rank", "--plot", "x.png", "--model", nowhere]) == 2
    assert "--color rank colours by the first --target" in capsys.readouterr().err
    # .safetensors, a format every result saves, was refused by --json.
    path = tmp_path / "lens.safetensors"
    assert cli_main(["lens", "Hi", "--model", "tiny", "--quiet", "--json", str(path)]) == 0
    saved = mp.load_result(path)
    direct = mp.logit_lens(mp.tiny_model(), ["Hi"], progress=False)
    np.testing.assert_allclose(saved.kl_to_final, direct.kl_to_final, atol=1e-6)


def test_cli_messages_name_the_flags_a_shell_user_types():
    from mechprobe.cli._arguments import flag_names

    said = flag_names(
        "receiver_layers=[1] is given; receivers: 'x' is not accepted here; sites: 'head'; "
        "layers repeats a layer; use device='cpu' (or kind='bridge', lens='logit')"
    )
    assert said == (
        "--receiver-layers=[1] is given; --receivers: 'x' is not accepted here; --sites: 'head'; "
        "--layers repeats a layer; use --device 'cpu' (or --kind 'bridge', --lens 'logit')"
    )
    answer = "pass a single-token answer (e.g. its first token 'P', id 50) or a token id."
    assert flag_names(answer) == "pass a single-token answer (e.g. its first token 'P', id 50)."


def test_version_flag_and_report_record_the_version(tmp_path, capsys):
    # No --version, and report.md recorded no version (review 30a F11).
    with pytest.raises(SystemExit):
        cli_main(["--version"])
    assert capsys.readouterr().out.strip() == f"mechprobe {mp.__version__}"
    out = tmp_path / "lens"
    assert cli_main(["lens", "Hi", "--model", "tiny", "--quiet", "--out", str(out)]) == 0
    assert f"mechprobe {mp.__version__}" in (out / "report.md").read_text(encoding="utf-8")


def test_lens_trajectory_draws_the_first_six_prompts(tmp_path, capsys, monkeypatch):
    # It drew one panel per prompt without a limit (review 30a): 40 prompts, 40 panels.
    panels = []
    real = mp.LensResult.plot_trajectory

    def spy(self, *args, **kwargs):
        figure = real(self, *args, **kwargs)
        panels.append(len(figure.axes))
        return figure

    monkeypatch.setattr(mp.LensResult, "plot_trajectory", spy)
    out = tmp_path / "t.png"
    prompts = [f"a{i} b" for i in range(8)]
    args = [*prompts, "--target", " b", "--model", "tiny", "--quiet", "--trajectory", str(out)]
    assert cli_main(["lens", *args]) == 0
    assert panels == [6] and out.stat().st_size > 0
    assert "the first 6 of 8 prompts" in capsys.readouterr().out


def test_layers_named_twice_are_refused_by_the_parser(tmp_path, capsys):
    # Review 31a F5: "--layers repeats a layer" came after the model had loaded.
    with pytest.raises(SystemExit):
        cli_main(["probe", "--dataset", "number", "--layers", "0-2,1", "--out", str(tmp_path)])
    assert "'0-2,1' names layer(s) 1 twice" in capsys.readouterr().err


def test_probe_takes_one_labelled_site_and_says_rows_and_texts(tmp_path, capsys):
    # Review 31a F11: a one-head label was refused by a comma check; F2/F3: --max-examples
    # counts texts, and the sample's description named the whole dataset.
    out = tmp_path / "p"
    args = ["probe", "--dataset", "number", "--model", "tiny", "--quiet", "--positions", "all"]
    assert cli_main([*args, "--site", "head_out@1, head 2", "--max-examples", "50", "--out",
                     str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sites"] == ["head_out@1, head 2"]
    assert "site: 'head_out@1, head 2'" in (out / "report.md").read_text()  # review 31a F8
    assert "(50 of its 400 texts)" in summary["description"]
    assert f"{summary['n_examples']} rows from 50 texts" in capsys.readouterr().out


def test_a_probe_write_that_fails_is_one_line_and_leaves_no_result(tmp_path, capsys, monkeypatch):
    # Review 31a F4: a traceback (exit 1), and a result.json that looked complete beside it.
    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(mp.ProbeResult, "plot", fail)
    out = tmp_path / "p"
    out.mkdir()
    (out / "result.json").write_text("an earlier run's")  # a used folder (review 32a F6)
    args = ["probe", "--dataset", "number", "--model", "tiny", "--quiet", "--layers", "1"]
    assert cli_main([*args, "--out", str(out)]) == 2
    assert "cannot write into" in capsys.readouterr().err
    assert not (out / "result.json").exists()


def test_erase_into_a_used_folder_keeps_this_runs_files_only(tmp_path):
    # Review 31a F6: an INLP run's inlp.png stayed beside a LEACE result, and a sweep's
    # sweep.json and site folders beside a one-site result.
    out = tmp_path / "e"
    common = ["erase", "--dataset", "number", "--model", "tiny", "--quiet", "--n-texts", "0"]
    common += ["--n-random", "1", "--no-mlp", "--out", str(out)]
    assert cli_main([*common, "--site", "resid_post", "--layers", "0-1"]) == 0
    assert (out / "sweep.json").is_file() and (out / "blocks.0.hook_resid_post").is_dir()
    assert "`sweep.json` (load with" in (out / "report.md").read_text()  # review 32a F6
    assert cli_main([*common, "--site", "blocks.1.hook_resid_post", "--iterations", "2"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "projection.safetensors", "result.json", "amnesic.png", "inlp.png", "report.md"
    }  # fmt: skip
    report = (out / "report.md").read_text()
    assert f"mechprobe {mp.__version__}" in report and "dataset: 'number'" in report
    assert cli_main([*common, "--site", "blocks.1.hook_resid_post", "--method", "leace"]) == 0
    assert not (out / "inlp.png").exists()
    assert mp.load_result(out / "result.json").method == "leace"
    (out / "notes.txt").write_text("mine")  # what is not erase's stays
    assert cli_main([*common, "--site", "resid_post", "--layers", "1-2"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "sweep.json", "sweep.png", "report.md", "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post", "notes.txt",
    }  # fmt: skip
    # Another command's files in the folder are not erase's to remove (relation writes a
    # sweep.png, patch a result.json): only what holds erase's own marks goes.
    other = tmp_path / "other"
    other.mkdir()
    for name in ("result.json", "report.md", "sweep.png"):
        (other / name).write_text("another command's")
    (other / "sweep.json").write_text('{"format": "mechprobe.OVectorSweep"}')
    (other / "data").mkdir()
    (other / "data" / "result.json").write_text("mine")
    assert cli_main([*common[:-1], str(other), "--site", "blocks.1.hook_resid_post"]) == 0
    assert (other / "sweep.png").read_text() == "another command's"  # not erase's sweep
    assert (other / "sweep.json").is_file()
    (other / "result.json").write_text("another command's")
    assert cli_main([*common[:-1], str(other), "--site", "resid_post", "--layers", "1-2"]) == 0
    assert (other / "result.json").read_text() == "another command's"
    assert (other / "data" / "result.json").read_text() == "mine"
    # Earlier erase runs of their own in sub-folders are other runs, not this folder's sweep
    # (review 32a F1: runs/L1 and runs/L2 were deleted by a one-site run into runs/).
    runs = tmp_path / "runs"
    for layer in (1, 2):
        site = ["--site", f"blocks.{layer}.hook_resid_post"]
        assert cli_main([*common[:-1], str(runs / f"L{layer}"), *site]) == 0
    assert cli_main([*common[:-1], str(runs), "--site", "blocks.0.hook_resid_post"]) == 0
    assert cli_main([*common[:-1], str(runs), "--site", "resid_post", "--layers", "0-1"]) == 0
    for layer in (1, 2):
        assert (runs / f"L{layer}" / "projection.safetensors").is_file()
        assert (runs / f"L{layer}" / "result.json").is_file()


def test_probe_warnings_name_what_the_shell_can_do(tmp_path, capsys):
    # Review 31a F9: the advice named groups=False, tol= and l2, which no flag sets.
    from mechprobe.cli._arguments import flag_names

    said = flag_names(
        "probe_layers: the probes of layer 2 did not converge within max_iter=1 (tol=0.0001) in "
        "some fold; increase max_iter (or l2). The control task is skipped (NaN); pass groups "
        "with several word types per class, or groups=False."
    )
    assert "groups=" not in said and "tol=" not in said and "(or --l2)" in said, said
    args = ["probe", "--dataset", "country", "--model", "tiny", "--quiet", "--layers", "1"]
    assert cli_main([*args, "--max-iter", "1", "--out", str(tmp_path / "c")]) == 0
    said = capsys.readouterr()
    err = said.err
    assert "groups=" not in err and "tol=" not in err and "no control task can be drawn" in err
    assert "no control task (see the warning above)" in said.out and "nan" not in said.out


def test_relation_reads_the_patchscope_prompt_as_lens_does(tmp_path, monkeypatch):
    # Review 31a F12: lens interpreted \\n in --patchscope-prompt, relation took it literally.
    seen = []

    def stop(model, task, **kwargs):
        seen.append(kwargs["lens"])
        raise ValueError("stop here")

    monkeypatch.setattr(mp, "relational_analysis", stop)
    args = [*_RELATION, "--model", "tiny", "--lens", "patchscope", "--out", str(tmp_path / "r")]
    prompt = ["--patchscope-prompt", "cat -> cat\\n?"]
    assert cli_main([*args, *prompt]) == 2
    assert cli_main([*args, *prompt, "--raw"]) == 2
    assert [lens.prompt for lens in seen] == ["cat -> cat\n?", "cat -> cat\\n?"]


_TEXT = "The cat sat on the mat, and the dog lay by the door. " * 30
_TRAIN = ["--seq-len", "32", "--tokens-per-step", "64", "--tokens", "128", "--seed", "3"]


def test_train_lens_saves_the_lens_the_api_trains(tmp_path, capsys):
    # A lens could be trained only from Python; `mechprobe lens --lens FILE` read one.
    text = tmp_path / "cat.txt"
    text.write_text(_TEXT)
    saved = tmp_path / "lens.safetensors"
    argv = ["train-lens", "--model", "tiny", "--text", str(text), *_TRAIN, "--sites",
            "resid_mid,resid_post", "--save", str(saved), "--compare", "64", "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    model = mp.tiny_model()
    direct = mp.train_tuned_lens(model, str(text), sites=["resid_mid", "resid_post"],
                                 n_tokens=128, seq_len=32, tokens_per_step=64, seed=3,
                                 progress=False)  # fmt: skip
    lens = mp.TunedLens.load(saved)
    assert lens.layers == direct.layers == {"resid_mid": (0, 1, 2), "resid_post": (0, 1)}
    for kind in direct.layers:
        torch.testing.assert_close(lens.weights[kind], direct.weights[kind], rtol=0, atol=0)
        torch.testing.assert_close(lens.biases[kind], direct.biases[kind], rtol=0, atol=0)
    info = direct.info
    assert "trained 128 tokens in 2 steps (" in out
    assert f"windows from {info['documents']} document" in out
    assert f"{info['loss_per_step'][0]:.1f} -> {info['loss_per_step'][-1]:.1f} nats" in out
    # the last step's KL table: layer 2 has a resid_mid translator and no resid_post one
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line[:5].strip()
            .isdigit() and "resid" not in line}  # fmt: skip
    kl = info["last_step_kl"]
    assert rows["1"] == [f"{kl['resid_mid 1']:.2f}", f"{kl['resid_post 1']:.2f}"]
    assert rows["2"] == [f"{kl['resid_mid 2']:.2f}"]
    # --compare: the logit and the new lens on held-out text, as compare_lenses reads them
    cmp = mp.compare_lenses(model, {"logit": "logit", "tuned": direct}, "heldout", n_tokens=64,
                            seq_len=32, seed=3, progress=False)  # fmt: skip
    assert f"heldout text, {cmp.n_positions} positions of {cmp.n_windows} windows" in out
    for e, layer in enumerate(cmp.layers):  # each lens's KL and precision@1 with its SE
        row = next(
            line.split() for line in out.splitlines() if line.startswith(f"resid_post@{layer} ")
        )
        assert row[1:4] == [f"{cmp.kl[0, e]:.3f}", "±", f"{cmp.kl_sem[0, e]:.3f}"]
        assert row[4:7] == [f"{cmp.kl[1, e]:.3f}", "±", f"{cmp.kl_sem[1, e]:.3f}"]
        assert row[10:13] == [f"{cmp.precision[1, e]:.3f}", "±", f"{cmp.precision_sem[1, e]:.3f}"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save", "lens.pt"], "a tuned lens is saved as a .safetensors file"),
        (["--save", "no/such/lens.safetensors"], "does not exist (create it first)"),
        (
            ["--save", "l.safetensors", "--seq-len", "32", "--tokens-per-step", "48"],
            "--tokens-per-step (48) must be a multiple of --seq-len (32)",
        ),
        (["--save", "l.safetensors", "--text", "nowhere.txt"], "no such file or folder"),
        (["--save", "l.safetensors", "--text", "all", "--compare", "64"], "on training text"),
        (["--save", "l.safetensors", "--export", "d", "--sites", "resid_post"], "add resid_pre"),
        (
            ["--save", "l.safetensors", "--compare", "8", "--compare-text", "no.txt"],
            "--compare-text no.txt: no such file",
        ),
    ],
)
def test_train_lens_refuses_bad_settings_before_training(tmp_path, capsys, monkeypatch, extra,
                                                         message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("mechprobe.cli.train_lens.load", _no_model)
    assert cli_main(["train-lens", "--model", "tiny", "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert "mechprobe train-lens: error" in err and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--sites", "resid_psot", "site kinds are a comma-separated list of resid_pre"),
        ("--weight-decay", "-1", "must be a finite number at or above 0"),
        ("--tokens", "0", "must be a positive integer"),
        ("--lr", "0", "must be a finite number above 0"),
        ("--compare", "1", "must be 0 (no comparison) or at least 2 tokens"),
        ("--momentum", "1", "must be in [0, 1)"),
    ],
)
def test_train_lens_numbers_and_kinds_are_checked_by_the_parser(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        cli_main(["train-lens", "--save", "l.safetensors", flag, value])
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_train_lens_resumes_from_its_checkpoint(tmp_path, capsys):
    text = tmp_path / "cat.txt"
    text.write_text(_TEXT)
    argv = ["train-lens", "--model", "tiny", "--text", str(text), *_TRAIN, "--sites",
            "resid_post", "--checkpoint", str(tmp_path / "ckpt"), "--checkpoint-every", "1",
            "--quiet"]  # fmt: skip
    assert cli_main([*argv, "--save", str(tmp_path / "a.safetensors")]) == 0
    assert any((tmp_path / "ckpt").iterdir())
    # run again: the finished checkpoint is read, not retrained, and gives the same lens
    assert cli_main([*argv, "--save", str(tmp_path / "b.safetensors")]) == 0
    a, b = (mp.TunedLens.load(tmp_path / f"{n}.safetensors") for n in "ab")
    torch.testing.assert_close(a.weights["resid_post"], b.weights["resid_post"], rtol=0, atol=0)
    assert b.info["resumed_at"] == 2
    # the second run trained nothing, and says so (it printed a fresh training's line)
    out = capsys.readouterr().out
    assert f"already trained: read from the checkpoint in {tmp_path / 'ckpt'} (2 steps)" in out
    assert out.count("trained 128 tokens in 2 steps") == 1
    # other settings with the same folder: refused, naming the flags
    assert cli_main([*argv, "--lr", "0.5", "--save", str(tmp_path / "c.safetensors")]) == 2
    assert "other settings (--lr differ)" in capsys.readouterr().err


def test_train_lens_exports_and_compares_on_text_of_ones_own(tmp_path, capsys):
    text, held = tmp_path / "cat.txt", tmp_path / "held.txt"
    text.write_text(_TEXT)
    held.write_text("A bird flew over the river and the boat went under the bridge. " * 20)
    argv = ["train-lens", "--model", "tiny", "--text", str(text), *_TRAIN, "--sites",
            "resid_pre,resid_post", "--save", str(tmp_path / "l.safetensors"), "--export",
            str(tmp_path / "folder"), "--compare", "64", "--compare-text", str(held),
            "--compare-json", str(tmp_path / "cmp.json"), "--quiet"]  # fmt: skip
    assert cli_main(argv) == 0
    lens = mp.TunedLens.load(tmp_path / "l.safetensors")
    exported = mp.TunedLens.load(tmp_path / "folder")  # the tuned-lens package's layout
    torch.testing.assert_close(exported.weights["resid_post"], lens.weights["resid_post"])
    saved = mp.load_result(tmp_path / "cmp.json")
    direct = mp.compare_lenses(mp.tiny_model(), {"logit": "logit", "tuned": lens}, str(held),
                               n_tokens=64, seq_len=32, seed=3, progress=False)  # fmt: skip
    np.testing.assert_allclose(saved.kl, direct.kl, rtol=1e-6)
    assert f"{held} text, {direct.n_positions} positions" in capsys.readouterr().out


def test_probe_reads_the_positions_given_as_ints(tmp_path):
    # collect takes ints and lists of ints; the command took only last, all and word_last.
    out = tmp_path / "p"
    args = ["probe", "--dataset", "number", "--model", "tiny", "--quiet", "--max-examples", "40",
            "--site", "resid_post", "--layers", "1", "--positions=-2,-1", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_examples"] == 80  # two rows per text
    data = mp.templated_dataset("number", seed=0).sample(40, seed=0)
    acts = mp.collect(mp.tiny_model(), data, "resid_post", positions=[-2, -1], layers=[1],
                      progress=False)  # fmt: skip
    direct = mp.probe_layers(acts, seed=0, progress=False)
    saved = mp.load_result(out / "result.json")
    np.testing.assert_allclose(saved.accuracy, direct.accuracy)
    assert len(acts) == 80
    with pytest.raises(SystemExit):
        cli_main(["probe", "--dataset", "number", "--positions", "first", "--out", str(out)])
