"""``mechprobe heads``: score every head as a previous-token, duplicate-token and induction head;
writes result.json, heads.png and report.md into ``--out`` (and patterns.json, patterns.png with
``--patterns N``: the best N heads of each kind looked at on the first prompt).

Example::

    mechprobe heads --out runs/heads                        # repeated random tokens
    mechprobe heads --prompt "The cat sat. The cat sat." --kinds induction --patterns 2 --out runs/cat
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mechprobe.cli._arguments import (
    add_layers_argument,
    add_model_argument,
    add_run_arguments,
    comma_choices,
    command_error,
    load,
    output_problem,
    positive_int,
)
from mechprobe.cli._run_folder import write_run_folder
from mechprobe.cli.lens import interpret_escapes

_KINDS = ("previous_token", "duplicate_token", "induction")

_HELP = """\
Score every head by where it looks: the share of its attention on each kind's targets, averaged
over the queries that have any (previous_token: the token before; duplicate_token: earlier copies
of the query's token; induction: the tokens that followed those copies), beside the share that
even attention would give.

Without --prompt, the heads are read on Olsson et al.'s repeated random tokens (--n-prompts
sequences of BOS, --seq-len random tokens and the same again); with --prompt (repeatable), on
those prompts, wherever their tokens repeat. Backslash escapes \\n, \\t and \\\\ are interpreted
(--raw keeps them).
"""


def _at_least_two(text: str) -> int:
    """``--seq-len``: a previous-token or induction pattern needs two tokens per half (checked
    here, not after the model has loaded)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, not {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``mechprobe heads`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "heads",
        help="head scores: previous-token, duplicate-token and induction heads",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt", action="append", default=[], help="prompt (repeat)")
    parser.add_argument(
        "--kinds",
        type=comma_choices(_KINDS, "kinds"),
        default=list(_KINDS),
        help=f"comma-separated: {','.join(_KINDS)} (default all three)",
    )
    add_layers_argument(parser, "layers whose heads are scored")
    parser.add_argument(
        "--seq-len", type=_at_least_two, help="random tokens per half, at least 2 (default 50)"
    )
    parser.add_argument("--n-prompts", type=positive_int, help="random sequences (default 10)")
    parser.add_argument(
        "--patterns",
        type=positive_int,
        metavar="N",
        help="also draw the attention patterns of the best N heads of each kind on the first "
        "prompt (or random sequence): patterns.json, patterns.png",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    add_model_argument(parser)
    add_run_arguments(
        parser, batch_size="prompts per forward pass", seed="seed of the random tokens", raw=True
    )
    parser.set_defaults(func=main, seed=None)  # None: not given, so refused where it does nothing


def main(args: argparse.Namespace) -> int:
    """Score the heads on the parsed arguments and write result.json, heads.png, report.md."""
    import mechprobe as mp

    def fail(message: str) -> int:
        return command_error("heads", message)

    problem = output_problem(args.out, folder=True)
    if problem:  # before the model loads
        return fail(f"--out: {problem}")
    if args.prompt and (args.seq_len is not None or args.n_prompts is not None):
        return fail("--seq-len and --n-prompts shape random tokens: drop them with --prompt")
    if args.prompt and args.seed is not None:
        return fail("--seed draws the random tokens, which --prompt replaces: drop it")
    interpret_escapes(args, "prompt")
    try:
        model = load(args.model, args.device, args.dtype, args.kind)
        result = mp.head_scores(
            model,
            list(args.prompt) or None,
            kinds=args.kinds,
            layers=args.layers,
            seq_len=50 if args.seq_len is None else args.seq_len,
            n_prompts=10 if args.n_prompts is None else args.n_prompts,
            batch_size=args.batch_size,
            progress=not args.quiet,
            seed=0 if args.seed is None else args.seed,
        )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        message = str(err).replace("prompts=None", "no --prompt").replace("seq_len", "--seq-len")
        return fail(
            message.replace("n_prompts", "--n-prompts").replace(
                "pass prompts", "pass --prompt texts"
            )
        )
    problem = write_run_folder("heads", args, result, "heads.png")
    if problem:
        return fail(problem)
    return _write_patterns(model, result, args, fail) if args.patterns else 0


#: Panels of patterns.png at most (``--patterns 1000`` on SmolLM2 drew 150 panels).
_MAX_PANELS = 12


def _write_patterns(model: Any, result: Any, args: argparse.Namespace, fail: Any) -> int:
    """``--patterns N``: the best N heads of each kind (each once) on the first prompt, as
    patterns.json and patterns.png (the first 12), and a section of report.md whose table says
    which kind each head was picked for, with its score."""
    import numpy as np
    import torch

    import mechprobe as mp

    picked: dict[tuple[int, int], list[str]] = {}
    for kind in result.kinds:
        for layer, head, score in result.top(kind, args.patterns):
            picked.setdefault((layer, head), []).append(f"{kind} {score:.2f}")
    sites = [mp.Site("pattern", layer, head=head) for layer, head in picked]
    # a copy: the result's token ids are read-only, which torch warns about
    first = torch.as_tensor(np.array(result.tokens[0]))[None]
    prompt = args.prompt[0] if args.prompt else mp.Batch.from_tokens(first)
    looks = mp.attention_patterns(model, prompt, sites=sites, progress=False)
    summary = looks.summary()
    summary.insert(3, "picked_as", ["; ".join(kinds) for kinds in picked.values()])
    table = summary.to_string(index=False)
    drawn = min(len(sites), _MAX_PANELS)
    note = f" (patterns.png draws the first {drawn})" if drawn < len(sites) else ""
    folder = Path(args.out)
    try:
        looks.save(folder / "patterns.json")
        looks.plot(sites=list(looks.sites[:drawn]), max_panels=drawn).savefig(
            folder / "patterns.png", dpi=150, bbox_inches="tight"
        )
        with open(folder / "report.md", "a", encoding="utf-8") as report:
            report.write(
                f"\n## Attention patterns (`patterns.json`)\n\nThe best {args.patterns} head(s) "
                f"of each kind on the first prompt: {looks._describe()}{note}.\n\n```\n{table}\n"
                "```\n\n![patterns.png](patterns.png)\n"
            )
    except OSError as err:
        return fail(f"cannot write {folder}: {err}")
    except ValueError as err:  # the result's own message names the file
        return fail(str(err))
    print()
    print(table)
    print(f"\nwrote {folder / 'patterns.json'} and {folder / 'patterns.png'}{note}")
    return 0
