"""Causal analyses on mechprobe's batched cell engine, each effect beside random controls:
activation patching and ablation of sites and heads, path patching."""

from mechprobe.patching._activation import ablate_cells, patch
from mechprobe.patching._metrics import PatchMetric, answer_prob, logit_diff
from mechprobe.patching._path import PathPatchResult, path_patch
from mechprobe.patching._result import PatchResult

__all__ = [
    "PatchMetric",
    "PatchResult",
    "PathPatchResult",
    "ablate_cells",
    "answer_prob",
    "logit_diff",
    "patch",
    "path_patch",
]
