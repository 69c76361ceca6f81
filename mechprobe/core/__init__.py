"""What every analysis stands on: models, sites, batches, hooks, runs and the one readout.

The analyses (:mod:`mechprobe.lens`, :mod:`mechprobe.patching`, :mod:`mechprobe.relational`,
:mod:`mechprobe.probing`, :mod:`mechprobe.erasure`) import the engine from here and nowhere else;
``core`` imports no analysis. Users find the same names in :mod:`mechprobe` itself.
"""

from mechprobe.core._adapter import ModelAdapter, ModelKind, model_adapter
from mechprobe.core._batching import (
    Batch,
    PaddingSide,
    PositionSpec,
    first_token_ids,
    pad_id,
    pad_rows,
    position_list,
    tokenize,
    tokenize_with_targets,
)
from mechprobe.core._generation import GenerationResult, generate
from mechprobe.core._hooks import (
    Ablate,
    Add,
    Capture,
    Gradient,
    Intervention,
    InterventionSpec,
    Project,
    Replace,
    StopForward,
    check_heads_sum,
    differentiate,
    gradients_enabled,
    intervene,
)
from mechprobe.core._models import (
    DEFAULT_MODEL,
    ModelLoadError,
    cache_dir,
    load_model,
    save_model,
    tiny_model,
)
from mechprobe.core._notebook import show_figures_in_notebooks
from mechprobe.core._precision import native_bfloat16
from mechprobe.core._progress import progress_bar, progress_enabled
from mechprobe.core._readout import Readout, readout, target_rank, top1_hit
from mechprobe.core._results import (
    Result,
    decode,
    encode,
    figure_of,
    load_result,
    new_axes,
    read_tensors,
    write_atomic,
    write_tensors,
)
from mechprobe.core._runner import RunResult, forward, run
from mechprobe.core._seeding import keyed_seed
from mechprobe.core._sites import (
    HEAD_KINDS,
    Layers,
    Positions,
    Site,
    SiteKind,
    SiteLike,
    expand_sites,
    head_count,
    query_heads,
    resolve_layers,
    resolve_site,
    resolve_sites,
    width,
)
from mechprobe.core._validation import (
    as_int,
    check_choice,
    check_finite,
    check_float,
    check_int,
    check_seed,
    class_labels,
)

__all__ = [
    "DEFAULT_MODEL",
    "HEAD_KINDS",
    "Ablate",
    "Add",
    "Batch",
    "Capture",
    "GenerationResult",
    "Gradient",
    "Intervention",
    "InterventionSpec",
    "Layers",
    "ModelAdapter",
    "ModelKind",
    "ModelLoadError",
    "PaddingSide",
    "PositionSpec",
    "Positions",
    "Project",
    "Readout",
    "Replace",
    "Result",
    "RunResult",
    "Site",
    "SiteKind",
    "SiteLike",
    "StopForward",
    "as_int",
    "cache_dir",
    "check_choice",
    "check_finite",
    "check_float",
    "check_heads_sum",
    "check_int",
    "check_seed",
    "class_labels",
    "decode",
    "differentiate",
    "encode",
    "expand_sites",
    "figure_of",
    "first_token_ids",
    "forward",
    "generate",
    "gradients_enabled",
    "head_count",
    "intervene",
    "keyed_seed",
    "load_model",
    "load_result",
    "model_adapter",
    "native_bfloat16",
    "new_axes",
    "pad_id",
    "pad_rows",
    "position_list",
    "progress_bar",
    "progress_enabled",
    "query_heads",
    "read_tensors",
    "readout",
    "resolve_layers",
    "resolve_site",
    "resolve_sites",
    "run",
    "save_model",
    "target_rank",
    "tiny_model",
    "tokenize",
    "tokenize_with_targets",
    "top1_hit",
    "width",
    "write_atomic",
    "write_tensors",
]

# In a notebook, every result's plot() shows as an image without %matplotlib inline first.
show_figures_in_notebooks()
