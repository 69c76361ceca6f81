"""mechprobe: mechanistic interpretability on TransformerLens hooks.

Early decoding (logit lens), activation patching, FFN-update patching for relational tasks,
layer-wise probes and concept erasure / amnesic probing, on any TransformerLens model
(``TransformerBridge`` first). Every public name lives here; the subpackages (``core``, ``tasks``,
``lens``, ``patching``, ``relational``, ``probing``, ``erasure``) group them by concept.

Example:
    >>> import mechprobe as mp
    >>> model = mp.tiny_model()
    >>> model.cfg.n_layers
    3
"""

from __future__ import annotations

from mechprobe._fit import SolverPath, solver_path
from mechprobe.core import (
    DEFAULT_MODEL,
    Ablate,
    Add,
    Batch,
    Capture,
    Intervention,
    ModelLoadError,
    Project,
    Replace,
    RunResult,
    Site,
    intervene,
    load_model,
    run,
    tiny_model,
    tokenize,
    tokenize_with_targets,
)
from mechprobe.erasure import (
    AmnesicMeasure,
    AmnesicResult,
    Eraser,
    ErasureSweep,
    LeaceFitter,
    amnesic,
    control_projections,
    dropout_projection,
    fit_erasure,
    identity_projection,
    inlp,
    layer_sweep,
    leace,
    random_projection,
)
from mechprobe.lens import (
    Lens,
    LensComparison,
    LensResult,
    LensSpec,
    LogitLens,
    Patchscope,
    TunedLens,
    as_lens,
    compare_lenses,
    english_text,
    logit_lens,
    read_texts,
    train_tuned_lens,
)
from mechprobe.patching import PatchMetric, PatchResult, answer_prob, logit_diff, patch
from mechprobe.probing import (
    Activations,
    CumulativeScores,
    LinearProbe,
    MLPProbe,
    ProbeResult,
    ProbingDataset,
    ScalarMixProbe,
    collect,
    control_labels,
    country_dataset,
    cumulative_scores,
    load_labels,
    pos_dataset,
    probe_layers,
    templated_dataset,
)
from mechprobe.relational import (
    AblationResult,
    AnalogyResult,
    OVector,
    OVectorEffect,
    OVectorSweep,
    RelationalResult,
    Stages,
    TaskPass,
    TaskScore,
    Trajectory,
    analogy,
    default_sweep_layers,
    extract_ovector,
    ffn_ablation,
    ffn_attribution,
    fit_ovector,
    offset_accuracy,
    ovector_controls,
    ovector_intervention,
    ovector_sweep,
    random_ovector,
    random_word_contexts,
    relational_analysis,
    score_task,
    task_pass,
    trajectory,
    tuned_intervention,
)
from mechprobe.tasks import Task, TaskItem, list_tasks, load_task

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
    "Eraser",
    "ErasureSweep",
    "Intervention",
    "LeaceFitter",
    "Lens",
    "LensComparison",
    "LensResult",
    "LensSpec",
    "LinearProbe",
    "LogitLens",
    "MLPProbe",
    "ModelLoadError",
    "OVector",
    "OVectorEffect",
    "OVectorSweep",
    "PatchMetric",
    "PatchResult",
    "Patchscope",
    "ProbeResult",
    "ProbingDataset",
    "Project",
    "RelationalResult",
    "Replace",
    "RunResult",
    "ScalarMixProbe",
    "Site",
    "SolverPath",
    "Stages",
    "Task",
    "TaskItem",
    "TaskPass",
    "TaskScore",
    "Trajectory",
    "TunedLens",
    "__version__",
    "amnesic",
    "analogy",
    "answer_prob",
    "as_lens",
    "collect",
    "compare_lenses",
    "control_labels",
    "control_projections",
    "country_dataset",
    "cumulative_scores",
    "default_sweep_layers",
    "dropout_projection",
    "english_text",
    "extract_ovector",
    "ffn_ablation",
    "ffn_attribution",
    "fit_erasure",
    "fit_ovector",
    "identity_projection",
    "inlp",
    "intervene",
    "layer_sweep",
    "leace",
    "list_tasks",
    "load_labels",
    "load_model",
    "load_task",
    "logit_diff",
    "logit_lens",
    "offset_accuracy",
    "ovector_controls",
    "ovector_intervention",
    "ovector_sweep",
    "patch",
    "pos_dataset",
    "probe_layers",
    "random_ovector",
    "random_projection",
    "random_word_contexts",
    "read_texts",
    "relational_analysis",
    "run",
    "score_task",
    "solver_path",
    "task_pass",
    "templated_dataset",
    "tiny_model",
    "tokenize",
    "tokenize_with_targets",
    "train_tuned_lens",
    "trajectory",
    "tuned_intervention",
]

# Old names, kept for one release (CHANGELOG.md): each still works and says what replaced it.
_RENAMED = {
    "InterventionResult": "OVectorEffect",
    "Projection": "Eraser",
    "SweepResult": "OVectorSweep",
    "intervention_contexts": "random_word_contexts",
}


def __getattr__(name: str) -> object:
    if name in _RENAMED:
        import warnings

        new = _RENAMED[name]
        warnings.warn(
            f"mechprobe.{name} is deprecated and will be removed in the next release; use "
            f"mechprobe.{new} (the same object).",
            DeprecationWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module 'mechprobe' has no attribute {name!r}")
