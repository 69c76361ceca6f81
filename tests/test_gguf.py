"""The one-pass GGUF weight reader against gguf-py's own reader, on small files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from mechprobe.core import _gguf


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]]) -> None:
    writer = GGUFWriter(str(path), "llama")
    # metadata of every shape the reader must skip: strings, scalar and string arrays, floats
    writer.add_string("general.name", "tiny ünïcode")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "bb", "", "東京"] * 50)
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0] * 100)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    for name, (array, qtype) in tensors.items():
        data = array if qtype == GGMLQuantizationType.F32 else quantize(array, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    return {
        "token_embd.weight": (draw(40, 64), GGMLQuantizationType.Q8_0),
        "output_norm.weight": (draw(64), GGMLQuantizationType.F32),
        "blk.0.attn_q.weight": (draw(64, 64), GGMLQuantizationType.Q4_1),
        "blk.0.attn_k.weight": (draw(32, 64), GGMLQuantizationType.Q4_1),
        "blk.0.ffn_down.weight": (draw(64, 128), GGMLQuantizationType.Q8_0),
    }


def test_read_tensors_equals_gguf_py(tmp_path):
    path = tmp_path / "tiny.gguf"
    tensors = _tensors()
    _write(path, tensors)
    ours = _gguf.read_tensors(path)
    reference = {
        t.name: dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        for t in GGUFReader(path).tensors
    }
    assert list(ours) == list(tensors)  # file order
    for name, (original, _) in tensors.items():
        assert ours[name].dtype == np.float32 and ours[name].flags.writeable
        assert ours[name].shape == original.shape
        np.testing.assert_array_equal(ours[name], reference[name])
    np.testing.assert_array_equal(ours["output_norm.weight"], tensors["output_norm.weight"][0])
    # the quantised ones are close to what was written: the reader found the right bytes
    assert np.abs(ours["blk.0.attn_q.weight"] - tensors["blk.0.attn_q.weight"][0]).max() < 0.5


def test_llama_state_dict_names_and_rotary_order(tmp_path):
    path = tmp_path / "tiny.gguf"
    tensors = _tensors(1)
    _write(path, tensors)
    raw = _gguf.read_tensors(path)
    state = _gguf.llama_state_dict(path, n_heads=4, n_kv_heads=2)
    assert set(state) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
    }
    assert torch.equal(
        state["model.embed_tokens.weight"], torch.from_numpy(raw["token_embd.weight"])
    )
    # llama.cpp stores head h's row 2*i + p where Hugging Face has row p * (rows / 2) + i
    q, gguf_q = state["model.layers.0.self_attn.q_proj.weight"], raw["blk.0.attn_q.weight"]
    per_head = 64 // 4
    for h, i, p in [(0, 0, 1), (1, 3, 0), (3, 7, 1), (2, 5, 1)]:
        hf_row = h * per_head + p * (per_head // 2) + i
        np.testing.assert_array_equal(q[hf_row].numpy(), gguf_q[h * per_head + 2 * i + p])
    k, gguf_k = state["model.layers.0.self_attn.k_proj.weight"], raw["blk.0.attn_k.weight"]
    per_head = 32 // 2
    hf_row = 1 * per_head + 1 * (per_head // 2) + 2
    np.testing.assert_array_equal(k[hf_row].numpy(), gguf_k[1 * per_head + 2 * 2 + 1])


def test_truncated_or_foreign_files_raise_a_clear_error(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write(path, _tensors())
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(_gguf.GGUFError, match="truncated"):
        _gguf.read_tensors(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(data[:200])
    with pytest.raises(_gguf.GGUFError, match="truncated"):
        _gguf.read_tensors(tmp_path / "head.gguf")
    (tmp_path / "other.bin").write_bytes(b"GGML" + data[4:])
    with pytest.raises(_gguf.GGUFError, match="not a GGUF"):
        _gguf.read_tensors(tmp_path / "other.bin")
    _write(tmp_path / "odd.gguf", {"blk.0.attn_sink.weight": _tensors()["output_norm.weight"]})
    with pytest.raises(_gguf.GGUFError, match="not part of a Llama"):
        _gguf.llama_state_dict(tmp_path / "odd.gguf", 4, 2)
