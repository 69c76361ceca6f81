"""Arguments every subcommand shares: ``--model`` (and loading it) and ``--positions``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import mechprobe as mp

_MODEL_HELP = (
    "model name for mechprobe.load_model (default smollm2-135m); 'tiny' is a random 3-layer test "
    "model, for checking the command without loading a real one"
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
