"""Relational tasks in the model (Merullo et al.): scores, early-decoding stages, o-vectors and
their interventions with controls, FFN ablation, analogies, and the one-call analysis."""

from mechprobe.relational._ablation import AblationResult, ffn_ablation
from mechprobe.relational._analogy import AnalogyResult, analogy, offset_accuracy
from mechprobe.relational._analysis import relational_analysis
from mechprobe.relational._contexts import intervention_contexts
from mechprobe.relational._intervention import InterventionResult, ovector_intervention
from mechprobe.relational._ovector import OVector, extract_ovector, random_ovector
from mechprobe.relational._result import RelationalResult
from mechprobe.relational._scoring import TaskScore, score_task
from mechprobe.relational._sweep import SweepResult, ovector_sweep
from mechprobe.relational._trajectory import Stages, Trajectory, ffn_attribution, trajectory

__all__ = [
    "AblationResult",
    "AnalogyResult",
    "InterventionResult",
    "OVector",
    "RelationalResult",
    "Stages",
    "SweepResult",
    "TaskScore",
    "Trajectory",
    "analogy",
    "extract_ovector",
    "ffn_ablation",
    "ffn_attribution",
    "intervention_contexts",
    "offset_accuracy",
    "ovector_intervention",
    "ovector_sweep",
    "random_ovector",
    "relational_analysis",
    "score_task",
    "trajectory",
]
