"""The o-vector intervention: write ``scale * o`` in place of (or onto) FFN outputs, measure the answer.

Merullo et al. test whether an o-vector applies its relation out of context: on a context of random
words that contains an argument, ``"table mug free China table mug free China table mug free"``,
the model predicts the argument again (``" China"``); replacing the FFN outputs of a range of
layers with o should make it predict the answer (``" Beijing"``) instead.
:func:`mechprobe.random_word_contexts` builds such contexts deterministically, and
:func:`ovector_intervention` runs the intact model and every vector (the o-vector and its controls)
on the same contexts, recording for each the answer's rank and the top token at the last position
(an :class:`OVectorEffect`).

Metrics (:meth:`OVectorEffect.metrics`; ranks 0-based, reciprocal rank ``1 / (rank + 1)``):
``top1`` is the fraction of contexts whose top token is the answer's first token; ``no_effect_rate``
is the fraction whose top token is the same as in the intact run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechprobe.core import (
    Add,
    Batch,
    InterventionSpec,
    Layers,
    Replace,
    Result,
    Site,
    check_choice,
    check_finite,
    check_float,
    evaluates,
    first_token_ids,
    literal,
    model_adapter,
    positions_text,
    progress_bar,
    resolve_layers,
    run,
    target_rank,
    tokenize,
    warn,
    writer_positions,
)
from mechprobe.relational._figure import axes_for
from mechprobe.relational._ovector import OVector, _model_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OVectorEffect", "ovector_intervention"]

Mode = Literal["replace", "add"]
#: Positions a writer edits: ``"all"``, one position or several (negative: from each row's end).
WriterPositions = Literal["all"] | int | Sequence[int]

_METRIC_COLUMNS = (
    "n",
    "top1_before",
    "top1_after",
    "mean_rank_before",
    "mean_rank_after",
    "median_rank_after",
    "mrr_before",
    "mrr_after",
    "no_effect_rate",
)
_GROUPS = ("in_domain", "held_out")


@dataclass(frozen=True, eq=False, repr=False)
class OVectorEffect(Result, format="mechprobe.OVectorEffect", version=1, html_figure=True):
    """What writing each vector into the FFN outputs did to the answer, beside the intact model.

    Ranks and top tokens at the contexts' last token, intact and under each vector (formerly
    ``InterventionResult``).

    Attributes:
        contexts: The contexts run.
        targets: The expected answers (leading space included); their first token is scored.
        target_ids: ``[ctx]`` first token of each target.
        argument_ids: ``[ctx]`` first token of each argument (-1 when not given).
        groups: Per context, e.g. ``"in_domain"`` / ``"held_out"``.
        conditions: ``"intact"`` first, then the vectors' names.
        rank: ``[condition, ctx]`` rank of the target's first token.
        argument_rank: ``[condition, ctx]`` rank of the argument's first token (-1 if unknown).
        top: ``[condition, ctx]`` top token id.
        norms: Norm of each condition's vector before scaling (0 for ``"intact"``).
        layers: Layers whose FFN output was edited.
        scale: Scale applied to each vector.
        mode: ``"replace"`` or ``"add"``.
        positions: Positions edited (``"all"``, an int or several).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import numpy as np
        >>> res = OVectorEffect(
        ...     contexts=("c",), targets=(" B",), target_ids=np.array([5]),
        ...     argument_ids=np.array([-1]), groups=("all",), conditions=("intact", "o"),
        ...     rank=np.array([[3], [0]]), argument_rank=np.array([[-1], [-1]]),
        ...     top=np.array([[7], [5]]), norms=(0.0, 1.0), layers=(1,), scale=1.0,
        ...     mode="replace")
        >>> res
        OVectorEffect(2 conditions x 1 contexts, replace at layer 1, scale 1; top-1 o 1.00, intact 0.00)
    """

    contexts: tuple[str, ...]
    targets: tuple[str, ...]
    target_ids: Int[np.ndarray, " ctx"]
    argument_ids: Int[np.ndarray, " ctx"]
    groups: tuple[str, ...]
    conditions: tuple[str, ...]
    rank: Int[np.ndarray, "condition ctx"]
    argument_rank: Int[np.ndarray, "condition ctx"]
    top: Int[np.ndarray, "condition ctx"]
    norms: tuple[float, ...]
    layers: tuple[int, ...]
    scale: float
    mode: str
    positions: str | int | tuple[int, ...] = "all"
    model_name: str = ""
    model_dtype: str = ""

    def _index(self, name: str) -> int:
        if name not in self.conditions:
            raise KeyError(f"No condition {name!r}; conditions: {list(self.conditions)}.")
        return self.conditions.index(name)

    def metrics(self, conditions: str | Sequence[str], group: str | None = None) -> dict[str, Any]:
        """Before/after metrics of one condition, or pooled over several (e.g. random seeds).

        Args:
            conditions: A condition's name, or several (pooled: every (context, condition) pair
                counts once).
            group: Only the contexts of this group (``"in_domain"``, ``"held_out"``); None: all.

        Returns:
            ``layers, scale, mode, n, top1_before, top1_after, mean_rank_before,
            mean_rank_after, median_rank_before, median_rank_after, mrr_before, mrr_after,
            no_effect_rate, argument_top1_before, argument_top1_after`` (NaN where no context;
            the argument rates NaN where no argument is known).

        Example:
            >>> res = OVectorEffect(
            ...     contexts=("c",), targets=(" B",), target_ids=np.array([5]),
            ...     argument_ids=np.array([-1]), groups=("all",), conditions=("intact", "o"),
            ...     rank=np.array([[3], [0]]), argument_rank=np.array([[-1], [-1]]),
            ...     top=np.array([[7], [5]]), norms=(0.0, 1.0), layers=(1,), scale=1.0,
            ...     mode="replace")
            >>> res.metrics("o")["top1_after"], res.metrics("o")["no_effect_rate"]
            (1.0, 0.0)
        """
        names = [conditions] if isinstance(conditions, str) else list(conditions)
        cols = np.ones(len(self.contexts), dtype=bool)
        if group is not None:
            # A known group with no contexts here gives NaN rates (n=0); another name is a typo.
            if group not in self.groups and group not in ("in_domain", "held_out"):
                raise ValueError(
                    f"No context of group {group!r}; groups: {sorted(set(self.groups))}."
                )
            cols = np.asarray([g == group for g in self.groups])
        idx = [self._index(n) for n in names]
        before = np.tile(self.rank[0, cols], len(idx))
        after = np.concatenate([self.rank[i, cols] for i in idx])
        top0 = np.tile(self.top[0, cols], len(idx))
        top1 = np.concatenate([self.top[i, cols] for i in idx])
        arg0 = np.tile(self.argument_rank[0, cols], len(idx))
        arg1 = np.concatenate([self.argument_rank[i, cols] for i in idx])
        n = int(cols.sum())

        def stat(fn: Any, x: np.ndarray) -> float:
            return float(fn(x)) if x.size else float("nan")

        # argument_rank -1 marks a context whose argument is unknown (no arguments= given):
        # its top-1 rate is undefined, not 0.
        known = (arg0 >= 0) & (arg1 >= 0)

        return {
            "layers": list(self.layers),
            "scale": self.scale,
            "mode": self.mode,
            "n": n,
            "top1_before": stat(np.mean, before == 0),
            "top1_after": stat(np.mean, after == 0),
            "mean_rank_before": stat(np.mean, before),
            "mean_rank_after": stat(np.mean, after),
            "median_rank_before": stat(np.median, before),
            "median_rank_after": stat(np.median, after),
            "mrr_before": stat(np.mean, 1.0 / (before + 1.0)),
            "mrr_after": stat(np.mean, 1.0 / (after + 1.0)),
            "no_effect_rate": stat(np.mean, top0 == top1),
            "argument_top1_before": stat(np.mean, arg0[known] == 0),
            "argument_top1_after": stat(np.mean, arg1[known] == 0),
        }

    def summary(
        self, conditions: str | Sequence[str] | None = None, group: str | None = None
    ) -> pd.DataFrame | dict[str, Any]:
        """The key numbers: one row per condition family (random seeds pooled) and context
        group (``all``, then ``in_domain`` / ``held_out`` where the contexts have them).

        Columns: ``condition, group, n, top1_before, top1_after, mean_rank_before,
        mean_rank_after, median_rank_after, mrr_before, mrr_after, no_effect_rate``.

        ``summary(conditions, group)`` (the dict of one condition) is deprecated: call
        :meth:`metrics`.

        Args:
            conditions: Deprecated: with it (or ``group``), the dict of :meth:`metrics`.
            group: Deprecated, as ``conditions``.

        Returns:
            The frame of one row per condition family and group (or, deprecated, the dict of
            :meth:`metrics`).
        """
        if conditions is not None or group is not None:
            warn(
                "OVectorEffect.summary(conditions, group) is deprecated and will be removed in "
                "the next release; call .metrics(conditions, group) for the dict of one "
                "condition (summary() is the table of every condition).",
                DeprecationWarning,
            )
            return self.metrics(conditions if conditions is not None else "intact", group)
        rows = []
        groups = [None, *(g for g in _GROUPS if g in self.groups)]
        for family, names in self.families().items():
            for part in groups:
                values = self.metrics(names, group=part)
                rows.append(
                    {"condition": family, "group": part or "all"}
                    | {k: values[k] for k in _METRIC_COLUMNS}
                )
        return pd.DataFrame(rows)

    def families(self) -> dict[str, list[str]]:
        """Conditions grouped by name, the seeds of the random controls pooled:
        ``{"random": ["random_0", ...], "ovector": ["ovector"], ...}``. Only ``random_<seed>``
        (as :func:`ovector_controls` names them) is pooled; ``ovector_24`` and ``ovector_25``
        stay two conditions."""
        out: dict[str, list[str]] = {}
        for name in self.conditions:
            stem, _, tail = name.rpartition("_")
            out.setdefault("random" if stem == "random" and tail.isdigit() else name, []).append(
                name
            )
        return out

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: condition, context, group, target, rank, rr, ``correct`` (the answer is the
        top token), argument_rank, ``top_unchanged`` (the top token is the intact run's), and the
        run's layers (``"1-2"``), scale, mode and positions (``"all"``, ``"-1"``).

        Per row these are bools; their rates over contexts are ``top1`` and ``no_effect_rate``
        (:meth:`metrics`, :meth:`summary`, and the sweeps' ``top1`` and ``no_effect``)."""
        rows = []
        for c, name in enumerate(self.conditions):
            rows.append(
                pd.DataFrame(
                    {
                        "condition": name,
                        "context": np.arange(len(self.contexts)),
                        "group": list(self.groups),
                        "target": list(self.targets),
                        "rank": self.rank[c],
                        "rr": 1.0 / (self.rank[c] + 1.0),
                        "correct": self.rank[c] == 0,
                        # -1 marks an unknown argument: <NA>, as a frame's missing rank is
                        "argument_rank": pd.array(
                            [int(r) if r >= 0 else None for r in self.argument_rank[c]],
                            dtype="Int64",
                        ),
                        "top_unchanged": self.top[c] == self.top[0],
                        "layers": _span(self.layers),
                        "scale": self.scale,
                        "mode": self.mode,
                        "positions": positions_text(self.positions),
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def plot(self, ax: Axes | None = None, *, metric: str | None = None) -> Figure:
        """Top-1 rate and mean reciprocal rank of the answer per condition (seeds pooled), one bar
        per context group (in-domain / held-out) when the contexts have groups.

        Two panels side by side in a new figure; given ``ax``, only the ``metric`` panel
        (``"top1"``, the default, or ``"mrr"``) is drawn into it. With no ``ax``, ``metric`` draws
        that panel alone.

        Args:
            ax: Draw one panel into these axes (default: a new figure of both panels).
            metric: The panel drawn alone, ``"top1"`` or ``"mrr"`` (None: both, or with ``ax``
                ``"top1"``).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        if metric is not None:
            check_choice(metric, "metric", ("top1", "mrr"))
        if ax is not None or metric is not None:
            fig, one = axes_for(ax, (4.5, 3.2), "OVectorEffect.plot")
            self._draw([one], [metric or "top1"])
            return fig
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 3.2), layout="constrained")
        self._draw(list(fig.subplots(1, 2)), ["top1", "mrr"])
        return fig

    def _draw(self, axes: Sequence[Axes], metrics: Sequence[str], *, setting: str = "") -> None:
        """Draw the bars of each of ``metrics`` into the matching axes (the first gets legend and
        title, which ``setting`` starts)."""
        fams = self.families()
        names = list(fams)
        groups: list[str | None] = [g for g in _GROUPS if g in self.groups]
        groups = groups or [None]
        labels = {"top1": "answer top-1 rate", "mrr": "answer MRR"}
        width = 0.8 / len(groups)
        x = np.arange(len(names))
        for ax, key in zip(axes, metrics, strict=True):
            for j, group in enumerate(groups):
                values = [self.metrics(fams[n], group=group)[f"{key}_after"] for n in names]
                shift = (j - (len(groups) - 1) / 2) * width
                # n per group: "held-out top-1 0.08" is k of n, and n is small
                n = len(self.groups) if group is None else self.groups.count(group)
                name = (group or "all").replace("_", "-")
                ax.bar(x + shift, values, width, label=f"{name} (n={n})")
                for i, v in enumerate(values):
                    if np.isfinite(v):
                        ax.text(i + shift, v + 0.02, f"{v:.2f}", ha="center", fontsize=6)
            ax.set_xticks(x, [literal(n) for n in names], rotation=20, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel(labels[key])
        if groups != [None]:  # one group needs no legend
            axes[0].legend(fontsize=7)
        axes[0].set_title(
            f"{setting}{self.mode} FFN output, layers {_span(self.layers)}, scale {self.scale:g}, "
            f"{len(self.contexts)} contexts",
            fontsize=8,
            loc="left",
        )

    def _describe(self) -> str:
        fams = self.families()
        first = next((f for f in fams if f != "intact"), "intact")
        # Counted as summary() and plot() show them: the random seeds are one condition.
        pooled = [f"{name}: {len(seeds)} seeds" for name, seeds in fams.items() if len(seeds) > 1]
        seeds = f" ({'; '.join(pooled)})" if pooled else ""
        return (
            f"{len(fams)} conditions{seeds} x {len(self.contexts)} contexts, {self.mode} at "
            f"layer{'s' if len(self.layers) > 1 else ''} {_span(self.layers)}, scale "
            f"{self.scale:g}; top-1 {first} {self.metrics(fams[first])['top1_after']:.2f}, "
            f"intact {self.metrics('intact')['top1_after']:.2f}"
        )


def _span(layers: Sequence[int]) -> str:
    """``24-29`` for a run of layers, ``3,5`` otherwise."""
    if len(layers) > 1 and list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(x) for x in layers)


def _vector(value: OVector | Tensor | np.ndarray, name: str, width: int, model: str) -> Tensor:
    if isinstance(value, OVector) and value.model and model and value.model != model:
        raise ValueError(
            f"Vector {name!r} was extracted from {value.model!r}, not from this model "
            f"({model!r}): extract it from this model, or pass its .vector (a plain tensor) to "
            "write it here on purpose."
        )
    vec = value.vector if isinstance(value, OVector) else torch.as_tensor(value)
    if vec.ndim != 1 or vec.shape[0] != width:
        raise ValueError(
            f"Vector {name!r} has shape {tuple(vec.shape)}; the FFN outputs have width {width}: "
            f"pass a [{width}] vector (an OVector from extract_ovector)."
        )
    check_finite(vec, f"Vector {name!r}")
    return vec.detach().float()


def _vectors(vectors: Mapping[str, OVector | Tensor | np.ndarray], model: Any) -> dict[str, Tensor]:
    """Every vector checked (1-D, the model's width, finite, an OVector from this model), as
    float32 tensors."""
    if not isinstance(vectors, Mapping):
        raise TypeError(
            f"vectors must be a dict {{name: vector}}, got {type(vectors).__name__}; e.g. "
            "{'ovector': o, 'random_0': mp.random_ovector(o, seed=0)}."
        )
    if "intact" in vectors:
        raise ValueError("'intact' is reserved for the unedited model; rename that vector.")
    width, here = int(model.cfg.d_model), _model_name(model)
    return {name: _vector(v, name, width, here) for name, v in vectors.items()}


def _layers(model: Any, layers: Any) -> tuple[int, ...]:
    """The FFN layers a write edits (a layer set of the vocabulary), sorted."""
    return tuple(sorted(resolve_layers(model, layers)))


def _unambiguous(layers: Any, what: str, *, pairs_only: bool = False) -> Any:
    """``layers``, unless it is a tuple (a pair with ``pairs_only``): the old ``(start, stop)``
    layer ranges look alike, so ``(18, 24)`` could mean layers 18-23 or 18 and 24."""
    if isinstance(layers, tuple) and (len(layers) == 2 or not pairs_only):
        pair = f"range{layers}" if len(layers) == 2 else "range(start, stop)"
        raise TypeError(
            f"{what} {layers!r} is a tuple, which is ambiguous (the old layer_ranges were "
            f"(start, stop) pairs): pass {pair} for a span, or a list {list(layers)} for exactly "
            "those layers."
        )
    return layers


def _texts(value: Any, what: str, example: str) -> list[str]:
    """A list of strings (one string is refused: it would be read letter by letter)."""
    if isinstance(value, str):
        raise TypeError(f"{what} is one string: pass a list of them (e.g. [{value[:30]!r}]).")
    items = list(value)
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(
                f"{what} are strings (e.g. {example!r}); entry {i} is "
                f"{type(item).__name__} {item!r}."
            )
    return items


def _pairs(contexts: Any, targets: Any) -> tuple[list[str], list[str]]:
    """Contexts and their targets: lists of strings, one target per context, at least one."""
    contexts = _texts(contexts, "contexts", "table mug Poland")
    targets = _texts(targets, "targets", " Warsaw")
    if len(contexts) != len(targets) or not contexts:
        raise ValueError(
            f"Got {len(contexts)} contexts and {len(targets)} targets: pass one target per "
            "context, at least one."
        )
    return contexts, targets


def _scale(scale: Any, name: str, sweep: str) -> float:
    """One finite scale; several are a sweep's."""
    if np.ndim(scale) != 0:
        raise TypeError(f"{name} is one number, got {scale!r}: for several scales use {sweep}.")
    return _scales(scale, name)[0]


def _positions(positions: Any, owner: str) -> str | int | tuple[int, ...]:
    """A writer's positions: ``"all"``, an int or several ints, read by the core's one check
    (the old None read as "all"); several as a tuple, which a frozen result can hold."""
    where = writer_positions(positions, owner)
    return tuple(where) if isinstance(where, list) else where


def _core_positions(positions: str | int | tuple[int, ...]) -> int | tuple[int, ...] | None:
    """The positions argument of the core's interventions, which act everywhere on None."""
    return None if isinstance(positions, str) else positions


def _scales(scales: Any, name: str) -> tuple[float, ...]:
    """Finite scales (a NaN scale would write NaN and rank every answer 0)."""
    values = [scales] if np.ndim(scales) == 0 else list(scales)
    if not values:
        raise ValueError(f"{name} is empty: pass at least one scale, e.g. (1.0, 2.0, 4.0).")
    return tuple(check_float(v, name) for v in values)


def _spec(
    vector: Tensor,
    layers: Sequence[int],
    scale: float,
    mode: Mode,
    positions: str | int | tuple[int, ...],
) -> InterventionSpec:
    """One edit per layer: ``mlp_out = scale * o`` (replace) or ``mlp_out + scale * o`` (add)."""
    at = _core_positions(positions)
    if mode == "replace":
        return {Site("mlp_out", layer): Replace(scale * vector, positions=at) for layer in layers}
    return {Site("mlp_out", layer): Add(vector, scale=scale, positions=at) for layer in layers}


def _evaluate(
    model: Any,
    batch: Batch,
    target_ids: Tensor,
    argument_ids: Tensor,
    spec: InterventionSpec | None,
    batch_size: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of target and argument, and the top token, at each context's last token."""
    out = run(model, batch, spec, logit_positions=-1, batch_size=batch_size, progress=False)
    logits = out.logits[:, 0].float()
    # A NaN logit compares false with everything: it would count as rank 0, a perfect hit.
    check_finite(logits, "The logit tensor at the contexts' last token")
    target_ids, argument_ids = target_ids.to(logits.device), argument_ids.to(logits.device)
    rank = target_rank(logits, logits.gather(-1, target_ids[:, None]))[:, 0]
    arg = target_rank(logits, logits.gather(-1, argument_ids.clamp(min=0)[:, None]))[:, 0]
    arg = torch.where(argument_ids < 0, torch.full_like(arg, -1), arg)
    return rank.cpu().numpy(), arg.cpu().numpy(), logits.argmax(-1).cpu().numpy()


@evaluates
def ovector_intervention(
    model: Any,
    vectors: Mapping[str, OVector | Tensor | np.ndarray],
    contexts: Sequence[str],
    targets: Sequence[str],
    *,
    layers: Layers,
    scale: float = 1.0,
    mode: Mode = "replace",
    positions: WriterPositions = "all",
    arguments: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int | None = 32,
    progress: bool = True,
) -> OVectorEffect:
    """Run the contexts intact and with each vector written into the FFN outputs of ``layers``.

    Args:
        model: A TransformerLens model.
        vectors: ``{name: vector}``, e.g. ``{"ovector": o, "random_0": r0, "other_task": o2}``,
            each an :class:`OVector` or a ``[d_model]`` tensor or array; every vector runs on
            the same contexts, beside the intact model.
        contexts: Prompts whose next token is scored (see :func:`random_word_contexts`).
        targets: The answer each context should turn into (``" Beijing"``); its first token is
            scored.
        layers: FFN layers to edit: an int, a range, a list or ``"all"`` (Merullo et al. wrote
            o, read at GPT-2 medium's layer 19, into layers 18-23: from one layer before the
            function-application layer to the last).
        scale: Multiplier of each vector (finite).
        mode: ``"replace"`` writes ``scale * o`` in place of the FFN output (Merullo et al.);
            ``"add"`` adds it to the FFN output.
        positions: Positions to edit: ``"all"`` (as in the paper), an int (``-1``: each context's
            last token) or a list of ints.
        arguments: Optional arguments of the contexts, to also report the argument's rank.
        groups: Optional label per context (e.g. ``"in_domain"`` / ``"held_out"``).
        batch_size: Rows per forward pass.
        progress: Show a progress bar over conditions (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        An :class:`OVectorEffect` with conditions ``"intact"`` then each of ``vectors`` in
        order: ``rank``, ``argument_rank`` and ``top`` are ``[n_conditions, n_contexts]``.

    Raises:
        ValueError: A vector of the wrong width or with NaN / infinite entries, a non-finite
            scale, mismatched lengths, or logits that come out non-finite.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> ctx = mp.random_word_contexts([" Poland"], seed=0)
        >>> res = mp.ovector_intervention(model, {"ovector": torch.randn(64)}, ctx, [" Warsaw"],
        ...                               layers=[1, 2])
        >>> res.conditions, res.rank.shape
        (('intact', 'ovector'), (2, 1))
    """
    check_choice(mode, "mode", ("replace", "add"))
    contexts, targets = _pairs(contexts, targets)
    if arguments is not None:
        arguments = _texts(arguments, "arguments", " Poland")
    for label, seq in [("arguments", arguments), ("groups", groups)]:
        if seq is not None and len(seq) != len(contexts):
            raise ValueError(f"{label} has {len(seq)} entries for {len(contexts)} contexts.")
    vecs = _vectors(vectors, model)
    scale = _scale(scale, "scale", "ovector_sweep(..., scales=[...])")
    where = _positions(positions, "ovector_intervention")
    layer_tuple = _layers(model, _unambiguous(layers, "layers=", pairs_only=True))
    batch = tokenize(model, contexts)
    warn_unspaced(targets, "targets")
    if arguments is not None:
        warn_unspaced(arguments, "arguments")
    target_ids = torch.as_tensor(first_token_ids(model, targets))
    argument_ids = (
        torch.as_tensor(first_token_ids(model, arguments))
        if arguments is not None
        else torch.full((len(contexts),), -1)
    )
    names = ["intact", *vecs]
    results = []
    for name in progress_bar(names, progress=progress, desc="intervention"):
        spec = None
        if name != "intact":
            spec = _spec(vecs[name], layer_tuple, scale, mode, where)
        results.append(_evaluate(model, batch, target_ids, argument_ids, spec, batch_size))
    return OVectorEffect(
        contexts=tuple(contexts),
        targets=tuple(targets),
        target_ids=target_ids.cpu().numpy(),
        argument_ids=argument_ids.cpu().numpy(),
        groups=tuple(groups) if groups is not None else ("all",) * len(contexts),
        conditions=tuple(names),
        rank=np.stack([r[0] for r in results]),
        argument_rank=np.stack([r[1] for r in results]),
        top=np.stack([r[2] for r in results]),
        norms=(0.0, *(float(v.norm()) for v in vecs.values())),
        layers=layer_tuple,
        scale=scale,
        mode=mode,
        positions=where,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def warn_unspaced(words: Sequence[str], what: str) -> None:
    """Warn when a word to score has no leading space: its first token is then the start of the
    bare string ("Warsaw" -> "W"), not the word a context continues with (" Warsaw")."""
    bare = [w for w in words if w and not w[0].isspace()]
    if bare:
        warn(
            f"{what} are scored by the first token of each string as given, and {bare[:3]} have "
            f"no leading space: {bare[0]!r} is not the token of the word after a space. Pass "
            f"{' ' + bare[0]!r} (task answers and random_word_contexts add the space).",
            UserWarning,
        )
