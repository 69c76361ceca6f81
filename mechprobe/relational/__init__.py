"""Relational tasks in the model (Merullo et al.): scores, early-decoding stages, o-vectors and
their interventions with controls, FFN ablation, analogies, function vectors (Todd et al.) beside
o-vectors, and the one-call analysis.

The one-call :func:`relational_analysis` is a sequence of the public steps below: :func:`task_pass`
(score, trajectory and stages from one teacher-forced pass), :func:`fit_ovector`,
:func:`ovector_controls`, :func:`random_word_contexts` and :func:`ovector_intervention`,
:func:`ffn_ablation`, and optionally :func:`tuned_intervention` (a sweep and its best cell).
"""

from mechprobe.relational._ablation import AblationResult, ffn_ablation
from mechprobe.relational._analogy import AnalogyResult, analogy, offset_accuracy
from mechprobe.relational._analysis import default_sweep_layers, relational_analysis
from mechprobe.relational._contexts import random_word_contexts
from mechprobe.relational._function import (
    FunctionVectorResult,
    function_vector,
    shuffled_prompts,
)
from mechprobe.relational._function_sweep import FunctionVectorSweep, function_vector_sweep
from mechprobe.relational._intervention import OVectorEffect, ovector_intervention
from mechprobe.relational._ovector import (
    OVector,
    extract_ovector,
    fit_ovector,
    ovector_controls,
    random_ovector,
)
from mechprobe.relational._pass import TaskPass, task_pass
from mechprobe.relational._result import RelationalResult
from mechprobe.relational._scoring import TaskScore, score_task
from mechprobe.relational._sweep import OVectorSweep, ovector_sweep, tuned_intervention
from mechprobe.relational._trajectory import Stages, Trajectory, ffn_attribution, trajectory

__all__ = [
    "AblationResult",
    "AnalogyResult",
    "FunctionVectorResult",
    "FunctionVectorSweep",
    "OVector",
    "OVectorEffect",
    "OVectorSweep",
    "RelationalResult",
    "Stages",
    "TaskPass",
    "TaskScore",
    "Trajectory",
    "analogy",
    "default_sweep_layers",
    "extract_ovector",
    "ffn_ablation",
    "ffn_attribution",
    "fit_ovector",
    "function_vector",
    "function_vector_sweep",
    "offset_accuracy",
    "ovector_controls",
    "ovector_intervention",
    "ovector_sweep",
    "random_ovector",
    "random_word_contexts",
    "relational_analysis",
    "score_task",
    "shuffled_prompts",
    "task_pass",
    "trajectory",
    "tuned_intervention",
]
