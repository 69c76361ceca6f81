"""How well each lens reads each layer: KL to the model's output and precision@1, on held-out text.

:func:`compare_lenses` runs the model once over windows of text (by default the held-out split of
the default corpus, never used in training), keeps the hidden states at the chosen positions, and
decodes them through every lens given, with the one readout. Per (lens, site, layer) it reports the
mean ``KL(final || lens)`` in nats (final = the model's own next-token distribution at the same
position) and precision@1, the fraction of positions whose lens top-1 token is the model's own
top-1 token (Ghandeharioun et al.'s measure). The BOS position is never scored.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from einops import reduce

from mechprobe.core import (
    Batch,
    Gather,
    Layers,
    Readout,
    Result,
    Site,
    SiteLike,
    StopForward,
    check_batch_size,
    check_int,
    check_seed,
    evaluates,
    literal,
    model_adapter,
    new_axes,
    position_list,
    progress_bar,
    run,
    site_columns,
    spread,
)
from mechprobe.lens._lens import LensSpec, as_lens
from mechprobe.lens._plan import lens_entries
from mechprobe.lens._text import TextSource, sample_windows

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LensComparison", "compare_lenses"]


@dataclass(frozen=True, eq=False, repr=False)
class LensComparison(Result, format="mechprobe.LensComparison", version=1, html_figure=True):
    """Per-layer KL to the final distribution and precision@1 of several lenses on the same tokens.

    Attributes:
        lenses: Each lens's name (the keys given, or its kind).
        descriptions: Each lens's :meth:`~mechprobe.lens.Lens.describe`.
        sites: ``[E]`` site kind of each entry.
        layers: ``[E]`` layer of each entry.
        kl: ``[lens, E]`` mean KL(final || lens) in nats.
        kl_sem: ``[lens, E]`` its standard error over windows: the sample SD of the windows'
            own means over the square root of their number (positions of one window, one
            document, are not independent; NaN over one window). Files saved before
            ``n_windows`` was recorded (``n_windows`` 0) hold the standard error over positions.
        precision: ``[lens, E]`` precision@1 against the model's own top-1 token.
        n_positions: Positions scored (the same for every lens and entry).
        text: What was read (``"heldout"``, a file, or the number of strings given).
        model_name: The model's name.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        seed: The seed the call took (None in files saved before results recorded it).
        precision_sem: ``[lens, E]`` precision@1's standard error over windows, as
            ``kl_sem`` (None in files saved before it was recorded: the plot then draws the
            binomial one over positions).
        n_windows: Windows read (0 in files saved before it was recorded).
        n_documents: Documents the windows came from: one window per document in turn
            (0 in files saved before it was recorded, whose windows were cut from each
            document to its end in turn: a 1,024-token sample of the held-out addresses came
            from one of them).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> cmp = mp.compare_lenses(model, {"logit": "logit"}, ["a b c d e f g h " * 8],
        ...                         n_tokens=64, seq_len=32, progress=False)
        >>> cmp.kl.shape, round(float(cmp.kl[0, -1]), 6)  # the last layer is the model's output
        ((1, 3), 0.0)
    """

    lenses: tuple[str, ...]
    descriptions: tuple[str, ...]
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    kl: np.ndarray
    kl_sem: np.ndarray
    precision: np.ndarray
    n_positions: int
    text: str
    model_name: str = ""
    model_dtype: str = ""
    seed: int | None = None
    precision_sem: np.ndarray | None = None
    n_windows: int = 0
    n_documents: int = 0

    def to_frame(self) -> pd.DataFrame:
        """One row per (lens, site): kl_to_final (mean ``KL(final || lens)`` in nats, as
        :class:`LensResult`'s frame names it), kl_to_final_sem, precision_at_1, n_positions (``site`` the
        entry's label, ``"resid_post@3"``, beside its ``kind`` and ``layer``)."""
        n_l, n_e = self.kl.shape
        located = site_columns(
            [f"{k}@{layer}" for k, layer in zip(self.sites, self.layers, strict=True)]
        )
        return pd.DataFrame(
            {
                "lens": np.repeat(self.lenses, n_e),
                **{key: np.tile(np.asarray(located[key]), n_l) for key in ("site", "kind")},
                "layer": pd.array(np.tile(self.layers, n_l), dtype="Int64"),
                "kl_to_final": self.kl.reshape(-1),
                "kl_to_final_sem": self.kl_sem.reshape(-1),
                "precision_at_1": self.precision.reshape(-1),
                "n_positions": self.n_positions,
            }
        )

    def summary(self) -> pd.DataFrame:
        """One row per site (its label, kind and layer), one KL and one precision@1 column per
        lens."""
        frame = self.to_frame()
        wide = frame.pivot_table(
            index=["site", "kind", "layer"],
            columns="lens",
            values=["kl_to_final", "precision_at_1"],
            sort=False,
        )
        wide.columns = [f"{stat} {lens}" for stat, lens in wide.columns]
        return wide.reset_index()

    def plot(self, ax: Axes | None = None, *, site: str | None = None) -> Figure:
        """KL (log scale) and precision@1 per layer, one line per lens with a band of one
        standard error over windows (into ``ax``: KL only).

        Args:
            ax: Draw the KL panel alone into these axes (default: a new figure of both panels).
            site: The site kind drawn (None: the first compared).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: ``site`` was not compared.
        """
        kind = self.sites[0] if site is None else site
        cols = [i for i, s in enumerate(self.sites) if s == kind]
        if not cols:
            raise ValueError(f"Site {kind!r} was not compared; this result has {set(self.sites)}.")
        layers = [self.layers[i] for i in cols]
        if ax is not None:
            fig, axes = new_axes(ax, (6, 3.6))[0], [ax]  # draws KL only
        else:
            from matplotlib.figure import Figure

            fig = Figure(figsize=(10, 3.6), layout="constrained")
            axes = list(fig.subplots(1, 2))
        # Bands of one standard error over windows: with a few windows the curves cross by
        # noise alone.
        n = self.n_positions
        bands = n > 1  # over one position a standard error is undefined (it drew as 0)
        for i, name in enumerate(self.lenses):
            kl, sem = self.kl[i, cols], self.kl_sem[i, cols]
            (line,) = axes[0].plot(layers, kl, "o-", markersize=3, label=literal(name))
            if bands:
                axes[0].fill_between(layers, kl - sem, kl + sem, color=line.get_color(), alpha=0.2)
            if len(axes) > 1:
                p = self.precision[i, cols]
                axes[1].plot(
                    layers, p, "o-", markersize=3, label=literal(name), color=line.get_color()
                )
                if bands:
                    se = (
                        np.sqrt(p * (1 - p) / n)  # a file saved before it was recorded
                        if self.precision_sem is None
                        else self.precision_sem[i, cols]
                    )
                    axes[1].fill_between(layers, p - se, p + se, color=line.get_color(), alpha=0.2)
        axes[0].set_yscale("symlog", linthresh=0.1)
        axes[0].set_ylabel("KL(final || lens), nats")
        axes[0].set_xlabel(f"layer ({kind})")
        axes[0].legend(fontsize=8)
        axes[0].grid(alpha=0.3)
        if len(axes) > 1:
            axes[1].set_ylim(0, 1.02)
            axes[1].set_ylabel("precision@1 (model's own top-1)")
            axes[1].set_xlabel(f"layer ({kind})")
            axes[1].grid(alpha=0.3)
        title = f"{self.model_name or 'model'}: {self.n_positions} positions of {self.text}"
        if self.n_documents:
            title += f" ({self.n_windows} windows from {self.n_documents} documents)"
        title = literal(title + (" (bands: one standard error)" if bands else ""))
        if len(axes) > 1:
            fig.suptitle(title, fontsize=9)
        else:
            axes[0].set_title(title, fontsize=9)
        return fig

    def _describe(self) -> str:
        where = f" ({self.n_documents} documents)" if self.n_documents else ""
        return (
            f"{', '.join(self.lenses)} x {len(self.sites)} entries, {self.n_positions} positions "
            f"of {self.text}{where}"
        )


def _positions(positions: str | int | Sequence[int], seq_len: int) -> list[int]:
    if isinstance(positions, str):
        if positions != "all":
            raise ValueError(
                f"positions must be 'all', an int or a list of ints, not {positions!r}."
            )
        return list(range(1, seq_len))
    cols = []
    for p in position_list(positions):  # the API's one reading of positions
        q = check_int(
            p, f"positions (of windows of seq_len={seq_len} tokens)", 1 - seq_len, seq_len - 1
        )
        q = q + seq_len if q < 0 else q
        if q == 0:
            raise ValueError("Position 0 is the BOS token, which is never scored: pass 1 or more.")
        cols.append(q)
    return sorted(set(cols))


@evaluates
def compare_lenses(
    model: Any,
    lenses: Mapping[str, LensSpec] | Sequence[LensSpec],
    text: TextSource = "heldout",
    *,
    sites: SiteLike | Sequence[SiteLike] = "resid_post",
    layers: Layers = "all",
    positions: str | int | Sequence[int] = "all",
    n_tokens: int = 2048,
    seq_len: int = 128,
    seed: int = 0,
    batch_size: int | None = 32,
    progress: bool = True,
) -> LensComparison:
    """Per-layer KL to the model's output and precision@1 of each lens, on the same tokens.

    Args:
        model: A TransformerLens model.
        lenses: ``{name: lens}`` or a list of lenses (``"logit"``, a TunedLens, a Patchscope);
            names default to each lens's kind.
        text: ``"heldout"`` (the default corpus's held-out split), a list of strings, a ``.txt``
            file or a folder of them.
        sites: Site kinds compared at every layer of ``layers`` (residual kinds for a tuned lens
            or a Patchscope), or Sites.
        layers: Layers of each kind in ``sites``.
        positions: Window positions scored: ``"all"`` (every one but BOS) or a list (the same in
            every window; a Patchscope costs one target-prompt forward per position and layer).
        n_tokens: Tokens read: ``n_tokens // seq_len`` windows, one at least (so fewer than
            ``seq_len`` tokens read one whole window).
        seq_len: Tokens per window.
        seed: Seed of the windows' order.
        batch_size: Windows per forward pass (None: all at once).
        progress: Show a progress bar.

    Returns:
        A :class:`LensComparison`.

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> cmp = mp.compare_lenses(model, ["logit", mp.TunedLens.identity(model)],
        ...                         ["one two three four " * 20], n_tokens=64, seq_len=32,
        ...                         progress=False)
        >>> bool((cmp.kl[0] == cmp.kl[1]).all()), cmp.lenses
        (True, ('logit', 'tuned'))
    """
    if isinstance(lenses, Mapping):
        names = [str(k) for k in lenses]
        if len(set(names)) < len(names):  # {1: ..., "1": ...}: two lenses named '1'
            raise ValueError(f"Two lenses have one name as text: {names}; name each once.")
        objs = [as_lens(v) for v in lenses.values()]
    else:
        if isinstance(lenses, str) or not isinstance(lenses, Sequence):
            lenses = [lenses]  # type: ignore[list-item]  # one lens ("logit" was read by letter)
        objs = [as_lens(v) for v in lenses]
        kinds = [o.describe().split(" ")[0] for o in objs]
        # Numbered by the kinds as given (counting in the renamed list made duplicates).
        names = [
            f"{kind}_{kinds[:i].count(kind)}" if kinds.count(kind) > 1 else kind
            for i, kind in enumerate(kinds)
        ]
    if not objs:
        raise ValueError("No lens to compare: pass at least one (e.g. ['logit']).")
    n_tokens = check_int(n_tokens, "n_tokens", 1)
    seq_len = check_int(seq_len, "seq_len", 2)
    batch_size = check_batch_size(batch_size)
    seed = check_seed(seed)
    entries = lens_entries(model, sites, layers)
    for obj in objs:
        obj.check(model, entries)
    cols = _positions(positions, seq_len)
    n_windows = max(1, n_tokens // seq_len)
    windows, n_documents = sample_windows(model, text, seq_len, n_windows, seed)
    n_layers = int(model.cfg.n_layers)
    final_site = ("resid_post", n_layers - 1)
    run_sites = [*entries, *([final_site] if final_site not in entries else [])]
    readout = Readout(model, 256)
    # Per window, each lens's mean KL and hit rate per entry: [windows, lens, E]
    kl_win = np.zeros((n_windows, len(objs), len(entries)))
    hit_win = np.zeros((n_windows, len(objs), len(entries)))
    done = 0
    size = max(1, n_windows) if batch_size is None else batch_size  # None: all in one pass
    chunks = [windows[s : s + size] for s in range(0, n_windows, size)]
    with torch.no_grad():
        for rows in progress_bar(chunks, progress=progress, desc="compare lenses"):
            batch = Batch(rows, torch.ones_like(rows), "right", ("",) * len(rows))
            at = torch.as_tensor(cols, dtype=torch.long)
            keeps = [Gather(cols=at, stop=site == final_site) for site in run_sites]
            spec: dict[Site | str, Any] = {
                Site(kind, layer): k  # type: ignore[arg-type]
                for (kind, layer), k in zip(run_sites, keeps, strict=True)
            }
            with contextlib.suppress(StopForward):
                run(model, batch, spec, logit_positions=-1, batch_size=None, progress=False)
            vecs = [k.value.reshape(-1, k.value.shape[-1]) for k in keeps]  # type: ignore[union-attr]
            final = vecs[run_sites.index(final_site)]
            top = readout_top1(readout, final)
            for i, obj in enumerate(objs):
                translated = [
                    obj.translate(model, kind, layer, vecs[e])
                    for e, (kind, layer) in enumerate(entries)
                ]
                where = [
                    f"{kind} layer {layer} through {obj.describe()}" for kind, layer in entries
                ]
                stats = readout.grid(translated, final, top[:, None], 1, where)
                kl = stats["kl"].double().cpu().numpy()  # [rows * cols, E], window-major
                # The lens's top-1 is the model's: rank 0 would also count a tie (a lens
                # whose logits are all equal scored precision 1).
                same = stats["top_ids"][:, :, 0] == top.to(stats["top_ids"].device)[:, None]
                per = "(w c) e -> w e"
                kl_win[done : done + len(rows), i] = reduce(kl, per, "mean", w=len(rows))
                hit_win[done : done + len(rows), i] = reduce(
                    same.double().cpu().numpy(), per, "mean", w=len(rows)
                )
            done += len(rows)
    count = n_windows * len(cols)
    return LensComparison(
        lenses=tuple(names),
        descriptions=tuple(o.describe() for o in objs),
        sites=tuple(kind for kind, _ in entries),
        layers=tuple(layer for _, layer in entries),
        kl=kl_win.mean(0),  # every window has the same positions: the mean over positions
        kl_sem=spread(kl_win) / np.sqrt(n_windows),
        precision=hit_win.mean(0),
        n_positions=count,
        text=str(text) if isinstance(text, (str, os.PathLike)) else f"{len(text)} text(s)",
        model_name=str(getattr(model.cfg, "model_name", "")),
        model_dtype=model_adapter(model).dtype_name,
        seed=seed,
        precision_sem=spread(hit_win) / np.sqrt(n_windows),
        n_windows=n_windows,
        n_documents=n_documents,
    )


def readout_top1(readout: Readout, final: torch.Tensor) -> torch.Tensor:
    """The model's own top-1 token at each final vector (chunked, no [n, vocab] tensor kept)."""
    out = []
    for s in range(0, final.shape[0], readout.chunk):
        out.append(readout.logits(final[s : s + readout.chunk]).argmax(-1))
    return torch.cat(out)
