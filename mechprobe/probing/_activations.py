"""Collecting activations for probing: :func:`collect` -> :class:`Activations` ``[n, layers, d]``.

:func:`collect` runs texts through the model in batches (through :func:`mechprobe.intervene`, no hooks
of its own), keeps only the selected token positions, and returns one row per selected token with
its label, word type, text index, position and token string. Selection rules (``select=``):

- ``"last"``: each text's last real token (one row per text).
- ``"all"``: every token of the text (BOS, which is no part of the text, is left out).
- ``"word_last"``: the last sub-token of each word. Words are the dataset's word spans when it has
  them (e.g. tagger tokens), else maximal runs of non-whitespace characters, i.e. *a token that
  starts with whitespace, or follows a whitespace-only token, starts a new word*. A word's last
  sub-token is the last token overlapping its characters (found with the tokenizer's offsets); a
  word that ends inside a token (``"can"`` in ``" cannot"``) has no token of its own and is
  dropped, counted in ``metadata["dropped_words"]``.
- a list of lists of positions, one list per text, in the tokenised row as the model sees it
  (BOS at 0 when the model prepends one; negative counts back from the last token).

Memory stays bounded: besides the forward pass itself, only one chunk's selected rows
(``[tokens in the chunk, sites, d]``, copied straight into the storage dtype) live at once, and the
forward pass stops after the last site it needs (no unembedding). The result is kept in memory
when it fits ``memory_budget`` bytes, else written chunk by chunk to ``values.npy`` in a folder and
memory-mapped. With ``out_dir`` it always goes to that folder, which also makes the run
resumable: a folder with a matching ``progress.json`` is continued, a finished one is reloaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechprobe.core import (
    Intervention,
    PaddingSide,
    Site,
    SiteLike,
    StopForward,
    intervene,
    resolve_site,
    width,
)
from mechprobe.probing._selection import Plan, make_plan
from mechprobe.probing._store import (
    Sink,
    check_finite,
    fingerprint,
    resume_state,
    same_file,
    write_json,
)

__all__ = ["Activations", "collect"]

Select = Literal["last", "all", "word_last"] | Sequence[Sequence[int]]
_FORMAT = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class Activations:
    """Activations of selected tokens at several sites, with labels and where each row came from.

    Attributes:
        values: ``[n, layers, d]`` array (``np.memmap`` when streamed to disk); ``layers`` indexes
            ``sites``.
        labels: ``[n]`` str or int labels, or None.
        groups: ``[n]`` word types (for control tasks), or None.
        text_index: ``[n]`` index of the source text.
        position: ``[n]`` token position in the tokenised text (BOS at 0 where prepended).
        token: ``[n]`` the token's text.
        sites: Hook names, one per layer slot of ``values``.
        metadata: Model, select rule, dtype, dropped words, path, ...

    Example:
        >>> import mechprobe as mp
        >>> acts = mp.collect(mp.tiny_model(), ["Hi there"], "resid_post", select="all", progress=False)
        >>> acts.values.shape, len(acts), acts.token[:3].tolist()
        ((8, 3, 64), 8, ['H', 'i', ' '])
    """

    values: Float[np.ndarray, "n layers d"]
    labels: np.ndarray | None
    groups: np.ndarray | None
    text_index: np.ndarray
    position: np.ndarray
    token: np.ndarray
    sites: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 3:
            raise ValueError(
                f"Activations.values must be [n, layers, d], got shape {self.values.shape}."
            )
        n = self.values.shape[0]
        if n == 0:
            raise ValueError("Activations are empty: select at least one token.")
        named: dict[str, np.ndarray | None] = {
            "text_index": self.text_index,
            "position": self.position,
            "token": self.token,
        }
        named |= {"labels": self.labels, "groups": self.groups}
        for name, arr in named.items():
            if arr is not None and (arr.ndim != 1 or len(arr) != n):
                raise ValueError(
                    f"Activations.{name} has shape {arr.shape} but values has {n} rows: pass "
                    f"one entry per row."
                )
        if len(self.sites) != self.values.shape[1]:
            raise ValueError(
                f"{len(self.sites)} site names for {self.values.shape[1]} layers: pass one per layer."
            )
        # Memory-mapped values are checked chunk by chunk as collect() writes them.
        if not isinstance(self.values, np.memmap):
            check_finite(self.values, "Activations.values")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def to_frame(self) -> pd.DataFrame:
        """One row per example: text_index, position, token, label and group (no values).

        Example:
            >>> import mechprobe as mp
            >>> mp.collect(mp.tiny_model(), ["Hi"], progress=False).to_frame().token.tolist()
            ['i']
        """
        columns = {"text_index": self.text_index, "position": self.position, "token": self.token}
        return pd.DataFrame(columns | {"label": self.labels, "group": self.groups})

    def layer(self, index: int) -> Float[np.ndarray, "n d"]:
        """``[n, d]`` activations of one layer slot (negative counts from the end), as float32.

        Example:
            >>> import numpy as np, mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), ["Hi"], "resid_post", progress=False)
            >>> acts.layer(-1).shape
            (1, 64)
        """
        if not -len(self.sites) <= index < len(self.sites):
            raise IndexError(f"Layer slot {index} out of range for {len(self.sites)} sites.")
        return np.asarray(self.values[:, index, :], dtype=np.float32)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``values.npy``, ``index.npz`` and ``activations.json`` (no pickle) to ``folder``.

        Example:
            >>> import tempfile, mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), ["Hi"], "resid_post", progress=False)
            >>> back = mp.Activations.load(acts.save(tempfile.mkdtemp()))
            >>> bool((back.values == acts.values).all())
            True
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "values.npy"
        if not (isinstance(self.values, np.memmap) and same_file(self.values, target)):
            np.save(target, np.asarray(self.values), allow_pickle=False)
        arrays = {"text_index": self.text_index, "position": self.position, "token": self.token}
        arrays |= {
            k: v for k, v in (("labels", self.labels), ("groups", self.groups)) if v is not None
        }
        np.savez(folder / "index.npz", allow_pickle=False, **arrays)
        meta = {"format": _FORMAT, "sites": list(self.sites), "metadata": self.metadata}
        (folder / "activations.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = True) -> Activations:
        """Read what :meth:`save` wrote; ``mmap=True`` maps ``values.npy`` instead of reading it."""
        folder = Path(folder)
        meta_path = folder / "activations.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no activations.json: pass a folder written by Activations.save "
                "or collect(out_dir=...)."
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{meta_path} has format {meta.get('format')}, expected {_FORMAT}.")
        values = np.load(folder / "values.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        with np.load(folder / "index.npz", allow_pickle=False) as index:
            arrays = {k: index[k] for k in index.files}
        return cls(
            values=values,
            labels=arrays.get("labels"),
            groups=arrays.get("groups"),
            text_index=arrays["text_index"],
            position=arrays["position"],
            token=arrays["token"],
            sites=tuple(meta["sites"]),
            metadata=meta["metadata"],
        )


class _Buffer:
    """One chunk's selected rows of every site, ``[k, sites, d]`` on the CPU in the storage dtype."""

    def __init__(self, n_sites: int, dtype: torch.dtype) -> None:
        self.values: Tensor | None = None
        self.filled = [False] * n_sites
        self.dtype = dtype


class _Gather(Intervention):
    """Copy ``activation[rows, cols]`` (the selected tokens) into one slot of a shared buffer, and
    stop the forward pass once every site has been copied."""

    def __init__(self, slot: int, rows: Tensor, cols: Tensor, buffer: _Buffer) -> None:
        super().__init__(None)
        self.slot, self.rows, self.cols, self.buffer = slot, rows, cols, buffer

    def edit(self, selected: Tensor, hook: Any) -> None:
        part = selected[self.rows.to(selected.device), self.cols.to(selected.device)]
        buf = self.buffer
        if buf.values is None:
            shape = (part.shape[0], len(buf.filled), *part.shape[1:])
            buf.values = torch.empty(shape, dtype=buf.dtype)
        elif part.shape[1:] != buf.values.shape[2:]:
            raise ValueError(
                f"{hook.name} has activations of shape {tuple(part.shape[1:])}, other sites "
                f"{tuple(buf.values.shape[2:])}: collect each shape separately."
            )
        buf.values[:, self.slot] = part  # one copy, straight into the storage dtype
        buf.filled[self.slot] = True
        if all(buf.filled):
            raise StopForward
        return None


def _resolve_sites(model: Any, sites: SiteLike | str | Sequence[SiteLike]) -> list[str]:
    """``"resid_post"`` means every layer; otherwise one site or a list, all of one width."""
    if isinstance(sites, str) and "." not in sites and sites not in model.hook_dict:
        sites = [Site(sites, layer) for layer in range(model.cfg.n_layers)]  # type: ignore[arg-type]
    elif isinstance(sites, str) or not isinstance(sites, Sequence):
        sites = [sites]
    if not sites:
        raise ValueError(
            "No sites given: pass a site kind such as 'resid_post' or a list of sites."
        )
    names, widths = [], set()
    for site in sites:
        name, resolved = resolve_site(model, site)
        names.append(name)
        widths.add(width(model, resolved))
    if len(set(names)) != len(names):
        raise ValueError(f"Sites repeat: {names}; pass each site once.")
    if len(widths - {None}) > 1:
        raise ValueError(
            f"Sites have different widths {sorted(w for w in widths if w)}; Activations stacks "
            "them into one [n, layers, d] array: collect each width separately."
        )
    return names


def collect(
    model: Any,
    data: Any,
    sites: SiteLike | str | Sequence[SiteLike] = "resid_post",
    *,
    select: Select | None = None,
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    batch_size: int = 32,
    padding_side: PaddingSide = "right",
    memory_budget: int = 1 << 30,
    out_dir: str | os.PathLike[str] | None = None,
    dtype: Literal["float32", "float16"] = "float32",
    progress: bool = True,
) -> Activations:
    """Run texts through ``model`` and keep the activations of the selected tokens at ``sites``.

    Args:
        model: A TransformerLens model with a fast tokenizer.
        data: Texts, a :class:`mechprobe.ProbingDataset` (texts, labels, word spans, groups), or a
            :class:`mechprobe.Task` (its prompts, labelled and grouped by each item's input).
        sites: A site kind (``"resid_post"``: every layer), one site, or a list of sites or hook
            names of one width.
        select: ``"last"``, ``"all"``, ``"word_last"`` or per-text position lists (module
            docstring); default: the dataset's rule, else ``"last"``.
        labels: Per text, one label (repeated over its selected tokens) or a list with one label
            per word / token / marked position (None skips that one). Taken from ``data`` when it
            is a dataset or task.
        groups: Word types for control tasks, shaped like ``labels``.
        batch_size: Texts per forward pass (texts are sorted by length to waste little padding).
        padding_side: Padding of each batch (results do not depend on it).
        memory_budget: Bytes the result may take in memory; above it, it streams to disk.
        out_dir: Folder for ``values.npy`` (always used when given; resumable). Without it, a
            result over the budget goes to a new temporary folder (``metadata["path"]``).
        dtype: Storage dtype, ``"float32"`` or ``"float16"`` (half the size; range ±65504).
        progress: Show a progress bar.

    Returns:
        :class:`Activations` in text order, then position order.

    Example:
        >>> import mechprobe as mp
        >>> acts = mp.collect(mp.tiny_model(), ["a b", "cd"], "resid_post", select="word_last",
        ...                   labels=[["x", "y"], ["x"]], progress=False)
        >>> acts.position.tolist(), acts.labels.tolist()
        ([1, 3, 2], ['x', 'y', 'x'])
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    names = _resolve_sites(model, sites)
    plan = make_plan(
        model, data, select=select, labels=labels, groups=groups, padding_side=padding_side
    )
    key = fingerprint(model, names, plan, dtype, batch_size)
    folder = Path(out_dir) if out_dir is not None else None
    done = 0
    if folder is not None:
        finished, done = resume_state(folder, key)
        if finished:
            return Activations.load(folder)
    chunks = [plan.order[i : i + batch_size] for i in range(0, len(plan.order), batch_size)]
    sink: Sink | None = None
    with torch.no_grad():
        for k, rows in enumerate(tqdm(chunks, disable=not progress, desc="collect")):
            if k < done:
                continue
            stacked = _run_chunk(model, plan, rows.tolist(), names, _DTYPES[dtype])
            if sink is None:  # the width is known for sure only now (arbitrary hook names)
                shape = (plan.n_rows, len(names), stacked.shape[-1])
                nbytes = int(np.prod(shape)) * np.dtype(_DTYPES[dtype]).itemsize
                if folder is None and nbytes > memory_budget:
                    folder = Path(tempfile.mkdtemp(prefix="mechprobe-activations-"))
                sink = Sink(shape, _DTYPES[dtype], folder, fresh=done == 0)
            sink.write_chunk(plan, rows.tolist(), stacked)
            if folder is not None:
                write_json(folder / "progress.json", {"fingerprint": key, "chunks": k + 1})
    if sink is None:  # every chunk was written by an earlier, interrupted call
        assert folder is not None
        existing = np.load(folder / "values.npy", mmap_mode="r")
        sink = Sink(existing.shape, existing.dtype, folder, fresh=False)
    metadata = {
        "model": str(getattr(model.cfg, "model_name", "")),
        "select": plan.select_name,
        "dtype": dtype,
        "n_texts": len(plan.batch),
        "dropped_words": plan.dropped_words,
        "fingerprint": key,
        "path": str(folder) if folder is not None else None,
        **plan.metadata,
    }
    acts = Activations(
        values=sink.finish(),
        labels=plan.labels,
        groups=plan.groups,
        text_index=plan.text_index,
        position=plan.position,
        token=plan.token,
        sites=tuple(names),
        metadata=metadata,
    )
    if folder is not None:
        acts.save(folder)
        (folder / "progress.json").unlink(missing_ok=True)
    return acts


def _run_chunk(model: Any, plan: Plan, rows: list[int], names: list[str], dtype: Any) -> np.ndarray:
    """One forward pass over texts ``rows``: ``[selected tokens, sites, d]`` in text order."""
    chunk = plan.batch.select(rows)
    offsets = chunk.offset.tolist()
    local = [np.full(len(plan.positions[t]), i) for i, t in enumerate(rows)]
    cols = [plan.positions[t] + offsets[i] for i, t in enumerate(rows)]
    r = torch.as_tensor(np.concatenate(local), dtype=torch.long)
    c = torch.as_tensor(np.concatenate(cols), dtype=torch.long)
    buffer = _Buffer(len(names), _TORCH[np.dtype(dtype).name])
    gathers: dict[SiteLike, Intervention] = {
        name: _Gather(slot, r, c, buffer) for slot, name in enumerate(names)
    }
    device = getattr(model.cfg, "device", None)
    tokens, mask = chunk.tokens.to(device), chunk.attention_mask.to(device)
    try:
        with intervene(model, gathers, batch=chunk):
            model(tokens, attention_mask=mask)
    except StopForward:
        pass
    missing = [name for name, done in zip(names, buffer.filled, strict=True) if not done]
    if missing or buffer.values is None:
        raise RuntimeError(f"Sites {missing} never fired during the forward pass.")
    return buffer.values.numpy()
