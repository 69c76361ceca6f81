"""Probing datasets: the shipped POS data, templated sentences, task prompts, user label files."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

import mechprobe as mp
from mechprobe.probing._templated import _ATTRACTORS, _SUBJECTS, _TAG, _WORDS

UPOS = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN",
        "PUNCT", "SCONJ", "SYM", "VERB", "X"}  # fmt: skip


def _pos_records() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = resources.files("mechprobe.probing").joinpath("data", "pos_sentences.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def test_pos_data_file_is_what_the_tagger_wrote() -> None:
    header, records = _pos_records()
    assert header["model"] == "en_core_web_sm" and header["model_version"].startswith("3.8")
    assert header["spacy_version"].startswith("3.8")
    assert header["n_sentences"] == len(records) >= 800
    assert header["n_tokens"] == sum(len(r["words"]) for r in records) >= 10_000
    assert len({r["register"] for r in records}) >= 8
    for rec in records:
        assert len(rec["words"]) == len(rec["spaces"]) == len(rec["upos"]) == len(rec["tag"])
        assert set(rec["upos"]) <= UPOS


def test_pos_dataset_words_and_labels_line_up_with_the_file() -> None:
    _, records = _pos_records()
    ds = mp.pos_dataset(min_count=1)
    assert len(ds) == len(records) and ds.level == "word" and ds.positions == "word_last"
    assert ds.n_examples == sum(len(r["words"]) for r in records)
    assert ds.words is not None and ds.groups is not None
    for text, spans, labels, groups, rec in zip(
        ds.texts, ds.words, ds.labels, ds.groups, records, strict=True
    ):
        assert [text[a:b] for a, b in spans] == rec["words"]
        assert list(labels) == rec["upos"]
        assert list(groups) == [w.lower() for w in rec["words"]]
    first = ds.texts[0]
    assert first.startswith("The city council voted on Tuesday")
    assert ds.labels[0][:4] == ("DET", "NOUN", "NOUN", "VERB")


def test_pos_dataset_drops_rare_tags_and_samples() -> None:
    full = mp.pos_dataset(min_count=1)
    counts = full.counts()
    rare = {tag for tag, n in counts.items() if n < 50}
    assert rare, "expected some rare tags (e.g. INTJ) in the shipped data"
    kept = mp.pos_dataset(min_count=50)
    assert set(kept.classes) == set(counts) - rare
    assert kept.n_examples == sum(n for n in counts.values() if n >= 50)
    small = kept.sample(300, seed=1)
    assert 250 <= small.n_examples <= 300
    assert small.texts == kept.sample(300, seed=1).texts != kept.sample(300, seed=2).texts
    assert len(small.to_frame()) == small.n_examples


def test_templated_pos_labels_are_the_slot_tags() -> None:
    ds = mp.templated_dataset("pos", n=200, seed=0)
    assert ds.words is not None
    inverse: dict[str, set[str]] = {}
    for slot, words in _WORDS.items():
        for w in words:
            inverse.setdefault(w, set()).add(_TAG.get(slot, slot))
    seen = set()
    for text, spans, labels in zip(ds.texts, ds.words, ds.labels, strict=True):
        for (a, b), label in zip(spans, labels, strict=True):
            word = text[a:b]
            expected = {"PUNCT"} if word == "." else inverse.get(word) or inverse[word.lower()]
            assert label in expected, (word, label)
            seen.add(label)
    assert len(seen) >= 12
    assert (
        mp.templated_dataset("pos", n=50, seed=3).texts
        == mp.templated_dataset("pos", n=50, seed=3).texts
    )


def test_templated_number_labels_follow_the_subject_not_the_attractor() -> None:
    ds = mp.templated_dataset("number", n=400, seed=0)
    plural = {p for _, p in _SUBJECTS}
    plural_attr = {p for _, p in _ATTRACTORS}
    combos = set()
    for text, label, group in zip(ds.texts, ds.labels, ds.groups or (), strict=True):
        words = text.split()
        assert label == ("plural" if words[1] in plural else "singular")
        assert words[1] in (group, dict(_SUBJECTS)[group])  # group: the subject's singular
        combos.add((label, words[-1] in plural_attr))
    assert len(combos) == 4  # the attractor's number varies independently of the label


def test_country_dataset_prompts_ask_about_their_label() -> None:
    ds = mp.country_dataset(n_countries=5, shots=(0, 2), seed=1)
    assert len(ds) == 5 * 4 * 2  # countries x templates x shot counts
    assert ds.level == "text" and set(ds.counts().values()) == {8}
    for text, label in zip(ds.texts, ds.labels, strict=True):
        assert label in text.splitlines()[-2]  # the question line of the last item
    cap = mp.country_dataset(target="is_capital", n_countries=6, shots=(0, 1))
    assert cap.counts() == {1: 12, 0: 12}
    for text, label in zip(cap.texts, cap.labels, strict=True):
        assert ("capital" in text) == (label == 1)


def test_probing_dataset_validates() -> None:
    with pytest.raises(ValueError, match="1 class"):
        mp.ProbingDataset("t", ["a", "b"], ["x", "x"])
    with pytest.raises(ValueError, match="2 texts but 1 labels"):
        mp.ProbingDataset("t", ["a", "b"], ["x"])
    with pytest.raises(ValueError, match="has 2 words but 1 labels"):
        mp.ProbingDataset("t", ["a b", "c"], [("x",), ("y",)], "word")
    with pytest.raises(ValueError, match="overlaps"):
        mp.ProbingDataset("t", ["ab c"], [("x", "y")], "word", (((0, 2), (1, 3)),))
    with pytest.raises(TypeError, match="mixes str and int"):
        mp.ProbingDataset("t", ["a", "b"], ["x", 1])
    with pytest.raises(ValueError, match="non-empty"):
        mp.ProbingDataset("t", ["a", " "], ["x", "y"])
    with pytest.raises(ValueError, match="no texts"):
        mp.ProbingDataset("t", [], [])


def test_load_labels_formats_and_round_trip(tmp_path: Path) -> None:
    csv_text = tmp_path / "t.csv"
    csv_text.write_text("text,label,group\nI ran,past,run\nI run,present,run\nShe sang,past,sing\n")
    ds = mp.load_labels(csv_text)
    assert ds.level == "text" and ds.labels == ("past", "present", "past")
    assert ds.groups == ("run", "run", "sing")
    csv_words = tmp_path / "w.csv"
    csv_words.write_text("text,labels\nthe cat sat,DET NOUN VERB\na dog,DET NOUN\n")
    words = mp.load_labels(csv_words)
    assert words.level == "word" and words.labels[1] == ("DET", "NOUN")
    # Either spelling of the group column, at either level (it was ignored at word level).
    csv_words.write_text("text,labels,group\nthe cat,DET NOUN,THE CAT\na dog,DET NOUN,A DOG\n")
    assert mp.load_labels(csv_words).groups == (("THE", "CAT"), ("A", "DOG"))
    csv_text.write_text("text,label,groups\nI ran,past,run\nI run,present,run\n")
    assert mp.load_labels(csv_text).groups == ("run", "run")
    # Cells are stripped (" past" was a class of its own), a byte-order mark is no part of the
    # first column's name (refused as '\ufefftext'), TSV reads as CSV does, and "null" leaves a
    # word out as JSON's null does (it was a class named "null").
    csv_text.write_bytes("\ufefftext,label\nI ran, past\nI run,present \n".encode())
    assert mp.load_labels(csv_text).labels == ("past", "present")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("text\tlabels\nI ran, quickly\tPRON VERB null\nyou go\tPRON VERB\n")
    tabbed = mp.load_labels(tsv)
    assert tabbed.texts[0] == "I ran, quickly" and tabbed.labels[0] == ("PRON", "VERB", None)
    assert tabbed.classes == ("PRON", "VERB") and tabbed.n_examples == 4
    csv_text.write_text("text,label,group\nI ran,past,run\nI run,present,\n")  # a blank cell
    with pytest.raises(ValueError, match=r"records \[1\] have no 'group'"):
        mp.load_labels(csv_text)
    js = tmp_path / "w.json"
    js.write_text(json.dumps([
        {"words": ["Hi", ",", "you"], "spaces": [False, True, False], "labels": ["INTJ", None, "PRON"]},
        {"text": "go home", "labels": ["VERB", "NOUN"]},
    ]))  # fmt: skip
    loaded = mp.load_labels(js)
    assert loaded.texts[0] == "Hi, you" and loaded.words is not None
    assert loaded.words[0] == ((0, 2), (2, 3), (4, 7)) and loaded.n_examples == 4
    back = mp.ProbingDataset.load(loaded.save(tmp_path / "again.jsonl"))
    assert (back.texts, back.labels, back.words, back.groups) == (
        loaded.texts, loaded.labels, loaded.words, loaded.groups,
    )  # fmt: skip
    pos = mp.pos_dataset().subset(range(20))
    again = mp.load_labels(pos.save(tmp_path / "pos.jsonl"))
    assert (again.texts, again.labels, again.words, again.groups) == (
        pos.texts, pos.labels, pos.words, pos.groups,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("text,label\na,x\nb,x\n", ".csv", "1 class"),
        ("sentence,label\na,x\n", ".csv", "has columns"),
        ("text,labels\na b,X\nc,Y\n", ".csv", "2 words but 1 labels"),
        ('[{"text": "a", "label": "x"}, {"text": "b", "labels": ["y"]}]', ".json", "mix"),
        ('{"text": "a"}', ".json", "list of JSON objects"),
        ("[{", ".json", "not valid JSON"),
        ('[{"label": "x"}]', ".json", "no 'text'"),
        ("[]", ".json", "no records"),
        (
            '[{"text": "a", "label": "x", "group": "a"}, {"text": "b", "label": "y"}]',
            ".json",
            r"records \[1\] have no 'group'",
        ),
        # Each of these loaded silently: a blank label as the class '', an unquoted comma's
        # second half as the label (the real one dropped); now an error naming the line.
        ("text,label\nI ran,past\nI run,\nyou go,present\n", ".csv", "line 3: the label cell"),
        ("text,label\nI ran, quickly,past\nI run,present\n", ".csv", "line 2 has 3 cell"),
        ("text,label\nI ran,past\nI run\n", ".csv", "line 3 has 1 cell"),
        ('{"text": "a", "label": "x"}\n{"text": "b", "label"', ".jsonl", "line 2 is not valid"),
        ('[{"words": ["a", "b"], "spaces": [true], "labels": ["x", "y"]}]', ".json", "'spaces'"),
        ("text\tlabel\na\tb\n", ".txt", "suffix '.txt' does not say the format"),
    ],
)
def test_load_labels_errors(tmp_path: Path, content: str, suffix: str, match: str) -> None:
    path = tmp_path / f"labels{suffix}"
    path.write_text(content)
    with pytest.raises((ValueError, TypeError), match=match):
        mp.load_labels(path)
    with pytest.raises(FileNotFoundError, match="No label file"):
        mp.load_labels(tmp_path / "missing.json")


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_a_label_file_that_is_not_utf8_is_named_in_the_error(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"latin1{suffix}"
    record = {".csv": "text,label\nCaf\u00e9 ouvert,x\nb,y\n"}.get(
        suffix, '[{"text": "Caf\u00e9", "label": "x"}, {"text": "b", "label": "y"}]'
    )
    path.write_bytes(record.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path} is not UTF-8 text \\(byte \\d+"):
        mp.load_labels(path)


def test_datasets_have_a_short_repr_and_a_summary() -> None:
    ds = mp.pos_dataset()
    assert repr(ds).startswith("ProbingDataset('pos', ") and len(repr(ds)) < 120
    table = ds.summary()
    assert table["examples"].sum() == ds.n_examples and table["share"].sum() == pytest.approx(1)
    assert list(table["label"]) == list(ds.counts())
    with pytest.warns(DeprecationWarning, match="positions"):
        assert ds.select == "word_last"


def test_collect_reads_dataset_labels_and_groups(tiny: Any) -> None:
    ds = mp.templated_dataset("pos", n=6, seed=0)
    acts = mp.collect(tiny, ds, "resid_post", progress=False)
    assert acts.labels is not None and acts.groups is not None
    assert acts.labels.tolist() == [label for row in ds.labels for label in row]
    assert acts.groups.tolist() == [g for row in ds.groups or () for g in row]
    with pytest.raises(ValueError, match="come from the ProbingDataset"):
        mp.collect(tiny, ds, "resid_post", labels=["x"] * 6, progress=False)


def test_cli_probe_writes_result_figure_and_summary(tmp_path: Path, capsys: Any) -> None:
    from mechprobe.cli import main
    from mechprobe.probing._layerwise import ProbeResult

    out = tmp_path / "run"
    code = main(
        ["probe", "--dataset", "templated_pos", "--out", str(out), "--model", "tiny",
         "--max-examples", "150", "--max-iter", "10", "--quiet"]
    )  # fmt: skip
    assert code == 0
    result = ProbeResult.load(out / "result.json")
    summary = json.loads((out / "summary.json").read_text())
    assert result.n_examples == summary["n_examples"] <= 150 and len(result.layers) == 3
    assert summary["positions"] == "word_last" and (out / "probe.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "majority baseline" in printed and printed.count("\n") >= 5
    # classes counts the rows probed, as n_examples does (it counted texts: 400 beside 2,072 rows)
    assert sum(summary["classes"].values()) == summary["n_examples"]
    every = tmp_path / "every"
    args = ["probe", "--dataset", "number", "--positions", "all", "--model", "tiny"]
    assert (
        main([*args, "--max-examples", "40", "--max-iter", "10", "--quiet", "--out", str(every)])
        == 0
    )
    summary = json.loads((every / "summary.json").read_text())
    assert sum(summary["classes"].values()) == summary["n_examples"] > 40
    assert main(["probe", "--dataset", str(tmp_path / "nope.csv"), "--out", str(out)]) == 2
    # A run refused after its folder was made (a layer out of range) leaves no empty folder.
    fresh = tmp_path / "refused"
    args = ["probe", "--dataset", "templated_pos", "--out", str(fresh), "--model", "tiny"]
    assert main([*args, "--layers", "7", "--max-examples", "50", "--quiet"]) == 2
    assert not fresh.exists()


def test_save_writes_the_format_its_name_says(tmp_path) -> None:
    # save("x.json") wrote JSONL, which load then refused as invalid JSON; "x.npz" too.
    data = mp.pos_dataset().subset(range(5))
    for name in ("d.jsonl", "d.json"):
        back = mp.ProbingDataset.load(data.save(tmp_path / name))
        assert (back.texts, back.labels, back.words) == (data.texts, data.labels, data.words)
    assert json.loads((tmp_path / "d.json").read_text(encoding="utf-8"))[0]["text"] == data.texts[0]
    # The name and description came back as the file's stem and "labels from <path>".
    named = mp.ProbingDataset("my name", ("Hi", "Ho"), (1, 0), description="hand-made")
    for name in ("n.jsonl", "n.json"):
        back = mp.ProbingDataset.load(named.save(tmp_path / name))
        assert (back.name, back.description, back.labels) == ("my name", "hand-made", (1, 0))
        assert mp.load_labels(tmp_path / name, name="other").name == "other"
    assert mp.ProbingDataset.load(data.save(tmp_path / "d.json")).name == data.name == "pos"
    with pytest.raises(ValueError, match=r"name it \*\.jsonl or \*\.json, not 'd\.npz'"):
        data.save(tmp_path / "d.npz")
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        data.save(tmp_path / "missing" / "d.jsonl")


def test_a_sample_says_what_it_kept_of_the_dataset():
    # Review 31a F3: a 24-sentence sample still described itself as "817 sentences ...".
    whole = mp.pos_dataset()
    part = whole.sample(300, seed=0)
    assert part.description.startswith(whole.description)
    assert part.description.endswith(f"({len(part)} of its {len(whole)} texts)")
    assert whole.subset(range(len(whole))).description == whole.description  # all kept
