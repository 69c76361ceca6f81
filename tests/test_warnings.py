"""mechprobe's warnings point at the user's own line, whatever the depth they are raised at.

Fixed ``stacklevel`` counts broke whenever a frame came between: with analyses wrapped to run
the model in eval mode, warnings meant for the user's call pointed into mechprobe (the amnesic
probe's convergence warning, patching's undefined normalisation, the deprecated keywords).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import mechprobe as mp
from mechprobe.core import warn


def test_a_patch_whose_clean_and_corrupt_runs_agree_warns_at_the_users_call(tiny):
    with pytest.warns(UserWarning, match="normalised recovery is undefined") as record:
        mp.patch(tiny, ["Hi cat"], ["Hi cat"], "resid_pre", -1, mp.logit_diff(5, 6))
    assert {w.filename for w in record} == {__file__}


def test_a_deprecated_keyword_warns_at_the_users_call(tiny):
    contexts = mp.random_word_contexts([" Poland"])
    with pytest.warns(DeprecationWarning, match="layer_ranges") as record:
        mp.ovector_sweep(
            tiny, {"o": torch.ones(64)}, contexts, [" Warsaw"], layer_ranges=[(1, 2)], scales=[1.0]
        )
    assert {w.filename for w in record if w.category is DeprecationWarning} == {__file__}


def test_warn_from_a_plain_function_points_at_its_caller():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn("look here")
    assert record[0].filename == __file__ and record[0].category is UserWarning
