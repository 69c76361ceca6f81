"""Shared fixtures: a tiny random model for unit tests, SmolLM2 once per session for integration."""

from __future__ import annotations

import os
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MECHPROBE_PROGRESS", "0")  # bars are on by default; test logs stay clean

import matplotlib
import torch

matplotlib.use("Agg")

import mechprobe as mp
from mechprobe._fit._paths import SolverPath, _onednn_works
from mechprobe.core import _models
from mechprobe.patching import _engine

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


def pass_recorder(answer: int = 100, wrong: int = 101) -> tuple[list[list[int]], Any]:
    """``(seen, metric)``: a metric of ``(logits, pair)`` (``logit[answer] - logit[wrong]``)
    that records the pair indices of every pass it is called in, in ``seen``."""
    seen: list[list[int]] = []

    def metric(logits: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        seen.append(pair.tolist())
        return logits[:, answer] - logits[:, wrong]

    return seen, metric


def hook_count(model: Any) -> int:
    """All hooks on the model: TransformerLens hook-point handles and raw torch module hooks,
    but for the bridge's own capture hooks, which TransformerLens 4.3 wires into each block's
    norms on the model's first forward pass and keeps (a test counting before a fresh bridge's
    first run saw 6 hooks appear that no one had left behind: a result of test order)."""
    lens = sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in model.hook_dict.values())
    torch_hooks = sum(
        1
        for m in model.modules()
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)
        for hook in hooks.values()
        if "_maybe_wire_capture_hooks" not in getattr(hook, "__qualname__", "")
    )
    return lens + torch_hooks


# The tiny models the unit suite runs on (the `tiny` fixture): MECHPROBE_TEST_MODELS, comma-separated
# from TINY_MODELS; `make test-tl3` runs the suite on the HookedTransformers of TransformerLens 3.x.
TINY_MODELS = {
    "bridge": {"kind": "bridge"},  # Llama with grouped-query attention, as a TransformerBridge
    "hooked": {"kind": "hooked"},  # the same weights as a HookedTransformer
    "hooked-gpt2": {"kind": "hooked", "architecture": "gpt2"},  # LayerNorm, learned positions
    "bridge-gpt2": {"kind": "bridge", "architecture": "gpt2"},
}
_TINY_PARAMS = [
    name.strip() for name in os.environ.get("MECHPROBE_TEST_MODELS", "bridge").split(",")
]
_UNKNOWN = sorted(set(_TINY_PARAMS) - set(TINY_MODELS))
if _UNKNOWN:
    raise ValueError(f"MECHPROBE_TEST_MODELS names {_UNKNOWN}; known: {sorted(TINY_MODELS)}")
#: The model classes the suite runs on (architecture-specific tests build their own models).
TEST_KINDS = sorted({TINY_MODELS[name]["kind"] for name in _TINY_PARAMS})
_HF_TWINS: dict[int, Any] = {}


def tiny_of(name: str, seed: int = 0) -> Any:
    """The tiny model `name` of TINY_MODELS with weights of `seed` (a new one on every call)."""
    spec = TINY_MODELS[name]
    model = mp.tiny_model(seed=seed, **spec)
    # The Hugging Face model of the same weights, built apart: a HookedTransformer keeps none, and
    # a bridge's own (original_model) runs the bridge's attention modules, so it would check the
    # bridge's attention against itself.
    arch = spec.get("architecture", "llama")
    _HF_TWINS[id(model)] = _models._tiny_hf(seed, 3, 64, arch)[0]
    return model


def hf_of_config(config_name: str, **config: Any) -> tuple[Any, Any]:
    """A tiny random Hugging Face model of an architecture tiny_model does not build (the class
    prefix, e.g. "GPTJ"), with the tiny byte-level tokenizer, and that tokenizer."""
    import transformers

    tokenizer = _models._tiny_tokenizer()
    ids = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config_cls = getattr(transformers, f"{config_name}Config")
    model_cls = getattr(transformers, f"{config_name}ForCausalLM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        made = config_cls(vocab_size=len(tokenizer), **ids, **config)
        made.architectures = [model_cls.__name__]  # as a hub config says (TransformerLens reads it)
        hf = model_cls(made)
    return hf.eval(), tokenizer


def bridge_of_config(config_name: str, hub_name: str, **config: Any) -> Any:
    """:func:`hf_of_config`'s model as a TransformerBridge of the published model ``hub_name``
    (which picks TransformerLens's architecture adapter; nothing is downloaded)."""
    return _models._bridge(*hf_of_config(config_name, **config), hub_name, None)


def hf_of(model: Any) -> Any:
    """The Hugging Face model holding the same weights as a tiny model, built apart from it (for
    any other bridge, its own original_model)."""
    twin = _HF_TWINS.get(id(model))
    return twin if twin is not None else model.original_model


@pytest.fixture(scope="session", params=_TINY_PARAMS)
def tiny(request: pytest.FixtureRequest) -> Any:
    return tiny_of(request.param)


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """The embedded SmolLM2-135M-Instruct, loaded once for every integration test."""
    return mp.load_model()


@pytest.fixture(params=["by cost", "every cell"])
def cell_packing(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the patching engine places a cell: where its cost model says (on tiny models, only
    cells editing the last few positions share their base's row), and every cell packed after
    its base's prefix (the engine's row and mask arithmetic at every position)."""
    if request.param == "every cell":
        monkeypatch.setattr(_engine._Costs, "packs", lambda self, n_tok, suffix: True)
    return str(request.param)


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
