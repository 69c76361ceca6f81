"""The ``mechprobe`` command line: ``mechprobe predict|lens|relation|probe|erase|patch|trace|dla|heads|fv|train-lens``.

The CLI only parses arguments and calls the public API. Each subcommand lives in its own module
here (``lens.py``, ``relation.py``, ...) exposing ``add_parser(subparsers)``, which registers the
subcommand and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from mechprobe.cli._arguments import flag_names

# One entry per subcommand module in this package.
_COMMANDS: tuple[str, ...] = (
    "dla", "erase", "fv", "heads", "lens", "patch", "predict", "probe", "relation", "trace",
    "train_lens",
)  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechprobe",
        description="Mechanistic interpretability on TransformerLens models.",
    )
    from mechprobe import __version__

    parser.add_argument("--version", action="version", version=f"mechprobe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"mechprobe.cli.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechprobe`` console script.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    args = _parser().parse_args(argv)
    with warnings.catch_warnings():
        # A shell user is told what the library warns in one line, with flags named as typed,
        # not with Python's file, line number and source line.
        warnings.showwarning = functools.partial(_show_warning, args.command)
        return int(args.func(args))


def _show_warning(command: str, message: Any, *_: Any, **__: Any) -> None:
    print(f"mechprobe {command}: warning: {flag_names(str(message))}", file=sys.stderr)
