"""o-vectors: the FFN update that applies a relation (``Poland + o = Warsaw``), and its controls.

Merullo et al. take o as the FFN output (``mlp_out``) at the function-application layer at the last
token of one prompt. :func:`extract_ovector` does that for one prompt or averages over many (what
reviewers asked for), optionally over correctly answered items only. :func:`random_ovector` draws a
random direction with the same norm, the control every o-vector result is reported beside.

An :class:`OVector` saves to a ``.safetensors`` file (tensor plus JSON-able metadata), never pickle.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor

from mechprobe.core import Site, first_token_ids, resolve_site, run, tokenize
from mechprobe.tasks import Task

__all__ = ["OVector", "extract_ovector", "random_ovector"]

_FORMAT = "mechprobe.relational._ovector/1"


@dataclass(frozen=True, eq=False)
class OVector:
    """An FFN-output vector and where it came from.

    Attributes:
        vector: ``[d_model]`` the (mean) ``mlp_out`` at the last token.
        layer: The layer it was read at.
        source: What it came from: a task name, ``"random"``, or a description.
        n_prompts: How many prompts were averaged.
        model: The model's name (``model.cfg.model_name``), to catch mixing models.
        info: Extra JSON-able metadata (e.g. the seed of a random control).

    Example:
        >>> import torch, tempfile, os
        >>> o = OVector(torch.ones(4), layer=2, source="toy", n_prompts=1)
        >>> path = o.save(os.path.join(tempfile.mkdtemp(), "o.safetensors"))
        >>> OVector.load(path).layer, float(OVector.load(path).norm)
        (2, 2.0)
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    source: str
    n_prompts: int
    model: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.vector, Tensor) or self.vector.ndim != 1:
            raise ValueError(
                "OVector.vector must be a 1-D torch tensor [d_model]; take one row of mlp_out."
            )

    @property
    def norm(self) -> float:
        """Euclidean norm of the vector."""
        return float(self.vector.float().norm())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a ``.safetensors`` file holding the vector and its metadata; return the path."""
        path = Path(path)
        meta = {
            "format": _FORMAT,
            "layer": str(self.layer),
            "source": self.source,
            "n_prompts": str(self.n_prompts),
            "model": self.model,
            "info": json.dumps(self.info),
        }
        save_file({"vector": self.vector.detach().contiguous().cpu()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OVector:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: The file is not an o-vector file written by mechprobe.
        """
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(
                f"{path} is not an o-vector file (format {meta.get('format')!r}, expected "
                f"{_FORMAT!r}); write it with OVector.save."
            )
        return cls(
            vector=load_file(str(path))["vector"],
            layer=int(meta["layer"]),
            source=meta["source"],
            n_prompts=int(meta["n_prompts"]),
            model=meta.get("model", ""),
            info=json.loads(meta.get("info", "{}")),
        )


def _model_name(model: Any) -> str:
    return str(getattr(model.cfg, "model_name", ""))


def extract_ovector(
    model: Any,
    prompts: str | Sequence[str] | Task,
    layer: int,
    *,
    only_correct: bool = False,
    batch_size: int | None = 32,
    progress: bool = False,
) -> OVector:
    """The FFN output at ``layer`` at the last token, of one prompt or averaged over several.

    Args:
        model: A TransformerLens model.
        prompts: One prompt, a list of prompts, or a :class:`Task` (its items' prompts; load
            a built-in task with :func:`mechprobe.load_task`).
        layer: The layer whose ``mlp_out`` is read (negative counts from the end).
        only_correct: Average only the items the model answers correctly (greedy first token);
            needs a task.
        batch_size: Rows per forward pass.
        progress: Show a progress bar.

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
        texts, source = [prompts], "prompt"
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
        keep = (out.logits[:, 0].argmax(-1) == first).numpy()
        if not keep.any():
            raise ValueError(
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
    )


def random_ovector(like: OVector, seed: int = 0) -> OVector:
    """A random direction (isotropic Gaussian) with the same norm and layer as ``like``.

    Example:
        >>> import torch
        >>> o = OVector(torch.tensor([3.0, 4.0]), layer=1, source="toy", n_prompts=1)
        >>> r = random_ovector(o, seed=0)
        >>> round(r.norm, 4), r.source
        (5.0, 'random')
    """
    gen = torch.Generator().manual_seed(int(seed))
    direction = torch.randn(like.vector.shape, generator=gen, dtype=torch.float64)
    vector = direction / direction.norm() * like.vector.double().norm()
    return replace(
        like,
        vector=vector.to(like.vector.dtype),
        source="random",
        info={"seed": int(seed), "like": like.source},
    )
