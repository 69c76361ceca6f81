"""Activation patching and ablation of sites and heads, many cells per forward pass, with random
controls; their metrics and result."""

from mechprobe.patching._activation import ablate_cells, patch
from mechprobe.patching._metrics import PatchMetric, answer_prob, logit_diff
from mechprobe.patching._result import PatchResult

__all__ = ["PatchMetric", "PatchResult", "ablate_cells", "answer_prob", "logit_diff", "patch"]
