"""Circuit faithfulness by mean ablation: how much of the model's behaviour a circuit alone keeps.

Wang, Variengien, Conmy, Shlegeris & Steinhardt (2022), "Interpretability in the Wild: a Circuit
for Indirect Object Identification in GPT-2 small", section 4: every component outside the circuit
is mean-ablated (set to its mean over a reference dataset, the "ABC" prompts of the same templates,
position by position), and the metric of the model that remains is compared with the full model's.
Wang et al. report the ratio ``mean circuit / mean full`` (:attr:`FaithfulnessResult.ratio`, their
87%); later circuit work (e.g. Marks et al. 2024) measures it from the model with every component
ablated, which this module's ``faithfulness`` does::

    faithfulness = (mean circuit - mean empty) / (mean full - mean empty)

where ``empty`` ablates every component: 1 is the whole behaviour kept, 0 none of it (the two agree
where ``empty`` is near 0, as with ABC means). Four runs per prompt, each one forward pass per
batch however many components are ablated:

- ``full``: nothing ablated;
- ``circuit``: every component outside the circuit ablated (a circuit site with ``positions`` is
  kept only there, and ablated at the prompt's other positions);
- ``empty``: every component ablated;
- ``knockout``: the circuit alone ablated, at the positions where it is kept (Wang et al.'s
  completeness check starts here: what the rest of the model does without the circuit).

Means per position need prompts of one length: prompts and reference prompts are grouped (by token
length unless ``groups=`` labels them), and each prompt's ablations take the means of its group's
reference prompts. Grouped by length, different templates of one length share their means (a
warning says so where a length group's prompts look like several templates): pass each prompt's
template as ``groups=`` for Wang et al.'s means per template. ``per_position=False`` takes one mean per site over every real token of every
reference prompt (BOS left out, as ``Ablate("mean")`` does).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechprobe.core import (
    Ablate,
    Batch,
    Intervention,
    Result,
    Site,
    SiteKind,
    SiteLike,
    as_int,
    check_batch_size,
    check_bool,
    check_choice,
    check_positions,
    evaluates,
    expand_sites,
    format_number,
    literal,
    model_adapter,
    new_axes,
    positions_text,
    progress_bar,
    run,
    spread,
    tokenize,
    warn,
)
from mechprobe.patching._activation import NamedPositions, position_pairs
from mechprobe.patching._metrics import bind_metric, check_unpatched

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["CONDITIONS", "FaithfulnessResult", "faithfulness"]

#: Where a circuit site is kept: a name of ``positions=``, an int, a list of them, or ``"all"``.
Kept: TypeAlias = str | int | Sequence[str | int]

#: The four runs, in the order of frames and plots.
CONDITIONS = ("full", "circuit", "empty", "knockout")
_LABELS = {
    "full": "full model",
    "circuit": "circuit alone",
    "empty": "all ablated",
    "knockout": "circuit knocked out",
}
# Attention maps are left out: their key axis is the batch's padded layout, so a mean over prompts
# mixes tokens (Ablate refuses it for the same reason).
_KINDS = tuple(kind for kind in typing.get_args(SiteKind) if kind != "pattern")


@dataclass(frozen=True, eq=False, repr=False)
class FaithfulnessResult(Result, format="mechprobe.FaithfulnessResult", version=1):
    """A circuit's faithfulness: the metric with everything outside the circuit ablated, beside
    the full model, everything ablated and the circuit knocked out.

    Attributes:
        full: ``[prompts]`` the metric of the model as it is.
        circuit: ``[prompts]`` the metric with every component outside the circuit ablated.
        empty: ``[prompts]`` the metric with every component ablated.
        knockout: ``[prompts]`` the metric with the circuit alone ablated (where it is kept).
        metric: The metric's name (``"logit_diff"``, ``"answer_prob"`` or a function's name).
        method: ``"mean"`` or ``"zero"``.
        per_position: Whether means were taken per position within each prompt's group (read
            with ``method="mean"`` only).
        circuit_sites: The circuit's site labels (``"head@9, head 6"``), in the order given.
        circuit_positions: Per circuit site, where it is kept: ``"all"``, or its positions as
            text (``"-1"``; negative from each prompt's last real token).
        n_components: How many components were ablated in ``empty`` (the circuit's included).
        prompts: The prompts, as read.
        model_name: The model's name (``cfg.model_name``), for the record.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        components: The components' labels (what ``empty`` ablates).
        reference_prompts: The prompts the means were taken over (empty for zero-ablation).
        groups: Per prompt, the group whose means it took (``groups=``'s label as text, or
            ``"15 tokens"`` where prompts were grouped by length; empty where means were pooled
            or zero).
        named_positions: Per name of ``positions=``, its index in each prompt.
        without: ``[circuit sites, prompts]`` with ``leave_one_out=True``: the metric of the
            circuit less each of its sites (that site ablated everywhere, the rest as in
            ``circuit``); None without. A site whose absence raises the metric made the circuit
            worse (a head kept without its inputs can do worse than its mean).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.faithfulness(mp.tiny_model(), ["Hi cat", "Hi dog"],
        ...                       [mp.Site("head", 2, head=1)], mp.logit_diff(5, 6), progress=False)
        >>> res.n_components, list(res.to_frame()["condition"])
        (12, ['full', 'circuit', 'empty', 'knockout'])
    """

    full: np.ndarray
    circuit: np.ndarray
    empty: np.ndarray
    knockout: np.ndarray
    metric: str
    method: str
    per_position: bool
    circuit_sites: tuple[str, ...]
    circuit_positions: tuple[str, ...]
    n_components: int
    prompts: tuple[str, ...]
    model_name: str = ""
    model_dtype: str = ""
    components: tuple[str, ...] = ()
    reference_prompts: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    named_positions: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    without: np.ndarray | None = None

    @property
    def without_each(self) -> dict[str, float]:
        """Per circuit site (its label), the faithfulness of the circuit without it (on
        :attr:`faithfulness`'s scale: 0 at ``empty``, 1 at ``full``); {} without
        ``leave_one_out=True``."""
        if self.without is None:
            return {}
        return {
            site: self._on_scale(float(np.mean(row)))
            for site, row in zip(self.circuit_sites, self.without, strict=True)
        }

    def _on_scale(self, mean: float) -> float:
        """A mean metric on the scale where ``empty`` is 0 and ``full`` is 1 (NaN where the two
        are equal)."""
        means = self.means
        if _degenerate(means["full"], means["empty"]):
            return float("nan")
        # + 0.0: empty's own (e - e) / negative scale is -0.0, which frames show as "-0".
        return (mean - means["empty"]) / (means["full"] - means["empty"]) + 0.0

    @property
    def means(self) -> dict[str, float]:
        """Each condition's metric averaged over prompts, keyed by :data:`CONDITIONS`."""
        return {c: float(np.mean(getattr(self, c))) for c in CONDITIONS}

    @property
    def normalised(self) -> dict[str, float]:
        """Each condition's mean on the scale where ``empty`` is 0 and ``full`` is 1 (so
        ``circuit``'s is :attr:`faithfulness`); NaN everywhere where full and empty are equal."""
        return {c: self._on_scale(mean) for c, mean in self.means.items()}

    @property
    def ratio(self) -> float:
        """``mean circuit / mean full``: the share Wang et al. report (their 87%), without the
        empty model's baseline that :attr:`faithfulness` subtracts."""
        full = float(np.mean(self.full))
        return float(np.mean(self.circuit)) / full if full != 0 else float("nan")

    @property
    def faithfulness(self) -> float:
        """``(mean circuit - mean empty) / (mean full - mean empty)``: the share of the full
        model's behaviour the circuit alone keeps (NaN where full and empty are equal)."""
        return self.normalised["circuit"]

    def to_frame(self) -> pd.DataFrame:
        """One row per condition: ``condition``, ``site`` (None), ``value`` (the mean over
        prompts), ``spread`` (their standard deviation; NaN for one prompt), ``normalised`` (0
        at ``empty``, 1 at ``full``) and ``metric``; with ``leave_one_out=True`` one more row
        per circuit site, condition ``"without"``, ``site`` the site left out.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.faithfulness(mp.tiny_model(), ["Hi cat", "Hi dog"], ["head@2, head 1"],
            ...                       mp.logit_diff(5, 6), leave_one_out=True, progress=False)
            >>> list(res.to_frame().columns)
            ['condition', 'site', 'value', 'spread', 'normalised', 'metric']
            >>> list(res.to_frame()["condition"])
            ['full', 'circuit', 'empty', 'knockout', 'without']
        """
        normalised, without = self.normalised, self.without_each
        runs: list[tuple[str, str | None, np.ndarray, float]] = [
            (c, None, np.asarray(getattr(self, c)), normalised[c]) for c in CONDITIONS
        ]
        if self.without is not None:
            runs += [
                ("without", site, np.asarray(row), without[site])
                for site, row in zip(self.circuit_sites, self.without, strict=True)
            ]
        rows = [
            {
                "condition": condition,
                "site": site,
                "value": float(np.mean(values)),
                "spread": float(spread(values.astype(np.float64))),
                "normalised": share,
                "metric": self.metric,
            }
            for condition, site, values, share in runs
        ]
        columns = ["condition", "site", "value", "spread", "normalised", "metric"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> pd.DataFrame:
        """One row: the metric, the ablation, the sizes, each condition's mean and the
        faithfulness.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.faithfulness(mp.tiny_model(), ["Hi cat", "Hi dog"], ["head@2, head 1"],
            ...                       mp.logit_diff(5, 6), progress=False)
            >>> list(res.summary().columns)  # doctest: +NORMALIZE_WHITESPACE
            ['metric', 'method', 'per_position', 'n_prompts', 'circuit_size', 'n_components',
             'full', 'circuit', 'empty', 'knockout', 'faithfulness', 'ratio']
        """
        row: dict[str, Any] = {
            "metric": self.metric,
            "method": self.method,
            "per_position": self.per_position,
            "n_prompts": len(self.full),
            "circuit_size": len(self.circuit_sites),
            "n_components": self.n_components,
            **self.means,
            "faithfulness": self.faithfulness,
            "ratio": self.ratio,
        }
        return pd.DataFrame([row])

    def plot(self, ax: Axes | None = None) -> Figure:
        """Each condition's mean as a bar, every prompt's value as a point on it; with
        ``leave_one_out=True`` (and no ``ax``) a second panel: the faithfulness without each
        circuit site beside the whole circuit's.

        Args:
            ax: Draw the bars into these axes (default: a new figure, with the leave-one-out panel
                where there is one).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.faithfulness(mp.tiny_model(), ["Hi cat", "Hi dog"], ["head@2, head 1"],
            ...                       mp.logit_diff(5, 6), progress=False)
            >>> len(res.plot().axes[0].patches)
            4
        """
        if ax is None and self.without is not None:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(10, max(3.5, 0.3 * len(self.circuit_sites) + 1.5)))
            fig.set_layout_engine("constrained")
            ax, side = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
            self._plot_without(side)
        else:
            fig, ax = new_axes(ax, (5.5, 3.5))
        means = self.means
        colours = ["tab:green", "tab:blue", "lightgrey", "tab:red"]
        bars = ax.bar(range(4), [means[c] for c in CONDITIONS], color=colours, alpha=0.8)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)  # a mean near 0 is otherwise no bar
        n = len(self.full)
        # Spread the points across the bar so that equal values stay visible one by one.
        jitter = np.linspace(-0.25, 0.25, n) if n > 1 else np.zeros(1)
        for i, c in enumerate(CONDITIONS):
            ax.plot(i + jitter, getattr(self, c), "k.", markersize=3)
        ax.axhline(0.0, color="black", linewidth=0.5)
        ax.set_xticks(range(4), [_LABELS[c] for c in CONDITIONS], fontsize="small")
        ax.set_ylabel(literal(self.metric))
        ax.set_title(
            f"faithfulness {format_number(self.faithfulness)}: {len(self.circuit_sites)} of "
            f"{self.n_components} components kept; {self._how()}, {n} prompts",
            fontsize="small",
        )
        return fig

    def _plot_without(self, ax: Axes) -> None:
        without = self.without_each
        labels = list(without)
        ax.barh(range(len(labels)), list(without.values()), color="tab:blue", alpha=0.7)
        ax.axvline(self.faithfulness, color="black", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(labels)), [literal(x) for x in labels], fontsize="small")
        ax.invert_yaxis()  # the circuit's first site on top
        ax.set_xlabel("faithfulness without it (dashed: the whole circuit)")
        ax.set_title("each site left out", fontsize="small")

    def _how(self) -> str:
        if self.method == "zero":
            return "zero ablation"
        return "mean ablation per position" if self.per_position else "mean ablation"

    def _describe(self) -> str:
        means = self.means
        return (
            f"faithfulness {format_number(self.faithfulness)} (circuit / full "
            f"{format_number(self.ratio)}): {self.metric} full "
            f"{format_number(means['full'])}, circuit {format_number(means['circuit'])}, empty "
            f"{format_number(means['empty'])}, knockout {format_number(means['knockout'])}; "
            f"{len(self.circuit_sites)} of {self.n_components} components kept, "
            f"{len(self.full)} prompts, {self._how()}"
        )


def _degenerate(full: float, empty: float) -> bool:
    """Whether full and empty are equal up to float rounding (the ratio would be noise)."""
    return bool(abs(full - empty) <= 1e-12 * max(1.0, abs(full), abs(empty)))


@evaluates
def faithfulness(
    model: Any,
    prompts: str | Sequence[str],
    circuit: SiteLike | Sequence[SiteLike] | Mapping[Site, Kept] | Mapping[str, Kept],
    metric: Any,
    *,
    positions: NamedPositions | None = None,
    reference: str | Sequence[str] | None = None,
    components: Literal["heads"] | SiteLike | Sequence[SiteLike] = "heads",
    method: Literal["mean", "zero"] = "mean",
    per_position: bool = True,
    groups: tuple[Sequence[Hashable], Sequence[Hashable]] | None = None,
    leave_one_out: bool = False,
    batch_size: int | None = 32,
    progress: bool = True,
) -> FaithfulnessResult:
    """Ablate every component outside ``circuit`` and measure how much of the model's behaviour
    the circuit alone keeps (module docstring; Wang et al. 2022), beside the full model, every
    component ablated and the circuit knocked out.

    Args:
        model: A TransformerLens model.
        prompts: The prompts (or one) the metric is read on, at each prompt's last real token.
        circuit: The sites kept: Sites or their labels (``Site("head", 9, head=6)`` is that
            head's ``z``; ``"head@9, head 6"``), or hook names. A Site with ``positions`` (ints,
            negative from each prompt's last real token) is kept there only and ablated at the
            prompt's other positions (Wang et al. keep the name movers at the last token). Or a
            mapping from sites to where each is kept: a name of ``positions``, an int, or a
            list of them (``{"head@9, head 9": "END", "head@7, head 3": ["S2", "END"]}``).
        metric: ``mp.logit_diff(...)`` or ``mp.answer_prob(...)`` (per-prompt answers matched
            to ``prompts`` in order), or a function ``fn(logits [rows, vocab]) -> [rows]``
            (optionally ``fn(logits, prompt_index)``).
        positions: Positions by name that ``circuit`` refers to, as :func:`mechprobe.patch`
            takes them: an int for every prompt or one int per prompt (``{"S2": [10, 10, 12],
            "END": -1}``), for templates that put a word at different offsets.
        reference: The prompts means are taken over (Wang et al.'s "ABC" prompts of the same
            templates); None: ``prompts`` themselves. Read by ``method="mean"`` only.
        components: What is ablated outside the circuit: ``"heads"`` (every attention head of
            every layer, as ``Site("head", layer, head=h)``), or sites as ``circuit`` takes them
            (a site kind such as ``"mlp_out"`` is every layer's), without positions. Every
            circuit site must be one of them.
        method: ``"mean"`` (the site set to its mean over ``reference``) or ``"zero"``.
        per_position: Take the mean at each position over the reference prompts of the prompt's
            group (Wang et al.'s choice); False: one mean per site over every real token of every
            reference prompt, BOS left out.
        groups: ``(prompt_groups, reference_groups)``: a hashable label per prompt and per
            reference prompt (a template's name), so that each prompt takes the means of the
            reference prompts labelled alike; None groups every prompt by its token length
            (prompts of one template tokenise equally long). Prompts in a group must have its
            reference prompts' token length.
        leave_one_out: Also run the circuit less each of its sites (that site ablated
            everywhere): one more run per site and group, in
            :attr:`FaithfulnessResult.without`. A circuit can keep more without a site than
            with it: a head kept while the heads it reads are ablated computes on their means
            (Wang et al.'s minimality check asks the converse, how much each site adds).
        batch_size: Prompts per forward pass (None: each group in one pass).
        progress: Show a progress bar.

    Returns:
        A :class:`FaithfulnessResult`.

    Raises:
        ValueError: Before any forward pass: a circuit site that is not a component (or is named
            twice), a component with positions, a circuit position outside a prompt, a prompt
            group without reference prompts or mixing token lengths, groups of the wrong size,
            an unknown method; a metric that is not finite on the full model.
        TypeError: ``per_position`` not True or False, prompts that are not strings.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> prompts = ["Hi cat", "Hi dog", "Hi cow"]
        >>> circuit = [mp.Site("head", 2, head=1), mp.Site("head", 1, head=0, positions=-1)]
        >>> res = mp.faithfulness(model, prompts, circuit, mp.logit_diff(5, 6), progress=False)
        >>> res.full.shape, res.n_components, res.circuit_positions
        ((3,), 12, ('all', '-1'))
        >>> bool(res.normalised["full"] == 1.0 and res.normalised["empty"] == 0.0)
        True
    """
    method = check_choice(method, "method", ("mean", "zero"))
    per_position = check_bool(per_position, "per_position")
    leave_one_out = check_bool(leave_one_out, "leave_one_out")
    batch_size = check_batch_size(batch_size)
    check_bool(progress, "progress")  # progress="no" refused before any work
    texts, lengths = _texts(model, prompts, "prompts")
    universe = _components(model, components)
    kept = _circuit(model, circuit, universe)
    named = _named(positions, kept, lengths)
    fn, metric_name = bind_metric(model, metric, len(texts))  # answers checked before any pass
    means_needed = method == "mean"
    if not means_needed and (reference is not None or groups is not None):
        warn(
            "method='zero' reads no reference prompts and no groups: they are ignored. Drop "
            "them, or pass method='mean'."
        )
    elif means_needed and not per_position and groups is not None:
        warn(
            "groups= is read by per-position means only: with per_position=False every site "
            "has one mean over all reference prompts. Drop groups=, or pass per_position=True."
        )
    refs, ref_lengths = (
        (texts, lengths) if reference is None else _texts(model, reference, "reference")
    )
    per_group = means_needed and per_position
    if per_group:
        labels, ref_labels = _group_labels(groups, lengths, ref_lengths, len(texts), len(refs))
        _check_groups(texts, refs, labels, ref_labels, lengths, ref_lengths, groups is not None)
        if groups is None:
            _warn_pooled_templates(model, texts, refs, labels, ref_labels)
    else:  # runs still go length by length: no padding, and a position is one index per run
        labels, ref_labels = list(lengths), list(ref_lengths)
    order = list(dict.fromkeys(labels))
    members = {g: [i for i, label in enumerate(labels) if label == g] for g in order}
    # Prompts run together where they share a group (its means) and the indices their circuit
    # is kept at (named positions may differ from prompt to prompt within a template).
    kept_of = [_kept_positions(kept, lengths[i], named[i], i) for i in range(len(texts))]
    units: dict[tuple[Hashable, str], list[int]] = {}
    for g in order:
        for i in members[g]:
            units.setdefault((g, repr(sorted(kept_of[i].items(), key=str))), []).append(i)

    sites = list(universe)
    means: dict[Hashable, dict[Site, Tensor]] = {}
    if per_group:
        ref_members = {g: [j for j, label in enumerate(ref_labels) if label == g] for g in order}
        chunks = [(g, part) for g in order for part in _split(ref_members[g], batch_size)]
        totals: dict[Hashable, dict[Site, Tensor]] = {g: {} for g in order}
        for g, part in progress_bar(chunks, progress=progress, desc="faithfulness means"):
            out = run(
                model, [refs[j] for j in part], capture=sites, batch_size=None, progress=False
            )
            for site in sites:
                # [rows, seq, d] summed over rows: every reference prompt of a group is as long
                # as the others, so there is no padding to leave out.
                part_sum = out[site].double().sum(0)
                have = totals[g].get(site)
                totals[g][site] = part_sum if have is None else have + part_sum
        means = {
            g: {s: (t / len(ref_members[g])).float() for s, t in totals[g].items()} for g in order
        }
    elif means_needed:
        pooled = _pooled_means(model, refs, sites, batch_size, progress)
        means = {g: pooled for g in order}

    values = {c: np.zeros(len(texts)) for c in CONDITIONS}
    kept_sites = list(kept)
    without = np.zeros((len(kept_sites), len(texts))) if leave_one_out else None
    # A condition, or the index of the circuit site a leave-one-out run ablates everywhere.
    runs: list[str | int] = [*CONDITIONS, *(range(len(kept_sites)) if leave_one_out else ())]
    steps = [(unit, c) for unit in units for c in runs]
    for unit, condition in progress_bar(steps, progress=progress, desc="faithfulness"):
        rows = units[unit]
        n_tokens = lengths[rows[0]]
        if isinstance(condition, int):  # the circuit less one site
            left = kept_sites[condition]
            kept_here = {s: at for s, at in kept_of[rows[0]].items() if s != left}
            spec = _spec("circuit", sites, kept_here, n_tokens, means.get(unit[0]))
        else:
            spec = _spec(condition, sites, kept_of[rows[0]], n_tokens, means.get(unit[0]))
        out = run(
            model,
            [texts[i] for i in rows],
            spec or None,
            logit_positions=-1,
            batch_size=batch_size,
            progress=False,
        )
        index = torch.as_tensor(rows, dtype=torch.long)
        scored = fn(out.logits[:, -1], index).detach().double().cpu().numpy()
        if condition == "full":
            check_unpatched(scored, "full")
        if isinstance(condition, int):
            assert without is not None
            without[condition, rows] = scored
        else:
            values[condition][rows] = scored

    result = FaithfulnessResult(
        full=values["full"],
        circuit=values["circuit"],
        empty=values["empty"],
        knockout=values["knockout"],
        metric=metric_name,
        method=method,
        per_position=per_position,
        circuit_sites=tuple(str(site) for site in kept),
        circuit_positions=tuple(_where_text(where) for where in kept.values()),
        n_components=len(sites),
        prompts=tuple(texts),
        components=tuple(str(site) for site in sites),
        reference_prompts=tuple(refs) if means_needed else (),
        groups=tuple(f"{label} tokens" if groups is None else str(label) for label in labels)
        if per_group
        else (),
        named_positions={
            name: tuple(at[name] for at in named) for name in (named[0] if named else {})
        },
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        without=without,
    )
    means_of = result.means
    if _degenerate(means_of["full"], means_of["empty"]):
        warn(
            f"The metric is the same with every component ablated as on the full model "
            f"({format_number(means_of['full'])}): faithfulness, a share of that difference, is "
            "NaN. Ablate components the behaviour depends on, or use a metric that changes."
        )
    return result


def _texts(model: Any, prompts: Any, name: str) -> tuple[list[str], list[int]]:
    """Prompt strings, checked as every analysis checks them, and each one's token count (BOS
    included where the model prepends one)."""
    if isinstance(prompts, Batch):
        raise TypeError(
            f"faithfulness takes {name} as strings, not a Batch: groups are found by "
            "tokenising each prompt (pass batch.prompts)."
        )
    batch = tokenize(model, prompts)
    return list(batch.prompts), [int(n) for n in batch.lengths.tolist()]


def _components(model: Any, components: Any) -> list[Site]:
    """The ablated universe as Sites without positions."""
    if isinstance(components, str) and components == "heads":
        adapter = model_adapter(model)
        return [
            Site("head", layer, head=head)
            for layer in range(adapter.n_layers)
            for head in range(adapter.n_heads)
        ]
    sites = expand_sites(model, components, kinds=_KINDS, what="components")
    placed = [str(site) for site in sites if site.positions is not None]
    if placed:
        raise ValueError(
            f"components {placed} carry positions: components are ablated at every position. "
            "Drop their positions (a circuit site's positions say where it is kept)."
        )
    return sites


def _circuit(model: Any, circuit: Any, universe: list[Site]) -> dict[Site, list[int | str] | None]:
    """``{site without positions: where it is kept (ints, names of positions; None: every
    position)}``, in order."""
    given: list[tuple[Site, list[int | str] | None]] = []
    if isinstance(circuit, Mapping):
        for key, spec in circuit.items():
            for site in expand_sites(model, key, kinds=_KINDS, what="circuit"):
                if site.positions is not None:
                    raise ValueError(
                        f"circuit site {site} carries positions and is mapped to {spec!r}: "
                        "say where it is kept once, in the mapping."
                    )
                given.append((site, _kept_spec(spec, site)))
    else:
        for site in expand_sites(model, circuit, kinds=_KINDS, what="circuit"):
            at: list[int | str] | None = None
            if site.positions is not None:
                bare = Site(site.kind, site.layer, head=site.head)
                checked = check_positions(site.positions, name=f"positions of circuit site {bare}")
                if checked != "all":
                    at = [checked] if isinstance(checked, int) else list(checked)
            given.append((site, at))
    kept: dict[Site, list[int | str] | None] = {}
    for site, where in given:
        bare = Site(site.kind, site.layer, head=site.head)
        if bare in kept:
            raise ValueError(
                f"circuit names {bare} twice: name each site once, with all the positions it "
                f"is kept at (Site({bare.kind!r}, {bare.layer}"
                + (f", head={bare.head}" if bare.head is not None else "")
                + ", positions=[-3, -1]), or {site: ['S2', 'END']} with positions=)."
            )
        kept[bare] = where
    known = set(universe)
    stray = [str(site) for site in kept if site not in known]
    if stray:
        raise ValueError(
            f"circuit sites {stray} are not among the {len(universe)} components ablated: every "
            "circuit site must be a component (it is what the circuit keeps of them). Add them "
            "to components= (e.g. components=[*mp.core.expand_sites(model, 'head'), "
            "*extra_sites]), or drop them from the circuit."
        )
    return kept


def _kept_spec(where: Any, site: Site) -> list[int | str] | None:
    """Where a mapped circuit site is kept: ``"all"`` (None), a name or an int, or a list."""
    if isinstance(where, str) and where == "all":
        return None
    items = list(where) if isinstance(where, (list, tuple)) else [where]
    out: list[int | str] = []
    for item in items:
        number = as_int(item)
        if isinstance(item, str) and item:
            out.append(item)
        elif number is not None:
            out.append(number)
        else:
            raise ValueError(
                f"circuit site {site} is kept at {where!r}: give a name of positions=, an int "
                "(negative from each prompt's last token), a list of them, or 'all'."
            )
    if not out or len(set(out)) < len(out):
        raise ValueError(
            f"circuit site {site} is kept at {where!r}: name at least one position, each once."
        )
    return out


def _named(
    positions: Any, kept: dict[Site, list[int | str] | None], lengths: list[int]
) -> list[dict[str, int]]:
    """Per prompt, each named position's index (checked inside every prompt); the names the
    circuit uses must be among them."""
    used = sorted({w for where in kept.values() for w in (where or ()) if isinstance(w, str)})
    if positions is None:
        if used:
            raise ValueError(
                f"circuit keeps sites at {used}, but no positions= names them: pass "
                "positions={name: an int, or one int per prompt}, e.g. positions={'S2': "
                "[10, 10, 12], 'END': -1}."
            )
        return [{} for _ in lengths]
    if not isinstance(positions, Mapping):
        raise ValueError(
            f"positions must map names to an int or one int per prompt, got {positions!r}: e.g. "
            "positions={'S2': [10, 10, 12], 'END': -1}."
        )
    names, resolved = position_pairs(positions, lengths, lengths, "prompt")
    unknown = [name for name in used if name not in names]
    if unknown:
        raise ValueError(
            f"circuit keeps sites at {unknown}, which positions= does not name (it names "
            f"{[str(n) for n in names]}): add them, or fix the circuit's names."
        )
    return [
        {str(name): at for name, (at, _) in zip(names, pairs, strict=True)} for pairs in resolved
    ]


def _where_text(where: list[int | str] | None) -> str:
    """Where a circuit site is kept, as text: ``"all"``, ``"-1"``, ``"S2,END"``."""
    if where is None:
        return "all"
    if all(isinstance(w, int) for w in where):
        return str(positions_text([int(w) for w in where]))
    return ",".join(str(w) for w in where)


def _group_labels(
    groups: Any, lengths: list[int], ref_lengths: list[int], n_prompts: int, n_refs: int
) -> tuple[list[Hashable], list[Hashable]]:
    """Each prompt's and reference prompt's group: ``groups``' labels, else its token length."""
    if groups is None:
        return list(lengths), list(ref_lengths)
    if (
        not isinstance(groups, (tuple, list))
        or len(groups) != 2
        or any(isinstance(g, (str, bytes)) or not hasattr(g, "__len__") for g in groups)
    ):
        raise TypeError(
            "groups must be a pair (prompt_groups, reference_groups): a label per prompt and "
            f"one per reference prompt, got {groups!r}."
        )
    out = []
    for labels, n, what in (
        (groups[0], n_prompts, "prompt"),
        (groups[1], n_refs, "reference prompt"),
    ):
        listed = list(labels)
        if len(listed) != n:
            raise ValueError(
                f"groups gives {len(listed)} {what} labels for {n} {what}s: pass one "
                f"label per {what}, in order."
            )
        for label in listed:
            try:
                hash(label)
            except TypeError:
                raise TypeError(
                    f"groups holds the {what} label {label!r}, which is not hashable: use "
                    "strings or ints (a template's name or number)."
                ) from None
        out.append(listed)
    return out[0], out[1]


def _check_groups(
    texts: list[str],
    refs: list[str],
    labels: list[Hashable],
    ref_labels: list[Hashable],
    lengths: list[int],
    ref_lengths: list[int],
    labelled: bool,
) -> None:
    """Refuse a prompt group without reference prompts, or one mixing token lengths; warn of a
    group whose prompts and reference prompts are one text (a prompt alone in its group and its
    own reference, say), whose means are its own activations, so that nothing is ablated in it."""
    alone = []
    for group in dict.fromkeys(labels):
        rows = [i for i, label in enumerate(labels) if label == group]
        ref_rows = [j for j, label in enumerate(ref_labels) if label == group]
        name = f"group {group!r}" if labelled else f"the group of {group}-token prompts"
        if not ref_rows:
            raise ValueError(
                f"Prompt {rows[0]} ({texts[rows[0]]!r}) is in {name}, which has no reference "
                "prompt: per-position means are taken over the reference prompts of a prompt's "
                "group. Pass reference prompts of the same templates, or groups=(prompt_groups, "
                "reference_groups) to say which reference prompts each prompt's means come "
                "from, or per_position=False for one mean over every reference prompt."
            )
        found = [(lengths[i], f"prompt {i} ({texts[i]!r})") for i in rows]
        found += [(ref_lengths[j], f"reference prompt {j} ({refs[j]!r})") for j in ref_rows]
        first = found[0]
        other = next((item for item in found if item[0] != first[0]), None)
        if other is not None:
            raise ValueError(
                f"In {name}, {first[1]} has {first[0]} tokens and {other[1]} {other[0]}: "
                "per-position means need every prompt of a group as long as its reference "
                "prompts. Pass groups= that put only prompts of one template together, or "
                "reference prompts of the same templates."
            )
        if len({texts[i] for i in rows} | {refs[j] for j in ref_rows}) == 1:
            # reference=prompts, or two copies of one prompt, is the same case (review 42b S3)
            alone.append(f"prompt {rows[0]} ({texts[rows[0]]!r}, {name})")
    if alone:
        # its circuit, empty and knockout runs equal the full model's: the faithfulness score
        # is unmoved, but ratio, spread and its per-prompt values are wrong (review 42a F3)
        shown = "; ".join(alone[:3]) + (f"; and {len(alone) - 3} more" if len(alone) > 3 else "")
        warn(
            f"{shown}: its group's reference prompts are this prompt itself, so its means are "
            "its own activations and ablating to them changes nothing (its ablated runs equal "
            "the full model's). Pass reference prompts (reference=...) of the same templates, "
            "more prompts of its length, groups= that pool it with others, or per_position=False "
            "(one mean over every prompt)."
        )


def _warn_pooled_templates(
    model: Any,
    texts: list[str],
    refs: list[str],
    labels: list[Hashable],
    ref_labels: list[Hashable],
) -> None:
    """Warn where a group of one token length looks like several templates, whose positions hold
    different words: fewer than half its positions hold one token across the group's prompts and
    reference prompts (one template's prompts differ at a few words only)."""
    for group in dict.fromkeys(labels):
        rows = [texts[i] for i, label in enumerate(labels) if label == group]
        rows += [refs[j] for j, label in enumerate(ref_labels) if label == group]
        ids = tokenize(model, rows).tokens  # one length: no padding
        shared = float((ids == ids[:1]).all(0).float().mean())
        if shared < 0.5:
            warn(
                f"The {group}-token prompts are one group of per-position means, but only "
                f"{shared:.0%} of their positions hold one token: they look like several "
                "templates, whose positions hold different words. Pass groups=(prompt_templates, "
                "reference_templates) to take means per template."
            )
            return


def _kept_positions(
    kept: dict[Site, list[int | str] | None], n_tokens: int, named: dict[str, int], row: int
) -> dict[Site, list[int] | None]:
    """Each circuit site's kept positions as indices ``0..n_tokens-1`` of prompt ``row``."""
    out: dict[Site, list[int] | None] = {}
    for site, where in kept.items():
        if where is None:
            out[site] = None
            continue
        asked = [named[w] if isinstance(w, str) else w for w in where]
        indices = [p + n_tokens if p < 0 else p for p in asked]
        outside = [w for w, i in zip(where, indices, strict=True) if not 0 <= i < n_tokens]
        if outside:
            raise ValueError(
                f"circuit site {site} is kept at positions {outside}, outside prompt {row} "
                f"({n_tokens} tokens; valid: 0..{n_tokens - 1}, or -1..-{n_tokens} from the "
                "last token): pass positions every prompt has."
            )
        out[site] = sorted(set(indices))
    return out


def _split(rows: list[int], size: int | None) -> list[list[int]]:
    """Consecutive slices of at most ``size`` rows (None: all in one)."""
    step = max(1, len(rows)) if size is None else size
    return [rows[i : i + step] for i in range(0, len(rows), step)]


def _pooled_means(
    model: Any, refs: list[str], sites: list[Site], batch_size: int | None, progress: bool
) -> dict[Site, Tensor]:
    """One mean per site ``[d]`` over every real token of every reference prompt, a leading BOS
    and padding left out (as ``Ablate("mean")`` and ``RunResult.mean`` take it)."""
    totals: dict[Site, Tensor] = {}
    count = 0
    parts = _split(list(range(len(refs))), batch_size)
    for part in progress_bar(parts, progress=progress, desc="faithfulness means"):
        out = run(model, [refs[j] for j in part], capture=sites, batch_size=None, progress=False)
        assert out.batch is not None
        real = out.batch.text_mask(out.bos_id).bool()
        count += int(real.sum())
        for site in sites:
            value = out[site].double()
            part_sum = value[real.to(value.device)].sum(0)
            totals[site] = totals[site] + part_sum if site in totals else part_sum
    if count == 0:
        raise ValueError(
            "The reference prompts hold no token of text (a leading BOS is left out of means): "
            "pass reference prompts with text."
        )
    return {site: (total / count).float() for site, total in totals.items()}


def _spec(
    condition: str,
    sites: list[Site],
    kept: dict[Site, list[int] | None],
    n_tokens: int,
    means: dict[Site, Tensor] | None,
) -> dict[SiteLike, Intervention]:
    """The ablations of one condition for prompts of ``n_tokens`` tokens: each component at the
    positions (None: every one) where the condition ablates it."""

    def ablate(site: Site, where: list[int] | None) -> Ablate:
        if means is None:
            return Ablate("zero", positions=where)
        mean = means[site]
        if mean.ndim == 2 and where is not None:  # per position: [seq, d], the rows ablated
            mean = mean[where]
        return Ablate(mean=mean, positions=where)

    spec: dict[SiteLike, Intervention] = {}
    for site in sites:
        if condition == "empty":
            where: list[int] | None = None
        elif condition == "circuit":
            if site not in kept:
                where = None
            elif kept[site] is None:
                continue  # kept everywhere
            else:
                kept_here = set(kept[site] or ())
                where = [i for i in range(n_tokens) if i not in kept_here]
                if not where:
                    continue  # kept at every position of these prompts
        elif condition == "knockout":
            if site not in kept:
                continue
            where = kept[site]
        else:  # full
            continue
        spec[site] = ablate(site, where)
    return spec
