"""Where :func:`mechprobe.collect` puts rows: memory, or a resumable ``values.npy`` on disk.

The file is a standard ``.npy`` (header, then ``[n, layers, d]`` rows), written with positional
writes rather than through a writable memmap so that the process's resident memory does not grow
with the file. ``progress.json`` (written atomically after every chunk) records how many chunks are
done and a fingerprint of the collection, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mechprobe.core import model_adapter
from mechprobe.probing._selection import Plan


def check_finite(values: np.ndarray, where: str) -> None:
    step = max(1, (1 << 22) // max(1, int(np.prod(values.shape[1:]))))
    for start in range(0, len(values), step):
        bad = ~np.isfinite(values[start : start + step])
        if bad.any():
            row, layer, _ = np.argwhere(bad)[0]
            raise ValueError(
                f"{where} holds NaN or inf (row {start + row}, layer slot {layer}). A float16 "
                "model or dtype='float16' storage can overflow: load the model in float32 and "
                "collect with dtype='float32'."
            )


def same_file(values: np.memmap, target: Path) -> bool:
    name = getattr(values, "filename", None)
    return name is not None and target.exists() and os.path.samefile(name, target)


class Sink:
    """Where rows go: an in-memory array, or ``values.npy`` written with positional writes (so the
    process's resident memory does not grow with the file, as a writable memmap's would)."""

    def __init__(
        self, shape: tuple[int, ...], dtype: Any, folder: Path | None, fresh: bool
    ) -> None:
        self.shape, self.dtype, self.folder = shape, np.dtype(dtype), folder
        self.array: np.ndarray | None = None
        if folder is None:
            self.array = np.empty(shape, dtype=self.dtype)
            return
        path = folder / "values.npy"
        if fresh or not path.exists():
            np.lib.format.open_memmap(path, mode="w+", dtype=self.dtype, shape=shape).flush()
        mapped = np.load(path, mmap_mode="r")
        if mapped.shape != shape or mapped.dtype != self.dtype:
            raise ValueError(
                f"{path} has shape {mapped.shape}, expected {shape}: use an empty folder."
            )
        self.offset = int(mapped.offset)
        del mapped
        self.handle = open(path, "r+b")  # noqa: SIM115 - closed in finish()
        self.row_bytes = int(np.prod(shape[1:])) * self.dtype.itemsize

    def write(self, start: int, rows: np.ndarray) -> None:
        if self.array is not None:
            self.array[start : start + len(rows)] = rows
        else:
            os.pwrite(self.handle.fileno(), rows.tobytes(), self.offset + start * self.row_bytes)

    def write_chunk(self, plan: Plan, rows: list[int], stacked: np.ndarray) -> None:
        """Write each text's block of a chunk to its rows, after checking it is finite."""
        start = 0
        for t in rows:
            k = len(plan.positions[t])
            part = stacked[start : start + k]
            check_finite(part, f"Activations of text {t} ({plan.batch.prompts[t][:40]!r})")
            self.write(int(plan.row_start[t]), part)
            start += k

    def finish(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        assert self.folder is not None
        return np.load(self.folder / "values.npy", mmap_mode="r")


def resume_state(folder: Path, fingerprint: str) -> tuple[bool, int]:
    """(finished, chunks already written) for a folder; an unrelated non-empty folder is an error."""
    folder.mkdir(parents=True, exist_ok=True)
    meta, prog = folder / "activations.json", folder / "progress.json"
    if meta.is_file():
        found = json.loads(meta.read_text()).get("metadata", {}).get("fingerprint")
        if found == fingerprint:
            return True, 0
    elif prog.is_file():
        state = json.loads(prog.read_text())
        if state.get("fingerprint") == fingerprint:
            return False, int(state.get("chunks", 0))
    elif not (folder / "values.npy").exists():
        return False, 0
    raise ValueError(
        f"{folder} holds activations of a different collection (model, texts, sites, selection "
        "or dtype differ): pass an empty or new out_dir, or delete that folder."
    )


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written progress record


def _weights_digest(model: Any) -> str:
    """SHA-256 of a strided sample (about 4,096 values) of every parameter, bit for bit.

    Any edit that touches a weight matrix broadly (a fine-tune, a rank-one edit, a zeroed layer)
    changes its sample; hashing every byte would cost seconds per gigabyte of weights.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            h.update(name.encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: Any, names: list[str], plan: Plan, dtype: str, batch_size: int) -> str:
    """A short hash of everything the values depend on: decides whether a folder can be resumed."""
    record = {
        "model": str(getattr(model.cfg, "model_name", "")),
        "shape": [model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab],
        # Two models of one architecture (other seeds, edited or fine-tuned weights) differ here.
        "weights": _weights_digest(model),
        # ... and one model in two dtypes (the digest reads float32 values: a bfloat16 copy of
        # weights that are bfloat16 values matched its float32 model; review 42b F1).
        "model_dtype": model_adapter(model).dtype_name,
        # What hooks compute cannot be fingerprinted: a collection under hooks never matches one
        # without, and collect refuses to resume any folder while hooks are attached.
        "hooked": bool(model_adapter(model).attached_hooks()),
        "sites": names,
        "dtype": dtype,
        "batch_size": batch_size,
        "texts": list(plan.batch.prompts),
        "positions": [p.tolist() for p in plan.positions],
        "labels": plan.labels.tolist() if plan.labels is not None else None,
        "groups": plan.groups.tolist() if plan.groups is not None else None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
