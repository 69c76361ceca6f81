"""mechprobe: mechanistic interpretability on TransformerLens hooks.

Early decoding (logit lens), FFN-update patching for relational tasks, layer-wise linear probes and
nullspace projection / amnesic probing, on any TransformerLens model (``TransformerBridge`` first).

Example:
    >>> import mechprobe as mp
    >>> model = mp.tiny_model()
    >>> model.cfg.n_layers
    2
"""

from __future__ import annotations

from mechprobe.analogy import AnalogyResult, analogy, offset_accuracy
from mechprobe.tasks import Task, TaskItem, list_tasks, load_task

__version__ = "0.1.0"

__all__: list[str] = [
    "AnalogyResult",
    "Task",
    "TaskItem",
    "__version__",
    "analogy",
    "list_tasks",
    "load_task",
    "offset_accuracy",
]
