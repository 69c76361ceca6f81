"""``mechprobe fv``: a task's function vector (Todd et al.) beside its controls; writes
result.json, fv.png and report.md into ``--out`` (and sweep.json, sweep.png with ``--sweep``).

Example::

    mechprobe fv --task capitals_extractive --n-prompts 8 --out runs/fv
    mechprobe fv --task function_vectors/dataset_files/abstractive/antonym.json --n-items 120 \\
        --shots 10 --sweep 0-29 --out runs/antonym
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    command_error,
    fraction,
    layers_type,
    load,
    nonnegative_int,
    output_problem,
    positive_int,
)
from mechprobe.cli._run_folder import write_run_folder

_HELP = """\
Build a task's function vector (Todd et al., ICLR 2024): each head's average indirect effect on
few-shot prompts whose demonstrations' answers are shuffled, the mean last-token outputs of the
top heads summed, added after --layer at the last token of zero-shot prompts of held-out items;
beside the intact model zero-shot and few-shot, random vectors of its norm, the task's o-vector
(Merullo et al.) and, with --n-random-heads, random heads' mean outputs.

--task takes a built-in task, a mechprobe task file, or one of Todd et al.'s dataset files
(ericwtodd/function_vectors, dataset_files/abstractive/*.json), read with their prompts.
--sweep LAYERS then adds the vector after each of those layers to zero-shot and shuffled-label
prompts (Todd et al.'s layer sweep).
"""


def _shots(text: str) -> int:
    """``--shots``: demonstrations per fit prompt, at least two (their labels are shuffled)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"must be at least 2 (the shuffled prompts permute the demonstrations' answers), "
            f"not {text!r}"
        )
    return value


def _share(text: str) -> float:
    """``--test-size``: a share of the items in (0, 1): some held out, some to fit on."""
    value = fraction(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be above 0: the accuracies need held-out items")
    return value


def add_parser(sub: Any) -> None:
    """Register ``mechprobe fv`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "fv",
        help="function vector of a task beside random vectors, random heads and the o-vector",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task", required=True, help="built-in task name, task JSON file or Todd et al. dataset"
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    parser.add_argument(
        "--n-items", type=positive_int, help="seeded subset of the task's items (default: all)"
    )
    parser.add_argument(
        "--layer",
        type=int,
        help="block after which the vector is added (default: a third of the layers, as Todd "
        "et al.; negative counts from the last)",
    )
    parser.add_argument(
        "--n-heads", type=positive_int, help="top heads whose mean outputs make the FV (10)"
    )
    parser.add_argument(
        "--shots",
        type=_shots,
        help="demonstrations per fit prompt, drawn from the other fit items (Todd et al.: 10; "
        "default: the task's own demonstrations)",
    )
    parser.add_argument(
        "--n-prompts", type=positive_int, default=20, help="fit prompts (default 20)"
    )
    parser.add_argument(
        "--test-size",
        type=_share,
        default=0.5,
        help="share of the items held out for the accuracies (default 0.5)",
    )
    parser.add_argument(
        "--only-correct",
        action="store_true",
        help="fit on the items the model answers few-shot only (Todd et al.'s filter)",
    )
    parser.add_argument(
        "--n-random",
        type=nonnegative_int,
        default=3,
        help="random controls per head and random vectors (default 3)",
    )
    parser.add_argument(
        "--n-random-heads",
        type=nonnegative_int,
        default=0,
        help="draws of random heads whose mean outputs are added as the FV's (default 0)",
    )
    parser.add_argument(
        "--sweep",
        type=layers_type,
        metavar="LAYERS",
        help="also add the FV after each of these layers ('all', ints, ranges like 0-29)",
    )
    add_model_argument(parser)
    add_run_arguments(
        parser,
        batch_size="prompts per forward pass",
        seed="seed of --n-items, the split, the shuffles and the controls",
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Build the function vector on the parsed arguments; write and print its results."""
    import mechprobe as mp

    def fail(message: str) -> int:
        for name, flag in (("shots=", "--shots "), ("layer must", "--layer must")):
            message = message.replace(name, flag)
        return command_error("fv", message)

    problem = output_problem(args.out, folder=True)
    if not problem and Path(args.out).suffix in (".json", ".npz", ".safetensors"):
        problem = f"{args.out} names a file; --out is the folder that gets result.json"
    if problem:  # before the model loads
        return fail(f"--out: {problem}")
    try:
        task = mp.load_task(args.task)  # a misspelt task before the model loads
        if args.n_items is not None and args.n_items < len(task):
            task = task.subset(args.n_items, seed=args.seed)
        model = load(args.model, args.device, args.dtype, args.kind)
        n_layers = int(model.cfg.n_layers)
        if isinstance(args.sweep, list) and any(
            not -n_layers <= la < n_layers for la in args.sweep
        ):
            # before the vector is fit (minutes on a real model), as the layer of --layer is
            return fail(
                f"--sweep: layers run from 0 to {n_layers - 1} (negative from the last); got "
                f"{args.sweep}"
            )
        result = mp.function_vector(
            model,
            task,
            layer=args.layer,
            n_heads=args.n_heads,
            shots=args.shots,
            n_prompts=args.n_prompts,
            test_size=args.test_size,
            only_correct=args.only_correct,
            n_random=args.n_random,
            n_random_heads=args.n_random_heads,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return fail(str(err))
    problem = write_run_folder("fv", args, result, "fv.png")  # kept if the sweep fails
    if problem:
        return fail(problem)
    _add_heads_to_report(Path(args.out) / "report.md", result)
    if args.sweep is None:
        return 0
    try:
        sweep = mp.function_vector_sweep(
            model,
            task,
            result,
            layers=args.sweep,
            test_size=args.test_size,
            n_random=args.n_random,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError) as err:
        return fail(f"--sweep (the function vector is written in {args.out}): {err}")
    folder = Path(args.out)
    table = sweep.summary().to_string(index=False)
    try:
        sweep.save(folder / "sweep.json")
        sweep.plot().savefig(folder / "sweep.png", dpi=150, bbox_inches="tight")
        with open(folder / "report.md", "a", encoding="utf-8") as report:
            report.write(
                f"\n## Layer sweep (`sweep.json`)\n\n{sweep._describe()}\n\n```\n{table}\n```\n\n"
                "![sweep.png](sweep.png)\n"
            )
    except (OSError, ValueError) as err:
        return fail(f"cannot write {folder}: {err}")
    print()
    print(table)
    print(f"\nwrote {folder / 'sweep.json'} and {folder / 'sweep.png'}")
    return 0


def _add_heads_to_report(path: Path, result: Any) -> None:
    """report.md: the heads whose mean outputs make the vector, and each condition's commonest
    prediction quoted (a bare space or newline reads as nothing in the summary table)."""
    heads = ", ".join(f"{layer}.{head}" for layer, head in result.heads)
    said = "\n".join(
        f"- {row.condition}: {row.top_prediction!r} ({row.top_share:.2f} of the held-out items)"
        for row in result.summary().itertuples()
        if row.top_prediction
    )
    with open(path, "a", encoding="utf-8") as report:
        report.write(f"\n## Heads (layer.head)\n\n{heads}\n\n## Commonest next token\n\n{said}\n")
