"""Causal analyses on mechprobe's batched cell engine, each effect beside random controls:
activation patching and ablation of sites and heads, attribution patching, path patching, causal
tracing with noise; direct logit attribution of the residual stream's writes; distributed alignment
search; circuit faithfulness by mean ablation; head scores (previous-token, duplicate-token,
induction heads) from attention patterns, and the patterns themselves with their tokens."""

from mechprobe.patching._activation import ablate_cells, patch
from mechprobe.patching._attention import AttentionPatterns, attention_patterns
from mechprobe.patching._attribution import attribution_patch
from mechprobe.patching._das import DASResult, das
from mechprobe.patching._direct import LogitAttributionResult, direct_logit_attribution
from mechprobe.patching._faithfulness import FaithfulnessResult, faithfulness
from mechprobe.patching._head_scores import HeadScoreResult, head_scores
from mechprobe.patching._metrics import PatchMetric, answer_prob, logit_diff
from mechprobe.patching._path import RECEIVER_KINDS, SENDER_KINDS, PathPatchResult, path_patch
from mechprobe.patching._result import PatchResult
from mechprobe.patching._tracing import (
    TRACE_KINDS,
    TraceResult,
    causal_trace,
    trace_noise,
    trace_noise_level,
)

__all__ = [
    "RECEIVER_KINDS",
    "SENDER_KINDS",
    "TRACE_KINDS",
    "AttentionPatterns",
    "DASResult",
    "FaithfulnessResult",
    "HeadScoreResult",
    "LogitAttributionResult",
    "PatchMetric",
    "PatchResult",
    "PathPatchResult",
    "TraceResult",
    "ablate_cells",
    "answer_prob",
    "attention_patterns",
    "attribution_patch",
    "causal_trace",
    "das",
    "direct_logit_attribution",
    "faithfulness",
    "head_scores",
    "logit_diff",
    "patch",
    "path_patch",
    "trace_noise",
    "trace_noise_level",
]
