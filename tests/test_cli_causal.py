"""``mechprobe patch``, ``trace``, ``dla``, ``heads`` and ``predict`` on the tiny model: the files
they write hold the API's numbers, and bad output paths or arguments fail before any model
loads."""

from __future__ import annotations

import numpy as np
import pytest

import mechprobe as mp
from mechprobe.cli import main as cli_main

PATCH = ["patch", "--clean", "A cat sat", "--corrupt", "A bat sat", "--answer", "1"]


def _no_model(name):
    raise AssertionError("the model must not load when the arguments are bad")


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_cli_patch_writes_the_api_result(tiny, tmp_path, capsys, method):
    # --model names a saved copy of the test model (a HookedTransformer in make test-tl3).
    folder = mp.save_model(tiny, tmp_path / "model")
    out = tmp_path / "run" / method
    args = [*PATCH, "--wrong", "2", "--sites", "head", "--model", str(folder), "--quiet"]
    assert cli_main([*args, "--method", method, "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "patch.png", "report.md"}
    saved = mp.core.load_result(out / "result.json")
    api = mp.attribution_patch if method == "attribution" else mp.patch
    direct = api(tiny, "A cat sat", "A bat sat", "head", -1, mp.logit_diff("1", "2"))
    np.testing.assert_allclose(saved.values, direct.values, atol=1e-6)
    np.testing.assert_allclose(saved.random, direct.random, atol=1e-6)
    report = (out / "report.md").read_text()
    assert "patch.png" in report and "random" in report
    assert "wrote" in capsys.readouterr().out


def test_cli_trace_takes_a_noise_level(tmp_path):
    # The level was always measured on the run's own subjects: two runs could not share one,
    # which TraceResult.concat requires (review 31b M6).
    out = tmp_path / "trace"
    args = ["trace", "--prompt", "The cat sat on the", "--subject", "cat", "--model", "tiny"]
    opts = ["--sites", "resid_post", "--n-noise", "2", "--n-random", "0", "--noise", "0.5"]
    assert cli_main([*args, *opts, "--quiet", "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.causal_trace(mp.tiny_model(), "The cat sat on the", "cat", sites="resid_post",
                             n_noise=2, n_random=0, noise=0.5, progress=False)  # fmt: skip
    assert saved.noise_level == direct.noise_level == 0.5
    np.testing.assert_allclose(saved.scores[0], direct.scores[0], atol=1e-6)
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before anything runs
        cli_main([*args, "--noise=0", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2


def test_cli_trace_writes_the_api_result(tmp_path):
    out = tmp_path / "trace"
    args = ["trace", "--prompt", "The cat sat on the", "--subject", "cat", "--model", "tiny"]
    opts = ["--sites", "mlp_out", "--n-noise", "2", "--window", "1", "--n-random", "1"]
    assert cli_main([*args, *opts, "--quiet", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "trace.png", "report.md"}
    saved = mp.core.load_result(out / "result.json")
    direct = mp.causal_trace(
        mp.tiny_model(),
        "The cat sat on the",
        "cat",
        sites="mlp_out",
        n_noise=2,
        window=1,
        n_random=1,
        progress=False,
    )
    np.testing.assert_allclose(saved.scores[0], direct.scores[0], atol=1e-6)


@pytest.mark.parametrize(
    "extra",
    [
        ["--out", "{file}"],  # a file in the way of the output folder
        ["--corrupt", "another", "--out", "{dir}"],  # two corrupt prompts for one clean
    ],
)
def test_cli_patch_fails_before_loading(tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setattr("mechprobe.cli.patch.load", _no_model)
    (tmp_path / "f").write_text("x")
    extra = [e.format(file=tmp_path / "f", dir=tmp_path / "d") for e in extra]
    assert cli_main([*PATCH, "--model", "tiny", *extra]) == 2
    assert "mechprobe patch: error" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--task", "capitals", "--prompt", "x", "--subject", "x"],  # both
        ["--prompt", "The cat sat"],  # no subject
        ["--task", "capitals", "--out-of-the-way"],
    ],
)
def test_cli_trace_fails_before_loading(tmp_path, capsys, monkeypatch, args):
    monkeypatch.setattr("mechprobe.cli.trace.load", _no_model)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if "--out-of-the-way" in args else tmp_path / "d"
    args = [a for a in args if a != "--out-of-the-way"]
    assert cli_main(["trace", *args, "--model", "tiny", "--out", str(out)]) == 2
    assert "mechprobe trace: error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "sites"),
    [
        ("trace", "head"),
        ("trace", "q@1"),
        ("senders", "resid_pre"),
        ("receivers", "resid_pre"),
        ("receivers", "mlp_out@1"),
        ("receivers", "blocks.1.hook_resid_mid"),
        ("lens", "head"),
        ("patchscope", "mlp_out"),
    ],
)
def test_the_kinds_the_cli_refuses_are_those_the_api_refuses(tiny, call, sites):
    """The CLI refuses these before loading (tests/test_cli.py) from mp.TRACE_KINDS,
    SENDER_KINDS, RECEIVER_KINDS and each lens's ``kinds``; the analyses refuse each of them too,
    and take every kind those lists hold."""
    metric = mp.answer_prob("1")
    with pytest.raises(ValueError, match=r"sites|senders|receivers|decodes"):
        if call == "trace":
            mp.causal_trace(tiny, "A cat sat", "cat", sites=[sites], n_noise=1, progress=False)
        elif call == "senders":
            mp.path_patch(tiny, "A cat sat", "A bat sat", sites, "final", metric, progress=False)
        elif call == "receivers":
            mp.path_patch(tiny, "A cat sat", "A bat sat", "head", sites, metric, progress=False)
        else:
            lens = mp.Patchscope() if call == "patchscope" else "logit"
            mp.logit_lens(tiny, "A cat sat", sites=sites, lens=lens, progress=False)
    if call == "trace":
        for kind in mp.TRACE_KINDS:
            mp.causal_trace(tiny, "A cat", "cat", sites=kind, layers=[0], n_noise=1, progress=False)
    if call == "lens":
        mp.logit_lens(tiny, "A cat sat", sites=list(mp.LogitLens.kinds), progress=False)


def test_cli_cells_per_batch_reaches_the_api(tmp_path, monkeypatch):
    """--cells-per-batch and --memory-budget are what patch()/causal_trace() get; the numbers do
    not depend on them."""
    seen = []
    for name in ("patch", "causal_trace"):
        real = getattr(mp, name)

        def spy(*a, _real=real, **k):
            seen.append((k.get("cells_per_batch"), k.get("memory_budget")))
            return _real(*a, **k)

        monkeypatch.setattr(mp, name, spy)
    common = ["--model", "tiny", "--quiet", "--n-random", "1"]
    assert cli_main([*PATCH, *common, "--cells-per-batch", "3", "--out", str(tmp_path / "a")]) == 0
    assert cli_main([*PATCH, *common, "--out", str(tmp_path / "b")]) == 0
    trace = ["trace", "--prompt", "The cat sat on the", "--subject", "cat", "--n-noise", "2"]
    assert cli_main([*trace, *common, "--cells-per-batch", "2", "--out", str(tmp_path / "c")]) == 0
    budget = ["--memory-budget", "0.5MiB"]
    assert cli_main([*trace, *common, *budget, "--out", str(tmp_path / "e")]) == 0
    assert seen == [(3, None), (None, None), (2, None), (None, 1 << 19)]
    small, default = (mp.core.load_result(tmp_path / f / "result.json") for f in "ab")
    np.testing.assert_allclose(small.values, default.values, atol=1e-6)


@pytest.mark.parametrize(
    ("command", "extra", "message"),
    [
        (PATCH, ["--cells-per-batch", "0"], "positive integer"),
        (PATCH, ["--method", "attribution", "--cells-per-batch", "8"], "drop --cells-per-batch"),
        (["trace", "--prompt", "x", "--subject", "x"], ["--cells-per-batch", "-2"], "positive"),
        (PATCH, ["--memory-budget", "2GB"], "positive size in bytes"),
        (PATCH, ["--method", "attribution", "--memory-budget", "1GiB"], "drop --memory-budget"),
        (["trace", "--prompt", "x", "--subject", "x"], ["--memory-budget", "0"], "positive size"),
    ],
)
def test_cli_cells_per_batch_refused_before_loading(
    tmp_path, capsys, monkeypatch, command, extra, message
):
    monkeypatch.setattr("mechprobe.cli.patch.load", _no_model)
    monkeypatch.setattr("mechprobe.cli.trace.load", _no_model)
    code = 2
    try:
        rc = cli_main([*command, *extra, "--model", "tiny", "--out", str(tmp_path / "d")])
    except SystemExit as exit_:  # argparse's own errors
        rc = exit_.code
    assert rc == code
    assert message in capsys.readouterr().err


def test_cli_dla_writes_the_api_result(tiny, tmp_path, capsys):
    folder = mp.save_model(tiny, tmp_path / "model")
    out = tmp_path / "dla"
    prompts = ["A cat sat", "Hi there\\n"]  # an escape, as typed in a shell
    args = ["dla", *(a for p in prompts for a in ("--prompt", p)), "--answer", "1"]
    args += ["--wrong", "2", "--wrong", "3", "--heads", "--model", str(folder), "--quiet"]
    assert cli_main([*args, "--batch-size", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "dla.png", "report.md"}
    saved = mp.core.load_result(out / "result.json")
    direct = mp.direct_logit_attribution(
        tiny, ["A cat sat", "Hi there\n"], mp.logit_diff("1", ["2", "3"]), heads=True,
        progress=False,
    )  # fmt: skip
    assert saved.components == direct.components and saved.prompts == direct.prompts
    np.testing.assert_allclose(saved.attributions, direct.attributions, atol=1e-6)
    assert "dla.png" in (out / "report.md").read_text()
    assert "wrote" in capsys.readouterr().out


def test_cli_dla_of_a_task_reports_the_librarys_refusal(tmp_path, capsys):
    # The tiny tokenizer spells the space alone: every answer starts like its argument.
    args = ["dla", "--task", "capitals", "--shots", "1", "--n-items", "3", "--model", "tiny"]
    assert cli_main([*args, "--quiet", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    # the library's way out (metric=...) is not the shell's
    assert "Every item of task 'capitals'" in err and "--prompt/--answer/--wrong" in err
    assert "metric=" not in err


def test_cli_path_patching_sends_from_every_head_without_sites(tmp_path):
    # --sites defaulted to resid_pre, which path patching refuses as a sender ("senders:
    # 'resid_pre' is not accepted here") though the user never typed it
    out = tmp_path / "paths"
    args = [*PATCH, "--wrong", "2", "--receivers", "final", "--n-random", "0", "--model", "tiny"]
    assert cli_main([*args, "--quiet", "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.path_patch(
        mp.tiny_model(), "A cat sat", "A bat sat", "head", "final", mp.logit_diff("1", "2"),
        positions=-1, n_random=0, progress=False,
    )  # fmt: skip
    assert saved.senders == direct.senders
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "capitals", "--prompt", "x"], "not both"),
        ([], "not both"),
        (
            [
                "--prompt",
                "x",
                "--prompt",
                "y",
                "--answer",
                "a",
                "--wrong",
                "b",
                "--wrong",
                "c",
                "--wrong",
                "d",
            ],
            "3 --wrong for 2 --prompt",
        ),
        (["--task", "capitals", "--answer", "a"], "drop --answer"),
        (["--prompt", "x", "--answer", "a", "--wrong", "b", "--shots", "2"], "shape a --task"),
        # --seed only draws --n-items; it was taken and ignored (review 30a F14)
        (["--prompt", "x", "--answer", "a", "--wrong", "b", "--seed", "5"], "--seed draws"),
        (["--task", "capitals", "--seed", "5"], "--seed draws the --n-items subset"),
        (["--prompt", "x", "--answer", "a", "--wrong", "b", "--out-of-the-way"], "--out"),
    ],
)
def test_cli_dla_fails_before_loading(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("mechprobe.cli.dla.load", _no_model)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if "--out-of-the-way" in args else tmp_path / "d"
    args = [a for a in args if a != "--out-of-the-way"]
    assert cli_main(["dla", *args, "--model", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mechprobe dla: error" in err and message in err


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_cli_patch_with_receivers_writes_the_path_patching_result(tmp_path, method):
    out = tmp_path / method
    args = [*PATCH, "--wrong", "2", "--sites", "embed,head,mlp_out", "--receivers", "final,q"]
    # No --positions: with --receivers the default is mp.path_patch's, every position (it was
    # the last token, and the numbers differed from the API's they were documented as).
    opts = ["--n-random", "1", "--method", method, "--model", "tiny"]
    assert cli_main([*args, *opts, "--quiet", "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.path_patch(
        mp.tiny_model(), "A cat sat", "A bat sat", ["embed", "head", "mlp_out"], ["final", "q"],
        mp.logit_diff("1", "2"), method=method, n_random=1, progress=False,
    )  # fmt: skip
    assert isinstance(saved, mp.PathPatchResult) and saved.direction == direct.direction
    assert saved.receivers == direct.receivers
    assert saved.senders == direct.senders and saved.senders[0] == "resid_pre@0"
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)
    np.testing.assert_allclose(saved.random, direct.random, atol=1e-6)


def test_cli_heads_writes_the_api_result(tiny, tmp_path, capsys):
    folder = mp.save_model(tiny, tmp_path / "model")
    out = tmp_path / "heads"
    args = ["heads", "--prompt", "abab\\ncdcd", "--prompt", "the cat, the cat", "--quiet"]
    args += ["--kinds", "induction,duplicate_token", "--layers", "0,2", "--model", str(folder)]
    assert cli_main([*args, "--batch-size", "1", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "heads.png", "report.md"}
    saved = mp.core.load_result(out / "result.json")
    direct = mp.head_scores(
        tiny, ["abab\ncdcd", "the cat, the cat"], kinds=["induction", "duplicate_token"],
        layers=[0, 2], progress=False,
    )  # fmt: skip
    assert saved.kinds == direct.kinds and saved.prompts == direct.prompts
    np.testing.assert_allclose(saved.scores, direct.scores, atol=1e-6)
    random = tmp_path / "random"
    args = ["heads", "--seq-len", "6", "--n-prompts", "2", "--seed", "3", "--model", "tiny"]
    assert cli_main([*args, "--quiet", "--out", str(random)]) == 0
    again = mp.head_scores(mp.tiny_model(), seq_len=6, n_prompts=2, seed=3, progress=False)
    np.testing.assert_allclose(mp.core.load_result(random / "result.json").scores, again.scores)
    assert "wrote" in capsys.readouterr().out


def test_cli_heads_patterns_are_the_best_heads_on_the_first_prompt(tiny, tmp_path, capsys):
    folder = mp.save_model(tiny, tmp_path / "model")
    out = tmp_path / "looks"
    args = ["heads", "--prompt", "the cat, the cat", "--prompt", "abab", "--patterns", "2"]
    args += ["--kinds", "induction,previous_token", "--model", str(folder), "--quiet"]
    assert cli_main([*args, "--out", str(out)]) == 0
    assert {"patterns.json", "patterns.png"} <= {p.name for p in out.iterdir()}
    scores = mp.core.load_result(out / "result.json")
    best = [(la, h) for kind in scores.kinds for la, h, _ in scores.top(kind, 2)]
    sites = [mp.Site("pattern", la, head=h) for la, h in dict.fromkeys(best)]
    looks = mp.core.load_result(out / "patterns.json")
    direct = mp.attention_patterns(tiny, "the cat, the cat", sites=sites, progress=False)
    assert looks.sites == direct.sites and len(looks.prompts) == 1
    np.testing.assert_allclose(looks.patterns, direct.patterns, atol=1e-6)
    assert "## Attention patterns" in (out / "report.md").read_text()
    random = tmp_path / "random"  # random tokens: the first sequence
    args = ["heads", "--seq-len", "5", "--n-prompts", "2", "--patterns", "1", "--model", "tiny"]
    assert cli_main([*args, "--quiet", "--out", str(random)]) == 0
    looks = mp.core.load_result(random / "patterns.json")
    first = mp.core.load_result(random / "result.json").tokens[0]
    assert looks.lengths == (len(first),) and len(looks.sites) <= 3
    shown = capsys.readouterr()
    assert "wrote" in shown.out and "picked_as" in shown.out
    assert "warning" not in shown.err  # review 39a F9: torch warned of a read-only array


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "x", "--seq-len", "5"], "drop them with --prompt"),
        (["--prompt", "x", "--n-prompts", "5"], "drop them with --prompt"),
        (["--prompt", "x", "--seed", "7"], "--seed draws the random tokens"),
        (["--out-of-the-way"], "--out"),
    ],
)
def test_cli_heads_fails_before_loading(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("mechprobe.cli.heads.load", _no_model)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if "--out-of-the-way" in args else tmp_path / "d"
    args = [a for a in args if a != "--out-of-the-way"]
    assert cli_main(["heads", *args, "--model", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mechprobe heads: error" in err and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "abc"], "pass --prompt texts that have them, or no --prompt for"),
        (["--seq-len", "300"], "lower --seq-len"),
    ],
)
def test_cli_heads_messages_name_the_flags(tmp_path, capsys, args, message):
    assert cli_main(["heads", *args, "--model", "tiny", "--quiet", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "seq_len" not in err and "prompts=None" not in err


def test_cli_heads_refuses_a_one_token_half_before_loading(tmp_path, capsys, monkeypatch):
    # Refused by head_scores after the model had loaded.
    monkeypatch.setattr("mechprobe.cli.heads.load", _no_model)
    with pytest.raises(SystemExit):
        cli_main(["heads", "--seq-len", "1", "--out", str(tmp_path / "d")])
    assert "--seq-len: must be at least 2" in capsys.readouterr().err


def test_cli_heads_refuses_an_unknown_kind(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli_main(["heads", "--kinds", "copying", "--out", str(tmp_path / "d")])
    assert "kinds are a comma-separated list" in capsys.readouterr().err


def test_cli_receiver_layers_reach_path_patch(tmp_path, capsys):
    out = tmp_path / "split"
    args = [*PATCH, "--wrong", "2", "--receivers", "q", "--layers", "0-1"]
    opts = ["--receiver-layers", "2", "--n-random", "0", "--model", "tiny", "--quiet"]
    assert cli_main([*args, *opts, "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.path_patch(
        mp.tiny_model(), "A cat sat", "A bat sat", "head", "q", mp.logit_diff("1", "2"),
        layers=[0, 1], receiver_layers=[2], n_random=0, progress=False,
    )  # fmt: skip
    assert saved.receivers == direct.receivers and saved.senders == direct.senders
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)
    assert cli_main([*PATCH, "--receiver-layers", "2", "--out", str(tmp_path / "x")]) == 2
    assert "add --receivers" in capsys.readouterr().err


def test_cli_live_mlps_reach_path_patch(tmp_path, capsys):
    out = tmp_path / "live"
    args = [*PATCH, "--wrong", "2", "--receivers", "final,mlp_in", "--sites", "head,mlp_out"]
    opts = ["--live-mlps", "--n-random", "1", "--model", "tiny", "--quiet"]
    assert cli_main([*args, *opts, "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.path_patch(
        mp.tiny_model(), "A cat sat", "A bat sat", ["head", "mlp_out"], ["final", "mlp_in"],
        mp.logit_diff("1", "2"), freeze_mlps=False, n_random=1, progress=False,
    )  # fmt: skip
    assert saved.freeze_mlps is False
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)
    assert "live_mlps: True" in (out / "report.md").read_text()
    for extra, message in (
        ([], "--live-mlps applies to path patching: add --receivers"),
        (["--receivers", "final", "--method", "attribution"], "--live-mlps applies to --method"),
    ):
        assert cli_main([*PATCH, "--live-mlps", *extra, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err


def test_cli_dla_positions_reach_the_api(tmp_path):
    out = tmp_path / "dla"
    args = ["dla", "--prompt", "A cat sat", "--answer", "1", "--wrong", "2", "--positions=-2"]
    assert cli_main([*args, "--model", "tiny", "--quiet", "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.direct_logit_attribution(
        mp.tiny_model(), ["A cat sat"], mp.logit_diff("1", "2"), positions=-2, progress=False
    )
    assert saved.position == -2
    np.testing.assert_allclose(saved.attributions, direct.attributions, atol=1e-6)


def test_cli_attribution_noising_reaches_the_api(tmp_path):
    out = tmp_path / "noising"
    args = [*PATCH, "--wrong", "2", "--sites", "mlp_out", "--method", "attribution"]
    opts = ["--direction", "noising", "--n-random", "1", "--model", "tiny", "--quiet"]
    assert cli_main([*args, *opts, "--out", str(out)]) == 0
    saved = mp.core.load_result(out / "result.json")
    direct = mp.attribution_patch(
        mp.tiny_model(), "A cat sat", "A bat sat", "mlp_out", -1, mp.logit_diff("1", "2"),
        direction="noising", n_random=1, progress=False,
    )  # fmt: skip
    assert saved.direction == "attribution-noising"
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)


def test_reports_record_the_text_analysed(tmp_path):
    # The commands unescape "\n" in their texts, but report.md recorded the escapes as typed.
    out = tmp_path / "patch"
    args = [
        "patch",
        "--clean",
        "Hi\\ncat",
        "--corrupt",
        "Hi\\nbat",
        "--answer",
        "c",
        "--wrong",
        "b",
    ]
    assert (
        cli_main([*args, "--sites", "mlp_out", "--model", "tiny", "--quiet", "--out", str(out)])
        == 0
    )
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "['Hi\\ncat']" in report and "Hi\\\\ncat" not in report
    result = mp.load_result(out / "result.json")
    direct = mp.patch(mp.tiny_model(), "Hi\ncat", "Hi\nbat", "mlp_out", -1, mp.logit_diff("c", "b"))
    np.testing.assert_allclose(result.values, direct.values, atol=1e-6)


def test_cli_answers_are_one_shared_or_one_each_and_tasks_take_three_shots(tmp_path, capsys):
    # patch wanted as many --wrong as --answer, trace one --answer per --prompt, dla either: the
    # API takes one shared or one per prompt everywhere, and so does every subcommand now.
    pairs = ["--clean", "A cat sat", "--corrupt", "A bat sat"]
    pairs += ["--clean", "The dog ran", "--corrupt", "The fox ran"]
    args = ["patch", *pairs, "--answer", "1", "--answer", "3", "--wrong", "2"]
    out = tmp_path / "patch"
    assert (
        cli_main([*args, "--n-random", "0", "--model", "tiny", "--quiet", "--out", str(out)]) == 0
    )
    direct = mp.patch(
        mp.tiny_model(), ["A cat sat", "The dog ran"], ["A bat sat", "The fox ran"], "resid_pre",
        -1, mp.logit_diff(["1", "3"], "2"), n_random=0, progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(
        mp.core.load_result(out / "result.json").per_pair, direct.per_pair, atol=1e-6
    )
    trace = ["trace", "--prompt", "A cat sat", "--subject", "cat", "--prompt", "A dog ran"]
    trace += ["--subject", "dog", "--answer", " x", "--layers", "0", "--n-noise", "1"]
    assert cli_main([*trace, "--n-random", "0", "--model", "tiny", "--quiet", "--out",
                     str(tmp_path / "trace")]) == 0  # fmt: skip
    # --task: three demonstrations in trace and dla, as in relation (they took all five).
    report = tmp_path / "trace-task"
    task = ["trace", "--task", "capitals", "--n-items", "1", "--layers", "0", "--n-noise", "1"]
    assert cli_main([*task, "--n-random", "0", "--model", "tiny", "--quiet", "--out",
                     str(report)]) == 0  # fmt: skip
    saved = mp.core.load_result(report / "result.json")
    capitals = mp.load_task("capitals")
    for shots, traced in ((3, True), (5, False)):
        prompt = capitals.with_shots(shots).subset(1, seed=0).prompts()[0]
        assert (len(saved.tokens[0]) == mp.tiny_model().to_tokens(prompt).shape[1]) == traced


def test_cli_patch_takes_positions_by_name(tiny, tmp_path):
    """--position NAME=INTS: one column per name, one int per pair where templates differ."""
    folder = mp.save_model(tiny, tmp_path / "model")
    args = ["patch", "--clean", "A cat", "--clean", "Say dog", "--corrupt", "A xat",
            "--corrupt", "Say dyg", "--answer", "1", "--wrong", "2", "--sites", "mlp_out",
            "--position", "X=3,6", "--position", "END=-1", "--model", str(folder), "--quiet"]  # fmt: skip
    assert cli_main([*args, "--out", str(tmp_path / "run")]) == 0
    saved = mp.core.load_result(tmp_path / "run" / "result.json")
    direct = mp.patch(tiny, ["A cat", "Say dog"], ["A xat", "Say dyg"], "mlp_out",
                      {"X": [3, 6], "END": -1}, mp.logit_diff("1", "2"))  # fmt: skip
    assert saved.positions == ("X", "END")
    np.testing.assert_allclose(saved.per_pair, direct.per_pair, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--position", "X"], "not NAME=INTS"),
        (["--position", "X=a"], "not NAME=INTS"),
        (["--position", "X=1,2,3"], "gives 3 ints for 1 prompt pairs"),
        (["--position", "X=1", "--position", "X=2"], "give each name once"),
        (["--position", "X=1", "--positions", "all"], "instead of --positions"),
    ],
)
def test_cli_named_positions_fail_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("mechprobe.cli.patch.load", _no_model)
    command = [*PATCH, *extra, "--model", "tiny", "--out", str(tmp_path / "x")]
    if "NAME=INTS" in message:  # argparse's own refusal of the value
        with pytest.raises(SystemExit) as exit_:
            cli_main(command)
        assert exit_.value.code == 2
    else:
        assert cli_main(command) == 2
    assert message in capsys.readouterr().err


def test_cli_fv_writes_the_api_result(tiny, tmp_path, capsys):
    # Function vectors had no command; every other analysis had one.
    folder = mp.save_model(tiny, tmp_path / "model")
    out = tmp_path / "fv"
    settings = {"n_heads": 4, "n_prompts": 2, "n_random": 1, "n_random_heads": 1, "seed": 3}
    args = ["fv", "--task", "capitals", "--n-items", "12", "--n-heads", "4", "--n-prompts", "2",
            "--n-random", "1", "--n-random-heads", "1", "--seed", "3", "--sweep", "0-1",
            "--model", str(folder), "--quiet", "--out", str(out)]  # fmt: skip
    assert cli_main(args) == 0
    captured = capsys.readouterr()
    # byte-level answers share a first token: said in one line, and the run goes on
    assert "mechprobe fv: warning: function_vector scores each held-out answer" in captured.err
    assert {p.name for p in out.iterdir()} == {
        "result.json", "fv.png", "report.md", "sweep.json", "sweep.png"
    }  # fmt: skip
    task = mp.load_task("capitals").subset(12, seed=3)
    with pytest.warns(UserWarning):
        direct = mp.function_vector(tiny, task, progress=False, **settings)
        sweep = mp.function_vector_sweep(tiny, task, direct, layers=[0, 1], n_random=1, seed=3,
                                         progress=False)  # fmt: skip
    saved = mp.core.load_result(out / "result.json")
    assert saved.heads == direct.heads and saved.conditions == direct.conditions
    np.testing.assert_allclose(saved.vector, direct.vector, atol=1e-6)
    np.testing.assert_array_equal(saved.correct, direct.correct)
    swept = mp.core.load_result(out / "sweep.json")
    assert swept.layers == (0, 1)
    np.testing.assert_array_equal(swept.correct, sweep.correct)
    printed = captured.out
    assert "random heads (FV norm)" in printed and "wrote" in printed and "sweep.json" in printed
    report = (out / "report.md").read_text()  # the heads, the quoted predictions, the sweep
    assert ", ".join(f"{la}.{h}" for la, h in direct.heads) in report
    assert f"- zero-shot: {direct.summary().top_prediction[0]!r}" in report
    assert "## Layer sweep" in report and "![sweep.png](sweep.png)" in report
    # review 38b: layers the model lacks were refused after the vector was fit, writing nothing
    bad = tmp_path / "bad"
    assert cli_main([*args[:-1], str(bad), "--sweep", "0-5"]) == 2  # the last --sweep counts
    assert "--sweep: layers run from 0 to 2" in capsys.readouterr().err
    assert not bad.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "capitols"], "Did you mean 'capitals'"),
        (["--task", "capitals", "--out-file"], "names a file; --out is the folder"),
    ],
)
def test_cli_fv_fails_before_loading(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setattr("mechprobe.cli.fv.load", _no_model)
    out = tmp_path / ("result.json" if "--out-file" in args else "d")
    args = [a for a in args if a != "--out-file"]
    assert cli_main(["fv", *args, "--model", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mechprobe fv: error" in err and message in err, err
    assert not out.exists()


def test_cli_predict_prints_and_writes_the_api_result(tiny, tmp_path, capsys):
    folder = mp.save_model(tiny, tmp_path / "model")
    # One prompt: every --answer is a candidate (test_prompt's call); \n is interpreted.
    args = ["predict", "--prompt", "The cat\\nsat", "--answer", " on", "--answer", " mat"]
    assert cli_main([*args, "--top-k", "4", "--model", str(folder), "--quiet"]) == 0
    direct = mp.predict(tiny, "The cat\nsat", [" on", " mat"], top_k=4, progress=False)
    assert capsys.readouterr().out.strip() == direct.report(k=4, alternatives=3)
    # Several prompts, one answer for all; --no-bos; --out writes the folder.
    out = tmp_path / "predict"
    args = ["predict", "--prompt", "Hi", "--prompt", "A dog", "--answer", " x", "--no-bos"]
    args += ["--alternatives", "0", "--model", str(folder), "--quiet", "--out", str(out)]
    assert cli_main(args) == 0
    assert {p.name for p in out.iterdir()} == {"result.json", "predict.png", "report.md"}
    saved = mp.core.load_result(out / "result.json")
    direct = mp.predict(tiny, ["Hi", "A dog"], [" x", " x"], prepend_bos=False, progress=False)
    assert saved.prompt_ids == direct.prompt_ids and saved.answers == (" x", " x")
    np.testing.assert_allclose(saved.logprob, direct.logprob, atol=1e-6)
    np.testing.assert_allclose(saved.top_probs, direct.top_probs, atol=1e-6)
    printed = capsys.readouterr().out
    assert direct.report(alternatives=0) in printed and "wrote" in printed


def test_cli_predict_refuses_bad_arguments_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("mechprobe.cli.predict.load", _no_model)
    assert cli_main(["predict", "--answer", " a"]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    args = ["predict", "--prompt", "a", "--prompt", "b", "--answer", "x", "--answer", "y"]
    assert cli_main([*args, "--answer", "z"]) == 2
    assert "got 3 --answer for 2 --prompt" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli_main(["predict", "--prompt", "a", "--out", str(tmp_path / "file")]) == 2
    assert "--out:" in capsys.readouterr().err
    assert cli_main(["predict", "--prompt", "a", "--answer", " b", "--answer", ""]) == 2
    assert "an --answer is empty" in capsys.readouterr().err  # review 40b: after the load


def test_cli_errors_are_one_line_whatever_the_library_says(capsys, monkeypatch):
    # Review 40b F4: transformers' offline error carries a line break of its own.
    def offline(*args, **kwargs):
        raise mp.ModelLoadError("Could not load 'x'.\nCheck your internet connection.")

    monkeypatch.setattr("mechprobe.cli.predict.load", offline)
    assert cli_main(["predict", "--prompt", "a", "--model", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'x'. Check your internet" in err
