"""One teacher-forced pass over a task: its score, its trajectory and the FFN outputs to fit o from.

:func:`task_pass` is the first step of :func:`mechprobe.relational_analysis` and the one forward
pass over the task's items: it scores them (:class:`TaskScore`), decodes ``resid_post`` and
``resid_post - mlp_out`` at every layer at the prompt's last token (:class:`Trajectory`, whose
:meth:`~Trajectory.stages` are the argument / function / saturation layers), and keeps those
``mlp_out`` rows, from which :func:`mechprobe.fit_ovector` averages an o-vector over any split of
the items without running the model again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from mechprobe.core import evaluates, model_adapter
from mechprobe.lens import LensSpec
from mechprobe.relational._scoring import TaskScore, _forced_pass
from mechprobe.relational._trajectory import Stages, Trajectory, _from_pass, check_lens
from mechprobe.tasks import Task, as_task

__all__ = ["TaskPass", "task_pass"]


@dataclass(frozen=True, eq=False)
class TaskPass:
    """What one teacher-forced pass over a task measured (a step's value, not a saved result).

    Attributes:
        task: The task, as run (its shots and items).
        score: Per-item scores.
        trajectory: Per-item, per-layer lens ranks of argument and answer.
        mlp_out: ``[item, layer, d_model]`` each layer's FFN output at the prompt's last token.
        model: The model's name (``model.cfg.model_name``), for the o-vectors fitted from it.
        model_dtype: The model's weights' dtype (``"bfloat16"``...), for them too.

    Example:
        >>> import mechprobe as mp
        >>> tp = mp.task_pass(mp.tiny_model(), mp.load_task("capitals").subset(4))
        >>> tp
        TaskPass(capitals: 4 items, accuracy 0.00, mlp_out [4, 3, 64], Stages(argument -, function -, saturation -))
    """

    task: Task
    score: TaskScore
    trajectory: Trajectory
    mlp_out: Float[Tensor, "item layer d_model"]
    model: str = ""
    model_dtype: str = ""

    @property
    def stages(self) -> Stages:
        """The trajectory's stages under the default rules (:meth:`Trajectory.stages`)."""
        return self.trajectory.stages()

    def __len__(self) -> int:
        return len(self.score)

    def __repr__(self) -> str:
        shape = ", ".join(str(d) for d in self.mlp_out.shape)
        return (
            f"TaskPass({self.task.name}: {len(self)} items, accuracy {self.score.accuracy:.2f}, "
            f"mlp_out [{shape}], {self.stages!r})"
        )


@evaluates
def task_pass(
    model: Any,
    task: Task | str | os.PathLike[str],
    *,
    lens: LensSpec = "logit",
    batch_size: int | None = 32,
    progress: bool = True,
) -> TaskPass:
    """Score ``task``, decode its trajectory and keep the last-token FFN outputs: one forward pass.

    Args:
        model: A TransformerLens model.
        task: A :class:`Task`, a built-in task name or a task file (all its shots are used; call
            ``task.with_shots(k)`` for fewer).
        lens: The lens of the trajectory (and so of the stages): ``"logit"``, a
            :class:`~mechprobe.lens.TunedLens` or a :class:`~mechprobe.lens.Patchscope`.
        batch_size: Rows per forward pass.
        progress: Show a progress bar (``MECHPROBE_PROGRESS=0`` silences every bar).

    Returns:
        A :class:`TaskPass`: ``.score``, ``.trajectory``, ``.stages`` and ``.mlp_out``.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> tp = mp.task_pass(model, mp.load_task("capitals").subset(4))
        >>> o = mp.fit_ovector(tp, layer=1, only_correct=False)
        >>> tp.score.accuracy, tp.trajectory.n_layers, o.n_prompts
        (0.0, 3, 4)
    """
    task = as_task(task)
    decoder = check_lens(model, lens)
    forced = _forced_pass(
        model, task, kinds=("resid_post", "mlp_out"), batch_size=batch_size, progress=progress
    )
    return TaskPass(
        task=task,
        score=forced.score,
        trajectory=_from_pass(model, task, forced.score, forced.captures, decoder),
        mlp_out=forced.captures["mlp_out"],
        model=str(getattr(model.cfg, "model_name", "")),
        model_dtype=model_adapter(model).dtype_name,
    )
