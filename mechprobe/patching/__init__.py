"""Activation patching, many cells per forward pass, with its metrics and result."""

from mechprobe.patching._activation import patch
from mechprobe.patching._metrics import PatchMetric, answer_prob, logit_diff
from mechprobe.patching._result import PatchResult

__all__ = ["PatchMetric", "PatchResult", "answer_prob", "logit_diff", "patch"]
