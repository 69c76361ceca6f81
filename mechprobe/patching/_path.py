"""Path patching: a sender's effect on a receiver through the direct path only, everything else
frozen (Wang et al. 2022, "Interpretability in the wild"; Goldowsky-Dill et al. 2023, "Localizing
model behavior with path patching"): :func:`path_patch` -> :class:`PathPatchResult`.

A *sender* is an attention head or a layer's MLP (or its whole attention layer); a *receiver* is
one head's query, key or value input, an MLP's input, or the final residual stream (the logits).
With the other components frozen at their values in the run being edited, the receiver's input
differs from that run only by the sender's change of output, ``delta = out_sender(source) -
out_sender(run)``, so path patching adds ``delta`` to the receiver's own copy of the residual
stream (before its layer norm: TransformerLens's split q/k/v inputs, or ``hook_mlp_in``) and lets
everything after the receiver recompute; for the final residual the logits are read out directly
from ``resid + delta``. This is the three-step procedure of Wang et al. (run, freeze and patch the
sender, patch the receiver) computed in one step, exactly; tests check it against that procedure
written out with hooks. Two differences from Wang et al.'s released code (``path_patching`` in
redwoodresearch/Easy-Transformer) change the numbers: it keeps the MLPs live by default
(its ``freeze_mlps=False``), so sender -> MLP -> receiver paths count there and only heads are
frozen, where here the MLPs are frozen too (Goldowsky-Dill et al.'s direct path) unless
``freeze_mlps=False`` is passed (then, per pair, a capture pass of the prompt and one pass of
``1 + senders`` rows as long as the positions passed on, split where memory requires, compute the
change each receiver's stream sees, the MLPs recomputing it with every attention layer frozen);
and it runs the clean prompt with the senders' corrupt values, ``direction="noising"`` here (the
default is denoising).

Many (sender, receiver) cells share a forward pass through the batched engine; the receivers'
split inputs are switched on around each pass and switched back (the model keeps no state). Every
cell has random controls: the same receiver input moved by ``||delta||`` in random directions
(control ``j`` of a pair drawn from ``(seed + j) % 2**32``, the pair's tokens and the sender at its
position, shared by its receivers: the same whatever other pairs and senders run beside it).

``method="attribution"`` (edge attribution patching, Syed et al. 2023) estimates every path to
first order instead, ``corrupt + sum_pos delta . d metric / d receiver input``: one forward and
backward pass of the runs being edited, per batch of pairs of one length, gives the gradient at
every receiver's input, and
the same changes (controls included) are dotted with it. Syed et al.'s EAP score takes the
gradient on the clean run: it is ``clean - values`` of ``direction="noising"``, not the default's
estimate.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechprobe.core import (
    Capture,
    Gradient,
    Intervention,
    Layers,
    PositionSpec,
    Result,
    Site,
    SiteLike,
    check_bool,
    check_heads_sum,
    check_int,
    control_seed,
    differentiate,
    evaluates,
    expand_sites,
    gradients_enabled,
    head_column,
    intervene,
    layer_column,
    literal,
    model_adapter,
    new_axes,
    progress_bar,
    progress_enabled,
    readout,
    spread,
    weighted_progress_bar,
)
from mechprobe.patching._activation import (
    NamedPositions,
    Prompts,
    SiteGroups,
    _check_common,
    named_groups,
    named_indices,
    position_pairs,
    token_pairs,
)
from mechprobe.patching._engine import (
    ADD,
    SET,
    Base,
    Cell,
    Edit,
    Layout,
    Plan,
    backward_rows,
    control_key,
    length_passes,
    pair_unit_vectors,
    run_plan,
)
from mechprobe.patching._metrics import (
    MetricFn,
    PatchMetric,
    bind_metric,
    check_unpatched,
    metric_title,
)
from mechprobe.patching._result import concat_pairs, normalised_recovery, pair_records

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["RECEIVER_KINDS", "SENDER_KINDS", "PathPatchResult", "path_patch"]

#: What ``path_patch`` takes as senders: writes into the residual stream (a head's ``z`` is
#: sent through its ``W_O``, as ``head_out`` is), and ``"embed"``, the embeddings' write (the
#: token's, and the position's where the model adds one): block 0's input, ``resid_pre@0``.
SENDER_KINDS: tuple[str, ...] = ("head", "head_out", "mlp_out", "attn_out", "embed")
#: The embeddings' write as a sender: block 0's input, read by every layer.
_EMBED = Site("resid_pre", 0)
#: Sender kinds that send one head's write, ``z @ W_O[head]`` (read at ``hook_z``).
_HEAD_WRITES = ("head", "head_out")
#: The site kinds ``path_patch`` takes as receivers (besides ``"final"``, the unembedding): the
#: inputs that read the residual stream.
RECEIVER_KINDS: tuple[str, ...] = ("q", "k", "v", "mlp_in")
Direction: TypeAlias = Literal["denoising", "noising"]
Method: TypeAlias = Literal["exact", "attribution"]


@dataclass(frozen=True, eq=False, repr=False)
class PathPatchResult(Result, format="mechprobe.PathPatchResult", version=1, html_figure=True):
    """Metric after patching each sender -> receiver path, averaged over prompt pairs, beside
    random controls.

    Attributes:
        values: ``[senders, receivers]`` metric with that one path patched, mean over pairs (NaN
            where the receiver is not after the sender: no direct path).
        per_pair: ``[pairs, senders, receivers]`` the same per pair.
        normalised: ``[senders, receivers]`` ``(values - corrupt) / (clean - corrupt)`` on pair
            means (NaN where undefined).
        clean, corrupt: ``[pairs]`` the unpatched runs' metric.
        random: ``[n_random, pairs, senders, receivers]`` the receiver's input moved by the same
            distance in a random direction.
        senders: Sender labels (``"head@3, head 1"``, ``"mlp_out@2"``), or a group's name
            (``senders={"S-inhibition": [...]}``: its senders' changes passed on together).
        sender_layers: Per sender, its layer (None for a group).
        sender_heads: Per sender, its head (None for MLPs, attention layers and groups).
        receivers: Receiver labels (``"q@5, head 2"``, ``"mlp_in@7"`` or ``"final"``), or a
            group's name (its receivers patched in one run).
        receiver_layers: Per receiver, its layer (``n_layers`` for the final residual, None for
            a group).
        receiver_heads: Per receiver, its head (None for ``mlp_in``, the final residual and
            groups).
        positions: The positions whose sender change was passed on (negative from the end;
            names where they were given by name).
        metric, direction, seed: As for :class:`mechprobe.PatchResult`; ``direction`` is
            ``"attribution"`` for first-order estimates of denoising (``method="attribution"``),
            ``"attribution-noising"`` of noising.
        freeze_mlps: Whether the MLPs were frozen with the heads (the direct path only), or
            live, passing on what they made of the sender's change (Wang et al.'s default).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        clean_prompts, corrupt_prompts, answer_ids, wrong_ids, answer_tokens, wrong_tokens:
            ``[pairs]`` the pairs and the metric's token ids and texts, as
            :class:`mechprobe.PatchResult` records them.
        sender_members, receiver_members: Per row, the senders (receivers) it holds, as labels:
            one for a single sender, a group's for a group (empty in files saved before).
        position_indices: Where positions were named: per pair, each position's ``(clean,
            corrupt)`` token index (empty otherwise).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.path_patch(mp.tiny_model(), "A cat", "A bat", "head", "final",
        ...                     mp.logit_diff(1, 2), progress=False)
        >>> res.values.shape, type(res.plot()).__name__
        ((12, 1), 'Figure')
    """

    values: np.ndarray
    per_pair: np.ndarray
    normalised: np.ndarray
    clean: np.ndarray
    corrupt: np.ndarray
    random: np.ndarray
    senders: tuple[str, ...]
    sender_layers: tuple[int | None, ...]
    sender_heads: tuple[int | None, ...]
    receivers: tuple[str, ...]
    receiver_layers: tuple[int | None, ...]
    receiver_heads: tuple[int | None, ...]
    positions: tuple[int | str, ...]
    metric: str
    direction: str
    seed: int = 0
    freeze_mlps: bool = True
    model_name: str = ""
    model_dtype: str = ""
    clean_prompts: tuple[str, ...] = ()
    corrupt_prompts: tuple[str, ...] = ()
    answer_ids: tuple[int, ...] = ()
    wrong_ids: tuple[int, ...] = ()
    answer_tokens: tuple[str, ...] = ()
    wrong_tokens: tuple[str, ...] = ()
    sender_members: tuple[tuple[str, ...], ...] = ()
    receiver_members: tuple[tuple[str, ...], ...] = ()
    position_indices: tuple[tuple[tuple[int, int], ...], ...] = ()

    @classmethod
    def concat(cls, results: Sequence[PathPatchResult]) -> PathPatchResult:
        """Join results of one path-patching run on different prompt pairs into the result of
        one run over all of them, pairs in order (as :meth:`mechprobe.PatchResult.concat`).

        Args:
            results: Results of one path-patching run on different prompt pairs, in the order
                joined.

        Returns:
            One :class:`PathPatchResult` over every pair: ``per_pair`` is ``[total pairs, n_senders,
            n_receivers]``.

        Raises:
            TypeError: ``results`` is empty or holds other types.
            ValueError: The parts differ in senders, receivers, positions, metric, direction,
                seed or number of controls (a pair in two parts: a warning).

        Example:
            >>> import mechprobe as mp
            >>> model, metric = mp.tiny_model(), mp.logit_diff(1, 2)
            >>> parts = [mp.path_patch(model, c, k, "mlp_out", "final", metric, progress=False)
            ...          for c, k in [("A cat", "A bat"), ("A dog", "A fog")]]
            >>> mp.PathPatchResult.concat(parts).per_pair.shape
            (2, 3, 1)
        """
        return concat_pairs(cls, results)

    @property
    def method(self) -> str:
        """``"attribution"`` for edge attribution's estimate (``direction`` records it too),
        ``"exact"`` where every path was patched."""
        return "attribution" if self.direction.startswith("attribution") else "exact"

    @property
    def clean_metric(self) -> float:
        """The clean run's metric, mean over pairs."""
        return float(np.mean(self.clean))

    @property
    def corrupt_metric(self) -> float:
        """The corrupt run's metric, mean over pairs."""
        return float(np.mean(self.corrupt))

    @property
    def effect(self) -> np.ndarray:
        """``[senders, receivers]`` change of the metric from the run that was edited."""
        return self.values - self._reference()

    @property
    def random_effect(self) -> np.ndarray:
        """``[senders, receivers]`` the same change under the random controls (NaN without)."""
        if self.random.shape[0] == 0:
            return np.full_like(self.values, np.nan)
        return self.random.mean(axis=(0, 1)) - self._reference()

    def _reference(self) -> float:
        """The metric of the run that was edited: corrupt (denoising, its attribution
        estimate), else clean."""
        edited_corrupt = self.direction in ("denoising", "attribution")
        return self.corrupt_metric if edited_corrupt else self.clean_metric

    def to_frame(self) -> pd.DataFrame:
        """One row per (sender, receiver): labels, layers, heads, value, normalised, effect,
        spread over pairs, random control effect, metric, direction.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.path_patch(mp.tiny_model(), "ab", "ac", "mlp_out", "final",
            ...                     mp.logit_diff(1, 2))
            >>> list(res.to_frame().columns)[:4]
            ['sender', 'sender_layer', 'sender_head', 'receiver']
        """
        n_s, n_r = self.values.shape
        return pd.DataFrame(
            {
                "sender": np.repeat(self.senders, n_r),
                "sender_layer": layer_column([x for x in self.sender_layers for _ in range(n_r)]),
                "sender_head": head_column(
                    np.repeat(np.array(self.sender_heads, dtype=object), n_r)
                ),
                "receiver": np.tile(self.receivers, n_s),
                "receiver_layer": layer_column(list(self.receiver_layers) * n_s),
                "receiver_head": head_column(
                    np.tile(np.array(self.receiver_heads, dtype=object), n_s)
                ),
                "value": self.values.ravel(),
                "normalised": self.normalised.ravel(),
                "effect": self.effect.ravel(),
                "spread": spread(self.per_pair).ravel(),  # over pairs (NaN for one)
                "random_effect": self.random_effect.ravel(),
                "metric": self.metric,
                "direction": self.direction,
            }
        )

    def summary(self, top: int = 5, *, receiver: str | None = None) -> pd.DataFrame:
        """The ``top`` paths with the largest effects, beside their random controls.

        Args:
            top: How many paths.
            receiver: Only paths to this receiver: its label (``"q@5, head 2"``, ``"final"``), a
                kind (``"q"``, ``"mlp_in"``) or a kind and layer (``"q@5"``: every head's);
                None: every receiver.

        Returns:
            A frame of up to ``top`` paths by absolute effect: ``sender``, ``receiver``, ``value``,
            ``normalised``, ``effect``, ``spread`` and ``random_effect``.

        Raises:
            ValueError: ``receiver`` names no receiver of this result.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.path_patch(mp.tiny_model(), "ab", "ac", "head", ["final", "q"],
            ...                     mp.logit_diff(1, 2), method="attribution", progress=False)
            >>> len(res.summary(top=20)), set(res.summary(receiver="final")["receiver"])
            (20, {'final'})
        """
        check_int(top, "top", 0)
        frame = self.to_frame().dropna(subset=["value"])
        if receiver is not None:
            labels = frame["receiver"]
            kind_layer = labels.str.split(",").str[0]  # "q@2" of "q@2, head 1"
            mine = (labels == receiver) | (labels.str.split("@").str[0] == receiver)
            mine |= kind_layer == receiver
            if not mine.any():
                having = list(dict.fromkeys(labels))
                raise ValueError(
                    f"receiver {receiver!r} names no receiver with a path here: pass a label "
                    f"({', '.join(repr(r) for r in having[:4])}{', ...' if len(having) > 4 else ''}), "
                    "a kind ('q') or a kind and layer ('q@2')."
                )
            frame = frame[mine]
        largest = frame.reindex(frame["effect"].abs().sort_values(ascending=False).index)
        return largest.head(top)[
            ["sender", "receiver", "value", "normalised", "effect", "spread", "random_effect"]
        ].reset_index(drop=True)

    def _describe(self) -> str:
        n_pairs, n_s, n_r = self.per_pair.shape
        mlps = "" if self.freeze_mlps else ", MLPs live"
        return (
            f"{self.direction}{mlps}, {self.metric}: {n_s} sender(s) x {n_r} receiver(s), "
            f"{n_pairs} pair(s); clean {self.clean_metric:.3g}, corrupt {self.corrupt_metric:.3g}"
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Heatmap of the effects: senders x receivers, or, with one receiver, the senders as a
        layer x head grid (MLPs and attention layers in extra columns).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given), with its colour bar.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.path_patch(mp.tiny_model(), "ab", "ac", "head", "final",
            ...                     mp.logit_diff(1, 2))
            >>> len(res.plot().axes)
            2
        """
        data = self.effect
        if len(self.receivers) == 1 and None not in self.sender_layers:
            layers = sorted({int(layer) for layer in self.sender_layers if layer is not None})
            columns = sorted({h for h in self.sender_heads if h is not None})
            extra = sorted(
                {
                    s.split("@")[0]
                    for s, h in zip(self.senders, self.sender_heads, strict=True)
                    if h is None
                }
            )
            xlabels = [str(h) for h in columns] + extra
            grid = np.full((len(layers), len(xlabels)), np.nan)
            for value, label, layer, head in zip(
                data[:, 0], self.senders, self.sender_layers, self.sender_heads, strict=True
            ):
                col = (
                    columns.index(head)
                    if head is not None
                    else len(columns) + extra.index(label.split("@")[0])
                )
                if layer is not None:  # always: groups are drawn as a plain heatmap
                    grid[layers.index(layer), col] = value
            data, ylabels = grid, [str(layer) for layer in layers]
            xname, yname = "sender head", "sender layer"
        else:
            xlabels = _compact(self.receivers, self.receiver_layers, self.receiver_heads)
            ylabels = _compact(self.senders, self.sender_layers, self.sender_heads)
            xname, yname = "receiver", "sender"
        # Capped: 72 x 72 heads made a 27 x 19.5 inch canvas; past 40 rows or columns only the
        # first of each layer is labelled, with a thin line between layers.
        size = (
            min(14.0, max(4.0, 0.35 * len(xlabels) + 2)),
            min(12.0, max(3.0, 0.25 * len(ylabels) + 1.5)),
        )
        fig, ax = new_axes(ax, size)
        finite = np.abs(data[np.isfinite(data)])
        lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        many = len(self.receivers) > 1
        for axis, labels, of_layer in (
            ("x", xlabels, self.receiver_layers if many else None),
            ("y", ylabels, self.sender_layers if many else None),
        ):
            ticks = list(range(len(labels)))
            if of_layer is not None and len(labels) > 40:
                ticks = [i for i in ticks if i == 0 or of_layer[i] != of_layer[i - 1]]
                for i in ticks[1:]:
                    line = ax.axvline if axis == "x" else ax.axhline
                    line(i - 0.5, color="grey", linewidth=0.4)
            setter = ax.set_xticks if axis == "x" else ax.set_yticks
            setter(ticks, labels=[literal(labels[i]) for i in ticks], fontsize="small")
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_xlabel(xname)
        ax.set_ylabel(yname)
        measured = metric_title(self.metric, self.answer_tokens, self.wrong_tokens)
        fig.colorbar(image, ax=ax, label=literal(f"change of {measured}"))
        kinds = " + ".join(dict.fromkeys(s.split("@")[0] for s in self.senders))
        target = (
            self.receivers[0]
            if len(self.receivers) == 1
            else " + ".join(dict.fromkeys(r.split("@")[0] for r in self.receivers))
        )
        how = self.direction if self.freeze_mlps else f"{self.direction}, MLPs live"
        ax.set_title(literal(f"path patching, {kinds} to {target} ({how})\n{measured}"))
        return fig


def _first_of_each(pairs: list[tuple[int, int]], wanted: list[int | str], pair: int) -> Tensor:
    """``[positions]`` 1 for the first entry naming each token of the base prompt, 0 for later
    ones; one base token read from two source tokens (prompts of other lengths) is an error."""
    first: dict[int, int] = {}
    keep = []
    for k, (ps, pb) in enumerate(pairs):
        if pb in first and pairs[first[pb]][0] != ps:
            raise ValueError(
                f"positions {wanted[first[pb]]} and {wanted[k]} both name token {pb} of pair "
                f"{pair}'s run, but tokens {pairs[first[pb]][0]} and {ps} of its other prompt: "
                "pass positions that name one token each in both prompts."
            )
        keep.append(pb not in first)
        first.setdefault(pb, k)
    return torch.as_tensor(keep, dtype=torch.float32)


def _senders(model: Any, senders: Any, layers: Layers) -> list[Site]:
    listed = isinstance(senders, Sequence) and not isinstance(senders, (str, bytes))
    items = [senders] if isinstance(senders, (str, Site)) else list(senders) if listed else []
    # "embed" (or its site, resid_pre@0) is one sender whatever the layers, the first write;
    # a Site keeps its positions, for _refuse_positions to name.
    embed = [item if isinstance(item, Site) else _EMBED for item in items if _is_embed(item)]
    rest = [item for item in items if not _is_embed(item)] if embed else senders
    found = list(dict.fromkeys(embed))
    if rest or not embed:  # expand_sites names an empty or malformed argument
        found += expand_sites(model, rest, layers=layers, kinds=SENDER_KINDS, what="senders")
    _refuse_positions(found, "senders")
    # A head_out sender keeps its kind (it was relabelled "head", so the frame's label did not
    # merge with patch(..., "head_out@L, head H")'s); both send the head's z @ W_O.
    return found


def _is_embed(item: Any) -> bool:
    """Whether a sender is the embeddings' write: ``"embed"``, ``resid_pre@0`` or its hook."""
    if isinstance(item, str):
        return item in ("embed", str(_EMBED), _EMBED.hook_name)
    return isinstance(item, Site) and item.kind == "resid_pre" and item.layer == 0


def _refuse_positions(sites: Sequence[Site | None], what: str) -> None:
    """A Site's own positions would be dropped: path_patch patches at its ``positions=``."""
    for site in sites:
        if site is not None and site.positions is not None:
            raise ValueError(
                f"{what}: {site} carries positions ({site.positions!r}): path_patch patches "
                "every path at the positions given by positions=; pass them there instead."
            )


def _receivers(
    model: Any, receivers: Any, layers: Layers, receiver_layers: Layers | None = None
) -> list[Site | None]:
    items = [receivers] if isinstance(receivers, (str, Site)) else list(receivers)
    out: list[Site | None] = []
    rest = [item for item in items if not (isinstance(item, str) and item == "final")]
    if len(rest) < len(items):
        out.append(None)
    if receiver_layers is not None and items and not rest:
        # It ran without complaint, even receiver_layers=[9] on a 3-layer model.
        raise ValueError(
            f"receiver_layers={receiver_layers!r} is given, but receivers is 'final' (the final "
            "residual stream, after every layer): drop receiver_layers; it chooses the layers "
            "of 'q', 'k', 'v' or 'mlp_in' receivers."
        )
    if rest:
        chosen = layers if receiver_layers is None else receiver_layers
        try:
            out += expand_sites(
                model,
                rest,
                layers=chosen,
                kinds=RECEIVER_KINDS,
                what="receivers",
                # layers= also chooses the senders' layers: only receiver_layers is the
                # receivers' own, and ignored where every receiver is a Site.
                layers_name=None if receiver_layers is None else "receiver_layers",
            )
        except ValueError as error:  # the generic message knows nothing of "final"
            if "receiver_layers" in str(error):  # not a place refused: "final" is no answer
                raise
            raise ValueError(
                f"{error} receivers also takes 'final': the final residual stream (each "
                "sender's direct effect on the logits)."
            ) from None
    _refuse_positions(out, "receivers")
    if not out:
        raise ValueError(
            "receivers is empty: pass 'final', 'q', 'k', 'v', 'mlp_in' or Sites of them."
        )
    return out


def _refuse_no_path(senders: list[Site], receivers: list[Site | None], parallel: bool) -> None:
    """Refuse a call in which no receiver reads what any sender writes: every value would be NaN
    (senders and receivers swapped, most likely). Some NaN paths in a sweep are expected."""
    if any(_has_path(s, r, parallel) for s in senders for r in receivers):
        return
    raise ValueError(
        f"No path: every receiver ({', '.join(str(r) for r in receivers)}) reads the residual "
        f"stream before every sender ({', '.join(str(s) for s in senders)}) writes it, so every "
        "value would be NaN. A receiver must be at a later layer than its sender (an MLP's "
        "input also reads its own layer's attention), or 'final'; are senders and receivers "
        "swapped?"
    )


def _sender_hook(site: Site) -> str:
    return f"blocks.{site.layer}.attn.hook_z" if site.kind in _HEAD_WRITES else site.hook_name


def _writes(
    model: Any, ids: Tensor, sites: list[Site], final: str
) -> tuple[dict[Site, Tensor], Tensor]:
    """Each sender's write to the residual stream ``[seq, d_model]`` in one run, and the run's
    final residual stream."""
    caps: dict[str, Capture] = {}
    for site in sites:
        caps.setdefault(_sender_hook(site), Capture())
        if site.kind in _HEAD_WRITES:  # to check that the heads' writes add up to attn_out
            caps.setdefault(f"blocks.{site.layer}.hook_attn_out", Capture())
    caps.setdefault(final, Capture())
    spec: dict[SiteLike, Intervention] = {name: cap for name, cap in caps.items()}
    with torch.no_grad(), intervene(model, spec):
        model(ids[None].to(model.W_E.device))
    out = {}
    for layer in sorted({site.layer for site in sites if site.kind in _HEAD_WRITES}):
        z, attn_out = (
            caps[f"blocks.{layer}.attn.hook_z"].value,
            caps[f"blocks.{layer}.hook_attn_out"].value,
        )
        assert z is not None and attn_out is not None
        # The one check, with the tolerance the model's dtype needs (a fixed 1e-3 before).
        check_heads_sum(
            model.blocks[layer].attn, z, attn_out, f"head senders at layer {layer}",
            dtype=model_adapter(model).dtype, fix="use senders='attn_out' or 'mlp_out'",
        )  # fmt: skip
    for site in sites:
        value = caps[_sender_hook(site)].value
        assert value is not None
        if site.kind in _HEAD_WRITES:
            assert site.head is not None
            w_o = model.blocks[site.layer].attn.W_O[site.head].detach()
            out[site] = value[0, :, site.head] @ w_o.to(value.dtype)
        else:
            out[site] = value[0]
    last = caps[final].value
    assert last is not None
    return out, last[0]


@contextlib.contextmanager
def split_qkv(model: Any) -> Iterator[dict[SiteLike, list[Intervention]]]:
    """Give every attention head its own copy of the residual stream for its q, k and v inputs
    (TransformerLens's ``use_split_qkv_input``: hooks ``blocks.L.hook_{q,k,v}_input``,
    ``[batch, pos, heads, d_model]`` before the layer norm; a ``HookedTransformer`` has these
    names only, a bridge has them as aliases of ``blocks.L.attn.hook_{q,k,v}_input``), and
    restore the model's flags after.

    Raises:
        ValueError: The model has no such switch.
    """
    if not hasattr(model, "set_use_split_qkv_input"):
        raise ValueError(
            "Path patching to q/k/v receivers needs a model with split q/k/v inputs "
            "(TransformerLens's set_use_split_qkv_input); use receivers='final' on this model."
        )
    split = bool(getattr(model.cfg, "use_split_qkv_input", False))
    attn_in = bool(getattr(model.cfg, "use_attn_in", False))
    try:
        if attn_in:
            model.set_use_attn_in(False)
        if not split:
            try:
                model.set_use_split_qkv_input(True)
            except NotImplementedError as err:  # GPT-J's and OPT's bridges (TransformerLens 4.3)
                raise ValueError(
                    "Path patching to q/k/v receivers needs each head's own q/k/v input, which "
                    f"this model's attention does not offer ({err}). Use receivers 'final' or "
                    "'mlp_in', or a HookedTransformer (kind='hooked', TransformerLens 3.x)."
                ) from err
        yield {}
    finally:
        model.set_use_split_qkv_input(split)
        if attn_in:
            model.set_use_attn_in(True)


@evaluates
def path_patch(
    model: Any,
    clean: Prompts,
    corrupt: Prompts,
    senders: str | SiteLike | Sequence[SiteLike] | SiteGroups,
    receivers: str | SiteLike | Sequence[SiteLike] | SiteGroups,
    metric: PatchMetric | MetricFn,
    *,
    positions: PositionSpec | NamedPositions = "all",
    layers: Layers = "all",
    receiver_layers: Layers | None = None,
    direction: Direction = "denoising",
    method: Method = "exact",
    freeze_mlps: bool = True,
    n_random: int = 3,
    seed: int = 0,
    cells_per_batch: int = 256,
    memory_budget: int = 1 << 30,
    packed: bool | None = None,
    progress: bool = True,
) -> PathPatchResult:
    """Patch every sender -> receiver path through the direct path only (or through the MLPs
    too, ``freeze_mlps=False``), many per forward pass, or estimate every path at once from
    gradients (``method="attribution"``: edge attribution patching, Syed et al. 2023).

    Args:
        model: A TransformerLens model (q/k/v receivers need TransformerLens's split q/k/v inputs,
            which ``TransformerBridge`` and ``HookedTransformer`` have).
        clean: Clean prompt(s), as for :func:`mechprobe.patch`.
        corrupt: Corrupt prompt(s), one per clean prompt.
        senders: ``"head"`` (every head), ``"mlp_out"`` (every MLP), ``"attn_out"`` (every
            attention layer), Sites of those kinds (``head_out`` means the same as ``head``),
            ``"embed"`` (the embeddings' write, block 0's input ``resid_pre@0``, labelled so:
            a changed token's direct path to the receivers, which every layer reads), or a
            list.
        receivers: ``"final"`` (the final residual stream: the sender's direct effect on the
            logits), ``"q"``, ``"k"``, ``"v"`` (every head's input of that kind; key/value heads
            for k and v), ``"mlp_in"`` (every MLP's input, which the MLP alone reads: heads of
            its own layer reach it, its own output does not; in a parallel block, as in
            GPT-NeoX, neither does), Sites of those kinds, or a list.
        metric: As for :func:`mechprobe.patch`.
        positions: Positions whose sender change reaches the receiver: ``"all"`` (the default;
            clean and corrupt prompts of one length), ints (negative from each prompt's end),
            or positions by name as for :func:`mechprobe.patch` (``{"S2": [10, 12], "END":
            -1}``: one int per pair where templates differ).
            The final residual is read at the last position only.
        layers: The layers a kind in ``senders`` covers, and in ``receivers`` unless
            ``receiver_layers`` is given.
        receiver_layers: The layers a kind in ``receivers`` covers (None: ``layers``), so that
            ``senders="head", layers=[0, 1], receivers="q", receiver_layers=[2]`` sends from the
            first two layers' heads to the third's queries.
        direction: ``"denoising"`` (run corrupt, pass on the clean sender's change) or
            ``"noising"`` (run clean, pass on the corrupt sender's change: Wang et al.'s
            direction, and the one whose attribution estimate gives Syed et al.'s EAP score).
        method: ``"exact"`` (patch each path), or ``"attribution"``: the first-order estimate
            of denoising, ``corrupt + sum_pos delta . d metric / d receiver input`` with the
            gradient at each receiver's own input on the corrupt run (the q/k/v inputs split per
            head, the MLPs' inputs, the final residual), every path of a pair from one forward
            and backward pass (with ``direction="noising"``, on the clean run, ``clean + sum_pos
            delta . gradient``). Like :func:`attribution_patch`, it is poor where the metric is
            far from linear between the runs: compare it with exact paths on a few cells.
            ``cells_per_batch``, ``memory_budget`` and ``packed`` apply to ``"exact"`` only.
        freeze_mlps: Freeze the MLPs with the heads (the default: the direct path only,
            Goldowsky-Dill et al.), or, with False, keep them live as Wang et al.'s released
            code does by default: only the attention layers are frozen, so the receiver's input
            also carries what the MLPs between sender and receiver make of the sender's change
            (sender -> MLP -> receiver paths count). This costs, per pair, a capture pass of
            the prompt and one pass of ``1 + senders`` rows as long as the positions passed on
            (nothing mixes positions once attention is frozen, so only those run; split where
            memory requires): little at the last position, about a forward of the prompt per
            sender with every position passed on. The change is a difference of two residual
            streams, so in half precision it is rounded at the stream's scale (as in Wang et
            al.'s own second step). ``method="exact"`` only.
        n_random: Random controls per path: the receiver's input moved by the sender's change's
            norm (with live MLPs, the norm of the change reaching it) in random directions
            (control ``j`` of a pair drawn from ``(seed + j) % 2**32``, the pair's tokens and the
            sender at its position, so the same whatever other pairs and senders run beside it).
        seed: Seed of the random directions.
        cells_per_batch: Paths per forward pass, at most (``method="attribution"``: prompt pairs
            per forward and backward pass, pairs whose edited prompts have one length).
        memory_budget: As for :func:`mechprobe.patch` (``method="attribution"``: one forward
            and backward pass, which keeps every layer's activations of its pairs).
        packed: As for :func:`mechprobe.patch`.
        progress: Show a progress bar.

    Returns:
        A :class:`PathPatchResult` (``direction="attribution"`` for estimates); paths whose
        receiver is not after the sender are NaN.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.path_patch(model, "A cat", "A bat", "head", "final", mp.logit_diff(1, 2))
        >>> res.values.shape
        (12, 1)
    """
    if direction not in get_args(Direction):
        raise ValueError(f"direction must be 'denoising' or 'noising', got {direction!r}.")
    if method not in get_args(Method):
        raise ValueError(f"method must be 'exact' or 'attribution', got {method!r}.")
    freeze_mlps = check_bool(freeze_mlps, "freeze_mlps")
    if method == "attribution" and not freeze_mlps:
        raise ValueError(
            "freeze_mlps=False applies to method='exact': edge attribution patching estimates "
            "direct paths, an MLP being a node of its graph (sender -> MLP and MLP -> receiver "
            "are edges of their own). Drop freeze_mlps=False, or use method='exact'."
        )
    cells_per_batch, memory_budget, seed = _check_common(
        cells_per_batch, memory_budget, n_random, seed
    )
    progress_enabled(progress)  # "yes" or 1 is refused here, as everywhere, not read as truthy
    clean_ids, corrupt_ids = token_pairs(model, clean, corrupt)
    n_pairs = len(clean_ids)
    src, base = (clean_ids, corrupt_ids) if direction == "denoising" else (corrupt_ids, clean_ids)
    sender_names, sender_list, sender_rows = _grouped(
        senders, lambda items: _senders(model, items, layers), "senders"
    )
    receiver_names, receiver_list, receiver_rows = _grouped(
        receivers, lambda items: _receivers(model, items, layers, receiver_layers), "receivers"
    )
    _refuse_final_in_group(receiver_list, receiver_rows)
    if not freeze_mlps and any(len(row) > 1 for row in sender_rows):
        raise ValueError(
            "freeze_mlps=False takes single senders: the MLPs' response to a group's changes is "
            "not the sum of their responses to each, and the live pass runs one sender at a "
            "time. Pass the senders one by one, or keep the MLPs frozen."
        )
    _refuse_no_path(sender_list, receiver_list, model_adapter(model).parallel_blocks)
    wanted, resolved = position_pairs(
        positions, [len(t) for t in src], [len(t) for t in base], swap=direction == "noising"
    )
    metric_fn, metric_name = bind_metric(model, metric, n_pairs)
    with _split_for(model, receiver_list):  # a model that cannot split q/k/v says so first
        pass
    final = f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"
    deltas: list[dict[Site, Tensor]] = []  # per pair: sender -> [positions, d_model]
    firsts: list[list[bool]] = []  # per pair: whether each position is its token's first
    finals: list[Tensor] = []
    src_final: list[Tensor] = []
    for i in range(n_pairs):
        w_src, f_src = _writes(model, src[i], sender_list, final)
        w_base, f_base = _writes(model, base[i], sender_list, final)
        ps = torch.as_tensor([a for a, _ in resolved[i]])
        pb = torch.as_tensor([b for _, b in resolved[i]])
        # Two requested positions on one token (6 and -1 of a 7-token prompt) pass its change on
        # once: the later entries carry none.
        once = _first_of_each(resolved[i], wanted, i)
        firsts.append(once.bool().tolist())
        deltas.append(
            {s: ((w_src[s][ps] - w_base[s][pb]).cpu() * once[:, None]).float() for s in sender_list}
        )
        finals.append(f_base[-1])
        src_final.append(f_src[-1])
    group = torch.arange(n_pairs)
    src_m = metric_fn(readout(model, torch.stack(src_final)), group).double().cpu().numpy()
    base_m = metric_fn(readout(model, torch.stack(finals)), group).double().cpu().numpy()
    # Checked here for every method and receiver: only the engine's passes (q/k/v, mlp_in)
    # checked it, so "final" and method="attribution" gave all-NaN results.
    check_unpatched(src_m, "source")
    check_unpatched(base_m, "base")
    clean_m, corrupt_m = (src_m, base_m) if direction == "denoising" else (base_m, src_m)

    n_s, n_r = len(sender_list), len(receiver_list)
    # Filled per (sender, receiver) row: a group's row adds its senders' changes, and patches
    # all its receivers at once.
    per_pair = np.full((n_pairs, len(sender_rows), len(receiver_rows)), np.nan)
    random = np.full((n_random, *per_pair.shape), np.nan)
    n_pos = len(wanted)
    widths = [int(model.cfg.d_model)] * (n_pairs * n_s * n_pos)
    pair_tokens = list(zip(clean_ids, corrupt_ids, strict=True))
    pair_of_cell = [i for i in range(n_pairs) for _ in range(n_s * n_pos)]
    keys = [  # a sender at a base position: its control whatever else runs (review 42a S1)
        control_key(sender, resolved[i][k][1], resolved[i][k][0])
        for i in range(n_pairs)
        for sender in sender_list
        for k in range(n_pos)
    ]
    units = [
        pair_unit_vectors(control_seed(seed, j), pair_tokens, pair_of_cell, widths, keys)
        for j in range(n_random)
    ]

    live: dict[tuple[int, str], Tensor] = {}  # with live MLPs: (sender, stream) -> change

    def change(j: int, i: int, s: int, r: int | None = None) -> Tensor:
        """``[positions, d_model]``: the sender's change (with live MLPs, the change reaching
        receiver ``r``'s stream), or its random control ``j``."""
        if freeze_mlps:
            delta = deltas[i][sender_list[s]]
        else:  # the change reaching the receiver's stream, MLPs included
            assert r is not None
            delta = live[s, streams[r]]
        if j < 0:
            return delta
        first = (i * n_s + s) * n_pos
        return torch.stack(units[j][first : first + n_pos]) * delta.norm(dim=-1, keepdim=True)

    streams = [_stream(r, final) for r in receiver_list]
    parallel = model_adapter(model).parallel_blocks
    rows = (sender_rows, receiver_rows)
    if method == "attribution":
        flat = np.full((n_pairs, n_s, n_r), np.nan)
        flat_random = np.full((n_random, *flat.shape), np.nan)
        _estimate_paths(
            model, base, resolved, sender_list, receiver_list, metric_fn, metric_name, final,
            change, base_m, flat, flat_random, progress,
            rows=lambda width: min(cells_per_batch, _backward_rows(model, width, memory_budget,
                                                                   receiver_list)),
        )  # fmt: skip
        # first order: a group's estimate adds its paths' changes of the metric
        per_pair[:] = _group_sums(flat, base_m[:, None, None], rows)
        random[:] = _group_sums(flat_random, base_m[None, :, None, None], rows)
    elif freeze_mlps:
        _exact_paths(
            model, list(range(n_pairs)), base, resolved, firsts, sender_list, receiver_list,
            finals, change, metric_fn, per_pair, random, final, parallel, rows, packed=packed,
            cells_per_batch=cells_per_batch, memory_budget=memory_budget, progress=progress,
        )  # fmt: skip
    else:
        for i in progress_bar(range(n_pairs), progress=progress, desc="path patch, MLPs live"):
            live.clear()
            live.update(
                _live_changes(
                    model,
                    base[i],
                    sender_list,
                    deltas[i],
                    resolved[i],
                    firsts[i],
                    sorted(set(streams)),
                    cells_per_batch,
                    memory_budget,
                )
            )
            _exact_paths(
                model, [i], base, resolved, firsts, sender_list, receiver_list, finals, change,
                metric_fn, per_pair, random, final, parallel, rows, packed=packed,
                cells_per_batch=cells_per_batch, memory_budget=memory_budget, progress=False,
            )  # fmt: skip
        live.clear()

    values_mean = per_pair.mean(axis=0)
    normalised = normalised_recovery(
        values_mean, clean_m, corrupt_m, metric_name, dtype=model_adapter(model).dtype
    )
    return PathPatchResult(
        values=values_mean,
        per_pair=per_pair,
        normalised=normalised,
        clean=clean_m,
        corrupt=corrupt_m,
        random=random,
        # a group's row is its name, at no one layer or head
        senders=tuple(
            str(sender_list[row[0]]) if name is None else name
            for name, row in zip(sender_names, sender_rows, strict=True)
        ),
        sender_layers=tuple(
            sender_list[row[0]].layer if name is None else None
            for name, row in zip(sender_names, sender_rows, strict=True)
        ),
        sender_heads=tuple(
            sender_list[row[0]].head if name is None else None
            for name, row in zip(sender_names, sender_rows, strict=True)
        ),
        receivers=tuple(
            _receiver_label(receiver_list[row[0]]) if name is None else name
            for name, row in zip(receiver_names, receiver_rows, strict=True)
        ),
        receiver_layers=tuple(
            _receiver_layer(model, receiver_list[row[0]]) if name is None else None
            for name, row in zip(receiver_names, receiver_rows, strict=True)
        ),
        receiver_heads=tuple(
            _receiver_head(receiver_list[row[0]]) if name is None else None
            for name, row in zip(receiver_names, receiver_rows, strict=True)
        ),
        sender_members=tuple(tuple(str(sender_list[k]) for k in row) for row in sender_rows),
        receiver_members=tuple(
            tuple(_receiver_label(receiver_list[k]) for k in row) for row in receiver_rows
        ),
        positions=tuple(wanted),
        metric=metric_name,
        direction=_label(method, direction),
        freeze_mlps=freeze_mlps,
        seed=seed,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        **pair_records(model, clean_ids, corrupt_ids, metric),
        **named_indices(wanted, resolved, direction == "noising"),
    )


def _exact_paths(
    model: Any,
    pairs: list[int],
    base: list[Tensor],
    resolved: list[list[tuple[int, int]]],
    firsts: list[list[bool]],
    senders: list[Site],
    receivers: list[Site | None],
    finals: list[Tensor],
    change: Callable[[int, int, int, int], Tensor],
    metric_fn: MetricFn,
    per_pair: np.ndarray,
    random: np.ndarray,
    final: str,
    parallel: bool,
    rows: tuple[list[list[int]], list[list[int]]],
    *,
    packed: bool | None,
    cells_per_batch: int,
    memory_budget: int,
    progress: bool,
) -> None:
    """Patch every path of ``pairs`` (and its random controls), filling ``per_pair`` and
    ``random`` per (sender row, receiver row) of ``rows``: to the final residual by reading out
    ``resid + change`` at the last position (no pass), to q/k/v and MLP inputs by adding the
    change there in the batched engine. A sender row adds its senders' changes (each where it
    has a path); a receiver row patches all its receivers in one run."""
    n_random = random.shape[0]
    sender_rows, receiver_rows = rows
    finals_at = [b for b, row in enumerate(receiver_rows) if receivers[row[0]] is None]
    if finals_at:  # the final residual: no pass, the readout of resid + delta
        b_row, r = finals_at[0], receiver_rows[finals_at[0]][0]
        stacked, keys = [], []
        for j in range(-1, n_random):
            for i in pairs:
                last = [k for k, (_, pb) in enumerate(resolved[i]) if pb == len(base[i]) - 1]
                for a, row in enumerate(sender_rows):
                    add = (
                        torch.stack([change(j, i, s, r)[last].sum(0) for s in row]).sum(0)
                        if last
                        else 0.0
                    )
                    stacked.append(finals[i].float().cpu() + add)
                    keys.append((j, i, a))
        values = metric_fn(
            readout(model, torch.stack(stacked)), torch.as_tensor([i for _, i, _ in keys])
        )
        for (j, i, a), value in zip(keys, values.double().cpu().tolist(), strict=True):
            (per_pair if j < 0 else random[j])[i, a, b_row] = value

    inputs = [b for b, row in enumerate(receiver_rows) if receivers[row[0]] is not None]
    if not inputs:
        return
    # A row of several receivers sets each input to the run's own plus the change (Wang et al.'s
    # step 3 puts back step 2's inputs): added, an earlier receiver's patch would also move a
    # later one's input through the layers between them.
    joint = sorted({r for b in inputs if len(receiver_rows[b]) > 1 for r in receiver_rows[b]})
    own = {i: _receiver_inputs(model, base[i], [receivers[r] for r in joint], final) for i in pairs}
    plan = Plan(bases=[Base(base[i], i) for i in pairs])
    for j in range(-1, n_random):
        for slot, i in enumerate(pairs):
            for a, sender_row in enumerate(sender_rows):
                for b in inputs:
                    edits = []
                    for r in receiver_rows[b]:
                        site = receivers[r]
                        assert site is not None  # "final" is refused in a group
                        # the receiver reads the stream before a later sender writes
                        reaching = [s for s in sender_row if _has_path(senders[s], site, parallel)]
                        if not reaching:
                            continue
                        delta = torch.stack([change(j, i, s, r) for s in reaching]).sum(0)
                        hook = _receiver_hook(site, final)
                        layout: Layout = "vector" if site.head is None else "head"
                        head = -1 if site.head is None else site.head
                        if len(receiver_rows[b]) == 1:
                            edits += [
                                Edit(hook, layout, pb, ADD, head=head, payload=delta[k])
                                for k, (_, pb) in enumerate(resolved[i])
                                if firsts[i][k]
                            ]
                            continue
                        value = own[i][joint.index(r)]  # [seq, d_model]
                        at = [pb for k, (_, pb) in enumerate(resolved[i]) if firsts[i][k]]
                        total = value.clone()
                        for k, (_, pb) in enumerate(resolved[i]):
                            if firsts[i][k]:
                                total[pb] += delta[k].to(total.dtype)
                        edits += [
                            Edit(hook, layout, pb, SET, head=head, payload=total[pb]) for pb in at
                        ]
                    if edits:
                        plan.cells.append(Cell((j, i, a, b), base=slot, edits=tuple(edits)))
    got = run_plan(
        model,
        plan,
        metric_fn,
        packed=packed,
        cells_per_batch=cells_per_batch,
        memory_budget=memory_budget,
        progress=progress,
        desc="path patch",
        hooks=lambda: _split_for(model, receivers),
    )
    for cell, value in zip(plan.cells, got.cells.tolist(), strict=True):
        j, i, a, b = cell.key
        (per_pair if j < 0 else random[j])[i, a, b] = value


def _receiver_inputs(
    model: Any, ids: Tensor, receivers: list[Site | None], final: str
) -> list[Tensor]:
    """Each receiver's own input ``[seq, d_model]`` (float32, CPU) in the run of ``ids``."""
    if not receivers:
        return []
    caps = {_receiver_hook(r, final): Capture() for r in receivers}
    with torch.no_grad(), _split_for(model, receivers), intervene(model, caps):
        model(ids[None].to(model.W_E.device))
    out = []
    for r in receivers:
        value = caps[_receiver_hook(r, final)].value
        assert value is not None
        out.append((value[0] if r is None or r.head is None else value[0, :, r.head]).float().cpu())
    return out


def _grouped(
    items: Any, parse: Callable[[Any], list[Any]], what: str
) -> tuple[list[str | None], list[Any], list[list[int]]]:
    """``(names, flat, rows)``: :func:`named_groups`' rows as indices into ``flat``, which
    holds every place once."""
    names, groups = named_groups(items, parse, _EXAMPLE, what)
    flat = list(dict.fromkeys(place for group in groups for place in group))
    rows = [list(dict.fromkeys(flat.index(place) for place in group)) for group in groups]
    return names, flat, rows


_EXAMPLE = "{'S-inhibition': ['head@7, head 3', 'head@8, head 6']}"


def _refuse_final_in_group(receivers: list[Site | None], rows: list[list[int]]) -> None:
    """The final residual is read out without a pass: it cannot be patched in one run with
    inputs that a pass reads, nor be two rows."""
    at = [b for b, row in enumerate(rows) if any(receivers[r] is None for r in row)]
    if any(len(rows[b]) > 1 for b in at):
        raise ValueError(
            "A receiver group holds 'final' beside other receivers: the final residual is read "
            "out from each sender's change alone, not in a run with q/k/v or MLP inputs "
            "patched. Give 'final' a row of its own."
        )


def _group_sums(
    flat: np.ndarray, base: np.ndarray, rows: tuple[list[list[int]], list[list[int]]]
) -> np.ndarray:
    """``[..., sender rows, receiver rows]``: each row pair's first-order estimate, ``base`` plus
    the sum of its paths' changes (NaN where none of them has a path)."""
    sender_rows, receiver_rows = rows
    change = flat - base
    out = np.full((*flat.shape[:-2], len(sender_rows), len(receiver_rows)), np.nan)
    for a, sender_row in enumerate(sender_rows):
        for b, receiver_row in enumerate(receiver_rows):
            block = change[..., sender_row, :][..., receiver_row]
            found = np.isfinite(block).any(axis=(-2, -1))
            total = np.nansum(block, axis=(-2, -1)) + base[..., 0, 0]
            out[..., a, b] = np.where(found, total, np.nan)
    return out


def _receiver_label(receiver: Site | None) -> str:
    return "final" if receiver is None else str(receiver)


def _receiver_head(receiver: Site | None) -> int | None:
    return None if receiver is None else receiver.head


def _receiver_layer(model: Any, receiver: Site | None) -> int:
    return int(model.cfg.n_layers) if receiver is None else receiver.layer


def _stream(receiver: Site | None, final: str) -> str:
    """The residual stream a receiver reads, as a hook name shared by the receivers that read
    it: a layer's q/k/v inputs read ``resid_pre``, an MLP its own input, the unembedding the
    final residual."""
    if receiver is None:
        return final
    if receiver.kind == "mlp_in":
        return str(Site("mlp_in", receiver.layer))
    return f"blocks.{receiver.layer}.hook_resid_pre"


def _live_changes(
    model: Any,
    ids: Tensor,
    senders: list[Site],
    deltas: dict[Site, Tensor],
    resolved: list[tuple[int, int]],
    firsts: list[bool],
    streams: list[str],
    cells_per_batch: int,
    memory_budget: int,
) -> dict[tuple[int, str], Tensor]:
    """Wang et al.'s step 2 with live MLPs, for one run: per (sender, stream) ``[positions,
    d_model]``, how the stream differs from the run's when the sender writes its change and
    every attention layer is frozen at the run's output (the MLPs recompute).

    Once the attention is frozen nothing mixes positions: each position's stream is its input
    (``resid_pre`` of block 0) plus the frozen attention outputs plus what the MLPs make of it.
    So only the positions whose change is passed on are run, as rows of that many tokens: their
    block-0 input and every attention output are set to the run's values there (what attention
    computes on the short rows is discarded), the sender's change added, the MLPs left live.
    Row 0 carries no change, so the differences come from one batch (no rounding between
    separate runs). Later copies of a requested position carry no change and read zero, as the
    frozen path passes each token's change on once.
    """
    n_layers, d_model = int(model.cfg.n_layers), int(model.cfg.d_model)
    where = torch.as_tensor([pb for _, pb in resolved])
    once = torch.as_tensor(firsts, dtype=torch.float32)
    device = model.W_E.device
    # The run's own values at those positions: the block-0 input and every attention output.
    start_site, attn_sites = Site("resid_pre", 0), [Site("attn_out", n) for n in range(n_layers)]
    base = {site: Capture() for site in [start_site, *attn_sites]}
    reads: dict[SiteLike, Any] = {site: cap for site, cap in base.items()}
    with torch.no_grad(), intervene(model, reads):
        model(ids[None].to(device))
    held = {}
    for site, cap in base.items():
        assert cap.value is not None
        held[site] = cap.value[0, where.to(cap.value.device)]
    # Memory of one row: the captured streams and the forward's own activations (a generous
    # 8 vectors per layer and position).
    per_row = 4 * len(where) * d_model * (len(streams) + 8 * n_layers)
    rows = max(1, min(cells_per_batch, memory_budget // per_row))
    out: dict[tuple[int, str], Tensor] = {}
    for start in range(0, len(senders), rows):
        chunk = list(range(start, min(start + rows, len(senders))))

        def writes(layer: int, kinds: tuple[str, ...], chunk: list[int] = chunk) -> list[Any]:
            return [
                (1 + k, deltas[senders[s]])
                for k, s in enumerate(chunk)
                if senders[s].layer == layer and senders[s].kind in kinds
            ]

        def edit(act: Tensor, hook: Any, rows: list[Any], value: Tensor | None) -> Tensor:
            if value is not None:  # frozen at the run's value (every row)
                act[:] = value.to(act.device, act.dtype)
            for row, delta in rows:
                act[row] += delta.to(act.device, act.dtype)
            return act

        embeds = [(1 + k, deltas[senders[s]]) for k, s in enumerate(chunk) if senders[s] == _EMBED]
        spec: dict[SiteLike, Any] = {
            start_site: functools.partial(edit, rows=embeds, value=held[start_site])
        }
        for layer, site in enumerate(attn_sites):
            attn = writes(layer, (*_HEAD_WRITES, "attn_out"))
            spec[site] = functools.partial(edit, rows=attn, value=held[site])
            mlp = writes(layer, ("mlp_out",))
            if mlp:
                spec[Site("mlp_out", layer)] = functools.partial(edit, rows=mlp, value=None)
        caps = {stream: Capture() for stream in streams}
        spec.update(caps)
        batch = ids[where][None].expand(len(chunk) + 1, -1).to(device)
        with torch.no_grad(), intervene(model, spec):
            model(batch)
        for stream, cap in caps.items():
            value = cap.value
            assert value is not None
            got = value.float().cpu()
            for k, s in enumerate(chunk):
                out[s, stream] = (got[1 + k] - got[0]) * once[:, None]
    return out


def _label(method: str, direction: str) -> str:
    """The result's ``direction``: an estimate is ``"attribution"`` (of denoising) or
    ``"attribution-noising"``."""
    if method != "attribution":
        return direction
    return "attribution-noising" if direction == "noising" else "attribution"


def _estimate_paths(
    model: Any,
    base: list[Tensor],
    resolved: list[list[tuple[int, int]]],
    senders: list[Site],
    receivers: list[Site | None],
    metric_fn: MetricFn,
    metric_name: str,
    final: str,
    change: Callable[[int, int, int], Tensor],
    base_m: np.ndarray,
    per_pair: np.ndarray,
    random: np.ndarray,
    progress: bool,
    *,
    rows: Callable[[int], int],
) -> None:
    """Fill ``per_pair`` and ``random`` with first-order estimates: per pass of pairs whose
    edited prompts have one length (at most ``rows(width)`` of them), one forward and backward
    pass of the run being edited gives the metric's gradient at every receiver's input;
    a path's estimate is ``base + sum_pos change . gradient`` at the positions its change
    reaches (the same changes, random ones included, that exact path patching adds)."""
    n_random = random.shape[0]
    # A receiver reads the stream before its own layer: senders at or after it have no path.
    parallel = model_adapter(model).parallel_blocks
    no_path = torch.tensor([[not _has_path(s, r, parallel) for r in receivers] for s in senders])
    passes = length_passes([(len(ids),) for ids in base], rows)
    for chunk in weighted_progress_bar(
        passes,
        weights=[len(c) * len(base[c[0]]) for c in passes],
        counts=[len(c) for c in passes],
        unit="pairs",
        progress=progress,
        desc="path attribution",
    ):
        ids = torch.stack([base[i] for i in chunk])
        grads = _receiver_gradients(model, ids, receivers, metric_fn, metric_name, final, chunk)
        for row, i in enumerate(chunk):
            dst = torch.as_tensor([pb for _, pb in resolved[i]])
            g = grads[row][:, dst]  # [receivers, positions, d_model]
            for j in range(-1, n_random):
                changes = torch.stack([change(j, i, s) for s in range(len(senders))]).double()
                est = torch.einsum("spd,rpd->sr", changes, g).masked_fill(no_path, float("nan"))
                (per_pair[i] if j < 0 else random[j, i])[:] = base_m[i] + est.numpy()


def _receiver_gradients(
    model: Any,
    ids: Tensor,
    receivers: list[Site | None],
    metric_fn: MetricFn,
    metric_name: str,
    final: str,
    pairs: list[int],
) -> Tensor:
    """``[rows, receivers, seq, d_model]`` float64 on the CPU: for each row of ``ids``
    ``[rows, seq]`` (the runs of ``pairs``, of one length), the gradient of its metric with
    respect to each receiver's input (a head's split q/k/v input, an MLP's input, or the final
    residual). Each row's metric depends on its row only, so the sum's gradient is each's."""
    hooks = {_receiver_hook(r, final): Gradient() for r in receivers}
    with _split_for(model, receivers), gradients_enabled():
        # inference_mode tensors cannot be saved for backward: the ids are cloned inside.
        with intervene(model, hooks):
            logits = model(ids.to(model.W_E.device).clone())
            out = metric_fn(logits[:, -1], torch.tensor(pairs)).sum()
        if not out.requires_grad:
            raise ValueError(
                f"The metric {metric_name!r} gave a value without a gradient: method="
                "'attribution' differentiates it, so compute it from the logits with torch "
                "operations (no .item(), numpy or argmax)."
            )
        differentiate(out, list(hooks.values()))
    rows = []
    for r in receivers:
        grad = hooks[_receiver_hook(r, final)].grad
        assert grad is not None
        rows.append(grad if r is None or r.head is None else grad[:, :, r.head])
    return torch.stack(rows, dim=1).double().cpu()


def _backward_rows(
    model: Any, width: int, memory_budget: int, receivers: Sequence[Site | None]
) -> int:
    """Pairs of ``width`` tokens a gradient pass may take within ``memory_budget``: as
    :func:`backward_rows`, with the budget shared by the split inputs where receivers are heads'
    q/k/v inputs (``[rows, seq, heads, d_model]`` at every layer, with their gradients, each
    kind about one more row's worth: measured on SmolLM2, 60 MiB a pair of 17 tokens with v
    receivers, 125 MiB with q, k and v, against 31 MiB with the final residual)."""
    split = {r.kind for r in receivers if r is not None and r.kind in ("q", "k", "v")}
    stacked = len(receivers) * width * model_adapter(model).d_model * 8  # the float64 gradients
    return backward_rows(model, width, memory_budget // (1 + len(split)), stacked)


def _receiver_hook(receiver: Site | None, final: str) -> str:
    """The hook holding a receiver's own input: the final residual, an MLP's input, or a head's
    split q/k/v input (``[batch, pos, heads, d_model]``)."""
    if receiver is None:
        return final
    if receiver.kind == "mlp_in":
        return f"blocks.{receiver.layer}.hook_mlp_in"
    return f"blocks.{receiver.layer}.hook_{receiver.kind}_input"


def _has_path(sender: Site, receiver: Site | None, parallel: bool) -> bool:
    """Whether the receiver reads the stream after the sender writes it: a head's q/k/v input
    reads it before its layer's attention, an MLP's input after it (not its own output), unless
    the block is ``parallel`` (GPT-NeoX, GPT-J): there the MLP reads the block's input too."""
    if receiver is None or sender == _EMBED:  # every layer reads the embeddings
        return True
    if receiver.kind == "mlp_in" and receiver.layer == sender.layer:
        return sender.kind != "mlp_out" and not parallel
    return receiver.layer > sender.layer


def _split_for(model: Any, receivers: Sequence[Site | None]) -> Any:
    """:func:`split_qkv` where a receiver is a head's q/k/v input, else nothing to switch."""
    if any(r is not None and r.kind in ("q", "k", "v") for r in receivers):
        return split_qkv(model)
    return contextlib.nullcontext({})


def _compact(
    labels: Sequence[str], layers: Sequence[int | None], heads: Sequence[int | None]
) -> list[str]:
    """Short labels: ``"q L22H5"`` for ``"q@22, head 5"``, ``"k L22 kv1"`` for a key or value
    head (read as query head 1, "k L22H1" misled), the label itself otherwise."""
    out = []
    for label, layer, head in zip(labels, layers, heads, strict=True):
        kind = label.split("@")[0]
        if head is None:
            out.append(label)
        elif kind in ("k", "v"):
            out.append(f"{kind} L{layer} kv{head}")
        else:
            out.append(f"{kind} L{layer}H{head}")
    return out
