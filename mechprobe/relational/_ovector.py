"""o-vectors: the FFN update that applies a relation (``Poland + o = Warsaw``), and its controls.

Merullo et al. take o as the FFN output (``mlp_out``) at the function-application layer at the last
token of one prompt. :func:`extract_ovector` does that for one prompt or averages over many (what
reviewers asked for), optionally over correctly answered items only; :func:`fit_ovector` averages
the ``mlp_out`` rows that one :func:`mechprobe.task_pass` already captured, over a split of the
items, without running the model again. :func:`random_ovector` draws a random direction with the
same norm, and :func:`ovector_controls` makes every control an o-vector is reported beside.

An :class:`OVector` follows the result protocol; ``save`` writes ``.safetensors`` (the vector in
its own dtype, readable by any safetensors tool, with the metadata and format tag in the header),
``.json`` or ``.npz``; never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechprobe.core import (
    Batch,
    Result,
    Site,
    check_finite,
    check_int,
    check_seed,
    control_seed,
    evaluates,
    first_token_ids,
    literal,
    model_adapter,
    readout,
    resolve_site,
    run,
    token_label,
    tokenize,
    top1_hit,
    warn,
)
from mechprobe.relational._figure import axes_for
from mechprobe.relational._pass import TaskPass
from mechprobe.tasks import Task, as_task, list_tasks

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["OVector", "extract_ovector", "fit_ovector", "ovector_controls", "random_ovector"]

#: The header tag of o-vector files written before the result protocol (read, never written).
_OLD_FORMAT = "mechprobe.relational._ovector/1"


class NoneCorrect(ValueError):
    """``only_correct=True`` and the model answers none of the task's items correctly."""


@dataclass(frozen=True, eq=False, repr=False)
class OVector(Result, format="mechprobe.OVector", version=2):
    """An FFN-output vector and where it came from.

    Attributes:
        vector: ``[d_model]`` the (mean) ``mlp_out`` at the last token.
        layer: The layer it was read at.
        source: What it came from: a task name, ``"random"``, or a description.
        n_prompts: How many prompts were averaged.
        model: The model's name (``model.cfg.model_name``), to catch mixing models.
        info: Extra JSON-able metadata (e.g. the seed of a random control).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before o-vectors recorded it).

    Raises:
        ValueError: ``vector`` is not a 1-D tensor, or holds NaN or infinity.

    Example:
        >>> import torch, tempfile, os
        >>> o = OVector(torch.ones(4), layer=2, source="toy", n_prompts=1)
        >>> path = o.save(os.path.join(tempfile.mkdtemp(), "o.safetensors"))
        >>> OVector.load(path).layer, float(OVector.load(path).norm)
        (2, 2.0)
        >>> o
        OVector(toy at layer 2: d_model 4, norm 2, 1 prompt(s))
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    source: str
    n_prompts: int
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    model_dtype: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.vector, Tensor) or self.vector.ndim != 1:
            raise ValueError(
                "OVector.vector must be a 1-D torch tensor [d_model]; take one row of mlp_out."
            )
        check_finite(self.vector, "OVector.vector")

    @property
    def model_name(self) -> str:
        """The model's name, as every other result calls it (the field is :attr:`model`)."""
        return self.model

    @property
    def norm(self) -> float:
        """Euclidean norm of the vector."""
        return float(self.vector.float().norm())

    def to_frame(self) -> pd.DataFrame:
        """One row per dimension: ``dim`` and the vector's ``coordinate`` there (``value`` in
        frames is a metric measured with an edit in force)."""
        values = self.vector.detach().double().cpu().numpy()
        return pd.DataFrame({"dim": np.arange(values.size), "coordinate": values})

    def summary(self) -> pd.DataFrame:
        """One row: source, layer, n_prompts, d_model, norm, model_name."""
        return pd.DataFrame(
            {
                "source": [self.source],
                "layer": [self.layer],
                "n_prompts": [self.n_prompts],
                "d_model": [int(self.vector.shape[0])],
                "norm": [self.norm],
                "model_name": [self.model],
            }
        )

    def plot(self, ax: Axes | None = None, *, model: Any = None, k: int = 15) -> Figure:
        """With ``model``, the ``k`` tokens the vector promotes most, read through the model's
        final norm and unembedding (what o means: Merullo et al.'s check); without, its
        components by dimension (into ``ax`` when given).

        Args:
            ax: Axes to draw into (None: a new figure).
            model: The model whose final norm and unembedding read the vector (None: plot its
                components instead).
            k: How many promoted tokens to show.

        Returns:
            The Figure.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> o = mp.extract_ovector(model, ["Hi there"], 1)
            >>> len(o.plot(model=model, k=5).axes[0].patches)
            5
        """
        if model is None:
            fig, ax = axes_for(ax, (7, 2.8), "OVector.plot")
            values = self.vector.detach().float().cpu().numpy()
            ax.plot(np.arange(values.size), values, linewidth=0.6)
            ax.axhline(0, color="grey", linewidth=0.5)
            ax.set_xlabel("dimension (model= decodes the vector into tokens)")
            ax.set_ylabel("value")
            ax.set_title(
                literal(f"o-vector of {self.source}, layer {self.layer}, norm {self.norm:.3g}")
            )
            return fig
        check_int(k, "k", 1)
        vector = self.vector.detach().to(model.W_U.device, model.W_U.dtype)
        if vector.shape[-1] != model.cfg.d_model:
            raise ValueError(
                f"The o-vector has width {vector.shape[-1]}, the model d_model "
                f"{model.cfg.d_model}: pass the model it was extracted from ({self.model!r})."
            )
        with torch.no_grad():
            logits = readout(model, vector[None])[0].float().cpu()
        top = torch.topk(logits, min(k, logits.numel()))
        adapter = model_adapter(model)
        labels = [literal(token_label(adapter.token_text(int(i)), 16)) for i in top.indices]
        fig, ax = axes_for(ax, (5, 0.25 * len(labels) + 1.5), "OVector.plot")
        ax.barh(np.arange(len(labels))[::-1], top.values.numpy(), color="tab:green")
        ax.set_yticks(np.arange(len(labels))[::-1], labels, fontsize=8)
        ax.set_xlabel("logit through the final norm and unembedding")
        ax.set_title(literal(f"tokens o promotes: {self.source}, layer {self.layer}"), fontsize=9)
        return fig

    def _describe(self) -> str:
        return (
            f"{self.source} at layer {self.layer}: d_model {int(self.vector.shape[0])}, norm "
            f"{self.norm:.3g}, {self.n_prompts} prompt(s)"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OVector:
        """Read a file written by :meth:`save` (``.safetensors``, ``.json`` or ``.npz``), or an
        ``.safetensors`` o-vector file of the previous release.

        Args:
            path: The file.

        Returns:
            The :class:`OVector`, as saved.

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not an o-vector file written by mechprobe, changed since it was saved, or
                one from a newer release.
        """
        path = Path(path).expanduser()
        old = _old_release_file(path) if path.suffix == ".safetensors" else None
        return old if old is not None else super().load(path)


def _old_release_file(path: Path) -> OVector | None:
    """The o-vector in a safetensors file of the previous release (its own header, no digests);
    None for any other file, which the result protocol's reader then checks."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            if meta.get("format") != _OLD_FORMAT or "vector" not in handle.keys():  # noqa: SIM118
                return None
            vector = handle.get_tensor("vector")
    except (SafetensorError, OSError, ValueError):
        return None
    return OVector(
        vector=vector,
        layer=int(meta["layer"]),
        source=meta["source"],
        n_prompts=int(meta["n_prompts"]),
        model=meta.get("model", ""),
        info=json.loads(meta.get("info", "{}")),
    )


def _model_name(model: Any) -> str:
    return str(getattr(model.cfg, "model_name", ""))


@evaluates
def extract_ovector(
    model: Any,
    prompts: str | Sequence[str] | Task,
    layer: int,
    *,
    only_correct: bool = False,
    batch_size: int | None = 32,
    progress: bool = True,
) -> OVector:
    """The FFN output at ``layer`` at the last token, of one prompt or averaged over several.

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts, or a :class:`Task` (its items' prompts; load
            a built-in task with :func:`mechprobe.load_task`).
        layer: The layer whose ``mlp_out`` is read (negative counts from the end).
        only_correct: Average only the items the model answers correctly (greedy first token);
            needs a task. Off by default because plain prompts carry no answer to check;
            :func:`fit_ovector`, which always has a task's answers, keeps correct items by
            default. Merullo et al.'s released code reads o from one prompt (their demo's
            Poland prompt); averaging is mechprobe's default, less tied to one prompt.
        batch_size: Rows per forward pass.
        progress: Show a progress bar (``MECHPROBE_PROGRESS=0`` silences every bar).

    Returns:
        An :class:`OVector`: ``vector`` ``[d_model]`` (the mean FFN output), ``layer``,
        ``n_prompts`` averaged and where it came from.

    Raises:
        ValueError: ``only_correct`` without a task, or no item answered correctly.

    Example:
        >>> import mechprobe as mp
        >>> o = mp.extract_ovector(mp.tiny_model(), ["Q: capital of Poland?\\nA:"], layer=1)
        >>> tuple(o.vector.shape), o.n_prompts
        ((64,), 1)
    """
    task: Task | None = None
    if isinstance(prompts, Task):
        task = prompts
        texts, source = task.prompts(), task.name
    elif isinstance(prompts, str):
        if prompts in list_tasks():
            warn(
                f"extract_ovector read {prompts!r} as the text of one prompt; for the task of "
                f"that name pass mp.load_task({prompts!r}).",
                UserWarning,
            )
        texts, source = [prompts], "prompt"
    elif isinstance(prompts, Batch):  # iterating one said "'Batch' object is not iterable"
        raise TypeError(
            "extract_ovector takes prompt strings or a Task, not a Batch of token ids: pass the "
            "texts themselves."
        )
    else:
        texts, source = list(prompts), "prompts"
    if only_correct and task is None:
        raise ValueError(
            "only_correct=True needs a Task (to know the answers); pass mp.load_task(...)."
        )
    _, site = resolve_site(model, Site("mlp_out", layer))
    assert site is not None
    capture = Site("mlp_out", site.layer, positions=-1)
    batch = tokenize(model, texts)
    out = run(
        model,
        batch,
        capture=[capture],
        logit_positions=-1,
        batch_size=batch_size,
        progress=progress,
    )
    acts = out[capture][:, 0]  # [n, d_model]
    keep = np.ones(len(texts), dtype=bool)
    if only_correct:
        assert task is not None
        first = torch.as_tensor(first_token_ids(model, task.answers()))
        logits = out.logits[:, 0]
        check_finite(logits, f"The model's logit tensor on {task.name!r}")
        keep = top1_hit(logits, first).cpu().numpy()
        if not keep.any():
            raise NoneCorrect(
                f"The model answers none of the {len(texts)} items of {task.name!r} correctly; "
                "use only_correct=False, more shots, or another layer's task."
            )
    vector = acts[torch.as_tensor(keep)].mean(0)
    return OVector(
        vector=vector,
        layer=site.layer,
        source=source,
        n_prompts=int(keep.sum()),
        model=_model_name(model),
        info={"only_correct": only_correct},
        model_dtype=model_adapter(model).dtype_name,
    )


def fit_ovector(
    task_pass: TaskPass,
    layer: int,
    *,
    items: Bool[np.ndarray, " item"] | Sequence[int] | Int[np.ndarray, " n"] | None = None,
    only_correct: bool = True,
    max_prompts: int | None = None,
) -> OVector:
    """The mean ``mlp_out`` at ``layer`` over some of a task pass's items (no forward pass).

    Args:
        task_pass: What :func:`mechprobe.task_pass` captured (the FFN outputs at each prompt's
            last token, every layer).
        layer: The layer whose ``mlp_out`` is averaged (negative counts from the end).
        items: The items to fit on: a boolean mask over the items or item indices (e.g. the fit
            half of a split); None: every item.
        only_correct: Keep only the items the model answers correctly (greedy first token).
        max_prompts: Average at most this many of them (the first ones in item order; 1 is
            Merullo et al.'s one-prompt o-vector, what their released code reads); None: all
            (mechprobe's default: an average over every kept item, less tied to one prompt).

    Returns:
        An :class:`OVector`: ``vector`` ``[d_model]`` (the mean ``mlp_out`` of the kept items),
        ``layer`` and ``n_prompts``.

    Raises:
        ValueError: No item left to average (none given, or none of them correct), or a layer out
            of range.

    Example:
        >>> import mechprobe as mp
        >>> tp = mp.task_pass(mp.tiny_model(), mp.load_task("capitals").subset(6))
        >>> o = mp.fit_ovector(tp, 1, items=[0, 2, 4], only_correct=False, max_prompts=2)
        >>> o.n_prompts, o.info["items"] == [tp.task.items[0].input, tp.task.items[2].input]
        (2, True)
    """
    if not isinstance(task_pass, TaskPass):
        raise TypeError(
            f"fit_ovector takes mp.task_pass(model, task), got {type(task_pass).__name__}; for "
            "prompts or a Task, mp.extract_ovector(model, task, layer) reads them itself."
        )
    n_items, n_layers = len(task_pass), int(task_pass.mlp_out.shape[1])
    at = check_int(layer, "layer", -n_layers, n_layers - 1) % n_layers
    mask = np.zeros(n_items, dtype=bool)
    if items is None:
        mask[:] = True
    else:
        chosen = np.asarray(items)
        if chosen.dtype == bool:
            if chosen.shape != (n_items,):
                raise ValueError(
                    f"items is a mask of {chosen.shape}; the task pass has {n_items} items."
                )
            mask = chosen.copy()
        else:
            index = [check_int(i, "items", -n_items, n_items - 1) for i in chosen.ravel()]
            if len({i % n_items for i in index}) != len(index):
                raise ValueError(
                    f"items repeat an item ({chosen.ravel().tolist()[:8]}...): pass each index "
                    "once, or a boolean mask (a 0/1 integer array is read as indices)."
                )
            mask[index] = True
    if only_correct:
        mask &= task_pass.score.correct
    fit = np.flatnonzero(mask)
    if fit.size == 0:
        raise ValueError(
            f"No item of {task_pass.task.name!r} to average"
            + (" among those answered correctly" if only_correct else "")
            + "; pass more items"
            + (", or only_correct=False." if only_correct else ".")
        )
    if max_prompts is not None:
        fit = fit[: check_int(max_prompts, "max_prompts", 1)]
    return OVector(
        vector=task_pass.mlp_out[torch.as_tensor(fit), at].mean(0),
        layer=at,
        source=task_pass.task.name,
        n_prompts=int(fit.size),
        model=task_pass.model,
        model_dtype=task_pass.model_dtype,
        info={
            "items": [task_pass.task.items[int(i)].input for i in fit],
            "only_correct": only_correct,
        },
    )


def random_ovector(like: OVector, *, seed: int = 0) -> OVector:
    """A random direction (isotropic Gaussian) with the same norm and layer as ``like``.

    Args:
        like: The o-vector whose norm, layer, width, dtype and device the control keeps.
        seed: Seed of the direction (drawn on the CPU: the same on every device).

    Returns:
        An :class:`OVector` with ``source="random"`` and ``info`` ``{"seed", "like"}``.

    Example:
        >>> import torch
        >>> o = OVector(torch.tensor([3.0, 4.0]), layer=1, source="toy", n_prompts=1)
        >>> r = random_ovector(o, seed=0)
        >>> round(r.norm, 4), r.source
        (5.0, 'random')
    """
    if not isinstance(like, OVector):
        raise TypeError(
            f"random_ovector takes an OVector (its norm, layer and width are kept), got "
            f"{type(like).__name__}; wrap a vector as mp.OVector(vector, layer=..., "
            "source=..., n_prompts=...)."
        )
    seed = check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    direction = torch.randn(like.vector.shape, generator=gen, dtype=torch.float64)
    # Drawn on the CPU, so a seed gives the same control on every device.
    vector = direction / direction.norm() * float(like.vector.double().norm())
    return replace(
        like,
        vector=vector.to(like.vector.device, like.vector.dtype),
        source="random",
        info={"seed": seed, "like": like.source},
    )


@evaluates
def ovector_controls(
    model: Any,
    ovector: OVector,
    *,
    n_random: int = 3,
    other_task: Task | str | os.PathLike[str] | None = None,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
) -> dict[str, OVector]:
    """The controls an o-vector is reported beside: random directions and another task's o.

    Args:
        model: The model ``ovector`` was read from.
        ovector: The o-vector.
        n_random: Random directions with its norm, ``random_0 .. random_{n-1}`` (seeds
            ``seed, seed + 1, ...``, modulo ``2**32``).
        other_task: A task (a Task, a built-in name or a file) whose o-vector, read at the same layer and averaged over its correctly
            answered items (all of them when none is correct; its ``info["only_correct"]`` then
            says False), is the ``other_task`` control. None: no such control.
        seed: Seed of the first random direction.
        batch_size: Rows per forward pass.
        progress: Show a progress bar (``MECHPROBE_PROGRESS=0`` silences every bar).

    Returns:
        ``{"random_0": ..., ..., "other_task": ...}``, in that order.

    Example:
        >>> import torch, mechprobe as mp
        >>> o = mp.OVector(torch.ones(64), layer=1, source="toy", n_prompts=1)
        >>> sorted(mp.ovector_controls(mp.tiny_model(), o, n_random=2))
        ['random_0', 'random_1']
    """
    n_random = check_int(n_random, "n_random", 0)
    seed = check_seed(seed)
    vectors = {
        f"random_{k}": random_ovector(ovector, seed=control_seed(seed, k)) for k in range(n_random)
    }
    if other_task is not None:
        # A name is the task of that name (it was read as the text of one prompt).
        other = as_task(other_task)
        try:
            vectors["other_task"] = extract_ovector(
                model,
                other,
                ovector.layer,
                only_correct=True,
                batch_size=batch_size,
                progress=progress,
            )
        except NoneCorrect:  # no item of the other task is answered correctly: all of them
            vectors["other_task"] = extract_ovector(
                model, other, ovector.layer, batch_size=batch_size, progress=progress
            )
    return vectors
