"""Collecting activations for probing: :func:`collect` -> :class:`Activations` ``[n, layers, d]``.

:func:`collect` runs texts through the model in batches (through :func:`mechprobe.intervene`, no hooks
of its own), keeps only the chosen token positions, and returns one row per chosen token with
its label, word type, text index, position and token string. Which tokens (``positions=``):

- ``-1`` (default): the last token of each labelled unit: each text's last real token (one row
  per text), or, for a word-level :class:`~mechprobe.ProbingDataset`, each word's last sub-token
  (``"word_last"``).
- ``"all"``: every token of the text (BOS, which is no part of the text, is left out).
- ``"word_last"``: the last sub-token of each word. Words are the dataset's word spans when it has
  them (e.g. tagger tokens), else maximal runs of non-whitespace characters, i.e. *a token that
  starts with whitespace, or follows a whitespace-only token, starts a new word*. A word's last
  sub-token is the last token overlapping its characters (found with the tokenizer's offsets); a
  word that ends inside a token (``"can"`` in ``" cannot"``) has no token of its own and is
  dropped, counted in ``metadata["dropped_words"]``.
- another int, or a list of ints: those positions of every text; or one list of positions per
  text. Positions count in the tokenised row as the model sees it (BOS at 0 when the model
  prepends one; negative counts back from the last real token).

Memory stays bounded: besides the forward pass itself, only one chunk's selected rows
(``[tokens in the chunk, sites, d]``, copied straight into the storage dtype) live at once, and the
forward pass stops after the last site it needs (no unembedding). The result is kept in memory
when it fits ``memory_budget`` bytes, else written chunk by chunk to ``values.npy`` in a folder and
memory-mapped. With ``out_dir`` it always goes to that folder, which also makes the run
resumable: a folder with a matching ``progress.json`` is continued, a finished one is reloaded.
"""

from __future__ import annotations

import html
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeAlias, get_args

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    Intervention,
    Layers,
    PaddingSide,
    Site,
    SiteKind,
    SiteLike,
    StopForward,
    check_batch_size,
    check_dtype,
    evaluates,
    expand_sites,
    forward,
    intervene,
    model_adapter,
    progress_bar,
    warn,
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

#: Which tokens :func:`collect` keeps (module docstring).
CollectPositions: TypeAlias = (
    int | Literal["all", "word_last"] | Sequence[int] | Sequence[Sequence[int]]
)
_FORMAT = 1
_DTYPES = {"float32": np.float32, "float16": np.float16}
_TORCH = {"float32": torch.float32, "float16": torch.float16}
#: Kinds with one vector per token: [batch, pos, d_model], or one head's [batch, pos, d_head]
#: (``head``: z; ``q``, ``k``, ``v``) or its write to the residual stream (``head_out``, d_model).
#: Sites of one call must agree in width: they stack into one array. ``pattern`` has none.
_KINDS = tuple(kind for kind in get_args(SiteKind) if kind != "pattern")
_HEAD_WIDTH = ("head", "q", "k", "v")
_OLD_SELECT: dict[str, Any] = {"last": -1}


@dataclass(frozen=True, repr=False)
class Activations:
    """Activations of selected tokens at several sites, with labels and where each row came from.

    A store (in memory, or memory-mapped from ``values.npy`` in a folder), not an analysis
    result: :meth:`save` writes the folder, :meth:`load` maps it back.

    Attributes:
        values: ``[n, layers, d]`` array (``np.memmap`` when streamed to disk); ``layers`` indexes
            ``sites``.
        labels: ``[n]`` str or int labels, or None.
        groups: ``[n]`` word types (for control tasks), or None.
        text_index: ``[n]`` index of the source text.
        position: ``[n]`` token position in the tokenised text (BOS at 0 where prepended).
        token: ``[n]`` the token's text.
        sites: One name per layer slot of ``values``: the hook name, or ``"head_out@3, head 2"``
            for a head (heads share their layer's hook).
        metadata: Model, positions rule, dtype, dropped words, path, ...

    Example:
        >>> import mechprobe as mp
        >>> acts = mp.collect(mp.tiny_model(), ["Hi there"], "resid_post", positions="all",
        ...                   progress=False)
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
        self._freeze()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Pickle and ``copy.deepcopy`` skip ``__post_init__`` and copy arrays writable: freeze
        the copy as the original is."""
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._freeze()

    def _freeze(self) -> None:
        if isinstance(self.values, np.ndarray):  # frozen as every result's arrays are
            self.values.flags.writeable = False
        for name in ("text_index", "position", "token", "labels", "groups"):
            arr = getattr(self, name)  # read-only views: the caller's arrays stay writable
            if arr is not None:
                view = np.asarray(arr).view()
                view.flags.writeable = False
                object.__setattr__(self, name, view)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        n, layers, d = self.values.shape
        where = f"memory-mapped from {self.path}" if self.path is not None else "in memory"
        labels = "no labels" if self.labels is None else f"{len(np.unique(self.labels))} classes"
        return (
            f"Activations({n} rows x {layers} sites x {d}, {self.values.dtype}, {labels}, "
            f"{len(np.unique(self.text_index))} texts, {where})"
        )

    def _repr_html_(self) -> str:
        """The notebook face: the repr and the rows per label (a store has no figure)."""
        table = self.summary().to_html(max_rows=40, float_format=lambda v: f"{v:.4g}")
        return f"<div><p>{html.escape(repr(self))}</p>{table}</div>"

    @property
    def path(self) -> Path | None:
        """The folder ``values.npy`` is mapped from, or None when the values are in memory."""
        name = getattr(self.values, "filename", None)
        return Path(name).parent if isinstance(self.values, np.memmap) and name else None

    def to_frame(self) -> pd.DataFrame:
        """One row per example: text_index, position, token, label and group (no values).

        Example:
            >>> import mechprobe as mp
            >>> mp.collect(mp.tiny_model(), ["Hi"], progress=False).to_frame().token.tolist()
            ['i']
        """
        columns = {"text_index": self.text_index, "position": self.position, "token": self.token}
        return pd.DataFrame(columns | {"label": self.labels, "group": self.groups})

    def summary(self) -> pd.DataFrame:
        """Rows per label (all rows under label None when unlabelled), with their share and the
        number of texts they come from.

        Example:
            >>> import mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), ["Hi", "Ho"], labels=["a", "b"], progress=False)
            >>> acts.summary().to_dict("list")
            {'label': ['a', 'b'], 'rows': [1, 1], 'share': [0.5, 0.5], 'texts': [1, 1]}
        """
        frame = self.to_frame()
        if self.labels is None:
            frame["label"] = None
        table = frame.groupby("label", dropna=False, sort=True).agg(
            rows=("text_index", "size"), texts=("text_index", "nunique")
        )
        table = table.reset_index()
        table.insert(2, "share", table["rows"] / len(self))
        return table

    def layer(self, index: int | str | Site) -> Float[np.ndarray, "n d"]:
        """``[n, d]`` activations of one entry of the layer axis, as float32.

        Args:
            index: Which entry: an int is a *slot* of the layer axis, the ``index``-th entry of
                ``sites`` (negative from the end), not a block number; a :class:`Site`, its
                label (``"resid_post@10"``) or its hook name is looked up in ``sites``, which
                reads the same whatever order or layers were collected (review 43b F7).

        Returns:
            ``[n, d]`` float32 array.

        Raises:
            IndexError: A slot out of range.
            KeyError: A site that was not collected (the message lists those that were).

        Example:
            >>> import numpy as np, mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), ["Hi"], "resid_post", layers=[2, 0],
            ...                   progress=False)
            >>> acts.layer(-1).shape, bool((acts.layer("resid_post@0") == acts.layer(1)).all())
            ((1, 64), True)
        """
        if isinstance(index, (str, Site)):
            return np.asarray(self.values[:, self._slot(index), :], dtype=np.float32)
        if not -len(self.sites) <= index < len(self.sites):
            raise IndexError(f"Layer slot {index} out of range for {len(self.sites)} sites.")
        return np.asarray(self.values[:, index, :], dtype=np.float32)

    def _slot(self, site: str | Site) -> int:
        """The slot of ``site`` (a Site, label or hook name) in ``sites``."""

        def key(entry: str | Site) -> tuple[str, int, int | None] | str:
            try:
                parsed = entry if isinstance(entry, Site) else Site.parse(entry)
            except ValueError:
                return str(entry)  # a name that is no site label: matched as written
            return (parsed.kind, parsed.layer, parsed.head)

        wanted = key(site)
        for slot, entry in enumerate(self.sites):
            if key(entry) == wanted:
                return slot
        raise KeyError(
            f"{site} was not collected; these were: {list(self.sites)} (a layer counts from 0 "
            "here: Activations do not know the model's depth to read a negative one)."
        )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``values.npy``, ``index.npz`` and ``activations.json`` (no pickle) to ``folder``
        (created); returns the folder, which :meth:`load` reads.

        Args:
            folder: The folder to write (created; files already there are replaced).

        Returns:
            The folder.

        Example:
            >>> import tempfile, mechprobe as mp
            >>> acts = mp.collect(mp.tiny_model(), ["Hi"], "resid_post", progress=False)
            >>> back = mp.Activations.load(acts.save(tempfile.mkdtemp()))
            >>> bool((back.values == acts.values).all())
            True
        """
        folder = Path(folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(
                f"Cannot save Activations to {folder}: it is a file, not a folder."
            )
        if folder.suffix in (".json", ".npz", ".npy", ".safetensors") and not folder.exists():
            # A file name by mistake would become a folder of that name.
            raise ValueError(
                f"Activations are saved as a folder (values.npy beside its index); {folder.name!r} "
                f"names a file: pass a folder, e.g. {folder.with_suffix('')}."
            )
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "values.npy"
        # Each file is written beside its target and renamed over it: an Activations loaded
        # from this folder maps values.npy, and keeps reading the old file (rewriting it in
        # place showed the new values beside the old labels, or crashed on a smaller file).
        if not (isinstance(self.values, np.memmap) and same_file(self.values, target)):
            values = np.asarray(self.values)
            _replace(target, lambda f: np.save(f, values, allow_pickle=False))
        arrays = {"text_index": self.text_index, "position": self.position, "token": self.token}
        arrays |= {
            k: v for k, v in (("labels", self.labels), ("groups", self.groups)) if v is not None
        }
        _replace(folder / "index.npz", lambda f: np.savez(f, allow_pickle=False, **arrays))
        meta = {"format": _FORMAT, "sites": list(self.sites), "metadata": self.metadata}
        text = (json.dumps(meta, indent=1) + "\n").encode("utf-8")
        _replace(folder / "activations.json", lambda f: f.write(text))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, mmap: bool = True) -> Activations:
        """Read the folder :meth:`save` wrote (or ``collect(out_dir=...)`` filled);
        ``mmap=True`` maps ``values.npy`` instead of reading it.

        Args:
            folder: A folder :meth:`save` (or ``collect(out_dir=...)``) wrote.
            mmap: Map ``values.npy`` (read lazily) rather than reading it into memory.

        Returns:
            The :class:`Activations`.

        Raises:
            FileNotFoundError: ``folder`` holds no ``activations.json``.
            ValueError: It was written by another format version.
        """
        folder = Path(folder).expanduser()
        meta_path = folder / "activations.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no activations.json: pass a folder written by Activations.save "
                "or collect(out_dir=...)."
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
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


def _replace(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through a temporary file in its folder, renamed over it: a reader that
    maps the old file keeps the old file (core's ``write_atomic``, for data written by parts)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            write(handle)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class _Buffer:
    """One chunk's selected rows of every site, ``[k, sites, d]`` on the CPU in the storage dtype."""

    def __init__(self, n_sites: int, dtype: torch.dtype) -> None:
        self.values: Tensor | None = None
        self.filled = [False] * n_sites
        self.dtype = dtype


class _Gather(Intervention):
    """Copy ``activation[rows, cols]`` (the selected tokens) into one slot of a shared buffer, and
    stop the forward pass once every site has been copied."""

    def __init__(self, slot: int, rows: Tensor, cols: Tensor, buffer: _Buffer, name: str) -> None:
        super().__init__(None)
        self.slot, self.rows, self.cols, self.buffer = slot, rows, cols, buffer
        self.name = name

    def edit(self, selected: Tensor, hook: Any) -> None:
        part = selected[self.rows.to(selected.device), self.cols.to(selected.device)]
        buf = self.buffer
        if buf.values is None:
            shape = (part.shape[0], len(buf.filled), *part.shape[1:])
            buf.values = torch.empty(shape, dtype=buf.dtype)
        elif part.shape[1:] != buf.values.shape[2:]:
            raise ValueError(
                f"{self.name} has activations of shape {tuple(part.shape[1:])}, other sites "
                f"{tuple(buf.values.shape[2:])}: collect each shape separately."
            )
        buf.values[:, self.slot] = part  # one copy, straight into the storage dtype
        buf.filled[self.slot] = True
        if all(buf.filled):
            raise StopForward
        return None


def _site_names(
    model: Any, sites: SiteLike | Sequence[SiteLike], layers: Layers
) -> tuple[list[str], list[Site]]:
    """``(names, sites)``: core's expansion of ``sites`` (a kind means that kind at each of
    ``layers``, a head kind every head of each), and each one's name in the result: its hook
    name, or for a head ``"head_out@3, head 2"`` (heads share their layer's hook).

    A site given twice is an error here, not dropped: the layer slots of the result must line up
    with what was asked for.
    """
    items = [sites] if isinstance(sites, str) or not isinstance(sites, Sequence) else list(sites)
    # Refuses layers= where no entry is a kind, as patch does (review 43a F4: collect(m, data,
    # Site("resid_post", 2), layers=[0]) collected layer 2, and layer_sweep reported it); the
    # empty list gets its one message here too.
    expand_sites(model, sites, layers=layers, kinds=_KINDS, layers_name="layers")
    per_item = [expand_sites(model, item, layers=layers, kinds=_KINDS) for item in items]
    found = [site for expanded in per_item for site in expanded]
    for site in found:
        if site.positions is not None:  # the gather indexes whole rows: refuse, never misread
            raise ValueError(
                f"{site} carries positions={site.positions!r}; pass positions= to collect "
                "instead (one choice of positions for every site)."
            )
    widths = {site.kind in _HEAD_WIDTH for site in found}
    if len(widths) > 1:
        raise ValueError(
            f"Sites of two widths: {[str(s) for s in found if s.kind in _HEAD_WIDTH][:3]} have "
            "d_head, the others d_model; they stack into one array: collect each width "
            "separately."
        )
    names = [site.hook_name if site.head is None else str(site) for site in found]
    if len(set(names)) != len(names):
        raise ValueError(f"Sites repeat: {names}; pass each site once.")
    return names, found


@evaluates
def collect(
    model: Any,
    data: Any,
    sites: SiteLike | Sequence[SiteLike] = "resid_post",
    *,
    layers: Layers = "all",
    positions: CollectPositions = -1,
    labels: Sequence[Any] | None = None,
    groups: Sequence[Any] | None = None,
    batch_size: int | None = 32,
    padding_side: PaddingSide = "right",
    memory_budget: int = 1 << 30,
    out_dir: str | os.PathLike[str] | None = None,
    dtype: Literal["float32", "float16"] | torch.dtype = "float32",
    progress: bool = True,
    select: Any = None,
) -> Activations:
    """Run texts through ``model`` and keep the activations of the chosen tokens at ``sites``.

    Args:
        model: A TransformerLens model with a fast tokenizer.
        data: Texts, a :class:`mechprobe.Batch` (its strings), a
            :class:`mechprobe.ProbingDataset` (texts, labels, word spans, groups), or a
            :class:`mechprobe.Task` (its prompts, labelled and grouped by each item's input).
        sites: A site kind (``"resid_post"``: that kind at each of ``layers``), a Site, a hook
            name, or a list of them, all of one width: ``resid_pre``, ``resid_mid``,
            ``mlp_in``, ``resid_post``, ``attn_out``, ``mlp_out`` and ``head_out`` (a head's write
            to the residual stream) have the model's width; ``head`` (a head's z), ``q``, ``k``
            and ``v`` have ``d_head``. A head kind means every head of each layer
            (``Site("head", 3, head=2)`` for one).
        layers: The layers a site kind covers (default all; refused where no entry of
            ``sites`` is a kind, whose layers it would choose).
        positions: ``-1`` (default: each text's last token, each word's last token for a
            word-level dataset), ``"all"``, ``"word_last"``, an int or a list of ints for every
            text, or one list of positions per text (module docstring).
        labels: Per text, one label (repeated over its chosen tokens) or a list with one label
            per word / token / listed position (None skips that one). Taken from ``data`` when it
            is a dataset or task.
        groups: Word types for control tasks, shaped like ``labels``.
        batch_size: Texts per forward pass, None for all at once (texts are sorted by length to waste little padding).
        padding_side: Padding of each batch (results do not depend on it).
        memory_budget: Bytes the result may take in memory; above it, it streams to disk.
        out_dir: Folder for ``values.npy`` (always used when given; resumable). Without it, a
            result over the budget goes to a new temporary folder (``metadata["path"]``, kept
            for the memory map: remove it when done, or pass ``out_dir``). A folder is resumed
            (or loaded) only for the same model weights (a sample of every parameter), texts,
            sites, positions, labels, groups, dtype and batch size; another collection there is
            an error. While hooks are attached to the model, a folder that
            holds a collection is refused: what the hooks compute cannot be checked.
        dtype: Storage dtype, ``"float32"`` or ``"float16"`` (half the size; range ±65504),
            or the torch dtype.
        progress: Show a progress bar (``MECHPROBE_PROGRESS=0`` silences it).
        select: Deprecated name of ``positions`` (``"last"`` is ``-1``), for one release.

    Returns:
        :class:`Activations` in text order, then position order.

    Example:
        >>> import mechprobe as mp
        >>> acts = mp.collect(mp.tiny_model(), ["a b", "cd"], "resid_post", positions="word_last",
        ...                   labels=[["x", "y"], ["x"]], progress=False)
        >>> acts.position.tolist(), acts.labels.tolist()
        ([1, 3, 2], ['x', 'y', 'x'])
    """
    if select is not None:
        warn(
            "collect(select=...) is deprecated: say positions=... (select='last' is "
            "positions=-1); select goes in the next release.",
            DeprecationWarning,
        )
        positions = _OLD_SELECT.get(select, select) if isinstance(select, str) else select
    # The storage dtype, given as load_model's is (a torch dtype) or by name.
    storage = str(check_dtype(dtype, "dtype", [torch.float32, torch.float16])).removeprefix(
        "torch."
    )
    batch_size = check_batch_size(batch_size)
    names, found = _site_names(model, sites, layers)
    plan = make_plan(
        model, data, positions=positions, labels=labels, groups=groups, padding_side=padding_side
    )
    # None is every text in one pass: the fingerprint holds that count, so that resuming with
    # the same passes spelled either way finds the collection.
    size = max(1, len(plan.order)) if batch_size is None else batch_size
    key = fingerprint(model, names, plan, storage, size)
    folder = Path(out_dir).expanduser() if out_dir is not None else None
    done = 0
    if folder is not None and folder.exists() and not folder.is_dir():
        raise ValueError(f"out_dir {folder} is a file: pass a folder, new or holding a collection.")
    if folder is not None:
        if model_adapter(model).attached_hooks() and any(folder.glob("*.json")):
            raise ValueError(
                f"{folder} holds a collection, and hooks are attached to the model (an "
                "intervention in force): what they compute cannot be checked, so the folder's "
                "activations may be of another intervention. Pass an empty or new out_dir."
            )
        finished, done = resume_state(folder, key)
        if finished:
            return Activations.load(folder)
    chunks = [plan.order[i : i + size] for i in range(0, len(plan.order), size)]
    sink: Sink | None = None
    with torch.no_grad():
        for k, rows in enumerate(progress_bar(chunks, progress=progress, desc="collect")):
            if k < done:
                continue
            stacked = _run_chunk(model, plan, rows.tolist(), names, found, _DTYPES[storage])
            if sink is None:
                shape = (plan.n_rows, len(names), stacked.shape[-1])
                nbytes = int(np.prod(shape)) * np.dtype(_DTYPES[storage]).itemsize
                if folder is None and nbytes > memory_budget:
                    folder = Path(tempfile.mkdtemp(prefix="mechprobe-activations-"))
                sink = Sink(shape, _DTYPES[storage], folder, fresh=done == 0)
            sink.write_chunk(plan, rows.tolist(), stacked)
            if folder is not None:
                write_json(folder / "progress.json", {"fingerprint": key, "chunks": k + 1})
    if sink is None:  # every chunk was written by an earlier, interrupted call
        assert folder is not None
        existing = np.load(folder / "values.npy", mmap_mode="r")
        sink = Sink(existing.shape, existing.dtype, folder, fresh=False)
    metadata = {
        "model": str(getattr(model.cfg, "model_name", "")),
        "model_dtype": model_adapter(model).dtype_name,
        "positions": plan.positions_name,
        "dtype": storage,
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


def _run_chunk(
    model: Any, plan: Plan, rows: list[int], names: list[str], sites: list[Site], dtype: Any
) -> np.ndarray:
    """One forward pass over texts ``rows``: ``[selected tokens, sites, d]`` in text order."""
    chunk = plan.batch.select(rows)
    offsets = chunk.offset.tolist()
    local = [np.full(len(plan.positions[t]), i) for i, t in enumerate(rows)]
    cols = [plan.positions[t] + offsets[i] for i, t in enumerate(rows)]
    r = torch.as_tensor(np.concatenate(local), dtype=torch.long)
    c = torch.as_tensor(np.concatenate(cols), dtype=torch.long)
    buffer = _Buffer(len(names), _TORCH[np.dtype(dtype).name])
    gathers: dict[SiteLike, Intervention] = {
        site: _Gather(slot, r, c, buffer, name)
        for slot, (name, site) in enumerate(zip(names, sites, strict=True))
    }
    try:
        with intervene(model, gathers, batch=chunk):
            forward(model, chunk)
    except StopForward:  # the last gather ends the pass: nothing after its site is needed
        pass
    missing = [name for name, done in zip(names, buffer.filled, strict=True) if not done]
    if missing or buffer.values is None:
        raise RuntimeError(f"Sites {missing} never fired during the forward pass.")
    return buffer.values.cpu().numpy()
