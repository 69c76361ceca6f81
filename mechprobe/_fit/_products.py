"""Products of a few rows with a tall matrix (probe fitting's inner loop), through oneDNN on CPU.

Fitting a probe multiplies ``[K, d]`` weights by ``[n, d]`` activations and ``[K, n]`` residuals
by the same activations, with ``K`` ~10 classes and ``n`` ~10⁴ examples. For these shapes
PyTorch's default CPU BLAS (MKL) runs at about half the memory bandwidth, while oneDNN's inner
product kernel (``torch.ops.mkldnn._linear_pointwise``, the op ``torch.compile`` uses for linear
layers on CPU) is ~1.7x faster forward and ~2.4x faster backward, in float32 with float32
accumulation (measured on this project's 2-core AMD EPYC: 16,000 x 576, 10 classes). The op is
private to PyTorch, so it is used only for contiguous float32 CPU tensors, after a one-time check
against ``torch.matmul`` on random data, and any other case (or a PyTorch without it) takes
``torch.matmul``. Even so the kernel, not memory, bounds these products on that CPU: at 80,776 x 576
and 15 classes (one thread) the forward product takes 64-82 ms, about 20 GFLOP/s against 45 for a
large square product and four times the 19 ms that reading ``X`` once takes; 30 classes cost
1.0-1.25x as much as 15. Strided inputs are excluded: oneDNN copies them, ~500x slower. With
the AVX2 paths forced (8,078 x 576, 15 classes, one thread) a product takes 3.1-4.4 ms where
reading ``X`` takes 0.74 ms; ``torch.mm`` and ``bmm`` over row chunks were slower (6.4-8.9 ms).
The other orientation, ``X Wᵀ`` read back transposed, was 10-25% faster alone (1,600-80,776 rows,
both paths, a few layers' ``X`` in turn) but not inside ``probe_layers`` at 10,097 rows (products
4.56 s instead of 4.64 s with the AVX2 paths forced, 3.56 s both natively; the subtraction that
reads it back took 0.07 s more). Also measured and not kept: the backward products in the reverse
order of the forward ones, so that the last layers' rows are still cached (1.16 vs 1.18 s at 2,000
rows with the AVX2 paths forced, 4.36 vs 4.71 s at 10,097 natively; medians of alternating runs,
two threads); 16 classes instead of 15 (padding) made no product faster (forward 3.20 -> 3.51 ms
with the AVX2 paths forced, 2.15 -> 2.51 ms natively, 8,078 rows); numpy's OpenBLAS took 4.4 /
3.4 ms (forward / backward) with the AVX2 paths forced.
:func:`mechprobe.solver_path` (or ``MECHPROBE_SOLVER_PATH``) forces either path.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe._fit._paths import current_solver_path


def times_transposed(a: Float[Tensor, "m k"], b: Float[Tensor, "n k"]) -> Float[Tensor, "m n"]:
    """``a @ b.T``.

    Example:
        >>> import torch
        >>> a, b = torch.randn(3, 5), torch.randn(7, 5)
        >>> torch.allclose(times_transposed(a, b), a @ b.T, atol=1e-5)
        True
    """
    if _fast(a, b):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return a @ b.T


def times(a: Float[Tensor, "m n"], b: Float[Tensor, "n k"]) -> Float[Tensor, "m k"]:
    """``a @ b``.

    Example:
        >>> import torch
        >>> a, b = torch.randn(3, 7), torch.randn(7, 5)
        >>> torch.allclose(times(a, b), a @ b, atol=1e-5)
        True
    """
    if _fast(a, b):
        # linear(a, w) = a @ wᵀ; the transposed view of a contiguous b is what oneDNN wants.
        return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")
    return a @ b


def _fast(a: Tensor, b: Tensor) -> bool:
    return (
        a.dtype == b.dtype == torch.float32
        and a.device.type == b.device.type == "cpu"
        and a.is_contiguous()
        and b.is_contiguous()
        and current_solver_path().uses_onednn()
    )
