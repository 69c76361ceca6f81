"""The folder an analysis command writes: ``result.json``, its figure and ``report.md``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechprobe.core import format_number


def report(
    title: str, args: argparse.Namespace, result: Any, figure: str, saved: str = "result.json"
) -> str:
    """report.md: the settings run (None: the command's default), the mechprobe version, the
    result's one-line description, its summary table; ``saved`` names the result's file."""
    from mechprobe import __version__

    table = result.summary().to_string(index=False, float_format=format_number, na_rep="—")
    settings = "\n".join(
        f"{k}: {v!r}" for k, v in vars(args).items() if k not in ("func", "command")
    )
    return (
        f"# {title}\n\nmechprobe {__version__}; settings as given (None: the command's "
        f"default; {saved} holds what ran):\n\n```\n{settings}\n```\n\n"
        f"{result._describe()}\n\n"
        f"## Summary\n\n```\n{table}\n```\n\n![{figure}]({figure})\n\n"
        f"Every value: `{saved}` (load with `mechprobe.load_result`: every result type).\n"
    )


def write_run_folder(
    command: str,
    args: argparse.Namespace,
    result: Any,
    figure: str,
    plot_options: dict[str, Any] | None = None,
) -> str | None:
    """Write ``result.json``, the figure ``figure`` (``result.plot(**plot_options)``) and
    ``report.md`` into ``args.out`` and print the summary table; return why a file could not be
    written (None when all were)."""
    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        result.save(folder / "result.json")
        result.plot(**(plot_options or {})).savefig(folder / figure, dpi=150, bbox_inches="tight")
        (folder / "report.md").write_text(
            report(f"mechprobe {command}", args, result, figure), encoding="utf-8"
        )
    except OSError as err:
        return f"cannot write {folder}: {err}"
    except ValueError as err:  # a figure the result cannot draw: said, not a traceback
        return f"{folder}: {err}"
    print(result.summary().to_string(index=False))
    print(f"\nwrote {folder / 'result.json'}, {folder / figure} and {folder / 'report.md'}")
    return None
