"""The ``mechprobe`` command line: ``mechprobe lens|relation|probe|erase``.

The CLI only parses arguments and calls the public API; every analysis lives in its own module.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechprobe",
        description="Mechanistic interpretability on TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    # --- subcommands: each registers itself with a small _add_<name>(sub) below ---
    _ = sub
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechprobe`` console script.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
