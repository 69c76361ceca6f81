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
from mechprobe.core._hooks import (
    Ablate,
    Add,
    Capture,
    Intervention,
    InterventionSpec,
    Project,
    Replace,
    StopForward,
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
from mechprobe.core._progress import progress_bar, progress_enabled
from mechprobe.core._readout import Readout, readout
from mechprobe.core._results import (
    Result,
    decode,
    encode,
    figure_of,
    load_result,
    new_axes,
    write_atomic,
)
from mechprobe.core._runner import RunResult, forward, run
from mechprobe.core._sites import (
    Layers,
    Positions,
    Site,
    SiteKind,
    SiteLike,
    expand_sites,
    resolve_layers,
    resolve_site,
    resolve_sites,
    width,
)
from mechprobe.core._validation import as_int, check_choice, check_finite, check_float, check_int

__all__ = [
    "DEFAULT_MODEL",
    "Ablate",
    "Add",
    "Batch",
    "Capture",
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
    "check_int",
    "decode",
    "encode",
    "expand_sites",
    "figure_of",
    "first_token_ids",
    "forward",
    "intervene",
    "load_model",
    "load_result",
    "model_adapter",
    "new_axes",
    "pad_id",
    "pad_rows",
    "position_list",
    "progress_bar",
    "progress_enabled",
    "readout",
    "resolve_layers",
    "resolve_site",
    "resolve_sites",
    "run",
    "save_model",
    "tiny_model",
    "tokenize",
    "tokenize_with_targets",
    "width",
    "write_atomic",
]
