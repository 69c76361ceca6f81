"""What every analysis stands on: models, sites, batches, hooks, runs and the one readout.

The analyses (:mod:`mechprobe.lens`, :mod:`mechprobe.patching`, :mod:`mechprobe.relational`,
:mod:`mechprobe.probing`, :mod:`mechprobe.erasure`) import the engine from here and nowhere else;
``core`` imports no analysis. Users find the same names in :mod:`mechprobe` itself.
"""

from mechprobe.core._batching import (
    Batch,
    PaddingSide,
    PositionSpec,
    first_token_ids,
    pad_id,
    pad_rows,
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
from mechprobe.core._models import DEFAULT_MODEL, ModelLoadError, cache_dir, load_model, tiny_model
from mechprobe.core._readout import Readout
from mechprobe.core._runner import RunResult, forward, run
from mechprobe.core._sites import (
    Positions,
    Site,
    SiteKind,
    SiteLike,
    resolve_site,
    resolve_sites,
    width,
)

__all__ = [
    "DEFAULT_MODEL",
    "Ablate",
    "Add",
    "Batch",
    "Capture",
    "Intervention",
    "InterventionSpec",
    "ModelLoadError",
    "PaddingSide",
    "PositionSpec",
    "Positions",
    "Project",
    "Readout",
    "Replace",
    "RunResult",
    "Site",
    "SiteKind",
    "SiteLike",
    "StopForward",
    "cache_dir",
    "first_token_ids",
    "forward",
    "intervene",
    "load_model",
    "pad_id",
    "pad_rows",
    "resolve_site",
    "resolve_sites",
    "run",
    "tiny_model",
    "tokenize",
    "tokenize_with_targets",
    "width",
]
