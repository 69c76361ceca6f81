"""Shared fixtures: a tiny random model for unit tests, SmolLM2 once per session for integration."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MECHPROBE_PROGRESS", "0")  # bars are on by default; test logs stay clean

import matplotlib

matplotlib.use("Agg")

import mechprobe as mp
from mechprobe._fit._paths import SolverPath, _onednn_works

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


# Every kernel path the probe solver can take (mechprobe.solver_path): tests of the solver run on
# each of them on whatever machine runs the suite, so no result depends on the CPU's features.
SOLVER_PATHS = (
    "products=matmul,gram=float32",
    "products=matmul,gram=bfloat16",
    "products=onednn,gram=float32",
    "products=onednn,gram=bfloat16",
)


@pytest.fixture(params=SOLVER_PATHS)
def every_solver_path(request: pytest.FixtureRequest) -> Any:
    path = SolverPath.parse(request.param)
    if path.products == "onednn" and not _onednn_works():
        pytest.skip("oneDNN's inner-product kernel is not available in this PyTorch build")
    with mp.solver_path(products=path.products, gram=path.gram) as forced:
        yield forced
