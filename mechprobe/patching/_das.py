"""Distributed alignment search (DAS): learn the subspace of one site that carries a variable.

Geiger, Wu, Potts, Icard & Goodman (2023), "Finding Alignments Between Interpretable Causal
Variables and Distributed Neural Representations"; pyvene's ``RotatedSpaceIntervention``. Given
pairs of a *base* prompt and a *source* prompt, and for each pair the *counterfactual* answer (what
the base would answer if the variable took the source's value), DAS learns ``k`` orthonormal
directions ``R`` (``[k, width]``) of a site such that the interchange intervention::

    h_base  ->  h_base + Rᵀ R (h_source - h_base)

(the base's activation with its coordinates in the subspace replaced by the source's) makes the
model give the counterfactual answer. Only ``R`` is trained (the model is frozen: its parameters
get no gradient), by Adam on the cross-entropy of the counterfactual answer at the base's last
token; ``R`` stays orthonormal through PyTorch's orthogonal parametrisation.

The measure is the interchange intervention accuracy (IIA) on held-out pairs: how often the
counterfactual answer is the model's top token after the intervention. For a variable with a few
values read off a few tokens (a pronoun after a name, yes or no), where the answer need not be the
top token of the whole vocabulary, pass each base prompt's own ``answer``: training then uses the
two-way cross-entropy of the counterfactual against it, and a hit is the counterfactual's logit
above the answer's (the sign of ``logit_diff``). Beside it, as controls:
``n_random`` random subspaces of the same ``k`` (what any k directions do), the whole activation
patched (``k = width``: the ceiling a subspace can reach at that site) and the base run intact
(how often it gives the counterfactual answer anyway).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mechprobe.core import (
    Intervention,
    Result,
    Site,
    SiteLike,
    check_batch_size,
    check_float,
    check_int,
    check_positions,
    check_seed,
    control_seed,
    evaluates,
    gradients_enabled,
    intervene,
    model_adapter,
    new_axes,
    positions_text,
    progress_bar,
    resolve_site,
    run,
    site_columns,
    token_texts,
    tokenize,
    warn,
    width,
)
from mechprobe.patching._metrics import _answer_ids

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DASResult", "das"]

#: The conditions of :attr:`DASResult.iia`, in the order of the plot.
CONDITIONS = ("das", "random", "full", "intact")


@dataclass(frozen=True, eq=False, repr=False)
class DASResult(Result, format="mechprobe.DASResult", version=1):
    """A subspace learned by distributed alignment search, and how well it carries the variable.

    Attributes:
        site: The site the subspace lives in: its hook name, or for a head's site the head
            (``"head_out@1, head 2"``).
        positions: The position intervened on: negative from each prompt's last token,
            non-negative from its first (BOS included).
        k: The subspace's dimension.
        rotation: ``[k, width]`` orthonormal rows spanning the learned subspace (pass it to
            ``mp.Project(remove=...)`` to erase it, or read it as k directions).
        loss: ``[epochs]`` mean training cross-entropy of the counterfactual answer per epoch.
        iia_train: Interchange intervention accuracy on the training pairs.
        iia: Held-out interchange intervention accuracy per condition of :data:`CONDITIONS`:
            ``"das"`` (the learned subspace), ``"random"`` (mean of the random subspaces),
            ``"full"`` (the whole activation patched) and ``"intact"`` (the base run unedited;
            ``"none"`` in files saved before, read as ``"intact"``).
        iia_random: ``[n_random]`` held-out accuracy of each random subspace.
        hits: ``[n_test]`` whether each held-out pair gives its counterfactual answer with the
            learned subspace patched.
        test_pairs: ``[n_test]`` indices of the held-out pairs in the input.
        epochs: Passes over the training pairs.
        lr: Adam's learning rate.
        seed: Seed of the split, the initial subspace, the batches and the random subspaces.
        two_way: Whether hits and the loss compare the counterfactual with the base's own answer
            only (``answer`` was given) rather than with every token.
        minibatch: Training pairs per Adam step.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> base, source = ["Hi cat", "Hi dog"] * 2, ["Hi dog", "Hi cat"] * 2
        >>> res = mp.das(mp.tiny_model(), base, source, [5, 6] * 2, mp.Site("resid_post", 1),
        ...              epochs=2, progress=False)
        >>> res.rotation.shape, sorted(res.iia)
        ((1, 64), ['das', 'full', 'intact', 'random'])
    """

    site: str
    positions: int
    k: int
    rotation: np.ndarray
    loss: np.ndarray
    iia_train: float
    iia: dict[str, float]
    iia_random: np.ndarray
    hits: np.ndarray
    test_pairs: np.ndarray
    epochs: int
    lr: float
    seed: int = 0
    two_way: bool = False
    minibatch: int = 32
    model_name: str = ""
    model_dtype: str = ""

    def __post_init__(self) -> None:
        # Files saved before the unedited run was "intact" in every frame called it "none".
        if "none" in self.iia and "intact" not in self.iia:
            renamed = {("intact" if c == "none" else c): v for c, v in self.iia.items()}
            object.__setattr__(self, "iia", renamed)
        super().__post_init__()

    def to_frame(self) -> pd.DataFrame:
        """One row per held-out condition: the condition and its interchange accuracy (the
        random subspaces one row each), then the learned subspace on the training pairs; each
        row leads with where the subspace lives (``site``, its label such as
        ``"resid_post@1"``; ``kind``; ``layer`` and ``head``, ``Int64``; ``hook``), ``k`` and
        ``positions`` (the position intervened on, as text: ``"-1"``).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.das(mp.tiny_model(), ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"],
            ...              [5, 6], mp.Site("resid_post", 1), epochs=1, progress=False)
            >>> list(res.to_frame().columns)
            ['site', 'kind', 'layer', 'head', 'hook', 'k', 'positions', 'condition', 'seed', 'split', 'iia']
        """
        # Each random subspace its own row, as every random control: condition "random" and the
        # seed that drew it, so the rows group and the seeds show.
        rows: list[dict[str, Any]] = [{"condition": "das", "split": "test", "iia": self.iia["das"]}]
        rows += [
            {
                "condition": "random",
                "seed": control_seed(self.seed, 1 + j),
                "split": "test",
                "iia": float(v),
            }
            for j, v in enumerate(self.iia_random)
        ]
        rows += [{"condition": c, "split": "test", "iia": self.iia[c]} for c in ("full", "intact")]
        rows.append({"condition": "das", "split": "train", "iia": self.iia_train})
        where = self._where(len(rows))
        body = pd.DataFrame(rows, columns=["condition", "seed", "split", "iia"])
        body["seed"] = body["seed"].astype("Int64")
        at = {"k": self.k, "positions": positions_text(self.positions)}
        return pd.concat([pd.DataFrame({**where, **at}), body], axis=1)

    def summary(self) -> pd.DataFrame:
        """The held-out accuracy of each condition (``das``, ``random_value``: the random
        subspaces' mean, ``full``, ``intact``; ``train``: the learned subspace on the training
        pairs), with the site's columns (as :meth:`to_frame`), k, positions and the final loss.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.das(mp.tiny_model(), ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"],
            ...              [5, 6], mp.Site("resid_post", 1), epochs=1, progress=False)
            >>> list(res.summary().columns)  # doctest: +NORMALIZE_WHITESPACE
            ['site', 'kind', 'layer', 'head', 'hook', 'k', 'positions', 'das', 'random_value',
             'full', 'intact', 'train', 'final_loss']
        """
        # The random subspaces' IIA, a value like its neighbours: a bare "random" column was a
        # level in one frame and an effect in another (docs/api.md, "Frame columns").
        row = {
            "k": self.k,
            "positions": positions_text(self.positions),
            **{("random_value" if c == "random" else c): self.iia[c] for c in CONDITIONS},
            "train": self.iia_train,
            "final_loss": float(self.loss[-1]) if self.loss.size else np.nan,
        }
        return pd.concat([pd.DataFrame(self._where(1)), pd.DataFrame([row])], axis=1)

    def _where(self, n: int) -> dict[str, Any]:
        """The site's location columns, ``n`` rows: the stored ``site`` (a hook name, or a label
        for a head) is labelled here, so files saved before frames used labels read the same."""
        return site_columns([self.site] * n)

    def plot(self, ax: Axes | None = None) -> Figure:
        """Held-out interchange accuracy of the learned subspace beside its controls (the
        random subspaces as points).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.das(mp.tiny_model(), ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"],
            ...              [5, 6], mp.Site("resid_post", 1), epochs=1, progress=False)
            >>> len(res.plot().axes[0].patches)
            4
        """
        fig, ax = new_axes(ax, (5.0, 3.5))
        labels = [f"DAS (k={self.k})", "random k", "whole site", "intact"]
        colours = ["tab:blue", "tab:grey", "tab:green", "lightgrey"]
        bars = ax.bar(range(4), [self.iia[c] for c in CONDITIONS], color=colours)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)  # an intact IIA of 0 is otherwise no bar
        if self.iia_random.size:
            ax.plot(np.ones(self.iia_random.size), self.iia_random, "k.", label="each random")
            ax.legend(fontsize="small")
        ax.set_xticks(range(4), labels)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("interchange accuracy (held out)")
        ax.set_title(
            f"DAS at {self._where(1)['site'][0]}, position {self.positions}; {len(self.hits)} "
            "held-out pairs",
            fontsize="small",
        )
        return fig

    def _describe(self) -> str:
        return (
            f"{self._where(1)['site'][0]}, k={self.k}: held-out IIA {self.iia['das']:.2f} (random "
            f"{self.iia['random']:.2f}, whole site {self.iia['full']:.2f}, intact "
            f"{self.iia['intact']:.2f}), {len(self.hits)} held-out pairs"
        )


class _Interchange(Intervention):
    """``h -> h + Rᵀ R (source - h)`` at the selected positions (``R`` may require a gradient;
    ``rows`` picks the source vectors of the batch being run)."""

    def __init__(self, rotation: Tensor | None, source: Tensor, positions: int) -> None:
        super().__init__(positions)
        self.rotation, self.source = rotation, source

    def edit(self, selected: Tensor, hook: Any) -> Tensor:
        source = self.source.to(selected.device, selected.dtype)  # [batch, 1, width]
        if self.rotation is None:  # the whole activation
            return source.expand(selected.shape)
        rotation = self.rotation.to(selected.device, selected.dtype)  # [k, width]
        return selected + ((source - selected) @ rotation.T) @ rotation


@evaluates
def das(
    model: Any,
    base: str | Sequence[str],
    source: str | Sequence[str],
    counterfactual: Any,
    site: SiteLike,
    *,
    answer: Any = None,
    k: int = 1,
    positions: int = -1,
    test_size: float = 0.5,
    epochs: int = 20,
    lr: float = 0.01,
    n_random: int = 3,
    minibatch: int = 32,
    batch_size: int | None = 32,
    seed: int = 0,
    progress: bool = True,
) -> DASResult:
    """Learn the ``k``-dimensional subspace of ``site`` whose interchange from ``source`` into
    ``base`` gives the ``counterfactual`` answer (module docstring), and measure it on held-out
    pairs beside random subspaces, the whole site and the intact run.

    Args:
        model: A TransformerLens model.
        base: Base prompts (or one).
        source: Source prompts, one per base prompt.
        counterfactual: The answer each base prompt should give with the source's value of the
            variable: one token (string or id) for every pair, or one per pair.
        site: One site with a layer (a ``Site`` or hook name) whose activation has a fixed width
            (residual stream, attention or MLP output, a head's ``z``/``q``/``k``/``v`` or its
            write ``head_out``).
        answer: Optionally, each base prompt's own answer (one token for every pair, or one per
            pair): then training and hits compare the counterfactual with it alone (module
            docstring) instead of with the whole vocabulary.
        k: Dimension of the learned subspace.
        positions: The position intervened on, negative from each prompt's last token (``-1``:
            the last) or non-negative from its first (BOS included): read there in the source,
            written there in the base.
        test_size: The share of pairs held out (at least one pair each side).
        epochs: Passes over the training pairs.
        lr: Adam's learning rate.
        n_random: Random subspaces of dimension ``k`` measured as controls.
        minibatch: Training pairs per Adam step: the learned subspace depends on it as on
            ``lr`` and ``epochs``.
        batch_size: Pairs per forward pass, None for all at once (memory only: a minibatch larger than it adds up
            its chunks' gradients, so the result does not depend on it).
        seed: Seed of the split, the initial subspace, the batch order and the random subspaces.
        progress: Show a progress bar over epochs.

    Returns:
        A :class:`DASResult`.

    Raises:
        ValueError: Before any forward pass: prompts of different counts or fewer than two
            pairs, a site without a layer or a fixed width, ``k`` outside ``1..width``, a
            position outside a prompt, a counterfactual that is not one token, a position up to
            which every pair's base and source are the same tokens (some pairs: a warning).

    Example:
        >>> import mechprobe as mp
        >>> model = mp.tiny_model()
        >>> res = mp.das(model, ["Hi cat", "Hi dog"], ["Hi dog", "Hi cat"], [5, 6],
        ...              mp.Site("resid_post", 1), k=2, epochs=3, progress=False)
        >>> res.k, len(res.loss)
        (2, 3)
    """
    seed = check_seed(seed)
    base_list = [base] if isinstance(base, str) else list(base)
    source_list = [source] if isinstance(source, str) else list(source)
    n = len(base_list)
    if len(source_list) != n:
        raise ValueError(
            f"{n} base prompts and {len(source_list)} source prompts: pass one source per base."
        )
    if n < 2:
        raise ValueError(f"DAS needs at least two pairs (one to fit, one to test), got {n}.")
    check_int(k, "k", 1)
    check_int(epochs, "epochs", 1)
    check_int(n_random, "n_random", 0)
    check_int(minibatch, "minibatch", 1)
    batch_size = check_batch_size(batch_size)
    positions = check_positions(
        positions,
        single=True,
        why="DAS learns the subspace at one position per pair (default -1, the last token); "
        "call once per position",
    )
    lr = check_float(lr, "lr", 0.0, low_open=True)
    test_size = check_float(test_size, "test_size")
    # 1.0 fitted on one pair, as if asked for (function_vector refuses it); a count such as 3
    # was told "(0.0, 1.0]", which 1.0 is not (review 42a S5)
    if not 0.0 < test_size < 1.0:
        raise ValueError(
            f"test_size must be a fraction in (0, 1), got {test_size!r}: it is the share of "
            "pairs held out, and the rest is what the rotation is fitted on (e.g. 0.5)."
        )
    name, parsed = resolve_site(model, site)
    wide = width(model, parsed)
    if parsed is None or parsed.layer is None or wide is None:
        raise ValueError(
            f"das needs one site with a layer and a fixed width (e.g. Site('resid_post', 12), or "
            f"one head's Site('head', 12, head=3)), got {site!r}."
        )
    if parsed.positions is not None:
        raise ValueError(f"{parsed} carries positions; pass positions= to das instead.")
    if k > wide:
        raise ValueError(f"k={k} exceeds the width {wide} of {name}: pick k in 1..{wide}.")
    target = _answer_ids(model, counterfactual, n, "counterfactual")
    own = None if answer is None else _answer_ids(model, answer, n, "answer")
    if own is not None and bool((own == target).any()):
        same = int((own == target).nonzero()[0, 0])
        raise ValueError(
            f"Pair {same}'s answer and counterfactual are the same token: a two-way choice needs "
            "two different answers (drop the pair, or pass no answer)."
        )

    def scores(logits: Tensor, rows: np.ndarray) -> tuple[Tensor, Tensor]:
        """Logits to score and the index of the counterfactual among them."""
        if own is None:
            return logits.float(), target[rows].to(logits.device)
        pair = torch.stack([own[rows], target[rows]], dim=1).to(logits.device)
        return logits.float().gather(1, pair), torch.ones(
            len(rows), dtype=torch.long, device=logits.device
        )

    bases = tokenize(model, base_list, padding_side="left")
    sources = tokenize(model, source_list, padding_side="left")
    bases.positions(positions)  # a position outside a prompt fails here, before any pass
    sources.positions(positions)
    _refuse_equal_prefixes(model, bases, sources, positions)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = min(max(1, round(test_size * n)), n - 1)
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    read = Site(parsed.kind, parsed.layer, head=parsed.head, positions=positions)
    captured = run(model, sources, capture=[read], batch_size=batch_size, progress=False)
    source_acts = captured[read].detach()  # [n, 1, width]

    # The subspace is built and trained with gradients on, whatever the caller switched off
    # (torch.no_grad, set_grad_enabled(False), inference_mode); tensors made under inference
    # mode cannot be saved for backward, hence the clones.
    with gradients_enabled():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = torch.nn.utils.parametrizations.orthogonal(
                torch.nn.Linear(wide, k, bias=False, dtype=torch.float32)
            )

        def basis() -> Tensor:  # [k, width], orthonormal rows (recomputed from the parameters)
            return cast(Tensor, layer.weight)

        train_acts = source_acts.clone()
        train_bases = dataclasses.replace(
            bases, tokens=bases.tokens.clone(), attention_mask=bases.attention_mask.clone()
        )
        optimiser = torch.optim.Adam(layer.parameters(), lr=lr)
        params = list(layer.parameters())
        # The loss sees only the span of R (the interchange is Rᵀ R), so turning R within its
        # span has gradient 0; rounding leaves ~1e-8 there, which Adam divides by its own size
        # into a step of ~lr, and with k >= 2 the subspace then depended on batch_size and
        # threads. The parametrisation starts at its base with every Householder vector zero,
        # where the vectors' entries in the first k rows (k(k-1)/2 of them) only turn R within
        # its span: they are held at zero, and the other k * (width - k) entries chart the span.
        original: Tensor = cast(Any, layer).parametrizations.weight.original  # [k, width]
        in_span = torch.ones(k, k, dtype=torch.bool).triu(diagonal=1)
        losses = []
        for _ in progress_bar(range(epochs), progress=progress, desc="das"):
            total = 0.0
            for step in _batches(rng.permutation(train), minibatch):
                # The minibatch's mean loss, its chunks' gradients added (each weighted by its
                # share), so that batch_size changes the memory used and not the result.
                for rows in _batches(step, batch_size):
                    edit = _Interchange(basis(), train_acts[rows], positions)
                    logits = _last_logits(model, train_bases.select(rows.tolist()), parsed, edit)
                    loss = torch.nn.functional.cross_entropy(*scores(logits, rows))
                    share = len(rows) / len(step)
                    grads = torch.autograd.grad(loss * share, params)  # the model's get none
                    for param, grad in zip(params, grads, strict=True):
                        param.grad = grad if param.grad is None else param.grad + grad
                    total += float(loss.detach()) * len(rows)
                if original.grad is not None:
                    original.grad[:, :k][in_span] = 0.0
                optimiser.step()
                optimiser.zero_grad(set_to_none=True)
            losses.append(total / len(train))
        rotation = basis().detach().clone()

    def accuracy(rows: np.ndarray, basis: Tensor | None, patch: bool = True) -> np.ndarray:
        hits = []
        for chunk in _batches(rows, batch_size):
            edit = _Interchange(basis, source_acts[chunk], positions) if patch else None
            with torch.no_grad():
                logits = _last_logits(model, bases.select(chunk.tolist()), parsed, edit)
            scored, want = scores(logits, chunk)
            hits.append((scored.argmax(-1).cpu() == want.cpu()).numpy())
        return np.concatenate(hits)

    hits = accuracy(test, rotation)
    # Random subspace j draws from seed + 1 + j: seed itself drew the split and the initial subspace.
    random_iia = np.array(
        [
            accuracy(test, _random_basis(wide, k, control_seed(seed, 1 + j))).mean()
            for j in range(n_random)
        ]
    )
    iia = {
        "das": float(hits.mean()),
        "random": float(random_iia.mean()) if n_random else float("nan"),
        "full": float(accuracy(test, None).mean()),
        "intact": float(accuracy(test, None, patch=False).mean()),
    }
    return DASResult(
        site=name
        if parsed.head is None
        else str(Site(parsed.kind, parsed.layer, head=parsed.head)),
        positions=int(positions),
        k=int(k),
        rotation=rotation.numpy(),
        loss=np.asarray(losses),
        iia_train=float(accuracy(train, rotation).mean()),
        iia=iia,
        iia_random=random_iia,
        hits=hits,
        test_pairs=test,
        epochs=int(epochs),
        lr=lr,
        seed=seed,
        minibatch=int(minibatch),
        two_way=own is not None,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def _refuse_equal_prefixes(model: Any, bases: Any, sources: Any, position: int) -> None:
    """Refuse (every pair) or warn (some) where base and source hold the same tokens up to the
    position: a causal model's activations there are then equal, and the interchange changes
    nothing (a run trained minutes at a constant loss and reported 0 everywhere, silently)."""
    equal = []
    for i in range(len(bases)):
        b = bases.tokens[i][bases.attention_mask[i].bool()].tolist()
        s = sources.tokens[i][sources.attention_mask[i].bool()].tolist()
        b_end, s_end = position % len(b) + 1, position % len(s) + 1
        equal.append(b_end == s_end and b[:b_end] == s[:s_end])
    if not any(equal):
        return
    first = equal.index(True)
    ids = bases.tokens[first][bases.attention_mask[first].bool()].tolist()
    token = token_texts(model_adapter(model).tokenizer, [ids[position % len(ids)]])[0]
    what = (
        f"base and source hold the same tokens up to position {position} ({token!r} in pair "
        f"{first})"
    )
    if all(equal):
        raise ValueError(
            f"In every pair {what}, so their activations there are equal and the interchange "
            "changes nothing: pass the position of a token that differs (a word may be several "
            "tokens; mp.tokenize shows them)."
        )
    warn(
        f"In {sum(equal)} of {len(equal)} pairs {what}: the interchange changes nothing there.",
    )


def _batches(rows: np.ndarray, size: int | None) -> list[np.ndarray]:
    """Consecutive slices of at most ``size`` rows (None: all rows in one)."""
    step = max(1, len(rows)) if size is None else size
    return [rows[i : i + step] for i in range(0, len(rows), step)]


def _last_logits(model: Any, batch: Any, site: Site, edit: Intervention | None) -> Tensor:
    """``[rows, vocab]`` next-token logits at each (left-padded) row's last token, with ``edit``
    at ``site`` (its head included: a head's site edits that head's slice only)."""
    adapter = model_adapter(model)
    spec: dict[SiteLike, Intervention] = {site: edit} if edit is not None else {}
    with intervene(model, spec, batch=batch):
        logits = adapter.forward(batch.tokens, batch.attention_mask, logits_to_keep=1)
    if not bool(torch.isfinite(logits[:, -1]).all()):
        # A NaN loss trained nothing and scored every pair a miss (IIA 0.0), silently.
        cause = adapter.nan_causes(batch.attention_mask, left=True)
        raise ValueError(f"das: the model's next-token logits hold NaN or infinity ({cause}).")
    return logits[:, -1]


def _random_basis(wide: int, k: int, seed: int) -> Tensor:
    """``[k, wide]`` orthonormal rows spanning a uniformly random k-dimensional subspace."""
    gaussian = torch.randn(
        wide, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float32
    )
    q, _ = torch.linalg.qr(gaussian)
    return q.T.contiguous()
