"""``mechprobe erase``: learn a concept erasure at a site, hook it into the model, measure the loss.

Example::

    mechprobe erase --dataset country --site blocks.20.hook_resid_post --method inlp --out erase20
    mechprobe erase --dataset country --site resid_post --layers 15,20,23 --method leace \\
        --out sweep

The dataset is split once (stratified by label): the projection is fitted on one part, and the
probes that measure what information is left are trained and scored on the other. Writes, per
erased site, ``projection.safetensors`` (the fitted :class:`~mechprobe.Eraser`, with SHA-256
digests), ``result.json``, ``amnesic.png`` and ``report.md`` (the settings: which dataset, task
and split seed); a sweep over ``--layers`` also writes ``sweep.json``, ``sweep.png`` and its
``report.md``. The output folder is checked before any work.
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Any, get_args

from mechprobe.cli._arguments import (
    add_model_argument,
    add_run_arguments,
    add_shots_argument,
    command_error,
    layers_type,
    load,
    nonnegative_int,
    output_problem,
    positions_type,
    positive_int,
    task_shots,
)
from mechprobe.cli._run_folder import report

_HELP = """\
Fit INLP or LEACE on the dataset's activations at --site, apply the eraser as a hook (at the
last token by default, where the dataset is read), and measure what the model loses: the KL of
its next-token distributions on English text (with --positions all also next-token accuracy and
loss: an erasure at the last token alone changes no prediction that text can score), task
accuracy on the relational task, and probe accuracy after erasure, each beside random
projections of the same rank.

Datasets: country (which country a capitals prompt asks about, 12 prompts per country for
--n-countries countries; evaluated on the capitals task for the same countries), is_capital
(capital or past-tense prompt, 6 per country), number (300 templated phrases, subject number), or
a label file (JSON, JSONL or CSV, see mechprobe.load_labels). (probe's country and number are
larger: 30 countries, 400 phrases.)
"""


def add_parser(sub: Any) -> None:
    """Register ``mechprobe erase`` on the subparsers ``sub``."""
    parser = sub.add_parser(
        "erase",
        help="amnesic probing: erase a concept inside the model and measure the loss",
        description=_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default="country", help="country, is_capital, number or a file"
    )
    parser.add_argument(
        "--site",
        required=True,
        help="where to erase: a site kind (resid_post, mlp_in, ...) with --layers, one erasure "
        "per layer; a hook name (blocks.20.hook_resid_post); or one with {l} and --layers",
    )
    parser.add_argument(
        "--layers",
        type=layers_type,
        help="layers for a site kind or a hook name with {l}: 'all', ints, ranges like 15-20, or "
        "a mix (15,20-23)",
    )
    parser.add_argument(
        "--method",
        choices=("inlp", "leace"),
        default="inlp",
        help="inlp: iterative nullspace projection (default); leace: the least-squares "
        "closed-form eraser",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--positions",
        type=positions_type("all"),
        default=-1,
        help="where the eraser is applied: 'all', last or ints (default -1)",
    )
    parser.add_argument(
        "--task",
        help="relational task to score (default: capitals for country, on the same countries, "
        "and for is_capital, on 40 of its items; none for number or a file)",
    )
    add_shots_argument(parser)
    parser.add_argument(
        "--n-countries", type=positive_int, help="countries of the country datasets (default 20)"
    )
    parser.add_argument(
        "--n-texts",
        type=nonnegative_int,
        default=24,
        help="English sentences for LM measures (default 24; 0: none)",
    )
    parser.add_argument(
        "--n-random", type=nonnegative_int, default=3, help="random controls (default 3)"
    )
    parser.add_argument(
        "--random-directions",
        choices=("sphere", "cube"),
        default="sphere",
        help="how the random controls are drawn: sphere (uniform subspaces, the default) or "
        "cube (Elazar et al.'s code: entries uniform in [-0.5, 0.5])",
    )
    parser.add_argument(
        "--iterations", type=positive_int, help="INLP iterations at most (default 20)"
    )
    parser.add_argument("--no-mlp", action="store_true", help="skip the MLP probe")
    add_model_argument(parser)
    add_run_arguments(
        parser,
        batch_size="prompts per forward pass",
        seed="seed of the datasets, splits and controls",
    )
    parser.set_defaults(func=main)


def _dataset(name: str, n_countries: int, seed: int) -> Any:
    import mechprobe as mp
    from mechprobe.probing import country_dataset, templated_dataset

    if name == "country":
        return country_dataset(n_countries=n_countries, shots=(0, 1, 3), seed=seed)
    if name == "is_capital":
        return country_dataset(target="is_capital", n_countries=n_countries, seed=seed)
    if name == "number":
        return templated_dataset("number", n=300, seed=seed)
    if Path(name).is_file():
        return mp.load_labels(name)
    raise ValueError(
        f"Unknown dataset {name!r}: use country, is_capital, number or a label file path."
    )


def _task(args: argparse.Namespace) -> Any:
    import mechprobe as mp

    name = args.task or ("capitals" if args.dataset in ("country", "is_capital") else None)
    if name is None:
        if args.shots is not None:  # it was dropped without a word
            raise ValueError(
                f"--shots sets the demonstrations of the task scored, and --dataset "
                f"{args.dataset} scores none: add --task NAME, or drop --shots."
            )
        return None
    task = mp.load_task(name)
    args.shots = task_shots(task, args.shots)
    task = task.with_shots(args.shots)
    if args.dataset == "country" and name == "capitals":
        # The same countries the erasure was fitted on (country_dataset draws them this way).
        return task.subset(args.n_countries, seed=args.seed)
    return task.subset(min(len(task), 40), seed=args.seed)


def _split(data: Any, seed: int) -> tuple[Any, Any]:
    """Stratified 2/3 (fit the erasure) and 1/3 (probe what is left) of a text-level dataset."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(data))
    fit, held = train_test_split(
        idx, test_size=1 / 3, random_state=seed, stratify=list(data.labels)
    )
    return data.subset(sorted(fit.tolist())), data.subset(sorted(held.tolist()))


def run_erase(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Everything ``mechprobe erase`` does; returns the result records written."""
    import matplotlib

    matplotlib.use("Agg")

    data = _dataset(args.dataset, args.n_countries, args.seed)
    if data.level != "text":
        raise ValueError(
            f"Dataset {data.name!r} is word-level; mechprobe erase takes text-level datasets "
            "(use mechprobe.amnesic from Python for word-level data)."
        )
    task = _task(args)  # its errors (--shots) before the model loads
    fit_data, probe_data = _split(data, args.seed)
    _check_sites(args.site, args.layers)  # before the model loads too
    out = Path(args.out)
    # main() checked the folder; a refusal it cannot see (root on /sys) surfaces here, still early.
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _erase(args, out, data, task, fit_data, probe_data)
    except BaseException:
        # A run refused before it wrote anything (a layer out of range, a bad position) leaves
        # no empty folder behind.
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _erase(
    args: argparse.Namespace, out: Path, data: Any, task: Any, fit_data: Any, probe_data: Any
) -> list[dict[str, Any]]:
    """The work of :func:`run_erase` once its arguments are checked and ``out`` exists."""
    import mechprobe as mp
    from mechprobe.erasure import ErasureSweep, amnesic, fit_erasure

    model = load(args.model, args.device, args.dtype, args.kind)
    sites = _sites(model, args.site, args.layers)
    acts = mp.collect(model, fit_data, sites, batch_size=args.batch_size, progress=not args.quiet)
    assert acts.labels is not None
    text = list(mp.pos_dataset().texts[: args.n_texts]) if args.n_texts > 0 else None
    records, results = [], []
    for j, site in enumerate(sites):
        options = {"n_iterations": args.iterations} if args.method == "inlp" else {}
        eraser = fit_erasure(acts.layer(j), acts.labels, args.method, seed=args.seed, **options)
        result = amnesic(
            model,
            site,
            eraser,
            text=text,
            task=task,
            probe=probe_data,
            positions=args.positions,
            n_random=args.n_random,
            random_directions=args.random_directions,
            mlp=not args.no_mlp,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
        folder = out if len(sites) == 1 else out / site
        if j == 0:  # this run's results replace an earlier run's in the same folder
            _clear_earlier_run(out, {out} if len(sites) == 1 else {out / s for s in sites})
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "inlp.png").unlink(missing_ok=True)  # an INLP run's, beside a LEACE result
        eraser.save(folder / "projection.safetensors")
        result.save(folder / "result.json")
        result.plot().savefig(folder / "amnesic.png", dpi=130)
        if eraser.accuracies:
            eraser.plot().savefig(folder / "inlp.png", dpi=130)
        # The settings say which dataset, task and split the numbers are on (result.json not).
        (folder / "report.md").write_text(
            report("mechprobe erase", args, result, "amnesic.png"), encoding="utf-8"
        )
        records.append(result.to_dict())
        results.append(result)
        _report(result)
    if len(sites) > 1:
        sweep = ErasureSweep(args.method, tuple(results))
        sweep.save(out / "sweep.json")
        sweep.plot().savefig(out / "sweep.png", dpi=130)
        (out / "report.md").write_text(
            report("mechprobe erase (sweep)", args, sweep, "sweep.png", "sweep.json"),
            encoding="utf-8",
        )
    return records


#: The files ``mechprobe erase`` writes per erased site.
_SITE_FILES = ("projection.safetensors", "result.json", "amnesic.png", "inlp.png", "report.md")


def _clear_earlier_run(out: Path, folders: set[Path]) -> None:
    """Remove what an earlier ``erase`` into ``out`` wrote and this run will not overwrite (a
    sweep's ``sweep.json``, ``sweep.png`` and site folders beside a one-site result, or a one-site
    result beside a sweep), so the folder holds this run's results only.

    Only what that run recorded as its own goes: the site folders its ``sweep.json`` (tagged
    ``mechprobe.ErasureSweep``) names, and a one-site result whose ``result.json`` is tagged
    ``mechprobe.AmnesicResult`` beside its ``projection.safetensors``. Other runs in sub-folders,
    another command's files and anything else in ``out`` stay."""
    earlier: list[Path] = []
    sweep = _tagged(out / "sweep.json", "mechprobe.ErasureSweep")
    if sweep is not None:  # an earlier sweep: its site folders, named by its results
        names = [r.get("site") for r in sweep.get("results", []) if isinstance(r, dict)]
        earlier += [out / n for n in names if isinstance(n, str) and "/" not in n and n != ".."]
    if (out / "projection.safetensors").is_file() and _tagged(
        out / "result.json", "mechprobe.AmnesicResult"
    ):
        earlier.append(out)  # an earlier one-site result at the top
    for folder in earlier:
        if folder in folders or not folder.is_dir():
            continue
        for name in _SITE_FILES:
            (folder / name).unlink(missing_ok=True)
        if folder != out and not any(folder.iterdir()):
            folder.rmdir()
    if out in folders and sweep is not None:  # one site now: the earlier sweep's files go
        for name in ("sweep.json", "sweep.png"):
            (out / name).unlink(missing_ok=True)


def _tagged(path: Path, tag: str) -> dict[str, Any] | None:
    """The JSON in ``path`` if a result saved it with the format tag ``tag``, else None
    (relation writes a ``sweep.png`` too; any command a ``result.json``)."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == tag else None


def _per_layer(site: str) -> bool:
    """Whether ``--site`` stands for one site per layer: a kind, or a hook name with ``{l}``."""
    from mechprobe.core import SiteKind

    return site in get_args(SiteKind) or "{l}" in site


def _check_sites(site: str, layers: Any) -> None:
    """A kind or a name with ``{l}`` needs ``--layers``; a single hook name refuses them; head
    kinds are refused (one eraser per head is for the Python API)."""
    from mechprobe.core import HEAD_KINDS

    if site in HEAD_KINDS:
        raise ValueError(
            f"--site {site}: a kind is erased at every layer of --layers, and heads one at a "
            f"time: name one head by its label, e.g. --site '{site}@20, head 3'."
        )
    if "@" in site:  # a label is read without the model: a typo is told before it loads
        import mechprobe as mp

        try:
            mp.Site.parse(site)
        except ValueError as error:
            raise ValueError(f"--site: {error}") from None
    if _per_layer(site) and layers is None:
        raise ValueError(f"--site {site}: pass the layers with --layers, e.g. 15,20,23.")
    if not _per_layer(site) and "." not in site and "@" not in site and "hook_" not in site:
        # "resid_psot" was answered about --layers, as if it named one hook (review 25b).
        from mechprobe.core import SiteKind

        kinds = get_args(SiteKind)
        close = difflib.get_close_matches(site, kinds, n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"--site {site!r} is no site kind, label or hook name.{hint} Kinds: "
            f"{', '.join(kinds)}; or a hook name such as blocks.{{l}}.hook_resid_post."
        )
    if not _per_layer(site) and layers is not None:
        raise ValueError(
            f"--layers applies to a site kind or a hook name with {{l}}; --site {site} names one "
            "hook: drop --layers, or pass --site as a kind (resid_post) or with {l}."
        )


def _sites(model: Any, site: str, layers: Any) -> list[str]:
    """The hook names ``--site`` and ``--layers`` stand for (checked by :func:`_check_sites`)."""
    from mechprobe.core import expand_sites, resolve_layers

    if "{l}" in site:
        return [site.format(l=layer) for layer in resolve_layers(model, layers)]
    if _per_layer(site):
        return [s.hook_name for s in expand_sites(model, site, layers=layers, what="--site")]
    return [site]


def _report(result: Any) -> None:
    record = result.headline()
    keys = [
        "n_removed",
        "probe_accuracy_before",
        "probe_accuracy_after",
        "random_control_probe_accuracy",
        "majority_baseline",
        "lm_kl",
        "random_control_lm_kl",
        "task_accuracy_before",
        "task_accuracy_after",
        "random_control_task_accuracy",
    ]
    print(f"\n{result.site} ({result.method}, positions {result.positions})")
    for key in keys:
        value = record[key]
        print(f"  {key:32s} {value:.4f}" if isinstance(value, float) else f"  {key:32s} {value}")


def main(args: argparse.Namespace) -> int:
    """Run ``mechprobe erase``; errors in the input print a message and return 2."""
    import mechprobe as mp
    from mechprobe.core import site_columns

    problem = output_problem(args.out, folder=True)
    if problem:
        problem = f"--out: {problem}"
    elif args.iterations is not None and args.method != "inlp":
        problem = f"--iterations bounds INLP's iterations: drop it with --method {args.method}"
    elif args.n_countries is not None and args.dataset not in ("country", "is_capital"):
        problem = f"--n-countries sizes the country datasets: drop it with --dataset {args.dataset}"
    if problem:  # before the model loads
        return command_error("erase", problem)
    args.iterations = 20 if args.iterations is None else args.iterations
    args.n_countries = 20 if args.n_countries is None else args.n_countries
    try:
        records = run_erase(args)
    except (ValueError, TypeError, OSError, mp.ModelLoadError) as err:
        return command_error("erase", err)
    # The sites in words (a bare JSON line followed, which no other command prints).
    sites = ", ".join(site_columns([r["site"] for r in records])["site"])
    print(f"\nwrote {len(records)} result(s) to {args.out} ({sites})")
    return 0
