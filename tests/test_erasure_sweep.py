"""Layer sweeps of amnesic probing and the ``mechprobe erase`` command, on the tiny model."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import ERASE_RESULT_KEYS

import mechprobe as mp
from mechprobe.erasure._result import AmnesicMeasure, AmnesicResult
from mechprobe.erasure._sweep import ErasureSweep, layer_sweep

TEXTS = ["Hello there, friend.", "Hi"]


@pytest.fixture(scope="module")
def letters() -> mp.ProbingDataset:
    """Which letter a text ends with (3 classes), read at the last token."""
    words = ["red", "blue", "cat", "dog", "sun", "sky", "old", "new", "big", "hot"]
    texts = [f"{w} {m} {c}" for w in words for m in ("so", "now") for c in "abc"]
    labels = [c for _ in words for _ in ("so", "now") for c in "abc"]
    return mp.ProbingDataset("letters", tuple(texts), tuple(labels))


def test_layer_sweep_fits_and_measures_each_layer(
    tiny: Any, letters: mp.ProbingDataset, tmp_path: Any
) -> None:
    sweep = layer_sweep(
        tiny, letters, [0, 2], "leace", text=TEXTS[:1], probe=letters, n_random=1, batch_size=32
    )
    assert sweep.layers == [0, 2]
    assert all(r.n_removed == 2 for r in sweep.results)  # 3 classes: LEACE erases 2 directions
    effects = sweep.effects()
    # Erased at the last token (the default), which predicts nothing inside the text: next-token
    # accuracy and loss cannot change and are not measured; the KL at that token is.
    # Probe accuracy at the erased site is an effect too (it was left out of the table).
    assert set(effects["metric"]) == {"lm_kl", "probe_accuracy"}
    assert (effects.loc[effects["metric"] == "lm_kl", "effect"] > 0).all()
    for r, (_, row) in zip(sweep.results, effects[effects["metric"] == "probe_accuracy"].iterrows(),
                           strict=True):  # fmt: skip
        assert row["effect"] == pytest.approx(r.effect("probe_accuracy", "erased", site=r.site,
                                                        probe="linear")[0])  # fmt: skip
    for r in sweep.results:  # LEACE guards the erased layer against a fresh linear probe
        after = r.values("probe_accuracy", "erased", site=r.site, probe="linear")[0]
        assert r.majority_baseline is not None and after <= r.majority_baseline + 0.2
    fig = sweep.plot()
    assert fig.get_suptitle() == (
        "leace erasure (rank 2), layer by layer; random controls: 1 a layer"
    )
    probed = layer_sweep(tiny, letters, [0], "leace", probe=letters, n_random=2)
    # probe accuracy first: one random value per probed site and seed (it read 6 for 2)
    assert probed.plot().get_suptitle().endswith("random controls: 2 a layer")
    kl = sweep.plot(metric="lm_kl").axes[0]
    assert kl.get_title().startswith("leace: KL") and kl.get_ylabel() == "nats"
    assert len({line.get_marker() for line in kl.lines if line.get_label() != "_child0"}) >= 2
    back = ErasureSweep.load(sweep.save(tmp_path / "sweep.json"))
    assert [r.to_dict() for r in back.results] == [r.to_dict() for r in sweep.results]
    assert back.to_dict() == sweep.to_dict()
    assert back != sweep and len({sweep, back, sweep}) == 2  # hashable, by identity
    assert repr(sweep) == "ErasureSweep(leace, 2 erasure(s), layers 0-2)"
    # The model it was made on, as each erasure's record says (the notebook view's first line).
    assert (sweep.model_name, sweep.model_dtype) == (tiny.cfg.model_name, "float32")
    assert (back.model_name, back.model_dtype) == (sweep.model_name, "float32")
    assert f"made by {tiny.cfg.model_name} (float32)" in sweep._repr_html_()
    mixed = ErasureSweep("leace", (sweep.results[0], replace(sweep.results[1], model_dtype="x")))
    assert mixed.model_dtype == "float32, x" and ErasureSweep("leace", ()).model_name == ""
    assert sweep.summary().equals(sweep.effects())
    # Each row says its erasure (site, layer, n_removed) and, apart, where its probe read.
    frame = sweep.to_frame()
    assert sorted(set(frame["site"])) == ["resid_post@0", "resid_post@2"]
    probe_rows = frame[frame["metric"] == "probe_accuracy"]
    assert (probe_rows["probe_layer"] == probe_rows["layer"]).all()  # probed where erased
    assert effects["site"].tolist() == ["resid_post@0"] * 2 + ["resid_post@2"] * 2


def test_a_sweeps_frame_is_its_results_frames_one_after_another() -> None:
    """The sweep prepended its own ``layer`` (the erased one) to frames whose ``site`` was the
    probe's hook name, and its effects said the layer alone: erasures at two kinds of one layer
    read the same (review 23a F2). Now it concatenates the results' frames, which say both."""

    def erasure(hook: str, layer: int, rank: int, probe: str) -> AmnesicResult:
        measures = (
            AmnesicMeasure("lm_kl", "erased", 0.1 * rank),
            AmnesicMeasure("lm_kl", "random", 0.01, seed=0),
            AmnesicMeasure("probe_accuracy", "intact", 0.9, site=probe, probe="linear"),
            AmnesicMeasure("probe_accuracy", "erased", 0.5, site=probe, probe="linear"),
        )
        return AmnesicResult(hook, layer, -1, "inlp", rank, 64, measures)

    results = (
        erasure("blocks.1.hook_resid_post", 1, 2, "blocks.1.hook_resid_post"),
        erasure("blocks.1.hook_mlp_out", 1, 3, "blocks.2.hook_mlp_out"),
    )
    sweep = ErasureSweep("inlp", results)
    expected = pd.concat([r.to_frame() for r in results], ignore_index=True)
    pd.testing.assert_frame_equal(sweep.to_frame(), expected)
    frame = sweep.to_frame()
    assert frame.groupby("site").size().to_dict() == {"mlp_out@1": 4, "resid_post@1": 4}
    assert frame["probe_site"].dropna().unique().tolist() == ["resid_post@1", "mlp_out@2"]
    empty = ErasureSweep("inlp", ()).to_frame()
    assert empty.empty and empty.columns.tolist() == frame.columns.tolist()
    effects = sweep.effects()
    erasure_first = ["site", "kind", "layer", "head", "hook", "n_removed", "positions", "metric"]
    assert effects.columns.tolist()[:8] == erasure_first
    kl = effects[effects["metric"] == "lm_kl"]
    assert kl["kind"].tolist() == ["resid_post", "mlp_out"] and kl["layer"].tolist() == [1, 1]
    assert kl["effect"].tolist() == pytest.approx([0.2, 0.3])
    assert str(effects["layer"].dtype) == "Int64"


def test_layer_sweep_checks_what_it_can_before_collecting(
    tiny: Any, letters: mp.ProbingDataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mechprobe.erasure._sweep as sweep_module

    monkeypatch.setattr(sweep_module, "collect", lambda *a, **k: pytest.fail("collected"))
    with pytest.raises(ValueError, match="method must be"):
        layer_sweep(tiny, letters, [0], "pca", text=TEXTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Nothing to measure"):
        layer_sweep(tiny, letters, [0], "leace")
    with pytest.raises(ValueError, match="seed"):
        layer_sweep(tiny, letters, [0], "inlp", text=TEXTS, seed=-1)
    with pytest.raises(ValueError, match=r"fit_options holds method='orth'.*'leace-orth'"):
        layer_sweep(tiny, letters, [0], "leace", text=TEXTS, fit_options={"method": "orth"})


def test_a_seed_among_the_fit_options_is_the_fits_own(
    tiny: Any, letters: mp.ProbingDataset
) -> None:
    got = layer_sweep(tiny, letters, [1], "inlp", text=TEXTS[:1], n_random=1,
                      fit_options={"seed": 3, "n_iterations": 2}, progress=False)  # fmt: skip
    acts = mp.collect(tiny, letters, mp.Site("resid_post", 1), progress=False)
    eraser = mp.fit_erasure(acts.layer(0), acts.labels, "inlp", seed=3, n_iterations=2)
    assert got.results[0].n_removed == eraser.n_removed
    assert isinstance(
        mp.fit_erasure(acts.layer(0), acts.labels, "leace", progress=False), mp.Eraser
    )


def test_sites_pick_the_kind_and_kind_is_its_old_name(
    tiny: Any, letters: mp.ProbingDataset
) -> None:
    kw: dict[str, Any] = {"text": TEXTS[:1], "n_random": 1, "progress": False}
    sweep = layer_sweep(tiny, letters, [1], "leace", sites="mlp_out", **kw)
    assert [r.site for r in sweep.results] == ["blocks.1.hook_mlp_out"]
    with pytest.warns(DeprecationWarning, match="say sites"):
        old = layer_sweep(tiny, letters, [1], "leace", kind="mlp_out", **kw)
    assert old.to_dict() == sweep.to_dict()
    with pytest.raises(ValueError, match="'head'"):
        layer_sweep(tiny, letters, [1], "leace", sites="head", **kw)
    # layers= defaults to every layer, as everywhere in the API (it had no default).
    every = layer_sweep(tiny, letters, method="leace", sites="mlp_out", **kw)
    assert every.layers == list(range(tiny.cfg.n_layers))
    assert every.results[1].to_dict() == sweep.results[0].to_dict()
    # positions=None warned as "amnesic(positions=None)", once per layer, from inside the sweep.
    with pytest.warns(DeprecationWarning, match=r"^layer_sweep\(positions=None\)") as caught:
        layer_sweep(tiny, letters, [1], "leace", sites="mlp_out", positions=None, **kw)
    assert len([w for w in caught if "positions=None" in str(w.message)]) == 1
    # Word-level data is read (and the eraser fitted) at every word: erasing each text's last
    # token only measured an erasure of almost nothing. Refused before the collection.
    words = mp.ProbingDataset("w", ("ab ba", "aa bb") * 5, (("x", "y"), ("y", "x")) * 5, "word")
    with pytest.raises(ValueError, match=r"word-level.*positions='all'"):
        layer_sweep(tiny, words, [1], "leace", **kw)
    every_word = layer_sweep(tiny, words, [1], "leace", positions="all", **kw)
    assert every_word.results[0].positions == "all"


def test_cli_erase_writes_projection_result_and_figures(tmp_path: Any) -> None:
    from mechprobe.cli import main

    out = tmp_path / "erase"
    argv = ["erase", "--model", "tiny", "--dataset", "country", "--n-countries", "3"]
    argv += ["--site", "blocks.{l}.hook_resid_post", "--layers", "0,1", "--method", "leace"]
    argv += ["--out", str(out), "--n-texts", "2", "--n-random", "1", "--no-mlp", "--shots", "1"]
    assert main(argv) == 0
    for layer in (0, 1):
        folder = out / f"blocks.{layer}.hook_resid_post"
        record = json.loads((folder / "result.json").read_text())
        assert not [k for k in ERASE_RESULT_KEYS if k not in record]
        assert record["n_removed"] == 2  # LEACE on 3 countries
        assert record["task_accuracy_before"] is not None
        assert record["probe_accuracy_before"] is not None
        eraser = mp.Eraser.load(folder / "projection.safetensors")
        assert eraser.n_removed == 2 and eraser.method == "leace"
        assert (folder / "amnesic.png").stat().st_size > 0
    assert ErasureSweep.load(out / "sweep.json").layers == [0, 1]
    assert (out / "sweep.png").exists()
    no_layers = ["erase", "--model", "tiny", "--site", "blocks.{l}.hook_resid_post"]
    assert main([*no_layers, "--out", str(out)]) == 2  # {l} without --layers: a clear error


@pytest.mark.parametrize("command", ["erase", "probe"])
def test_cli_checks_its_output_folder_before_any_work(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any, command: str
) -> None:
    import importlib

    from mechprobe.cli import main

    module = importlib.import_module(f"mechprobe.cli.{command}")

    def no_work(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(module, "load", no_work)
    monkeypatch.setattr(mp, "collect", no_work)
    argv = {
        "erase": ["erase", "--model", "tiny", "--site", "blocks.0.hook_resid_post"],
        "probe": ["probe", "--model", "tiny", "--dataset", "templated_pos"],
    }[command]
    a_file = tmp_path / "taken"
    a_file.write_text("")
    unwritable = tmp_path / "locked"
    unwritable.mkdir(mode=0o500)
    if os.access(unwritable, os.W_OK):  # root writes anywhere; /sys refuses even root
        unwritable = Path("/sys")
    outs = {
        a_file: "it is a file, not a folder",
        a_file / "sub": "is a file, not a folder",
        unwritable / "out": "not writable|not permitted|Permission denied|Read-only",
    }
    if not unwritable.is_dir():
        del outs[unwritable / "out"]
    for out, message in outs.items():
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and str(out) in err and err.count("\n") == 1, err


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_erase_shows_progress_unless_quiet(
    tmp_path: Any, monkeypatch: Any, quiet: bool
) -> None:
    # Every command takes --quiet; erase ran silent (no bars, no --quiet) before.
    from mechprobe import erasure
    from mechprobe.cli import main

    seen: list[tuple[str, bool]] = []
    collect, amnesic = mp.collect, erasure.amnesic

    def record(name: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            seen.append((name, kwargs["progress"]))
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(mp, "collect", record("collect", collect))
    monkeypatch.setattr(erasure, "amnesic", record("amnesic", amnesic))
    argv = ["erase", "--model", "tiny", "--dataset", "country", "--n-countries", "3"]
    argv += ["--site", "blocks.0.hook_resid_post", "--method", "leace", "--n-texts", "2"]
    argv += ["--n-random", "1", "--no-mlp", "--shots", "1", "--out", str(tmp_path / "e")]
    assert main(argv + (["--quiet"] if quiet else [])) == 0
    assert seen == [("collect", not quiet), ("amnesic", not quiet)]


def test_a_sweeps_ticks_are_the_layers_erased_and_its_band_is_named(
    tiny: Any, letters: mp.ProbingDataset
) -> None:
    # Review 26a F13: layers [5, 14, 20, 23, 27] were ticked 6, 9, ..., 27 (auto), and the grey
    # band (mean ± std of the random controls) was not in the legend.
    sweep = layer_sweep(tiny, letters, [0, 2], "leace", text=TEXTS[:1], n_random=2)
    for ax in sweep.plot().axes:
        assert [tick.get_text() for tick in ax.get_xticklabels()] == ["0", "2"]
    kl = sweep.plot(metric="lm_kl").axes[0]
    assert "random ± std" in [text.get_text() for text in kl.get_legend().get_texts()]


def test_one_panel_shows_the_same_metric_for_a_sweep_and_its_results_and_names_the_erasure():
    # Review 26a F13: with ax=, ErasureSweep drew task accuracy and AmnesicResult lm KL, and the
    # one panel no longer said which eraser (or site) it showed.
    from matplotlib.figure import Figure

    measures = (
        AmnesicMeasure("lm_kl", "erased", 0.2),
        AmnesicMeasure("task_accuracy", "intact", 0.9),
        AmnesicMeasure("task_accuracy", "erased", 0.4),
    )
    result = AmnesicResult("blocks.3.hook_resid_post", 3, -1, "leace", 2, 8, measures)
    sweep = ErasureSweep("leace", (result,))
    for drawn in (result, sweep):
        ax = Figure().subplots()
        drawn.plot(ax=ax)
        assert "task accuracy" in ax.get_title() and ax.get_title().startswith("leace")
    ax = Figure().subplots()
    result.plot(ax=ax)
    assert "resid_post@3" in ax.get_title()
