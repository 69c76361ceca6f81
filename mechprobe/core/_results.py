"""The result protocol every analysis result follows, and the one serialiser behind it.

A result is a frozen dataclass (``eq=False`` when it holds arrays, ``repr=False`` so that the short
repr below stays) that subclasses :class:`Result` with a format name::

    @dataclass(frozen=True, eq=False, repr=False)
    class LensResult(Result, format="mechprobe.LensResult", version=2): ...

and so has:

- ``to_frame()``: a tidy DataFrame of everything; ``summary()``: a short one of the key numbers;
- ``plot(ax=None)``: a matplotlib Figure (drawn into ``ax`` when one is given), built from the
  result's own arrays: plotting never recomputes;
- ``save(path) -> Path`` and ``Class.load(path)``: JSON (``.json``: one readable file), npz
  (``.npz``: arrays in numpy's format, the rest as JSON inside) or safetensors (``.safetensors``:
  tensors exact in their dtype, bfloat16 included, named by their field, the rest as JSON in the
  header, with SHA-256 digests of every tensor and of the header checked on load), tagged with the
  format name and version, never pickle; a result made of several files (a folder) overrides both;
- a one-line ``repr`` (shapes and key numbers, never the arrays) and ``_repr_html_``: in a
  notebook, the summary table, and the figure where one says more.

The serialiser writes arrays and tensors as tagged objects (shape, dtype, flat data), non-finite
floats as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, tuples as lists, dictionary keys as
strings, and restores each field from its type annotation: strict JSON that any tool can read.
Free-form fields (annotated ``Any``, such as ``dict[str, Any]`` metadata) have no annotation to
restore from: there a non-finite float is tagged (``{"__float__": "nan"}``) and arrays and tensors
are found at any depth, but a tuple comes back as a list (JSON has none). Files written before
non-finite floats were strings (NaN as ``null``) still load.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import html
import io
import json
import math
import os
import types
import typing
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, Union

import numpy as np
import pandas as pd
import torch

from mechprobe.core._sites import Site

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "Result",
    "decode",
    "encode",
    "figure_of",
    "load_result",
    "new_axes",
    "read_tensors",
    "write_atomic",
    "write_tensors",
]

R = TypeVar("R", bound="Result")
_REGISTRY: dict[str, type[Result]] = {}
_ARRAY, _TENSOR, _FLOAT = "__array__", "__tensor__", "__float__"
# Tensor dtypes numpy lacks: written as float32 (exactly) in JSON and npz, restored on reading.
_WIDENED = (torch.bfloat16,)
_SUFFIXES = (".json", ".npz", ".safetensors")
_Arrays = Mapping[str, "np.ndarray | torch.Tensor"]


class Result:
    """Base of every analysis result: serialisation, repr and notebook view (module docstring).

    Subclasses implement :meth:`to_frame`, :meth:`summary`, :meth:`plot` and :meth:`_describe`.
    """

    _format: ClassVar[str] = ""
    _version: ClassVar[int] = 1
    _html_figure: ClassVar[bool] = False

    def __init_subclass__(
        cls,
        *,
        format: str | None = None,
        version: int = 1,
        html_figure: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if format is not None:
            cls._format, cls._version, cls._html_figure = format, version, html_figure
            _REGISTRY[format] = cls

    def __post_init__(self) -> None:
        """Frozen: fields cannot be reassigned, and numpy fields become read-only views, so an
        in-place write (``res.values[:] = 0``) raises instead of silently changing frames,
        summaries and later saves. Torch tensors (``OVector.vector``, an ``Eraser``'s matrices)
        and dicts cannot be made read-only: treat them as read-only (``.clone()`` to edit)."""
        self._freeze()

    def __setstate__(self, state: Any) -> None:
        """Pickle and ``copy.deepcopy`` rebuild a result without ``__post_init__``, and their
        copies of its arrays are writable: restore the fields, then freeze them again."""
        if isinstance(state, tuple):  # (dict, slots) for a class with __slots__
            state, slots = state
            state = {**(state or {}), **(slots or {})}
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._freeze()

    def _freeze(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                object.__setattr__(self, f.name, _read_only(value))
            elif isinstance(value, tuple) and any(isinstance(v, np.ndarray) for v in value):
                object.__setattr__(self, f.name, tuple(_read_only(v) for v in value))

    # --- what each result implements -----------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """Everything, as a tidy DataFrame (one row per measured cell)."""
        raise NotImplementedError

    def summary(self) -> pd.DataFrame:
        """The key numbers, as a short DataFrame."""
        raise NotImplementedError

    def plot(self, ax: Axes | None = None) -> Figure:
        """The result's main figure (into ``ax`` when given).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        raise NotImplementedError

    def _describe(self) -> str:
        """A few words for the repr: sizes and the headline number."""
        raise NotImplementedError

    def _html_plot(self) -> Figure:
        """The notebook view's figure (a result whose plot grows with its size draws less)."""
        return self.plot()

    # --- the protocol ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data: ``{"format", "version", <fields>}`` (arrays tagged, NaN as "nan")."""
        return encode(self)

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        """Rebuild a result from :meth:`to_dict`'s output.

        Args:
            data: What :meth:`to_dict` returned (or its JSON, parsed).

        Returns:
            The result, of this class.

        Raises:
            ValueError: ``data`` holds another result, or a format version this release cannot
                read.
        """
        _check_format(cls, data)
        return decode(dict(data), cls)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the result to ``path``: ``.json`` (one readable file), ``.npz`` (arrays in numpy
        format, the rest as JSON inside) or ``.safetensors`` (tensors exact, SHA-256 digests
        checked on load). Never pickle.

        Args:
            path: The file to write, ending in ``.json``, ``.npz`` or ``.safetensors`` (its folder
                must exist; ``~`` is expanded).

        Returns:
            The path written.

        Raises:
            ValueError: Another suffix.
            FileNotFoundError: The folder does not exist.
        """
        path = Path(path).expanduser()
        if path.suffix not in _SUFFIXES:
            raise ValueError(
                f"Save a {type(self).__name__} to a .json, .npz or .safetensors file, not "
                f"{path.name!r}: add the suffix, such as {path.stem or 'result'}.json (a folder "
                "with figures is RelationalResult's format only)."
            )
        _check_folder(path)
        if path.is_dir():
            raise IsADirectoryError(f"Cannot write {path}: it is a folder; name a file.")
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), allow_nan=False)
            write_atomic(path, text.encode("utf-8"))
            return path
        arrays: dict[str, np.ndarray | torch.Tensor] = {}
        meta = encode(self, arrays=arrays)
        if path.suffix == ".safetensors":
            write_atomic(path, _safetensors_bytes(self, meta, arrays))
            return path
        buffer = io.BytesIO()
        npz = {k: _numpy_of(v) for k, v in arrays.items()}
        npz["__meta__"] = np.asarray(json.dumps(meta, allow_nan=False))
        np.savez_compressed(buffer, allow_pickle=False, **npz)
        write_atomic(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls: type[R], path: str | os.PathLike[str]) -> R:
        """Read a result written by :meth:`save` (``.json``, ``.npz`` or ``.safetensors``; no
        pickle involved).

        Args:
            path: A file :meth:`save` wrote.

        Returns:
            The result, of this class.

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not a saved result of this class, unreadable, or (safetensors) changed
                since it was saved; the message names the file.
        """
        data, arrays = _read(Path(path).expanduser(), cls)
        try:
            _check_format(cls, data)
            return decode(data, cls, arrays=arrays)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # AttributeError: a field of the wrong JSON type (null where a mapping goes) in a
            # hand-edited file escaped as is (review 26b L8).
            raise ValueError(f"{path}: not a readable {cls.__name__} file ({err}).") from err

    def __repr__(self) -> str:
        try:
            words = self._describe()
        except Exception:  # a repr must never raise
            words = "…"
        return f"{type(self).__name__}({words})"

    def _repr_html_(self) -> str:
        try:
            words = self._describe()
        except Exception:  # a notebook view must never raise, as a repr must not
            words = "…"
        parts = [f"<div><p><b>{html.escape(type(self).__name__)}</b> {html.escape(words)}</p>"]
        made_by = _made_by(self)
        if made_by:  # which model (and precision) made it, once a notebook holds several
            parts.append(f"<p><small>{html.escape(made_by)}</small></p>")
        try:
            table = self.summary()
        except Exception as err:  # a notebook view must never raise either
            table = pd.DataFrame({"summary unavailable": [str(err)]})
        parts.append(_html_table(table))
        if self._html_figure:
            try:
                figure = self._html_plot()
                buffer = io.BytesIO()
                # At most about a megapixel: a notebook keeps every view (a 72 x 72 path figure
                # embedded 277 KB); by area, so a wide strip keeps legible text.
                width, height = figure.get_size_inches()
                dpi = min(80.0, (1.0e6 / (width * height)) ** 0.5)
                figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
                data = base64.b64encode(buffer.getvalue()).decode("ascii")
                parts.append(f'<img src="data:image/png;base64,{data}"/>')
            except Exception:
                pass
        parts.append("</div>")
        return "".join(parts)


def _made_by(result: Result) -> str:
    """``"made by NAME (DTYPE)"`` from the result's ``model_name`` and ``model_dtype`` fields
    (empty for a result that records neither)."""
    name, dtype = getattr(result, "model_name", ""), getattr(result, "model_dtype", "")
    if not isinstance(name, str) or not isinstance(dtype, str) or not (name or dtype):
        return ""
    return f"made by {name or 'an unnamed model'}" + (f" ({dtype})" if dtype else "")


def _html_table(table: pd.DataFrame) -> str:
    """The notebook's summary table: columns that hold one value in every row (the site, the
    method, the positions...) said once above it, so that what varies is on screen (review 26a:
    an amnesic summary's condition, value and effect began at column 13), and every missing
    value shown as "—" (``<NA>``, ``None`` and ``—`` appeared side by side)."""

    def cell(value: Any) -> str:
        return (
            "—"
            if _missing(value)
            else format_number(value)
            if isinstance(value, float)
            else str(value)
        )

    constant = []
    if len(table) > 1:
        for name in table.columns:
            try:
                if table[name].astype(object).map(cell).nunique() == 1:
                    constant.append(name)
            except TypeError:  # unhashable cells (lists): shown as they are
                pass
        constant = constant if len(constant) < len(table.columns) else []
    # Columns empty in every row say nothing: left out of the line too.
    same = "; ".join(
        f"{name} {cell(table[name].iloc[0])}"
        for name in constant
        if not _missing(table[name].iloc[0])
    )
    body = table.drop(columns=constant)
    for name in body.columns:  # one marker for a missing value, whatever the column's dtype
        if not pd.api.types.is_float_dtype(body[name]):
            column = body[name].astype(object)
            body[name] = column.where(~column.map(_missing), "—")
    lead = f"<p>in every row: {html.escape(same)}</p>" if same else ""
    return lead + body.to_html(max_rows=40, float_format=format_number, na_rep="—")


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # arrays and lists are values
        return False


def spread(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over the first axis (prompts, pairs; ``ddof=1``, as pandas'
    ``std``), NaN where there is one row: a spread over one value is undefined, and 0 read as
    perfectly consistent. (It was the population SD, ``ddof=0``, before the thirty-first
    session: smaller by ``sqrt((n - 1) / n)``.)

    Example:
        >>> spread(np.array([[1.0, 2.0], [3.0, 2.0]])).tolist(), spread(np.ones((1, 2))).tolist()
        ([1.4142135623730951, 0.0], [nan, nan])
    """
    if len(values) < 2:
        return np.full(values.shape[1:], np.nan)
    return np.asarray(values.std(axis=0, ddof=1))


def float64_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its float32 columns widened to float64, as every frame's floats are:
    concatenated with a float64 frame, a float32 0.9 came back as 0.8999999761581421.

    Example:
        >>> float64_columns(pd.DataFrame({"p": np.float32([0.9])}))["p"].dtype
        dtype('float64')
    """
    narrow = {c: "float64" for c in frame.columns if frame[c].dtype == np.float32}
    return frame.astype(narrow) if narrow else frame


def format_number(value: float) -> str:
    """A table cell: 4 significant digits, but large numbers (ranks, counts) whole.

    Example:
        >>> format_number(0.123456), format_number(17402.3), format_number(9999.6), format_number(2.5e-7)
        ('0.1235', '17,402', '10,000', '2.5e-07')
    """
    if value != value:  # NaN
        return "—"
    return f"{value:,.0f}" if 1e4 <= abs(round(value)) < 1e15 else f"{value:.4g}"


def _read_only(value: Any) -> Any:
    """A read-only view of a numpy array (the caller's array stays writable); anything else as is."""
    if not isinstance(value, np.ndarray):
        return value
    view = value.view()
    view.flags.writeable = False
    return view


def load_result(path: str | os.PathLike[str]) -> Result:
    """Read any saved result by its format tag (``.json``, ``.npz`` or ``.safetensors``, or a
    result saved as a folder, such as a ``RelationalResult``: its ``result.json`` names it).

    Args:
        path: A file a result's ``save`` wrote, or the folder one saved itself into (``~`` is
            expanded).

    Returns:
        The result, of the class its file names (a :class:`~mechprobe.LensResult`, a
        :class:`~mechprobe.PatchResult`...), read by that class's own ``load``.

    Raises:
        FileNotFoundError: ``path`` is a folder without ``result.json``.
        ValueError: The file holds no mechprobe result (saved activations, another format).

    Example:
        >>> import mechprobe as mp, tempfile, pathlib
        >>> lens = mp.logit_lens(mp.tiny_model(), "Hi")
        >>> path = lens.save(pathlib.Path(tempfile.mkdtemp()) / "lens.json")
        >>> type(load_result(path)).__name__
        'LensResult'
    """
    path = Path(path).expanduser()
    record = path / "result.json" if path.is_dir() else path
    if path.is_dir() and not record.is_file():
        if (path / "activations.json").is_file():  # what Activations.save writes
            raise ValueError(
                f"{path} holds activations: read them with mechprobe.Activations.load."
            )
        raise FileNotFoundError(f"{path} is a folder without result.json: not a saved result.")
    data, _ = _read(record, tolerate_other_formats=True)
    cls = _REGISTRY.get(str(data.get("format")))
    if cls is None and str(data.get("format")) in _NOT_RESULTS:
        raise ValueError(f"{path} holds a {data['format']}: {_NOT_RESULTS[data['format']]}.")
    if cls is None:
        raise ValueError(
            f"{path}: format {data.get('format')!r} is not a mechprobe result "
            f"(known: {sorted(_REGISTRY)})."
        )
    return cls.load(path)  # a class may read its older files itself


def new_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    """``(figure, axes)``: ``ax`` and its figure when given, else a new figure without pyplot.

    Example:
        >>> fig, ax = new_axes(None, (3, 2))
        >>> new_axes(ax, (9, 9))[0] is fig
        True
    """
    if ax is not None:
        return figure_of(ax), ax
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def token_label(text: str, width: int = 12, *, tail: bool = False) -> str:
    """Token text made visible on a figure or in a table: escapes for newlines and control bytes,
    ``␣`` for a bare space, and long text cut with an ellipsis (keeping its end when ``tail``).

    Example:
        >>> token_label("\\n"), token_label(" "), token_label(" Warsaw"), token_label("abcdef", 4)
        ('\\\\n', '␣', ' Warsaw', 'abc…')
        >>> token_label("\\u200b"), token_label("abcdef", 1, tail=True)
        ('\\\\u200b', '…f')
    """
    shown = text.replace("\n", "\\n").replace("\t", "\\t")
    shown = "".join(
        ch
        if ch.isprintable()
        else (f"\\x{ord(ch):02x}" if ord(ch) <= 0xFF else f"\\u{ord(ch):04x}")
        for ch in shown
    )
    if shown and not shown.strip():
        shown = "␣" * len(shown)
    if len(shown) <= width:
        return shown
    keep = max(width - 1, 1)  # width 1 kept the whole text ("…" + shown[-0:])
    return "…" + shown[len(shown) - keep :] if tail else shown[:keep] + "…"


def head_column(heads: Any) -> pd.arrays.IntegerArray:
    """A frame's ``head`` column: pandas' nullable ``Int64``, ``<NA>`` where a row is no head
    (None, or the ``-1`` an array field stores), so frames of different analyses merge on
    ``(layer, head)`` (one said None in an object column, another -1).

    Example:
        >>> head_column([2, None, -1]).tolist()
        [2, <NA>, <NA>]
    """
    values = [None if h is None or int(h) < 0 else int(h) for h in heads]
    return pd.array(values, dtype="Int64")


def layer_column(layers: typing.Sequence[int | None]) -> Any:
    """A frame's ``layer`` column: int64, or pandas' nullable ``Int64`` with ``<NA>`` where a row
    is at no one layer (a group of sites).

    Example:
        >>> layer_column([2, 3]).dtype, layer_column([2, None]).tolist()
        (dtype('int64'), [2, <NA>])
    """
    if None not in layers:
        return np.asarray(layers, dtype=np.int64)
    return pd.array(list(layers), dtype="Int64")


def site_columns(places: typing.Sequence[Any]) -> dict[str, Any]:
    """A frame's location columns, the keys every result's frame is joined on: ``site`` (the
    label ``str(Site)``: ``"resid_post@3"``, ``"head_out@3, head 2"``), ``kind`` (the site kind
    ``sites=`` takes), ``layer`` and ``head`` (nullable ``Int64``), ``hook`` (TransformerLens's
    hook name).

    ``places`` holds one Site, site label or hook name per row; a hook that is no site kind's
    (``"hook_embed"``) is its own ``site`` and ``hook``, with ``<NA>`` kind, layer and head.

    Example:
        >>> cols = site_columns(["blocks.2.hook_resid_post", "head_out@1, head 3", "hook_embed"])
        >>> cols["site"], cols["kind"]
        (['resid_post@2', 'head_out@1, head 3', 'hook_embed'], ['resid_post', 'head_out', None])
        >>> cols["layer"].tolist(), cols["head"].tolist()
        ([2, 1, <NA>], [<NA>, 3, <NA>])
    """
    parsed: dict[str, Site | None] = {}
    rows: list[Site | None] = []
    for place in places:
        if isinstance(place, Site):
            rows.append(place)
            continue
        name = str(place)
        if name not in parsed:
            try:
                parsed[name] = Site.parse(name)
            except ValueError:
                parsed[name] = None
        rows.append(parsed[name])
    return {
        "site": [str(p) if s is None else str(s) for p, s in zip(places, rows, strict=True)],
        "kind": [None if s is None else s.kind for s in rows],
        "layer": pd.array([None if s is None else s.layer for s in rows], dtype="Int64"),
        "head": head_column([None if s is None else s.head for s in rows]),
        "hook": [str(p) if s is None else s.hook_name for p, s in zip(places, rows, strict=True)],
    }


def positions_text(positions: Any) -> str | None:
    """The ``positions=`` an analysis ran with, as a frame's ``positions`` column writes it:
    ``"all"``, ``"-1"``, ``"-2,-1"``; None where a result saved before it recorded them.

    Text, not an int or a list: frames of runs at ``-1`` and at ``"all"`` concatenate into one
    column that groups and compares.

    Example:
        >>> positions_text("all"), positions_text(-1), positions_text((-2, -1)), positions_text(None)
        ('all', '-1', '-2,-1', None)
    """
    if positions is None or isinstance(positions, str):
        return positions
    if isinstance(positions, (int, np.integer)):
        return str(int(positions))
    return ",".join(str(int(p)) for p in positions)


def literal(text: str) -> str:
    """``text`` drawn on a matplotlib figure as written: a ``$`` in a prompt or token would start
    mathtext (``"pay $5 or $6"`` drew "5 or " in italics, and ``"$x^{2$"`` made saving raise).

    Example:
        >>> print(literal("pay $5 or $6"))  # matplotlib draws \\$ as $
        pay \\$5 or \\$6
    """
    return text.replace("$", r"\$")


def figure_of(ax: Axes) -> Figure:
    """The top-level Figure that ``ax`` is drawn in (also when it sits in a sub-figure)."""
    figure = ax.get_figure(root=True)
    assert figure is not None, "axes that belong to no figure"
    return figure


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder (no half files)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --- the serialiser -----------------------------------------------------------------------------


def encode(
    value: Any, arrays: dict[str, Any] | None = None, at: str = "", *, free: bool = False
) -> Any:
    """JSON-ready data for ``value``; with ``arrays``, arrays and tensors go there (npz,
    safetensors), named by where they sit (``at``: ``"removed"``, ``"measures.0.values"``; made
    unique where two would share a name), and leave that name behind. ``free``: the value sits
    in a field annotated ``Any``, so non-finite floats are tagged (decode has no annotation to
    read them by); dataclass fields annotated ``Any`` are encoded so.

    Example:
        >>> encode({"x": float("nan"), 2: (1, 2)})
        {'x': 'nan', '2': [1, 2]}
        >>> encode({"x": float("nan")}, free=True)
        {'x': {'__float__': 'nan'}}
    """

    def inner(v: Any, key: Any, free_: bool = free) -> Any:
        return encode(v, arrays, f"{at}.{key}" if at else str(key), free=free_)

    if isinstance(value, Result) or (
        dataclasses.is_dataclass(value) and not isinstance(value, type)
    ):
        hints = _field_hints(type(value))  # type: ignore[arg-type]
        out: dict[str, Any] = (
            {"format": value._format, "version": value._version}
            if isinstance(value, Result)
            else {}
        )
        for f in dataclasses.fields(value):  # type: ignore[arg-type]
            free_field = free or _is_free(hints.get(f.name, Any))
            out[f.name] = inner(getattr(value, f.name), f.name, free_field)
        return out
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if arrays is not None:  # kept a tensor: safetensors stores its dtype exactly
            spec = _store(tensor, arrays, at)
        else:
            spec = _encode_array(_numpy_of(tensor), None, at)
        if tensor.dtype in _WIDENED:  # numpy has no such dtype: say which to restore
            spec["torch_dtype"] = str(tensor.dtype).removeprefix("torch.")
        return {_TENSOR: spec}
    if isinstance(value, np.ndarray):
        return {_ARRAY: _encode_array(value, arrays, at)}
    if isinstance(value, np.generic):
        return encode(value.item(), arrays, at)
    if isinstance(value, float):
        encoded = _encode_float(value)
        return {_FLOAT: encoded} if free and isinstance(encoded, str) else encoded
    if isinstance(value, (list, tuple)):  # NamedTuples too
        return [inner(v, i) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): inner(v, k) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def decode(value: Any, hint: Any, arrays: _Arrays | None = None) -> Any:
    """The inverse of :func:`encode`, guided by the type annotation ``hint``.

    Example:
        >>> decode([[1, None]], tuple[tuple[int, float], ...])
        ((1, nan),)
    """
    if isinstance(value, dict) and _ARRAY in value:
        return _decode_array(value[_ARRAY], arrays)
    if isinstance(value, dict) and _FLOAT in value:
        return _decode_float(value[_FLOAT])
    if isinstance(value, dict) and _TENSOR in value:
        stored = value[_TENSOR]
        if (
            "npz" in stored
            and arrays is not None
            and isinstance(arrays[stored["npz"]], torch.Tensor)
        ):
            return arrays[stored["npz"]]
        tensor = torch.from_numpy(np.array(_decode_array(stored, arrays)))
        if "torch_dtype" in stored:  # widened to float32 for numpy: every value exact
            tensor = tensor.to(getattr(torch, stored["torch_dtype"]))
        return tensor
    if hint is Any or hint is None:  # free-form: arrays, tensors and tagged floats at any depth
        if isinstance(value, dict):
            return {k: decode(v, Any, arrays) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v, Any, arrays) for v in value]
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return _decode_union(value, args, arrays)
    if origin is typing.Literal:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, Mapping) and value.get("format") and issubclass(hint, Result):
            _check_format(hint, value)
        return _decode_dataclass(value, hint, arrays)
    if isinstance(hint, type) and issubclass(hint, tuple) and hasattr(hint, "_fields"):
        return hint(*value)  # a NamedTuple
    if origin is tuple:
        if value is None:
            return None
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(v, args[0], arrays) for v in value)
        if args:
            return tuple(decode(v, a, arrays) for v, a in zip(value, args, strict=True))
        return tuple(value)
    if origin is list:
        return [decode(v, args[0] if args else Any, arrays) for v in value]
    if origin in (dict, Mapping) or hint is dict:
        key, item = args if args else (str, Any)
        return {_decode_key(k, key): decode(v, item, arrays) for k, v in value.items()}
    if hint is float:
        return _decode_float(value)
    if hint is int and value is not None:
        return int(value)
    return value


def _check_format(cls: type[Result], data: Mapping[str, Any]) -> None:
    found, version = data.get("format"), data.get("version")
    if found != cls._format:
        raise ValueError(
            f"this is not a saved {cls.__name__} (format {found!r}, expected {cls._format!r})"
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"{cls._format}: its version tag {version!r} is not an integer")
    if version > cls._version:
        raise ValueError(
            f"{cls._format} version {version!r} was written by a newer mechprobe than this one "
            f"(which reads version {cls._version}): upgrade mechprobe"
        )
    if version < cls._version:
        raise ValueError(
            f"{cls._format} version {version} is from an older mechprobe (this one writes "
            f"version {cls._version}); re-run the analysis to save it anew"
        )


# Files mechprobe writes that are not results, and what reads them.
_NOT_RESULTS = {"mechprobe.TunedLens": "read it with mechprobe.TunedLens.load(path)"}


def _sniff(path: Path) -> str | None:
    """The format a file's first bytes say it holds (``.json``, ``.npz``, ``.safetensors``)."""
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        return ".npz"  # a zip archive
    if head.lstrip()[:1] == b"{":
        return ".json"
    if len(head) > 8 and head[8:9] == b"{":
        return ".safetensors"  # an 8-byte header length, then the JSON header
    return None


def _read(
    path: Path, cls: type[Result] | None = None, *, tolerate_other_formats: bool = False
) -> tuple[dict[str, Any], _Arrays | None]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file).")
    held = _sniff(path)
    if (
        held is not None
        and path.suffix in (".json", ".npz", ".safetensors")
        and held != path.suffix
    ):
        raise ValueError(
            f"{path} holds {held[1:]} data but is named {path.suffix}: rename it to "
            f"{path.with_suffix(held).name}."
        )
    if tolerate_other_formats and held == ".safetensors" and path.suffix == ".safetensors":
        header = _safetensors_metadata(path)
        if header.get("format") in _NOT_RESULTS:
            return {"format": header["format"]}, None
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a JSON file written by mechprobe ({err}).") from err
        if not isinstance(data, dict):
            raise ValueError(
                f"{path}: not a JSON file written by mechprobe (it holds a "
                f"{type(data).__name__}, not an object)."
            )
        return data, None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            meta = json.loads(str(arrays.pop("__meta__")))
        # An empty, truncated or damaged archive raises any of these from zipfile and zlib.
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error,
                NotImplementedError) as err:  # fmt: skip
            raise ValueError(f"{path}: not an npz file written by mechprobe ({err}).") from err
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: not an npz file written by mechprobe (no metadata object).")
        return meta, arrays
    if path.suffix == ".safetensors":
        return _read_safetensors(path, cls)
    raise ValueError(
        f"Load a .json, .npz or .safetensors file written by mechprobe, not {path.name!r}."
    )


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write {path}: the folder {path.parent} does not exist; create it first."
        )


_NON_FINITE = ("nan", "inf", "-inf")


def _encode_float(value: float) -> Any:
    if math.isnan(value):
        return "nan"  # not null: an optional float's null means None
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _decode_float(value: Any) -> float:
    if value is None:
        return math.nan  # how files written before "nan" hold NaN
    return float(value)  # float("nan"), float("inf") and float("-inf") read the strings back


@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that only exists for type checkers
        return {}


def _is_free(hint: Any) -> bool:
    """Whether a field of type ``hint`` may hold values no annotation describes (``Any``)."""
    if hint is Any or hint is dict or hint is list:
        return True
    return any(_is_free(a) for a in typing.get_args(hint) if a is not Ellipsis)


def _store(value: np.ndarray | torch.Tensor, arrays: dict[str, Any], at: str) -> dict[str, Any]:
    key = name = at or "value"
    copy = 0
    while key in arrays:  # dotted dict keys: {"a.b": x, "a": {"b": y}} both sit at "a.b"
        copy += 1
        key = f"{name}#{copy}"
    arrays[key] = value
    return {"npz": key}  # "npz": the name in the file's array store (npz or safetensors)


def _encode_array(array: np.ndarray, arrays: dict[str, Any] | None, at: str) -> dict[str, Any]:
    if arrays is not None:
        return _store(array, arrays, at)
    flat = array.ravel().tolist()
    if array.dtype.kind in "fc":
        flat = [_encode_float(float(x)) for x in flat]
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": flat}


def _decode_array(spec: Mapping[str, Any], arrays: _Arrays | None) -> np.ndarray:
    if "npz" in spec:
        if arrays is None:
            raise ValueError("an array stored in an npz file was read from JSON")
        return _numpy_of(arrays[spec["npz"]])
    data = spec["data"]
    if np.dtype(spec["dtype"]).kind not in "biufcUS":  # "object" would load anything at all
        raise ValueError(f"an array of dtype {spec['dtype']!r}, which no result writes")
    if np.dtype(spec["dtype"]).kind in "fc":
        data = [_decode_float(x) for x in data]
    return np.asarray(data, dtype=spec["dtype"]).reshape(spec["shape"])


def _numpy_of(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        # numpy has no bfloat16: float32 holds every bfloat16 value exactly, and decode()
        # casts back where the spec says so.
        return (value.float() if value.dtype in _WIDENED else value).cpu().numpy()
    return value


# --- safetensors: tensors exact, the encoded rest in the header, digests of both -------------


def _safetensors_bytes(result: Result, meta: Any, arrays: Mapping[str, Any]) -> bytes:
    tensors = {}
    for key, value in arrays.items():
        if isinstance(value, np.ndarray) and value.dtype.kind not in "biuf":
            raise ValueError(
                f"{type(result).__name__}.{key} holds {value.dtype} data, which safetensors "
                "cannot store: save to .json or .npz instead."
            )
        if isinstance(value, np.ndarray) and not value.flags.writeable:
            value = value.copy()  # a result's read-only view: torch wants memory it may write
        tensors[key] = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
    fields = {"mechprobe": json.dumps(meta, allow_nan=False)}
    return _tensor_file(tensors, result._format, result._version, fields)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header fields, without reading its tensors ({} if unreadable: the
    full read then says why)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError):
        return {}


def _read_safetensors(path: Path, cls: type[Result] | None) -> tuple[dict[str, Any], _Arrays]:
    """The encoded result and its tensors, after checking format, version and every digest."""
    what = f"mechprobe {cls.__name__}" if cls is not None else "mechprobe result"
    fields, tensors = read_tensors(
        path,
        format=cls._format if cls is not None else None,
        version=cls._version if cls is not None else None,
        what=what,
    )
    try:
        return json.loads(fields["mechprobe"]), tensors
    except (KeyError, json.JSONDecodeError):
        raise ValueError(
            f"{path} has no readable mechprobe fields in its header: it was not written by "
            "mechprobe's save; save the result again."
        ) from None


def _tensor_file(
    tensors: Mapping[str, torch.Tensor], format: str, version: int, fields: Mapping[str, str]
) -> bytes:
    from safetensors.torch import save

    tensors = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
    header = {"format": format, "version": str(version), **fields}
    digests = {name: _tensor_digest(t) for name, t in tensors.items()}
    digests["metadata"] = _header_digest(header)
    header["sha256"] = json.dumps(digests, sort_keys=True)
    return save(dict(tensors), metadata=header)


def write_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    *,
    format: str,
    version: int,
    fields: Mapping[str, str] | None = None,
) -> Path:
    """Write named tensors to one ``.safetensors`` file, exact in their dtype, with ``format``,
    ``version``, string ``fields`` and SHA-256 digests of every tensor and of the header (what
    :func:`read_tensors` checks). Results use it for ``.safetensors``; so do objects that are
    not results (a tuned lens).

    Example:
        >>> import tempfile, torch
        >>> path = write_tensors(tempfile.mkdtemp() + "/t.safetensors", {"w": torch.ones(2)},
        ...                      format="demo.Thing", version=1, fields={"note": "hi"})
        >>> fields, tensors = read_tensors(path, format="demo.Thing", version=1)
        >>> fields["note"], tensors["w"].tolist()
        ('hi', [1.0, 1.0])
    """
    path = Path(path).expanduser()
    _check_folder(path)
    write_atomic(path, _tensor_file(tensors, format, version, dict(fields or {})))
    return path


def read_tensors(
    path: str | os.PathLike[str],
    *,
    format: str | None,
    version: int | None,
    what: str = "mechprobe file",
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header fields and tensors of a file written by :func:`write_tensors`, after checking
    its format (None: any), its version (None: any) and every SHA-256 digest.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a safetensors file (a pickle, damaged), another format, another version,
            a missing or extra tensor, or bytes changed since saving; the message names the file
            and ``what`` it should have been.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (or is not a file).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"{path} is not a safetensors file written by a {what}'s save ({err}); it may be "
            "damaged, or a pickle: save it again."
        ) from None
    found = header.get("format")
    if format is not None and found != format:
        raise ValueError(
            f"{path} is not a saved {what} (format {found!r}, expected {format!r}); write one "
            "with its save method."
        )
    if version is not None:
        written = header.get("version", "")
        if not written.isdigit() or int(written) != version:
            newer = written.isdigit() and int(written) > version
            raise ValueError(
                f"{path}: {found} version {written!r} "
                + (
                    f"was written by a newer mechprobe (this one reads version {version}): "
                    "upgrade mechprobe."
                    if newer
                    else f"is not the version this mechprobe writes ({version}): save it again."
                )
            )
    try:
        digests = json.loads(header["sha256"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(
            f"{path} has no readable SHA-256 digests: it was not written by mechprobe's save; "
            "save it again."
        ) from None
    if digests.get("metadata") != _header_digest(header):
        raise ValueError(
            f"{path}: its metadata does not match its SHA-256 digest: the file was changed or "
            "damaged after saving; save it again."
        )
    for name in sorted(set(digests) - {"metadata"}):
        if name not in tensors:
            raise ValueError(
                f"{path} lacks the tensor {name!r} its metadata lists: the file is incomplete; "
                "save it again."
            )
        if _tensor_digest(tensors[name]) != digests[name]:
            raise ValueError(
                f"{path}: tensor {name!r} does not match its SHA-256 digest: the file was "
                "changed or damaged after saving; save it again."
            )
    extra = sorted(set(tensors) - set(digests))
    if extra:
        raise ValueError(f"{path} holds tensors {extra} that its metadata does not list.")
    fields = {k: v for k, v in header.items() if k not in ("format", "version", "sha256")}
    return fields, tensors


def _tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (a saved file's integrity check)."""
    tensor = tensor.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}:".encode())
    # Flattened first: a 0-d tensor (Adam's step count in a training checkpoint) has no byte view.
    flat = tensor.reshape(-1)
    h.update(flat.view(torch.uint8).cpu().numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def _header_digest(header: Mapping[str, str]) -> str:
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _decode_key(key: str, hint: Any) -> Any:
    if hint is int:
        return int(key)
    if hint is float:
        return float(key)
    return key


def _decode_union(value: Any, args: tuple[Any, ...], arrays: Any) -> Any:
    members = [a for a in args if a is not type(None)]
    if value is None:  # null is None here (an optional float's NaN is "nan"; before, null)
        return None
    if isinstance(value, str) and value in _NON_FINITE and float in members and str not in members:
        return _decode_float(value)
    if len(members) == 1:
        return decode(value, members[0], arrays)
    for member in members:  # the first member whose shape fits the value
        origin = typing.get_origin(member) or member
        if isinstance(value, list) and origin in (tuple, list):
            return decode(value, member, arrays)
        if isinstance(value, Mapping) and (
            origin in (dict, Mapping)
            or (isinstance(member, type) and dataclasses.is_dataclass(member))
        ):
            return decode(value, member, arrays)
        scalar = isinstance(value, (int, float, str, bool)) and member in (int, float, str, bool)
        if scalar and (isinstance(value, member) or (member is float and isinstance(value, int))):
            return decode(value, member, arrays)
    return value


def _decode_dataclass(value: Mapping[str, Any], cls: type, arrays: Any) -> Any:
    hints = _field_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            hint = hints.get(f.name, Any)
            _refuse_null(value[f.name], hint, f"{cls.__name__}.{f.name}")
            kwargs[f.name] = decode(value[f.name], hint, arrays)
    return cls(**kwargs)


#: Field types a saved result never holds as null (a float's null is NaN, as written).
_NEVER_NULL = (int, str, bool, np.ndarray, torch.Tensor)


def _refuse_null(value: Any, hint: Any, name: str) -> None:
    """A hand-edited null where the field's type has none (a text, an integer, an array, a
    tuple, a mapping, a choice of words; or in a tuple of texts or integers) reached to_frame or
    a plot before it failed, far from the file (review 26b, 27a): say which field."""
    origin = typing.get_origin(hint)
    never = hint in _NEVER_NULL or origin in (tuple, list, dict, Mapping, typing.Literal)
    if value is None and never:
        kind = getattr(origin or hint, "__name__", str(hint))
        raise ValueError(f"{name} is null in the file, where its type ({kind}) has none")
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(hint)
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        for i, (item, item_hint) in enumerate(zip(value, items, strict=False)):
            _refuse_null(item, item_hint, f"{name}[{i}]")
