"""mechprobe: mechanistic interpretability on TransformerLens hooks.

Early decoding (logit lens), FFN-update patching for relational tasks, layer-wise linear probes and
nullspace projection / amnesic probing, on any TransformerLens model (``TransformerBridge`` first).

Example:
    >>> import mechprobe as mp
    >>> model = mp.tiny_model()
    >>> model.cfg.n_layers
    3
"""

from __future__ import annotations

from mechprobe.activations import Activations, collect
from mechprobe.amnesic import amnesic, control_projections
from mechprobe.amnesic_result import AmnesicMeasure, AmnesicResult
from mechprobe.analogy import AnalogyResult, analogy, offset_accuracy
from mechprobe.batching import Batch, tokenize, tokenize_with_targets
from mechprobe.datasets import ProbingDataset, pos_dataset
from mechprobe.erasure_sweep import ErasureSweep, fit_erasure, layer_sweep
from mechprobe.ffn_ablation import AblationResult, ffn_ablation
from mechprobe.ffn_intervention import InterventionResult, ovector_intervention
from mechprobe.hooks import Ablate, Add, Capture, Intervention, Project, Replace, intervene
from mechprobe.label_files import load_labels
from mechprobe.layerwise import ProbeResult, probe_layers
from mechprobe.leace import leace
from mechprobe.lens import LensResult, logit_lens
from mechprobe.models import DEFAULT_MODEL, ModelLoadError, load_model, tiny_model
from mechprobe.nullspace import inlp
from mechprobe.ovector import OVector, extract_ovector, random_ovector
from mechprobe.ovector_sweep import SweepResult, ovector_sweep
from mechprobe.patching import PatchMetric, PatchResult, answer_prob, logit_diff, patch
from mechprobe.probes import LinearProbe, MLPProbe, control_labels
from mechprobe.projection import (
    Projection,
    dropout_projection,
    identity_projection,
    random_projection,
)
from mechprobe.random_contexts import intervention_contexts
from mechprobe.relational import RelationalResult, relational_analysis
from mechprobe.runner import RunResult, run
from mechprobe.scalar_mix import CumulativeScores, ScalarMixProbe, cumulative_scores
from mechprobe.scoring import TaskScore, score_task
from mechprobe.sites import Site
from mechprobe.solver_paths import SolverPath, solver_path
from mechprobe.tasks import Task, TaskItem, list_tasks, load_task
from mechprobe.templated import country_dataset, templated_dataset
from mechprobe.trajectory import Stages, Trajectory, ffn_attribution, trajectory

__version__ = "0.1.0"

__all__: list[str] = [
    "DEFAULT_MODEL",
    "Ablate",
    "AblationResult",
    "Activations",
    "Add",
    "AmnesicMeasure",
    "AmnesicResult",
    "AnalogyResult",
    "Batch",
    "Capture",
    "CumulativeScores",
    "ErasureSweep",
    "Intervention",
    "InterventionResult",
    "LensResult",
    "LinearProbe",
    "MLPProbe",
    "ModelLoadError",
    "OVector",
    "PatchMetric",
    "PatchResult",
    "ProbeResult",
    "ProbingDataset",
    "Project",
    "Projection",
    "RelationalResult",
    "Replace",
    "RunResult",
    "ScalarMixProbe",
    "Site",
    "SolverPath",
    "Stages",
    "SweepResult",
    "Task",
    "TaskItem",
    "TaskScore",
    "Trajectory",
    "__version__",
    "amnesic",
    "analogy",
    "answer_prob",
    "collect",
    "control_labels",
    "control_projections",
    "country_dataset",
    "cumulative_scores",
    "dropout_projection",
    "extract_ovector",
    "ffn_ablation",
    "ffn_attribution",
    "fit_erasure",
    "identity_projection",
    "inlp",
    "intervene",
    "intervention_contexts",
    "layer_sweep",
    "leace",
    "list_tasks",
    "load_labels",
    "load_model",
    "load_task",
    "logit_diff",
    "logit_lens",
    "offset_accuracy",
    "ovector_intervention",
    "ovector_sweep",
    "patch",
    "pos_dataset",
    "probe_layers",
    "random_ovector",
    "random_projection",
    "relational_analysis",
    "run",
    "score_task",
    "solver_path",
    "templated_dataset",
    "tiny_model",
    "tokenize",
    "tokenize_with_targets",
    "trajectory",
]
