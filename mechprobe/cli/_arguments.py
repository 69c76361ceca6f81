"""Arguments every subcommand shares: ``--model`` (and loading it), ``--positions``, and the
checks of output paths made before any work."""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import mechprobe as mp
from mechprobe.core import check_seed

_MODEL_HELP = (
    "model name for mechprobe.load_model (default smollm2-135m), or a folder written by "
    "save_pretrained or mechprobe.save_model (a saved HookedTransformer loads as one, under "
    "TransformerLens 3.x); 'tiny' is a random 3-layer test model, for checking the command "
    "without loading a real one (its tokenizer is byte-level: single-token answers are single "
    "characters)"
)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """Register ``--model`` (default: the embedded SmolLM2) and ``--device``."""
    parser.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)
    parser.add_argument(
        "--device",
        default=None,
        help="where the model's weights go: cpu (the default) or cuda",
    )
    parser.add_argument(
        "--kind",
        default=None,
        choices=("bridge", "hooked"),
        help="the TransformerLens class the model is run as: bridge (TransformerBridge, "
        "TransformerLens 4.x) or hooked (HookedTransformer, TransformerLens 3.x); default: "
        "what the name or folder holds (a bridge for the embedded SmolLM2)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(_DTYPES),
        help="the weights' dtype (default float32; bfloat16 or float16 halve the memory on a "
        "GPU, and move the numbers by the model's own rounding)",
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(
    name: str, device: str | None = None, dtype: str = "float32", kind: str | None = None
) -> Any:
    """The model named on the command line (``tiny``: mechprobe's random test model), on
    ``device``, in ``dtype``, as the TransformerLens class ``kind`` (None: what the name holds)."""
    if name == "tiny":
        model = mp.tiny_model(device=device, kind=kind or "bridge")  # type: ignore[arg-type]
        if dtype == "float32":
            return model
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints the change
            return model.to(_DTYPES[dtype])
    return mp.load_model(name, kind=kind, device=device, dtype=_DTYPES[dtype])  # type: ignore[arg-type]


def positions_type(all_value: Any = None, *, whole: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` for ``--positions``: ``all`` (-> ``all_value``), ``last`` (-> -1), an
    int, or comma-separated ints (write lists that start with a minus as ``--positions=-3,-1``);
    with ``whole``, also ``whole`` (kept as the word, which the report shows; the command passes
    None, every position at once in one cell per site)."""

    def parse(text: str) -> Any:
        if text == "all":
            return all_value
        if text == "last":
            return -1
        if whole and text == "whole":
            return text
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            words = "'all', 'last', 'whole'" if whole else "'all', 'last'"
            raise argparse.ArgumentTypeError(
                f"positions must be {words}, an int or comma-separated ints (e.g. 0,-1), "
                f"not {text!r}"
            ) from None
        return values[0] if len(values) == 1 else values

    return parse


def single_position(text: str) -> int:
    """An argparse ``type`` for a ``--positions`` that takes one position: ``last`` (-> -1) or an
    int.

    Example:
        >>> single_position("last"), single_position("-2")
        (-1, -2)
    """
    if text == "last":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"one position is split per prompt ('last' or an int, negative from the end), not "
            f"{text!r}: run once per position"
        ) from None


def site_kind_problem(
    option: str,
    text: str | None,
    *extra: str,
    allowed: Sequence[str] | None = None,
    where: str = "here",
    kinds_only: bool = False,
) -> str | None:
    """Why a comma-separated ``--sites`` value names a kind the command cannot take, or None.

    Checked before the model loads (a misspelt kind, or one the analysis refuses, was told only
    after the load): a kind must be one of the site kinds and, given ``allowed``, one of those;
    a site label (``mlp_out@3``) or a hook name that names a site (``blocks.3.hook_mlp_out``) is
    held to the same kinds. Any other hook name is resolved against the model. ``extra`` words are
    taken too (``final``); ``where`` says whose list ``allowed`` is; ``kinds_only`` refuses labels
    and hook names (an analysis that takes kinds and ``--layers`` only, as trace).

    Example:
        >>> print(site_kind_problem("--sites", "resid_post,mlp_otu"))
        --sites: Unknown site kind 'mlp_otu'; did you mean ['mlp_out', 'mlp_in', 'head_out']? Valid kinds: resid_pre, resid_mid, mlp_in, resid_post, attn_out, mlp_out, head, q, k, v, pattern, head_out.
        >>> print(site_kind_problem("--sites", "head@2", allowed=("resid_pre", "mlp_out")))
        --sites takes resid_pre, mlp_out here, not 'head@2'
    """
    from mechprobe.core import HEAD_KINDS

    parts = [part.strip() for part in (text or "").split(",")]
    if any(re.fullmatch(r"head [0-9]+", name) for name in parts):  # "head_out@1, head 2", split
        return (
            f"{option} is split at commas, so a head's label ('head_out@1, head 2') cannot be "
            "given in it: pass the kind (head_out) and pick the layers with --layers"
        )
    for name in parts:
        if not name or name in extra:
            continue
        if kinds_only and ("@" in name or "." in name or name.startswith("hook_")):
            return f"{option} takes site kinds {where}, not {name!r}: pick the layers with --layers"
        if "@" in name or "." in name or name.startswith("hook_"):
            try:
                kind: str = mp.Site.parse(name).kind
            except ValueError as error:
                if "@" not in name:
                    continue  # a hook that is no site's: resolved against the model
                kind = name.split("@")[0]  # a label needs no model: say what is wrong now
                if allowed is None or kind in allowed:
                    return f"{option}: {error}"
        else:
            try:
                mp.Site(name, 0, head=0 if name in HEAD_KINDS else None)  # type: ignore[arg-type]
            except ValueError as error:
                also = f" {option} also takes {', '.join(map(repr, extra))}." if extra else ""
                return f"{option}: {error}{also}"
            kind = name
        if allowed is not None and kind not in allowed:
            return f"{option} takes {', '.join([*allowed, *extra])} {where}, not {name!r}"
    return None


def output_problem(path: str | os.PathLike[str], *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written (as a file, or as an output folder), or None if it can.

    Checked before any model loads, so a typo costs a second, not a whole analysis.

    Example:
        >>> print(output_problem("/no/such/dir/result.json"))
        cannot write /no/such/dir/result.json: the folder /no/such/dir does not exist (create it first)
    """
    target = Path(path)
    if folder:
        if target.exists() and not target.is_dir():
            return f"cannot write into {target}: it is a file, not a folder"
        parent = target if target.is_dir() else target.parent
    else:
        if target.is_dir():
            return f"cannot write {target}: it is a folder (name a file inside it)"
        parent = target.parent
    existing = parent
    while not existing.exists():  # an output folder may be created: its nearest ancestor decides
        if not folder:
            return f"cannot write {target}: the folder {parent} does not exist (create it first)"
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot write {target}: {existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write {target}: {existing} is not writable"
    return None


def figure_problem(path: str | os.PathLike[str]) -> str | None:
    """Why matplotlib cannot write a figure to ``path`` (its extension), or None if it can.

    Example:
        >>> print(figure_problem("heatmap.xyz"))
        cannot write a figure as heatmap.xyz: use .png, .pdf or .svg (matplotlib's formats: ...)
    """
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix in formats:
        return None
    return (
        f"cannot write a figure as {path}: use .png, .pdf or .svg (matplotlib's formats: "
        f"{', '.join(sorted(formats))})"
    )


def layers_type(text: str) -> Any:
    """An argparse ``type`` for ``--layers``: ``all``, an int, a range ``20-29`` (both ends
    included) or a comma-separated mix (``0-2,5``); write lists that start with a minus as
    ``--layers=-1``.

    Example:
        >>> layers_type("0-2,5"), layers_type("all"), layers_type("-1")
        ([0, 1, 2, 5], 'all', [-1])
    """
    if text.strip() == "all":
        return "all"
    layers: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            start, dash, stop = part[1:].partition("-")  # a leading minus is a negative layer
            if dash:
                first, last = int(part[0] + start), int(stop)
                if (first < 0) != (last < 0):  # -1-2 ran -1, 0, 1, 2: the last layer, then 0..2
                    raise argparse.ArgumentTypeError(
                        f"the range {part} mixes a layer counted from the end with one counted "
                        "from the start: write both ends from the start (0-29) or both from "
                        "the end (--layers=-3--1)"
                    )
                if last < first:  # said only "layers is empty", after the model had loaded
                    raise argparse.ArgumentTypeError(
                        f"the range {part} runs backwards: write {last}-{first}"
                    )
                layers += range(first, last + 1)
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layers must be 'all', ints, ranges like 20-29, or a comma-separated mix (0-2,5), "
            f"not {text!r}"
        ) from None
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:  # refused by the analyses only after the model had loaded
        raise argparse.ArgumentTypeError(
            f"{text!r} names layer(s) {', '.join(map(str, repeated))} twice: name each once"
        )
    return layers


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts that must be at least 1 (``--cells-per-batch``).

    Example:
        >>> positive_int("64")
        64
    """
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _number(text: str) -> float:
    """``text`` as a float, NaN where it is none (the types' range checks then refuse it)."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


def positive_float(text: str) -> float:
    """An argparse ``type`` for a finite number above 0 (``--l2``): checked before the model
    loads (probe refused ``--l2 -1`` only after collecting every activation).

    Example:
        >>> positive_float("1e-3")
        0.001
    """
    value = _number(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    """An argparse ``type`` for a finite number at or above 0 (``--weight-decay``).

    Example:
        >>> nonnegative_float("0")
        0.0
    """
    value = _number(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number at or above 0, not {text!r}")
    return value


_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_size(text: str) -> int:
    """An argparse ``type`` for a positive size in bytes: a count or a number with ``KiB``,
    ``MiB``, ``GiB`` or ``TiB`` (``--memory-budget``).

    Example:
        >>> byte_size("512MiB"), byte_size("1.5GiB"), byte_size("4096")
        (536870912, 1610612736, 4096)
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise argparse.ArgumentTypeError(
            f"must be a positive size in bytes, e.g. 4096, 512MiB or 2GiB, not {text!r}"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def nonnegative_int(text: str) -> int:
    """An argparse ``type`` for counts where 0 means none (``--n-texts``).

    Example:
        >>> nonnegative_int("0")
        0
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, not {text!r}")
    return value


def seed_int(text: str) -> int:
    """An argparse ``type`` for ``--seed``: an integer in ``0 .. 2**32 - 1``, the range every
    seeded function takes (a negative seed was refused only after the model loaded).

    Example:
        >>> seed_int("7")
        7
    """
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be an integer between 0 and {2**32 - 1}, not {text!r}"
        ) from None


def fraction(text: str) -> float:
    """An argparse ``type`` for a share in ``[0, 1)`` (``--test-size``).

    Example:
        >>> fraction("0.25")
        0.25
    """
    value = _number(text)
    if not 0 <= value < 1:  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1), not {text!r}")
    return value


def comma_choices(choices: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse ``type`` for a comma-separated list drawn from ``choices`` (``--kinds``,
    ``train-lens --sites``): each unknown entry refused by the parser, naming the choices.

    Example:
        >>> comma_choices(("a", "b"), "kinds")("b, a")
        ['b', 'a']
    """

    def parse(text: str) -> list[str]:
        picked = [part.strip() for part in text.split(",") if part.strip()]
        if not picked or any(part not in choices for part in picked):
            raise argparse.ArgumentTypeError(
                f"{what} are a comma-separated list of {', '.join(choices)}; got {text!r}"
            )
        return picked

    return parse


def add_run_arguments(
    parser: argparse.ArgumentParser,
    *,
    batch_size: str | None = None,
    seed: str | None = None,
    raw: bool = False,
) -> None:
    """Register the options every analysis reads alike: ``--batch-size`` (a positive int,
    default 32) and ``--seed`` (default 0) with the help given (None: not taken), ``--raw``
    where prompts are typed, and ``--quiet``.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_run_arguments(parser, batch_size="prompts per forward pass", seed="the seed")
        >>> vars(parser.parse_args(["--batch-size", "8"]))
        {'batch_size': 8, 'seed': 0, 'quiet': False}
    """
    if batch_size is not None:
        parser.add_argument(
            "--batch-size", type=positive_int, default=32, help=f"{batch_size} (default 32)"
        )
    if seed is not None:
        parser.add_argument("--seed", type=seed_int, default=0, help=f"{seed} (default 0)")
    if raw:
        parser.add_argument("--raw", action="store_true", help="do not interpret backslash escapes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_layers_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Register ``--layers`` (default all) with the one syntax every subcommand reads."""
    parser.add_argument(
        "--layers",
        type=layers_type,
        default="all",
        help=f"{what}: 'all' (default), ints, ranges like 20-29, or a mix (0-2,5); negative "
        "counts from the last layer (write --layers=-1)",
    )


def task_shots(task: Any, shots: int | None) -> int:
    """The demonstrations to use: ``--shots``, or 3 (all the task has, if fewer) when not given.

    Example:
        >>> import mechprobe as mp
        >>> task_shots(mp.load_task("capitals"), None)
        3
    """
    available = len(task.shots)
    if shots is None:
        return min(3, available)
    if not 0 <= shots <= available:
        raise ValueError(
            f"--shots {shots}: task {task.name!r} has {available} demonstrations; pass --shots "
            f"between 0 and {available}."
        )
    return shots


def add_shots_argument(parser: argparse.ArgumentParser) -> None:
    """Register ``--shots`` (default: 3, or every demonstration of a task with fewer)."""
    parser.add_argument(
        "--shots",
        type=nonnegative_int,
        help="task demonstrations (default 3, or all the task has if fewer)",
    )


def add_lens_argument(parser: argparse.ArgumentParser) -> None:
    """Register ``--lens`` (``logit``, ``patchscope`` or a saved tuned lens) and the Patchscope's
    own settings (``--patchscope-prompt``, ``--patchscope-placeholder``, ``--patchscope-layer``)."""
    parser.add_argument(
        "--lens",
        default="logit",
        metavar="LENS",
        help="'logit' (default), 'patchscope' (the token-identity prompt unless "
        "--patchscope-prompt), or a tuned lens: a .safetensors file (mechprobe.TunedLens.save) "
        "or a tuned-lens package folder",
    )
    parser.add_argument(
        "--patchscope-prompt",
        metavar="TEXT",
        help="with --lens patchscope: the target prompt (default: the token-identity prompt "
        "'cat -> cat; 1135 -> 1135; hello -> hello; ?'); decoded at its last token",
    )
    parser.add_argument(
        "--patchscope-placeholder",
        metavar="TEXT",
        help="with --lens patchscope: the text in the target prompt whose last token is "
        "replaced (default '?'; its last occurrence)",
    )
    parser.add_argument(
        "--patchscope-layer",
        type=int,
        metavar="N",
        help="with --lens patchscope: the layer patched in the target prompt (default: the "
        "decoded vector's own layer; negative counts from the end)",
    )


def lens_spec(args: argparse.Namespace, text: Callable[[str], str] = str) -> Any:
    """The lens ``--lens`` names (a tuned lens is read here, before the model loads).

    ``text`` is applied to the Patchscope's prompt and placeholder (the lens command interprets
    backslash escapes in them as in its prompts). The ``--patchscope-*`` settings configure
    ``--lens patchscope`` and are refused with any other lens (they would be ignored silently).
    """
    spec = args.lens
    settings = {
        "--patchscope-prompt": args.patchscope_prompt,
        "--patchscope-placeholder": args.patchscope_placeholder,
        "--patchscope-layer": args.patchscope_layer,
    }
    if spec.lower() == "patchscope":
        options: dict[str, Any] = {"target_layer": args.patchscope_layer}
        if args.patchscope_prompt is not None:
            options["prompt"] = text(args.patchscope_prompt)
        if args.patchscope_placeholder is not None:
            options["placeholder"] = text(args.patchscope_placeholder)
        return mp.Patchscope(**options)
    given = [name for name, value in settings.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} configure --lens patchscope, not --lens {spec}.")
    if spec.lower() == "logit":
        return "logit"
    try:
        return mp.TunedLens.load(spec)
    except FileNotFoundError as err:
        raise ValueError(
            f"--lens {spec}: no such file or folder; LENS is 'logit', 'patchscope', a tuned "
            "lens's .safetensors file or a tuned-lens folder."
        ) from err


#: The library's argument names that a command's flag sets, as the shell user typed them.
_FLAGS = {
    # probe_layers' advice names its groups= argument, which a dataset sets here
    "pass groups with several word types per class, or groups=False": "the dataset's classes "
    "are its word types, so no control task can be drawn",
    "pass groups with more word types, another seed, or groups=False": "pass another --seed or "
    "a dataset with more word types",
    "(or l2)": "(or --l2)",
    "set ablation=True": "drop --no-ablation",
    "ablation=False": "--no-ablation",
    "contrast_task": "--contrast-task",
    "max_examples": "--max-examples",
    "max_iter": "--max-iter",
    "mlp=False": "--no-mlp",
    "n_folds": "--folds",
    "n_items": "--n-items",
    "n_countries": "--n-countries",
    "n_heads": "--n-heads",
    "n_noise": "--n-noise",
    "n_prompts": "--n-prompts",
    "n_random": "--n-random",
    "n_random_heads": "--n-random-heads",
    "pass only_correct=False": "drop --only-correct",
    "only_correct=False": "no --only-correct",
    "only_correct": "--only-correct",
    "other_task": "--other-task",
    "ovector_prompts": "--ovector-prompts",
    "receiver_layers": "--receiver-layers",
    "seq_len": "--seq-len",
    "target_layer": "--patchscope-layer",
    "test_size": "--test-size",
    "top_k": "--top-k",
    "with_shots": "--shots",
}
#: Single words that are flags only where the library names its argument.
_WORD_FLAGS = ("l2", "window", "sites", "layers", "seed", "receivers")
#: Arguments the library's messages write as ``name='value'``: the shell's ``--name value``.
_VALUE_FLAGS = ("device", "kind", "lens")


def flag_names(message: str) -> str:
    """``message`` with the library's argument names replaced by the flags that set them.

    Example:
        >>> flag_names("n_noise must be at least 1, got 0; pick the layers with layers=.")
        '--n-noise must be at least 1, got 0; pick the layers with --layers.'
        >>> flag_names("receivers: 'x' is not accepted here; use device='cpu'")
        "--receivers: 'x' is not accepted here; use --device 'cpu'"
    """
    for name, flag in _FLAGS.items():
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w])", flag, message)
    message = message.replace("(tol=", "(solver tolerance ")  # no flag sets it
    for word in _WORD_FLAGS:  # "window must ...", "layers=", "sites: ..." and the like only
        message = re.sub(
            rf"(?<![\w-]){word}( must | takes | repeats |=|: )", rf"--{word}\1", message
        )
        message = message.replace(f"--{word}=", f"--{word}")
    for word in _VALUE_FLAGS:
        message = re.sub(rf"(?<![\w-]){word}=(?=['\"\w])", f"--{word} ", message)
    # The shell passes answers as text only: the API's "or a token id" cannot be followed here.
    return message.replace(") or a token id.", ").")


def command_error(command: str, message: object) -> int:
    """Print ``mechprobe COMMAND: error: MESSAGE`` (flags named as typed) and return exit code 2.

    Example:
        >>> command_error("trace", "window must be at least 1, got 0.")
        2
    """
    # One line: a library's message may carry its own line breaks (transformers' offline error).
    text = " ".join(str(message).split())
    print(f"mechprobe {command}: error: {flag_names(text)}", file=sys.stderr)
    return 2
