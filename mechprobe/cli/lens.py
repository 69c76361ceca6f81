"""``mechprobe lens``: the logit lens from the command line (table, heatmap, JSON).

Example::

    mechprobe lens "Q: What is the capital of Poland?\\nA:" --target " Warsaw" --target " Poland" \\
        --positions all --plot lens.png --json lens.json
    mechprobe lens "The capital of Poland is" --target " Warsaw" --out runs/poland
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from mechprobe.cli._arguments import (
    add_layers_argument,
    add_lens_argument,
    add_model_argument,
    add_run_arguments,
    command_error,
    figure_problem,
    lens_spec,
    load,
    output_problem,
    positions_type,
    positive_int,
    site_kind_problem,
)
from mechprobe.cli._run_folder import write_run_folder

_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}
_HELP = """\
Decode every layer's residual stream through the model's final norm and unembedding (the logit
lens), or through a tuned lens or a Patchscope (--lens; the token-identity prompt unless
--patchscope-prompt, --patchscope-placeholder and --patchscope-layer say otherwise).

Backslash escapes \\n, \\t and \\\\ in PROMPT, --target and the --patchscope-* texts are
interpreted, because a shell passes "\\n" inside quotes as two characters; --raw keeps them
literal. Each --target is scored for every prompt; a target of several tokens is scored by teacher
forcing (summed log-probability).
"""


def unescape(text: str) -> str:
    r"""Interpret ``\n``, ``\t`` and ``\\`` the way a Python string literal would.

    Example:
        >>> unescape("Q: hi\\nA:") == "Q: hi\nA:"
        True
    """
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def interpret_escapes(args: argparse.Namespace, *names: str) -> None:
    """Unescape the text arguments ``names`` in place (unless ``--raw``), once: the analysis
    and report.md then read the same text (the report recorded the escapes as typed).

    Example:
        >>> args = argparse.Namespace(raw=False, prompt=["a\\\\nb"], answer=None)
        >>> interpret_escapes(args, "prompt", "answer"); args.prompt
        ['a\\nb']
    """
    if args.raw:
        return
    for name in names:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [unescape(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, unescape(value))


def add_parser(sub: Any) -> None:
    """Register ``mechprobe lens`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "lens",
        help="logit lens: what each layer would predict",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt(s) to decode")
    parser.add_argument(
        "--target", action="append", default=[], help="continuation to score (repeatable)"
    )
    parser.add_argument(
        "--sites",
        default="resid_post",
        help="comma-separated site kinds: resid_pre, resid_mid, resid_post, attn_out, mlp_out "
        "(default: resid_post), or hook names",
    )
    parser.add_argument(
        "--positions",
        type=positions_type("all"),
        default=-1,
        help="'last' or -1 (each prompt's last token, the default), 'all', an int or "
        "comma-separated ints; write lists that start with a minus as --positions=-3,-1",
    )
    add_layers_argument(parser, "layers decoded")
    parser.add_argument(
        "--top-k", type=positive_int, default=10, help="tokens kept per cell (default 10)"
    )
    add_lens_argument(parser)
    add_model_argument(parser)
    parser.add_argument(
        "--plot", metavar="PNG", help="write the first prompt's layer x position heatmap here"
    )
    parser.add_argument(
        "--color", choices=("prob", "rank"), default="prob", help="heatmap colour (default prob)"
    )
    parser.add_argument(
        "--trajectory",
        metavar="PNG",
        help="write the targets' rank across layers at the last token, a panel per prompt "
        "(the first six)",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="write the full result (.json, .npz or .safetensors)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write result.json, lens.png and report.md here, as the other subcommands do "
        "(created with its parents)",
    )
    add_run_arguments(parser, batch_size="rows per forward pass", raw=True)
    parser.set_defaults(func=main)


def _table(result: Any, prompt: int, site: str) -> str:
    """Per layer at the prompt's last token: top-1, entropy, KL and each target's rank/log-prob."""
    last = len(result.prompt_tokens[prompt]) - 1
    cols = [k for k, p in enumerate(result.positions[prompt]) if p == last]
    names = result.targets[prompt]
    header = ["layer", "top-1", "p", "H", "KL"]
    rows = [header + [h for n in names for h in (f"{n!r} rank", "logp")]]
    for e in result.entries(site):
        row = [str(result.layers[e])]
        if cols:
            k = cols[0]
            row += [
                repr(result.text(result.top_ids[prompt, e, k, 0]))[:18],
                f"{result.top_probs[prompt, e, k, 0]:.3f}",
                f"{result.entropy[prompt, e, k]:.2f}",
                f"{result.kl_to_final[prompt, e, k]:.2f}",
            ]
        else:
            row += ["(last token not decoded)", "", "", ""]
        for t in range(len(names)):
            row += [
                str(result.target_rank[prompt, e, t]),
                f"{result.target_logprob[prompt, e, t]:.2f}",
            ]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 1 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def main(args: argparse.Namespace) -> int:
    """Run the lens on the parsed arguments; print a table; write the requested files."""
    import mechprobe as mp

    interpret_escapes(args, "prompts", "target", "patchscope_prompt", "patchscope_placeholder")
    prompts, targets = list(args.prompts), list(args.target)
    if args.trajectory and not targets:
        print("mechprobe lens: error: --trajectory needs at least one --target", file=sys.stderr)
        return 2
    if args.json and not args.json.endswith((".json", ".npz", ".safetensors")):
        print(
            "mechprobe lens: error: --json must name a .json, .npz or .safetensors file",
            file=sys.stderr,
        )
        return 2
    problem = args.out and output_problem(args.out, folder=True)
    if problem:
        print(f"mechprobe lens: error: --out: {problem}", file=sys.stderr)
        return 2
    if args.color != "prob" and not (args.plot or args.out):
        # It colours a heatmap that only --plot and --out draw: ignored before, without a word.
        print(
            "mechprobe lens: error: --color colours the heatmap of --plot or --out: add one, "
            "or drop --color",
            file=sys.stderr,
        )
        return 2
    if args.color == "rank" and not targets:
        # It colours by the first target's rank: refused after the whole run, with a traceback.
        print(
            "mechprobe lens: error: --color rank colours by the first --target's rank: add "
            "--target",
            file=sys.stderr,
        )
        return 2
    for option in ("json", "plot", "trajectory"):
        problem = getattr(args, option) and output_problem(getattr(args, option))
        if problem:
            print(f"mechprobe lens: error: --{option}: {problem}", file=sys.stderr)
            return 2
    for option in ("plot", "trajectory"):  # matplotlib would refuse them after the whole run
        problem = getattr(args, option) and figure_problem(getattr(args, option))
        if problem:
            print(f"mechprobe lens: error: --{option}: {problem}", file=sys.stderr)
            return 2
    try:
        lens = lens_spec(args, lambda text: text)  # its texts were unescaped above
    except (ValueError, TypeError, FileNotFoundError) as err:
        return command_error("lens", err)
    decoder = lens if isinstance(lens, mp.Lens) else mp.LogitLens()
    problem = site_kind_problem(
        "--sites", args.sites, allowed=decoder.kinds, where=f"with --lens {args.lens}"
    )
    if problem:  # a kind the lens cannot decode needs no model to be told
        print(f"mechprobe lens: error: {problem}", file=sys.stderr)
        return 2
    try:
        model = load(args.model, args.device, args.dtype, args.kind)
        result = mp.logit_lens(
            model,
            prompts,
            sites=[s.strip() for s in args.sites.split(",") if s.strip()],
            positions=args.positions,
            targets=[targets] * len(prompts) if targets else None,
            layers=args.layers,
            top_k=args.top_k,
            batch_size=args.batch_size,
            lens=lens,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, FileNotFoundError, mp.ModelLoadError) as err:
        return command_error("lens", err)
    for b, prompt in enumerate(prompts):
        for site in dict.fromkeys(result.sites):
            print(f"\nprompt {b} ({site}, last token): {prompt!r}")
            print(_table(result, b, site))
    # Checked before the run; a write can still fail after it (a full disk, a quota).
    try:
        if args.json:
            print(f"\nwrote {result.save(args.json)}")
        if args.plot:  # the figure --out writes as lens.png: every prompt
            result.plot(color=args.color).savefig(args.plot, dpi=150)
            print(f"wrote {args.plot}")
        if args.trajectory:
            # The API's default: the first six prompts (forty panels side by side are unreadable)
            figure = result.plot_trajectory()
            figure.savefig(args.trajectory, dpi=150)
            n = len(figure.axes)
            shown = "" if n == len(prompts) else f" (the first {n} of {len(prompts)} prompts)"
            print(f"wrote {args.trajectory}{shown}")
    except OSError as err:
        return command_error("lens", f"cannot write the output: {err}")
    except ValueError as err:  # a figure the result cannot draw: a message, not a traceback
        return command_error("lens", err)
    if args.out:
        problem = write_run_folder("lens", args, result, "lens.png", {"color": args.color})
        if problem:
            return command_error("lens", problem)
    return 0
