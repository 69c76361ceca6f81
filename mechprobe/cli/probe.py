"""``mechprobe probe``: layer-wise probing from the command line (table, figure, JSON).

Example::

    mechprobe probe --dataset pos --out runs/pos --max-examples 3000
    mechprobe probe --dataset country --out runs/country
    mechprobe probe --dataset my_labels.csv --out runs/mine --site mlp_out
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, get_args

from mechprobe.cli._arguments import (
    add_layers_argument,
    add_model_argument,
    add_run_arguments,
    command_error,
    load,
    output_problem,
    positive_float,
    positive_int,
    site_kind_problem,
)
from mechprobe.cli._run_folder import report

_BUILT_IN = ("pos", "templated_pos", "number", "country", "is_capital")
_HELP = """\
Collect activations of a probing dataset at every layer, fit one probe per layer (per head for the
head kinds; linear, or an MLP with --mlp), and report held-out accuracy, a Hewitt & Liang control
task (one random label per word type) and the selectivity (accuracy - control accuracy).

Datasets: pos (817 English sentences tagged by spaCy en_core_web_sm, word level), templated_pos
(400 sentences, exact tags), number (400 phrases, subject number of 'The keys near the cabinet'),
country (capital-question prompts labelled by country, 30 countries x 12), is_capital (capitals vs
past-tense prompts, 180), or a label FILE (JSON, JSONL or CSV, see mechprobe.load_labels). (erase's
country and number are smaller: 20 countries, 300 phrases.) Writes OUT/result.json, OUT/probe.png,
OUT/summary.json and OUT/report.md (the settings and the mechprobe version).
"""


def add_parser(sub: Any) -> None:
    """Register ``mechprobe probe`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "probe",
        help="layer-wise linear probes with a control task",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", required=True, help=f"{'|'.join(_BUILT_IN)} or the path of a label file"
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    add_model_argument(parser)
    parser.add_argument(
        "--site",
        default="resid_post",
        help="site kind probed at every layer: resid_pre, resid_mid, mlp_in (resid_mid's "
        "value), resid_post, attn_out, mlp_out (default resid_post); or at every head: head_out "
        "(its write to the residual stream), head (its z), q, k, v; or one site, by its label "
        "('mlp_out@3', 'head_out@3, head 2') or hook name",
    )
    add_layers_argument(parser, "layers probed")
    parser.add_argument(
        "--max-examples",
        type=positive_int,
        help="a random subset of the texts with at most this many labelled examples: texts, or "
        "words for word-level data (pos); with --positions all or word_last a text gives "
        "several rows, so more rows than this are probed",
    )
    parser.add_argument(
        "--positions",
        type=_positions,
        default=-1,
        help="tokens read: last or -1 (default: each text's last token; each word's last token "
        "for word-level data), all, word_last, or ints of every text (0,-2: BOS and the "
        "token before the last; write --positions=-2,-1)",
    )
    parser.add_argument(  # the old name (one release): last, all or word_last
        "--select", type=_positions, dest="positions", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--folds", type=_folds, help="k-fold cross-validation (k >= 2) instead of a holdout"
    )
    parser.add_argument("--mlp", action="store_true", help="MLP probes instead of linear ones")
    parser.add_argument(
        "--l2", type=positive_float, default=1e-3, help="L2 penalty on the mean loss (default 1e-3)"
    )
    parser.add_argument(
        "--max-iter", type=positive_int, default=200, help="solver iterations at most (default 200)"
    )
    parser.add_argument("--scalar-mix", action="store_true", help="also fit a scalar-mix probe")
    parser.add_argument(
        "--split-by-text",
        action="store_true",
        help="keep each text's rows on one side of every split (Hewitt & Liang split by "
        "sentence; default: rows split freely)",
    )
    parser.add_argument(
        "--save-activations", action="store_true", help="also write OUT/activations/"
    )
    add_run_arguments(
        parser, batch_size="texts per forward pass", seed="sampling, split and control seed"
    )
    parser.set_defaults(func=main)


def _folds(text: str) -> int:
    """``--folds``: an int of at least 2 (one fold has nothing to hold out)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an int of at least 2, not {text!r}")
    return value


def _positions(text: str) -> int | str | list[int]:
    """``-1`` (or ``last``), ``all``, ``word_last``, an int or comma-separated ints (the same
    positions of every text, as :func:`mechprobe.collect` takes them)."""
    if text in ("-1", "last"):
        return -1
    if text in ("all", "word_last"):
        return text
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "positions must be last (or -1), all, word_last, an int or comma-separated ints "
            f"(e.g. 0,-1; write --positions=-2,-1), not {text!r}"
        ) from None
    return values[0] if len(values) == 1 else values


def _site_problem(site: str, layers: Any) -> str | None:
    """Why ``--site`` (with ``--layers``) cannot be collected, or None: known without a model.

    A kind is probed at every layer of ``--layers`` (``pattern`` is no vector to probe); a label
    (``"head_out@1, head 2"``) or a site's hook name is one site, which ``--layers`` cannot widen.

    Example:
        >>> print(_site_problem("head_out@1", "all"))
        --site 'head_out@1' names a layer of head_out, a kind of one head: name the head ('head_out@1, head 2'), or pass head_out alone to probe every head of --layers
    """
    import mechprobe as mp
    from mechprobe.core import HEAD_KINDS, SiteKind

    kinds = [kind for kind in get_args(SiteKind) if kind != "pattern"]
    try:  # a label or a hook name of a site: one site
        parsed = mp.Site.parse(site) if ("@" in site or "." in site or "hook_" in site) else None
    except ValueError as error:
        kind = site.split("@")[0]
        if "@" in site and kind in HEAD_KINDS and "head" not in site.split("@")[1]:
            return (
                f"--site {site!r} names a layer of {kind}, a kind of one head: name the head "
                f"('{kind}@1, head 2'), or pass {kind} alone to probe every head of --layers"
            )
        if "@" in site:
            return f"--site: {error}"
        parsed = None  # a hook that is no site's: collect resolves it against the model
    if parsed is not None:
        if parsed.kind not in kinds:
            return f"--site takes {', '.join(kinds)}, not {site!r} (attention patterns)"
        if layers != "all":
            return (
                f"--layers applies to a site kind; --site {site!r} names one site: drop --layers, "
                f"or pass --site {parsed.kind}"
            )
        return None
    if "," in site:
        return (
            f"--site takes one site kind, probed at every layer of --layers, not {site!r}: run "
            "once per kind."
        )
    return site_kind_problem("--site", site, allowed=kinds)


def load_dataset(name: str, seed: int = 0) -> Any:
    """A built-in dataset by name, or a label file by path.

    Example:
        >>> load_dataset("templated_pos").name
        'templated_pos'
    """
    import mechprobe as mp

    if name == "pos":
        return mp.pos_dataset()
    if name == "templated_pos":
        return mp.templated_dataset("pos", seed=seed)
    if name == "number":
        return mp.templated_dataset("number", seed=seed)
    if name in ("country", "is_capital"):
        return mp.country_dataset(target=name, seed=seed)  # type: ignore[arg-type]
    if not Path(name).is_file():
        raise ValueError(
            f"--dataset {name!r} is neither a built-in dataset ({', '.join(_BUILT_IN)}) nor a file."
        )
    return mp.load_labels(name)


def table(result: Any) -> str:
    """A compact per-layer table: accuracy, control accuracy, selectivity."""
    frame = result.to_frame()
    # "layer 10" -> "10"; heads keep their site ("head_out@3, head 2").
    names = [name.removeprefix("layer ") for name in result.entry_names()]
    width = max(5, *(len(name) for name in names))
    head = "layer" if names == [str(int(x)) for x in result.layers] else "site"
    lines = [f"{head:>{width}}  {'acc':>6}  {'control':>7}  {'select.':>7}"]

    def cell(value: float, size: int) -> str:  # a control task that was skipped: a dash
        return f"{value:{size}.3f}" if value == value else f"{'—':>{size}}"

    for name, row in zip(names, frame.itertuples(), strict=True):
        lines.append(
            f"{name:>{width}}  {row.accuracy:6.3f}  {cell(row.control_accuracy, 7)}  "
            f"{cell(row.selectivity, 7)}"
        )
    lines.append(f"majority baseline {result.majority_baseline:.3f}")
    if not frame["control_accuracy"].notna().any():
        lines.append("no control task (see the warning above): selectivity not measured")
    if result.mix_weights is not None:  # --scalar-mix
        top = sorted(range(len(result.mix_weights)), key=lambda i: -result.mix_weights[i])[:3]
        labels = result.entry_names()
        weights = ", ".join(f"{labels[i]}: {result.mix_weights[i]:.2f}" for i in top)
        lines.append(
            f"scalar mix: accuracy {result.mix_accuracy:.3f}, {result.expected_text(1)}, "
            f"largest weights {weights}"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Collect, probe every layer, print the table and write the files."""
    import mechprobe as mp
    from mechprobe.probing import probe_layers

    problem = output_problem(args.out, folder=True)
    if problem:
        print(f"mechprobe probe: error: --out: {problem}", file=sys.stderr)
        return 2
    problem = _site_problem(args.site, args.layers)
    if problem:  # a kind or label collect refuses needs no model to be told
        return command_error("probe", problem)
    created = not args.out.exists()
    try:
        dataset = load_dataset(args.dataset, args.seed)
        if dataset.level == "word" and args.positions == "all":
            raise ValueError(
                f"--positions all reads every token, but {dataset.name!r} labels words: use "
                "-1 (each word's last token, the default) or word_last."
            )
        if args.max_examples is not None:
            dataset = dataset.sample(args.max_examples, seed=args.seed)
        # At -1 a row per text (per word for word-level data) is known before the model runs;
        # the probes refused too many folds only after every activation had been collected.
        if args.folds is not None and args.positions == -1 and args.folds > dataset.n_examples:
            raise ValueError(
                f"--folds {args.folds} is more than the {dataset.n_examples} examples probed: "
                f"pass --folds between 2 and {dataset.n_examples}."
            )
        args.out.mkdir(parents=True, exist_ok=True)  # checked above; a refusal surfaces here
        model = load(args.model, args.device, args.dtype, args.kind)
        acts = mp.collect(
            model,
            dataset,
            args.site,
            layers=args.layers,
            positions=args.positions,
            batch_size=args.batch_size,
            out_dir=args.out / "activations" if args.save_activations else None,
            progress=not args.quiet,
        )
        result = probe_layers(
            acts,
            n_folds=args.folds,
            seed=args.seed,
            l2=args.l2,
            max_iter=args.max_iter,
            mlp=args.mlp,
            scalar_mix=args.scalar_mix,
            split_groups="text" if args.split_by_text else None,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        # A run refused before it wrote anything leaves no empty folder behind (as erase).
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        # the library names its arguments; say the flags typed here
        message = str(err).replace("n_folds", "--folds").replace("sites:", "--site:")
        return command_error("probe", message)
    # Rows probed per class (with --positions all a text gives several rows); datasets have labels.
    probed: Counter[str] = Counter(str(label) for label in acts.labels)  # type: ignore[union-attr]
    summary = {
        "dataset": dataset.name,
        "description": dataset.description,
        "model": args.model,
        "site": args.site,
        "layers": [int(layer) for layer in result.layers],
        "sites": list(result.sites) if result.sites is not None else None,
        "positions": acts.metadata["positions"],
        "n_examples": len(acts),
        "dropped_words": acts.metadata["dropped_words"],
        "classes": dict(sorted(probed.items())),
    }
    # The figure and summary first: a write that fails (a full disk) leaves no result.json
    # that looks complete, and says so in one line.
    try:
        (args.out / "result.json").unlink(missing_ok=True)  # an earlier run's, in a used folder
        fig = result.plot()
        fig.suptitle(f"{dataset.name}: {args.site} of {args.model}")
        fig.savefig(args.out / "probe.png", dpi=150)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "report.md").write_text(  # as every command's folder: settings, version
            report("mechprobe probe", args, result, "probe.png"), encoding="utf-8"
        )
        result.save(args.out / "result.json")
    except (OSError, ValueError) as err:
        return command_error("probe", f"cannot write into {args.out}: {err}")
    texts = f" from {len(dataset)} texts" if len(acts) != len(dataset) else ""
    print(f"{dataset.name}: {len(acts)} rows{texts}, {result.n_classes} classes, {args.site}")
    print(table(result))
    written = ["result.json", "probe.png", "summary.json", "report.md"]
    if args.save_activations:
        written.append("activations/")
    print(f"wrote {', '.join(str(args.out / name) for name in written)}")
    return 0
