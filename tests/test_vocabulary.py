"""Every public signature against the argument vocabulary of docs/api.md."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.base import BaseEstimator

import mechprobe as mp

KEYWORD_ONLY = {"seed", "progress", "batch_size"}
DEFAULTS: dict[str, tuple[Any, ...]] = {
    "seed": (0,),
    "progress": (True,),
    "batch_size": (32,),
    "layers": ("all", None, inspect.Parameter.empty),
    "padding_side": ("right",),
    "n_random": (3,),
}
GONE = {"kind", "select", "layer_ranges", "sweep_ranges", "C", "alpha", "holdout"}
# Loaders take no sites: there `kind` is the model class, "bridge" or "hooked" (issue 16).
MODEL_KIND = {"load_model", "tiny_model"}
SINGLE_SITE = {"amnesic", "das"}  # functions that act at exactly one site take `site`
INTERVENTIONS = (mp.Intervention,)

# Violations still being removed: each entry must really be a violation (the last test checks),
# and the list must end empty.
KNOWN: set[str] = set()

# Old names kept for one release (CHANGELOG.md): accepted with a DeprecationWarning, documented as
# deprecated, defaulting to None so that only a caller who passes them gets the old behaviour.
DEPRECATED: set[str] = {
    "LinearProbe(C)",
    "MLPProbe(alpha)",
    "collect(select)",
    "layer_sweep(kind)",
}


def _callables() -> Iterator[tuple[str, Callable[..., Any], str]]:
    """(name, callable, role) for public functions, estimators and interventions."""
    for name in mp.__all__:
        obj = getattr(mp, name)
        if inspect.isfunction(obj):
            yield name, obj, "function"
        elif inspect.isclass(obj) and issubclass(obj, BaseEstimator):
            yield name, obj.__init__, "estimator"
        elif inspect.isclass(obj) and issubclass(obj, INTERVENTIONS):
            yield name, obj.__init__, "intervention"
        if inspect.isclass(obj) and not issubclass(obj, BaseEstimator):
            # Methods speak the vocabulary too (Task.subset took seed positionally).
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield f"{name}.{attr}", member, "method"


# Functions whose positions= only names positions (None: no names), not where to act.
NAMES_ONLY = {"faithfulness"}


def _violations() -> set[str]:
    found = set()
    for name, fn, role in _callables():
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            continue
        for p in params.values():
            where = f"{name}({p.name})"
            if role == "method" and p.name not in ("seed", "progress"):
                # A method's kind, site or batch_size is its object's own word (a lens's
                # translate(kind), a result's values(site)); seeds and bars are the API's.
                continue
            model_kind = p.name == "kind" and name in MODEL_KIND
            if p.name in GONE and where not in DEPRECATED and not model_kind:
                found.add(f"{where}: gone from the vocabulary")
            if role == "estimator":
                if p.name == "seed":
                    found.add(f"{where}: estimators say random_state")
                continue  # scikit-learn's conventions (batch_size of a minibatch, …)
            if p.name == "random_state":
                found.add(f"{where}: functions say seed")
            if p.name in KEYWORD_ONLY and p.kind is not p.KEYWORD_ONLY:
                found.add(f"{where}: must be keyword-only")
            if p.name in DEFAULTS and p.default not in DEFAULTS[p.name]:
                found.add(f"{where}: default {p.default!r}, vocabulary {DEFAULTS[p.name]}")
            if (
                p.name == "positions"
                and role == "function"
                and p.default is None
                and name not in NAMES_ONLY
            ):
                found.add(f"{where}: None is not a spelling of positions (use -1 or 'all')")
            if p.name == "site" and name not in SINGLE_SITE:
                found.add(f"{where}: say sites")
    return found


@pytest.mark.parametrize("bad", ["no", 0, None])
def test_progress_is_true_or_false(bad) -> None:
    """progress="no" showed a bar (truthy); every bar of the API goes through progress_bar."""
    with pytest.raises(TypeError, match="progress must be True or False"):
        mp.collect(mp.tiny_model(), ["Hi"], progress=bad)
    with pytest.raises(TypeError, match="progress must be True or False"):
        mp.logit_lens(mp.tiny_model(), "Hi", progress=bad)
    with pytest.raises(TypeError, match="progress must be True or False"):
        mp.patch(
            mp.tiny_model(), "Hi cat", "Hi bat", "mlp_out", -1, mp.logit_diff(5, 6), progress=bad
        )


def test_a_weighted_bar_takes_one_weight_and_count_per_item() -> None:
    from mechprobe.core import weighted_progress_bar

    with pytest.raises(ValueError, match="finite and >= 0"):
        list(
            weighted_progress_bar(
                "ab", weights=[1, float("nan")], counts=[1, 1], unit="x", progress=True, desc="d"
            )
        )
    with pytest.raises(ValueError, match="3 items, 2 weights and 3 counts"):
        list(
            weighted_progress_bar(
                "abc", weights=[1, 2], counts=[1, 1, 1], unit="x", progress=True, desc="d"
            )
        )


def test_vocabulary_table_is_documented() -> None:
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    for word in ["sites", "layers", "positions", "batch_size", "progress", "seed", "l2"]:
        assert f"| `{word}`" in page


def test_every_public_signature_follows_the_vocabulary() -> None:
    new = sorted(_violations() - KNOWN)
    assert not new, "\n".join(new)


def test_known_violations_are_still_violations() -> None:
    stale = sorted(KNOWN - _violations())
    assert not stale, "fixed: remove from KNOWN:\n" + "\n".join(stale)


@pytest.mark.parametrize("where", sorted(DEPRECATED))
def test_deprecated_names_are_documented_keyword_only_and_off_by_default(where: str) -> None:
    name, param = where.rstrip(")").split("(")
    obj = getattr(mp, name)
    parameter = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters[param]
    assert parameter.kind is parameter.KEYWORD_ONLY and parameter.default is None
    doc = inspect.getdoc(obj) or ""
    assert f"{param}: deprecated".lower() in doc.lower(), f"{where} is not documented as deprecated"


@pytest.mark.parametrize("name", [n for n, _, role in _callables() if role == "function"])
def test_functions_document_an_example(name: str) -> None:
    doc = inspect.getdoc(getattr(mp, name)) or ""
    assert "Example" in doc and ">>>" in doc, f"{name} has no runnable example"


def _seeded_calls() -> dict[str, Callable[[Any], Any]]:
    """One cheap call per seeded public function, taking the seed."""
    import numpy as np

    model = mp.tiny_model()
    pair = ("Hi cat", "Hi bat")
    metric = mp.logit_diff(1, 2)
    task = mp.load_task("capitals")
    off = {"progress": False}
    return {
        "patch": lambda s: mp.patch(model, *pair, "mlp_out", -1, metric, seed=s, **off),
        "attribution_patch": lambda s: mp.attribution_patch(
            model, *pair, "mlp_out", -1, metric, seed=s, **off
        ),
        "ablate_cells": lambda s: mp.ablate_cells(model, "Hi cat", "mlp_out", -1, metric, seed=s),
        "path_patch": lambda s: mp.path_patch(
            model, *pair, "head", "final", metric, layers=[0], seed=s, **off
        ),
        "causal_trace": lambda s: mp.causal_trace(
            model, "The cat sat", "cat", layers=[0], n_noise=1, seed=s, **off
        ),
        "random_projection": lambda s: mp.random_projection(8, 2, seed=s),
        "function_vector": lambda s: mp.function_vector(
            model, "capitals", n_prompts=2, seed=s, n_random=0, **off
        ),
        "cumulative_scores": lambda s: mp.cumulative_scores(
            np.random.default_rng(0).normal(size=(40, 3, 4)), np.arange(40) % 2, seed=s
        ),
        "Task.subset": lambda s: task.subset(4, seed=s),
        "Task.split": lambda s: task.split(seed=s),
        "tiny_model": lambda s: mp.tiny_model(seed=s),
        "random_word_contexts": lambda s: mp.random_word_contexts([" Paris"], seed=s),
        "control_labels": lambda s: mp.control_labels(["a", "b", "a"], [0, 1, 0], seed=s),
        "country_dataset": lambda s: mp.country_dataset(n_countries=3, seed=s),
        "das": lambda s: mp.das(
            model,
            ["Hi cat", "Hi dog"],
            ["Hi dog", "Hi cat"],
            5,
            "blocks.0.hook_resid_post",
            epochs=1,
            n_random=0,
            seed=s,
            **off,
        ),
        # shuffled_prompts ran random.Random(seed) unchecked (None: a new permutation every
        # call); trace_noise truncated 2.5 to 2 and took -1, which causal_trace refuses.
        "shuffled_prompts": lambda s: mp.shuffled_prompts(task.with_shots(3).subset(2), seed=s),
        "trace_noise": lambda s: mp.trace_noise([1, 2, 3], 1, 2, 8, 0.1, seed=s),
        "control_projections": lambda s: mp.control_projections(
            mp.random_projection(8, 2), n_random=2, seed=s
        ),
        "dropout_projection": lambda s: mp.dropout_projection(8, 2, seed=s),
        "templated_dataset": lambda s: mp.templated_dataset(n=8, seed=s),
        "inlp": lambda s: mp.inlp(
            np.random.default_rng(0).normal(size=(40, 4)), np.arange(40) % 2, 1, seed=s, **off
        ),
        "probe_layers": lambda s: mp.probe_layers(
            np.random.default_rng(0).normal(size=(40, 2, 4)), np.arange(40) % 2, seed=s, **off
        ),
        "head_scores": lambda s: mp.head_scores(
            model, kinds=["previous_token"], seq_len=6, n_prompts=1, seed=s, **off
        ),
        "generate": lambda s: mp.generate(
            model, "Hi", max_new_tokens=1, temperature=1.0, seed=s, **off
        ),
    }


@pytest.mark.parametrize("name", sorted(_seeded_calls()))
def test_every_seed_is_an_int_from_0_to_2_32(name: str) -> None:
    # seed=-1 ran in some functions and not others; np.int64 seeds passed the check and failed
    # inside random.seed or torch; 2**64 overflowed in the patching engine.
    import numpy as np

    call = _seeded_calls()[name]
    call(np.int64(3))
    for bad in (-1, 2**32, 2**64):
        with pytest.raises(ValueError, match="seed must be between 0 and 4294967295"):
            call(bad)
    with pytest.raises(TypeError, match="seed must be an int"):
        call(2.5)
    with pytest.raises(TypeError, match="seed must be an int"):
        call(None)


def test_the_largest_seed_works_with_several_random_controls() -> None:
    # amnesic(seed=2**32 - 1, n_random=2) asked control 1 for seed 2**32 and was refused, naming
    # a seed the user never passed; control seeds wrap instead.
    conds = mp.control_projections(mp.random_projection(8, 2), n_random=2, seed=2**32 - 1)
    assert [c.seed for c in conds if c.name == "random"] == [2**32 - 1, 0]
    again = mp.control_projections(mp.random_projection(8, 2), n_random=1, seed=0)
    assert torch.equal(conds[2].eraser.removed, again[1].eraser.removed)


def test_control_seed_wraps_in_the_seed_range() -> None:
    from mechprobe.core import control_seed

    assert [control_seed(5, j) for j in range(3)] == [5, 6, 7]  # ordinary seeds keep their values
    assert [control_seed(2**32 - 1, j) for j in range(3)] == [2**32 - 1, 0, 1]


def _largest_seed_calls() -> dict[str, Callable[[int, int], Any]]:
    """Calls with random controls, taking (seed, n_random) and giving the controls' values."""
    model = mp.tiny_model()
    pair = ("Hi cat", "Hi bat")
    metric = mp.logit_diff(1, 2)
    o = mp.OVector(torch.ones(64), layer=1, source="toy", n_prompts=1)
    off = {"progress": False}
    return {
        "patch": lambda s, n: (
            mp.patch(model, *pair, "mlp_out", -1, metric, seed=s, n_random=n, **off).random
        ),
        "attribution_patch": lambda s, n: (
            mp.attribution_patch(
                model, *pair, "mlp_out", -1, metric, seed=s, n_random=n, **off
            ).random
        ),
        "ablate_cells": lambda s, n: (
            mp.ablate_cells(model, "Hi cat", "mlp_out", -1, metric, seed=s, n_random=n).random
        ),
        "path_patch": lambda s, n: (
            mp.path_patch(
                model, *pair, "head", "final", metric, layers=[0], seed=s, n_random=n, **off
            ).random
        ),
        "ovector_controls": lambda s, n: np.stack(
            [v.vector.numpy() for v in mp.ovector_controls(model, o, n_random=n, seed=s).values()]
        ),
    }


_SEED_CALLS = ["ablate_cells", "attribution_patch", "ovector_controls", "patch", "path_patch"]


def test_the_seed_calls_are_the_listed_ones() -> None:
    assert sorted(_largest_seed_calls()) == _SEED_CALLS


# Named, not read from _largest_seed_calls() at collection, which built a model for any -k.
@pytest.mark.parametrize("name", _SEED_CALLS)
def test_the_largest_seed_wraps_in_every_random_control(name: str) -> None:
    # ovector_controls(seed=2**32 - 1, n_random=2) asked control 1 for seed 2**32 and was refused
    # (review 28b F2); the patching controls keyed it as 2**32. Control j is seed + j modulo 2**32
    # everywhere: control 1 of the largest seed is control 0 of seed 0.
    call = _largest_seed_calls()[name]
    # (to float noise: two controls share a forward pass differently from one)
    np.testing.assert_allclose(call(2**32 - 1, 2)[1], call(0, 1)[0], rtol=1e-5, atol=1e-5)


def test_the_largest_seed_wraps_in_causal_traces_and_das(monkeypatch: pytest.MonkeyPatch) -> None:
    # causal_trace's random controls ride on its seeded noise, so their values differ from seed 0's:
    # read the seeds the random directions are drawn from instead.
    import mechprobe.patching._tracing as tracing

    model, seeds = mp.tiny_model(), set()
    real = tracing._units

    def spy(seed: int, *args: Any) -> Any:
        seeds.add(seed)
        return real(seed, *args)

    monkeypatch.setattr(tracing, "_units", spy)
    mp.causal_trace(
        model, "The cat sat", "cat", layers=[0], n_noise=1, n_random=2, seed=2**32 - 1,
        progress=False,
    )  # fmt: skip
    assert seeds == {2**32 - 1, 0}
    # das's random subspace j draws from seed + 1 + j (seed itself draws the split).
    res = mp.das(
        model, ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"], 5, "blocks.0.hook_resid_post",
        epochs=1, n_random=2, seed=2**32 - 2, progress=False,
    )  # fmt: skip
    assert res.to_frame().query("condition == 'random'")["seed"].tolist() == [2**32 - 1, 0]


def test_every_public_name_is_in_the_api_index() -> None:
    # docs/api.md had the vocabulary table only: 36 of the exported names appeared in no page.
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    indexed = set(re.findall(r"^- `([A-Za-z_]\w*)`:", page, flags=re.M))
    public = {name for name in mp.__all__ if not name.startswith("__")}
    assert not public - indexed, f"not in docs/api.md's index: {sorted(public - indexed)}"
    assert not indexed - public, f"indexed but not exported: {sorted(indexed - public)}"


# ---- positions: one reading of every form, in every function that takes positions= ------------

# Each form of one position and of the same two positions (docs/api.md's `positions` row), built
# per call (a tensor passed on could be changed by the call before it).
ONE_POSITION: dict[str, Callable[[], Any]] = {
    "int": lambda: -1,
    "numpy int": lambda: np.int64(-1),
    "0-d tensor": lambda: torch.tensor(-1),
}
TWO_POSITIONS: dict[str, Callable[[], Any]] = {
    "list": lambda: [-2, -1],
    "tuple": lambda: (-2, -1),
    "range": lambda: range(-2, 0),
    "1-d array": lambda: np.array([-2, -1]),
    "1-d tensor": lambda: torch.tensor([-2, -1]),
}


def _numbers(result: Any) -> Any:
    """What a result says, comparable across calls: its frame (or its arrays)."""
    if isinstance(result, tuple):  # tuned_intervention: (sweep, chosen effect)
        return [_numbers(r) for r in result]
    if isinstance(result, mp.RunResult):
        return result.logits
    if isinstance(result, mp.Activations):
        return (result.to_frame(), result.values)
    return result.to_frame()


def _positions_calls() -> dict[str, Callable[[Any], Any]]:
    """One cheap call per function that takes positions= (run's is logit_positions=)."""

    model = mp.tiny_model()
    pair = ("Hi cat", "Hi bat")  # one token length, so "all" has a common grid
    metric = mp.logit_diff(1, 2)
    task = mp.load_task("capitals").subset(3, seed=0)
    ctx = mp.random_word_contexts([" Poland", " Chile"], seed=0)
    answers = [" Warsaw", " Santiago"]
    vectors = {"ovector": torch.linspace(-1, 1, 64)}
    data = mp.ProbingDataset("toy", ["ab", "ba", "aa", "bb"] * 3, ["x", "y", "x", "y"] * 3)
    off = {"progress": False}
    return {
        "patch": lambda p: mp.patch(model, *pair, "mlp_out", p, metric, layers=[0], **off),
        "attribution_patch": lambda p: mp.attribution_patch(
            model, *pair, "mlp_out", p, metric, layers=[0], **off
        ),
        "ablate_cells": lambda p: mp.ablate_cells(
            model, pair[0], "mlp_out", p, metric, layers=[0], **off
        ),
        # the reference prompts' positions a mean is taken over: a numpy array crashed in a
        # comparison with "same" (review 42a F1)
        "ablate_cells(reference_positions=)": lambda p: mp.ablate_cells(
            model, list(pair), "mlp_out", -1, metric, layers=[0], reference_positions=p, **off
        ),
        "path_patch": lambda p: mp.path_patch(
            model, *pair, "head", "final", metric, layers=[0], positions=p, **off
        ),
        "run": lambda p: mp.run(model, list(pair), logit_positions=p, **off),
        "logit_lens": lambda p: mp.logit_lens(model, list(pair), positions=p, **off),
        "compare_lenses": lambda p: mp.compare_lenses(
            model,
            ["logit"],
            ["one two three four " * 8],
            n_tokens=16,
            seq_len=8,
            positions=p,
            **off,
        ),
        "collect": lambda p: mp.collect(model, list(pair), "resid_post", positions=p, **off),
        "amnesic": lambda p: mp.amnesic(
            model,
            mp.Site("resid_post", 1),
            mp.random_projection(64, 2, seed=1),
            text=list(pair),
            n_random=1,
            positions=p,
            **off,
        ),
        "layer_sweep": lambda p: mp.layer_sweep(
            model, data, [1], "leace", text=list(pair), n_random=1, positions=p, **off
        ),
        "ovector_intervention": lambda p: mp.ovector_intervention(
            model, vectors, ctx, answers, layers=[1], positions=p
        ),
        "ovector_sweep": lambda p: mp.ovector_sweep(
            model, vectors, ctx, answers, layers=[[1]], scales=[1.0], positions=p
        ),
        "tuned_intervention": lambda p: mp.tuned_intervention(
            model, vectors, ctx, answers, layers=[[1]], scales=[1.0], choose_on=[0], positions=p
        ),
        "ffn_ablation": lambda p: mp.ffn_ablation(model, task, parts=2, positions=p),
        "relational_analysis": lambda p: mp.relational_analysis(
            model,
            "capitals",
            n_items=4,
            ablation=False,
            n_random=1,
            sweep_layers=[[1]],
            sweep_scales=[1.0],
            sweep_contexts=2,
            positions=p,
            **off,
        ),
        "direct_logit_attribution": lambda p: mp.direct_logit_attribution(
            model, list(pair), metric, positions=p, **off
        ),
        "das": lambda p: mp.das(
            model,
            ["Hi cat", "Hi dog"],
            ["Hi dog", "Hi cat"],
            5,
            mp.Site("resid_post", 1),
            k=2,
            epochs=1,
            n_random=0,
            positions=p,
            **off,
        ),
    }


ONE_POSITION_ONLY = {"direct_logit_attribution", "das"}  # by design: one position per prompt


def _same(a: Any, b: Any, where: str) -> None:
    import pandas as pd

    if isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            _same(x, y, where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, obj=where)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


@pytest.mark.parametrize("name", sorted(_positions_calls()))
def test_every_positions_form_reads_the_same_everywhere(name: str) -> None:
    # Seven parsers took seven subsets of the forms: range(-2, 0) failed in amnesic, a 1-d tensor
    # in collect and the o-vector functions (review 24b, F3). One check in core reads them all.
    call = _positions_calls()[name]
    groups = [ONE_POSITION] if name in ONE_POSITION_ONLY else [ONE_POSITION, TWO_POSITIONS]
    for forms in groups:
        first, *others = forms
        expected = _numbers(call(forms[first]()))
        for form in others:
            _same(expected, _numbers(call(forms[form]())), f"{name}: {form} vs {first}")
    if name in ONE_POSITION_ONLY:
        for value in [*(make() for make in TWO_POSITIONS.values()), "all"]:
            with pytest.raises(TypeError, match=r"one position \(an int\)"):
                call(value)
    else:
        call("all")


# ---- batch_size=None: all rows in one pass, wherever rows are batched ---------------------------

# Float tolerance between one pass and passes of two rows: padding and matmul shapes change the
# float32 rounding (about 1e-6 on the tiny model), never the numbers' meaning.
BATCH_TOLERANCE = 1e-5


def _batched_calls() -> dict[str, Callable[[Any], Any]]:
    """One cheap call per function (or class) that takes batch_size, on at least three rows, so
    that batch_size=2 runs several passes."""
    model = mp.tiny_model()
    prompts = ["Hi cat", "The dog ran far", "A bird"]
    metric = mp.logit_diff(1, 2)
    task = mp.load_task("capitals").subset(3, seed=0)
    ctx = mp.random_word_contexts([" Poland", " Chile", " Peru"], seed=0)
    answers = [" Warsaw", " Santiago", " Lima"]
    vectors = {"ovector": torch.linspace(-1, 1, 64)}
    ovector = mp.OVector(torch.linspace(-1, 1, 64), layer=1, source="toy", n_prompts=1)
    data = mp.ProbingDataset("toy", ["ab", "ba", "aa", "bb"] * 3, ["x", "y", "x", "y"] * 3)
    text = ["one two three four " * 8]
    off = {"progress": False}
    return {
        "run": lambda b: mp.run(model, prompts, batch_size=b, **off),
        "generate": lambda b: mp.generate(model, prompts, max_new_tokens=2, batch_size=b, **off),
        "logit_lens": lambda b: mp.logit_lens(model, prompts, batch_size=b, **off),
        "compare_lenses": lambda b: mp.compare_lenses(
            model, ["logit"], text, n_tokens=24, seq_len=8, batch_size=b, **off
        ),
        "Patchscope": lambda b: mp.Patchscope(batch_size=b).translate(
            model, "resid_post", 1, torch.linspace(-1, 1, 3 * 64).reshape(3, 64)
        ),
        "train_tuned_lens": lambda b: mp.train_tuned_lens(
            model,
            ["The cat sat on the mat. " * 40],
            sites="resid_post",
            n_tokens=64,
            seq_len=16,
            tokens_per_step=64,
            batch_size=b,
            **off,
        ).translate(model, "resid_post", 0, torch.linspace(-1, 1, 64)[None]),
        "collect": lambda b: mp.collect(model, prompts, "resid_post", batch_size=b, **off),
        "amnesic": lambda b: mp.amnesic(
            model,
            mp.Site("resid_post", 1),
            mp.random_projection(64, 2, seed=1),
            text=prompts,
            n_random=1,
            batch_size=b,
            **off,
        ),
        "layer_sweep": lambda b: mp.layer_sweep(
            model, data, [1], "leace", text=prompts, n_random=1, batch_size=b, **off
        ),
        "direct_logit_attribution": lambda b: mp.direct_logit_attribution(
            model, prompts, metric, batch_size=b, **off
        ),
        "das": lambda b: mp.das(
            model,
            ["Hi cat", "Hi dog", "Hi cow"],
            ["Hi dog", "Hi cat", "Hi cat"],
            5,
            mp.Site("resid_post", 1),
            k=2,
            epochs=1,
            n_random=0,
            batch_size=b,
            **off,
        ),
        "head_scores": lambda b: mp.head_scores(model, seq_len=6, n_prompts=3, batch_size=b, **off),
        "attribution_patch": lambda b: mp.attribution_patch(
            model,
            ["Hi cat", "Hi dog", "Hi cow"],
            ["Hi dog", "Hi cat", "Hi cat"],
            "resid_pre",
            -1,
            metric,
            n_random=1,
            batch_size=b,
            **off,
        ),
        "predict": lambda b: mp.predict(
            model,
            ["Hi cat", "Hello there you", "A"],
            [" a", [" b", " cd"], " e"],
            batch_size=b,
            **off,
        ),
        "attention_patterns": lambda b: mp.attention_patterns(
            model, ["Hi cat", "Hello there you", "A"], batch_size=b, **off
        ),
        "faithfulness": lambda b: mp.faithfulness(
            model,
            ["Hi cat", "Hello there", "Hi dog", "Hello you"],
            [mp.Site("head", 1, head=0, positions=-1)],
            metric,
            batch_size=b,
            **off,
        ),
        "function_vector": lambda b: mp.function_vector(
            model, "capitals", n_prompts=3, n_random=0, batch_size=b, **off
        ),
        "score_task": lambda b: mp.score_task(model, task, batch_size=b, **off),
        "trajectory": lambda b: mp.trajectory(model, task, batch_size=b, **off),
        "task_pass": lambda b: mp.task_pass(model, task, batch_size=b, **off),
        "ffn_attribution": lambda b: mp.ffn_attribution(model, task, layer=1, batch_size=b, **off),
        "ffn_ablation": lambda b: mp.ffn_ablation(model, task, parts=2, batch_size=b, **off),
        "extract_ovector": lambda b: mp.extract_ovector(
            model, task.prompts(), layer=1, batch_size=b, **off
        ),
        "ovector_controls": lambda b: mp.ovector_controls(
            model, ovector, n_random=1, other_task="capitals", batch_size=b, **off
        ),
        "ovector_intervention": lambda b: mp.ovector_intervention(
            model, vectors, ctx, answers, layers=[1], batch_size=b, **off
        ),
        "ovector_sweep": lambda b: mp.ovector_sweep(
            model, vectors, ctx, answers, layers=[[1]], scales=[1.0], batch_size=b, **off
        ),
        "tuned_intervention": lambda b: mp.tuned_intervention(
            model,
            vectors,
            ctx,
            answers,
            layers=[[1]],
            scales=[1.0],
            choose_on=[0],
            batch_size=b,
            **off,
        ),
        "relational_analysis": lambda b: mp.relational_analysis(
            model,
            "capitals",
            n_items=4,
            ablation=False,
            n_random=1,
            sweep_layers=[[1]],
            sweep_scales=[1.0],
            sweep_contexts=2,
            batch_size=b,
            **off,
        ),
    }


def _close(a: Any, b: Any, where: str) -> None:
    """``a`` and ``b`` equal, their floats within BATCH_TOLERANCE."""
    import dataclasses

    import pandas as pd

    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _close(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE, msg=where)
    elif isinstance(a, mp.RunResult):
        _close(a.logits, b.logits, where)
    elif isinstance(a, mp.Activations):
        _close(a.to_frame(), b.to_frame(), where)
        np.testing.assert_allclose(
            a.values, b.values, BATCH_TOLERANCE, BATCH_TOLERANCE, err_msg=where
        )
    elif isinstance(a, mp.TaskPass):
        _close([a.score, a.trajectory, a.mlp_out], [b.score, b.trajectory, b.mlp_out], where)
    elif hasattr(a, "to_frame"):
        _close(a.to_frame(), b.to_frame(), where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(
            a, b, check_exact=False, rtol=BATCH_TOLERANCE, atol=BATCH_TOLERANCE, obj=where
        )
    elif dataclasses.is_dataclass(a):
        _close(vars(a), vars(b), where)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=BATCH_TOLERANCE, abs=BATCH_TOLERANCE, nan_ok=True), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(_batched_calls()))
def test_batch_size_none_is_every_row_in_one_pass(name: str) -> None:
    # batch_size=None ran in 11 functions and was refused ("batch_size must be an int") by 10
    # (review 24b, F5): it is every row in one pass everywhere, the same numbers as any size.
    call = _batched_calls()[name]
    _close(call(None), call(2), f"{name}: batch_size None vs 2")


def test_string_arrays_are_prompts_and_a_batch_where_strings_go_is_named() -> None:
    # causal_trace refused the numpy and pandas string arrays every other prompts= takes;
    # extract_ovector answered a Batch with "'Batch' object is not iterable" (review 24b F10).
    import numpy as np
    import pandas as pd

    model = mp.tiny_model()
    want = mp.causal_trace(model, "The cat sat", "cat", layers=[0], n_noise=1, progress=False)
    for prompts in (np.array(["The cat sat"]), pd.Series(["The cat sat"])):
        got = mp.causal_trace(model, prompts, "cat", layers=[0], n_noise=1, progress=False)
        pd.testing.assert_frame_equal(got.to_frame(), want.to_frame())
    with pytest.raises(TypeError, match="takes prompt strings or a Task, not a Batch"):
        mp.extract_ovector(model, mp.tokenize(model, ["Hi cat"]), 1)


# ---- layers= beside explicit sites ------------------------------------------------------------


def _sites_and_layers_calls() -> dict[str, Callable[..., Any]]:
    """One call per function taking both ``sites`` and ``layers``, given only explicit Sites."""
    model = mp.tiny_model()
    data = mp.ProbingDataset("toy", ["ab cd", "ba dc", "aa x", "bb y"] * 3, ["x", "y"] * 6)
    metric = mp.logit_diff(1, 2)
    site = mp.Site("resid_post", 1)
    off = {"progress": False}
    return {
        "patch": lambda **kw: mp.patch(model, "Hi cat", "Hi bat", site, -1, metric, **kw, **off),
        "attribution_patch": lambda **kw: mp.attribution_patch(
            model, "Hi cat", "Hi bat", site, -1, metric, **kw, **off
        ),
        "ablate_cells": lambda **kw: mp.ablate_cells(
            model, "Hi cat", site, -1, metric, method="zero", **kw, **off
        ),
        "attention_patterns": lambda **kw: mp.attention_patterns(
            model, ["Hi cat"], sites=mp.Site("pattern", 1, head=0), **kw, **off
        ),
        "collect": lambda **kw: mp.collect(model, data, site, **kw, **off),
        "layer_sweep": lambda **kw: mp.layer_sweep(
            model, data, sites=site, method="leace", text=["Hi cat"], n_random=0, **kw, **off
        ),
        "logit_lens": lambda **kw: mp.logit_lens(model, ["Hi cat"], sites=site, **kw, **off),
        "compare_lenses": lambda **kw: mp.compare_lenses(
            model,
            ["logit"],
            ["one two three four " * 8],
            sites=site,
            n_tokens=24,
            seq_len=8,
            **kw,
            **off,
        ),
    }


def test_layers_beside_only_explicit_sites_is_refused_everywhere() -> None:
    # Review 43a F4: collect and layer_sweep (and the lenses) read layers=[0] beside
    # Site("resid_post", 2) as nothing and ran at layer 2, where patch refused it.
    calls = _sites_and_layers_calls()
    takes_both = {
        name
        for name in mp.__all__
        if inspect.isfunction(getattr(mp, name))
        and {"sites", "layers"} <= set(inspect.signature(getattr(mp, name)).parameters)
    }
    # causal_trace takes kinds only (a Site is refused by its own message)
    assert takes_both - {"causal_trace"} == set(calls)
    for call in calls.values():
        with pytest.raises(ValueError, match=r"layers=\[2\] is given, but every entry of sites"):
            call(layers=[2])
        call()  # the same sites without layers= run
