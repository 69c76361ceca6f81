"""A function vector added at every layer: :func:`function_vector_sweep` ->
:class:`FunctionVectorSweep`.

Todd et al.'s evaluation (``evaluate_function_vector.py``) adds the FV at each layer in turn,
to zero-shot prompts (does the vector make the model do the task?) and to few-shot prompts whose
demonstrations have shuffled labels (does it restore a task the prompt no longer shows?), and
reports the accuracy per layer: "a third of the way in" is what that sweep found for GPT-J, not a
rule (on SmolLM2, review 36a: antonyms 0.28 at layer 10, 0.45 at 12). The FV is fit once
(:func:`mechprobe.function_vector`); here only the held-out prompts run, once per layer and
vector, beside random vectors of the FV's norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from mechprobe.core import (
    Layers,
    Result,
    check_batch_size,
    check_int,
    check_seed,
    evaluates,
    first_token_ids,
    literal,
    model_adapter,
    new_axes,
    progress_bar,
    resolve_layers,
    warn,
)
from mechprobe.relational._function import (
    FunctionVectorResult,
    _accuracy,
    _random_vectors,
    _warn_copying_scores,
    _warn_shared_first_tokens,
    shuffled_prompts,
)
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FunctionVectorSweep", "function_vector_sweep"]

#: The conditions measured at each layer, in the order of :attr:`FunctionVectorSweep.accuracy`.
SWEEP_CONDITIONS = (
    "zero-shot + FV",
    "zero-shot + random vector",
    "shuffled + FV",
    "shuffled + random vector",
)
#: The prompts without a vector, once: what each condition's vector is measured against.
BASELINES = ("zero-shot", "shuffled", "few-shot")


@dataclass(frozen=True, eq=False, repr=False)
class FunctionVectorSweep(
    Result, format="mechprobe.FunctionVectorSweep", version=1, html_figure=True
):
    """A function vector's accuracy when added after each layer, beside random vectors of its
    norm, on zero-shot and shuffled-label few-shot prompts of held-out items.

    Attributes:
        task: The task the prompts are of.
        fv_task: The task the FV was fit on (another task's: the FV carried over).
        layers: The layers after which the vectors were added.
        conditions: :data:`SWEEP_CONDITIONS`, the rows of ``accuracy``.
        accuracy: ``[conditions, layers]`` top-1 accuracy on the answers' first tokens.
        correct: ``[conditions, layers, items]`` per held-out item (1.0 / 0.0; a random
            condition: the mean over its vectors).
        baseline: Accuracy without a vector on the ``"zero-shot"``, ``"shuffled"`` and
            ``"few-shot"`` prompts.
        baseline_correct: ``[baselines, items]`` per held-out item.
        norm: The FV's norm (each random vector's too).
        fv_layer: The layer :func:`mechprobe.function_vector` added it at.
        heads: The FV's heads ``(layer, head)``.
        items: The held-out items' inputs, the columns of ``correct``.
        n_random: Random vectors per layer (seeds ``seed, seed + 1, ...``).
        seed: Seed of the split, the label shuffles and the random vectors.
        model_name: The model's name, for the record.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
        >>> sweep = mp.function_vector_sweep(model, "capitals", fv, layers=[0, 2], progress=False)
        >>> sweep.accuracy.shape, sweep.layers
        ((4, 2), (0, 2))
    """

    task: str
    fv_task: str
    layers: tuple[int, ...]
    conditions: tuple[str, ...]
    accuracy: np.ndarray
    correct: np.ndarray
    baseline: dict[str, float]
    baseline_correct: np.ndarray
    norm: float
    fv_layer: int
    heads: tuple[tuple[int, int], ...]
    items: tuple[str, ...]
    n_random: int
    seed: int = 0
    model_name: str = ""
    model_dtype: str = ""

    def best_layer(self, condition: str = "zero-shot + FV") -> int:
        """The layer where ``condition`` is most accurate (the first of ties). Chosen on the
        items it is measured on: report its accuracy from another split.

        Args:
            condition: One of :attr:`conditions` (``"zero-shot + FV"``, ``"shuffled + FV"``...).

        Returns:
            The layer, one of :attr:`layers`.

        Raises:
            ValueError: ``condition`` is not one of the conditions.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
            >>> sweep = mp.function_vector_sweep(model, "capitals", fv, progress=False)
            >>> sweep.best_layer("shuffled + FV") in sweep.layers
            True
        """
        if condition not in self.conditions:
            raise ValueError(f"condition must be one of {self.conditions}, got {condition!r}.")
        row = self.accuracy[self.conditions.index(condition)]
        return self.layers[int(np.argmax(row))]

    def to_frame(self) -> pd.DataFrame:
        """One row per condition and layer: ``condition``, ``layer``, ``accuracy``, and
        ``baseline`` (the same prompts' accuracy without a vector).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
            >>> sweep = mp.function_vector_sweep(model, "capitals", fv, layers=[1], progress=False)
            >>> list(sweep.to_frame().columns), len(sweep.to_frame())
            (['condition', 'layer', 'accuracy', 'baseline'], 4)
        """
        rows = [
            {
                "condition": condition,
                "layer": layer,
                "accuracy": float(self.accuracy[c, k]),
                "baseline": self.baseline[_prompts_of(condition)],
            }
            for c, condition in enumerate(self.conditions)
            for k, layer in enumerate(self.layers)
        ]
        frame = pd.DataFrame(rows, columns=["condition", "layer", "accuracy", "baseline"])
        frame["layer"] = frame["layer"].astype("Int64")
        return frame

    def summary(self) -> pd.DataFrame:
        """Per condition: the best layer and its accuracy, the accuracy at the FV's own layer,
        and the prompts' accuracy without a vector.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
            >>> sweep = mp.function_vector_sweep(model, "capitals", fv, progress=False)
            >>> sweep.summary().columns.tolist()
            ['condition', 'best_layer', 'best_accuracy', 'fv_layer_accuracy', 'baseline']
        """
        rows = []
        for c, condition in enumerate(self.conditions):
            best = self.best_layer(condition)
            at_fv = (
                float(self.accuracy[c, self.layers.index(self.fv_layer)])
                if self.fv_layer in self.layers
                else float("nan")
            )
            rows.append(
                {
                    "condition": condition,
                    "best_layer": best,
                    "best_accuracy": float(self.accuracy[c, self.layers.index(best)]),
                    "fv_layer_accuracy": at_fv,
                    "baseline": self.baseline[_prompts_of(condition)],
                }
            )
        return pd.DataFrame(rows)

    def plot(self, ax: Axes | None = None) -> Figure:
        """Accuracy against the layer the vector is added after, one line per condition
        (random vectors dashed), the prompts' accuracy without a vector as horizontal lines.

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
            >>> sweep = mp.function_vector_sweep(model, "capitals", fv, progress=False)
            >>> len(sweep.plot().axes[0].lines)  # 4 conditions, 2 baselines, the FV's layer
            7
        """
        fig, ax = new_axes(ax, (6.5, 3.8))
        colours = {"zero-shot": "tab:blue", "shuffled": "tab:orange"}
        for c, condition in enumerate(self.conditions):
            prompts = _prompts_of(condition)
            random = "random" in condition
            ax.plot(
                self.layers,
                self.accuracy[c],
                "--" if random else "o-",
                color=colours[prompts],
                alpha=0.6 if random else 1.0,
                markersize=3,
                label=literal(condition),
            )
        for prompts, colour in colours.items():
            ax.axhline(self.baseline[prompts], color=colour, linestyle=":", linewidth=1)
        ax.axvline(self.fv_layer, color="grey", linewidth=0.8)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlabel("layer the vector is added after (grey: function_vector's)")
        ax.set_ylabel("top-1 accuracy (first answer token)")
        ax.legend(fontsize=7)
        fv = "" if self.fv_task == self.task else f" (FV of {self.fv_task})"
        ax.set_title(
            literal(f"{self.task}{fv}: {len(self.items)} held-out items; dotted: no vector"),
            fontsize=9,
        )
        return fig

    def _describe(self) -> str:
        parts = []
        for prompts in ("zero-shot", "shuffled"):
            condition = f"{prompts} + FV"
            best = self.best_layer(condition)
            value = self.accuracy[self.conditions.index(condition), self.layers.index(best)]
            parts.append(f"{prompts} {self.baseline[prompts]:.2f} -> {value:.2f} (layer {best})")
        return f"{self.task}: FV best {', '.join(parts)}; {len(self.layers)} layers"


def _prompts_of(condition: str) -> str:
    return condition.split(" + ")[0]


@evaluates
def function_vector_sweep(
    model: Any,
    task: Task | str,
    fv: FunctionVectorResult,
    *,
    layers: Layers = "all",
    test_size: float | int = 0.5,
    n_random: int = 3,
    batch_size: int | None = 32,
    seed: int = 0,
    progress: bool = True,
) -> FunctionVectorSweep:
    """Add a function vector after each of ``layers`` to zero-shot and shuffled-label few-shot
    prompts of held-out items, beside ``n_random`` random vectors of its norm (Todd et al.'s
    layer sweep; module docstring).

    Costs ``2 * (1 + n_random)`` passes over the held-out prompts per layer, and three without
    a vector; the FV is not fit again.

    Args:
        model: A TransformerLens model.
        task: The task whose held-out items are prompted: the FV's own (pass the ``test_size``
            and ``seed`` it was fit with, so that its held-out items are these), or another
            task, to see what the FV does there.
        fv: A :func:`mechprobe.function_vector` result.
        layers: The layers after which the vectors are added (default every layer).
        test_size: The held-out share (or count) of ``task``'s items, as for
            :func:`mechprobe.function_vector`.
        n_random: Random vectors of the FV's norm per layer (seeds as the FV's own controls).
        batch_size: Prompts per forward pass (None: all at once).
        seed: Seed of the split, the label shuffles and the random vectors.
        progress: Show a progress bar over layers.

    Returns:
        A :class:`FunctionVectorSweep`.

    Raises:
        ValueError: Bad layers or counts; a task with fewer than two shots (nothing to shuffle).

    Warns:
        UserWarning: ``task`` is the FV's and its held-out items include items the FV was fit
            on; as :func:`mechprobe.function_vector`, when many answers share a first token.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
        >>> sweep = mp.function_vector_sweep(model, "capitals", fv, progress=False)
        >>> sweep.conditions[0], sweep.accuracy.shape[1] == model.cfg.n_layers
        ('zero-shot + FV', True)
    """
    if not isinstance(fv, FunctionVectorResult):
        raise TypeError(
            f"fv must be a FunctionVectorResult (mp.function_vector(...)), got {type(fv).__name__}."
        )
    task = as_task(task)
    layer_list = resolve_layers(model, layers)
    check_int(n_random, "n_random", 0)
    check_batch_size(batch_size)
    seed = check_seed(seed)
    if len(task.shots) < 2:
        raise ValueError(
            f"Task {task.name!r} has {len(task.shots)} shot(s): shuffled labels need at least two "
            "demonstrations; use a task with more shots."
        )
    _, test = task.split(test_size, seed=seed)
    if task.name == fv.task and set(fv.fit_items) & set(test.inputs()):
        warn(
            f"{len(set(fv.fit_items) & set(test.inputs()))} of the {len(test)} held-out items "
            f"of {task.name!r} are items the FV was fit on: pass the test_size and seed "
            "function_vector was given, so that the FV is measured on items it has not seen."
        )
    here = model_adapter(model).name
    if fv.model_name and here and fv.model_name != here:
        # the o-vector functions refuse this; a FV moved between models of one width may be on
        # purpose (a base model's FV in its fine-tuned copy), so it is said, not refused
        warn(
            f"The FV was made on {fv.model_name!r}, and this model is {here!r}: its heads' "
            "mean outputs are that model's. Make it on this model (mp.function_vector) unless "
            "the transfer is what you measure."
        )
    answers = first_token_ids(model, test.answers())
    _warn_shared_first_tokens(model, answers, "function_vector_sweep")
    _warn_copying_scores(model, test, answers, "function_vector_sweep")
    prompts = {
        "zero-shot": test.with_shots(0).prompts(),
        "shuffled": shuffled_prompts(test, seed=seed),
        "few-shot": test.prompts(),
    }
    vector = torch.as_tensor(np.array(fv.vector), dtype=torch.float32)
    norm = vector.norm()
    randoms = _random_vectors(vector, n_random, seed)  # the draws of function_vector's own
    baseline_correct = np.stack(
        [_accuracy(model, prompts[name], answers, None, 0, batch_size) for name in BASELINES]
    )
    correct = np.full((len(SWEEP_CONDITIONS), len(layer_list), len(test)), np.nan)
    for k, layer in enumerate(progress_bar(layer_list, progress=progress, desc="FV layers")):
        for c, condition in enumerate(SWEEP_CONDITIONS):
            shown = prompts[_prompts_of(condition)]
            if "random" not in condition:
                correct[c, k] = _accuracy(model, shown, answers, vector, layer, batch_size)
            elif randoms:
                hits = [_accuracy(model, shown, answers, r, layer, batch_size) for r in randoms]
                correct[c, k] = np.mean(hits, axis=0)
    return FunctionVectorSweep(
        task=task.name,
        fv_task=fv.task,
        layers=tuple(layer_list),
        conditions=SWEEP_CONDITIONS,
        accuracy=correct.mean(axis=2),
        correct=correct,
        baseline={
            name: float(row.mean()) for name, row in zip(BASELINES, baseline_correct, strict=True)
        },
        baseline_correct=baseline_correct,
        norm=float(norm),
        fv_layer=fv.layer,
        heads=fv.heads,
        items=tuple(test.inputs()),
        n_random=n_random,
        seed=seed,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )
