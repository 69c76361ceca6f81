"""Direct logit attribution: how much each component's write moves a logit difference.

The last block's output ``x`` at a prompt's last token is a sum of writes: the embedding
(``resid_pre`` of layer 0, positional embeddings included), then every layer's attention and MLP
output (each head's ``z @ W_O[head]`` plus the attention bias, with ``heads=True``). The final norm
is affine in ``x`` once its scale is fixed at the value it takes for this ``x`` (the "frozen"
scale of TransformerLens's ``apply_ln_to_stack``)::

    norm(x) = w * P x / s(x) + b          P centres (LayerNorm) or is the identity (RMSNorm)

so the logit difference between ``answer`` and ``wrong`` splits exactly into one number per write
plus a constant (the norm's bias and the unembedding's bias along the difference)::

    logit[answer] - logit[wrong] = Σ_c (w * P c / s(x)) · (W_U[:, answer] - W_U[:, wrong]) + const

Each number is the write's *direct* effect: what it adds to the difference through the residual
stream alone, with everything downstream of it held fixed (the scale included). Patching
(:func:`patch`) measures total effects instead, through every later layer.

One forward pass per ``batch_size`` prompts captures every write at each prompt's last real token;
the decomposition is checked against the model's own logits (a model whose residual stream is not
that sum, or whose final norm or logits are not of that form, is refused with the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
from einops import einsum, rearrange
from jaxtyping import Float
from torch import Tensor

from mechprobe.core import (
    Batch,
    PaddingSide,
    Result,
    Site,
    SiteKind,
    check_bool,
    check_heads_sum,
    check_int,
    check_positions,
    evaluates,
    first_token_ids,
    float64_columns,
    literal,
    model_adapter,
    new_axes,
    positions_text,
    run,
    site_columns,
    spread,
    tokenize,
    warn,
)
from mechprobe.patching._metrics import PatchMetric, _pair_ids, logit_diff, metric_title

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LogitAttributionResult", "direct_logit_attribution"]


@runtime_checkable
class TaskLike(Protocol):
    """What direct logit attribution reads from a :class:`mechprobe.Task` (patching does not
    import the tasks package: any object with these methods will do)."""

    @property
    def name(self) -> str: ...
    def prompts(self) -> list[str]: ...
    def inputs(self) -> list[str]: ...
    def answers(self) -> list[str]: ...
    def arguments(self) -> list[str]: ...


@dataclass(frozen=True, eq=False, repr=False)
class LogitAttributionResult(Result, format="mechprobe.LogitAttributionResult", version=1):
    """Direct logit attribution of a logit difference to the residual stream's writes.

    Attributes:
        prompts: The prompts, as given.
        answers: Per prompt, the answer token (decoded).
        wrongs: Per prompt, the token the answer is compared with (decoded).
        components: Labels of the writes, in the residual stream's order: ``"embed"``, then per
            layer ``"L3 attn"`` (or, with heads, ``"L3H0"``... and ``"L3 attn_bias"`` where the
            attention has a bias that is not zero) and ``"L3 mlp"``, then ``"bias"`` (the final
            norm's and the unembedding's biases: the same for every prompt up to the tokens
            compared).
        kinds: Per component: ``"embed"``, ``"attn"``, ``"head"``, ``"attn_bias"``, ``"mlp"`` or
            ``"bias"``.
        layer: ``[components]`` the layer of each write (-1 for the embedding, ``n_layers`` for
            the final bias).
        head: ``[components]`` the head of a ``"head"`` component, -1 otherwise.
        attributions: ``[prompts, components]`` each write's direct effect on the logit
            difference; a row sums to :attr:`logit_diff` up to the model dtype's rounding.
        logit_diff: ``[prompts]`` the model's own ``logit[answer] - logit[wrong]`` at the split
            position.
        n_layers: Layers of the model.
        heads: Whether attention was split into heads.
        position: The position split (-1: each prompt's last token).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.direct_logit_attribution(mp.tiny_model(), ["Hi cat", "Hi dog"],
        ...                                   mp.logit_diff(5, 6), progress=False)
        >>> res.attributions.shape, res.components[:3]
        ((2, 8), ('embed', 'L0 attn', 'L0 mlp'))
    """

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    wrongs: tuple[str, ...]
    components: tuple[str, ...]
    kinds: tuple[str, ...]
    layer: np.ndarray
    head: np.ndarray
    attributions: np.ndarray
    logit_diff: np.ndarray
    n_layers: int
    heads: bool = False
    position: int = -1
    model_name: str = ""
    model_dtype: str = ""

    @property
    def mean(self) -> np.ndarray:
        """``[components]`` each write's attribution averaged over prompts.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.direct_logit_attribution(mp.tiny_model(), "Hi", mp.logit_diff(5, 6),
            ...                                   progress=False)
            >>> bool(abs(res.mean.sum() - res.logit_diff.mean()) < 1e-3)
            True
        """
        return np.asarray(self.attributions.mean(0))

    def head_matrix(self) -> np.ndarray:
        """``[layers, heads]`` each head's mean attribution (``heads=True`` results).

        Raises:
            ValueError: The result was computed without ``heads=True``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.direct_logit_attribution(mp.tiny_model(), "Hi", mp.logit_diff(5, 6),
            ...                                   heads=True, progress=False)
            >>> res.head_matrix().shape
            (3, 4)
        """
        if not self.heads:
            raise ValueError(
                "This result has one component per attention layer, not per head: run "
                "direct_logit_attribution(..., heads=True) for head_matrix()."
            )
        is_head = np.asarray(self.kinds) == "head"
        n_heads = int(self.head[is_head].max()) + 1
        matrix = np.zeros((self.n_layers, n_heads))
        matrix[self.layer[is_head], self.head[is_head]] = self.mean[is_head]
        return matrix

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt and component: prompt index, component, the site that wrote it
        (``site``, ``kind``, ``layer``, ``head``, as in every frame: ``"mlp_out@3"``,
        ``"head_out@3, head 0"``; the embedding and the biases are no site: their component name
        and ``<NA>`` kind and head, ``<NA>`` layer but for an attention bias's), the
        ``positions`` split (``"-1"``, as text like every frame's) and the attribution.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.direct_logit_attribution(mp.tiny_model(), "Hi", mp.logit_diff(5, 6),
            ...                                   progress=False)
            >>> list(res.to_frame().columns)
            ['prompt', 'component', 'site', 'kind', 'layer', 'head', 'positions', 'attribution']
            >>> res.to_frame()["site"].tolist()[:3]
            ['embed', 'attn_out@0', 'mlp_out@0']
        """
        n, c = self.attributions.shape
        located = self._located()
        frame = pd.DataFrame(
            {
                "prompt": np.repeat(np.arange(n), c),
                "component": np.tile(np.asarray(self.components, dtype=object), n),
                **{key: np.tile(np.asarray(col, dtype=object), n) for key, col in located.items()},
                "positions": positions_text(self.position),
                "attribution": self.attributions.reshape(-1),
            }
        ).astype({"layer": "Int64", "head": "Int64"})
        return float64_columns(frame)

    def _located(self) -> dict[str, Any]:
        """Per component: the frames' location columns ``site``, ``kind``, ``layer``, ``head``
        (a write of attention, one head or an MLP is its site's: ``attn_out``, ``head_out``,
        ``mlp_out``; the embedding and the biases are no site)."""
        places: list[Any] = []
        for name, kind, layer, head in zip(
            self.components, self.kinds, self.layer, self.head, strict=True
        ):
            site_kind = _SITE_OF_WRITE.get(kind)
            if site_kind is None:
                places.append(name)
            else:
                places.append(Site(site_kind, int(layer), head=None if head < 0 else int(head)))
        located = site_columns(places)
        # A layer's attention bias is no site but belongs to its block (embed and the final
        # bias, stored as -1 and n_layers, to none).
        in_block = (self.layer >= 0) & (self.layer < self.n_layers)
        layer = pd.array(np.where(in_block, self.layer, 0), dtype="Int64")
        layer[~in_block] = pd.NA
        return {
            "site": located["site"],
            "kind": located["kind"],
            "layer": layer,
            "head": located["head"],
        }

    def summary(self, top: int = 10) -> pd.DataFrame:
        """The ``top`` components by mean absolute effect: mean and spread over prompts, and the
        mean's share of the mean logit difference.

        Args:
            top: How many components (the largest by mean absolute effect).

        Returns:
            One row per component: ``component``, ``layer``, ``mean``, ``spread`` (over
            prompts) and ``share``.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.direct_logit_attribution(mp.tiny_model(), "Hi", mp.logit_diff(5, 6),
            ...                                   progress=False)
            >>> list(res.summary(top=3).columns), len(res.summary(top=3))
            (['component', 'layer', 'mean', 'spread', 'share'], 3)
        """
        check_int(top, "top", 0)
        mean = self.mean
        order = np.argsort(-np.abs(mean), kind="stable")[:top]
        total = float(self.logit_diff.mean())
        frame = pd.DataFrame(
            {
                "component": [self.components[i] for i in order],
                "layer": self._located()["layer"][order],
                "mean": mean[order],
                "spread": spread(self.attributions)[order],  # over prompts (NaN for one)
                "share": mean[order] / total if total != 0 else np.full(len(order), np.nan),
            }
        )
        return float64_columns(frame)

    def plot(self, ax: Axes | None = None) -> Figure:
        """Mean attribution per write: a layer x head map with ``heads=True``, else bars in the
        residual stream's order (attention and MLP coloured apart) with their running sum.

        Args:
            ax: Axes to draw into (None: a new figure).

        Returns:
            The Figure.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.direct_logit_attribution(mp.tiny_model(), "Hi", mp.logit_diff(5, 6),
            ...                                   progress=False)
            >>> len(res.plot().axes[0].patches)
            8
        """
        what = metric_title("logit_diff", self.answers, self.wrongs)
        what = literal(what)  # the answers' text, drawn as written
        if self.heads:
            fig, ax = new_axes(ax, (6.5, 4.0))
            heads = self.head_matrix()
            # Each layer's MLP in a column of its own, on the heads' scale (review 26a F9: the
            # largest writer, L29's MLP at -4.08, was in no figure).
            is_mlp = np.asarray(self.kinds) == "mlp"
            mlp = np.full(self.n_layers, np.nan)
            mlp[np.asarray(self.layer)[is_mlp].astype(int)] = self.mean[is_mlp]
            gap = np.full((self.n_layers, 1), np.nan)
            matrix = np.concatenate([heads, gap, mlp[:, None]], axis=1)
            limit = float(np.nanmax(np.abs(matrix), initial=0.0)) or 1.0
            image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_xlabel("head, and the layer's MLP")
            ax.set_ylabel("layer")
            step = 1 if self.n_layers <= 40 else 5
            ax.set_yticks(range(0, self.n_layers, step))  # whole layers (0.5 steps at 3 layers)
            n_heads = heads.shape[1]
            ax.set_xticks([*range(n_heads), n_heads + 1], [*map(str, range(n_heads)), "MLP"])
            fig.colorbar(image, ax=ax, label="direct effect (logits)")
            ax.set_title(f"direct effect of each head and MLP on {what}", fontsize="small")
            return fig
        # x is the layer, attention and MLP side by side: labelling every third of 62 bars left
        # most of them unnamed.
        offsets = {"embed": 0.0, "attn": -0.2, "attn_bias": 0.0, "mlp": 0.2, "bias": 0.0}
        x = np.asarray(self.layer, dtype=float) + [offsets.get(k, 0.0) for k in self.kinds]
        fig, ax = new_axes(ax, (max(6.0, 0.3 * (self.n_layers + 2)), 3.5))
        colours = {"embed": "grey", "attn": "tab:blue", "mlp": "tab:orange", "bias": "black"}
        for kind, colour in colours.items():  # one legend entry per kind present
            shown = np.asarray(self.kinds) == kind
            if shown.any():
                # Over several prompts, their spread (review 26a F9: L27's MLP 1.61 +- 2.71
                # was drawn as a bare mean).
                err = spread(self.attributions)[shown] if len(self.prompts) > 1 else None
                ax.bar(x[shown], self.mean[shown], width=0.4, color=colour, label=kind,
                       yerr=err, error_kw={"elinewidth": 0.6, "capsize": 1.5})  # fmt: skip
        ax.plot(x, np.cumsum(self.mean), color="black", lw=1, label="running sum")
        ax.axhline(0, color="grey", lw=0.5)
        step = 1 if self.n_layers <= 40 else 5
        ticks = [-1, *range(0, self.n_layers, step), self.n_layers]
        labels = ["embed", *map(str, range(0, self.n_layers, step)), "bias"]
        ax.set_xticks(ticks, labels, rotation=90 if self.n_layers > 20 else 0, fontsize="small")
        ax.set_xlabel("layer (attention left, MLP right)")
        ax.set_ylabel("direct effect (logits)")
        ax.legend(fontsize="small")
        over = f" (mean ± sd over {len(self.prompts)} prompts)" if len(self.prompts) > 1 else ""
        ax.set_title(f"direct effect of each write on {what}{over}", fontsize="small")
        return fig

    def _describe(self) -> str:
        best = self.summary(top=1)
        lead = "" if best.empty else f"; largest {best['component'][0]} {best['mean'][0]:+.3g}"
        return (
            f"{len(self.prompts)} prompt(s), {len(self.components)} components, mean logit diff "
            f"{float(self.logit_diff.mean()):+.3g}{lead}"
        )


@evaluates
def direct_logit_attribution(
    model: Any,
    prompts: str | Sequence[str] | Batch | TaskLike,
    metric: PatchMetric | None = None,
    *,
    heads: bool = False,
    positions: int = -1,
    batch_size: int | None = 32,
    padding_side: PaddingSide = "right",
    progress: bool = True,
) -> LogitAttributionResult:
    """Split each prompt's logit difference at its last token into the direct effects of the
    residual stream's writes: the embedding, each layer's attention (or each head) and MLP.

    The final norm's scale is frozen at its value for the prompt's own last residual vector, so
    the split is exact: a prompt's attributions sum to the model's logit difference (module
    docstring). A direct effect leaves out everything a write does through later layers; compare
    :func:`patch` for total effects.

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts, a :class:`Batch`, or a :class:`Task` (its
            items' prompts).
        metric: :func:`logit_diff` ``(answer, wrong)``: one token each for every prompt, or one
            per prompt. (A probability is not linear in the residual stream, so
            :func:`answer_prob` has no direct attribution.) None with a :class:`Task`: each
            item's answer against its argument (the capital against the country: what moves
            the model from the argument it has read to the answer, Merullo et al.), first
            tokens; items whose answer and argument start with the same token are left out,
            with a warning.
        heads: Split each attention layer's write into its heads' ``z @ W_O[head]`` (plus an
            ``attn_bias`` component where the attention has a bias that is not zero).
        positions: The one position whose next-token logits are split (default -1, each
            prompt's last token; negative counts from each prompt's end, as everywhere): e.g.
            ``-2`` on ``prompt + answer`` texts reads the prediction of the answer's last token.
        batch_size: Prompts per forward pass (None: all at once).
        padding_side: Padding of the batch built from strings (results do not depend on it).
        progress: Show a progress bar over batches.

    Returns:
        A :class:`LogitAttributionResult`.

    Raises:
        TypeError: ``metric`` is not a :func:`logit_diff` (or is None without a Task).
        ValueError: An answer is not one token of the vocabulary; the model's logits pass
            through a soft cap; its final norm is not a LayerNorm or RMSNorm; its residual stream
            is not the sum of the embedding and the attention and MLP outputs; or (``heads``) its
            attention output is not the sum of the heads' writes.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.direct_logit_attribution(model, ["Hi cat", "Hi dog"], mp.logit_diff(5, 6),
        ...                                   progress=False)
        >>> bool(abs(res.attributions.sum(1) - res.logit_diff).max() < 1e-3)
        True
    """
    heads = check_bool(heads, "heads")
    position = check_positions(
        positions,
        single=True,
        why="a logit difference is split at one position per prompt (default -1, the last "
        "token); call once per position",
    )
    if isinstance(prompts, TaskLike):
        prompts, metric = _task_prompts(model, prompts, metric)
    if metric is None:
        raise TypeError(
            "direct_logit_attribution needs metric=mp.logit_diff(answer, wrong) for prompts; "
            "only a Task has a default (each item's answer against its argument)."
        )
    if not isinstance(metric, PatchMetric) or metric.name != "logit_diff":
        got = metric.name if isinstance(metric, PatchMetric) else type(metric).__name__
        raise TypeError(
            f"metric must be mp.logit_diff(answer, wrong), got {got}: a direct attribution "
            "splits a quantity linear in the residual stream, and only a logit difference is "
            "(for a probability, patch the components instead: mp.patch)."
        )
    adapter = model_adapter(model)
    scale = _logit_scale(adapter)
    batch = (
        prompts
        if isinstance(prompts, Batch)
        else tokenize(model, prompts, padding_side=padding_side)
    )
    n, n_layers = len(batch), adapter.n_layers
    answer, wrong = _pair_ids(model, metric.answer, metric.wrong, n)
    sites = _sites(n_layers, adapter.n_heads if heads else 0, position)
    out = run(
        model,
        batch,
        capture=list(sites.values()),
        logit_positions=position,
        batch_size=batch_size,
        padding_side=padding_side,
        progress=progress,
    )
    # [n, ...] at the last token, on the CPU in float64: a few vectors per prompt, decoded exactly
    acts = {key: out[site][:, 0].double().cpu() for key, site in sites.items()}
    logits = out.logits[:, 0].double().cpu()
    rows = torch.arange(n)
    model_diff = logits[rows, answer] - logits[rows, wrong]

    labels, kinds, layer_of, head_of, writes = _writes(model, acts, n_layers, heads)
    final = acts["final"]
    _check_sum(writes, final, adapter.dtype, adapter.name)
    linear, const = _frozen_final_norm(model, final)
    w_u, b_u = (t.detach().double().cpu() for t in adapter.unembedding())
    direction = (w_u[:, answer] - w_u[:, wrong]).T  # [n, d_model]
    values = einsum(linear(writes), direction, "n c d, n d -> n c")
    bias = direction @ const + b_u[answer] - b_u[wrong]  # [n]: a function of the two tokens
    values = torch.cat([values, bias[:, None]], dim=1) * scale
    decode = adapter.token_text
    return LogitAttributionResult(
        prompts=tuple(batch.prompts),
        answers=tuple(decode(int(t)) for t in answer),
        wrongs=tuple(decode(int(t)) for t in wrong),
        components=(*labels, "bias"),
        kinds=(*kinds, "bias"),
        layer=np.asarray([*layer_of, n_layers]),
        head=np.asarray([*head_of, -1]),
        attributions=values.float().numpy(),
        logit_diff=model_diff.float().numpy(),
        n_layers=n_layers,
        heads=heads,
        position=position,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def _logit_scale(adapter: Any) -> float:
    """The factor the architecture multiplies its logits by after the unembedding (1.0 where it
    does nothing; Cohere's logit_scale), folded into every attribution.

    Raises:
        ValueError: A transform that is not a multiplication (Gemma 2's soft cap).
    """
    transform = adapter.output_transform
    if transform is None:
        return 1.0
    probe = torch.linspace(-1e3, 1e3, 101, dtype=torch.float64)[None]
    got = transform(probe.clone()).double()
    scale = float(got[0, -1] / probe[0, -1])
    if not torch.allclose(got, scale * probe, rtol=1e-5, atol=1e-5):
        raise ValueError(
            f"{adapter.name}'s logits pass through a transform after the unembedding that is not "
            "a multiplication (a soft cap): their difference has no exact direct attribution. "
            "Patch or ablate the components instead (mp.patch, mp.ablate_cells), which measure "
            "their total effect through the cap."
        )
    return scale


def _task_prompts(
    model: Any, task: TaskLike, metric: PatchMetric | None
) -> tuple[list[str], PatchMetric]:
    """A task's prompts with ``metric``, or (None) with its answers against its arguments, the
    items whose two first tokens coincide left out (their difference is 0 by construction)."""
    prompts = task.prompts()
    if metric is not None:
        return prompts, metric
    answers = first_token_ids(model, task.answers())
    arguments = first_token_ids(model, task.arguments())
    kept = [i for i, (a, w) in enumerate(zip(answers, arguments, strict=True)) if a != w]
    if not kept:
        raise ValueError(
            f"Every item of task {task.name!r} has an answer that starts with its argument's "
            "first token: their logit difference is 0. Pass metric=mp.logit_diff(answer, wrong) "
            "with other wrong answers."
        )
    if len(kept) < len(prompts):
        dropped = sorted(set(range(len(prompts))) - set(kept))
        inputs = task.inputs()
        shown = ", ".join(f"{inputs[i]!r}" for i in dropped[:5])
        warn(
            f"Task {task.name!r}: {len(dropped)} of {len(prompts)} items left out, as their answer "
            f"and argument start with the same token ({shown}{' ...' if len(dropped) > 5 else ''}).",
            UserWarning,
        )
    metric = logit_diff([answers[i] for i in kept], [arguments[i] for i in kept])
    return [prompts[i] for i in kept], metric


def _sites(n_layers: int, n_heads: int, position: int = -1) -> dict[str, Site]:
    """The captures at ``position``: embedding, each layer's writes (and heads' ``z``), the
    final residual."""
    sites = {"embed": Site("resid_pre", 0, positions=position)}
    for layer in range(n_layers):
        sites[f"attn{layer}"] = Site("attn_out", layer, positions=position)
        for head in range(n_heads):
            sites[f"z{layer}.{head}"] = Site("head", layer, head=head, positions=position)
        sites[f"mlp{layer}"] = Site("mlp_out", layer, positions=position)
    sites["final"] = Site("resid_post", n_layers - 1, positions=position)
    return sites


# A write's kind (the component) -> the site kind whose hook holds it, for frames.
_SITE_OF_WRITE: dict[str, SiteKind] = {"attn": "attn_out", "mlp": "mlp_out", "head": "head_out"}


def _writes(
    model: Any, acts: dict[str, Tensor], n_layers: int, heads: bool
) -> tuple[list[str], list[str], list[int], list[int], Float[Tensor, "n components d_model"]]:
    """Labels, kinds, layers, heads and vectors of every write, in the residual stream's order."""
    labels, kinds, layer_of, head_of = ["embed"], ["embed"], [-1], [-1]
    vectors = [acts["embed"]]

    def add(label: str, kind: str, layer: int, head: int, vector: Tensor) -> None:
        labels.append(label)
        kinds.append(kind)
        layer_of.append(layer)
        head_of.append(head)
        vectors.append(vector)

    for layer in range(n_layers):
        attn_out = acts[f"attn{layer}"]
        if heads:
            attn = model.blocks[layer].attn
            z = torch.stack(
                [acts[f"z{layer}.{h}"] for h in range(model_adapter(model).n_heads)], dim=1
            )  # [n, heads, d_head]
            check_heads_sum(
                attn, z[:, None].float(), attn_out[:, None].float(), f"per-head attribution at layer {layer}",
                dtype=attn.W_O.dtype, fix="split each layer's attention as one write (heads=False)",
            )  # fmt: skip
            w_o = attn.W_O.detach().double().cpu()  # [heads, d_head, d_model]
            per_head = einsum(z, w_o, "n h k, h k d -> n h d")
            for h in range(per_head.shape[1]):
                add(f"L{layer}H{h}", "head", layer, h, per_head[:, h])
            bias = getattr(attn, "b_O", None)
            if bias is not None and bool(bias.detach().abs().max() > 0):  # Llama's are zeros
                add(f"L{layer} attn_bias", "attn_bias", layer, -1, attn_out - per_head.sum(1))
        else:
            add(f"L{layer} attn", "attn", layer, -1, attn_out)
        add(f"L{layer} mlp", "mlp", layer, -1, acts[f"mlp{layer}"])
    return labels, kinds, layer_of, head_of, rearrange(vectors, "c n d -> n c d")


def _check_sum(
    writes: Float[Tensor, "n components d_model"],
    final: Float[Tensor, "n d_model"],
    dtype: torch.dtype,
    name: str,
) -> None:
    """Refuse a residual stream that is not the sum of the captured writes.

    Each write is rounded to the model's dtype and the stream adds them in that dtype, so the sum
    may differ from the captured output by a few roundings per write; a missing or rescaled write
    (a norm after a sub-layer) differs by the size of a write.
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 1e-7
    gap = (writes.sum(1) - final).abs().amax(-1)
    scale = writes.abs().sum(1).amax(-1) + final.abs().amax(-1)
    if bool((gap > 8 * eps * writes.shape[1] * scale + 1e-6).any()):
        raise ValueError(
            f"{name}'s last residual stream is not the sum of its embedding and its attention and "
            f"MLP outputs (off by up to {float(gap.max()):.3g}; a norm after a sub-layer, as in "
            "Gemma 2, rescales the writes), so it has no exact direct logit attribution."
        )


def _frozen_final_norm(model: Any, x: Float[Tensor, "n d_model"]) -> tuple[Any, Tensor]:
    """The final norm as an affine map with its scale frozen at ``x``: ``(linear, constant)``,
    ``norm(x) = linear(x) + constant``, checked against the model's own norm at ``x``."""
    adapter = model_adapter(model)
    kind = str(getattr(model.cfg, "normalization_type", None))
    module = getattr(model, "ln_final", None)
    if kind == "None" or module is None:
        return (lambda c: c), torch.zeros(x.shape[-1], dtype=x.dtype)
    if kind not in ("LN", "LNPre", "RMS", "RMSPre"):
        raise ValueError(
            f"{adapter.name}'s final norm is {kind!r}, neither a LayerNorm nor an RMSNorm: no "
            "frozen-scale split of its logits is known."
        )
    center = kind.startswith("LN")
    centred = x - x.mean(-1, keepdim=True) if center else x
    scale = (centred.pow(2).mean(-1, keepdim=True) + float(model.cfg.eps)).sqrt()  # [n, 1]
    stored, bias = _norm_parameters(module, x.shape[-1])

    def linear_with(weight: Tensor) -> Callable[[Tensor], Tensor]:
        def linear(c: Tensor) -> Tensor:  # c [n, ..., d_model]
            c = c - c.mean(-1, keepdim=True) if center else c
            return c / scale.reshape(-1, *([1] * (c.ndim - 1))) * weight

        return linear

    with torch.no_grad():
        own = adapter.final_norm(x.to(adapter.device, adapter.dtype)).double().cpu()
    # At least float32's rounding: norms upcast to float32 inside (Hugging Face's RMSNorm does, so
    # a float64 model's own norm is float32-accurate and was refused, off by 1.4e-7).
    eps = max(torch.finfo(adapter.dtype).eps, torch.finfo(torch.float32).eps)
    tolerance = 64 * eps * (float(own.abs().max()) + 1.0)
    # Gemma (1 and 2) stores its RMSNorm weight as an offset from one: it scales by 1 + w. Both
    # readings are tried and the nearer kept: in bfloat16 the tolerance let w pass for 1 + w.
    offs = {}
    for shift in (0.0, 1.0):
        offs[shift] = float((own - (linear_with(stored + shift)(x) + bias)).abs().max())
    best = min(offs, key=offs.__getitem__)
    if offs[best] > tolerance:
        raise ValueError(
            f"{adapter.name}'s final norm ({type(module).__name__}) does not compute "
            "w * (x - mean) / std + b, w * x / rms(x) or (1 + w) * x / rms(x) (off by "
            f"{offs[best]:.3g}): no frozen-scale split of its logits is known."
        )
    return linear_with(stored + best), bias


def _norm_parameters(module: Any, d_model: int) -> tuple[Tensor, Tensor]:
    """The norm's weight and bias (ones and zeros where it has none, as with folded norms)."""
    weight, bias = (
        torch.ones(d_model, dtype=torch.float64),
        torch.zeros(d_model, dtype=torch.float64),
    )
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("w", "weight"):
            weight = param.detach().double().cpu()
        elif leaf in ("b", "bias"):
            bias = param.detach().double().cpu()
    return weight, bias
