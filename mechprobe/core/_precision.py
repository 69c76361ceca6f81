"""Whether a device multiplies bfloat16 natively: only there is bfloat16 a speed-up.

Code that would run a product in bfloat16 for speed (the tuned lens's unembedding products, the
probe solver's preconditioner) asks here first. A CPU without bfloat16 instructions (AVX512-BF16
or AMX) emulates them, and PyTorch's fallback is then far slower than float32: on an AVX2-only
AMD EPYC (2026-12-02) a ``[256, 576] @ [576, 49152]`` product took 47 s in bfloat16 and 0.26 s in
float32, where on an EPYC with AVX512-BF16 bfloat16 was the faster one.
"""

from __future__ import annotations

import torch

__all__ = ["native_bfloat16"]


def native_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 matrix products natively (not emulated).

    On CPU: oneDNN's own check for bfloat16 instructions (AVX512-BF16, AMX); on CUDA: the GPU's
    bfloat16 support; on any other device: False.

    Example:
        >>> from mechprobe.core import native_bfloat16
        >>> isinstance(native_bfloat16("cpu"), bool)
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False
