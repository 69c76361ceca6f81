"""Circuit faithfulness against the same ablations written by hand: means captured with
``mp.run(capture=...)`` and averaged here, written into ``hook_z`` by a plain hook function, the
logit difference read from the logits."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hook_count
from matplotlib.figure import Figure

import mechprobe as mp

ANSWER, WRONG = 5, 6
METRIC = mp.logit_diff(ANSWER, WRONG)
# Seven tokens each (BOS and six bytes): one template.
PROMPTS = ["Hi cat", "Hi dog", "Hi cow"]
REFERENCE = ["Hi pig", "Hi rat", "Hi owl", "Hi ant"]
CIRCUIT = [mp.Site("head", 2, head=1), mp.Site("head", 1, head=3)]
OFF = {"progress": False}

# {(layer, head): positions ablated (None: every one)}
Ablated = dict[tuple[int, int], Any]


def _hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _by_hand(
    model: Any,
    prompts: list[str],
    refs: list[str],
    ablated: Ablated,
    *,
    per_position: bool = True,
    method: str = "mean",
) -> np.ndarray:
    """The metric per prompt with ``ablated`` heads set to their reference means (or zero)."""
    layers = sorted({layer for layer, _ in ablated})
    means: dict[int, torch.Tensor] = {}
    if method == "mean" and layers:
        ref = mp.run(model, refs, capture=[_hook(layer) for layer in layers], **OFF)
        for layer in layers:
            z = ref[_hook(layer)].double()  # [refs, seq, heads, d_head], zeros at padding
            if per_position:
                means[layer] = z.mean(0)  # every reference prompt as long as the prompts
            else:  # every real token but the leading BOS
                real = ref.batch.attention_mask.bool().clone()
                real[:, 0] = False  # right padding: BOS is each row's first column
                means[layer] = z[real].mean(0)  # [heads, d_head]

    def write(layer: int) -> Any:
        def fn(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            for (at, head), where in ablated.items():
                if at != layer:
                    continue
                rows = slice(None) if where is None else list(where)
                if method == "zero":
                    z[:, rows, head] = 0.0
                elif per_position:
                    z[:, rows, head] = means[layer][rows, head].to(z.dtype)
                else:
                    z[:, rows, head] = means[layer][head].to(z.dtype)
            return z

        return fn

    spec = {_hook(layer): write(layer) for layer in layers}
    out = mp.run(model, prompts, spec or None, logit_positions=-1, **OFF)
    logits = out.logits[:, -1].double()
    return (logits[:, ANSWER] - logits[:, WRONG]).numpy()


def _every_head(model: Any) -> list[tuple[int, int]]:
    return [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def _conditions(
    model: Any,
    prompts: list[str],
    refs: list[str],
    kept: Ablated,
    **how: Any,
) -> dict[str, np.ndarray]:
    """The four conditions by hand; ``kept``: the circuit, {(layer, head): kept positions}."""
    n_tokens = int(mp.tokenize(model, prompts[:1]).lengths[0])
    outside: Ablated = {}
    for key in _every_head(model):
        if key not in kept:
            outside[key] = None
        elif kept[key] is not None:
            outside[key] = [i for i in range(n_tokens) if i not in kept[key]]
    return {
        "full": _by_hand(model, prompts, refs, {}, **how),
        "circuit": _by_hand(model, prompts, refs, outside, **how),
        "empty": _by_hand(model, prompts, refs, dict.fromkeys(_every_head(model)), **how),
        "knockout": _by_hand(model, prompts, refs, dict(kept), **how),
    }


def _assert_conditions(result: mp.FaithfulnessResult, expected: dict[str, np.ndarray]) -> None:
    for condition, values in expected.items():
        np.testing.assert_allclose(
            getattr(result, condition), values, rtol=1e-4, atol=1e-4, err_msg=condition
        )


def test_each_condition_equals_the_ablations_written_by_hand(tiny: Any) -> None:
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=REFERENCE, **OFF)
    kept = {(2, 1): None, (1, 3): None}
    _assert_conditions(result, _conditions(tiny, PROMPTS, REFERENCE, kept))
    # the ablations change the metric: else this test compares nothing
    assert not np.allclose(result.full, result.empty, atol=1e-3)
    assert not np.allclose(result.circuit, result.empty, atol=1e-3)
    means = {c: float(np.mean(getattr(result, c))) for c in ("full", "circuit", "empty")}
    want = (means["circuit"] - means["empty"]) / (means["full"] - means["empty"])
    assert result.faithfulness == pytest.approx(want)
    assert result.normalised["full"] == pytest.approx(1.0)
    assert result.normalised["empty"] == 0.0
    assert result.normalised["circuit"] == result.faithfulness
    assert result.circuit_sites == ("head@2, head 1", "head@1, head 3")
    assert result.circuit_positions == ("all", "all")
    assert result.n_components == tiny.cfg.n_layers * tiny.cfg.n_heads
    assert result.prompts == tuple(PROMPTS) and result.model_name == tiny.cfg.model_name
    assert (result.metric, result.method, result.per_position) == ("logit_diff", "mean", True)


def test_the_prompts_are_their_own_reference_by_default(tiny: Any) -> None:
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, **OFF)
    kept = {(2, 1): None, (1, 3): None}
    _assert_conditions(result, _conditions(tiny, PROMPTS, PROMPTS, kept))


def test_pooled_means_differ_from_means_per_position_and_each_matches_its_hand_version(
    tiny: Any,
) -> None:
    kept = {(2, 1): None, (1, 3): None}
    # reference prompts of other lengths are fine for one pooled mean
    refs = [*REFERENCE, "Hello there", "A"]
    pooled = mp.faithfulness(
        tiny, PROMPTS, CIRCUIT, METRIC, reference=refs, per_position=False, **OFF
    )
    _assert_conditions(pooled, _conditions(tiny, PROMPTS, refs, kept, per_position=False))
    per_position = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=REFERENCE, **OFF)
    assert not np.allclose(pooled.empty, per_position.empty, atol=1e-3)
    assert not pooled.per_position and "mean ablation" in repr(pooled)


def test_zero_ablation(tiny: Any) -> None:
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, method="zero", **OFF)
    kept = {(2, 1): None, (1, 3): None}
    _assert_conditions(result, _conditions(tiny, PROMPTS, PROMPTS, kept, method="zero"))
    assert result.method == "zero" and "zero ablation" in repr(result)


@pytest.mark.parametrize("positions", [-1, [-3, -1], [0, 6]])
def test_a_circuit_site_with_positions_is_kept_there_only(tiny: Any, positions: Any) -> None:
    # Layer 1: a head of the last layer reaches the last token's logits from the last token only.
    circuit = [mp.Site("head", 2, head=1), mp.Site("head", 1, head=3, positions=positions)]
    result = mp.faithfulness(tiny, PROMPTS, circuit, METRIC, reference=REFERENCE, **OFF)
    where = [positions] if isinstance(positions, int) else positions
    kept = {(2, 1): None, (1, 3): sorted(p % 7 for p in where)}
    _assert_conditions(result, _conditions(tiny, PROMPTS, REFERENCE, kept))
    assert result.circuit_positions == ("all", mp.core.positions_text(positions))
    everywhere = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=REFERENCE, **OFF)
    assert not np.allclose(result.circuit, everywhere.circuit, atol=1e-4)


def test_groups_by_token_length_take_each_length_its_own_means(tiny: Any) -> None:
    prompts = ["Hi cat", "Hello cat", "Hi dog", "Hello dog"]  # 7 and 10 tokens, interleaved
    refs = ["Hello cow", "Hi pig", "Hello pig", "Hi rat"]
    result = mp.faithfulness(tiny, prompts, CIRCUIT, METRIC, reference=refs, **OFF)
    kept = {(2, 1): None, (1, 3): None}
    short = _conditions(tiny, prompts[0::2], refs[1::2], kept)
    long = _conditions(tiny, prompts[1::2], refs[0::2], kept)
    for condition in short:
        want = np.empty(4)
        want[0::2], want[1::2] = short[condition], long[condition]
        np.testing.assert_allclose(getattr(result, condition), want, rtol=1e-4, atol=1e-4)


def test_explicit_groups_take_the_means_of_their_own_reference_prompts(tiny: Any) -> None:
    prompts = ["Hi cat", "Yo cat", "Hi dog", "Yo dog"]  # one length, two templates
    refs = ["Hi cow", "Yo cow", "Hi pig", "Yo pig"]
    labels = (["hi", "yo", "hi", "yo"], np.array(["hi", "yo", "hi", "yo"]))
    result = mp.faithfulness(tiny, prompts, CIRCUIT, METRIC, reference=refs, groups=labels, **OFF)
    kept = {(2, 1): None, (1, 3): None}
    hi = _conditions(tiny, prompts[0::2], refs[0::2], kept)
    yo = _conditions(tiny, prompts[1::2], refs[1::2], kept)
    for condition in hi:
        want = np.empty(4)
        want[0::2], want[1::2] = hi[condition], yo[condition]
        np.testing.assert_allclose(getattr(result, condition), want, rtol=1e-4, atol=1e-4)
    # Grouped by length, the two templates share their means, with a warning (review 35a F2).
    with pytest.warns(UserWarning, match="look like several templates.*groups="):
        by_length = mp.faithfulness(tiny, prompts, CIRCUIT, METRIC, reference=refs, **OFF)
    assert not np.allclose(result.empty, by_length.empty, atol=1e-4)
    assert result.groups == ("hi", "yo", "hi", "yo") and by_length.groups[0] == "7 tokens"
    assert result.reference_prompts == tuple(refs)


def test_per_prompt_answers_and_a_metric_function(tiny: Any) -> None:
    answers, wrongs = [5, 7, 9], [6, 8, 10]
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, mp.logit_diff(answers, wrongs), **OFF)
    full = mp.run(tiny, PROMPTS, logit_positions=-1, **OFF).logits[:, -1].double()
    rows = torch.arange(3)
    np.testing.assert_allclose(
        result.full, (full[rows, answers] - full[rows, wrongs]).numpy(), rtol=1e-5, atol=1e-5
    )

    def top_logit(logits: torch.Tensor) -> torch.Tensor:
        return logits.max(-1).values

    mine = mp.faithfulness(tiny, PROMPTS, CIRCUIT, top_logit, **OFF)
    np.testing.assert_allclose(mine.full, full.max(-1).values.numpy(), rtol=1e-5, atol=1e-5)
    assert mine.metric == "top_logit"


def test_components_may_be_any_sites(tiny: Any) -> None:
    # MLPs and heads as components: the circuit keeps one MLP; "empty" ablates all of them.
    components = ["mlp_out", mp.Site("head", 2, head=1)]
    circuit = ["mlp_out@1", mp.Site("head", 2, head=1)]
    result = mp.faithfulness(tiny, PROMPTS, circuit, METRIC, components=components, **OFF)
    assert result.n_components == tiny.cfg.n_layers + 1
    # By hand: mlp_out@0 and @2 set to their per-position means over the prompts.
    ref = mp.run(tiny, PROMPTS, capture=["mlp_out"], **OFF)
    spec = {
        mp.Site("mlp_out", layer): mp.Replace(ref[mp.Site("mlp_out", layer)].mean(0))
        for layer in (0, 2)
    }
    logits = mp.run(tiny, PROMPTS, spec, logit_positions=-1, **OFF).logits[:, -1].double()
    want = (logits[:, ANSWER] - logits[:, WRONG]).numpy()
    np.testing.assert_allclose(result.circuit, want, rtol=1e-4, atol=1e-4)


def test_batch_size_changes_nothing(tiny: Any) -> None:
    prompts = ["Hi cat", "Hello cat", "Hi dog", "Hello dog", "Hi cow"]
    one = mp.faithfulness(tiny, prompts, CIRCUIT, METRIC, batch_size=1, **OFF)
    whole = mp.faithfulness(tiny, prompts, CIRCUIT, METRIC, batch_size=None, **OFF)
    pd.testing.assert_frame_equal(one.to_frame(), whole.to_frame(), rtol=1e-5, atol=1e-5)


def test_a_circuit_site_outside_the_components_is_refused_by_name(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"circuit sites \['mlp_out@1'\] are not among the 12"):
        mp.faithfulness(tiny, PROMPTS, ["mlp_out@1", CIRCUIT[0]], METRIC, **OFF)
    with pytest.raises(ValueError, match=r"\['head@1, head 3'\] are not among the 1 comp"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, components=[CIRCUIT[0]], **OFF)


def test_a_site_named_twice_or_a_component_with_positions_is_refused(tiny: Any) -> None:
    twice = [CIRCUIT[0], mp.Site("head", 2, head=1, positions=-1)]
    with pytest.raises(ValueError, match=r"circuit names head@2, head 1 twice"):
        mp.faithfulness(tiny, PROMPTS, twice, METRIC, **OFF)
    with pytest.raises(ValueError, match=r"components .* carry positions"):
        components = [mp.Site("head", 2, head=1, positions=-1)]
        mp.faithfulness(tiny, PROMPTS, [CIRCUIT[0]], METRIC, components=components, **OFF)
    with pytest.raises(ValueError, match=r"kept at positions \[9\], outside prompt 0 \(7 tokens"):
        mp.faithfulness(tiny, PROMPTS, [mp.Site("head", 2, head=1, positions=9)], METRIC, **OFF)


def test_a_group_without_reference_prompts_is_refused_by_name(tiny: Any) -> None:
    with pytest.raises(ValueError, match="group of 7-token prompts, which has no reference"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=["Hello cow"], **OFF)
    with pytest.raises(ValueError, match="group 'b', which has no reference prompt"):
        groups = (["a", "a", "b"], ["a"])
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=["Hi pig"], groups=groups,
                        **OFF)  # fmt: skip


def test_a_group_mixing_token_lengths_is_refused_by_name(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"In group 'a', prompt 0 \('Hi cat'\) has 7 tokens"):
        mp.faithfulness(tiny, ["Hi cat", "Hello cat"], CIRCUIT, METRIC,
                        groups=(["a", "a"], ["a", "a"]), **OFF)  # fmt: skip
    with pytest.raises(ValueError, match=r"reference prompt 0 .* 10"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, reference=["Hello cow"],
                        groups=(["a"] * 3, ["a"]), **OFF)  # fmt: skip


def test_groups_of_the_wrong_shape_are_refused(tiny: Any) -> None:
    with pytest.raises(
        ValueError, match="groups gives 2 prompt labels for 3 prompts: pass one label per prompt"
    ):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, groups=([1, 1], [1, 1, 1]), **OFF)
    with pytest.raises(TypeError, match=r"groups must be a pair \(prompt_groups"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, groups=["abc", "abc"], **OFF)
    with pytest.raises(TypeError, match="not hashable"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, groups=([[1]] * 3, [[1]] * 3), **OFF)


def test_bad_settings_are_refused_before_any_pass(tiny: Any) -> None:
    with pytest.raises(ValueError, match=r"method must be one of \['mean', 'zero'\]"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, method="resample", **OFF)
    with pytest.raises(TypeError, match="per_position must be True or False"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, per_position="yes", **OFF)
    with pytest.raises(TypeError, match="progress must be True or False"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, progress="no")
    with pytest.raises(TypeError, match="not a Batch"):
        mp.faithfulness(tiny, mp.tokenize(tiny, PROMPTS), CIRCUIT, METRIC, **OFF)
    with pytest.raises(ValueError, match="answer has 2 entries for 3 prompt pairs"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, mp.logit_diff([5, 6], [7, 8]), **OFF)


def test_unused_arguments_and_a_degenerate_ratio_warn(tiny: Any) -> None:
    with pytest.warns(UserWarning, match="method='zero' reads no reference prompts"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, method="zero", reference=REFERENCE, **OFF)
    with pytest.warns(UserWarning, match="groups= is read by per-position means only"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, per_position=False,
                        groups=([1] * 3, [1] * 3), **OFF)  # fmt: skip
    # One prompt, its own reference: each per-position mean is the prompt's own activation, so
    # ablating changes nothing and full equals empty; the first warning says why (review 42a).
    with pytest.warns(UserWarning) as caught:
        result = mp.faithfulness(tiny, ["Hi cat"], CIRCUIT, METRIC, **OFF)
    said = [str(w.message) for w in caught]
    assert "its group's reference prompts are this prompt itself" in said[0]
    assert any("faithfulness, a share of that difference, is NaN" in s for s in said[1:])
    assert np.isnan(result.faithfulness) and np.isnan(result.to_frame()["normalised"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repr(result), result._repr_html_(), result.plot()


def _boom(*args: Any) -> None:
    raise RuntimeError("boom")


def test_an_exception_during_the_runs_leaves_no_hooks(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = hook_count(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, lambda logits: _boom(), **OFF)
    assert hook_count(tiny) == before
    # an ablation that raises inside the forward pass, with every other ablation's hook attached
    monkeypatch.setattr(mp.Ablate, "edit_masked", lambda self, *args: _boom())
    with pytest.raises(RuntimeError, match="boom"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, **OFF)
    assert hook_count(tiny) == before


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_and_load_round_trip(tiny: Any, tmp_path: Any, suffix: str) -> None:
    circuit = [mp.Site("head", 2, head=1, positions=[-2, -1]), mp.Site("head", 1, head=3)]
    result = mp.faithfulness(tiny, PROMPTS, circuit, METRIC, reference=REFERENCE, **OFF)
    back = mp.FaithfulnessResult.load(result.save(tmp_path / f"faithfulness{suffix}"))
    assert isinstance(mp.load_result(tmp_path / f"faithfulness{suffix}"), mp.FaithfulnessResult)
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())
    pd.testing.assert_frame_equal(back.summary(), result.summary())
    for condition in ("full", "circuit", "empty", "knockout"):
        np.testing.assert_array_equal(getattr(back, condition), getattr(result, condition))
    assert back.circuit_positions == ("-2,-1", "all")
    assert (back.circuit_sites, back.prompts, back.model_name) == (
        result.circuit_sites,
        result.prompts,
        result.model_name,
    )
    assert repr(back) == repr(result)
    with pytest.raises(ValueError, match="not a readable FaithfulnessResult"):
        mp.FaithfulnessResult.load(mp.logit_lens(tiny, "Hi", **OFF).save(tmp_path / "l.json"))


def test_frames_repr_and_plot(tiny: Any) -> None:
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, **OFF)
    frame = result.to_frame()
    columns = ["condition", "site", "value", "spread", "normalised", "metric"]
    assert list(frame.columns) == columns and frame["site"].isna().all()
    assert frame["condition"].tolist() == ["full", "circuit", "empty", "knockout"]
    assert result.without is None and result.without_each == {}
    np.testing.assert_allclose(frame["value"], [np.mean(result.full), np.mean(result.circuit),
                                                np.mean(result.empty), np.mean(result.knockout)])  # fmt: skip
    np.testing.assert_allclose(frame["spread"][0], np.std(result.full, ddof=1))
    assert frame["normalised"][1] == pytest.approx(result.faithfulness)
    summary = result.summary()
    assert summary["faithfulness"][0] == pytest.approx(result.faithfulness)
    assert summary["n_components"][0] == 12 and summary["circuit_size"][0] == 2
    text = repr(result)
    assert text.startswith("FaithfulnessResult(faithfulness ") and len(text) < 300
    assert "<table" in result._repr_html_()
    figure = result.plot()
    assert isinstance(figure, Figure) and len(figure.axes[0].patches) == 4
    # into given axes
    from matplotlib.figure import Figure as NewFigure

    ax = NewFigure().add_subplot()
    assert result.plot(ax=ax) is ax.get_figure()
    with pytest.raises(ValueError, match="read-only"):  # frozen
        result.full[0] = 0.0


def test_leave_one_out_equals_the_circuit_less_each_site_written_by_hand(tiny: Any) -> None:
    """Each run ablates one circuit site everywhere and keeps the others where they are kept."""
    circuit = [mp.Site("head", 2, head=1, positions=-1), mp.Site("head", 1, head=3)]
    result = mp.faithfulness(
        tiny, PROMPTS, circuit, METRIC, reference=REFERENCE, leave_one_out=True, **OFF
    )
    plain = mp.faithfulness(tiny, PROMPTS, circuit, METRIC, reference=REFERENCE, **OFF)
    for condition in ("full", "circuit", "empty", "knockout"):  # the four runs are unchanged
        np.testing.assert_array_equal(getattr(result, condition), getattr(plain, condition))
    n_tokens = int(mp.tokenize(tiny, PROMPTS[:1]).lengths[0])
    kept: Ablated = {(2, 1): [n_tokens - 1], (1, 3): None}
    assert result.without is not None and result.without.shape == (2, len(PROMPTS))
    for k, left in enumerate(kept):
        rest = {key: where for key, where in kept.items() if key != left}
        expected = _conditions(tiny, PROMPTS, REFERENCE, rest)["circuit"]
        np.testing.assert_allclose(result.without[k], expected, rtol=1e-4, atol=1e-4)
    assert not np.allclose(result.without[1], result.circuit, atol=1e-3)  # a site that matters
    means = result.means
    share = (np.mean(result.without[1]) - means["empty"]) / (means["full"] - means["empty"])
    assert result.without_each["head@1, head 3"] == pytest.approx(share)
    frame = result.to_frame()
    rows = frame[frame["condition"] == "without"]
    assert rows["site"].tolist() == list(result.circuit_sites)
    np.testing.assert_allclose(rows["value"], result.without.mean(axis=1))
    np.testing.assert_allclose(rows["normalised"], list(result.without_each.values()))
    figure = result.plot()
    assert len(figure.axes) == 2 and len(figure.axes[1].patches) == 2
    from matplotlib.figure import Figure as NewFigure

    ax = NewFigure().add_subplot()  # into given axes: the conditions alone
    assert result.plot(ax=ax) is ax.get_figure() and len(ax.patches) == 4


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_leave_one_out_survives_save_and_load(tiny: Any, tmp_path: Any, suffix: str) -> None:
    result = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, leave_one_out=True, **OFF)
    back = mp.FaithfulnessResult.load(result.save(tmp_path / f"f{suffix}"))
    assert back.without is not None and result.without is not None
    np.testing.assert_array_equal(back.without, result.without)
    pd.testing.assert_frame_equal(back.to_frame(), result.to_frame())
    with pytest.raises(TypeError, match="leave_one_out"):
        mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, leave_one_out="yes", **OFF)  # type: ignore[arg-type]


def test_circuit_kept_at_named_positions_per_prompt(tiny: Any) -> None:
    """IOI's S2 sits at different offsets: a site kept at a named position is kept at each
    prompt's own index (prompts of one group with different indices run apart)."""
    at = [3, 4, 5]
    circuit = {mp.Site("head", 2, head=1): "X", "head@1, head 3": ["X", "END"]}
    result = mp.faithfulness(
        tiny, PROMPTS, circuit, METRIC, positions={"X": at, "END": -1}, reference=REFERENCE, **OFF
    )
    assert result.circuit_positions == ("X", "X,END")
    for i, prompt in enumerate(PROMPTS):
        kept = {(2, 1): [at[i]], (1, 3): [at[i], 6]}
        expected = _conditions(tiny, [prompt], REFERENCE, kept)
        for condition, values in expected.items():
            np.testing.assert_allclose(
                getattr(result, condition)[i], values[0], rtol=1e-4, atol=1e-4, err_msg=condition
            )
    # where the circuit is kept matters: else the comparison above could not tell positions apart
    everywhere = mp.faithfulness(tiny, PROMPTS, list(circuit), METRIC, reference=REFERENCE, **OFF)
    assert not np.allclose(everywhere.circuit, result.circuit, atol=1e-4)


@pytest.mark.parametrize(
    ("circuit", "positions", "message"),
    [
        ({"head@2, head 1": "S2"}, None, "no positions= names them"),
        ({"head@2, head 1": "S2"}, {"X": 1}, r"does not name \(it names \['X'\]\)"),
        ({"head@2, head 1": 2.5}, None, "give a name of positions="),
        ({"head@2, head 1": ["X", "X"]}, {"X": 1}, "each once"),
        ({"head@2, head 1": "X"}, {"X": [1, 2]}, r"one int per prompt \(3 here\)"),
        ({"head@2, head 1": "X"}, {"X": 9}, "is 9 for prompt 0, whose prompt has 7 tokens"),
        ({mp.Site("head", 2, head=1, positions=-1): "X"}, {"X": 1}, "carries positions"),
        ({"head@2, head 1": "X"}, [1, 2, 3], "must map names"),
    ],
)
def test_bad_named_circuit_positions_are_refused(
    tiny: Any, circuit: Any, positions: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        mp.faithfulness(tiny, PROMPTS, circuit, METRIC, positions=positions, **OFF)


def test_the_result_records_how_it_was_made_and_wangs_ratio(tiny: Any, tmp_path: Any) -> None:
    """Review 35a F3/F4: components, reference prompts, groups and named positions are kept
    (they change the answer), and Wang et al.'s own number, circuit / full, beside the
    normalised faithfulness."""
    circuit = {mp.Site("head", 2, head=1): "X"}
    result = mp.faithfulness(
        tiny, PROMPTS, circuit, METRIC, positions={"X": [3, 4, 5], "END": -1},
        reference=REFERENCE, **OFF,
    )  # fmt: skip
    assert result.ratio == pytest.approx(result.means["circuit"] / result.means["full"])
    assert result.summary()["ratio"][0] == pytest.approx(result.ratio)
    assert result.named_positions == {"X": (3, 4, 5), "END": (6, 6, 6)}
    assert len(result.components) == result.n_components == 12
    assert result.reference_prompts == tuple(REFERENCE)
    path = tmp_path / "faith.json"
    result.save(path)
    back = mp.FaithfulnessResult.load(path)
    assert back.named_positions == result.named_positions and back.groups == result.groups
    zero = mp.faithfulness(tiny, PROMPTS, CIRCUIT, METRIC, method="zero", **OFF)
    assert zero.reference_prompts == () and zero.groups == ()


def test_a_prompt_alone_in_its_length_group_is_warned_of(tiny):
    # Review 42a F3: a prompt that is the only one of its token length was "mean-ablated" to its
    # own activations: its circuit, empty and knockout runs equalled the full model's, silently
    # (ratio -1.06 where the three other prompts gave -1.26).
    prompts = ["Hi cat", "Hi dog", "Hi cow", "Hello ant"]  # 7, 7, 7 and 10 tokens
    lengths = [len(tiny.to_tokens(p)[0]) for p in prompts]
    assert lengths[3] not in lengths[:3] and len(set(lengths[:3])) == 1
    circuit = [mp.Site("head", 2, head=1)]
    with pytest.warns(UserWarning, match=r"prompt 3 \('Hello ant', the group of 10-token"):
        result = mp.faithfulness(tiny, prompts, circuit, METRIC, progress=False)
    for condition in (result.circuit, result.empty, result.knockout):
        assert condition[3] == result.full[3]  # what the warning says
        assert not np.allclose(condition[:3], result.full[:3])
    # the prompts passed as their own reference, or two copies of one prompt (review 42b S3)
    with pytest.warns(UserWarning, match=r"prompt 3 \('Hello ant'.* reference prompts are this"):
        mp.faithfulness(tiny, prompts, circuit, METRIC, reference=prompts, progress=False)
    with pytest.warns(UserWarning, match=r"prompt 3 \('Hello ant'"):
        mp.faithfulness(tiny, [*prompts, "Hello ant"], circuit, METRIC, progress=False)
    with warnings.catch_warnings():  # a reference of its length: nothing to warn of
        warnings.simplefilter("error")
        mp.faithfulness(tiny, prompts, circuit, METRIC, reference=[*prompts, "Hello bat"],
                        progress=False)  # fmt: skip
        mp.faithfulness(tiny, prompts[:3], circuit, METRIC, progress=False)
