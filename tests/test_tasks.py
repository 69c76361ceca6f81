"""Relational task files: rendering, validation, built-in data, serialisation."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest

import mechprobe as mp
from mechprobe.tasks._task import Task, TaskItem, list_tasks, load_task

BUILTINS = [
    "capitals",
    "capitals_extractive",
    "colors_extractive",
    "past_tense",
    "past_tense_extractive",
    "uppercase",
]
COLORS = {
    "red",
    "blue",
    "green",
    "yellow",
    "black",
    "white",
    "brown",
    "orange",
    "purple",
    "pink",
    "grey",
    "silver",
    "gold",
}


def _toy(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "toy",
        "kind": "abstractive",
        "template": "Q: capital of {input}?\nA:",
        "shots": [["France", "Paris"], ["Japan", "Tokyo"]],
        "items": [["Poland", "Warsaw"], ["the Netherlands", "Amsterdam", "Netherlands"]],
    }
    data.update(changes)
    return data


def _word(text: str, prompt: str) -> bool:
    """Whether ``text`` occurs in ``prompt`` as whole words (so "Tunis" is not in "Tunisia")."""
    return re.search(rf"(?<!\w){re.escape(text)}(?!\w)", prompt) is not None


def _regular_pasts(verb: str) -> set[str]:
    """Every spelling the -ed rule could give (plain, -e, consonant+y, doubled consonant)."""
    return {verb + "ed", verb + "d", verb[:-1] + "ied", verb + verb[-1] + "ed"}


# --- rendering ---------------------------------------------------------------------------------


def test_prompt_follows_the_issue_formula_exactly() -> None:
    task = Task.from_dict(_toy(separator="||"))
    expected = (
        "Q: capital of France?\nA:" + " " + "Paris" + "||"
        "Q: capital of Japan?\nA:" + " " + "Tokyo" + "||"
        "Q: capital of Poland?\nA:"
    )
    assert task.prompts()[0] == expected
    assert task.prompt("Poland") == expected
    assert task.answers() == [" Warsaw", " Amsterdam"]
    assert task.arguments() == [" Poland", " Netherlands"]
    assert task.inputs() == ["Poland", "the Netherlands"]
    assert task.separator == "||"


def test_separator_defaults_to_newline_and_zero_shots_is_the_bare_template() -> None:
    task = Task.from_dict(_toy())
    assert task.separator == "\n"
    assert task.prompts()[0].startswith("Q: capital of France?\nA: Paris\nQ: capital of Japan?")
    assert task.with_shots(0).prompts() == [
        "Q: capital of Poland?\nA:",
        "Q: capital of the Netherlands?\nA:",
    ]
    assert task.with_shots(1).prompt("X") == "Q: capital of France?\nA: Paris\nQ: capital of X?\nA:"


def test_merullo_past_tense_prompt_is_reproduced_verbatim() -> None:
    task = load_task("past_tense").with_shots(1)
    assert (
        task.prompt("abolish")
        == "Today I abandon. Yesterday I abandoned. Today I abolish. Yesterday I"
    )


def test_merullo_capitals_prompt_is_reproduced_verbatim() -> None:
    task = load_task("capitals").with_shots(1)
    assert task.prompt("Poland") == (
        "Q: What is the capital of France?\nA: Paris\nQ: What is the capital of Poland?\nA:"
    )
    assert task.answers()[task.inputs().index("Poland")] == " Warsaw"


def test_items_are_task_items_with_the_argument_defaulting_to_the_input() -> None:
    task = Task.from_dict(_toy())
    assert task.items[0] == TaskItem("Poland", "Warsaw", "Poland")
    assert task.items[1].argument == "Netherlands"
    assert len(task) == 2


def test_an_input_written_with_its_own_space_has_the_bare_word_as_argument() -> None:
    """A template "capital of{input}?" with inputs " Poland": the argument was "  Poland" (its
    first token a space), so every argument rank tracked a whitespace token."""
    spaced = Task.from_dict(
        {"name": "caps", "kind": "abstractive", "template": "capital of{input}?",
         "shots": [[" France", "Paris"]], "items": [[" Poland", "Warsaw"]]}
    )  # fmt: skip
    assert spaced.prompts()[0].endswith("capital of Poland?")
    assert spaced.arguments() == [" Poland"] and spaced.items[0].argument == "Poland"
    assert Task.from_dict(spaced.to_dict()).items == spaced.items  # the round trip keeps it


# --- derived tasks -----------------------------------------------------------------------------


def test_with_shots_keeps_the_first_shots_and_rejects_too_many() -> None:
    task = load_task("capitals")
    three = task.with_shots(3)
    assert three.shots == task.shots[:3]
    assert three.items == task.items
    with pytest.raises(ValueError, match="between 0 and 5"):
        task.with_shots(6)


def test_subset_is_deterministic_ordered_and_accepts_indices() -> None:
    task = load_task("capitals")
    a, b, c = task.subset(20, seed=1), task.subset(20, seed=1), task.subset(20, seed=2)
    assert a == b and a != c
    positions = [task.inputs().index(x) for x in a.inputs()]
    assert positions == sorted(positions) and len(set(positions)) == 20
    assert task.subset([3, 0]).inputs() == [task.inputs()[3], task.inputs()[0]]
    with pytest.raises(ValueError, match="between 1 and"):
        task.subset(10_000)
    with pytest.raises(ValueError, match="out of range"):
        task.subset([10_000])
    with pytest.raises(ValueError, match="each index once"):
        task.subset([1, 1])


def test_split_is_a_disjoint_cover_of_the_items() -> None:
    task = load_task("past_tense")
    train, test = task.split(0.25, seed=3)
    assert len(test) == round(0.25 * len(task))
    assert set(train.inputs()).isdisjoint(test.inputs())
    assert sorted(train.items + test.items) == sorted(task.items)
    assert train.shots == task.shots
    assert task.split(0.25, seed=3) == (train, test)
    assert len(task.split(10)[1]) == 10
    with pytest.raises(ValueError, match="both need at least one"):
        task.split(len(task))
    # More than the task holds read "leaves 200 test and -35 train items".
    with pytest.raises(ValueError, match=rf"asks for {len(task) + 5} test items; .* 1 to"):
        task.split(len(task) + 5)
    with pytest.raises(ValueError, match="fraction"):
        task.split(1.5)


def test_numpy_and_tensor_counts_are_counts() -> None:
    # split(np.int64(3)) was refused as "must be a fraction in (0, 1) or an int" (review 28b F7).
    import numpy as np
    import torch

    task = load_task("past_tense")
    for count in (np.int64(3), np.int32(3), torch.tensor(3)):
        assert task.split(count, seed=1) == task.split(3, seed=1)
        assert task.subset(count, seed=1) == task.subset(3, seed=1)
    with pytest.raises(TypeError, match="not a bool"):
        task.split(np.bool_(True))


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"colour": "red"}, ValueError, r"unknown fields \['colour'\]; remove them"),
        ({"kind": "recall"}, ValueError, "use 'abstractive'"),
        ({"template": "capital of X?"}, ValueError, r"no '\{input\}'; put '\{input\}'"),
        ({"template": "{input} of {country}"}, ValueError, r"\['\{country\}'\].*only a plain"),
        ({"template": "{input!r}"}, ValueError, "only a plain"),
        ({"template": "{input} {"}, ValueError, "literal braces"),
        # The task adds the space before each answer: "A: " made "A:  Kabul" in every shot.
        ({"template": "Q: capital of {input}?\nA: "}, ValueError, "ends in whitespace"),
        ({"items": []}, ValueError, "no items: add at least one"),
        (
            {"items": [["a", "A"], ["a", "B"]]},
            ValueError,
            "repeats items\\[0\\]; keep each input once",
        ),
        ({"shots": [["a", "A"], ["a", "B"]]}, ValueError, "repeats shots\\[0\\]"),
        ({"items": [["a", 1]]}, TypeError, "write it as a JSON string"),
        ({"items": [["a"]]}, ValueError, "must be a list of 2 strings"),
        ({"items": [["a", "A", "x", "y"]]}, ValueError, "must be a list of 2 strings"),
        ({"items": "a"}, TypeError, "must be a list of"),
        ({"items": [["a", ""]]}, ValueError, "output is empty; give it some text"),
        ({"items": [["a", " A"]]}, ValueError, "surrounding whitespace; store it without"),
        ({"items": [["a", "A", "x "]]}, ValueError, "argument 'x ' has surrounding whitespace"),
        ({"name": ""}, ValueError, "name is empty"),
        ({"name": 3}, TypeError, "name must be a string"),
        ({"separator": None}, TypeError, "separator must be a string"),
        ({"description": ["x"]}, TypeError, "description must be a string"),
    ],
)
def test_validation_errors_name_the_problem_and_the_fix(
    changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Task.from_dict(_toy(**changes))


@pytest.mark.parametrize("field", ["name", "kind", "template", "shots", "items"])
def test_missing_fields_are_named_with_the_format(field: str) -> None:
    data = _toy()
    del data[field]
    with pytest.raises(
        ValueError, match=rf"missing fields \['{field}'\]\. A task file is one JSON"
    ):
        Task.from_dict(data)


def test_a_non_object_is_rejected() -> None:
    with pytest.raises(TypeError, match="must be a JSON object"):
        Task.from_dict([1, 2])  # type: ignore[arg-type]


def test_shots_overlapping_items_warn_but_load() -> None:
    with pytest.warns(UserWarning, match=r"share inputs \['Poland'\].*Remove them"):
        task = Task.from_dict(_toy(shots=[["Poland", "Warsaw"]]))
    assert task.prompts()[0].count("Warsaw") == 1


def test_escaped_braces_are_literal() -> None:
    task = Task.from_dict(_toy(template="{{x}} {input} ->", shots=[]))
    assert task.prompts()[0] == "{x} Poland ->"


# --- built-in data -----------------------------------------------------------------------------


def test_list_tasks_names_every_builtin() -> None:
    assert list_tasks() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_validates_and_is_large_enough(name: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no shot/item overlap in shipped data
        task = load_task(name)
    assert task.name == name
    assert len(task) >= 150
    assert len(task.shots) >= 3
    assert task.description.strip() == task.description and len(task.description) > 100
    assert len(set(task.inputs())) == len(task)
    assert set(task.inputs()).isdisjoint(s.input for s in task.shots)
    assert (task.kind == "extractive") == name.endswith("_extractive")


@pytest.mark.parametrize("name", [n for n in BUILTINS if n.endswith("_extractive")])
def test_extractive_items_contain_their_answer_in_their_own_part(name: str) -> None:
    task = load_task(name)
    for item in task.items:
        own = task.template.format(input=item.input)
        assert _word(item.output, own), item


@pytest.mark.parametrize("name", ["capitals", "past_tense", "uppercase"])
def test_abstractive_items_do_not_contain_their_answer(name: str) -> None:
    task = load_task(name)
    for item, prompt in zip(task.items, task.prompts(), strict=True):
        own = task.template.format(input=item.input)
        assert not _word(item.output, own), item
        # The shots may name a shared answer ("Capitalised colour"), never this item's input.
        assert not _word(item.output, prompt) or name == "uppercase", item


def test_capitals_arguments_differ_from_answers_and_read_naturally() -> None:
    task = load_task("capitals")
    for item in task.items:
        assert item.output.split()[0] != item.argument.split()[0], item
        assert not item.argument.startswith("the "), item
        assert item.argument in item.input
    assert dict((i.argument, i.output) for i in task.items)["Netherlands"] == "Amsterdam"
    extractive = load_task("capitals_extractive")
    assert extractive.arguments() == task.arguments()
    assert extractive.answers() == task.answers()


def test_colour_tasks_share_questions_and_differ_only_in_case() -> None:
    upper, lower = load_task("uppercase"), load_task("colors_extractive")
    assert upper.inputs() == lower.inputs()
    assert [s.input for s in upper.shots] == [s.input for s in lower.shots]
    for up, low in zip(upper.items + upper.shots, lower.items + lower.shots, strict=True):
        assert low.output in COLORS and up.output == low.output.capitalize()
        assert up.argument == low.argument == low.output
        # Exactly one object has the asked colour, so the question has one answer.
        assert len(re.findall(rf"\b{low.output}\b", low.input)) == 1
        assert low.input.endswith("?")


def test_past_tense_has_many_irregular_verbs_and_correct_known_forms() -> None:
    task = load_task("past_tense")
    pairs = {i.input: i.output for i in task.items}
    irregular = [v for v, p in pairs.items() if p not in _regular_pasts(v)]
    assert len(irregular) >= 50
    assert {"go", "see"} <= {s.input for s in task.shots}
    known = {
        "bring": "brought",
        "swim": "swam",
        "teach": "taught",
        "stop": "stopped",
        "cry": "cried",
    }
    assert all(pairs[v] == p for v, p in known.items())
    assert all(v != p for v, p in pairs.items())
    extractive = load_task("past_tense_extractive")
    assert [(i.output, i.argument) for i in extractive.items] == [
        (i.output, i.input) for i in task.items
    ]


# --- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUILTINS)
def test_json_round_trip(name: str, tmp_path: Path) -> None:
    task = load_task(name)
    path = task.to_json(tmp_path / f"{name}.json")
    assert Task.from_json(path) == task
    assert load_task(path) == task
    assert json.loads(path.read_text(encoding="utf-8")) == task.to_dict()


def test_builtin_files_are_stored_in_canonical_form(tmp_path: Path) -> None:
    from importlib import resources

    for name in BUILTINS:
        shipped = (
            resources.files("mechprobe.tasks").joinpath("data", f"{name}.json").read_text("utf-8")
        )
        written = load_task(name).to_json(tmp_path / "x.json").read_text("utf-8")
        assert shipped == written, name


def test_user_file_loads_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(_toy(name="mine")), encoding="utf-8")
    task = load_task(str(path))
    assert task.name == "mine" and task.answers() == [" Warsaw", " Amsterdam"]


def test_unknown_name_lists_builtins_and_format(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"Built-in tasks: capitals, .*A task file is one JSON"):
        load_task("capitols")
    with pytest.raises(TypeError, match="task name or a path"):
        load_task(3)  # type: ignore[arg-type]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_task(bad)


def test_a_file_that_is_not_utf8_is_named_in_the_error(tmp_path: Path) -> None:
    # Latin-1 bytes for "Bogotá" (0xe1 alone is not UTF-8): the error names the file and the fix.
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps(_toy(name="latin")).replace("Warsaw", "Bogotá").encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text .*save the task file"):
        load_task(path)


def test_a_misspelt_task_name_is_answered_with_the_closest_built_ins():
    # Sites got "Did you mean"; task names only the list of built-ins (review 25a).
    with pytest.raises(ValueError, match=r"named 'capitols'\. Did you mean 'capitals'\?"):
        mp.load_task("capitols")
    with pytest.raises(ValueError, match=r"Did you mean 'past_tense'"):
        mp.score_task(mp.tiny_model(), "pasttense")
    with pytest.raises(ValueError, match=r"named 'zzz'\. Built-in tasks: capitals"):
        mp.load_task("zzz")


def test_a_prompt_with_other_shot_answers_differs_in_those_answers_only() -> None:
    # Function vectors' shuffled prompts re-rendered the task's format by hand: one renderer now.
    task = mp.load_task("capitals").with_shots(3)
    own = [s.output for s in task.shots]
    assert task.prompt("Poland", shot_outputs=own) == task.prompt("Poland")
    swapped = task.prompt("Poland", shot_outputs=[own[1], own[2], own[0]])
    expected = task.prompt("Poland")
    for k, answer in enumerate(own):  # each "A: answer\n" line swapped, the rest as rendered
        expected = expected.replace(f"A: {answer}\n", f"A: <{k}>\n")
    for k, answer in enumerate([own[1], own[2], own[0]]):
        expected = expected.replace(f"A: <{k}>\n", f"A: {answer}\n")
    assert swapped == expected != task.prompt("Poland")
    with pytest.raises(ValueError, match="one per shot"):
        task.prompt("Poland", shot_outputs=own[:2])
    with pytest.raises(TypeError, match="a character at a time"):
        task.prompt("Poland", shot_outputs="abc")  # three letters, three shots: it rendered
    with pytest.raises(TypeError, match=r"shot_outputs\[0\] must be a string"):
        task.prompt("Poland", shot_outputs=[1, 2, 3])


def _todd_prompt(demonstrations, query):
    """Todd et al.'s prompt written as their code writes it (word_pairs_to_prompt_data with its
    default prefixes and separators, prepend_space=True, then create_prompt)."""
    prefixes, separators = {"input": "Q:", "output": "A:"}, {"input": "\n", "output": "\n\n"}
    text = ""
    for given, answer in demonstrations:
        text += prefixes["input"] + " " + given + separators["input"]
        text += prefixes["output"] + " " + answer + separators["output"]
    return text + prefixes["input"] + " " + query + separators["input"] + prefixes["output"]


def _write_todd(folder, name, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps([{"input": a, "output": b} for a, b in pairs]))
    return path


def test_todd_datasets_read_as_tasks_whose_prompts_are_theirs(tmp_path) -> None:
    # Review 36a F6: Todd et al.'s own tasks could not be run; their files are lists of
    # {"input", "output"} pairs and their prompts "Q: x\nA: y\n\n".
    pairs = [(f"word{i}", f"drow{i}") for i in range(30)]
    path = _write_todd(tmp_path / "abstractive", "antonym", pairs)
    task = mp.Task.from_todd(path, seed=3)
    assert (task.name, task.kind, len(task.shots), len(task)) == ("antonym", "abstractive", 10, 20)
    assert {s.input for s in task.shots} | set(task.inputs()) == {a for a, _ in pairs}
    demos = [(s.input, s.output) for s in task.shots]
    for item, prompt in zip(task.items, task.prompts(), strict=True):
        assert prompt == _todd_prompt(demos, item.input)
    assert task.answers()[0] == " " + task.items[0].output  # scored with its leading space
    # the same file through load_task and from_json; another seed draws other demonstrations
    assert mp.load_task(path) == mp.Task.from_todd(path)
    assert mp.Task.from_json(path).shots == mp.Task.from_todd(path).shots
    assert mp.Task.from_todd(path, seed=4).shots != task.shots
    # an extractive folder gives the kind; elsewhere it must be given
    firsts = [(f"x{i}, y, z", f"x{i}") for i in range(12)]
    extractive = _write_todd(tmp_path / "extractive", "choose_first_of_3", firsts)
    assert mp.Task.from_todd(extractive, shots=2).kind == "extractive"
    elsewhere = _write_todd(tmp_path / "mine", "antonym", pairs)
    with pytest.raises(ValueError, match=r"put it in a folder of either name"):
        mp.Task.from_todd(elsewhere)
    assert mp.Task.from_todd(elsewhere, kind="abstractive", name="ant").name == "ant"


def test_todd_datasets_drop_repeats_and_refuse_what_is_not_theirs(tmp_path) -> None:
    pairs = [("Paris is big", "Paris"), ("Paris is big", "big"), ("  ", "x"), ("Rome", " Rome ")]
    pairs += [("Rome", "Rome"), ("News text. ", "World")]  # an exact repeat; a trailing space
    pairs += [(f"s{i}", f"t{i}") for i in range(4)]
    path = _write_todd(tmp_path / "extractive", "conll", pairs)
    with pytest.warns(
        UserWarning, match=r"1 pairs with an empty .*, 1 exact repeats and 1 inputs given another"
    ):
        task = mp.Task.from_todd(path, shots=2)
    rows = [(s.input, s.output) for s in task.shots + task.items]
    # inputs as written (their prompts keep the space), answers without surrounding whitespace
    assert sorted(rows) == sorted([("Paris is big", "Paris"), ("Rome", "Rome"),
                                   ("News text. ", "World")]
                                  + [(f"s{i}", f"t{i}") for i in range(4)])  # fmt: skip
    assert any("Q: News text. \nA:" in prompt for prompt in task.prompts())
    with (
        pytest.raises(ValueError, match="not more than its 7 demonstrations: no items would"),
        pytest.warns(UserWarning, match="7 pairs remain"),
    ):
        mp.Task.from_todd(path, shots=7)
    task_file = mp.load_task("capitals").to_json(tmp_path / "capitals.json")
    with pytest.raises(ValueError, match=r"not one of Todd et al\.'s datasets"):
        mp.Task.from_todd(task_file)
