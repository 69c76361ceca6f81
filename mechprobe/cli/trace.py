"""``mechprobe trace``: causal tracing with noise (Meng et al. 2022, ROME) of a task or prompts;
writes result.json, trace.png and report.md into ``--out``.

Example::

    mechprobe trace --task capitals --n-items 10 --out runs/trace
    mechprobe trace --prompt "The Eiffel Tower is in the city of" --subject "The Eiffel Tower" \\
        --out runs/eiffel
"""

from __future__ import annotations

import argparse
from typing import Any

from mechprobe.cli._arguments import (
    add_layers_argument,
    add_model_argument,
    add_run_arguments,
    add_shots_argument,
    byte_size,
    command_error,
    load,
    nonnegative_int,
    output_problem,
    positive_float,
    positive_int,
    site_kind_problem,
    task_shots,
)
from mechprobe.cli._run_folder import write_run_folder
from mechprobe.cli.lens import interpret_escapes

_HELP = """\
Noise the subject's token embeddings (3 x their standard deviation, or --noise), restore each
(layer, position) state of the residual stream, MLP output or attention output from the clean run,
and report the indirect effect on the answer's probability, averaged over noise samples and
prompts, beside random-direction controls of the same norm. MLP and attention outputs are restored
in windows of --window layers (ROME: 10).

Give a task (--task: each item's argument is the subject, its answer the answer), or prompts with
their subjects (--prompt/--subject, repeatable; --answer optional: default the model's own top
token).
"""


def add_parser(sub: Any) -> None:
    """Register ``mechprobe trace`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "trace",
        help="causal tracing with noise (ROME) of a task or prompts",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", help="built-in task name or task JSON file")
    parser.add_argument("--n-items", type=positive_int, help="seeded subset of the task's items")
    add_shots_argument(parser)
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument("--subject", action="append", default=[], help="its subject (repeat)")
    parser.add_argument("--answer", action="append", default=[], help="its answer (optional)")
    parser.add_argument(
        "--sites",
        default="resid_post,mlp_out,attn_out",
        help="comma-separated state kinds: resid_pre, resid_mid, mlp_in, resid_post, mlp_out, "
        "attn_out (default resid_post,mlp_out,attn_out)",
    )
    add_layers_argument(parser, "layers traced (window centres for mlp_out/attn_out)")
    parser.add_argument(
        "--window", type=positive_int, default=10, help="window for mlp/attn (default 10)"
    )
    parser.add_argument(
        "--n-noise", type=positive_int, default=10, help="noise samples (default 10)"
    )
    parser.add_argument(
        "--noise",
        type=positive_float,
        help="the noise's standard deviation (default: 3x that of the subjects' embeddings in "
        "this run; pass one level, e.g. an earlier run's noise_level, to compare runs)",
    )
    parser.add_argument(
        "--n-random", type=nonnegative_int, default=3, help="random controls (default 3)"
    )
    parser.add_argument(
        "--cells-per-batch",
        type=positive_int,
        help="at most this many restorations per forward pass (default 256)",
    )
    parser.add_argument(
        "--memory-budget",
        type=byte_size,
        help="bytes a forward pass may hold, e.g. 512MiB (default 1GiB): passes take "
        "fewer restorations on long prompts",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    add_model_argument(parser)
    add_run_arguments(parser, seed="seed of the noise and the random controls", raw=True)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the trace on the parsed arguments and write result.json, trace.png, report.md."""
    import mechprobe as mp

    def fail(message: str) -> int:
        return command_error("trace", message)

    problem = output_problem(args.out, folder=True)
    if problem:  # before the model loads
        return fail(f"--out: {problem}")
    if (args.task is None) == (not args.prompt):
        return fail("give either --task or --prompt (with --subject), not both or neither")
    if args.prompt and len(args.subject) != len(args.prompt):
        return fail(f"got {len(args.prompt)} --prompt and {len(args.subject)} --subject")
    if args.task is not None and (args.subject or args.answer):
        return fail("--task gives each item's subject and answer: drop --subject and --answer")
    if args.task is None and args.n_items is not None:
        return fail("--n-items takes a subset of a --task's items: drop it with --prompt")
    if args.answer and len(args.answer) not in (1, len(args.prompt)):
        return fail(
            f"got {len(args.answer)} --answer for {len(args.prompt)} --prompt: pass one shared by "
            "every prompt, one per prompt, or none (the model's own top token)"
        )
    if args.task is None and args.shots is not None:
        return fail("--shots shapes a --task: drop it with --prompt")
    problem = site_kind_problem(
        "--sites",
        args.sites,
        allowed=mp.TRACE_KINDS,
        where="(heads: mechprobe patch)",
        kinds_only=True,
    )
    if problem:  # a kind the trace refuses needs no model to be told
        return fail(problem)
    interpret_escapes(args, "prompt", "subject", "answer")
    try:
        common: dict[str, Any] = {
            "sites": [s.strip() for s in args.sites.split(",") if s.strip()],
            "layers": args.layers,
            "window": args.window,
            "n_noise": args.n_noise,
            "noise": args.noise,
            "n_random": args.n_random,
            "seed": args.seed,
            "progress": not args.quiet,
        }
        if args.memory_budget is not None:
            common["memory_budget"] = args.memory_budget
        if args.cells_per_batch is not None:
            common["cells_per_batch"] = args.cells_per_batch
        if args.task is not None:
            task = mp.load_task(args.task)
            task = task.with_shots(task_shots(task, args.shots))
            if args.n_items is not None:
                task = task.subset(args.n_items, seed=args.seed)
            model = load(args.model, args.device, args.dtype, args.kind)
            result = mp.causal_trace(model, task, **common)
        else:
            model = load(args.model, args.device, args.dtype, args.kind)
            result = mp.causal_trace(
                model,
                list(args.prompt),
                list(args.subject),
                answers=(args.answer[0] if len(args.answer) == 1 else list(args.answer)) or None,
                **common,
            )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return fail(str(err))
    problem = write_run_folder("trace", args, result, "trace.png")
    return fail(problem) if problem else 0
