"""Layer-wise probing: collect activations, build labelled datasets, fit probes at every layer."""

from mechprobe.probing._activations import Activations, collect
from mechprobe.probing._datasets import ProbingDataset, pos_dataset
from mechprobe.probing._labels import load_labels
from mechprobe.probing._layerwise import ProbeResult, probe_layers
from mechprobe.probing._probes import LinearProbe, MLPProbe, control_labels
from mechprobe.probing._scalar_mix import CumulativeScores, ScalarMixProbe, cumulative_scores
from mechprobe.probing._templated import country_dataset, templated_dataset

__all__ = [
    "Activations",
    "CumulativeScores",
    "LinearProbe",
    "MLPProbe",
    "ProbeResult",
    "ProbingDataset",
    "ScalarMixProbe",
    "collect",
    "control_labels",
    "country_dataset",
    "cumulative_scores",
    "load_labels",
    "pos_dataset",
    "probe_layers",
    "templated_dataset",
]
