"""Concept erasure: INLP and LEACE erasers, random controls, amnesic probing inside the model."""

from mechprobe.erasure._amnesic import amnesic, control_projections
from mechprobe.erasure._eraser import (
    Eraser,
    dropout_projection,
    identity_projection,
    random_projection,
)
from mechprobe.erasure._inlp import inlp
from mechprobe.erasure._leace import LeaceFitter, leace
from mechprobe.erasure._result import AmnesicMeasure, AmnesicResult
from mechprobe.erasure._sweep import ErasureSweep, fit_erasure, layer_sweep

__all__ = [
    "AmnesicMeasure",
    "AmnesicResult",
    "Eraser",
    "ErasureSweep",
    "LeaceFitter",
    "amnesic",
    "control_projections",
    "dropout_projection",
    "fit_erasure",
    "identity_projection",
    "inlp",
    "layer_sweep",
    "leace",
    "random_projection",
]
