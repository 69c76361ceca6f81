"""Which kernels the probe solver uses, and the one switch that forces them.

The batched logistic solver (probes, INLP, the scalar mix) has two places where the CPU decides the
code path. Both change only how fast a fit reaches its optimum, never which optimum: a fit stops
when its largest gradient entry is at most ``tol`` on every path.

- ``products``: the narrow products of weights with activations. ``"onednn"`` runs them through
  oneDNN's inner-product kernel (about twice as fast as MKL for 10 classes x 16k rows x 576), used
  for contiguous float32 CPU tensors only; ``"matmul"`` is ``torch.matmul`` everywhere.
- ``gram``: the Gram matrix of the preconditioner. ``"bfloat16"`` computes it in bfloat16 (about
  4x faster where the CPU has native bfloat16 products; a preconditioner need not be exact, and
  a factor that rounding made indefinite is recomputed in the features' dtype); ``"float32"``
  computes it in the features' own dtype.

``"auto"`` (the default) picks oneDNN where it is present and agrees with ``torch.matmul`` on a
check, and bfloat16 where the CPU multiplies it natively. Force a path for a block of code with
:func:`solver_path`, or for a whole process with the environment variable
``MECHPROBE_SOLVER_PATH``: ``portable`` (matmul and float32: the same arithmetic on every CPU),
``auto``, or ``products=onednn,gram=bfloat16``. Which instruction set oneDNN and PyTorch's kernels
use (AMX, AVX-512, AVX2) is PyTorch's own process-wide setting: start Python with
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` to run as on a CPU without AMX or AVX-512
(the test suite does so in a subprocess).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypeAlias

import torch

__all__ = ["SolverPath", "current_solver_path", "solver_path"]

Products: TypeAlias = Literal["auto", "onednn", "matmul"]
Gram: TypeAlias = Literal["auto", "bfloat16", "float32"]
_ENV = "MECHPROBE_SOLVER_PATH"
_PRODUCTS = ("auto", "onednn", "matmul")
_GRAMS = ("auto", "bfloat16", "float32")
_PRESETS = {"auto": ("auto", "auto"), "portable": ("matmul", "float32")}


@dataclass(frozen=True)
class SolverPath:
    """The solver's kernel choices: ``products`` and ``gram`` (see the module docstring).

    Attributes:
        products: ``"auto"``, ``"onednn"`` or ``"matmul"``: the kernel of the weights' products
            with the activations.
        gram: ``"auto"``, ``"bfloat16"`` or ``"float32"``: the dtype of the preconditioner's
            Gram matrix.

    Example:
        >>> SolverPath.parse("portable")
        SolverPath(products='matmul', gram='float32')
    """

    products: Products = "auto"
    gram: Gram = "auto"

    def __post_init__(self) -> None:
        if self.products not in _PRODUCTS:
            raise ValueError(
                f"products must be one of {_PRODUCTS}, got {self.products!r}: 'onednn' forces "
                "oneDNN's inner-product kernel, 'matmul' torch.matmul."
            )
        if self.gram not in _GRAMS:
            raise ValueError(
                f"gram must be one of {_GRAMS}, got {self.gram!r}: 'bfloat16' forces a bfloat16 "
                "Gram matrix in the preconditioner, 'float32' the features' own dtype."
            )

    @classmethod
    def parse(cls, text: str) -> SolverPath:
        """Read ``"auto"``, ``"portable"`` or ``"products=...,gram=..."`` (either part optional).

        Args:
            text: The setting, as ``MECHPROBE_SOLVER_PATH`` holds it (case and surrounding spaces
                do not matter).

        Returns:
            The :class:`SolverPath` (a part left out is ``"auto"``).

        Raises:
            ValueError: an unknown preset, key or value; the message lists the valid ones.
        """
        text = text.strip().lower()
        if text in _PRESETS:
            products, gram = _PRESETS[text]
            return cls(products, gram)  # type: ignore[arg-type]
        settings: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("products", "gram"):
                raise ValueError(
                    f"{_ENV}={text!r} is not understood: use 'auto', 'portable' or e.g. "
                    "'products=matmul,gram=float32' (products: auto|onednn|matmul; gram: "
                    "auto|bfloat16|float32)."
                )
            settings[key.strip()] = value.strip()
        return cls(**settings)  # type: ignore[arg-type]

    def uses_onednn(self) -> bool:
        """Whether float32 CPU products go through oneDNN on this machine under this path.

        Returns:
            False for ``"matmul"``; otherwise whether oneDNN's kernel exists and agrees with
            ``torch.matmul`` (checked once per process).

        Raises:
            RuntimeError: ``products="onednn"`` was forced where oneDNN's kernel is missing or
                disagrees with ``torch.matmul``.
        """
        if self.products == "matmul":
            return False
        works = _onednn_works()
        if self.products == "onednn" and not works:
            raise RuntimeError(
                "products='onednn' was forced, but oneDNN's inner-product kernel is not available "
                "in this PyTorch build (or disagrees with torch.matmul): use products='matmul' or "
                "'auto'."
            )
        return works

    def uses_bfloat16_gram(self, X: torch.Tensor) -> bool:
        """Whether the preconditioner's Gram matrix of ``X`` is computed in bfloat16.

        Args:
            X: The features whose Gram matrix is wanted.

        Returns:
            False for non-float or bfloat16 features; with ``gram`` forced, whether it is
            ``"bfloat16"``; under ``"auto"``, True for float32 features on CUDA, or on a CPU that
            multiplies bfloat16 natively.
        """
        if not X.is_floating_point() or X.dtype == torch.bfloat16:
            return False
        if self.gram != "auto":
            return self.gram == "bfloat16"
        if X.dtype != torch.float32:
            return False
        if X.device.type == "cuda":
            return True
        return X.device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_CURRENT: contextvars.ContextVar[SolverPath | None] = contextvars.ContextVar(
    "mechprobe_solver_path", default=None
)


def current_solver_path() -> SolverPath:
    """The path in force: the innermost :func:`solver_path`, else ``MECHPROBE_SOLVER_PATH``.

    Example:
        >>> with solver_path(products="matmul"):
        ...     current_solver_path().products
        'matmul'
    """
    chosen = _CURRENT.get()
    if chosen is not None:
        return chosen
    return _parse(os.environ.get(_ENV, "auto"))


# The products ask for the path at every call: parse each setting once.
_parse = functools.lru_cache(maxsize=16)(SolverPath.parse)


@contextlib.contextmanager
def solver_path(
    preset: Literal["auto", "portable"] | None = None,
    *,
    products: Products | None = None,
    gram: Gram | None = None,
) -> Iterator[SolverPath]:
    """Force the solver's kernels inside a ``with`` block (restored afterwards, also on errors).

    Args:
        preset: ``"portable"`` (matmul products, float32 Gram: the same arithmetic on every CPU)
            or ``"auto"``; ``None`` starts from the path already in force.
        products: ``"auto"``, ``"onednn"`` or ``"matmul"``.
        gram: ``"auto"``, ``"bfloat16"`` or ``"float32"``.

    Yields:
        The :class:`SolverPath` in force inside the block.

    Raises:
        RuntimeError: ``products="onednn"`` on a PyTorch without a working oneDNN kernel.

    Example:
        >>> import torch, mechprobe as mp
        >>> X = torch.randn(1, 200, 4)
        >>> with mp.solver_path("portable"):
        ...     probe = mp.LinearProbe().fit(X[0].numpy(), (X[0, :, 0] > 0).numpy())
    """
    base = SolverPath.parse(preset) if preset is not None else current_solver_path()
    path = SolverPath(products or base.products, gram or base.gram)
    path.uses_onednn()  # a forced oneDNN path that cannot run fails here, not mid-fit
    token = _CURRENT.set(path)
    try:
        yield path
    finally:
        _CURRENT.reset(token)


@functools.cache
def _onednn_works() -> bool:
    """Whether the oneDNN op exists and agrees with ``torch.matmul`` (checked once)."""
    if not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(10, 300, generator=gen), torch.randn(500, 300, generator=gen)
    g = torch.randn(10, 500, generator=gen)
    try:
        forward = torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
        backward = torch.ops.mkldnn._linear_pointwise(g, b.T, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return (
        forward.shape == (10, 500)
        and backward.shape == (10, 300)
        and torch.allclose(forward, a @ b.T, rtol=1e-4, atol=1e-3)
        and torch.allclose(backward, g @ b, rtol=1e-4, atol=1e-3)
    )
