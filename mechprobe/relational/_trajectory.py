"""Early-decoding trajectories of a relational task: Merullo et al.'s "X" and its three stages.

At every layer ``l`` the residual stream after the block at the prompt's last token,
``resid_post[l]``, is read through a lens (by default the logit lens: the model's final norm and
unembedding; ``lens=`` takes a :class:`~mechprobe.lens.TunedLens` or a
:class:`~mechprobe.lens.Patchscope` too), and the
ranks of the argument's first token (``" Poland"``) and the answer's first token (``" Warsaw"``)
are kept. Averaging their reciprocal ranks over the correctly answered items draws the X: the
argument rises, then the answer overtakes it. The same readout of ``resid_post[l] - mlp_out[l]``
(the stream with layer ``l``'s FFN update removed, i.e. ``resid_mid[l]``, which a tuned lens
reads with its ``resid_mid`` translator) says whether that update is what turned the
argument into the answer (FFN attribution). A Patchscope places that vector where layer ``l``'s
output goes (``resid_post``) in its target prompt: placed at ``resid_mid``, the target's own FFN
would add the removed update back.

Stage rules (:meth:`Trajectory.stages`), on the mean reciprocal-rank curves ``A[l]`` (argument)
and ``B[l]`` (answer) of the items answered correctly whose argument and answer start with
different tokens. A token is *visible* at a layer when its mean reciprocal rank is at least
``visible`` (default 0.05, a mean rank of about 20 or better); below that, which curve is ahead is
noise among ranks in the thousands and decides nothing.

- function-application layer ``f``: the first layer from which the answer stays ahead, i.e. the
  smallest ``l`` with ``B[m] > A[m]`` for every ``m >= l``, at which the answer is visible
  (``B[l] >= visible``) -- the last crossing of the X;
- argument-formation layer: the layer before ``f`` where ``A`` peaks (the earliest on ties), if
  the argument is visible there; otherwise None (no argument stage);
- saturation layer: the first ``l >= f`` with ``B[l] >= saturation * B[-1]`` (default 0.9).

Ranks are 0-based (rank 0 is the top token); the reciprocal rank is ``1 / (rank + 1)``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechprobe.core import (
    Result,
    check_finite,
    check_int,
    evaluates,
    first_token_ids,
    literal,
    model_adapter,
    readout,
    target_rank,
)
from mechprobe.lens import Lens, LensSpec, as_lens
from mechprobe.relational._figure import axes_for
from mechprobe.relational._scoring import TaskScore, _forced_pass
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Stages", "Trajectory", "ffn_attribution", "trajectory"]


@dataclass(frozen=True)
class Stages:
    """The three stages' layers read off a trajectory (None where a rule finds no layer).

    A small value, not a result: its repr is the three layers, ``-`` where a rule found none.

    Attributes:
        argument_layer: The argument-formation layer: where the argument's curve peaks before
            the function-application layer (None: the argument is visible at no such layer).
        function_layer: The function-application layer: the first from which the answer stays
            ahead of the argument, where the answer is visible (the X's last crossing).
        saturation_layer: The first layer from the function layer on where the answer's curve
            reaches ``saturation`` of its last value.

    Example:
        >>> Stages(argument_layer=15, function_layer=19, saturation_layer=21).function_layer
        19
        >>> Stages(None, 24, 29)
        Stages(argument -, function 24, saturation 29)
    """

    argument_layer: int | None
    function_layer: int | None
    saturation_layer: int | None

    def __repr__(self) -> str:
        def say(layer: int | None) -> str:
            return "-" if layer is None else str(layer)

        return (
            f"Stages(argument {say(self.argument_layer)}, function {say(self.function_layer)}, "
            f"saturation {say(self.saturation_layer)})"
        )


@dataclass(frozen=True, eq=False, repr=False)
class Trajectory(Result, format="mechprobe.Trajectory", version=2, html_figure=True):
    """Per-item, per-layer lens ranks of the argument and the answer at the prompt's last token.

    Attributes:
        task: Task name.
        arguments: The items' arguments (leading space included).
        answers: The items' answers (leading space included).
        argument_rank: ``[item, layer]`` rank of the argument's first token in ``resid_post[l]``.
        answer_rank: ``[item, layer]`` rank of the answer's first token in ``resid_post[l]``.
        argument_rank_no_ffn: ``[item, layer]`` the same in ``resid_post[l] - mlp_out[l]``.
        answer_rank_no_ffn: ``[item, layer]`` the same in ``resid_post[l] - mlp_out[l]``.
        correct: ``[item]`` the model's greedy first token is the answer's (alone: a tie for
            first is a miss).
        distinct: ``[item]`` argument and answer start with different tokens (else the X is
            undefined for that item).
        lens: The lens that decoded the ranks (``"logit"``, or a tuned lens's or a Patchscope's
            description).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> traj = mp.trajectory(mp.tiny_model(), mp.load_task("capitals").subset(4))
        >>> traj.argument_rank.shape
        (4, 3)
        >>> traj
        Trajectory(capitals: 4 items x 3 layers, 0 correct, Stages(argument -, function -, saturation -))
    """

    task: str
    arguments: tuple[str, ...]
    answers: tuple[str, ...]
    argument_rank: Int[np.ndarray, "item layer"]
    answer_rank: Int[np.ndarray, "item layer"]
    argument_rank_no_ffn: Int[np.ndarray, "item layer"]
    answer_rank_no_ffn: Int[np.ndarray, "item layer"]
    correct: Bool[np.ndarray, " item"]
    distinct: Bool[np.ndarray, " item"]
    lens: str = "logit"
    model_name: str = ""
    model_dtype: str = ""

    @property
    def n_layers(self) -> int:
        return int(self.argument_rank.shape[1])

    def select(self, items: Bool[np.ndarray, " item"] | Sequence[int]) -> Trajectory:
        """The trajectory of some items only (a mask or indices), e.g. a fitting split, so that
        stages read off it have not seen the other items.

        Args:
            items: A boolean mask over the items, or item indices (negative count from the end).

        Returns:
            A new :class:`Trajectory` of those items, in the order given.

        Raises:
            ValueError: A mask of the wrong length, no item, or an index out of range.
            TypeError: Indices that are not integers.

        Example:
            >>> import mechprobe as mp, numpy as np
            >>> traj = mp.trajectory(mp.tiny_model(), mp.load_task("capitals").subset(4))
            >>> traj.select(np.array([True, False, True, False])).argument_rank.shape
            (2, 3)
        """
        index = np.asarray(items)
        if index.dtype == bool:
            if index.shape != self.correct.shape:
                raise ValueError(
                    f"A mask of {index.shape[0]} items for a trajectory of {len(self.correct)}."
                )
            index = np.flatnonzero(index)
        elif index.size and not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"items are a bool mask or item indices, got {items!r}.")
        index = index.astype(np.int64).reshape(-1)
        if index.size == 0:
            raise ValueError("No item selected: pass at least one item.")
        n = len(self.correct)
        if ((index < -n) | (index >= n)).any():
            raise ValueError(f"items must be between {-n} and {n - 1}, got {index.tolist()}.")
        return dataclasses.replace(
            self,
            arguments=tuple(self.arguments[i] for i in index),
            answers=tuple(self.answers[i] for i in index),
            argument_rank=self.argument_rank[index],
            answer_rank=self.answer_rank[index],
            argument_rank_no_ffn=self.argument_rank_no_ffn[index],
            answer_rank_no_ffn=self.answer_rank_no_ffn[index],
            correct=self.correct[index],
            distinct=self.distinct[index],
        )

    @property
    def included(self) -> Bool[np.ndarray, " item"]:
        """Items averaged into the curves: correct with distinct tokens, else all correct ones."""
        both = self.correct & self.distinct
        return both if both.any() else self.correct

    def argument_rr(self) -> Float[np.ndarray, " layer"]:
        """Mean reciprocal rank of the argument per layer over :attr:`included` items."""
        return _mean_rr(self.argument_rank, self.included)

    def answer_rr(self) -> Float[np.ndarray, " layer"]:
        """Mean reciprocal rank of the answer per layer over :attr:`included` items."""
        return _mean_rr(self.answer_rank, self.included)

    def stages(self, saturation: float = 0.9, visible: float = 0.05) -> Stages:
        """Argument-formation, function-application and saturation layers (module docstring).

        All three are None when no correctly answered item has distinct argument and answer
        tokens (e.g. a copying task whose argument is its answer), or when the answer does not
        end ahead of the argument, or is visible at no layer of its final lead (it need not
        be visible at the last layer: through the logit lens a correct answer ends at 1.0, through
        other lenses it may end lower).

        Args:
            saturation: The fraction of the answer's last value that marks saturation, in
                ``(0, 1]``.
            visible: The mean reciprocal rank from which a token counts as visible, in ``[0, 1]``.

        Returns:
            The :class:`Stages`.

        Raises:
            ValueError: ``saturation`` or ``visible`` out of range.
        """
        if not 0.0 < saturation <= 1.0:
            raise ValueError(f"saturation is a fraction in (0, 1], got {saturation!r}.")
        if not 0.0 <= visible <= 1.0:
            raise ValueError(f"visible is a reciprocal rank in [0, 1], got {visible!r}.")
        if not (self.correct & self.distinct).any():
            return Stages(None, None, None)
        a, b = self.argument_rr(), self.answer_rr()
        ahead = b > a
        behind = np.flatnonzero(~ahead)
        start = int(behind[-1]) + 1 if behind.size else 0
        shown = np.flatnonzero(b[start:] >= visible)
        if not shown.size:
            return Stages(None, None, None)
        f = start + int(shown[0])
        peak = int(np.argmax(a[:f])) if f > 0 else None
        arg = peak if peak is not None and a[peak] >= visible else None
        reached = np.flatnonzero(b[f:] >= saturation * b[-1])
        sat = f + int(reached[0]) if reached.size else None
        return Stages(arg, f, sat)

    def ffn_attribution(self, layer: int) -> dict[str, float]:
        """At ``layer``, how often removing that layer's FFN update brings the argument back.

        Returns a dict over the correctly answered items whose argument and answer tokens differ
        (where they share a token, the argument cannot rank apart from the answer; unlike
        :attr:`included`, there is no fallback to all correct items, so with none every rate is
        NaN and ``n`` is 0): ``argument_top1_after_removal`` (the argument is the top token of
        ``resid_post - mlp_out``), ``argument_above_answer_after_removal``, the same two for
        ``resid_post`` itself (``..._before_removal``), and ``n``.

        Args:
            layer: The layer whose FFN update is removed (negative counts from the end).

        Returns:
            ``{name: rate}`` of the four rates above (floats), and ``"n"`` (an int).

        Example:
            >>> import mechprobe as mp
            >>> traj = mp.trajectory(mp.tiny_model(), mp.load_task("capitals").subset(4))
            >>> sorted(traj.ffn_attribution(1))[0]
            'argument_above_answer_after_removal'
        """
        layer = check_int(layer, "layer", -self.n_layers, self.n_layers - 1)
        m = self.correct & self.distinct
        arg, ans = self.argument_rank[m, layer], self.answer_rank[m, layer]
        arg0, ans0 = self.argument_rank_no_ffn[m, layer], self.answer_rank_no_ffn[m, layer]
        n = int(m.sum())
        rate = lambda x: float(np.mean(x)) if n else float("nan")  # noqa: E731
        return {
            "argument_top1_after_removal": rate(arg0 == 0),
            "argument_above_answer_after_removal": rate(arg0 < ans0),
            "argument_top1_before_removal": rate(arg == 0),
            "argument_above_answer_before_removal": rate(arg < ans),
            "n": n,
        }

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows: item, layer, role (whose rank: the ``argument`` or the ``answer``; ``token``
        in frames is a token's text), readout (resid_post / without FFN), rank, rr, correct,
        distinct, lens."""
        n, layers = self.argument_rank.shape
        frames = []
        for token, decoded, ranks in [
            ("argument", "resid_post", self.argument_rank),
            ("answer", "resid_post", self.answer_rank),
            ("argument", "resid_post - mlp_out", self.argument_rank_no_ffn),
            ("answer", "resid_post - mlp_out", self.answer_rank_no_ffn),
        ]:
            frames.append(
                pd.DataFrame(
                    {
                        "item": np.repeat(np.arange(n), layers),
                        "layer": np.tile(np.arange(layers), n),
                        "role": token,
                        "readout": decoded,
                        "rank": ranks.reshape(-1),
                        "rr": 1.0 / (ranks.reshape(-1) + 1.0),
                        "correct": np.repeat(self.correct, layers),
                        "distinct": np.repeat(self.distinct, layers),
                        "lens": self.lens,
                    }
                )
            )
        return pd.concat(frames, ignore_index=True)

    def summary(self) -> pd.DataFrame:
        """One row per layer: the mean reciprocal rank of argument and answer over the
        :attr:`included` items, in ``resid_post`` and in ``resid_post - mlp_out`` (the curves of the
        X plot)."""
        m = self.included
        return pd.DataFrame(
            {
                "layer": np.arange(self.n_layers),
                "argument_rr": self.argument_rr(),
                "answer_rr": self.answer_rr(),
                "argument_rr_no_ffn": _mean_rr(self.argument_rank_no_ffn, m),
                "answer_rr_no_ffn": _mean_rr(self.answer_rank_no_ffn, m),
            }
        )

    def plot(self, ax: Axes | None = None, *, stages: Stages | None = None) -> Figure:
        """The X plot: mean reciprocal rank of argument and answer per layer, stages marked (into
        ``ax`` when given; ``stages`` default to :meth:`stages`).

        Args:
            ax: Draw into these axes (default: a new figure).
            stages: The stages marked (None: :meth:`stages`).

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        fig, ax = axes_for(ax, (7, 3.8), "Trajectory.plot")
        stages = stages if stages is not None else self.stages()
        x = np.arange(self.n_layers)
        m = self.included
        ax.plot(x, self.argument_rr(), "o-", label="argument (resid_post)", color="tab:blue")
        ax.plot(x, self.answer_rr(), "o-", label="answer (resid_post)", color="tab:orange")
        ax.plot(x, _mean_rr(self.argument_rank_no_ffn, m), ":", color="tab:blue",
                label="argument (resid_post - mlp_out)")  # fmt: skip
        ax.plot(x, _mean_rr(self.answer_rank_no_ffn, m), ":", color="tab:orange",
                label="answer (resid_post - mlp_out)")  # fmt: skip
        marks: dict[int, list[str]] = {}
        for layer, name, style in [
            (stages.argument_layer, "argument", "--"),
            (stages.function_layer, "function", "-"),
            (stages.saturation_layer, "saturation", "-."),
        ]:
            if layer is not None:
                ax.axvline(layer, color="grey", linestyle=style, linewidth=1)
                marks.setdefault(layer, []).append(name)
        for layer, names in marks.items():  # one label per layer, stages sharing it joined
            # Inside the axes: above them, a long label pushed the title up across white space.
            ax.text(
                layer, 0.97, " = ".join(names), rotation=90, va="top", ha="right", fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
            )  # fmt: skip
        ax.set_xlabel("layer (resid_post, last prompt token)")
        ax.set_ylabel("mean reciprocal rank")
        ax.set_ylim(0, 1.0)
        through = "" if self.lens == "logit" else f" ({self.lens.split(' ')[0]} lens)"
        ax.set_title(
            literal(f"{self.task}: early decoding{through} over {int(m.sum())} correct items")
        )
        # Below the axes: inside, it covered the early layers' stage labels and curves.
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False
        )
        return fig

    def _describe(self) -> str:
        n, layers = self.argument_rank.shape
        through = "" if self.lens == "logit" else f", {self.lens.split(' ')[0]} lens"
        return (
            f"{self.task}: {n} items x {layers} layers, {int(self.correct.sum())} correct, "
            f"{self.stages()!r}{through}"
        )


def _mean_rr(ranks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return np.full(ranks.shape[1], np.nan)
    return np.asarray((1.0 / (ranks[mask] + 1.0)).mean(axis=0))


def _ranks(
    model: Any, x: Float[Tensor, "n layer d"], ids: Int[Tensor, "n t"], lens: Lens, kind: str
) -> Int[np.ndarray, "t n layer"]:
    """0-based ranks of tokens ``ids`` (one set per row) in each layer's readout of ``x``, read
    at ``kind`` through ``lens`` (the logit lens passes the vectors through untouched)."""
    n, layers, _ = x.shape
    out = np.zeros((ids.shape[1], n, layers), dtype=np.int64)
    with torch.no_grad():
        for layer in range(layers):  # one [n, vocab] readout at a time keeps memory flat
            logits = readout(model, lens.translate(model, kind, layer, x[:, layer]))
            # A NaN logit compares false with everything: it would count as rank 0.
            check_finite(logits, f"The lens's logit tensor at layer {layer}")
            target = logits.gather(-1, ids.to(logits.device))  # [n, t]
            out[:, :, layer] = target_rank(logits, target).T.cpu().numpy()  # ranks [n, t]
    return out


def check_lens(model: Any, lens: LensSpec) -> Lens:
    """The :class:`Lens` for ``lens=``, checked (before any forward pass) for the two readings a
    trajectory makes at every layer: ``resid_post`` and ``resid_post - mlp_out`` (``resid_mid``)."""
    decoder = as_lens(lens)
    n_layers = int(model.cfg.n_layers)
    try:
        decoder.check(model, [(k, i) for k in ("resid_post", "resid_mid") for i in range(n_layers)])
    except ValueError as err:
        if not (model_adapter(model).parallel_blocks and "no translator for resid_mid" in str(err)):
            raise
        # The lens's own advice (train a resid_mid translator) cannot be followed on this model.
        raise ValueError(
            "The trajectory reads resid_post - mlp_out (its no-FFN reading) with the lens's "
            "resid_mid translators, and this tuned lens has none: this model's attention and MLP "
            "run in parallel (cfg.parallel_attn_mlp), so it has no resid_mid to train them on. "
            "Read the trajectory with the logit lens (lens='logit') or a Patchscope."
        ) from err
    return decoder


def _from_pass(
    model: Any, task: Task, score: TaskScore, captures: dict[str, Tensor], lens: Lens
) -> Trajectory:
    """Build the trajectory from one teacher-forced pass's last-token captures."""
    arg_ids = first_token_ids(model, task.arguments())
    ans_ids = [ids[0] for ids in score.answer_ids]
    ids = torch.as_tensor(np.stack([arg_ids, ans_ids], axis=1), dtype=torch.long)
    post = captures["resid_post"]
    with_ffn = _ranks(model, post, ids, lens, "resid_post")
    # A lens that continues the forward pass (a Patchscope) would run layer l's FFN on a vector
    # placed at resid_mid and add the removed update back (exactly, at the same layer): it reads
    # the vector where the block's output goes instead.
    removed_at = "resid_post" if lens.continues_forward else "resid_mid"
    without = _ranks(model, post - captures["mlp_out"], ids, lens, removed_at)
    return Trajectory(
        task=task.name,
        arguments=tuple(task.arguments()),
        answers=tuple(task.answers()),
        argument_rank=with_ffn[0],
        answer_rank=with_ffn[1],
        argument_rank_no_ffn=without[0],
        answer_rank_no_ffn=without[1],
        correct=score.correct,
        distinct=np.asarray(arg_ids) != np.asarray(ans_ids),
        lens=lens.describe(),
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


@evaluates
def trajectory(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    lens: LensSpec = "logit",
    batch_size: int | None = 32,
    progress: bool = True,
) -> Trajectory:
    """Lens ranks of every item's argument and answer at every layer (one forward pass).

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file (its shots are all used).
        lens: ``"logit"`` (the model's final norm and unembedding), a
            :class:`~mechprobe.lens.TunedLens` (with ``resid_post`` and ``resid_mid``
            translators) or a :class:`~mechprobe.lens.Patchscope`.
        batch_size: Rows per forward pass.
        progress: Show a progress bar.

    Returns:
        A :class:`Trajectory`: ``argument_rank`` and ``answer_rank`` (and their ``_no_ffn``
        twins, FFN update removed) are ``[n_items, n_layers]`` 0-based ranks; ``correct`` and
        ``distinct`` are ``[n_items]``.

    Example:
        >>> import mechprobe as mp
        >>> traj = mp.trajectory(mp.tiny_model(), mp.load_task("capitals").subset(4))
        >>> traj.answer_rr().shape
        (3,)
    """
    task = as_task(task)
    decoder = check_lens(model, lens)
    forced = _forced_pass(
        model, task, kinds=("resid_post", "mlp_out"), batch_size=batch_size, progress=progress
    )
    return _from_pass(model, task, forced.score, forced.captures, decoder)


@evaluates
def ffn_attribution(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    layer: int | None = None,
    lens: LensSpec = "logit",
    batch_size: int | None = 32,
    progress: bool = True,
) -> dict[str, float | int | str | None]:
    """Does removing the FFN update at the function layer decode back to the argument?

    Runs :func:`trajectory` (through ``lens``) and returns :meth:`Trajectory.ffn_attribution` at ``layer`` (default:
    the function-application layer of :meth:`Trajectory.stages`), plus the ``layer`` used and
    the ``lens`` that decoded it (as :attr:`Trajectory.lens` records it).

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file (its shots are all used).
        layer: The layer whose FFN update is removed (None: the function-application layer of
            :meth:`Trajectory.stages`).
        lens: ``"logit"``, a :class:`~mechprobe.lens.TunedLens` or a
            :class:`~mechprobe.lens.Patchscope`, as for :func:`trajectory`.
        batch_size: Rows per forward pass.
        progress: Show a progress bar.

    Returns:
        ``{"layer": ..., <the four rates and "n" of Trajectory.ffn_attribution>, "lens": ...}``:
        the layer used, the rates over the correctly answered items with distinct argument and
        answer tokens (NaN where there are none, ``n`` 0), and the lens's description.

    Raises:
        ValueError: No layer given and no function-application layer found.

    Example:
        >>> import mechprobe as mp
        >>> out = mp.ffn_attribution(mp.tiny_model(), mp.load_task("capitals").subset(3), layer=1)
        >>> out["layer"], out["n"] >= 0
        (1, True)
    """
    traj = trajectory(model, task, lens=lens, batch_size=batch_size, progress=progress)
    if layer is None:
        layer = traj.stages().function_layer
        if layer is None:
            raise ValueError(
                f"No function-application layer was found for {traj.task!r} (no correctly "
                "answered item with distinct argument and answer tokens); pass layer=."
            )
    return {"layer": layer, **traj.ffn_attribution(layer), "lens": traj.lens}
