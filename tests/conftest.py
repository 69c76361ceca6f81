"""Shared fixtures: a tiny random model for unit tests, SmolLM2 once per session for integration."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import matplotlib

matplotlib.use("Agg")

import mechprobe as mp

# The keys issue 7 requires in an erasure's result.json (`mechprobe erase`, AmnesicResult.to_json).
ERASE_RESULT_KEYS = (
    "n_removed",
    "probe_accuracy_before",
    "probe_accuracy_after",
    "majority_baseline",
    "random_control_probe_accuracy",
    "lm_kl",
    "random_control_lm_kl",
    "task_accuracy_before",
    "task_accuracy_after",
    "random_control_task_accuracy",
)


def hook_count(model: Any) -> int:
    """All hooks on the model: TransformerLens hook-point handles and raw torch module hooks."""
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    torch_hooks = sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )
    return lens + torch_hooks


@pytest.fixture(scope="session")
def tiny() -> Any:
    return mp.tiny_model(seed=0)


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The embedded SmolLM2-135M-Instruct, loaded once for every integration test."""
    return mp.load_model()
