"""``mechprobe train-lens``: train a tuned lens and save it for ``mechprobe lens --lens FILE``.

Example::

    mechprobe train-lens --save smollm2.safetensors                  # 16,384 tokens, 64 steps
    mechprobe train-lens --tokens 65536 --checkpoint runs/lens --compare 1024 \\
        --save smollm2-64k.safetensors --export runs/lens-folder    # resumable; then checked
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    comma_choices,
    load,
    nonnegative_float,
    nonnegative_int,
    output_problem,
    positive_float,
    positive_int,
)

_KINDS = ("resid_pre", "resid_mid", "resid_post")
_CORPUS = ("train", "heldout", "all")

_HELP = """\
Train a tuned lens (Belrose et al.): one affine translator per residual site, trained so that
each layer's translated state, read through the final norm and unembedding, predicts what the
model's output does (the mean KL(final || lens) over tokens), with the paper's recipe (SGD with
Nesterov momentum, a linear decay, weight decay towards the identity). The lens is written to
--save, a .safetensors file that `mechprobe lens --lens FILE`, mechprobe.TunedLens.load and
every lens= argument read; --export DIR also writes the tuned-lens package's folder.

The default text is the training split of the bundled State of the Union corpus; --text takes a
.txt file or a folder of them. --compare N then reads N tokens of held-out text (the corpus's
held-out split, or --compare-text) through the logit lens and the new one, layer by layer, with
standard errors over windows. With --checkpoint DIR an interrupted run resumes where it stopped
when the same command is run again.
"""

# The training settings a checkpoint records, as the flags that set them.
_SETTINGS = {
    "text_sha256": "the text's windows (--text, --tokens, --seq-len, --tokens-per-step, --seed)",
    "n_tokens": "--tokens",
    "tokens_per_step": "--tokens-per-step",
    "seq_len": "--seq-len",
    "checkpoint_every": "--checkpoint-every",
    "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup-steps",
    "optimizer": "--optimizer",
    "precision": "--precision",
    "momentum": "--momentum",
    "sites": "--sites",
    "lr": "--lr",
    "seed": "--seed",
}


def _compare_tokens(text: str) -> int:
    """``--compare``: 0 (no comparison) or at least 2 tokens (a window needs two)."""
    value = 0 if text.strip() == "0" else positive_int(text)
    if value == 1:
        raise argparse.ArgumentTypeError("must be 0 (no comparison) or at least 2 tokens, not 1")
    return value


def _momentum(text: str) -> float:
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text!r}")
    return value


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
        "--export",
        metavar="DIR",
        help="also write the tuned-lens package's folder (config.json + params.pt) here",
    )
    parser.add_argument(
        "--text",
        default="train",
        help="'train' (the default corpus's training split, the default), 'all', a .txt file "
        "or a folder of .txt files",
    )
    parser.add_argument(
        "--sites",
        type=comma_choices(_KINDS, "site kinds"),
        default=None,
        help="comma-separated residual kinds to translate: resid_pre, resid_mid, resid_post "
        "(default: every kind the model has; resid_pre beyond layer 0 is read with the "
        "resid_post translator one layer down, the same vector)",
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
        "--momentum", type=_momentum, default=0.9, help="SGD momentum or Adam's beta1 (0.9)"
    )
    parser.add_argument(
        "--weight-decay",
        type=nonnegative_float,
        default=1e-3,
        help="decay towards the identity translator (default 0.001)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=nonnegative_int,
        help="linear warm-up steps (default 0 for sgd, a fifth of the steps for adam)",
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
        type=_compare_tokens,
        default=0,
        metavar="N",
        help="then compare with the logit lens on N held-out tokens, in whole windows of "
        "--seq-len (default 0: no comparison)",
    )
    parser.add_argument(
        "--compare-text",
        default="heldout",
        metavar="TEXT",
        help="the text --compare reads: 'heldout' (the corpus's held-out split, the default), "
        "a .txt file or a folder",
    )
    parser.add_argument(
        "--compare-json", metavar="PATH", help="write the comparison here (.json or .npz)"
    )
    add_model_argument(parser)
    add_run_arguments(parser, batch_size="rows per forward pass", seed="seed of the windows' order")
    parser.set_defaults(func=main)


def _fail(message: str) -> int:
    """Print the error with this command's flags for the library's names (not the shared
    rewriting, which reads "window" as another command's --window) and return 2."""
    keys = "|".join(map(re.escape, _SETTINGS))
    message = re.sub(rf"(?<![\w-])({keys})(?![\w])", lambda m: _SETTINGS[m.group(1)], message)
    message = message.replace("text=", "--text ")
    print(f"mechprobe train-lens: error: {message}", file=sys.stderr)
    return 2


def _text_problem(flag: str, text: str) -> str | None:
    """Why ``text`` cannot be read (checked before the model loads), or None."""
    if text in _CORPUS or Path(text).expanduser().exists():
        return None
    return (
        f"{flag} {text}: no such file or folder; pass 'train', 'heldout', 'all', a .txt file "
        "or a folder of them"
    )


def _loss_line(info: dict[str, Any], checkpoint: str | None) -> str:
    losses, documents, steps = info["loss_per_step"], info["documents"], info["steps"]
    resumed = int(info.get("resumed_at") or 0)
    if resumed >= steps:
        how = f"already trained: read from the checkpoint in {checkpoint} ({steps} steps)"
    else:
        how = f"trained {info['tokens']:,} tokens in {steps} steps"
        if resumed:
            how += f", resumed from {checkpoint} at step {resumed}"
        how += f" ({info['wall_s']:.0f} s this run)"
    return (
        f"{how}; windows from {documents} document{'s' if documents != 1 else ''}, "
        f"{info['precision']} products; summed KL over translators {losses[0]:.1f} -> "
        f"{losses[-1]:.1f} nats"
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
    return _columns(rows)


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def _comparison_table(cmp: Any) -> str:
    """Per compared site: each lens's KL and precision@1, ± one standard error over windows."""
    header = ["site"]
    for stat in ("KL", "p@1"):
        header += [f"{stat} {name}" for name in cmp.lenses]
    rows = [header]
    sem = cmp.precision_sem
    for e, (kind, layer) in enumerate(zip(cmp.sites, cmp.layers, strict=True)):
        row = [f"{kind}@{layer}"]
        row += [f"{cmp.kl[i, e]:.3f} ± {cmp.kl_sem[i, e]:.3f}" for i in range(len(cmp.lenses))]
        row += [
            f"{cmp.precision[i, e]:.3f}" + ("" if sem is None else f" ± {sem[i, e]:.3f}")
            for i in range(len(cmp.lenses))
        ]
        rows.append(row)
    return _columns(rows)


def main(args: argparse.Namespace) -> int:
    """Train the lens on the parsed arguments, save it, and print its training (and comparison)."""
    import mechprobe as mp

    if not args.save.endswith(".safetensors"):
        return _fail(f"--save {args.save}: a tuned lens is saved as a .safetensors file")
    problem = (
        output_problem(args.save)
        or (args.checkpoint and output_problem(args.checkpoint, folder=True))
        or (args.export and output_problem(args.export, folder=True))
        or (args.compare_json and output_problem(args.compare_json))
        or _text_problem("--text", args.text)
        or (args.compare and _text_problem("--compare-text", args.compare_text))
    )
    if problem:  # before the model loads and the lens trains
        return _fail(problem)
    if args.tokens_per_step % args.seq_len:
        return _fail(
            f"--tokens-per-step ({args.tokens_per_step}) must be a multiple of --seq-len "
            f"({args.seq_len})"
        )
    if args.compare and args.compare_text == "heldout" and args.text in ("heldout", "all"):
        return _fail(
            f"--text {args.text} trains on the held-out addresses that --compare reads: the "
            "comparison would be on training text; train on 'train' (the default), or pass "
            "--compare-text with text of your own"
        )
    if args.export and args.sites is not None and "resid_pre" not in args.sites:
        return _fail(
            "--export writes the tuned-lens format, whose first translator reads the "
            "embeddings (resid_pre 0): add resid_pre to --sites"
        )
    if args.compare_json and not args.compare_json.endswith((".json", ".npz", ".safetensors")):
        return _fail("--compare-json must name a .json, .npz or .safetensors file")
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
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            precision=args.precision,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        lens.save(args.save)
        if args.export:
            lens.save_tuned_lens(args.export, model)
    except KeyboardInterrupt:
        where = (
            f"run the same command again to resume from the checkpoint in {args.checkpoint}"
            if args.checkpoint
            else "nothing was saved (--checkpoint DIR makes a run resumable)"
        )
        print(f"\nmechprobe train-lens: interrupted; {where}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return _fail(str(err))
    losses = lens.info["loss_per_step"]
    print(_loss_line(lens.info, args.checkpoint))
    if losses[-1] > losses[0]:  # the API warns from 30 steps on; any rise is worth a line here
        print(
            f"mechprobe train-lens: warning: the loss rose ({losses[0]:.1f} -> {losses[-1]:.1f} "
            "nats): a lower --lr, or more --tokens",
            file=sys.stderr,
        )
    print("mean KL(final || lens) of the last step, nats:")
    print(_kl_table(lens.info))
    print(f"wrote {args.save}" + (f" and {args.export}" if args.export else ""))
    if not args.compare:
        return 0
    try:
        # resid_post where it was trained (the logit lens's usual site), else every kind
        kinds = ["resid_post"] if "resid_post" in lens.layers else list(lens.layers)
        cmp = mp.compare_lenses(
            model,
            {"logit": "logit", "tuned": lens},
            args.compare_text,
            sites=kinds,
            n_tokens=args.compare,
            seq_len=min(args.seq_len, args.compare),
            batch_size=args.batch_size,
            progress=not args.quiet,
            seed=args.seed,
        )
        if args.compare_json:
            cmp.save(args.compare_json)
    except (ValueError, OSError) as err:
        return _fail(f"--compare (the lens is saved in {args.save}): {err}")
    print(
        f"{args.compare_text} text, {cmp.n_positions} positions of {cmp.n_windows} windows of "
        f"{min(args.seq_len, args.compare)} tokens ({cmp.n_documents} documents), ± one "
        "standard error over windows:"
    )
    print(_comparison_table(cmp))
    if args.compare_json:
        print(f"wrote {args.compare_json}")
    return 0
