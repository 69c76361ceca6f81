"""``mechprobe relation``: Merullo-style FFN-update analysis of a relational task.

Example::

    mechprobe relation --task capitals --out runs/capitals --n-items 60
    mechprobe relation --task my_task.json --layers 20-29 --scale 2 --sweep --out runs/mine
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from mechprobe.cli._arguments import (
    add_lens_argument,
    add_model_argument,
    add_run_arguments,
    add_shots_argument,
    command_error,
    fraction,
    layers_type,
    lens_spec,
    load,
    nonnegative_int,
    output_problem,
    positions_type,
    positive_int,
    task_shots,
)
from mechprobe.cli.lens import interpret_escapes

_HELP = """\
Score a relational task, decode the argument and answer at every layer (the X), read the FFN
update (o-vector) at the function-application layer, write it into the FFN outputs of random-word
contexts beside its controls (random directions of the same norm, another task's o-vector, the
intact model), and remove FFNs top-down beside the task's extractive counterpart.

Writes OUT/result.json, OUT/ovector.safetensors, figures (x_plot.png, intervention.png,
ablation.png, sweep.png) and OUT/report.md, and prints the headline table.
"""


def _optional_task(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _finite(text: str) -> float:
    """A finite float (``nan`` or ``inf`` would be written into the model as is)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, not {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``mechprobe relation`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "relation",
        help="FFN-update (o-vector) analysis of a relational task",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", required=True, help="built-in task name or task JSON file")
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    add_model_argument(parser)
    add_shots_argument(parser)
    add_lens_argument(parser)
    parser.add_argument(
        "--n-items", type=positive_int, help="seeded subset of the items (default: all)"
    )
    parser.add_argument(
        "--layers",
        type=layers_type,
        help="FFN layers to write o into: 'all', ints, ranges like 20-29 or a mix (0-2,5); "
        "negative counts from the last layer (write --layers=-1) (default: the function layer "
        "on; the paper's range starts one layer before it)",
    )
    parser.add_argument("--scale", type=_finite, default=1.0, help="scale of o (default 1)")
    parser.add_argument(
        "--mode",
        choices=("replace", "add"),
        default="replace",
        help="replace: the FFN's output at the written layers becomes the o-vector (default, "
        "as Merullo et al.); add: the o-vector is added to it",
    )
    parser.add_argument(
        "--positions",
        type=positions_type("all"),
        default="all",
        help="where the o-vector is written: 'all' (default), 'last' or ints (the FFN "
        "ablation is at every position)",
    )
    parser.add_argument(
        "--n-random", type=nonnegative_int, default=3, help="random controls (default 3)"
    )
    parser.add_argument(
        "--other-task",
        type=_optional_task,
        default="auto",
        help="task whose o-vector is a control ('auto', a name/path, or 'none')",
    )
    parser.add_argument(
        "--contrast-task",
        type=_optional_task,
        default="auto",
        help="task ablated beside this one ('auto': its extractive/abstractive twin; 'none')",
    )
    parser.add_argument(
        "--test-size",
        "--holdout",  # its old name
        dest="test_size",
        type=fraction,
        default=0.5,
        help="share of the items held out of the o-vector (0.5; --holdout is its old name)",
    )
    parser.add_argument(
        "--ovector-prompts",
        type=positive_int,
        help="average o over at most this many prompts (default: every correctly answered "
        "fit prompt; 1: the paper's single prompt)",
    )
    parser.add_argument("--no-ablation", action="store_true", help="skip the FFN ablation")
    parser.add_argument(
        "--ablation-method", choices=("zero", "mean"), help="FFN ablation (default zero)"
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep layer ranges (starts from the function layer - 4 on, to the last layer or "
        "the one before) x scales 1,2,4, on up to 64 contexts",
    )
    add_run_arguments(
        parser,
        batch_size="rows per forward pass",
        seed="seed of --n-items, the split and the controls",
        raw=True,
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the analysis on the parsed arguments, save everything, print the headline table."""
    import mechprobe as mp

    problem = output_problem(args.out, folder=True)
    suffix = Path(args.out).suffix
    if suffix in (".json", ".npz", ".safetensors"):  # the API would write one file, or nothing
        problem = (
            f"{args.out} names a file; --out is the folder that gets result.json, report.md, the "
            f"o-vector and figures: drop the {suffix} suffix"
        )
    if problem:  # before the model loads and the analysis runs
        print(f"mechprobe relation: error: --out: {problem}", file=sys.stderr)
        return 2
    if args.no_ablation and args.ablation_method is not None:
        print(
            "mechprobe relation: error: --ablation-method with --no-ablation: drop one of them",
            file=sys.stderr,
        )
        return 2
    if args.no_ablation and args.contrast_task not in ("auto", None):
        print(
            "mechprobe relation: error: --contrast-task names the task ablated beside this one, "
            "but --no-ablation runs no ablation: drop one of them",
            file=sys.stderr,
        )
        return 2
    try:
        task = mp.load_task(args.task)
        args.shots = task_shots(task, args.shots)  # before the model loads
        for flag, named in (
            ("--other-task", args.other_task),
            ("--contrast-task", args.contrast_task),
        ):
            try:
                # a misspelt control task, or the task itself, before the model loads
                if named not in ("auto", None) and mp.load_task(named).name == task.name:
                    return command_error(
                        "relation",
                        f"{flag} {named} is the task analysed ({task.name}): a control needs "
                        "another task; pass another, or none",
                    )
            except (ValueError, OSError) as err:
                return command_error("relation", f"{flag}: {err}")
        # The Patchscope's prompt reads \n as lens does (it was taken literally here).
        interpret_escapes(args, "patchscope_prompt", "patchscope_placeholder")
        lens = lens_spec(args)
        model = load(args.model, args.device, args.dtype, args.kind)
        result = mp.relational_analysis(
            model,
            args.task,
            shots=args.shots,
            n_items=args.n_items,
            layers=args.layers,
            scale=args.scale,
            mode=args.mode,
            positions=args.positions,
            n_random=args.n_random,
            other_task=args.other_task,
            contrast_task=args.contrast_task,
            test_size=args.test_size,
            ovector_prompts=args.ovector_prompts,
            ablation=not args.no_ablation,
            ablation_method=args.ablation_method or "zero",
            sweep_layers="auto" if args.sweep else None,
            seed=args.seed,
            batch_size=args.batch_size,
            lens=lens,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return command_error("relation", str(err).replace("None to", "none to"))
    try:
        folder = result.save(args.out)
    except (OSError, ValueError) as err:  # e.g. the disk filled up or the folder vanished
        print(f"mechprobe relation: error: cannot write {args.out}: {err}", file=sys.stderr)
        return 2
    st = result.stages

    def layer(value: int | None) -> str:  # as report.md says it
        return "n/a" if value is None else str(value)

    print(
        f"\n{result.task} ({result.kind}): {result.n_items} items, accuracy {result.accuracy:.3f}; "
        f"argument layer {layer(st.argument_layer)}, function layer {layer(st.function_layer)}, "
        f"saturation layer {layer(st.saturation_layer)}\n"
    )
    print(result.headline())
    print(f"\nwrote {folder / 'result.json'}, {folder / 'report.md'} and figures")
    return 0
