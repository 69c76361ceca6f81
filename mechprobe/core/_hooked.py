"""HookedTransformers (TransformerLens 3.x): built from Hugging Face weights, saved and loaded.

``HookedTransformer.from_pretrained`` accepts only TransformerLens's list of official model names
(SmolLM2 is not on it, nor is any local folder), so mechprobe builds the model the way
``from_pretrained`` does, from a Hugging Face model already in memory: TransformerLens's own config
conversion (by architecture) and weight conversion, then, if asked, its weight processing. No hub
is involved.

A HookedTransformer has no ``save_pretrained``; :func:`save_hooked` writes a folder that
:func:`load_hooked` reads back without pickle: ``mechprobe-model.json`` (the config), the weights as
safetensors, and the tokenizer.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["HOOKED_MANIFEST", "build_hooked", "hooked_class", "load_hooked", "save_hooked"]

#: The file that marks a folder written by :func:`save_hooked`.
HOOKED_MANIFEST = "mechprobe-model.json"
_FORMAT = "mechprobe.HookedTransformer"
_VERSION = 1
#: Words TransformerLens 3.x's config conversion matches in a model's *path* to pick an
#: architecture before reading its config.json (it would misread a folder named after them).
_NAME_HEURISTICS = ("llama", "gemma")


class HookedUnavailable(RuntimeError):
    """This environment cannot build a HookedTransformer; the message says what to do."""


def _tl_version() -> str:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def hooked_class() -> Any:
    """TransformerLens's ``HookedTransformer`` class.

    Raises:
        HookedUnavailable: TransformerLens 4.x (which removed it) or none is installed.
    """
    try:
        from transformer_lens import HookedTransformer
    except (ImportError, AttributeError):
        raise HookedUnavailable(
            f"A HookedTransformer needs TransformerLens 3.x, and this environment has "
            f"transformer-lens {_tl_version()} (4.0 removed HookedTransformer). Load a "
            "TransformerBridge instead (kind='bridge', the default; the same numbers), or use an "
            "environment with TransformerLens 3.9: `make test-tl3` builds one in .venv-tl3 "
            "(`pip install -c constraints-tl3.txt transformer-lens==3.9.0` pins it)."
        ) from None
    return HookedTransformer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """TransformerLens 3.x warns that HookedTransformer is deprecated and logs each processing step;
    neither is news to someone who asked for one."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def build_hooked(
    hf_model: Any,
    tokenizer: Any,
    name: str,
    *,
    device: str | None,
    dtype: torch.dtype,
    process_weights: bool,
) -> Any:
    """A HookedTransformer with ``hf_model``'s weights, as ``HookedTransformer.from_pretrained``
    (``process_weights=True``: fold layer norm, centre writing weights and the unembedding, fold
    value biases) or ``from_pretrained_no_processing`` (False) would build it.

    Raises:
        HookedUnavailable: TransformerLens 3.x is not installed.
        ValueError: TransformerLens 3.x cannot convert this architecture.
    """
    cls = hooked_class()
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.utilities.activation_functions import softcap_enabled

    with _quiet(), tempfile.TemporaryDirectory(prefix="mechprobe-hooked.") as tmp:
        if any(word in tmp.lower() for word in _NAME_HEURISTICS):
            raise ValueError(
                f"The temporary folder {tmp} contains {_NAME_HEURISTICS}, which TransformerLens "
                "3.x reads as a model name: set TMPDIR to a folder without those words."
            )
        # TransformerLens converts a config by architecture from a folder holding config.json
        # (which names the architecture only once a model was saved); the weights come from
        # hf_model itself.
        config = copy.deepcopy(hf_model.config)
        config.architectures = config.architectures or [type(hf_model).__name__]
        config.save_pretrained(tmp)
        try:
            cfg = loading.get_pretrained_model_config(
                tmp,
                hf_cfg=hf_model.config.to_dict(),
                fold_ln=process_weights,
                device=device or "cpu",
                dtype=dtype,
            )
            state = loading.get_pretrained_state_dict(tmp, cfg, hf_model, dtype=dtype)
        # An architecture it does not convert raises NotImplementedError; one whose config
        # fields moved in this transformers (Phi's partial_rotary_factor) an AttributeError or
        # KeyError: the same advice for both.
        except (NotImplementedError, AttributeError, KeyError) as err:
            raise ValueError(
                f"TransformerLens {_tl_version()} cannot build a HookedTransformer of "
                f"{type(hf_model).__name__}: {type(err).__name__}: {err}. Load it as a "
                "TransformerBridge (kind='bridge')."
            ) from err
        cfg.model_name = name
        center_unembed = process_weights and not softcap_enabled(cfg.output_logits_soft_cap)
        model = cls(cfg, tokenizer, move_to_device=False, default_padding_side="right")
        model.load_and_process_state_dict(
            state,
            fold_ln=process_weights,
            # TransformerLens centres writing weights under LayerNorm only (RMSNorm does not
            # subtract the mean, so centring would change the outputs).
            center_writing_weights=process_weights,
            center_unembed=center_unembed,
            fold_value_biases=process_weights,
        )
    model.move_model_modules_to_device()
    model.eval()
    return model


def _config_to_json(cfg: Any) -> dict[str, Any]:
    out = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, torch.device):
            value = str(value)
        out[key] = value
    json.dumps(out)  # fails here, before any file is written, on a field we cannot store
    return out


def save_hooked(model: Any, folder: Path) -> None:
    """Write ``model``'s config, weights and tokenizer into ``folder`` (see :func:`load_hooked`)."""
    from safetensors.torch import save_file

    config = _config_to_json(model.cfg)
    config.pop("device", None)  # chosen when loading
    folder.mkdir(parents=True, exist_ok=True)
    # Tied or shared tensors are written once each: safetensors refuses shared storage.
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    manifest = {
        "format": _FORMAT,
        "version": _VERSION,
        "transformer_lens": _tl_version(),
        "config": config,
    }
    (folder / HOOKED_MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_saved_hooked(folder: Path) -> bool:
    """Whether ``folder`` was written by :func:`save_hooked`."""
    return (folder / HOOKED_MANIFEST).is_file()


def load_hooked(folder: Path, *, device: str | None, dtype: torch.dtype) -> Any:
    """The HookedTransformer saved in ``folder`` by :func:`save_hooked`, exactly as it was saved
    (processed or not).

    Raises:
        HookedUnavailable: TransformerLens 3.x is not installed.
        ValueError: The folder is not in the format this version reads.
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cls = hooked_class()
    from transformer_lens import HookedTransformerConfig

    manifest = json.loads((folder / HOOKED_MANIFEST).read_text())
    if manifest.get("format") != _FORMAT or manifest.get("version") != _VERSION:
        raise ValueError(
            f"{folder / HOOKED_MANIFEST} is not a mechprobe HookedTransformer folder of version "
            f"{_VERSION} (format {manifest.get('format')!r}, version {manifest.get('version')!r})."
        )
    config = dict(manifest["config"])
    config["dtype"] = dtype
    config["device"] = device or "cpu"
    tokenizer = (
        AutoTokenizer.from_pretrained(folder)
        if (folder / "tokenizer_config.json").is_file()
        else None
    )
    with _quiet():
        cfg = HookedTransformerConfig.from_dict(config)
        model = cls(cfg, tokenizer, move_to_device=False, default_padding_side="right")
    state = load_file(str(folder / "model.safetensors"))
    model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    )
    model.move_model_modules_to_device()
    model.eval()
    return model
