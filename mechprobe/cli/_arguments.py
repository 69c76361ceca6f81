"""Arguments every subcommand shares: ``--model`` (and loading it), ``--positions``, and the
checks of output paths made before any work."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mechprobe as mp

_MODEL_HELP = (
    "model name for mechprobe.load_model (default smollm2-135m), or a folder written by "
    "save_pretrained or mechprobe.save_model (a saved HookedTransformer loads as one, under "
    "TransformerLens 3.x); 'tiny' is a random 3-layer test model, for checking the command "
    "without loading a real one"
)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """Register ``--model`` (default: the embedded SmolLM2)."""
    parser.add_argument("--model", default="smollm2-135m", help=_MODEL_HELP)


def load(name: str) -> Any:
    """The model named on the command line (``tiny``: mechprobe's random test model)."""
    return mp.tiny_model() if name == "tiny" else mp.load_model(name)


def positions_type(all_value: Any = None) -> Callable[[str], Any]:
    """An argparse ``type`` for ``--positions``: ``all`` (-> ``all_value``), ``last`` (-> -1), an
    int, or comma-separated ints (write lists that start with a minus as ``--positions=-3,-1``)."""

    def parse(text: str) -> Any:
        if text == "all":
            return all_value
        if text == "last":
            return -1
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"positions must be 'all', 'last', an int or comma-separated ints (e.g. 0,-1), "
                f"not {text!r}"
            ) from None
        return values[0] if len(values) == 1 else values

    return parse


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
