"""The result protocol and its one serialiser (mechprobe.core.Result, encode/decode)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import pathlib
import pickle
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import mechprobe as mp
from mechprobe.core import Result, decode, encode, load_result


@dataclass(frozen=True)
class _Part:
    name: str
    weight: float


@dataclass(frozen=True, eq=False, repr=False)
class _Toy(Result, format="tests.Toy", version=3):
    values: np.ndarray
    vector: torch.Tensor
    labels: tuple[str, ...]
    nested: tuple[tuple[int, ...], ...]
    names: dict[int, str]
    part: _Part
    optional: float | None = None
    score: float = math.nan
    extra: dict[str, float] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"value": self.values.ravel()})

    def summary(self) -> pd.DataFrame:
        return pd.DataFrame({"mean": [float(self.values[0, 0])]})

    def _describe(self) -> str:
        return f"{self.values.shape[0]} rows"


def _toy() -> _Toy:
    return _Toy(
        values=np.array([[1.0, np.nan], [np.inf, -np.inf]], dtype=np.float32),
        vector=torch.arange(3, dtype=torch.float64),
        labels=("a", "b"),
        nested=((1, 2), (3,)),
        names={7: "seven", -1: "none"},
        part=_Part("p", 0.5),
        extra={"x": float("nan")},
    )


@pytest.mark.parametrize("suffix", [".json", ".npz", ".safetensors"])
def test_round_trip_keeps_types_shapes_and_non_finite_values(tmp_path, suffix: str) -> None:
    toy = _toy()
    path = toy.save(tmp_path / f"toy{suffix}")
    assert path == tmp_path / f"toy{suffix}"
    if suffix == ".json":
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text  # strict JSON
        assert json.loads(text)["format"] == "tests.Toy"
    back = _Toy.load(path)
    np.testing.assert_array_equal(back.values, toy.values)
    assert back.values.dtype == np.float32
    assert torch.equal(back.vector, toy.vector)
    assert back.labels == ("a", "b") and back.nested == ((1, 2), (3,))
    assert back.names == {7: "seven", -1: "none"} and back.part == _Part("p", 0.5)
    assert back.optional is None and math.isnan(back.score) and math.isnan(back.extra["x"])
    pd.testing.assert_frame_equal(back.to_frame(), toy.to_frame())
    assert isinstance(load_result(path), _Toy)


def test_a_path_without_a_suffix_is_refused_with_the_file_to_name(tmp_path) -> None:
    # Review 36a F9: relational.md saves a RelationalResult to a folder; the others refused one
    # without saying what to pass.
    with pytest.raises(ValueError, match=r"not 'toy': add the suffix, such as toy\.json"):
        _toy().save(tmp_path / "toy")


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_bfloat16_tensors_round_trip_through_json_and_npz(tmp_path, suffix: str) -> None:
    # numpy has no bfloat16 (saving raised TypeError): written as float32, every value exact.
    values = torch.tensor([1.5, -2.0, 3.0078125, 1e-30], dtype=torch.bfloat16)
    toy = dataclasses.replace(_toy(), vector=values)
    back = _Toy.load(toy.save(tmp_path / f"toy{suffix}"))
    assert back.vector.dtype == torch.bfloat16 and torch.equal(back.vector, values)
    assert _Toy.from_dict(toy.to_dict()).vector.dtype == torch.bfloat16


def test_safetensors_keeps_dtypes_names_tensors_by_field_and_checks_digests(tmp_path) -> None:
    from safetensors import safe_open

    toy = dataclasses.replace(_toy(), vector=torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    path = toy.save(tmp_path / "toy.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["values", "vector"]
        assert handle.metadata()["format"] == "tests.Toy"
    back = _Toy.load(path)
    assert back.vector.dtype == torch.bfloat16 and torch.equal(back.vector, toy.vector)
    # One changed byte inside a tensor's data is found and named, with the file.
    data = bytearray(path.read_bytes())
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    data[8 + int.from_bytes(data[:8], "little") + header["vector"]["data_offsets"][0]] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}: tensor 'vector' does not match its SHA-256"):
        _Toy.load(path)


def test_format_and_version_are_checked(tmp_path) -> None:
    data = _toy().to_dict()
    with pytest.raises(ValueError, match="newer mechprobe"):
        _Toy.from_dict({**data, "version": 4})
    with pytest.raises(ValueError, match="older mechprobe"):
        _Toy.from_dict({**data, "version": 2})
    with pytest.raises(ValueError, match="not a saved _Toy"):
        _Toy.from_dict({**data, "format": "other"})
    lens_path = mp.logit_lens(mp.tiny_model(), "Hi").save(tmp_path / "lens.json")
    with pytest.raises(ValueError, match="not a readable _Toy"):
        _Toy.load(lens_path)
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        _toy().save(tmp_path / "missing" / "toy.json")
    with pytest.raises(ValueError, match=r"\.json, \.npz or \.safetensors"):
        _toy().save(tmp_path / "toy.pkl")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        _Toy.load(tmp_path / "bad.json")


def test_repr_is_short_and_the_notebook_view_shows_the_summary() -> None:
    toy = _toy()
    assert repr(toy) == "_Toy(2 rows)"
    page = toy._repr_html_()
    assert "<table" in page and "mean" in page and "<img" not in page
    lens = mp.logit_lens(mp.tiny_model(), ["Hi", "Hey"], targets=" a", positions="all")
    assert len(repr(lens)) < 160 and "2 prompt(s)" in repr(lens)
    page = lens._repr_html_()
    assert "<table" in page and "<img" in page  # the lens also shows its heatmap
    assert isinstance(lens.plot(), Figure)


def test_the_notebook_view_survives_a_failing_description(monkeypatch) -> None:
    toy = _toy()

    def broken(self) -> str:
        raise RuntimeError("no description")

    monkeypatch.setattr(_Toy, "_describe", broken)
    assert repr(toy) == "_Toy(…)"
    assert "<table" in toy._repr_html_()  # it raised: __repr__ guarded this, _repr_html_ did not


def test_plot_draws_into_given_axes() -> None:
    fig = Figure()
    ax = fig.add_subplot()
    lens = mp.logit_lens(mp.tiny_model(), "Hi", targets=" a")
    assert lens.plot(ax=ax) is fig
    assert lens.plot(ax=fig.add_subplot(2, 1, 2), kind="trajectory") is fig


@dataclass(frozen=True, eq=False, repr=False)
class _Free(Result, format="tests.Free", version=1):
    maybe: float | None
    info: dict[str, Any]
    score: float = 0.0

    def _describe(self) -> str:
        return "free"


@pytest.mark.parametrize("suffix", [".json", ".npz", ".safetensors"])
def test_non_finite_floats_and_free_form_dicts_round_trip(tmp_path, suffix: str) -> None:
    # NaN in a `float | None` field came back as None; in a dict[str, Any] as None; a tensor two
    # dicts deep came back as its encoded tag; dotted keys shared one array name, so "a.b"
    # silently loaded the values of {"a": {"b": ...}}.
    info = {
        "nan": math.nan, "neg": -math.inf, "word": "nan", "pair": (1, 2.5),
        "a.b": torch.zeros(2), "a": {"b": torch.full((2,), 7.0)},
        "deep": {"er": {"t": torch.arange(3), "x": np.array([np.nan, 1.0])}},
    }  # fmt: skip
    back = _Free.load(_Free(math.nan, info, math.inf).save(tmp_path / f"free{suffix}"))
    assert back.maybe is not None and math.isnan(back.maybe) and back.score == math.inf
    got = back.info
    assert math.isnan(got["nan"]) and got["neg"] == -math.inf and got["word"] == "nan"
    assert got["pair"] == [1, 2.5]  # JSON has no tuples: a free-form tuple comes back a list
    assert got["a.b"].tolist() == [0.0, 0.0] and got["a"]["b"].tolist() == [7.0, 7.0]
    assert torch.equal(got["deep"]["er"]["t"], torch.arange(3))
    assert np.array_equal(got["deep"]["er"]["x"], [np.nan, 1.0], equal_nan=True)
    assert _Free.load(_Free(None, {}).save(tmp_path / f"none{suffix}")).maybe is None
    for value in (math.inf, -math.inf, 0.5):
        assert _Free.load(_Free(value, {}).save(tmp_path / f"v{suffix}")).maybe == value


def test_files_written_with_nan_as_null_still_load() -> None:
    old = {"format": "tests.Free", "version": 1, "maybe": None, "info": {"x": None}, "score": None}
    back = _Free.from_dict(old)
    assert back.maybe is None and back.info == {"x": None} and math.isnan(back.score)


def test_encode_decode_plain_values() -> None:
    assert encode({"a": (1, float("inf"))}) == {"a": [1, "inf"]}
    assert decode([1, None], tuple[int, float]) == (1, decode(None, float))
    assert decode({"1": [1, 2]}, dict[int, tuple[int, ...]]) == {1: (1, 2)}
    assert decode([1, 2], int | tuple[int, ...] | None) == (1, 2)
    assert decode(3, int | tuple[int, ...] | None) == 3


# Where each exported result's save -> load round trip (equal frames) is tested. A new result class
# must be added here with its test, so that no result ships without one.
ROUND_TRIPS = {
    "AblationResult": "test_relational_protocol.py",
    "AmnesicResult": "test_amnesic.py",
    "AnalogyResult": "test_relational_protocol.py",
    "AttentionPatterns": "test_attention_patterns.py",
    "CumulativeScores": "test_probes.py",
    "DASResult": "test_das.py",
    "Eraser": "test_nullspace.py",
    "ErasureSweep": "test_erasure_sweep.py",
    "FaithfulnessResult": "test_faithfulness.py",
    "FunctionVectorResult": "test_function_vectors.py",
    "FunctionVectorSweep": "test_function_vectors.py",
    "GenerationResult": "test_generation.py",
    "LensComparison": "test_lenses.py",
    "LensResult": "test_lens.py",
    "HeadScoreResult": "test_head_scores.py",
    "LogitAttributionResult": "test_direct_attribution.py",
    "OVector": "test_relational_protocol.py",
    "OVectorEffect": "test_relational_protocol.py",
    "OVectorSweep": "test_relational_protocol.py",
    "PatchResult": "test_patching.py",
    "PathPatchResult": "test_path_patching.py",
    "Predictions": "test_prediction.py",
    "ProbeResult": "test_probes.py",
    "RelationalResult": "test_relational_protocol.py",
    "TaskScore": "test_relational_protocol.py",
    "TraceResult": "test_tracing.py",
    "Trajectory": "test_relational_protocol.py",
}


def _exported_results() -> dict[str, type[Result]]:
    return {
        name: obj
        for name in mp.__all__
        if isinstance(obj := getattr(mp, name), type) and issubclass(obj, Result)
    }


def test_every_exported_result_has_a_round_trip_test() -> None:
    exported = _exported_results()
    assert sorted(exported) == sorted(ROUND_TRIPS), "add the new result and its round-trip test"
    here = pathlib.Path(__file__).parent
    for name, file in ROUND_TRIPS.items():
        text = (here / file).read_text()
        assert name in text and ".load(" in text, f"{file} does not load a saved {name}"


@pytest.mark.parametrize("name", sorted(ROUND_TRIPS))
def test_every_exported_result_implements_the_protocol(name: str) -> None:
    cls = _exported_results()[name]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert cls._format, f"{name} has no format tag"
    for method in ("to_frame", "summary", "plot", "_describe"):
        assert getattr(cls, method) is not getattr(Result, method), f"{name} lacks {method}()"
    assert cls.__repr__ is Result.__repr__, f"{name} overrides the short repr (use repr=False)"
    # A dataclass-generated __eq__ compares arrays element-wise and raises: results say eq=False
    # (identity) or define their own comparison.
    types = " ".join(str(f.type) for f in dataclasses.fields(cls))
    holds_arrays = any(word in types for word in ("ndarray", "Tensor", "Float[", "Int["))
    own_eq = cls.__dict__.get("__eq__")
    generated = own_eq is not None and own_eq.__code__.co_filename == "<string>"
    generated = generated and holds_arrays
    assert not generated, f"{name} compares its arrays with the dataclass __eq__ (say eq=False)"


@pytest.mark.parametrize("suffix", [".json", ".npz", ".safetensors"])
def test_arrays_are_frozen_too_and_the_callers_are_not(tmp_path, suffix: str) -> None:
    """A write into a result's array raised nothing and changed its frames and later saves."""
    values = np.ones((2, 2), dtype=np.float32)
    toy = dataclasses.replace(_toy(), values=values)
    with pytest.raises(ValueError, match="read-only"):
        toy.values[0, 0] = 5.0
    values[1, 1] = 2.0  # the caller's own array stays writable
    loaded = _Toy.load(toy.save(tmp_path / f"toy{suffix}"))
    with pytest.raises(ValueError, match="read-only"):
        loaded.values[:] = 0.0
    np.testing.assert_array_equal(loaded.values, toy.values)


def test_copies_and_pickles_stay_frozen() -> None:
    # deepcopy and pickle (joblib, multiprocessing) skip __post_init__: their arrays were writable.
    toy = _toy()
    for copied in (copy.deepcopy(toy), copy.copy(toy), pickle.loads(pickle.dumps(toy))):
        assert type(copied) is _Toy and copied is not toy
        np.testing.assert_array_equal(copied.values, toy.values)
        assert not copied.values.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            copied.values[0, 0] = 5.0
        assert copied.labels == ("a", "b") and copied.part == _Part("p", 0.5)
    assert toy.values[0, 0] == 1.0


def test_dollars_in_prompts_and_tokens_are_drawn_as_written(tiny) -> None:
    # A $ started matplotlib's mathtext: "a_b^c $x^{2$ end" made saving the lens and generation
    # figures raise (and the notebook view drop them); "pay $5 or $6" drew "5 or " in italics.
    from matplotlib.cbook import is_math_text
    from matplotlib.text import Text

    prompts = ["pay $5 or $6 now", "a_b^c $x^{2$ end"]
    figures = {
        "lens": mp.logit_lens(tiny, prompts, targets=" $", positions="all").plot(),
        "lens, one prompt": mp.logit_lens(tiny, prompts[:1], positions="all").plot(),
        "trajectory": mp.logit_lens(tiny, prompts, targets="$5").plot_trajectory(),
        "generation": mp.generate(tiny, prompts, max_new_tokens=3, progress=False).plot(),
        "trace": mp.causal_trace(
            tiny, prompts[1:], ["$x"], sites="mlp_out", n_noise=2, progress=False
        ).plot(),
        "patch": mp.patch(
            tiny, "$$a$$", "$$b$$", "mlp_out", "all", mp.logit_diff("$", "{"), progress=False
        ).plot(),
    }  # fmt: skip
    for name, fig in figures.items():
        fig.savefig(io.BytesIO(), format="png")
        texts = [t.get_text() for t in fig.findobj(Text) if t.get_text()]
        # Only matplotlib's own log-axis tick labels ($\mathdefault{10^{1}}$) are mathtext.
        assert not [t for t in texts if is_math_text(t) and "mathdefault" not in t], name
        shown = [t.replace(r"\$", "$") for t in texts]  # what a non-math text draws
        if name == "lens, one prompt":
            assert any(t.endswith(": pay $5 or $6 now") for t in shown), shown  # the title
        if name == "generation":
            assert {"pay $5 or $6 now", "a_b^c $x^{2$ end"} <= set(shown), shown
        if name == "patch":
            assert "$ (1)" in shown  # the token itself, a literal dollar, at its position


def test_a_renamed_file_is_refused_naming_what_it_holds(tmp_path) -> None:
    import shutil

    toy = _toy()
    for suffix in (".json", ".npz", ".safetensors"):
        source = toy.save(tmp_path / f"toy{suffix}")
        for other in {".json", ".npz", ".safetensors"} - {suffix}:
            renamed = tmp_path / f"renamed{other}"
            shutil.copy(source, renamed)
            # numpy's message for a JSON file read as .npz pointed at pickle.
            with pytest.raises(ValueError, match=f"holds {suffix[1:]} data.*rename it"):
                load_result(renamed)


def test_load_result_names_the_reader_of_a_tuned_lens(tmp_path, tiny) -> None:
    path = mp.TunedLens.identity(tiny).save(tmp_path / "lens.safetensors")
    with pytest.raises(ValueError, match=r"TunedLens\.load"):
        load_result(path)


def test_damaged_files_and_odd_paths_give_errors_naming_the_file(tmp_path, monkeypatch) -> None:
    toy = _toy()
    # An empty or truncated npz raised EOFError / zipfile.BadZipFile; JSON that is not an object
    # raised AttributeError; a version tag "3" said "newer than ... version 3".
    good = toy.save(tmp_path / "toy.npz").read_bytes()
    for name, content in (("empty.npz", b""), ("cut.npz", good[: len(good) // 2])):
        (tmp_path / name).write_bytes(content)
        for read in (_Toy.load, load_result):
            with pytest.raises(ValueError, match=f"{name}: not an npz file written by mechprobe"):
                read(tmp_path / name)
    for content in ("[1, 2]", "null", '"x"'):
        (tmp_path / "odd.json").write_text(content)
        for read in (_Toy.load, load_result):
            with pytest.raises(ValueError, match=r"odd\.json: not a JSON file .* not an object"):
                read(tmp_path / "odd.json")
    with pytest.raises(ValueError, match="version tag '3' is not an integer"):
        _Toy.from_dict({**toy.to_dict(), "version": "3"})
    # A folder named like a file was an IsADirectoryError on a temporary name; ~ is the home.
    (tmp_path / "taken.json").mkdir()
    with pytest.raises(IsADirectoryError, match=r"taken\.json: it is a folder"):
        toy.save(tmp_path / "taken.json")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert toy.save("~/home.json") == tmp_path / "home.json"
    assert type(load_result("~/home.json")) is _Toy


def test_every_file_and_folder_path_expands_the_home(tmp_path, monkeypatch, tiny) -> None:
    # Activations.save expanded ~ but its load did not; the stores and lenses likewise.
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)  # a literal ./~ folder would land here
    acts = mp.Activations(
        values=np.arange(6, dtype=np.float32).reshape(2, 1, 3), labels=np.array(["a", "b"]),
        groups=None, text_index=np.arange(2), position=np.zeros(2, dtype=np.int64),
        token=np.array(["x", "y"]), sites=("s",),
    )  # fmt: skip
    assert acts.save("~/acts") == home / "acts"
    assert np.asarray(mp.Activations.load("~/acts").values).tolist() == acts.values.tolist()
    lens = mp.TunedLens.identity(tiny)
    assert lens.save("~/lens.safetensors") == home / "lens.safetensors"
    assert mp.TunedLens.load("~/lens.safetensors").layers == lens.layers
    data = mp.ProbingDataset("d", ("Hi", "Ho"), ("a", "b"))
    assert data.save("~/d.jsonl") == home / "d.jsonl"
    assert mp.ProbingDataset.load("~/d.jsonl").labels == ("a", "b")
    assert mp.load_labels("~/d.jsonl").texts == ("Hi", "Ho")
    task = mp.load_task("capitals")
    assert task.to_json("~/t.json") == home / "t.json"
    assert mp.load_task("~/t.json") == task == mp.Task.from_json("~/t.json")
    assert not (work / "~").exists() and not list(work.iterdir())


def test_activations_save_to_folders_and_load_result_points_there(tmp_path, tiny) -> None:
    acts = mp.collect(tiny, ["Hi"], "resid_post", progress=False)
    with pytest.raises(ValueError, match="saved as a folder"):
        acts.save(tmp_path / "acts.npz")  # it made a folder named acts.npz
    assert not (tmp_path / "acts.npz").exists()
    folder = acts.save(tmp_path / "acts")
    with pytest.raises(ValueError, match=r"holds activations: read them with .*Activations.load"):
        load_result(folder)


def test_seeded_results_record_their_seed_and_older_files_load_without_it(tmp_path) -> None:
    # ProbeResult, CumulativeScores (and LensComparison, AnalogyResult, AmnesicResult) did not
    # say which seed made them, though their functions take one.
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 2, 4)), rng.integers(0, 2, 120)
    probes = mp.probe_layers(X, y, seed=7, progress=False)
    scores = mp.cumulative_scores(X, y, seed=8, max_iter=20, progress=False)
    assert probes.seed == 7 and scores.seed == 8
    for result in (probes, scores):
        path = result.save(tmp_path / f"{type(result).__name__}.json")
        record = json.loads(path.read_text())
        assert record["seed"] == result.seed
        del record["seed"]  # as a file saved before the field existed
        path.write_text(json.dumps(record))
        assert type(result).load(path).seed is None


def test_amnesic_records_its_seed(tiny) -> None:
    eraser = mp.random_projection(64, 2, seed=0)
    result = mp.amnesic(tiny, mp.Site("resid_post", 1), eraser, text=["Hi there"], n_random=1,
                        seed=4, dropout=False)  # fmt: skip
    assert result.seed == 4


def _model_runs() -> dict[str, Any]:
    """Each result made from a model, by its analysis at a tiny setting (the docstrings' own;
    offset_accuracy's AnalogyResult needs whole-word tokens, which the tiny tokenizer lacks)."""
    capitals = mp.load_task("capitals")
    pair = ("A cat", "A bat")
    return {
        "PatchResult": lambda m: mp.patch(m, *pair, "mlp_out", -1, mp.logit_diff(1, 2)),
        "PathPatchResult": lambda m: mp.path_patch(m, *pair, "head", "final", mp.logit_diff(1, 2)),
        "TraceResult": lambda m: mp.causal_trace(
            m, "The cat sat on the", "cat", sites="mlp_out", n_noise=2, n_random=1
        ),
        "LogitAttributionResult": lambda m: mp.direct_logit_attribution(
            m, ["Hi cat"], mp.logit_diff(5, 6)
        ),
        "HeadScoreResult": lambda m: mp.head_scores(m, seq_len=8, n_prompts=2),
        "AttentionPatterns": lambda m: mp.attention_patterns(m, ["Hi cat", "A dog sat"]),
        "Predictions": lambda m: mp.predict(m, ["Hi cat", "A dog"], [[" a", " b"], " sat"]),
        "DASResult": lambda m: mp.das(
            m, ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"], [5, 6], mp.Site("resid_post", 1),
            k=1, epochs=1,
        ),
        "AmnesicResult": lambda m: mp.amnesic(
            m, mp.Site("resid_post", 1), mp.random_projection(64, 2, seed=1), text=["Hi you"],
            n_random=1,
        ),
        "FaithfulnessResult": lambda m: mp.faithfulness(
            m, ["Hi cat", "Hi dog"], [mp.Site("head", 2, head=1)], mp.logit_diff(5, 6),
            progress=False,
        ),
        "GenerationResult": lambda m: mp.generate(m, "Hi", max_new_tokens=2),
        "FunctionVectorResult": lambda m: mp.function_vector(m, "capitals", n_prompts=4),
        "FunctionVectorSweep": lambda m: mp.function_vector_sweep(
            m, "capitals", mp.function_vector(m, "capitals", n_prompts=2, n_random=0),
            layers=[1], n_random=1,
        ),
        "TaskScore": lambda m: mp.score_task(m, capitals.subset(2)),
        "Trajectory": lambda m: mp.trajectory(m, capitals.subset(2)),
        "AblationResult": lambda m: mp.ffn_ablation(m, capitals.subset(2), parts=3),
        "OVectorEffect": lambda m: mp.ovector_intervention(
            m, {"o": torch.ones(64)}, mp.random_word_contexts([" Poland"]), [" Warsaw"],
            layers=[1],
        ),
        "OVectorSweep": lambda m: mp.ovector_sweep(
            m, {"o": torch.ones(64)}, mp.random_word_contexts([" Poland"]), [" Warsaw"],
            layers=[range(1, 2)], scales=[1.0],
        ),
        "RelationalResult": lambda m: mp.relational_analysis(
            m, "capitals", n_items=6, ablation=False
        ),
        "ProbeResult": lambda m: mp.probe_layers(_collected(m), progress=False),
        "CumulativeScores": lambda m: mp.cumulative_scores(_collected(m), progress=False),
    }  # fmt: skip


def test_a_result_records_the_positions_its_analysis_ran_at(tiny, tmp_path):
    # ffn_ablation(positions=-1) and positions="all" saved files that could not be told apart
    # (review 24b F2), and the figure said "at every position" for both.
    task = mp.load_task("capitals").subset(2)
    last = mp.ffn_ablation(tiny, task, parts=2, positions=-1, progress=False)
    back = mp.load_result(last.save(tmp_path / "ablation.json"))
    assert back.positions == -1 and set(back.to_frame()["positions"]) == {"-1"}
    assert "every position" not in last.plot().axes[0].get_title()
    assert "positions -1" in repr(last) and "positions" not in repr(
        mp.ffn_ablation(tiny, task, parts=2, progress=False)
    )
    ctx, answer = mp.random_word_contexts([" Poland"]), [" Warsaw"]
    sweeps = [
        mp.ovector_sweep(tiny, {"o": torch.ones(64)}, ctx, answer, layers=[1], scales=[1.0],
                         positions=where, progress=False)
        for where in ([-2, -1], "all")
    ]  # fmt: skip
    both = pd.concat([r.to_frame() for r in sweeps])
    assert both["positions"].tolist() == ["-2,-1", "all"]
    assert mp.load_result(sweeps[0].save(tmp_path / "sweep.npz")).positions == (-2, -1)


def _collected(model):
    # Labelled activations for probes: a probe of them is a result made from that model.
    texts = ["Hi cat", "Hi dog", "Hi you", "Hi hat"] * 3
    return mp.collect(model, texts, "resid_post", labels=[0, 1] * 6, progress=False)


@pytest.mark.parametrize("name", sorted(_model_runs()))
def test_a_result_made_from_a_model_records_it_through_save_and_load(tiny, tmp_path, name):
    # A saved patching or trace result did not say which model made it (only lens results and
    # o-vectors did): a Pythia result could not be told from a Llama one (review 20a).
    result = _model_runs()[name](tiny)
    assert type(result).__name__ == name and result.model_name == tiny.cfg.model_name
    back = type(result).load(result.save(tmp_path / f"{name}.json"))
    assert back.model_name == tiny.cfg.model_name
    # ... and its dtype: a bfloat16 run's numbers are not a float32 run's.
    assert result.model_dtype == back.model_dtype == "float32"
    assert f"made by {tiny.cfg.model_name} (float32)" in result._repr_html_()


@pytest.mark.parametrize(
    "name",
    ["PatchResult", "LensResult", "LensComparison", "ProbeResult", "TraceResult", "OVector",
     "fitted OVector"],
)  # fmt: skip
def test_a_result_records_a_half_precision_model_as_such(tiny, tmp_path, name):
    half = copy.deepcopy(tiny).to(torch.bfloat16)
    runs = _model_runs() | {
        "LensResult": lambda m: mp.logit_lens(m, ["Hi cat"], progress=False),
        "LensComparison": lambda m: mp.compare_lenses(
            m, ["logit"], ["Hi cat sat on the mat"], n_tokens=4, seq_len=4, progress=False
        ),
        "OVector": lambda m: mp.extract_ovector(m, ["Hi cat", "A dog"], layer=1),
        "fitted OVector": lambda m: mp.fit_ovector(
            mp.task_pass(m, mp.load_task("capitals").subset(3)), layer=1, only_correct=False
        ),
    }
    result = runs[name](half)
    back = type(result).load(result.save(tmp_path / f"{name.replace(' ', '_')}.safetensors"))
    assert result.model_dtype == back.model_dtype == "bfloat16"
    assert result.model_name == tiny.cfg.model_name


def test_a_result_saved_before_it_recorded_the_dtype_loads_without_one(tiny, tmp_path):
    result = _model_runs()["PatchResult"](tiny)
    record = result.to_dict()
    del record["model_dtype"]
    old = mp.PatchResult.from_dict(record)
    assert old.model_dtype == "" and "(float32)" not in old._repr_html_()
    assert f"made by {tiny.cfg.model_name}</small>" in old._repr_html_()


def test_probe_results_record_their_fit_settings(tmp_path):
    # Probe files of one dataset fitted with very different l2 looked the same (review 21b).
    X = np.random.default_rng(0).normal(size=(120, 2, 4))
    y = X[:, 1, 0] > 0
    for result in (
        mp.probe_layers(X, y, l2=0.5, max_iter=50, tol=1e-3, progress=False),
        mp.cumulative_scores(X, y, l2=0.5, max_iter=50, tol=1e-3, progress=False),
    ):
        back = type(result).load(result.save(tmp_path / f"{type(result).__name__}.json"))
        assert (back.l2, back.max_iter, back.tol) == (0.5, 50, 1e-3)


# docs/api.md, "Frame columns": words that said one of its columns another way.
RENAMED_COLUMNS = {
    "score": "value (patching and tracing; HeadScoreResult's head score keeps it)",
    "indirect_effect": "effect",
    "aie": "effect",
    "random": "random_effect or random_value",
    "corrupted": "corrupt",
    "pos": "position",
    "hook_name": "hook",
    "std": "spread (over prompts) or <name>_std (over seeds)",
    "kl": "kl_to_final (KL(final || lens), as LensResult says it)",
    "text": "token (a token's text) or prompt_text",
    "tokens": "n_tokens (a count)",
    # Review 26a F3: rates are top1; the lens's top token is top1_token
    "top1_rate": "top1 (a rate) or top1_token (lens)",
}
# Columns saying what a frame measured, so that two concatenated runs stay apart.
IDENTIFIED_BY = {
    "PatchResult": {"metric", "direction"},
    "PathPatchResult": {"metric", "direction"},
    "TraceResult": {"metric"},
    "LensResult": {"lens"},
    "LensComparison": {"lens"},
    "Trajectory": {"lens"},
    "OVectorEffect": {"layers", "scale", "mode", "positions"},
    # Each took positions= and its frames said nothing of them (AblationResult and OVectorSweep
    # did not even store them), so runs at -1 and at "all" concatenated indistinguishably.
    "OVectorSweep": {"layers", "scale", "mode", "positions"},
    "AblationResult": {"positions"},
    "AmnesicResult": {"positions"},
    "DASResult": {"positions"},
    "LogitAttributionResult": {"positions"},
    "ErasureSweep": {"positions"},
    "FaithfulnessResult": {"metric"},
}


def _frames_of_every_kind(model) -> dict[str, pd.DataFrame]:
    """``to_frame()`` and ``summary()`` of a result of each analysis made from ``model``."""
    results = {name: run(model) for name, run in _model_runs().items()}
    results["LensResult"] = mp.logit_lens(model, ["Hi cat", "Hey"], targets=" a", progress=False)
    results["LensComparison"] = mp.compare_lenses(
        model, {"logit": "logit"}, ["a b c d e f g h " * 8], n_tokens=64, seq_len=32,
        progress=False,
    )  # fmt: skip
    texts = [f"{w} {c}" for w in ("red", "blue", "cat", "dog", "sun", "sky") for c in "ab"]
    letters = mp.ProbingDataset("letters", tuple(texts), tuple(t[-1] for t in texts))
    results["ErasureSweep"] = mp.layer_sweep(
        model, letters, [0, 2], "leace", text=["Hi you there"], probe=letters, n_random=1
    )
    # An o-vector beside its random controls, as a relational analysis reports it.
    ovector = mp.OVector(torch.ones(model.cfg.d_model), layer=1, source="toy", n_prompts=1)
    vectors = {"ovector": ovector, **mp.ovector_controls(model, ovector, n_random=2)}
    where = (mp.random_word_contexts([" Poland", " Spain"]), [" Warsaw", " Madrid"])
    results["OVectorEffect (controls)"] = mp.ovector_intervention(
        model, vectors, *where, layers=[1]
    )
    results["OVectorSweep (controls)"] = mp.ovector_sweep(
        model, vectors, *where, layers=[range(1, 2)], scales=[1.0]
    )
    results["OVector"] = ovector
    frames = {}
    for name, result in results.items():
        frames[f"{name}.to_frame"] = result.to_frame()
        frames[f"{name}.summary"] = result.summary()
    frames["LensResult.top_frame"] = results["LensResult"].top_frame()  # review 27a: unchecked
    return frames


def _family(column: pd.Series) -> str | None:
    """What a column holds, as far as a join or a concatenation cares: None when it is empty."""
    values = column.dropna()
    if not len(values):
        return None
    if pd.api.types.is_bool_dtype(values):
        return "bool"
    if pd.api.types.is_integer_dtype(values):
        return "integer"
    if pd.api.types.is_float_dtype(values):
        return "float"
    return "text" if all(isinstance(v, str) for v in values) else "object"


def test_a_column_name_holds_one_kind_of_value_in_every_frame(tiny):
    """Review 26a F3: ``top1`` was the top token (lens), a bool per row (o-vector effects) and a
    rate (o-vector sweeps); ``token`` an id in generation frames and text elsewhere; ``prompt``
    an index in frames and text in the generation summary; ``no_effect`` a bool and a rate.
    Concatenated, such columns become object columns of strings and bools."""
    seen: dict[str, dict[str, str]] = {}
    frames = _frames_of_every_kind(tiny)
    for where, frame in frames.items():
        for column in frame.columns:
            family = _family(frame[column])
            if family is not None:
                seen.setdefault(column, {})[where] = family
    assert "object" not in {f for uses in seen.values() for f in uses.values()}, seen
    # and floats are float64 (a float32 0.9 concatenated with a float64 frame read 0.89999997)
    narrow = {
        f"{where}.{column}"
        for where, frame in frames.items()
        for column in frame.columns
        if frame[column].dtype == np.float32
    }
    assert not narrow, narrow
    mixed = {c: uses for c, uses in seen.items() if len(set(uses.values())) > 1}
    assert not mixed, "\n".join(f"{c}: {uses}" for c, uses in mixed.items())
    # a token's own text: PatchResult's labels ("␣", "c/b") were a "token" column too
    differing = mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", "all", mp.logit_diff(1, 2))
    frames["PatchResult (tokens differ).to_frame"] = differing.to_frame()
    labels = [
        where
        for where, frame in frames.items()
        if "token" in frame.columns and frame["token"].astype(str).str.contains("␣|/").any()
    ]
    assert not labels, labels


def test_conditions_name_the_unedited_run_and_random_controls_one_way(tiny):
    """The unedited run was ``intact`` (o-vectors), ``none`` (DAS) and ``original`` (erasure);
    random controls ``"random 0"`` (DAS), ``"random"`` with a ``seed`` (erasure). Now
    ``intact``, and ``random`` with its ``seed`` where mechprobe draws them."""
    conditions: dict[str, set[str]] = {}
    for where, frame in _frames_of_every_kind(tiny).items():
        if "condition" in frame.columns:
            conditions[where] = set(frame["condition"])
            # each control its own row, told apart by its seed (summaries average them)
            if "random" in conditions[where] and where.endswith("to_frame"):
                assert "seed" in frame.columns or "Relational" in where, where
    said = set().union(*conditions.values())
    assert not said & {"original", "none", "unedited", "clean"}, conditions
    assert not {c for c in said if re.fullmatch(r"random \d+", c)}, conditions
    assert "intact" in conditions["DASResult.to_frame"] & conditions["AmnesicResult.to_frame"]


def test_every_frame_speaks_the_frame_vocabulary(tiny):
    """A column name means one thing in every frame (docs/api.md, "Frame columns"): ``site``
    held a site kind (lens), a hook name (probes, erasure) or a label (patching), so frames of
    two analyses of the same layers merged into nothing; ``kind`` was a write (``mlp``), a kind of
    head or of task; PatchResult's ``random`` a metric beside other frames' effects (review 23a)."""
    kinds = set(typing.get_args(mp.core.SiteKind))
    checked, wrong = 0, []
    for where, frame in _frames_of_every_kind(tiny).items():
        name, method = where.split(".")
        if method == "to_frame" and IDENTIFIED_BY.get(name, set()) - set(frame.columns):
            wrong.append(f"{where}: no {IDENTIFIED_BY[name] - set(frame.columns)} column")
        for column, say in RENAMED_COLUMNS.items():
            if column in frame.columns and not (column == "score" and "HeadScore" in where):
                wrong.append(f"{where}: column {column!r}, say {say}")
        if "kind" in frame.columns and set(frame["kind"].dropna()) - kinds:
            wrong.append(f"{where}: kind holds {set(frame['kind'].dropna()) - kinds}")
        # A set of layers is text ("24-29"): lists cannot be grouped or deduplicated.
        if "layers" in frame.columns and not all(isinstance(v, str) for v in frame["layers"]):
            wrong.append(f"{where}: layers holds {set(map(type, frame['layers']))}, not text")
        ranks = [  # one item's rank (means and medians of ranks are floats)
            c for c in frame.columns
            if c == "rank" or (c.endswith("_rank") and not c.startswith(("mean", "median")))
        ]  # fmt: skip
        for column in ("layer", "head", *ranks):  # a missing rank is <NA>, not -1 or NaN
            dtype = frame[column].dtype if column in frame.columns and len(frame) else None
            if dtype is not None and not pd.api.types.is_integer_dtype(dtype):
                wrong.append(f"{where}: {column} is {dtype}, not an integer")
            elif column in ranks and (frame[column].dropna() < 0).any():
                wrong.append(f"{where}: {column} holds a negative sentinel")
        if "site" in frame.columns:
            for row in frame.drop_duplicates("site").itertuples():
                if pd.isna(row.site) or ("kind" in frame.columns and pd.isna(row.kind)):
                    continue  # a baseline's row, or no site (an embedding, a bias)
                try:
                    site = mp.Site.parse(row.site)
                except ValueError:
                    wrong.append(f"{where}: site {row.site!r} is no site label")
                    continue
                if row.site != str(site):
                    wrong.append(f"{where}: site {row.site!r}, say {str(site)!r}")
                for column in ("kind", "layer", "head"):
                    want = getattr(site, column)
                    got = getattr(row, column, want)
                    if not ((pd.isna(got) and want is None) or got == want):
                        wrong.append(f"{where}: {row.site!r} with {column} {got!r}")
                checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked > 20


def test_results_answer_to_the_shared_attribute_names(tiny):
    # OVector said `model` where every other result says `model_name`; a trace said `corrupted`
    # where patching says `corrupt` (review 23a, F9): the fields stay (saved files), aliases added.
    vector = mp.OVector(torch.ones(4), layer=2, source="toy", n_prompts=1, model="m")
    assert vector.model_name == "m"
    trace = _model_runs()["TraceResult"](tiny)
    assert trace.corrupt is trace.corrupted


def test_frames_of_different_analyses_merge_on_their_sites(tiny):
    """The same place, measured by three analyses, is one key: a lens and a patch of the MLPs,
    and direct attribution's MLP writes, merge on ``site`` (they matched no row: ``resid_post``
    vs ``"resid_post@0"``, ``mlp`` vs ``mlp_out``)."""
    metric = mp.logit_diff(1, 2)
    lens = mp.logit_lens(tiny, "Hi cat", sites="mlp_out", progress=False).summary()
    patched = mp.patch(tiny, "Hi cat", "Hi bat", "mlp_out", -1, metric, n_random=0).to_frame()
    direct = mp.direct_logit_attribution(tiny, "Hi cat", metric, progress=False).to_frame()
    n_layers = tiny.cfg.n_layers
    joined = lens.merge(patched, on=["site", "kind", "layer"]).merge(direct, on="site")
    assert joined["site"].tolist() == [f"mlp_out@{layer}" for layer in range(n_layers)]
    assert joined["component"].tolist() == [f"L{layer} mlp" for layer in range(n_layers)]


def test_frames_of_different_analyses_merge_on_layer_and_head(tiny):
    # A missing head was None in an object column (patching) and -1 (direct attribution), so the
    # two frames could not be joined on (layer, head) (review 21b). Both are nullable Int64 now.
    metric = mp.logit_diff(1, 2)
    patched = mp.patch(tiny, "Hi cat", "Hi bat", ["head", "mlp_out"], -1, metric, n_random=0)
    direct = mp.direct_logit_attribution(tiny, "Hi cat", metric, heads=True, progress=False)
    paths = mp.path_patch(tiny, "Hi cat", "Hi bat", "head", "final", metric, n_random=0)
    frames = (patched.to_frame(), direct.to_frame())
    assert [f["head"].dtype for f in frames] == ["Int64", "Int64"]
    assert str(paths.to_frame()["sender_head"].dtype) == "Int64"
    joined = frames[0].merge(frames[1], on=["layer", "head"])
    assert len(joined) == len(frames[0])  # every head and every MLP row found its attribution
    mlp = joined[joined["kind_x"] == "mlp_out"]
    assert mlp["component"].tolist() == [f"L{layer} mlp" for layer in range(tiny.cfg.n_layers)]


def test_the_notebook_table_says_constant_columns_once_above_it():
    # Review 26a F11: an amnesic summary led with 12 columns repeating one value in every row,
    # so condition, value and effect began off screen; missing values showed three ways.
    from mechprobe.erasure._result import AmnesicMeasure, AmnesicResult

    measures = (AmnesicMeasure("lm_kl", "erased", 0.1), AmnesicMeasure("lm_kl", "random", 0.05, seed=0),
                AmnesicMeasure("lm_accuracy", "intact", 0.5),
                AmnesicMeasure("lm_accuracy", "erased", 0.3))  # fmt: skip
    result = AmnesicResult("blocks.1.hook_resid_post", 1, "all", "inlp", 1, 4, measures)
    page = result._repr_html_()
    header = page[page.index("<thead>") : page.index("</thead>")]
    shown = [h.split("</th>")[0] for h in header.split("<th>")[1:]]
    assert shown == ["", "metric", "condition", "value", "effect"]
    assert "in every row: site resid_post@1; kind resid_post; layer 1; hook " in page
    assert "method inlp; n_removed 1; positions all</p>" in page  # empty columns left out
    assert "&lt;NA&gt;" not in page and "None" not in page
    assert list(result.summary().columns)[:2] == ["site", "kind"]  # summary() itself is whole


def test_a_hand_edited_file_is_refused_by_name(tmp_path):
    # Review 26b L8: an array tagged "object" loaded (anything at all could come back), and a
    # field of the wrong JSON type escaped as an AttributeError instead of the named ValueError.
    path = mp.logit_lens(mp.tiny_model(), "Hi").save(tmp_path / "lens.json")
    data = json.loads(path.read_text())
    data["positions"]["__array__"]["dtype"] = "object"
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"lens.json: not a readable LensResult file \(an array of"
    ):
        mp.LensResult.load(path)
    das = tmp_path / "das.json"
    tag = {"format": mp.DASResult._format, "version": mp.DASResult._version}
    fields = {f.name: None for f in dataclasses.fields(mp.DASResult)}
    das.write_text(json.dumps({**tag, **fields}))
    with pytest.raises(ValueError, match=r"das.json: not a readable DASResult file \("):
        mp.DASResult.load(das)


def test_a_null_where_a_field_is_never_null_is_refused_by_field(tiny, tmp_path):
    # Review 26b: a hand-edited null in a non-optional field loaded, then failed far from the
    # file (in to_frame, plot or repr). Every result of the analyses: a text, an integer and an
    # array field each set to null is refused on load, naming the class and the field.
    hints_checked = 0
    for name, make in _model_runs().items():
        result = make(tiny)
        cls = type(result)
        hints = typing.get_type_hints(cls)
        path = result.save(tmp_path / f"{name}.json")
        data = json.loads(path.read_text())
        # A relational result.json leads with headline keys; its fields are under "details".
        fields = data.get("details", data)
        for field_ in dataclasses.fields(cls):
            hint = hints[field_.name]
            never = hint in (int, str, np.ndarray) or typing.get_origin(hint) in (tuple, dict)
            if not never or fields.get(field_.name) is None:
                continue
            edited = tmp_path / f"{name}-{field_.name}.json"
            nulled = {**fields, field_.name: None}
            edited.write_text(
                json.dumps({**data, "details": nulled} if fields is not data else nulled)
            )
            with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field_.name} is null"):
                cls.load(edited)
            hints_checked += 1
    assert hints_checked > 100
    # a null inside a tuple of texts: LensResult.prompts[1] (review 27a)
    path = mp.logit_lens(tiny, ["Hi cat", "Hey"], progress=False).save(tmp_path / "lens.json")
    data = json.loads(path.read_text())
    data["prompts"][1] = None
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"LensResult\.prompts\[1\] is null in the file"):
        mp.LensResult.load(path)
