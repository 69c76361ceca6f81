"""``mechprobe patch``: activation patching of sites or heads x positions, or path patching of
senders to receivers (``--receivers``), exact (batched) or by attribution, each cell beside
random-direction controls; writes result.json, patch.png and report.md into ``--out``.

Example::

    mechprobe patch --clean "The capital of France is" --corrupt "The capital of Poland is" \\
        --answer " Paris" --wrong " Warsaw" --sites head --positions last --out runs/heads
    mechprobe patch ... --sites head --receivers final,q --method attribution --out runs/paths
"""

from __future__ import annotations

import argparse
from typing import Any

from mechprobe.cli._arguments import (
    add_layers_argument,
    add_model_argument,
    add_run_arguments,
    byte_size,
    command_error,
    layers_type,
    load,
    nonnegative_int,
    output_problem,
    positions_type,
    positive_int,
    site_kind_problem,
)
from mechprobe.cli._run_folder import write_run_folder
from mechprobe.cli.lens import interpret_escapes

_HELP = """\
Patch each (site, position) cell of the corrupt run with the clean run's activation (denoising,
the default) or the reverse (--direction noising), many cells per forward pass, and report the
metric beside random-direction controls of the same norm and its spread over prompt pairs.
--method attribution estimates every cell from one forward and backward pass per pair instead.

Sites: resid_pre, resid_mid, mlp_in (what the MLP alone reads: a patch there reaches only the
MLP), resid_post, attn_out, mlp_out (every layer) and the head kinds head
(z), q, k, v, pattern, head_out (every layer x head; k and v name key/value heads). Backslash
escapes \\n, \\t and \\\\ in prompts and answers are interpreted (--raw keeps them).

Path patching: with --receivers (final, q, k, v, mlp_in), --sites are the senders (head, the
default there, mlp_out, attn_out, embed: the embeddings' write) and each sender -> receiver path is patched through the direct
path only (everything else frozen), at every position by default, or with the MLPs live
(--live-mlps, Wang et al.'s default); --method attribution estimates every path from one forward
and backward pass per pair (edge attribution patching).
"""


def _named_position(text: str) -> tuple[str, int | list[int]]:
    """``"S2=10,10,12"`` -> ``("S2", [10, 10, 12])``; ``"END=-1"`` -> ``("END", -1)``."""
    name, sep, value = text.partition("=")
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if not sep or not name.strip() or not numbers:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=INTS: write e.g. S2=10,10,12 (one int per pair) or END=-1"
        )
    return name.strip(), numbers[0] if len(numbers) == 1 else numbers


def add_parser(sub: Any) -> None:
    """Register ``mechprobe patch`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "patch",
        help="activation/attribution patching of sites and heads, with random controls",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clean", action="append", required=True, help="clean prompt (repeat)")
    parser.add_argument(
        "--corrupt", action="append", required=True, help="corrupt prompt, one per --clean"
    )
    parser.add_argument(
        "--answer",
        action="append",
        required=True,
        help="the clean answer (a single token): one shared by every pair, or one per --clean",
    )
    parser.add_argument(
        "--wrong",
        action="append",
        default=[],
        help="the corrupt answer, as many as --answer: the metric is logit(answer) - "
        "logit(wrong) (default: the answer's probability)",
    )
    parser.add_argument(
        "--sites",
        help="comma-separated site kinds (default resid_pre; with --receivers, the senders: head)",
    )
    add_layers_argument(parser, "layers patched")
    parser.add_argument(
        "--positions",
        type=positions_type("all", whole=True),
        default=None,
        help="'last' or -1 (each prompt's last token, the default; with --receivers 'all', as "
        "mp.path_patch: every path at every position), 'all' (each position a cell), 'whole' "
        "(every position at once, one cell per site; not path patching), an int or "
        "comma-separated ints; write lists that start with a minus as --positions=-3,-1",
    )
    parser.add_argument(
        "--position",
        action="append",
        type=_named_position,
        default=[],
        metavar="NAME=INTS",
        help="a position by name, one column each (repeat): NAME=INT for every pair, or one int "
        "per pair, e.g. --position S2=10,10,12 --position END=-1 (templates that put a word at "
        "different offsets); instead of --positions",
    )
    parser.add_argument(
        "--receivers",
        help="path patching: comma-separated receivers (final, q, k, v, mlp_in); --sites are senders",
    )
    parser.add_argument(
        "--receiver-layers",
        type=layers_type,
        help="path patching: the layers --receivers cover (default: --layers, which then "
        "cover the senders alone)",
    )
    parser.add_argument(
        "--live-mlps",
        action="store_true",
        help="path patching: keep the MLPs live, freezing the attention layers only (Wang et "
        "al.'s default: sender -> MLP -> receiver paths count); default: the direct path only",
    )
    parser.add_argument(
        "--method",
        choices=("exact", "attribution"),
        default="exact",
        help="exact: one patched run per cell (default); attribution: every cell from one "
        "forward and backward pass per pair (a first-order estimate)",
    )
    parser.add_argument(
        "--direction",
        choices=("denoising", "noising"),
        default="denoising",
        help="denoising: clean activations into the corrupt run (default); noising: corrupt "
        "into the clean run",
    )
    parser.add_argument(
        "--n-random", type=nonnegative_int, default=3, help="random controls (default 3)"
    )
    parser.add_argument(
        "--cells-per-batch",
        type=positive_int,
        help="at most this many cells per forward pass of --method exact (default 256)",
    )
    parser.add_argument(
        "--memory-budget",
        type=byte_size,
        help="bytes a forward pass of --method exact may hold, e.g. 512MiB (default 1GiB): passes take "
        "fewer cells on long prompts",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output folder (created with its parents)"
    )
    add_model_argument(parser)
    add_run_arguments(parser, seed="seed of the random controls", raw=True)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the patching on the parsed arguments and write result.json, patch.png, report.md."""
    import mechprobe as mp

    def fail(message: str) -> int:
        return command_error("patch", message)

    problem = output_problem(args.out, folder=True)
    if problem:  # before the model loads
        return fail(f"--out: {problem}")
    if len(args.clean) != len(args.corrupt):
        return fail(f"got {len(args.clean)} --clean and {len(args.corrupt)} --corrupt prompts")
    if len(args.answer) not in (1, len(args.clean)):
        return fail(
            f"got {len(args.answer)} --answer for {len(args.clean)} prompt pairs: pass one shared "
            "by every pair, or one per --clean"
        )
    if args.wrong and len(args.wrong) not in (1, len(args.clean)):
        return fail(
            f"got {len(args.wrong)} --wrong for {len(args.clean)} prompt pairs: pass one shared "
            "by every pair, or one per --clean"
        )
    for flag in ("cells_per_batch", "memory_budget"):
        if args.method == "attribution" and getattr(args, flag) is not None:
            return fail(
                "--method attribution runs one forward and backward pass per prompt pair, "
                f"whatever the cells: drop --{flag.replace('_', '-')}"
            )
    if args.position:
        names = [name for name, _ in args.position]
        if args.positions is not None:
            return fail("--position names positions instead of --positions: pass one of them")
        if len(set(names)) < len(names):
            return fail(f"--position names {names}: give each name once")
        too_many = [
            n for n, at in args.position if isinstance(at, list) and len(at) != len(args.clean)
        ]
        if too_many:
            return fail(
                f"--position {too_many[0]} gives {len(dict(args.position)[too_many[0]])} ints for "
                f"{len(args.clean)} prompt pairs: pass one int for every pair, or one per --clean"
            )
        args.positions = dict(args.position)
    if args.positions is None:  # the API's defaults: the last token; every path at every position
        args.positions = "all" if args.receivers is not None else -1
    for flag, given in (("receiver-layers", args.receiver_layers is not None),
                        ("live-mlps", args.live_mlps)):  # fmt: skip
        if given and args.receivers is None:
            return fail(f"--{flag} applies to path patching: add --receivers, or drop it")
    if args.live_mlps and args.method == "attribution":
        return fail(
            "--live-mlps applies to --method exact: edge attribution estimates direct paths "
            "(an MLP is a node of its graph): drop --live-mlps, or use --method exact"
        )
    if args.positions == "whole" and args.receivers is not None:
        return fail(
            "--positions whole patches each site at every position at once, which path patching "
            "(--receivers) does not do: pass all, last or positions, or drop --receivers"
        )
    if args.receivers is None:
        problem = site_kind_problem("--sites", args.sites)
    else:  # path patching: writers send, readers (or the unembedding) receive
        kinds = [kind for kind in mp.SENDER_KINDS if kind != "embed"]  # "embed" is no site kind
        problem = site_kind_problem(
            "--sites", args.sites, "embed", allowed=kinds, where="as senders"
        ) or site_kind_problem("--receivers", args.receivers, "final", allowed=mp.RECEIVER_KINDS)
        named = {r.strip() for r in args.receivers.split(",") if r.strip()}
        if not problem and args.receiver_layers is not None and named <= {"final"}:
            problem = (
                "--receiver-layers picks the layers of --receivers' q/k/v/mlp_in sites, but "
                "--receivers is final only (the unembedding has no layer): drop it"
            )
    if problem:  # a kind the analysis refuses needs no model to be told
        return fail(problem)
    positions = None if args.positions == "whole" else args.positions
    interpret_escapes(args, "clean", "corrupt", "answer", "wrong")
    clean, corrupt = list(args.clean), list(args.corrupt)
    # One answer for every pair is passed as a string, so the report shows it once; each of
    # --answer and --wrong is one shared or one per pair, as in dla and the API.
    answer: Any = args.answer[0] if len(args.answer) == 1 else list(args.answer)
    wrong: Any = args.wrong[0] if len(args.wrong) == 1 else list(args.wrong)
    try:
        model = load(args.model, args.device, args.dtype, args.kind)
        metric = mp.logit_diff(answer, wrong) if args.wrong else mp.answer_prob(answer)
        given = args.sites or ("head" if args.receivers is not None else "resid_pre")
        sites = [s.strip() for s in given.split(",") if s.strip()]
        common: dict[str, Any] = {
            "layers": args.layers,
            "n_random": args.n_random,
            "seed": args.seed,
            "progress": not args.quiet,
        }
        if args.memory_budget is not None:
            common["memory_budget"] = args.memory_budget
        if args.cells_per_batch is not None:  # --method exact only (checked above)
            common["cells_per_batch"] = args.cells_per_batch
        result: mp.PatchResult | mp.PathPatchResult
        if args.receivers is not None:
            receivers = [r.strip() for r in args.receivers.split(",") if r.strip()]
            result = mp.path_patch(
                model,
                clean,
                corrupt,
                sites,
                receivers,
                metric,
                positions=args.positions,  # never "whole" here (refused above)
                receiver_layers=args.receiver_layers,
                direction=args.direction,
                method=args.method,
                freeze_mlps=not args.live_mlps,
                **common,
            )
        elif args.method == "attribution":
            result = mp.attribution_patch(
                model, clean, corrupt, sites, positions, metric,
                direction=args.direction, **common,
            )  # fmt: skip
        else:
            result = mp.patch(
                model,
                clean,
                corrupt,
                sites,
                positions,
                metric,
                direction=args.direction,
                **common,
            )
    except (ValueError, TypeError, mp.ModelLoadError) as err:
        return fail(str(err))
    problem = write_run_folder("patch", args, result, "patch.png")
    return fail(problem) if problem else 0
