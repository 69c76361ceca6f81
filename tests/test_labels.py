"""Class labels: every probe and eraser accepts and refuses the same labels, with one message.

Before one checker (``mp.core.class_labels``), ``collect`` refused bools that ``leace`` took,
``leace`` raised numpy's "'<' not supported" on a None label, ``probe_layers`` on labels mixing
1 and "1", and NaN word types were merged into one type by ``control_labels``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core import class_labels

RNG = np.random.default_rng(0)
X2 = RNG.normal(size=(8, 3))
X3 = RNG.normal(size=(8, 2, 3))  # [n, layers, d]


def _fits():
    return {
        "probe_layers": lambda y: mp.probe_layers(X3, y, n_folds=2, progress=False),
        "leace": lambda y: mp.leace(X2, y),
        "inlp": lambda y: mp.inlp(X2, y, 1, progress=False),
        "control_labels": lambda y: mp.control_labels(list("abcdabcd"), y),
    }


BAD = [
    ([None, "a", "b", "a", "b", "a", "b", "a"], ValueError, r"no label at rows \[0\]"),
    ([1.0, np.nan, 1, 0, 1, 0, 1, 0], ValueError, r"no label at rows \[1\]"),
    (np.array([1, "1", 1, "1", 0, 0, 1, 0], dtype=object), TypeError, "mixes int and str"),
    ([True, 0, 1, 0, 1, 0, 1, 0], TypeError, "mixes bool and int"),
    ([0.5, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], ValueError, "continuous values"),
    ([b"a", b"b"] * 4, TypeError, r"\[0\] is .*b'a'"),
    (np.eye(8, 2), ValueError, "1-D|one label per row"),
]


@pytest.mark.parametrize("fit", list(_fits()))
@pytest.mark.parametrize(("labels", "error", "message"), BAD)
def test_every_fit_refuses_the_same_labels_alike(fit, labels, error, message) -> None:
    with pytest.raises(error, match=message):
        _fits()[fit](labels)


@pytest.mark.parametrize("fit", list(_fits()))
def test_every_fit_takes_bools_as_the_ints_they_split_like(fit) -> None:
    flags = [True, False] * 4
    as_bools, as_ints = _fits()[fit](flags), _fits()[fit]([int(f) for f in flags])
    if fit == "control_labels":
        assert as_bools.tolist() == [bool(v) for v in as_ints.tolist()]
    elif fit == "probe_layers":
        np.testing.assert_allclose(as_bools.accuracy, as_ints.accuracy)
    else:
        torch.testing.assert_close(as_bools.removed, as_ints.removed)


def test_collect_takes_bool_labels(tiny) -> None:
    acts = mp.collect(tiny, ["ab", "cd"], mp.Site("resid_post", 1), labels=[True, False],
                      progress=False)  # fmt: skip
    assert acts.labels.dtype == np.bool_ and acts.labels.tolist() == [True, False]


def test_a_probing_dataset_takes_the_bool_labels_collect_takes(tiny) -> None:
    # ProbingDataset refused True while collect(labels=[True, False]) took it: two private
    # label checks with opposite rules (review 28b F11).
    texts = ["ab", "cd", "ef"]
    ds = mp.ProbingDataset("flags", texts, [True, False, np.True_])
    assert ds.labels == (True, False, True) and ds.classes == (False, True)
    site = mp.Site("resid_post", 1)
    from_dataset = mp.collect(tiny, ds, site, progress=False)
    direct = mp.collect(tiny, texts, site, labels=[True, False, True], progress=False)
    assert from_dataset.labels.dtype == np.bool_
    np.testing.assert_array_equal(from_dataset.labels, direct.labels)
    words = mp.ProbingDataset("w", ["a b", "c d"], [(True, None), (False, True)], level="word")
    assert words.n_examples == 3
    with pytest.raises(TypeError, match="mixes int and bool labels"):
        mp.ProbingDataset("t", texts, [True, 0, 1])
    with pytest.raises(TypeError, match="one str, int or bool per text"):
        mp.ProbingDataset("t", texts, [1.5, 0, 1])


def test_word_types_are_checked_like_labels() -> None:
    # Two NaN word types were one type to np.unique: one control label for both.
    with pytest.raises(ValueError, match=r"groups has no label at rows \[1, 3\]"):
        mp.control_labels(["a", float("nan"), "b", float("nan")], [0, 1, 0, 1])


def test_a_held_out_split_too_small_for_the_classes_is_refused_by_name() -> None:
    # scikit-learn's own words named its test_size = 1 and no argument of probe_layers.
    with pytest.raises(ValueError, match=r"leave 3 for training and 1 for testing.*n_folds"):
        mp.probe_layers(X3[:4], np.array([0, 1, 0, 1]), progress=False)


def test_class_labels_codes_index_sorted_classes() -> None:
    classes, codes = class_labels(np.array([3, 1, 3, 2]))
    assert classes.tolist() == [1, 2, 3] and codes.tolist() == [2, 0, 2, 1]
    classes, codes = class_labels([2.0, 1.0, 2.0])  # integral floats are classes
    assert classes.tolist() == [1, 2] and codes.dtype == np.int64
    with pytest.raises(ValueError, match="only one class"):
        class_labels(["a", "a"])
    assert class_labels(["a"], min_classes=1)[0].tolist() == ["a"]


def test_integral_float_labels_are_ints_in_datasets_and_collect(tiny) -> None:
    # core.class_labels (every fit) reads 2.0 as class 2, but collect and ProbingDataset refused
    # a float column of labels ("labels[0] is 1.0: use a str, int or bool label").
    texts = ["ab", "cd", "ef"]
    floats = np.array([1.0, 0.0, 1.0])
    ds = mp.ProbingDataset("t", texts, floats)
    assert ds.labels == (1, 0, 1) and all(type(v) is int for v in ds.labels)
    words = mp.ProbingDataset("w", ["ab cd ef"], [(2.0, None, np.float32(0.0))], "word")
    assert words.labels == ((2, None, 0),)
    site = mp.Site("resid_post", 1)
    acts = mp.collect(tiny, texts, site, labels=floats, progress=False)
    assert acts.labels is not None and acts.labels.dtype == np.int64
    assert acts.labels.tolist() == [1, 0, 1]
    with pytest.raises(TypeError, match=r"1\.5"):
        mp.collect(tiny, texts[:2], site, labels=[1.5, 0.0], progress=False)
    with pytest.raises(TypeError, match="nan"):
        mp.ProbingDataset("t", texts[:2], [float("nan"), 1.0])
