"""The result of activation patching and ablation: :class:`PatchResult` (values, baselines, random
controls, spread over prompts, frame, heatmap, JSON)."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import torch

from mechprobe.core import (
    HEAD_KINDS,
    Result,
    check_int,
    head_column,
    layer_column,
    literal,
    new_axes,
    token_texts,
    warn,
)
from mechprobe.core import spread as spread_of  # its own property is called spread
from mechprobe.patching._metrics import metric_title, metric_token_ids

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PatchResult", "concat_pairs", "joined_model_record", "pair_records"]

_R = TypeVar("_R")
# Fields indexed by prompt pair (the pair axis first; ``random`` has it second), and the fields
# recomputed from them; every other field must agree between the parts.
_PAIR_AXIS = {"per_pair": 0, "clean": 0, "corrupt": 0, "random": 1}
# Per-pair records (tuples, one entry per pair; empty in files saved before results kept them).
_PAIR_RECORDS = (
    "clean_prompts",
    "corrupt_prompts",
    "answer_ids",
    "wrong_ids",
    "answer_tokens",
    "wrong_tokens",
    "position_indices",
)
_DERIVED = ("values", "normalised")
# Head kinds at up to this many positions are drawn as a layer x head grid per position.
_GRID_PANELS = 8
# Fields that describe pair 0 only: the joined result keeps the first part's.
_FIRST_PAIR = ("position_labels",)


# What a result records of the model that made it; a part saved before results recorded one
# (``""``) joins any.
_MODEL_RECORDS = {"model_name": "one model", "model_dtype": "one model in one dtype"}


def joined_model_record(parts: Sequence[Any], name: str) -> str:
    """The model the parts of a join were made on: their one ``model_name`` or ``model_dtype``
    (``name``), ``""`` where no part recorded it.

    Raises:
        ValueError: Parts made on different models, or in different dtypes.
    """
    values = [str(getattr(part, name, "")) for part in parts]
    known = [(i, value) for i, value in enumerate(values) if value]
    for i, value in known[1:]:
        if value != known[0][1]:
            raise ValueError(
                f"Cannot join: part {i} has {name}={value!r}, part {known[0][0]} "
                f"{known[0][1]!r}; join results of {_MODEL_RECORDS[name]}."
            )
    return known[0][1] if known else ""


def concat_pairs(cls: type[_R], results: Sequence[_R]) -> _R:
    """Join results of one analysis run on different prompt pairs into the result of one run
    over all of them, in order: pair-indexed arrays are concatenated, the means and normalised
    recovery recomputed. Everything else (sites, positions, metric, direction, seed, number of
    controls) must agree.

    Raises:
        TypeError: ``results`` is empty or holds other types.
        ValueError: The parts differ in a field that is not per pair; the message names it.
    """
    parts = list(results)
    if not parts or not all(type(r) is cls for r in parts):
        got = sorted({type(r).__name__ for r in parts}) or ["nothing"]
        raise TypeError(f"{cls.__name__}.concat takes {cls.__name__}s; got {', '.join(got)}.")
    first = parts[0]
    joined: dict[str, Any] = {}
    for f in dataclasses.fields(first):  # type: ignore[arg-type]
        name, mine = f.name, getattr(first, f.name)
        if name in _PAIR_AXIS:
            shapes = [np.delete(np.shape(getattr(r, name)), _PAIR_AXIS[name]) for r in parts]
            if any(not np.array_equal(shape, shapes[0]) for shape in shapes):
                raise ValueError(
                    f"Cannot join: {name} has shapes {[np.shape(getattr(r, name)) for r in parts]}"
                    " (other cells or controls); join results of the same analysis only."
                )
            joined[name] = np.concatenate([getattr(r, name) for r in parts], axis=_PAIR_AXIS[name])
        elif name in _FIRST_PAIR:
            joined[name] = mine
        elif name in _PAIR_RECORDS:
            records = [tuple(getattr(r, name)) for r in parts]
            # A part without the record (an older file) leaves the joined result without it.
            joined[name] = () if any(not r for r in records) else sum(records, ())
        elif name in _MODEL_RECORDS:
            joined[name] = joined_model_record(parts, name)
        elif name not in _DERIVED:
            for i, r in enumerate(parts[1:], 1):
                if getattr(r, name) != mine:
                    raise ValueError(
                        f"Cannot join: part {i} has {name}={getattr(r, name)!r}, part 0 "
                        f"{mine!r}; join results of the same analysis (sites, positions, "
                        "metric, direction, seed and n_random) run on different pairs."
                    )
            joined[name] = mine
    _warn_repeated_pairs(parts)
    values = joined["per_pair"].mean(axis=0)
    joined["values"] = values
    ablation = str(joined["direction"]).endswith("ablation")
    joined["normalised"] = (
        np.full_like(values, np.nan)
        if ablation
        else normalised_recovery(values, joined["clean"], joined["corrupt"], str(joined["metric"]))
    )
    return cls(**joined)


def pair_records(
    model: Any, clean_ids: Sequence[Any], corrupt_ids: Sequence[Any] | None, metric: Any
) -> dict[str, tuple[Any, ...]]:
    """What a patching result records of its pairs: the prompts as the model read them (token ids
    decoded; ``"token ids [...]"`` for a model without a tokenizer) and the token ids its metric
    read (``corrupt_ids`` None for an ablation)."""
    tokenizer = getattr(model, "tokenizer", None)  # a model built without one runs on ids
    answers, wrong = metric_token_ids(model, metric, len(clean_ids))

    def texts(rows: Sequence[Any]) -> tuple[str, ...]:
        ids = [[int(t) for t in row] for row in rows]
        if tokenizer is None:
            return tuple(f"token ids {row}" for row in ids)
        return tuple(str(tokenizer.decode(row)) for row in ids)

    def tokens(ids: tuple[int, ...]) -> tuple[str, ...]:
        return () if tokenizer is None else tuple(token_texts(tokenizer, ids))

    return {
        "clean_prompts": texts(clean_ids),
        "corrupt_prompts": () if corrupt_ids is None else texts(corrupt_ids),
        "answer_ids": answers,
        "wrong_ids": wrong,
        # their text, for the figures' titles (a result holds no tokenizer to decode them)
        "answer_tokens": tokens(answers),
        "wrong_tokens": tokens(wrong),
    }


def _warn_repeated_pairs(parts: Sequence[Any]) -> None:
    """A pair in two parts counts twice in the joined means: the same job run twice, overlapping
    jobs, or a dataset that repeats the pair (which one run would count twice too). Said, where
    the parts record their prompts, not refused: only the user knows which it is."""
    seen: dict[tuple[str, str, int, int], int] = {}
    for i, part in enumerate(parts):
        clean = tuple(getattr(part, "clean_prompts", ()))
        if not clean:
            continue
        corrupt = tuple(getattr(part, "corrupt_prompts", ())) or clean
        answers = tuple(getattr(part, "answer_ids", ())) or (-1,) * len(clean)
        wrong = tuple(getattr(part, "wrong_ids", ())) or (-1,) * len(clean)
        mine = set(zip(clean, corrupt, answers, wrong, strict=True))
        for pair in sorted(mine & seen.keys()):
            warn(
                f"The pair ({pair[0]!r}, {pair[1]!r}) is in part {seen[pair]} and part {i}: it "
                "counts twice in the joined means. Drop one unless your dataset repeats it."
            )
            return
        seen |= dict.fromkeys(mine, i)


def normalised_recovery(
    values: np.ndarray,
    clean_m: np.ndarray,
    corrupt_m: np.ndarray,
    metric_name: str,
    dtype: torch.dtype | None = None,
) -> np.ndarray:
    """``(values - corrupt) / (clean - corrupt)`` over the pairs' mean metrics; NaN, with a
    warning, where the clean and corrupt runs agree to 1e-5 of the metric's size (a ratio of
    rounding errors would read as a large recovery), and a warning where a half-precision
    model's (``dtype``) rounding is a large part of their gap."""
    scale = float(np.mean(clean_m) - np.mean(corrupt_m))
    size = max(1.0, float(np.abs(clean_m).max()), float(np.abs(corrupt_m).max()))
    # A few of the model's rounding steps at the metric's size: in bfloat16 (steps of 1/128 of
    # the value) a gap of 0.03 between metrics near 3 gave recoveries of exactly 12.0 and -6.0.
    rounding = 8 * torch.finfo(dtype).eps * size if dtype is not None else 0.0
    if 1e-5 * size < abs(scale) <= rounding:
        warn(
            f"The clean and corrupt runs' {metric_name} differ by {abs(scale):.3g}, within a few "
            f"rounding steps of this {str(dtype).removeprefix('torch.')} model ({rounding:.2g}): "
            "normalised recovery divides rounding errors. Use prompts whose metrics differ "
            "more, or the model in float32.",
        )
    if abs(scale) <= 1e-5 * size:
        warn(
            f"The clean and corrupt runs give the same {metric_name} ({np.mean(clean_m):.4g}), "
            "so normalised recovery is undefined (NaN): use a corrupt prompt that changes the "
            "answer.",
        )
        return np.full_like(values, np.nan)
    return (values - np.mean(corrupt_m)) / scale


@dataclass(frozen=True, eq=False, repr=False)
class PatchResult(Result, format="mechprobe.PatchResult", version=3, html_figure=True):
    """Metric after patching (or ablating) each cell (site x position), averaged over prompt
    pairs, beside the same cells moved in random directions.

    Attributes:
        values: ``[sites, positions]`` metric after patching that one cell, mean over pairs.
        per_pair: ``[pairs, sites, positions]`` the same per prompt pair (its spread over pairs is
            :attr:`spread`).
        normalised: ``[sites, positions]`` recovery ``(values - corrupt) / (clean - corrupt)``
            computed on the pair means: 0 is the corrupt run's metric, 1 the clean run's (in both
            directions: with noising, 1 means the patch changed nothing). NaN when the clean and
            corrupt metrics coincide, where recovery is undefined, and for ablations.
        clean: ``[pairs]`` the metric on the unpatched clean run (an ablation's intact run).
        corrupt: ``[pairs]`` the metric on the unpatched corrupt run (NaN for ablations).
        sites: Row labels, e.g. ``"mlp_out@3"`` or ``"head@3, head 2"``, or a group's name
            (``sites={"name movers": [...]}``: its sites written as one cell).
        kinds, layers, heads: Per row: site kind, layer, head (None except for head sites; a
            key/value head for ``k`` and ``v``); a group's row is of kind ``"group"``, at layer
            and head None.
        positions: The requested positions (negative ones count back from each prompt's last
            token; None: every position at once, one column; names for positions given by
            name, whose index may differ from pair to pair).
        position_labels: Their tokens (``clean/corrupt`` where they differ; where pairs differ,
            the position and pair 0's token with an ellipsis, ``3: iffel…``; a named
            position's name).
        metric: The metric's name.
        direction: ``"denoising"``, ``"noising"``, ``"zero-ablation"``, ``"mean-ablation"``, or
            ``"attribution"`` (first-order estimates of denoising from
            :func:`mechprobe.attribution_patch`), ``"attribution-noising"`` (of noising).
        random: ``[n_random, pairs, sites, positions]`` the metric when the same cell is moved by
            the same distance in a random direction (row ``j``: seed ``(seed + j) % 2**32`` keyed by the
            pair's token ids).
        seed: The first seed of the random directions.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        clean_prompts, corrupt_prompts: ``[pairs]`` each pair's prompts as the model read them
            (their token ids decoded; an ablation's ``corrupt_prompts`` is empty).
        answer_ids, wrong_ids: ``[pairs]`` the token ids a :func:`mechprobe.logit_diff` or
            :func:`mechprobe.answer_prob` metric read (``wrong_ids`` empty for the latter;
            both empty for a metric function). The four are empty in files saved before results
            recorded them; :meth:`concat` joins them and warns of a pair found in two parts.
        answer_tokens, wrong_tokens: ``[pairs]`` those tokens' text, which the figures' titles
            name (empty for a model without a tokenizer and in files saved before).
        members: Per row, the sites its cells write (one for a single site; a group's sites),
            as labels (empty in files saved before results recorded them).
        position_indices: Where positions were named: per pair, each position's ``(clean,
            corrupt)`` token index (an ablation's prompt twice); empty otherwise.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.patch(mp.tiny_model(), "Hi cat", "Hi bat", "mlp_out", -1,
        ...                mp.logit_diff(1, 2), progress=False)
        >>> res.values.shape, res.direction, len(res.to_frame())
        ((3, 1), 'denoising', 3)
    """

    values: np.ndarray
    per_pair: np.ndarray
    normalised: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray
    sites: tuple[str, ...]
    kinds: tuple[str, ...]
    layers: tuple[int | None, ...]
    heads: tuple[int | None, ...]
    positions: tuple[int | str | None, ...]
    position_labels: tuple[str, ...]
    metric: str
    direction: str
    random: np.ndarray
    seed: int = 0
    model_name: str = ""
    model_dtype: str = ""
    clean_prompts: tuple[str, ...] = ()
    corrupt_prompts: tuple[str, ...] = ()
    answer_ids: tuple[int, ...] = ()
    wrong_ids: tuple[int, ...] = ()
    answer_tokens: tuple[str, ...] = ()
    wrong_tokens: tuple[str, ...] = ()
    members: tuple[tuple[str, ...], ...] = ()
    position_indices: tuple[tuple[tuple[int, int], ...], ...] = ()

    @classmethod
    def concat(cls, results: Sequence[PatchResult]) -> PatchResult:
        """Join results of one analysis run on different prompt pairs (split over jobs, or
        extended later) into the result of one run over all of them, pairs in order.

        A pair's values and random controls do not depend on the pairs run beside it (controls
        are keyed by the pair's tokens), so the joined result equals one run over every pair, up
        to float rounding of the batching. Mean-ablation is the exception where each part
        averaged over its own prompts: pass the same ``reference`` to every part.

        Args:
            results: Results of one analysis on different prompt pairs, in the order joined.

        Returns:
            One :class:`PatchResult` over every pair: ``per_pair`` is ``[total pairs, n_sites,
            n_positions]``.

        Raises:
            TypeError: ``results`` is empty or holds other types.
            ValueError: The parts differ in sites, positions, metric, direction, seed or number
                of controls (the message names the field). A pair in two parts is joined with a
                warning (it counts twice).

        Example:
            >>> import mechprobe as mp
            >>> model, metric = mp.tiny_model(), mp.logit_diff(1, 2)
            >>> parts = [mp.patch(model, c, k, "mlp_out", -1, metric, progress=False)
            ...          for c, k in [("Hi cat", "Hi bat"), ("A dog", "A fog")]]
            >>> whole = mp.patch(model, ["Hi cat", "A dog"], ["Hi bat", "A fog"], "mlp_out", -1,
            ...                  metric, progress=False)
            >>> joined = mp.PatchResult.concat(parts)
            >>> joined.per_pair.shape, bool(abs(joined.random - whole.random).max() < 1e-5)
            ((2, 3, 1), True)
        """
        return concat_pairs(cls, results)

    @property
    def n_random(self) -> int:
        """Random controls per cell."""
        return int(self.random.shape[0])

    def head_matrix(
        self, kind: str | None = None, position: int | str = 0, *, normalised: bool = True
    ) -> np.ndarray:
        """``[layers, heads]`` one head kind's cells at one position column: row ``l`` is layer
        ``l`` (up to the last layer patched), NaN where a head was not patched.

        Args:
            kind: The head kind (``"head"``, ``"q"``, ...); None: the only one patched.
            position: The column (an index into ``positions``), or a named position's name
                (``"S2"``).
            normalised: The normalised recovery, or, where it is undefined (ablations, equal
                clean and corrupt metrics), the metric's change from the edited run
                (:attr:`effect`), as :meth:`plot` draws; with False, the metric itself.

        Returns:
            ``[n_layers, n_heads]`` float array.

        Raises:
            ValueError: No head kind patched, several without ``kind``, or a bad column.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.patch(mp.tiny_model(), "Hi cat", "Hi bat", "head", -1,
            ...                mp.logit_diff(1, 2), n_random=0, progress=False)
            >>> res.head_matrix().shape  # 3 layers x 4 heads
            (3, 4)
        """
        kinds = [k for k in dict.fromkeys(self.kinds) if k in HEAD_KINDS]
        if kind is None:
            if len(kinds) != 1:
                raise ValueError(
                    f"head_matrix needs one head kind; this result has {kinds or 'none'}"
                    + (": pass kind=." if kinds else " (patch a head kind such as 'head').")
                )
            kind = kinds[0]
        elif kind not in kinds:
            raise ValueError(f"kind {kind!r} was not patched here; head kinds patched: {kinds}.")
        if isinstance(position, str):
            if position not in self.positions:
                named = [p for p in self.positions if isinstance(p, str)]
                raise ValueError(
                    f"position {position!r} is no column of this result"
                    + (f"; its named positions: {named}." if named else ": pass a column index.")
                )
            position = self.positions.index(position)
        column = check_int(position, "position", 0, len(self.positions) - 1)
        data = self.values
        if normalised:  # an ablation's grid was all NaN
            data = self.effect if np.isnan(self.normalised).all() else self.normalised
        rows = [i for i, k in enumerate(self.kinds) if k == kind]
        layers = np.asarray(self.layers)[rows]
        heads = np.asarray([self.heads[i] for i in rows], dtype=int)
        matrix = np.full((int(layers.max()) + 1, int(heads.max()) + 1), np.nan)
        matrix[layers, heads] = data[rows, column]
        return matrix

    @property
    def is_ablation(self) -> bool:
        """Whether the cells were ablated (no source prompt)."""
        return self.direction.endswith("ablation")

    @property
    def method(self) -> str:
        """``"attribution"`` for :func:`attribution_patch`'s gradient estimate (``direction``
        records it too), ``"exact"`` where every cell was patched or ablated."""
        return "attribution" if self.direction.startswith("attribution") else "exact"

    @property
    def spread(self) -> np.ndarray:
        """``[sites, positions]`` standard deviation of the per-pair values (NaN for one pair:
        a spread over one value is undefined, and 0 read as perfectly consistent)."""
        return spread_of(self.per_pair)

    @property
    def random_values(self) -> np.ndarray:
        """``[sites, positions]`` the random controls' metric, mean over seeds and pairs (NaN
        without controls)."""
        if self.n_random == 0:
            return np.full_like(self.values, np.nan)
        return self.random.mean(axis=(0, 1))

    @property
    def random_normalised(self) -> np.ndarray:
        """``[sites, positions]`` the random controls' recovery, normalised like ``normalised``."""
        scale = self.clean_metric - self.corrupt_metric
        if self.is_ablation or not np.isfinite(scale) or np.isnan(self.normalised).all():
            return np.full_like(self.values, np.nan)
        return (self.random_values - self.corrupt_metric) / scale

    @property
    def effect(self) -> np.ndarray:
        """``[sites, positions]`` change of the metric from the run that was edited: ``values -
        corrupt`` (denoising and its attribution), ``values - clean`` (noising, its attribution
        and ablations), pair
        means."""
        reference = self._reference
        return self.values - reference

    @property
    def random_effect(self) -> np.ndarray:
        """``[sites, positions]`` the same change under the random controls."""
        reference = self._reference
        return self.random_values - reference

    @property
    def _reference(self) -> float:
        """The metric of the run that was edited."""
        if self.direction in ("denoising", "attribution"):
            return self.corrupt_metric
        return self.clean_metric

    @property
    def clean_metric(self) -> float:
        """The clean run's metric, mean over pairs."""
        return float(np.mean(self.clean))

    @property
    def corrupt_metric(self) -> float:
        """The corrupt run's metric, mean over pairs."""
        return float(np.mean(self.corrupt))

    @property
    def kind(self) -> str:
        """The site kind of every row, or ``"mixed"``."""
        return self.kinds[0] if len(set(self.kinds)) == 1 else "mixed"

    def to_frame(self) -> pd.DataFrame:
        """One row per cell: site, kind, layer, head, position (as asked: ``-1`` is each pair's
        last token), position_label (the position's token as drawn: whitespace shown as ``␣``,
        ``clean/corrupt`` where a pair's tokens differ; ``token`` in other frames is a token's
        own text), value, normalised, effect, spread (standard deviation over pairs),
        random_value and random_effect (the controls' mean metric and its change from the edited
        run, beside ``value`` and ``effect``), random_std (standard deviation of the per-seed
        means), random_normalised, metric, direction.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> res = mp.patch(model, "ab", "ac", "mlp_out", -1, mp.logit_diff(1, 2))
            >>> list(res.to_frame().columns)[:3]
            ['site', 'kind', 'layer']
        """
        n_sites, n_pos = self.values.shape
        # None (every position at once) stays None in an object column; ints stay ints.
        ints = all(isinstance(p, int) for p in self.positions)
        positions = np.array(self.positions, dtype=np.int64 if ints else object)
        if self.n_random > 1:
            random_sd = self.random.mean(axis=1).std(axis=0, ddof=1)
        else:
            random_sd = np.full_like(self.values, np.nan)
        return pd.DataFrame(
            {
                "site": np.repeat(self.sites, n_pos),
                "kind": np.repeat(self.kinds, n_pos),
                "layer": layer_column([layer for layer in self.layers for _ in range(n_pos)]),
                "head": head_column(np.repeat(np.array(self.heads, dtype=object), n_pos)),
                "position": np.tile(positions, n_sites),
                "position_label": np.tile(self.position_labels, n_sites),
                "value": self.values.ravel(),
                "normalised": self.normalised.ravel(),
                "effect": self.effect.ravel(),
                "spread": self.spread.ravel(),
                "random_value": self.random_values.ravel(),
                "random_effect": self.random_effect.ravel(),
                "random_std": random_sd.ravel(),
                "random_normalised": self.random_normalised.ravel(),
                "metric": self.metric,
                "direction": self.direction,
            }
        )

    def summary(self, top: int = 5) -> pd.DataFrame:
        """The baselines and the cells that matter most (the ``top`` largest effects), each
        beside its spread over pairs and its random control.

        Args:
            top: The number of cells listed (0: the runs' rows alone).

        Returns:
            A frame: the clean and corrupt runs (the intact run, for an ablation), then the ``top``
            cells of largest absolute effect, with ``site``, ``position``, ``position_label``,
            ``value``, ``normalised``, ``spread`` and ``random_value``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.patch(mp.tiny_model(), "ab", "ac", "mlp_out", -1, mp.logit_diff(1, 2))
            >>> list(res.summary().columns)  # doctest: +NORMALIZE_WHITESPACE
            ['what', 'site', 'position', 'position_label', 'value', 'normalised', 'spread',
             'random_value']
        """
        frame = self.to_frame()
        check_int(top, "top", 0)
        largest = frame.reindex(frame["effect"].abs().sort_values(ascending=False).index)
        if self.is_ablation:
            rows = [{"what": "intact run", "value": self.clean_metric}]
        else:
            # the runs anchor the normalised scale only where it is defined (clean != corrupt)
            defined = bool(np.isfinite(self.normalised).any())
            rows = [
                {"what": "clean run", "value": self.clean_metric,
                 "normalised": 1.0 if defined else np.nan},
                {"what": "corrupt run", "value": self.corrupt_metric,
                 "normalised": 0.0 if defined else np.nan},
            ]  # fmt: skip
        what = "ablated cell" if self.is_ablation else "patched cell"
        keys = (
            "site", "position", "position_label", "value", "normalised", "spread", "random_value"
        )  # fmt: skip
        picked = largest.head(top).to_dict("records")
        rows += [{"what": what, **{k: r[k] for k in keys}} for r in picked]
        columns = ["what", *keys]
        if self.is_ablation:  # recovery is undefined without a corrupt run: NaN in every row
            columns.remove("normalised")
        frame = pd.DataFrame(rows).reindex(columns=columns)
        # The runs' rows have no position: Int64 with <NA> (a dash in the notebook table), as
        # every frame's missing layer or position; not floats ("3.0") nor an object column.
        # Named positions stay names.
        if not any(isinstance(p, str) for p in self.positions):
            frame["position"] = frame["position"].astype("Int64")
        return frame

    def _describe(self) -> str:
        n_pairs, n_sites, n_pos = self.per_pair.shape
        runs = (
            f"intact {self.clean_metric:.3g}"
            if self.is_ablation
            else f"clean {self.clean_metric:.3g}, corrupt {self.corrupt_metric:.3g}"
        )
        return (
            f"{self.direction}, {self.metric}: {n_sites} site(s) x {n_pos} position(s), "
            f"{n_pairs} pair(s), {self.n_random} random control(s); {runs}"
        )

    def plot(self, ax: Axes | None = None, *, normalised: bool = True) -> Figure:
        """Heatmap of the normalised recovery (or the raw metric) over sites x positions.

        Head sites at a single position are drawn as a layer x head grid, at up to eight
        positions as one such grid per position; several site kinds as one panel each, side by
        side on one colour scale (into ``ax``: one heatmap of every row). Noising is drawn as normalised damage, ``1 - normalised``, so that cells a patch
        left alone are white in both directions. Falls back to the metric's change from the
        edited run (:attr:`effect`) when normalised recovery is undefined (ablations, or equal
        clean and corrupt metrics).

        Args:
            ax: Draw one heatmap of every row into these axes (default: a new figure).
            normalised: Draw the normalised recovery (damage, for noising) where it is defined; with
                False, the metric's change from the edited run.

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.patch(mp.tiny_model(), "ab", "ac", "mlp_out", -1, mp.logit_diff(1, 2))
            >>> len(res.plot().axes)  # the heatmap and its colour bar
            2
        """
        use_norm = normalised and not bool(np.isnan(self.normalised).all())
        data = self.normalised if use_norm else self.effect
        # The metric's tokens, as direct logit attribution names them: a figure on a slide
        # said "logit_diff" and no longer which answer.
        measured = metric_title(self.metric, self.answer_tokens, self.wrong_tokens)
        label = "normalised recovery" if use_norm else f"change of {measured}"
        if (
            use_norm
            and self.direction.endswith("noising")
            and not self.direction.endswith("denoising")
        ):
            # Noising's recovery is 1 where a patch changed nothing: the untouched cells were
            # dark and the ones that matter pale. Its damage is 0 there, as in denoising.
            data = 1.0 - data
            label = "normalised damage (1 = the corrupt run's metric)"
        finite = np.abs(data[np.isfinite(data)])
        lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        what = self.direction if self.is_ablation else f"{self.direction} patching"
        if self.direction.startswith("attribution"):
            estimated = "noising" if self.direction.endswith("noising") else "denoising"
            what = f"attribution patching (estimated {estimated})"
        kinds = list(dict.fromkeys(self.kinds))
        title = literal(f"{what} of {', '.join(kinds)}: {measured}")
        if ax is None and self.kind in HEAD_KINDS and 1 < len(self.positions) <= _GRID_PANELS:
            # A layer x head grid per position (IOI's S2 and END side by side): one column of
            # 270 head rows per position read as a barcode.
            from matplotlib.figure import Figure

            layers, n_heads = self._head_axes()
            width = min(16.0 / len(self.positions), max(3.0, 0.3 * n_heads + 1.0))
            height = min(14.0, max(3.0, 0.25 * len(layers) + 1.5))
            fig = Figure(figsize=(width * len(self.positions) + 1.0, height), layout="constrained")
            axes = list(fig.subplots(1, len(self.positions), squeeze=False, sharey=True)[0])
            ticks = self._position_ticks()
            for column, axis in enumerate(axes):
                grid = self._head_grid(data[:, column], layers, n_heads)
                image = self._heatmap(
                    axis,
                    grid,
                    [str(layer) for layer in layers],
                    list(map(str, range(n_heads))),
                    lim,
                )
                axis.set_title(literal(ticks[column]), fontsize="small")
                axis.set_xlabel("head")
            axes[0].set_ylabel("layer")
            fig.colorbar(image, ax=axes, label=literal(label))
            fig.suptitle(title, fontsize=9)
            return fig
        if ax is None and len(kinds) > 1 and len(self.positions) > 1:
            # One tall stack of every kind's layers (90 rows, no separator) compared nothing
            # layer by layer: a panel per kind, on one scale.
            from matplotlib.figure import Figure

            rows = [[i for i, k in enumerate(self.kinds) if k == kind] for kind in kinds]
            # capped, as one kind's figure: 83 positions x 2 kinds drew 54 inches
            height = min(14.0, max(3.0, 0.25 * max(map(len, rows)) + 1.5))
            width = min(16.0 / len(kinds), max(4.0, 0.3 * len(self.positions) + 1.5))
            fig = Figure(figsize=(width * len(kinds) + 1.0, height), layout="constrained")
            axes = list(fig.subplots(1, len(kinds), squeeze=False)[0])
            for axis, kind, index in zip(axes, kinds, rows, strict=True):
                names = [
                    self.sites[i]  # a group's name
                    if self.layers[i] is None
                    else str(self.layers[i])
                    if self.heads[i] is None
                    else f"L{self.layers[i]}H{self.heads[i]}"
                    for i in index
                ]
                image = self._heatmap(axis, data[index], names, self._position_ticks(), lim)
                axis.set_title(literal(kind))
                axis.set_ylabel(
                    "group"
                    if kind == "group"
                    else "layer"
                    if kind not in HEAD_KINDS
                    else "layer, head"
                )
            fig.colorbar(image, ax=axes, label=literal(label))
            fig.suptitle(title, fontsize=9)
            return fig
        ylabels, xlabels = list(self.sites), self._position_ticks()
        head_grid = self.kind in HEAD_KINDS and len(self.positions) == 1
        if head_grid:
            # The grid has no position axis: say where the heads were patched (review 26a).
            at = self.positions[0]
            if at is None:
                title += f" ({self.position_labels[0]})"
            elif isinstance(at, str):
                title += f" at {at}"
            else:
                title += f" at position {at} ('{self.position_labels[0]}')"
            layers, n_heads = self._head_axes()
            data, ylabels, xlabels = (
                self._head_grid(data[:, 0], layers, n_heads),
                [str(layer) for layer in layers],
                list(map(str, range(n_heads))),
            )
        elif len(kinds) == 1 and kinds[0] != "group" and len(set(self.layers)) == len(self.layers):
            ylabels = [str(layer) for layer in self.layers]
        # Capped (83 positions drew 31 inches); past 40 columns or 56 rows the labels thin out.
        size = (
            min(16.0, max(4.0, 0.35 * len(xlabels) + 2)),
            min(14.0, max(3.0, 0.25 * len(ylabels) + 1.5)),
        )
        fig, ax = new_axes(ax, size)
        image = self._heatmap(ax, data, ylabels, xlabels, lim)
        # from the branch taken: one key/value head made the head axis read "position"
        ax.set_xlabel("head" if head_grid else "position")
        ax.set_ylabel("layer" if ylabels != list(self.sites) else "site")
        fig.colorbar(image, ax=ax, label=literal(label))
        # Wrapped to the figure: on a narrow heatmap (6 positions) one line ran past both edges.
        ax.set_title(textwrap.fill(title, max(30, int(10 * fig.get_figwidth()))), fontsize="small")
        return fig

    def _head_axes(self) -> tuple[list[int], int]:
        """The layers patched, in order, and the number of head columns of a head grid."""
        layers = sorted({int(layer) for layer in self.layers if layer is not None})
        return layers, max(h or 0 for h in self.heads) + 1

    def _head_grid(self, column: np.ndarray, layers: list[int], n_heads: int) -> np.ndarray:
        """``[layers, heads]`` one position's values of a head kind's rows (NaN: not patched)."""
        grid = np.full((len(layers), n_heads), np.nan)
        for value, layer, head in zip(column, self.layers, self.heads, strict=True):
            if layer is not None:  # always, rows of one head kind
                grid[layers.index(layer), head or 0] = value
        return grid

    def _position_ticks(self) -> list[str]:
        """The x tick of each position: its token and position (``"What (12)"``; where it is
        the only column, ``"':' (position -1)"``: a lone ":" rotated 90 degrees read as a dot
        pair)."""
        labels = list(self.position_labels)
        if len(labels) == 1 and isinstance(self.positions[0], int):
            return [f"'{labels[0]}' (position {self.positions[0]})"]
        # Each token with its position, as to_frame() says it: a few-shot prompt repeats tokens.
        return [
            label if not isinstance(at, int) else f"{label} ({at})"
            for label, at in zip(labels, self.positions, strict=True)
        ]

    @staticmethod
    def _heatmap(
        ax: Axes, data: np.ndarray, ylabels: list[str], xlabels: list[str], lim: float
    ) -> Any:
        image = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        x_step, y_step = -(-len(xlabels) // 40), -(-len(ylabels) // 56)
        xs, ys = range(0, len(xlabels), x_step), range(0, len(ylabels), y_step)
        # One column's tick upright: there is room, and rotated it was hard to read.
        rotation = 90 if len(xlabels) > 1 else 0
        ax.set_xticks(list(xs), labels=[literal(xlabels[i]) for i in xs], rotation=rotation)
        ax.set_yticks(list(ys), labels=[literal(ylabels[i]) for i in ys])
        return image
