"""``mechprobe dla``: direct logit attribution of a task or prompts; writes result.json, dla.png
and report.md into ``--out``.

Example::

    mechprobe dla --task capitals --shots 3 --heads --out runs/dla
    mechprobe dla --prompt "The capital of Poland is" --answer " Warsaw" --wrong " Poland" \\
        --out runs/poland
"""

from __future__ import annotations

import argparse
from typing import Any

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    add_shots_argument,
    command_error,
    load,
    output_problem,
    positive_int,
    single_position,
    task_shots,
)
from mechprobe.cli._run_folder import write_run_folder
from mechprobe.cli.lens import interpret_escapes

_HELP = """\
Split each prompt's logit[answer] - logit[wrong] at its last token into the direct effect of every
write to the residual stream: the embedding, each layer's attention (--heads: each head) and MLP,
and the final biases, the final norm's scale frozen at the prompt's own value, so that a prompt's
numbers sum to the model's difference.

Give a task (--task: each item's answer against its argument, e.g. the capital against the
country; items whose two start with the same token are left out), or prompts with their answers
and wrong answers (--prompt/--answer/--wrong, repeatable; one --answer and --wrong for every
prompt, or one each per prompt). Backslash escapes \\n, \\t and \\\\ are interpreted (--raw keeps
them).
"""


def add_parser(sub: Any) -> None:
    """Register ``mechprobe dla`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "dla",
        help="direct logit attribution: each layer's, head's and MLP's direct effect on a "
        "logit difference",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", help="built-in task name or task JSON file")
    add_shots_argument(parser)
    parser.add_argument("--n-items", type=positive_int, help="seeded subset of the task's items")
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument("--answer", action="append", default=[], help="answer (one or per prompt)")
    parser.add_argument("--wrong", action="append", default=[], help="wrong answer, as --answer")
    parser.add_argument("--heads", action="store_true", help="split attention into its heads")
    parser.add_argument(
        "--positions",
        type=single_position,
        default=-1,
        help="the one position split: 'last' or -1 (each prompt's last token, the default) or "
        "another int, negative from each prompt's end (write --positions=-2)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    add_model_argument(parser)
    add_run_arguments(
        parser, batch_size="prompts per forward pass", seed="seed of --n-items", raw=True
    )
    parser.set_defaults(func=main, seed=None)  # None: not given, so refused where it does nothing


def main(args: argparse.Namespace) -> int:
    """Run the attribution on the parsed arguments and write result.json, dla.png, report.md."""
    import mechprobe as mp

    def fail(message: str) -> int:
        return command_error("dla", message)

    problem = output_problem(args.out, folder=True)
    if problem:  # before the model loads
        return fail(f"--out: {problem}")
    if (args.task is None) == (not args.prompt):
        return fail("give either --task or --prompt (with --answer and --wrong), not both")
    if args.task is not None and (args.answer or args.wrong):
        return fail("--task sets each item's answer against its argument: drop --answer/--wrong")
    if args.task is None and (args.shots is not None or args.n_items is not None):
        return fail("--shots and --n-items shape a --task: drop them with --prompt")
    if args.seed is not None and args.n_items is None:
        return fail("--seed draws the --n-items subset of a --task, which is not asked: drop it")
    if args.prompt:
        for name, given in (("--answer", args.answer), ("--wrong", args.wrong)):
            if not given:
                return fail(f"{name} is required with --prompt (one for all prompts, or one each)")
            if len(given) not in (1, len(args.prompt)):
                return fail(
                    f"got {len(given)} {name} for {len(args.prompt)} --prompt: pass one shared by "
                    "every prompt, or one per prompt"
                )
    interpret_escapes(args, "prompt", "answer", "wrong")
    try:
        common: dict[str, Any] = {
            "heads": args.heads,
            "positions": args.positions,
            "batch_size": args.batch_size,
            "progress": not args.quiet,
        }
        if args.task is not None:
            task = mp.load_task(args.task)
            task = task.with_shots(task_shots(task, args.shots))
            if args.n_items is not None:
                task = task.subset(args.n_items, seed=0 if args.seed is None else args.seed)
            model = load(args.model, args.device, args.dtype, args.kind)
            result = mp.direct_logit_attribution(model, task, **common)
        else:
            # One answer for every prompt is passed as a string, as the API takes it.
            answer: Any = list(args.answer)
            wrong: Any = list(args.wrong)
            answer = answer[0] if len(answer) == 1 else answer
            wrong = wrong[0] if len(wrong) == 1 else wrong
            model = load(args.model, args.device, args.dtype, args.kind)
            metric = mp.logit_diff(answer, wrong)
            prompts = list(args.prompt)
            result = mp.direct_logit_attribution(model, prompts, metric, **common)
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        # the library's way out names its Python argument; the shell's is --prompt/--answer
        return fail(
            str(err).replace(
                "Pass metric=mp.logit_diff(answer, wrong) with other wrong answers.",
                "Give prompts with their answers and wrong answers instead "
                "(--prompt/--answer/--wrong).",
            )
        )
    problem = write_run_folder("dla", args, result, "dla.png")
    return fail(problem) if problem else 0
