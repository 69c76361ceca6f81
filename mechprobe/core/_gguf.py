"""Reading the weights of a GGUF file as a Hugging Face Llama state dict, in one pass.

The cold :func:`~mechprobe.core.load_model` used to let transformers read the embedded GGUF three
times (tokenizer, config, weights); each read parses every metadata field, 49k vocabulary strings
and 48k merges one memmap view at a time (about 3 s of CPU each), and the weights read also built
gguf-py's tensor-name table once per module (about 400 times). Here the metadata is skipped with
a few ``struct`` reads, only the tensor table is parsed, and each tensor is dequantised straight
from the file's bytes with gguf-py's own kernels. The tokenizer and config still come from
transformers (their conversions are the reference); the weights are checked against transformers'
own GGUF loader in ``tests/test_models.py``.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["GGUFError", "llama_state_dict", "read_tensors"]

_MAGIC = b"GGUF"
#: Byte sizes of GGUF metadata scalars by value-type id (8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

#: GGUF tensor names (llama.cpp's) -> Hugging Face Llama parameter names.
_LLAMA_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LLAMA_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFError(ValueError):
    """The file is not a GGUF this reader understands (truncated, another version, a new type)."""


class _Cursor:
    """Little-endian reads from a bytes buffer, with a clear error when the file ends early."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data, self.at, self.path = data, 0, path

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        if self.at + size > len(self.data):
            raise GGUFError(f"{self.path} ends inside its header: the file is truncated.")
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += size
        return values

    def string(self) -> str:
        (length,) = self.take("<Q")
        self.at += length
        if self.at > len(self.data):
            raise GGUFError(f"{self.path} ends inside its header: the file is truncated.")
        return bytes(self.data[self.at - length : self.at]).decode("utf-8")

    def skip_value(self, kind: int) -> None:
        if kind in _SCALAR_SIZES:
            self.at += _SCALAR_SIZES[kind]
        elif kind == _STRING:
            (length,) = self.take("<Q")
            self.at += length
        elif kind == _ARRAY:
            item, count = self.take("<IQ")
            if item in _SCALAR_SIZES:
                self.at += _SCALAR_SIZES[item] * count
            else:  # strings or nested arrays: each carries its own length
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise GGUFError(f"{self.path}: unknown GGUF metadata type {kind}.")


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantised to float32, in the file's (row-major) shape.

    Args:
        path: A GGUF file, version 2 or 3.

    Returns:
        ``{gguf_name: array}`` in file order; an array's shape is the GGUF dims reversed (numpy
        order), e.g. ``token_embd.weight`` is ``[vocab, d_model]``.

    Raises:
        GGUFError: Not a GGUF, an unsupported version, a truncated file, an unknown tensor type.

    Example:
        >>> read_tensors(Path("/nonexistent.gguf"))  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    raw = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(raw), path)  # type: ignore[arg-type]
    if bytes(raw[:4]) != _MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    cur.at = 4
    version, n_tensors, n_fields = cur.take("<IQQ")
    if version not in (2, 3):
        raise GGUFError(f"{path} is GGUF version {version}; this reader knows versions 2 and 3.")
    alignment = 32
    for _ in range(n_fields):
        key = cur.string()
        (kind,) = cur.take("<I")
        if key == "general.alignment" and kind == _UINT32:
            (alignment,) = cur.take("<I")
        else:
            cur.skip_value(kind)
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.take("<I")
        dims = cur.take(f"<{n_dims}Q")
        kind, offset = cur.take("<IQ")
        infos.append((name, dims, kind, offset))
    start = -(-cur.at // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        try:
            qtype = GGMLQuantizationType(kind)
        except ValueError as err:
            raise GGUFError(f"{path}: tensor {name} has an unknown type {kind}.") from err
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in reversed(dims))
        row_bytes = shape[-1] // block * block_bytes
        n_bytes = int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes
        begin = start + offset
        if begin + n_bytes > raw.shape[0]:
            raise GGUFError(f"{path} ends inside tensor {name}: the file is truncated.")
        data = np.asarray(raw[begin : begin + n_bytes]).reshape(*shape[:-1], row_bytes)
        array = np.asarray(dequantize(data, qtype), dtype=np.float32).reshape(shape)
        # float32 tensors come back as views of the read-only map: copy them, so the result is
        # writable and holds no reference to the file.
        tensors[name] = array if array.flags.writeable else array.copy()
    return tensors


def _unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows: within each head, GGUF interleaves the two rotary
    halves row by row (pair-major) where Hugging Face keeps them as two contiguous halves."""
    rows = weight.shape[0] // n_heads
    return weight.reshape(n_heads, rows // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def llama_state_dict(path: Path, n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A Llama GGUF's weights under Hugging Face ``LlamaForCausalLM`` names, float32.

    Args:
        path: The GGUF file (llama.cpp's tensor names: ``token_embd``, ``blk.N.attn_q``, ...).
        n_heads: Query heads (the config's ``num_attention_heads``).
        n_kv_heads: Key/value heads (``num_key_value_heads``).

    Returns:
        ``{hf_name: tensor}``; ``lm_head.weight`` only when the file has an untied ``output``.

    Raises:
        GGUFError: A tensor name that a Llama checkpoint does not have.

    Example:
        >>> llama_state_dict(Path("/nonexistent.gguf"), 9, 3)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    state = {}
    for name, array in read_tensors(path).items():
        weight = torch.from_numpy(array)
        block = _BLOCK.fullmatch(name)
        if name in _LLAMA_TOP:
            state[_LLAMA_TOP[name]] = weight
        elif block and block.group(2) in _LLAMA_NAMES:
            part = block.group(2)
            if part == "attn_q":
                weight = _unpermute_rotary(weight, n_heads)
            elif part == "attn_k":
                weight = _unpermute_rotary(weight, n_kv_heads)
            state[f"model.layers.{block.group(1)}.{_LLAMA_NAMES[part]}.weight"] = weight
        else:
            raise GGUFError(f"{path}: tensor {name} is not part of a Llama checkpoint.")
    return state
