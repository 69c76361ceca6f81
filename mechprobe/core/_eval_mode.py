"""Analyses run the model in eval mode: dropout off for the call, the caller's mode back after.

A model left in train mode (``model.train()`` in a notebook, or a Hugging Face model never put in
eval) keeps its dropout live: on a GPT-2-style bridge with dropout 0.1 every analysis gave other
numbers on each call (logits 4.6 apart, patching cells 1.3), with no error (review 21a). An
analysis measures the model, so it runs it as evaluated; the training flag of every module is put
back afterwards, also when the analysis raises. :func:`mechprobe.intervene` alone leaves the mode
to its caller, whose own forward pass (perhaps a training step) runs inside it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any, ParamSpec, TypeVar

import torch

__all__ = ["eval_mode", "evaluates"]

P = ParamSpec("P")
R = TypeVar("R")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """``model`` in eval mode for the ``with`` block; each module's own mode is restored after.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model().train()
        >>> with eval_mode(model):
        ...     model.training
        False
        >>> model.training
        True
    """
    if id(model) in _EVALUATED.get():  # an analysis inside another: the outer one did it
        yield model
        return
    training = [module for module in _modules(model) if module.training]
    token = _EVALUATED.set(_EVALUATED.get() | {id(model)})
    for module in training:
        module.training = False
    try:
        yield model
    finally:
        for module in training:
            module.training = True
        _EVALUATED.reset(token)


# The models an enclosing eval_mode holds (by id): listing a model's modules takes ~3 ms on
# SmolLM2 (2,000 modules in the bridge and as many in its Hugging Face model), which analyses
# calling one another (generate's run per step) paid at every call.
_EVALUATED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "mechprobe_evaluated", default=frozenset()
)


def _modules(model: Any) -> list[torch.nn.Module]:
    """The model's modules and those of the Hugging Face model a bridge wraps (its
    ``original_model`` is not a submodule, yet its top-level dropout runs in the bridge's pass)."""
    found: dict[int, torch.nn.Module] = {}
    for root in (model, getattr(model, "original_model", None)):
        if isinstance(root, torch.nn.Module):
            found |= {id(module): module for module in root.modules()}
    return list(found.values())


def evaluates(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with its ``model`` argument in :func:`eval_mode`.

    Example:
        >>> import mechprobe as mp
        >>> @evaluates
        ... def mode(model):
        ...     return model.training
        >>> model = mp.tiny_model().train()
        >>> mode(model), model.training
        (False, True)
    """
    signature = inspect.signature(fn)
    if "model" not in signature.parameters:
        raise TypeError(f"{fn.__qualname__} takes no model argument to put in eval mode.")
    index = list(signature.parameters).index("model")

    @functools.wraps(fn)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[index] if index < len(args) else kwargs.get("model")
        with eval_mode(model):
            return fn(*args, **kwargs)

    # Read by the test that every analysis taking a model is wrapped (functools.wraps carries it
    # through later wrappers, such as the deprecated-keyword one).
    wrapped.runs_in_eval_mode = True  # type: ignore[attr-defined]
    return wrapped
