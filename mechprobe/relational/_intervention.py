"""The o-vector intervention: write ``scale * o`` in place of (or onto) FFN outputs, measure the answer.

Merullo et al. test whether an o-vector applies its relation out of context: on a context of random
words that contains an argument, ``"table mug free China table mug free China table mug free"``,
the model predicts the argument again (``" China"``); replacing the FFN outputs of a range of
layers with o should make it predict the answer (``" Beijing"``) instead.
:func:`mechprobe.intervention_contexts` builds such contexts deterministically, and
:func:`ovector_intervention` runs the intact model and every vector (the o-vector and its controls)
on the same contexts, recording for each the answer's rank and the top token at the last position.

Metrics (:meth:`InterventionResult.summary`; ranks 0-based, reciprocal rank ``1 / (rank + 1)``):
``top1`` is the fraction of contexts whose top token is the answer's first token; ``no_effect_rate``
is the fraction whose top token is the same as in the intact run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from matplotlib.figure import Figure
from torch import Tensor
from tqdm.auto import tqdm

from mechprobe.core import (
    Add,
    Batch,
    InterventionSpec,
    Positions,
    Replace,
    Site,
    first_token_ids,
    resolve_site,
    run,
    tokenize,
)
from mechprobe.relational._ovector import OVector

__all__ = ["InterventionResult", "ovector_intervention"]

Mode = Literal["replace", "add"]


@dataclass(frozen=True, eq=False)
class InterventionResult:
    """Ranks and top tokens at the contexts' last token, intact and under each vector.

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
        positions: Positions edited (None: all).
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
    positions: Any = None

    def _index(self, name: str) -> int:
        if name not in self.conditions:
            raise KeyError(f"No condition {name!r}; conditions: {list(self.conditions)}.")
        return self.conditions.index(name)

    def summary(self, conditions: str | Sequence[str], group: str | None = None) -> dict[str, Any]:
        """Before/after metrics of one condition, or pooled over several (e.g. random seeds).

        Keys: ``layers, scale, mode, n, top1_before, top1_after, mean_rank_before,
        mean_rank_after, median_rank_before, median_rank_after, mrr_before, mrr_after,
        no_effect_rate, argument_top1_before, argument_top1_after`` (NaN where no context).

        Example:
            >>> res = InterventionResult(
            ...     contexts=("c",), targets=(" B",), target_ids=np.array([5]),
            ...     argument_ids=np.array([-1]), groups=("all",), conditions=("intact", "o"),
            ...     rank=np.array([[3], [0]]), argument_rank=np.array([[-1], [-1]]),
            ...     top=np.array([[7], [5]]), norms=(0.0, 1.0), layers=(1,), scale=1.0,
            ...     mode="replace")
            >>> res.summary("o")["top1_after"], res.summary("o")["no_effect_rate"]
            (1.0, 0.0)
        """
        names = [conditions] if isinstance(conditions, str) else list(conditions)
        cols = np.ones(len(self.contexts), dtype=bool)
        if group is not None:
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
            "argument_top1_before": stat(np.mean, arg0 == 0),
            "argument_top1_after": stat(np.mean, arg1 == 0),
        }

    def families(self) -> dict[str, list[str]]:
        """Conditions grouped by name, seeds pooled: ``{"random": ["random_0", ...], ...}``."""
        out: dict[str, list[str]] = {}
        for name in self.conditions:
            stem, _, tail = name.rpartition("_")
            out.setdefault(stem if stem and tail.isdigit() else name, []).append(name)
        return out

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: condition, context, group, target, rank, rr, top1, no_effect."""
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
                        "top1": self.rank[c] == 0,
                        "argument_rank": self.argument_rank[c],
                        "no_effect": self.top[c] == self.top[0],
                    }
                )
            )
        return pd.concat(rows, ignore_index=True)

    def plot(self, axes: Sequence[Any] | None = None) -> Figure:
        """Top-1 rate and mean reciprocal rank of the answer per condition (seeds pooled), one
        bar per context group (in-domain / held-out) when the contexts have groups."""
        fams = self.families()
        names = list(fams)
        groups: list[str | None] = [g for g in ("in_domain", "held_out") if g in self.groups]
        groups = groups or [None]
        if axes is None:
            fig = Figure(figsize=(8, 3.2), layout="constrained")
            axes = list(fig.subplots(1, 2))
        else:
            fig = axes[0].figure
        width = 0.8 / len(groups)
        x = np.arange(len(names))
        for ax, key, label in zip(
            axes, ("top1", "mrr"), ("answer top-1 rate", "answer MRR"), strict=True
        ):
            for j, group in enumerate(groups):
                values = [self.summary(fams[n], group=group)[f"{key}_after"] for n in names]
                shift = (j - (len(groups) - 1) / 2) * width
                ax.bar(x + shift, values, width, label=(group or "all").replace("_", "-"))
                for i, v in enumerate(values):
                    if np.isfinite(v):
                        ax.text(i + shift, v + 0.02, f"{v:.2f}", ha="center", fontsize=6)
            ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
            ax.set_ylim(0, 1)
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7)
        lay = f"{self.layers[0]}-{self.layers[-1]}" if len(self.layers) > 1 else str(self.layers[0])
        axes[0].set_title(
            f"{self.mode} FFN output, layers {lay}, scale {self.scale:g}, "
            f"{len(self.contexts)} contexts",
            fontsize=8,
            loc="left",
        )
        return fig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_dict`)."""
        return {
            "contexts": list(self.contexts),
            "targets": list(self.targets),
            "target_ids": self.target_ids.tolist(),
            "argument_ids": self.argument_ids.tolist(),
            "groups": list(self.groups),
            "conditions": list(self.conditions),
            "rank": self.rank.tolist(),
            "argument_rank": self.argument_rank.tolist(),
            "top": self.top.tolist(),
            "norms": list(self.norms),
            "layers": list(self.layers),
            "scale": self.scale,
            "mode": self.mode,
            "positions": self.positions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InterventionResult:
        """Rebuild a result from :meth:`to_dict`'s output."""
        n_ctx = len(data["contexts"])

        def ints(key: str, shape: tuple[int, ...]) -> np.ndarray:
            return np.asarray(data[key], dtype=np.int64).reshape(shape)

        n_cond = len(data["conditions"])
        return cls(
            contexts=tuple(data["contexts"]),
            targets=tuple(data["targets"]),
            target_ids=ints("target_ids", (n_ctx,)),
            argument_ids=ints("argument_ids", (n_ctx,)),
            groups=tuple(data["groups"]),
            conditions=tuple(data["conditions"]),
            rank=ints("rank", (n_cond, n_ctx)),
            argument_rank=ints("argument_rank", (n_cond, n_ctx)),
            top=ints("top", (n_cond, n_ctx)),
            norms=tuple(float(x) for x in data["norms"]),
            layers=tuple(int(x) for x in data["layers"]),
            scale=float(data["scale"]),
            mode=str(data["mode"]),
            positions=data.get("positions"),
        )


def _vector(value: OVector | Tensor | np.ndarray, name: str, width: int) -> Tensor:
    vec = value.vector if isinstance(value, OVector) else torch.as_tensor(value)
    if vec.ndim != 1 or vec.shape[0] != width:
        raise ValueError(
            f"Vector {name!r} has shape {tuple(vec.shape)}; the FFN outputs have width {width}: "
            f"pass a [{width}] vector (an OVector from extract_ovector)."
        )
    return vec.detach().float()


def _layers(model: Any, layers: Sequence[int]) -> tuple[int, ...]:
    resolved = []
    for layer in layers:
        _, site = resolve_site(model, Site("mlp_out", int(layer)))
        assert site is not None
        resolved.append(site.layer)
    if not resolved:
        raise ValueError("layers is empty: give the FFN layers to edit, e.g. range(18, 24).")
    return tuple(sorted(set(resolved)))


def _spec(
    vector: Tensor, layers: Sequence[int], scale: float, mode: Mode, positions: Positions
) -> InterventionSpec:
    """One edit per layer: ``mlp_out = scale * o`` (replace) or ``mlp_out + scale * o`` (add)."""
    if mode == "replace":
        return {
            Site("mlp_out", layer): Replace(scale * vector, positions=positions) for layer in layers
        }
    return {
        Site("mlp_out", layer): Add(vector, scale=scale, positions=positions) for layer in layers
    }


def _evaluate(
    model: Any,
    batch: Batch,
    target_ids: Tensor,
    argument_ids: Tensor,
    spec: InterventionSpec | None,
    batch_size: int | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of target and argument, and the top token, at each context's last token."""
    out = run(model, batch, spec, logit_positions=-1, batch_size=batch_size)
    logits = out.logits[:, 0].float()
    rank = (logits > logits.gather(-1, target_ids[:, None])).sum(-1)
    arg = (logits > logits.gather(-1, argument_ids.clamp(min=0)[:, None])).sum(-1)
    arg = torch.where(argument_ids < 0, torch.full_like(arg, -1), arg)
    return rank.numpy(), arg.numpy(), logits.argmax(-1).numpy()


def ovector_intervention(
    model: Any,
    vectors: Mapping[str, OVector | Tensor | np.ndarray],
    contexts: Sequence[str],
    targets: Sequence[str],
    *,
    layers: Sequence[int],
    scale: float = 1.0,
    mode: Mode = "replace",
    positions: Positions = None,
    arguments: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    batch_size: int | None = 32,
    progress: bool = False,
) -> InterventionResult:
    """Run the contexts intact and with each vector written into the FFN outputs of ``layers``.

    Args:
        model: A TransformerLens model.
        vectors: ``{name: vector}``, e.g. ``{"ovector": o, "random_0": r0, "other_task": o2}``;
            every vector runs on the same contexts, beside the intact model.
        contexts: Prompts whose next token is scored (see :func:`intervention_contexts`).
        targets: The answer each context should turn into (``" Beijing"``); its first token is
            scored.
        layers: FFN layers to edit (Merullo et al.: from the function-application layer on).
        scale: Multiplier of each vector.
        mode: ``"replace"`` writes ``scale * o`` in place of the FFN output (Merullo et al.);
            ``"add"`` adds it to the FFN output.
        positions: Positions to edit (None: every position, as in the paper; ``-1``: last token).
        arguments: Optional arguments of the contexts, to also report the argument's rank.
        groups: Optional label per context (e.g. ``"in_domain"`` / ``"held_out"``).
        batch_size: Rows per forward pass.
        progress: Show a progress bar over conditions.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> ctx = mp.intervention_contexts([" Poland"], seed=0)
        >>> res = mp.ovector_intervention(model, {"ovector": torch.randn(64)}, ctx, [" Warsaw"],
        ...                               layers=[1, 2])
        >>> res.conditions, res.rank.shape
        (('intact', 'ovector'), (2, 1))
    """
    if mode not in ("replace", "add"):
        raise ValueError(f"mode must be 'replace' or 'add', got {mode!r}.")
    contexts, targets = list(contexts), list(targets)
    if len(contexts) != len(targets) or not contexts:
        raise ValueError(
            f"Got {len(contexts)} contexts and {len(targets)} targets: pass one target per "
            "context, at least one."
        )
    for label, seq in [("arguments", arguments), ("groups", groups)]:
        if seq is not None and len(seq) != len(contexts):
            raise ValueError(f"{label} has {len(seq)} entries for {len(contexts)} contexts.")
    if "intact" in vectors:
        raise ValueError("'intact' is reserved for the unedited model; rename that vector.")
    width = int(model.cfg.d_model)
    vecs = {name: _vector(v, name, width) for name, v in vectors.items()}
    layer_tuple = _layers(model, layers)
    batch = tokenize(model, contexts)
    target_ids = torch.as_tensor(first_token_ids(model, targets))
    argument_ids = (
        torch.as_tensor(first_token_ids(model, arguments))
        if arguments is not None
        else torch.full((len(contexts),), -1)
    )
    names = ["intact", *vecs]
    results = []
    for name in tqdm(names, disable=not progress, desc="intervention"):
        spec = None
        if name != "intact":
            spec = _spec(vecs[name], layer_tuple, scale, mode, positions)
        results.append(_evaluate(model, batch, target_ids, argument_ids, spec, batch_size))
    return InterventionResult(
        contexts=tuple(contexts),
        targets=tuple(targets),
        target_ids=target_ids.numpy(),
        argument_ids=argument_ids.numpy(),
        groups=tuple(groups) if groups is not None else ("all",) * len(contexts),
        conditions=tuple(names),
        rank=np.stack([r[0] for r in results]),
        argument_rank=np.stack([r[1] for r in results]),
        top=np.stack([r[2] for r in results]),
        norms=(0.0, *(float(v.norm()) for v in vecs.values())),
        layers=layer_tuple,
        scale=float(scale),
        mode=mode,
        positions=positions if positions is None or isinstance(positions, int) else list(positions),
    )
