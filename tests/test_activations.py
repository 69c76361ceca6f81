"""collect() -> Activations: equal to a manual run_with_cache gather, padding- and batch-independent,
memory-mapped equal to in-memory, resumable, saved and loaded without pickle, clear errors."""

from __future__ import annotations

import copy
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import hook_count

import mechprobe as mp
import mechprobe.probing._activations as activations_module
from mechprobe.probing._selection import _word_last

TEXTS = ["Hello there, world", "Hi", "A cat sat on the mat.", "one two three"]
RESID = [f"blocks.{layer}.hook_resid_post" for layer in range(3)]


def manual(model: Any, text: str, positions: list[int], hooks: list[str] = RESID) -> np.ndarray:
    """[k, layers, d] from TransformerLens's own run_with_cache on the unpadded text."""
    with torch.no_grad():
        _, cache = model.run_with_cache(model.to_tokens(text))
    return np.stack([cache[h][0, positions].float().numpy() for h in hooks], axis=1)


def byte_word_last(text: str) -> list[int]:
    """Tiny's tokenizer has one token per byte and BOS at 0: an ASCII word ending at character e
    ends at position e."""
    return [m_end for m_end in (m.end() for m in __import__("re").finditer(r"\S+", text))]


@pytest.mark.parametrize("rule", [-1, "all", "word_last", "listed", -2, "same_list"])
def test_collect_equals_manual_gather(tiny: Any, rule: Any) -> None:
    lengths = [len(t.encode()) + 1 for t in TEXTS]  # + BOS
    wanted = {
        -1: [[n - 1] for n in lengths],
        -2: [[n - 2] for n in lengths],
        "all": [list(range(1, n)) for n in lengths],
        "word_last": [byte_word_last(t) for t in TEXTS],
        "listed": [[0, 2], [1], [-1, 3, 5], [4]],
        "same_list": [[1, -1]] * len(TEXTS),
    }[rule]
    positions: Any = {"listed": wanted, "same_list": [1, -1]}.get(rule, rule)
    acts = mp.collect(tiny, TEXTS, "resid_post", positions=positions, batch_size=3, progress=False)
    expected = np.concatenate(
        [
            manual(tiny, t, [p % n for p in w])
            for t, w, n in zip(TEXTS, wanted, lengths, strict=True)
        ]
    )
    assert acts.values.shape == expected.shape == (len(expected), 3, 64)
    np.testing.assert_allclose(acts.values, expected, rtol=1e-4, atol=1e-4)
    assert acts.sites == tuple(RESID)
    assert acts.metadata["positions"] == {"listed": "listed", "same_list": "listed"}.get(rule, rule)
    assert acts.text_index.tolist() == [i for i, w in enumerate(wanted) for _ in w]
    flat = [p % n for w, n in zip(wanted, lengths, strict=True) for p in w]
    assert acts.position.tolist() == flat


def test_padding_and_batch_size_do_not_change_values(tiny: Any) -> None:
    ref = mp.collect(tiny, TEXTS, "resid_post", positions="all", batch_size=1, progress=False)
    for side in ("right", "left"):
        for size in (2, 4):
            got = mp.collect(
                tiny, TEXTS, "resid_post", positions="all", batch_size=size, padding_side=side,
                progress=False,
            )  # fmt: skip
            np.testing.assert_allclose(got.values, ref.values, rtol=1e-5, atol=1e-5)
            assert got.position.tolist() == ref.position.tolist()


def test_a_site_is_read_by_its_name_whatever_the_collected_order(tiny: Any) -> None:
    # Review 43b F7: layer(10) after collect(layers=[10, 20]) was an IndexError (a slot, not a
    # layer); a Site, its label or hook name now finds its slot.
    acts = mp.collect(tiny, ["Hi there", "A cat"], "resid_post", layers=[2, 0], progress=False)
    for site in ("resid_post@0", "blocks.0.hook_resid_post", mp.Site("resid_post", 0)):
        np.testing.assert_array_equal(acts.layer(site), acts.layer(1))
    heads = mp.collect(tiny, ["Hi there"], "head", layers=[1], progress=False)
    np.testing.assert_array_equal(heads.layer(mp.Site("head", 1, head=2)), heads.layer(2))
    with pytest.raises(KeyError, match=r"resid_post@1 was not collected; these were: \["):
        acts.layer("resid_post@1")
    with pytest.raises(IndexError, match="Layer slot 2 out of range for 2 sites"):
        acts.layer(2)


def test_dtype_is_spelled_as_load_model_spells_it(tiny: Any) -> None:
    # Review 43b F12: collect took "float16" and refused torch.float16, load_model the reverse.
    by_name = mp.collect(tiny, TEXTS, "resid_post", dtype="float16", progress=False)
    for spelling in (torch.float16, np.float16, "torch.float16"):
        got = mp.collect(tiny, TEXTS, "resid_post", dtype=spelling, progress=False)
        assert got.values.dtype == np.float16
        np.testing.assert_array_equal(got.values, by_name.values)
    for bad in ("bfloat16", torch.int8, "half-ish", 3):
        with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'float16'\]"):
            mp.collect(tiny, TEXTS, "resid_post", dtype=bad, progress=False)
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'bfloat16'"):
        mp.load_model("no-such-model", dtype="int8")


def test_deterministic(tiny: Any) -> None:
    a = mp.collect(tiny, TEXTS, "resid_post", positions="all", progress=False)
    b = mp.collect(tiny, TEXTS, "resid_post", positions="all", progress=False)
    assert np.array_equal(a.values, b.values)


def test_memmap_equals_in_memory(tiny: Any, tmp_path: Path, monkeypatch: Any) -> None:
    # Over its budget, collect writes to a new temporary folder that it keeps (the memory map
    # reads it): under tmp_path here, or every test run left one in /tmp.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ram = mp.collect(tiny, TEXTS, "resid_post", positions="all", batch_size=2, progress=False)
    assert not isinstance(ram.values, np.memmap) and ram.metadata["path"] is None
    disk = mp.collect(
        tiny, TEXTS, "resid_post", positions="all", batch_size=2, memory_budget=1, progress=False
    )
    assert isinstance(disk.values, np.memmap)
    assert Path(disk.metadata["path"]).parent == tmp_path
    assert np.array_equal(np.asarray(disk.values), ram.values)
    half = mp.collect(
        tiny, TEXTS, "resid_post", positions="all", batch_size=2, out_dir=tmp_path, dtype="float16",
        progress=False,
    )  # fmt: skip
    assert half.values.dtype == np.float16 and Path(half.metadata["path"]) == tmp_path
    assert np.array_equal(np.asarray(half.values), ram.values.astype(np.float16))


def test_save_load_round_trip(tiny: Any, tmp_path: Path) -> None:
    acts = mp.collect(
        tiny, TEXTS, "resid_post", positions="word_last", labels=["a", "b", "a", "b"],
        groups=[["x", "y", "z"], ["w"], ["v"] * 6, ["u"] * 3], progress=False,
    )  # fmt: skip
    back = mp.Activations.load(acts.save(tmp_path))
    assert isinstance(back.values, np.memmap)
    assert np.array_equal(np.asarray(back.values), acts.values)
    for name in ("labels", "groups", "text_index", "position", "token"):
        assert np.array_equal(getattr(back, name), getattr(acts, name)), name
    assert back.sites == acts.sites and back.metadata == acts.metadata
    assert back.groups is not None and back.groups.tolist()[:4] == ["x", "y", "z", "w"]
    assert not any(p.suffix == ".pkl" for p in tmp_path.iterdir())
    np.testing.assert_array_equal(back.layer(-1), acts.values[:, 2])


def _store(rows: int, fill: float, label: str) -> mp.Activations:
    """An Activations built by hand: ``rows`` rows of ``fill``, each labelled ``label``."""
    return mp.Activations(
        values=np.full((rows, 2, 3), fill, dtype=np.float32),
        labels=np.array([label] * rows),
        groups=None,
        text_index=np.arange(rows),
        position=np.zeros(rows, dtype=np.int64),
        token=np.array(["t"] * rows),
        sites=("a", "b"),
    )


def test_saving_over_a_loaded_folder_leaves_the_loaded_activations_as_they_were(
    tmp_path: Path,
) -> None:
    # A loaded Activations maps values.npy: a save into its folder must not rewrite that file
    # in place (the loaded object showed the new values beside its old labels, and a smaller
    # new file killed the process with SIGBUS on the next read).
    _store(4, 1.0, "old").save(tmp_path / "acts")
    live = mp.Activations.load(tmp_path / "acts")
    assert isinstance(live.values, np.memmap)
    _store(4, 2.0, "new").save(tmp_path / "acts")  # the same shape, other numbers
    assert np.asarray(live.values).tolist() == [[[1.0] * 3] * 2] * 4
    assert live.labels is not None and live.labels.tolist() == ["old"] * 4
    _store(1, 3.0, "small").save(tmp_path / "acts")  # a smaller file
    assert float(np.asarray(live.values).sum()) == 24.0
    back = mp.Activations.load(tmp_path / "acts")
    assert np.asarray(back.values).tolist() == [[[3.0] * 3] * 2]
    assert back.labels is not None and back.labels.tolist() == ["small"]
    assert sorted(p.name for p in (tmp_path / "acts").iterdir()) == [
        "activations.json", "index.npz", "values.npy",
    ]  # fmt: skip


def test_copies_and_pickles_of_activations_stay_frozen(tmp_path: Path) -> None:
    acts = _store(3, 1.5, "a")
    mapped = mp.Activations.load(acts.save(tmp_path / "acts"))
    for original in (acts, mapped):
        for copied in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
            assert np.asarray(copied.values).tolist() == [[[1.5] * 3] * 2] * 3
            assert copied.labels is not None and copied.labels.tolist() == ["a"] * 3
            for name in ("values", "labels", "text_index", "position", "token"):
                assert not getattr(copied, name).flags.writeable, name


def test_word_last_on_a_hand_checked_sentence(tiny: Any) -> None:
    # Bytes: BOS=0, "The"=1..3, " "=4, "cat-like"=5..12, " "=13, "dog's"=14..18, " "=19,
    # "caf"=20..22, "é" is two bytes 23..24, "."=25.
    text = "The cat-like dog's café."
    acts = mp.collect(tiny, [text], "resid_post", positions="word_last", progress=False)
    assert acts.position.tolist() == [3, 12, 18, 25]
    assert acts.token.tolist() == ["e", "e", "s", "."]
    # With explicit word spans (e.g. a tagger's tokens: "dog" + "'s", "café" + ".").
    spans = ((0, 3), (4, 7), (7, 8), (8, 12), (13, 16), (16, 18), (19, 23), (23, 24))
    ds = mp.ProbingDataset(
        "t", [text], [("D", "N", "P", "A", "N", "P", "N", "P")], "word", (spans,)
    )
    acts = mp.collect(tiny, ds, "resid_post", progress=False)
    assert acts.position.tolist() == [3, 7, 8, 12, 16, 18, 24, 25]
    assert acts.labels is not None and acts.labels.tolist() == list(ds.labels[0])
    assert acts.groups is not None and acts.groups.tolist()[4:6] == ["dog", "'s"]


def test_word_ending_inside_a_token_is_dropped() -> None:
    # " cannot" as one token (chars 3..10) holds two words "can" and "not": neither word has a
    # token of its own that ends where it ends, except "not".
    offsets = [(0, 3), (3, 10), (10, 11)]
    positions, dropped = _word_last([(0, 3), (4, 7), (7, 10), (10, 11)], offsets, bos=1)
    assert positions == [1, None, 2, 3] and dropped == 1


def test_labels_per_text_per_word_and_none(tiny: Any) -> None:
    acts = mp.collect(
        tiny, ["a b c", "d e"], "resid_post", positions="word_last",
        labels=[["x", None, "y"], "z"], progress=False,
    )  # fmt: skip
    assert acts.labels is not None and acts.labels.tolist() == ["x", "y", "z", "z"]
    assert acts.position.tolist() == [1, 5, 1, 3]
    frame = acts.to_frame()
    assert frame.columns.tolist() == ["text_index", "position", "token", "label", "group"]
    assert frame.token.tolist() == ["a", "c", "d", "e"] and frame.group.isna().all()
    ints = mp.collect(tiny, ["a", "b"], "resid_post", labels=[0, 1], progress=False)
    assert ints.labels is not None and ints.labels.dtype == np.int64


def test_numpy_labels_and_groups_work_as_lists_do(tiny: Any) -> None:
    texts = ["a b c", "d e"]
    for labels, groups in [(np.array(["x", "y"]), np.array([3, 4])), (np.array([0, 1]), None)]:
        arrays = mp.collect(tiny, texts, "resid_post", labels=labels, groups=groups, progress=False)
        lists = mp.collect(
            tiny, texts, "resid_post", labels=labels.tolist(),
            groups=None if groups is None else groups.tolist(), progress=False,
        )  # fmt: skip
        assert arrays.labels is not None and lists.labels is not None
        assert arrays.labels.tolist() == lists.labels.tolist() == labels.tolist()
        if groups is None:
            assert arrays.groups is None
        else:
            assert arrays.groups is not None and arrays.groups.tolist() == groups.tolist()
        np.testing.assert_array_equal(arrays.values, lists.values)


def test_pandas_labels_pair_with_texts_by_position(tiny: Any) -> None:
    # After a sort (or a filter) a Series' index is not 0..n-1: labels were read by index label,
    # so two of four rows got the other class (and a filtered frame raised KeyError: 0).
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(
        {"text": ["I ran", "you walk", "she sang", "we go"], "y": ["p", "q", "p", "q"]}
    )
    df = df.sort_values("text")
    assert df.index.tolist() != list(range(4))
    acts = mp.collect(tiny, df["text"], labels=df["y"], groups=df["text"], progress=False)
    assert acts.labels is not None and acts.groups is not None
    assert acts.labels.tolist() == df["y"].tolist()
    assert acts.groups.tolist() == df["text"].tolist()
    tail = df.iloc[1:]
    acts = mp.collect(tiny, tail["text"], labels=tail["y"], progress=False)
    assert acts.labels is not None and acts.labels.tolist() == tail["y"].tolist()


def test_task_input_labels_by_item(tiny: Any) -> None:
    task = mp.load_task("capitals").subset([0, 1, 2]).with_shots(1)
    acts = mp.collect(tiny, task, [mp.Site("resid_post", 1)], progress=False)
    assert acts.labels is not None and acts.labels.tolist() == task.inputs()
    np.testing.assert_allclose(
        acts.values[0], manual(tiny, task.prompts()[0], [-1], ["blocks.1.hook_resid_post"])[0],
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_early_stop_leaves_no_hooks_and_model_unchanged(tiny: Any) -> None:
    before = hook_count(tiny)
    tokens = tiny.to_tokens("Hello")
    with torch.no_grad():
        logits = tiny(tokens)
    mp.collect(tiny, TEXTS, [mp.Site("resid_post", 0)], progress=False)  # stops after block 0
    assert hook_count(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(tokens), logits)


def test_resume_continues_an_interrupted_collection(
    tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = mp.collect(tiny, TEXTS, "resid_post", positions="all", batch_size=1, progress=False)
    real = activations_module._run_chunk
    calls: list[list[int]] = []

    def failing(model: Any, plan: Any, rows: list[int], *rest: Any) -> np.ndarray:
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(rows)
        return real(model, plan, rows, *rest)

    monkeypatch.setattr(activations_module, "_run_chunk", failing)
    kwargs: dict[str, Any] = {"positions": "all", "batch_size": 1, "out_dir": tmp_path}
    with pytest.raises(KeyboardInterrupt):
        mp.collect(tiny, TEXTS, "resid_post", progress=False, **kwargs)
    assert (tmp_path / "progress.json").is_file()
    calls.clear()
    monkeypatch.setattr(
        activations_module, "_run_chunk", lambda *a: (calls.append(a[2]), real(*a))[1]
    )
    done = mp.collect(tiny, TEXTS, "resid_post", progress=False, **kwargs)
    assert len(calls) == len(TEXTS) - 2  # only the chunks the first call did not write
    assert np.array_equal(np.asarray(done.values), ref.values)
    assert not (tmp_path / "progress.json").exists()
    calls.clear()
    again = mp.collect(tiny, TEXTS, "resid_post", progress=False, **kwargs)
    assert calls == [] and np.array_equal(np.asarray(again.values), ref.values)
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(tiny, TEXTS[:2], "resid_post", progress=False, **kwargs)


def test_a_finished_folder_is_not_reused_for_other_weights_groups_or_under_hooks(
    tmp_path: Path,
) -> None:
    """The folder's fingerprint held 16 values of the embedding and no groups, and hooks were not
    seen: edited weights, an intervention in force or new groups loaded the old activations."""
    model = mp.tiny_model()
    kwargs: dict[str, Any] = {"positions": -1, "out_dir": tmp_path, "progress": False}
    first = mp.collect(model, TEXTS, "resid_post", groups=["a", "b", "c", "d"], **kwargs)
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(model, TEXTS, "resid_post", groups=["w", "x", "y", "z"], **kwargs)
    with mp.intervene(model, {mp.Site("mlp_out", 1): mp.Ablate()}):
        with pytest.raises(ValueError, match="hooks are attached"):
            mp.collect(model, TEXTS, "resid_post", groups=["a", "b", "c", "d"], **kwargs)
        fresh = tmp_path / "ablated"
        ablated = mp.collect(model, TEXTS, "resid_post", **{**kwargs, "out_dir": fresh})
        assert not np.allclose(ablated.values[:, 2], first.values[:, 2])
    with torch.no_grad():
        model.blocks[2].mlp.out.weight.zero_()  # an edit deep in the model, not the embedding
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(model, TEXTS, "resid_post", groups=["a", "b", "c", "d"], **kwargs)
    again = mp.collect(mp.tiny_model(), TEXTS, "resid_post", groups=["a", "b", "c", "d"], **kwargs)
    assert np.array_equal(np.asarray(again.values), first.values)  # the same model: reused
    # One model in two dtypes (review 42b F1): weights that are bfloat16 values read the same
    # in float32, so the folder of the float32 run was taken for the bfloat16 copy's.
    rounded = mp.tiny_model()
    with torch.no_grad():
        for param in rounded.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    folder = {**kwargs, "out_dir": tmp_path / "rounded"}
    assert mp.collect(rounded, TEXTS, "resid_post", **folder).metadata["model_dtype"] == "float32"
    half = rounded.to(torch.bfloat16)
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(half, TEXTS, "resid_post", **folder)


def test_values_are_read_only_as_every_result_array(tiny: Any) -> None:
    acts = mp.collect(tiny, TEXTS, "resid_post", progress=False)
    with pytest.raises(ValueError, match="read-only"):
        acts.values[0, 0, 0] = 5.0


def test_nan_activations_raise(tiny: Any) -> None:
    broken = mp.tiny_model(seed=3)
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or inf"):
        mp.collect(broken, ["Hi"], "resid_post", progress=False)
    values = np.ones((2, 1, 4), dtype=np.float32)
    values[1, 0, 2] = np.nan
    with pytest.raises(ValueError, match="row 1, layer slot 0"):
        mp.Activations(values, None, None, np.zeros(2), np.zeros(2), np.array(["a", "b"]), ("s",))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"data": []}, ValueError, "No texts"),
        ({"labels": ["a"]}, ValueError, "4 texts but 1 labels"),
        ({"positions": "word_last", "labels": [["a"], "b", "c", "d"]}, ValueError, "1 entries"),
        ({"positions": "every"}, ValueError, "positions must be"),
        ({"positions": None}, TypeError, "positions must be"),
        ({"positions": [[0], [1], [2]]}, ValueError, "3 position lists for 4 texts"),
        ({"positions": [[0], [9], [0], [0]]}, ValueError, "outside text 1"),
        ({"positions": 7}, ValueError, "outside text 1"),
        ({"labels": ["a", 1, "b", "c"]}, TypeError, "all strings, all ints or all bools"),
        ({"sites": ["blocks.0.hook_resid_post", mp.Site("head", 0, head=0)]}, ValueError, "head"),
        ({"sites": ["blocks.0.hook_resid_post"] * 2}, ValueError, "repeat"),
        ({"sites": ["resid_post", mp.Site("resid_post", 1)]}, ValueError, "repeat"),
        ({"sites": "resid_psot"}, ValueError, "resid_post"),
        # A Site's own positions were gathered as if they were the whole row: values of position 4
        # reported as position 1 (silently), or an IndexError.
        ({"sites": mp.Site("resid_post", 1, positions=[3, 4, 5])}, ValueError, "pass positions="),
        ({"sites": mp.Site("resid_post", 1, positions=0)}, ValueError, "pass positions="),
        ({"layers": [5]}, ValueError, "out of range"),
        ({"dtype": "float64"}, ValueError, "float32"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_input_raises_clear_errors(
    tiny: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    args: dict[str, Any] = {"data": TEXTS, "sites": "resid_post", "progress": False} | kwargs
    with pytest.raises(error, match=match):
        mp.collect(tiny, **args)


def test_layers_pick_blocks_and_select_is_positions_under_its_old_name(tiny: Any) -> None:
    every = mp.collect(tiny, TEXTS, "resid_post", positions="all", progress=False)
    two = mp.collect(tiny, TEXTS, "resid_post", layers=[-1, 0], positions="all", progress=False)
    assert two.sites == (RESID[2], RESID[0])
    np.testing.assert_array_equal(two.values, every.values[:, [2, 0]])
    with pytest.warns(DeprecationWarning, match="say positions"):
        old = mp.collect(tiny, TEXTS, "resid_post", select="last", progress=False)
    np.testing.assert_array_equal(old.values, mp.collect(tiny, TEXTS, progress=False).values)
    assert old.metadata["positions"] == -1


def test_repr_and_summary_are_short(tiny: Any, tmp_path: Path) -> None:
    labels = ["x", "y", "x", "x"]
    acts = mp.collect(tiny, TEXTS, "resid_post", labels=labels, progress=False)
    assert repr(acts) == (
        "Activations(4 rows x 3 sites x 64, float32, 2 classes, 4 texts, in memory)"
    )
    assert acts.summary().to_dict("list") == {
        "label": ["x", "y"], "rows": [3, 1], "share": [0.75, 0.25], "texts": [3, 1]
    }  # fmt: skip
    mapped = mp.Activations.load(acts.save(tmp_path / "acts"))
    assert f"memory-mapped from {tmp_path / 'acts'}" in repr(mapped) and len(repr(mapped)) < 200
    with pytest.raises(FileExistsError, match="a file"):
        acts.save(tmp_path / "acts" / "values.npy")


def test_activations_validate_their_fields() -> None:
    values = np.zeros((2, 1, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="labels has shape"):
        mp.Activations(
            values, np.array(["a"]), None, np.zeros(2), np.zeros(2), np.array(["a", "b"]), ("s",)
        )
    with pytest.raises(ValueError, match="site names"):
        mp.Activations(
            values, None, None, np.zeros(2), np.zeros(2), np.array(["a", "b"]), ("s", "t")
        )


@pytest.mark.integration
def test_smollm2_word_last_matches_incremental_decoding(smollm2: Any) -> None:
    ds = mp.pos_dataset(min_count=1).subset([0, 100, 300])
    acts = mp.collect(
        smollm2, ds, [mp.Site("resid_post", 5), mp.Site("resid_post", 29)], progress=False
    )
    tok = smollm2.tokenizer
    for i, text in enumerate(ds.texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        prefix = [len(tok.decode(ids[: t + 1])) for t in range(len(ids))]
        assert words_ok(ds, i, prefix, acts)
        rows = acts.text_index == i
        expected = manual(
            smollm2, text, acts.position[rows].tolist(),
            ["blocks.5.hook_resid_post", "blocks.29.hook_resid_post"],
        )  # fmt: skip
        np.testing.assert_allclose(acts.values[rows], expected, rtol=1e-3, atol=1e-3)


def words_ok(ds: mp.ProbingDataset, i: int, prefix: list[int], acts: mp.Activations) -> bool:
    """Independently: a word ending at character e ends at the first token whose decoded prefix
    reaches e (BOS adds 1); words whose end is not a prefix length end inside a token (dropped)."""
    assert ds.words is not None
    expected = [prefix.index(e) + 1 for _, e in ds.words[i] if e in prefix]
    return acts.position[acts.text_index == i].tolist() == expected


def test_head_sites_equal_the_cache_and_its_w_o(tiny: Any) -> None:
    """A head kind is every head of each layer: z (``head``) and q are [d_head] slices of
    TransformerLens's hooks, ``head_out`` is z @ W_O[h], the head's write to the residual stream
    (summed over heads plus b_O it is attn_out); padding and batch size change nothing."""
    n_heads = int(tiny.cfg.n_heads)
    last = [len(t.encode()) for t in TEXTS]  # BOS + bytes: the last real token
    caches = []
    with torch.no_grad():
        for t in TEXTS:
            caches.append(tiny.run_with_cache(tiny.to_tokens(t))[1])
    for kind, hook in (("head", "attn.hook_z"), ("q", "attn.hook_q"), ("head_out", None)):
        acts = mp.collect(tiny, TEXTS, kind, layers=[1, 2], batch_size=3, progress=False)
        assert acts.sites[:2] == (f"{kind}@1, head 0", f"{kind}@1, head 1")
        assert acts.values.shape[1] == 2 * n_heads
        want = []
        for cache, p in zip(caches, last, strict=True):
            rows = []
            for layer in (1, 2):
                z = cache[f"blocks.{layer}.attn.hook_z"][0, p]
                for h in range(n_heads):
                    if hook is None:
                        rows.append(z[h] @ tiny.blocks[layer].attn.W_O[h])
                    else:
                        rows.append(cache[f"blocks.{layer}.{hook}"][0, p, h])
            want.append(torch.stack(rows))
        expected = torch.stack(want).detach().numpy()
        np.testing.assert_allclose(acts.values, expected, rtol=1e-4, atol=1e-5)
        one = mp.collect(
            tiny, TEXTS, kind, layers=[1, 2], batch_size=1, padding_side="left", progress=False
        )
        np.testing.assert_allclose(one.values, acts.values, rtol=1e-5, atol=1e-5)
    single = mp.collect(tiny, TEXTS, mp.Site("head_out", 2, head=1), progress=False)
    assert single.sites == ("head_out@2, head 1",)
    np.testing.assert_allclose(single.values[:, 0], acts.values[:, n_heads + 1], atol=1e-5)
    with pytest.raises(ValueError, match="two widths"):
        mp.collect(tiny, TEXTS, ["resid_post", "head"], progress=False)


def test_a_position_named_twice_is_refused_everywhere() -> None:
    # collect, logit_lens and amnesic took positions=[0, 0] and gave each row twice (a probe's
    # split could put one copy in training and one in its test set); patching refused it.
    model = mp.tiny_model()
    for positions in ([-1, -1], [0, 0], [2, -1]):  # [2, -1] is one token of a 3-token text
        with pytest.raises(ValueError, match="name each position once"):
            mp.collect(model, ["Hi"], "resid_post", positions=positions, progress=False)
    with pytest.raises(ValueError, match=r"positions repeat \[0\]"):
        mp.logit_lens(model, "Hello there", positions=[0, 0], progress=False)
    with pytest.raises(ValueError, match=r"positions repeat \[-1\]"):
        mp.amnesic(model, mp.Site("resid_post", 1), mp.random_projection(64, 2),
                   text=["Hello there"], positions=[-1, -1], progress=False)  # fmt: skip
    assert len(mp.collect(model, ["Hi"], "resid_post", positions=[0, -1], progress=False)) == 2


def test_a_collection_of_batch_size_none_is_found_again_by_its_passes(tiny, tmp_path: Path) -> None:
    # batch_size=None (every text in one pass) was refused; its folder's fingerprint records the
    # passes it ran, so the same one pass spelled batch_size=len(texts) finds the collection.
    kwargs: dict[str, Any] = {"out_dir": tmp_path / "acts", "progress": False}
    whole = mp.collect(tiny, TEXTS, "resid_post", batch_size=None, **kwargs)
    again = mp.collect(tiny, TEXTS, "resid_post", batch_size=len(TEXTS), **kwargs)
    np.testing.assert_array_equal(whole.values, again.values)
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(tiny, TEXTS, "resid_post", batch_size=1, **kwargs)


def test_token_labels_without_offsets_are_the_tokens_texts(tiny: Any, monkeypatch: Any) -> None:
    # A slow tokenizer has no offsets: each row's token is then its decoded text (and a token
    # holding part of a UTF-8 character its bytes), never the BPE piece ("Ġ" for a space).
    text = "a é"
    fast = mp.collect(tiny, [text], "resid_post", positions="all", progress=False)
    monkeypatch.setattr(type(tiny.tokenizer), "is_fast", property(lambda self: False))
    slow = mp.collect(tiny, [text], "resid_post", positions="all", progress=False)
    ids = tiny.to_tokens(text)[0].tolist()
    assert slow.position.tolist() == fast.position.tolist() == list(range(1, len(ids)))
    assert slow.token.tolist() == ["a", " ", "<0xC3>", "<0xA9>"]
    assert fast.token.tolist()[:2] == slow.token.tolist()[:2]
