"""Word2vec-style arithmetic: checked against a plain numpy computation on planted spaces."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mechprobe.core import token_texts
from mechprobe.relational._analogy import AnalogyResult, analogy, offset_accuracy
from mechprobe.tasks._task import Task


class _WordTokenizer:
    """Word-level stand-in for an HF tokenizer: each space-prefixed word is one token."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.ids = {w: i for i, w in enumerate(words)}

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict[str, Any]:
        return {"input_ids": [[self.ids[w] for w in re.findall(r"\s*\S+", t)] for t in texts]}

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids)


class _FakeModel:
    def __init__(self, words: list[str], W_E: np.ndarray, W_U: np.ndarray | None = None) -> None:
        self.tokenizer = _WordTokenizer(words)
        self.W_E = torch.nn.Parameter(torch.as_tensor(W_E, dtype=torch.float32))
        self.W_U = torch.nn.Parameter(
            torch.as_tensor(W_E.T if W_U is None else W_U, dtype=torch.float32)
        )


N_PAIRS = 40


def _planted(
    noise: float = 0.3, seed: int = 0, extra: int = 60, scale: float = 1.5
) -> tuple[_FakeModel, Task]:
    """Countries c_i, capitals c_i + shared offset + noise, and unrelated filler tokens."""
    rng = np.random.default_rng(seed)
    d = 16
    countries = rng.normal(size=(N_PAIRS, d))
    offset = rng.normal(size=d) * scale
    capitals = countries + offset + noise * rng.normal(size=(N_PAIRS, d))
    filler = rng.normal(size=(extra, d))
    words = (
        [f" country{i}" for i in range(N_PAIRS)]
        + [f" capital{i}" for i in range(N_PAIRS)]
        + [f" filler{i}" for i in range(extra)]
        + [" City"]
    )
    W_E = np.concatenate([countries, capitals, filler, rng.normal(size=(1, d))])
    items = [[f"country{i}", f"capital{i}"] for i in range(N_PAIRS)]
    task = _task("planted", items, "Q: {input}?\nA:")
    return _FakeModel(words, W_E), task


def _task(name: str, items: list[list[str]], template: str = "{input}") -> Task:
    return Task.from_dict(
        {"name": name, "kind": "abstractive", "template": template, "shots": [], "items": items}
    )


def _unit(m: np.ndarray) -> np.ndarray:
    return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)


def _numpy_offset_ranks(
    E: np.ndarray, fit: list[tuple[int, int]], ev: list[tuple[int, int]], use_offset: bool
) -> list[int]:
    """Rank of each answer among all tokens but the argument, computed item by item."""
    U = _unit(E.astype(np.float64))
    offset = np.mean([U[ans] - U[arg] for arg, ans in fit], axis=0)
    ranks = []
    for arg, ans in ev:
        q = U[arg] + (offset if use_offset else 0.0)
        cos = U @ (q / np.linalg.norm(q))
        cos[arg] = -np.inf
        ranks.append(int(np.sum(cos > cos[ans])))
    return ranks


def _pairs(task: Task, model: _FakeModel) -> list[tuple[int, int]]:
    ids = model.tokenizer.ids
    return [(ids[" " + i.argument], ids[" " + i.output]) for i in task.items]


# --- analogy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", [True, False])
def test_analogy_matches_numpy_3cosadd(exclude: bool) -> None:
    model, _ = _planted()
    E = model.W_E.detach().numpy().astype(np.float64)
    U = _unit(E)
    a, b, c = 45, 5, 7  # capital5 - country5 + country7
    q = U[a] - U[b] + U[c]
    cos = U @ (q / np.linalg.norm(q))
    if exclude:
        cos[[a, b, c]] = -np.inf
    order = np.argsort(-cos)[:10]
    got = analogy(model, "capital5", "country5", "country7", exclude_inputs=exclude)
    assert [t for t, _ in got] == [model.tokenizer.words[i] for i in order]
    np.testing.assert_allclose([v for _, v in got], cos[order], atol=1e-5)
    if exclude:
        assert got[0][0] == " capital7"  # the planted offset solves the analogy


def test_analogy_words_with_and_without_space_and_ids_agree() -> None:
    model, _ = _planted()
    by_word = analogy(model, "capital5", "country5", "country7", top_k=3)
    assert analogy(model, " capital5", " country5", " country7", top_k=3) == by_word
    assert analogy(model, 45, 5, 7, top_k=3) == by_word


def test_unembed_space_uses_the_columns_of_W_U() -> None:
    model, _ = _planted()
    rng = np.random.default_rng(5)
    W_U = rng.normal(size=(16, model.W_E.shape[0]))
    untied = _FakeModel(model.tokenizer.words, model.W_E.detach().numpy(), W_U)
    U = _unit(W_U.T)
    q = U[45] - U[5] + U[7]
    cos = U @ (q / np.linalg.norm(q))
    cos[[45, 5, 7]] = -np.inf
    got = analogy(untied, 45, 5, 7, space="unembed", top_k=4)
    assert [t for t, _ in got] == [untied.tokenizer.words[i] for i in np.argsort(-cos)[:4]]
    assert got != analogy(untied, 45, 5, 7, space="embed", top_k=4)


def test_analogy_on_a_tiny_bridge_with_token_ids() -> None:
    from mechprobe.core._models import tiny_model

    model = tiny_model()
    U = _unit(model.W_E.detach().numpy().astype(np.float64))
    q = U[80] - U[81] + U[82]
    cos = U @ (q / np.linalg.norm(q))
    cos[[80, 81, 82]] = -np.inf
    best = np.argsort(-cos)[:5]
    got = analogy(model, 80, 81, 82, top_k=5)
    assert [t for t, _ in got] == token_texts(model.tokenizer, best)
    np.testing.assert_allclose([v for _, v in got], cos[best], atol=1e-5)
    # Tied embeddings: both spaces give the same answer.
    assert analogy(model, 80, 81, 82, top_k=5, space="unembed") == got


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"space": "residual"}, ValueError, "space must be 'embed'"),
        ({"top_k": 0}, ValueError, "top_k must be a positive int"),
    ],
)
def test_analogy_rejects_bad_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model, _ = _planted()
    with pytest.raises(error, match=message):
        analogy(model, 1, 2, 3, **kwargs)


def test_bad_words_and_ids_are_rejected() -> None:
    model, _ = _planted()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        analogy(model, 10_000, 2, 3)
    with pytest.raises(TypeError, match="non-empty word or an int"):
        analogy(model, "", 2, 3)


# --- offset accuracy ---------------------------------------------------------------------------


@pytest.mark.parametrize("held_out", [True, False])
def test_offset_ranks_match_numpy(held_out: bool) -> None:
    model, task = _planted(noise=1.0)
    result = offset_accuracy(model, task, held_out=held_out, test_size=0.25, seed=3)
    fit_task, ev_task = task.split(0.25, seed=3) if held_out else (task, task)
    E = model.W_E.detach().numpy()
    fit, ev = _pairs(fit_task, model), _pairs(ev_task, model)
    assert list(result.offset_ranks) == _numpy_offset_ranks(E, fit, ev, use_offset=True)
    assert list(result.baseline_ranks) == _numpy_offset_ranks(E, fit, ev, use_offset=False)
    assert result.n_fit == len(fit) and len(result.answers) == len(ev)
    assert list(result.answers) == [" " + i.output for i in ev_task.items]
    assert result.seed == 3  # the result says how to reproduce it


def test_planted_offset_beats_the_baseline() -> None:
    # A large offset moves capitals away from their countries, so the baseline mostly fails.
    model, task = _planted(noise=0.3, scale=3.0)
    result = offset_accuracy(model, task)
    assert result.top1 >= 0.9
    assert result.baseline_top1 <= 0.2
    assert result.top5 >= result.top1 and result.baseline_top5 >= result.baseline_top1
    summary = result.metrics()
    assert summary["n_eval"] == 10 and summary["n_fit"] == 30 and summary["n_dropped"] == 0
    assert summary["mrr"] > summary["baseline_mrr"]
    assert result.summary().iloc[0].to_dict() == summary  # the same numbers, as a table


def test_answer_candidates_restrict_the_ranking() -> None:
    model, task = _planted(noise=2.0)
    vocab = offset_accuracy(model, task, held_out=False)
    closed = offset_accuracy(model, task, held_out=False, candidates="answers")
    assert all(c <= v for c, v in zip(closed.offset_ranks, vocab.offset_ranks, strict=True))
    assert max(closed.offset_ranks) < N_PAIRS
    assert all(p.startswith(" capital") for p in closed.offset_predictions)


def test_items_sharing_argument_and_answer_first_token_are_dropped() -> None:
    model, task = _planted()
    items = [[i.input, i.output] for i in task.items]
    # " country3 City" starts with the argument's token " country3": excluding the argument
    # would exclude the answer, so the item is left out (like " Mexico" -> " Mexico City").
    items.append(["x", "country3 City", "country3"])
    result = offset_accuracy(model, _task("p", items))
    assert result.n_dropped == 1
    assert result.n_fit + len(result.answers) == N_PAIRS


def test_too_few_usable_items_is_an_error_that_says_why() -> None:
    model, _ = _planted()
    items = [["country1", "country1 City"], ["country2", "country2 City"], ["country3", "capital3"]]
    task = _task("same", items)
    with pytest.raises(
        ValueError, match=r"Only 1 distinct token pairs among 3 items .* first token differs"
    ):
        offset_accuracy(model, task)


def test_result_frame_plot_and_json_round_trip(tmp_path: Path) -> None:
    model, task = _planted()
    result = offset_accuracy(model, task)
    frame = result.to_frame()
    assert len(frame) == 2 * len(result.answers)
    assert set(frame["condition"]) == {"offset", "baseline"}
    assert frame["answer_token"].tolist()[: len(result.answers)] == list(result.answers)
    offset_rows = frame[frame["condition"] == "offset"]
    assert offset_rows["correct"].mean() == pytest.approx(result.top1)
    assert isinstance(result.plot(), Figure)
    path = result.save(tmp_path / "r.json")
    assert AnalogyResult.load(path) == result
    with pytest.warns(DeprecationWarning, match="save"):
        old = result.to_json(tmp_path / "old.json")
    with pytest.warns(DeprecationWarning, match="load"):
        assert AnalogyResult.from_json(old) == result


def test_single_token_keeps_only_one_token_words() -> None:
    model, task = _planted()
    items = [[i.input, i.output] for i in task.items] + [["country3 City", "capital3 City"]]
    # The two-token pair counts with first tokens, and is dropped with single_token=True.
    extended = _task("p", items)
    assert offset_accuracy(model, extended).n_dropped == 0
    assert offset_accuracy(model, extended, single_token=True).n_dropped == 1
    with pytest.raises(ValueError, match="single_token=False"):
        offset_accuracy(model, _task("q", [["country1 City", "capital1"]]), single_token=True)


def test_repeated_token_pairs_are_counted_once() -> None:
    model, task = _planted()
    items = [[i.input, i.output] for i in task.items]
    # Two more items with country7's and country8's token pairs (other inputs, same tokens).
    items += [["again7", "capital7", "country7"], ["again8", "capital8", "country8"]]
    result = offset_accuracy(model, _task("p", items), held_out=False)
    assert result.n_duplicates == 2 and result.n_dropped == 0
    assert len(result.answers) == N_PAIRS
    plain = offset_accuracy(model, task, held_out=False)
    assert result == dataclasses.replace(plain, task="p", n_duplicates=2)
