"""``mechprobe predict``: what the model says next after a prompt, and how it scores given answers
(TransformerLens's ``test_prompt`` from the shell); prints the report, and with ``--out`` writes
result.json, predict.png and report.md.

Example::

    mechprobe predict --prompt "Q: What is the capital of France?\\nA:" --answer " Paris" \\
        --answer " Rome"
    mechprobe predict --prompt "The Eiffel Tower is in" --prompt "The Colosseum is in" \\
        --answer " Paris" --answer " Rome" --top-k 5 --out runs/predict
"""

from __future__ import annotations

import argparse
from typing import Any

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    command_error,
    load,
    nonnegative_int,
    output_problem,
    positive_int,
)
from mechprobe.cli._run_folder import write_run_folder
from mechprobe.cli.lens import interpret_escapes

_HELP = """\
The most probable next tokens after each prompt, with their probabilities, logits and the
entropy; and each --answer scored there by teacher forcing: its log-probability, whether greedy
decoding says it, and each of its tokens' rank and probability with the most probable tokens
where it is predicted.

With one --prompt, every --answer is a candidate answer to it (as test_prompt takes them). With
several, give one --answer for all of them or one each (in order). Backslash escapes \\n, \\t and
\\\\ are interpreted (--raw keeps them). Answers usually start with a space (" Paris").
"""


def add_parser(sub: Any) -> None:
    """Register ``mechprobe predict`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "predict",
        help="the next tokens after prompts, and given answers scored (test_prompt)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument(
        "--answer", action="append", default=[], help="answer (repeat; see above for how many)"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=10, help="next tokens listed (default 10)"
    )
    parser.add_argument(
        "--alternatives",
        type=nonnegative_int,
        default=3,
        help="most probable tokens listed at each answer token (default 3; at most --top-k)",
    )
    parser.add_argument(
        "--no-bos",
        action="store_true",
        help="no BOS token before the prompts (text that must start as written)",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="also write result.json, predict.png and report.md here"
    )
    add_model_argument(parser)
    add_run_arguments(parser, batch_size="prompts per forward pass", raw=True)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Score the prompts, print the report, and write the folder when ``--out`` is given."""
    import mechprobe as mp

    def fail(message: str) -> int:
        return command_error("predict", message)

    if args.out is not None:
        problem = output_problem(args.out, folder=True)
        if problem:  # before the model loads
            return fail(f"--out: {problem}")
    if not args.prompt:
        return fail("give at least one --prompt")
    n = len(args.prompt)
    if args.answer and n > 1 and len(args.answer) not in (1, n):
        return fail(
            f"got {len(args.answer)} --answer for {n} --prompt: with several prompts pass one "
            "answer for all of them, or one each (several candidates: one --prompt)"
        )
    if any(answer == "" for answer in args.answer):
        return fail("an --answer is empty: give the text that follows the prompt (' Paris')")
    interpret_escapes(args, "prompt", "answer")
    answers: Any = None
    if args.answer and n == 1:
        answers = [list(args.answer)]  # the candidates of the one prompt
    elif args.answer:
        answers = list(args.answer) * n if len(args.answer) == 1 else list(args.answer)
    try:
        model = load(args.model, args.device, args.dtype, args.kind)
        result = mp.predict(
            model,
            list(args.prompt),
            answers,
            top_k=args.top_k,
            prepend_bos=False if args.no_bos else None,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return fail(str(err))
    print(result.report(k=args.top_k, alternatives=args.alternatives))
    if args.out is None:
        return 0
    print()
    problem = write_run_folder("predict", args, result, "predict.png")
    return fail(problem) if problem else 0
