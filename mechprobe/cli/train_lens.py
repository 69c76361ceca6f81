"""``mechprobe train-lens``: train a tuned lens and save it for ``mechprobe lens --lens FILE``.

Example::

    mechprobe train-lens --save smollm2.safetensors                  # 16,384 tokens, 64 steps
    mechprobe train-lens --tokens 65536 --checkpoint runs/lens --compare 1024 \\
        --save smollm2-64k.safetensors                              # resumable; then checked
"""

from __future__ import annotations

import argparse
from typing import Any

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    command_error,
    load,
    nonnegative_float,
    nonnegative_int,
    output_problem,
    positive_float,
    positive_int,
)

_KINDS = ("resid_pre", "resid_mid", "resid_post")

_HELP = """\
Train a tuned lens (Belrose et al.): one affine translator per residual site, trained so that
each layer's translated state, read through the final norm and unembedding, predicts what the
model's output does (the mean KL(final || lens) over tokens), with the paper's recipe (SGD with
Nesterov momentum, a linear decay, weight decay towards the identity). The lens is written to
--save, a .safetensors file that `mechprobe lens --lens FILE`, mechprobe.TunedLens.load and
every lens= argument read.

The default text is the training split of the bundled State of the Union corpus; --text takes a
.txt file or a folder of them. --compare N then reads N tokens of the corpus's held-out split
through the logit lens and the new one, layer by layer. With --checkpoint DIR an interrupted run
resumes where it stopped when the same command is run again.
"""


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"site kinds are a comma-separated list of {', '.join(_KINDS)}; got {text!r}"
        )
    return kinds


def add_parser(sub: Any) -> None:
    """Register ``mechprobe train-lens`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "train-lens",
        help="train a tuned lens and save it (for --lens FILE)",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--save", required=True, metavar="FILE", help="where the lens goes (.safetensors)"
    )
    parser.add_argument(
        "--text",
        default="train",
        help="'train' (the default corpus's training split, the default), 'all', a .txt file "
        "or a folder of .txt files",
    )
    parser.add_argument(
        "--sites",
        type=_kinds,
        default=None,
        help="comma-separated residual kinds to translate: resid_pre, resid_mid, resid_post "
        "(default: every kind the model has)",
    )
    parser.add_argument(
        "--tokens",
        type=positive_int,
        default=16384,
        help="training tokens in all (default 16384: 64 steps; 2048 for a quick look)",
    )
    parser.add_argument(
        "--seq-len", type=positive_int, default=128, help="tokens per window (default 128)"
    )
    parser.add_argument(
        "--tokens-per-step",
        type=positive_int,
        default=256,
        help="tokens per optimiser step, a multiple of --seq-len (default 256)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd (Nesterov, the paper's; the default) or adam",
    )
    parser.add_argument(
        "--lr", type=positive_float, help="learning rate (default 1.0 for sgd, 1e-3 for adam)"
    )
    parser.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=1e-3,
        help="decay towards the identity translator (default 0.001)",
    )
    parser.add_argument(
        "--precision",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="the unembedding products' inputs (default auto: bfloat16 where the device "
        "multiplies it natively, float32 elsewhere)",
    )
    parser.add_argument(
        "--checkpoint", metavar="DIR", help="write the state here and resume from it if present"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=8,
        help="steps between checkpoints (default 8)",
    )
    parser.add_argument(
        "--compare",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="then compare with the logit lens on N held-out tokens (default 0: no comparison)",
    )
    add_model_argument(parser)
    add_run_arguments(parser, batch_size="rows per forward pass", seed="seed of the windows' order")
    parser.set_defaults(func=main)


def _loss_line(info: dict[str, Any]) -> str:
    losses, documents = info["loss_per_step"], info["documents"]
    return (
        f"trained {info['tokens']:,} tokens in {info['steps']} steps from {documents} "
        f"document{'s' if documents != 1 else ''} ({info['precision']}, {info['wall_s']:.0f} s); "
        f"summed KL over translators {losses[0]:.1f} -> {losses[-1]:.1f} nats"
    )


def _kl_table(info: dict[str, Any]) -> str:
    """The last step's mean KL per translator: a row per layer, a column per site kind."""
    per_site = info.get("last_step_kl", {})
    kinds = [k for k in _KINDS if any(key.split()[0] == k for key in per_site)]
    layers = sorted({int(key.split()[1]) for key in per_site})
    rows = [["layer", *(f"KL {k}" for k in kinds)]]
    for layer in layers:
        cells = [per_site.get(f"{k} {layer}") for k in kinds]
        rows.append([str(layer), *("" if c is None else f"{c:.2f}" for c in cells)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(args: argparse.Namespace) -> int:
    """Train the lens on the parsed arguments, save it, and print its training (and comparison)."""
    import mechprobe as mp

    def fail(message: str) -> int:
        for name, flag in (
            ("n_tokens", "--tokens"),
            ("tokens_per_step", "--tokens-per-step"),
            ("seq_len", "--seq-len"),
            ("checkpoint_every", "--checkpoint-every"),
            ("text=", "--text "),
            ("text takes", "--text takes"),
        ):
            message = message.replace(name, flag)
        return command_error("train-lens", message)

    if not args.save.endswith(".safetensors"):
        return fail(f"--save {args.save}: a tuned lens is saved as a .safetensors file")
    problem = output_problem(args.save) or (
        args.checkpoint and output_problem(args.checkpoint, folder=True)
    )
    if problem:  # before the model loads and the lens trains
        return fail(problem)
    if args.tokens_per_step % args.seq_len:
        return fail(
            f"--tokens-per-step ({args.tokens_per_step}) must be a multiple of --seq-len "
            f"({args.seq_len})"
        )
    try:
        model = load(args.model, args.device, args.dtype, args.kind)
        lens = mp.train_tuned_lens(
            model,
            args.text,
            sites=args.sites,
            n_tokens=args.tokens,
            seq_len=args.seq_len,
            tokens_per_step=args.tokens_per_step,
            optimizer=args.optimizer,
            lr=args.lr,
            weight_decay=args.weight_decay,
            precision=args.precision,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        lens.save(args.save)
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return fail(str(err))
    print(_loss_line(lens.info))
    print("mean KL(final || lens) of the last step, nats:")
    print(_kl_table(lens.info))
    print(f"wrote {args.save}")
    if args.compare:
        try:
            # resid_post where it was trained (the logit lens's usual site), else every kind
            kinds = ["resid_post"] if "resid_post" in lens.layers else list(lens.layers)
            cmp = mp.compare_lenses(
                model,
                {"logit": "logit", "tuned": lens},
                "heldout",
                sites=kinds,
                n_tokens=args.compare,
                seq_len=min(args.seq_len, args.compare),
                batch_size=args.batch_size,
                progress=not args.quiet,
                seed=args.seed,
            )
        except ValueError as err:
            return fail(f"--compare: {err}")
        print(
            f"held-out text, {cmp.n_positions} positions of {cmp.n_windows} windows "
            f"({cmp.n_documents} documents):"
        )
        print(cmp.summary().to_string(float_format=lambda v: f"{v:.3f}"))
    return 0
