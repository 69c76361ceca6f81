"""Function vectors (Todd et al., ICLR 2024) beside o-vectors: :func:`function_vector` ->
:class:`FunctionVectorResult`.

A function vector (FV) is the sum of the mean outputs of the attention heads that carry a task
from few-shot demonstrations to the query:

1. Each head's *average indirect effect* (AIE): on few-shot prompts whose demonstrations have
   shuffled labels (the task is no longer shown), write the head's mean output over clean
   few-shot prompts (at the last token) into the last token, and measure how much the answer's
   probability rises; average over prompts. All heads x prompts are cells of mechprobe's batched
   engine (:func:`mechprobe.ablate_cells` with the clean prompts' last-token means).
2. The FV is the sum over the top heads of their mean output ``mean(z) @ W_O[head]``. (Todd
   et al.'s code runs each head through the output projection, which adds its bias ``b_O`` once
   per head on models that have one, GPT-2 and Pythia; Llama-style models have none.)
3. Added to the residual stream at one layer (Todd et al.: about a third of the way in) at the
   last token of *zero-shot* prompts of held-out items, it should make the model do the task.

Its accuracy is reported beside the intact model (zero-shot and few-shot), random vectors of the
FV's norm (``n_random`` seeds) and the task's o-vector (Merullo et al.: the mean FFN output at
that layer over correctly answered few-shot prompts, or all of them when none is) added the same way and, since o-vectors
are larger or smaller than FVs, also rescaled to the FV's norm.
"""

from __future__ import annotations

import random as _random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
import torch

from mechprobe.core import (
    Add,
    Intervention,
    Result,
    Site,
    SiteLike,
    check_batch_size,
    check_bool,
    check_float,
    check_int,
    check_seed,
    control_seed,
    evaluates,
    figure_of,
    first_token_ids,
    literal,
    model_adapter,
    progress_bar,
    run,
    site_columns,
    spread,
    token_texts,
    top1_hit,
    warn,
)
from mechprobe.patching import ablate_cells, answer_prob
from mechprobe.relational._ovector import fit_ovector
from mechprobe.relational._pass import task_pass
from mechprobe.tasks import Task, as_task

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["FunctionVectorResult", "function_vector", "shuffled_prompts"]

# The accuracy conditions, in the result's order.
_CONDITIONS = (
    "zero-shot",
    "few-shot",
    "function vector",
    "random vector",
    "o-vector",
    "o-vector (FV norm)",
)
# With n_random_heads, after those.
_HEADS_CONDITIONS = ("random heads", "random heads (FV norm)")
# A constant guess of the commonest first token would score this share: above it, say so.
_SHARED_FIRST_TOKEN = 0.2
#: The share of held-out answers starting with their own input's first token from which
#: copying the query is worth a warning.
_COPIED_SHARE = 0.1


@dataclass(frozen=True, eq=False, repr=False)
class FunctionVectorResult(
    Result, format="mechprobe.FunctionVectorResult", version=1, html_figure=True
):
    """A task's function vector: heads' indirect effects and the FV's accuracy beside controls.

    Attributes:
        task: The task's name.
        aie: ``[layers, heads]`` average indirect effect of each head on the answer's probability
            (shuffled-label prompts, head set to its clean mean at the last token).
        aie_spread: ``[layers, heads]`` its sample standard deviation over prompts (``ddof=1``;
            the mean's standard error is this over ``sqrt(n_prompts)``).
        aie_random: ``[layers, heads]`` the same head moved by the same distance in random
            directions (mean over ``n_random`` seeds; NaN without).
        heads: The top heads ``(layer, head)`` whose mean outputs sum to the FV, best first.
        vector: ``[d_model]`` the function vector.
        layer: The layer at whose output (the residual stream after block ``layer``) the vectors
            are added at the last token.
        conditions: Names of the accuracy conditions (``"zero-shot"``, ``"few-shot"``,
            ``"function vector"``, ``"random vector"``, ``"o-vector"``, ``"o-vector (FV norm)"``;
            with ``n_random_heads``, ``"random heads"`` and ``"random heads (FV norm)"``).
        accuracy: ``[conditions]`` top-1 accuracy on the held-out items' first answer token,
            over every held-out item (Todd et al. count only those the model answers few-shot:
            :attr:`accuracy_solved`).
        correct: ``[conditions, items]`` per held-out item (1.0 / 0.0; the random condition: the
            mean over seeds).
        norms: ``[conditions]`` the norm of the vector added (NaN without one).
        n_prompts: Prompts the AIE and mean outputs were averaged over.
        n_random: Random vectors (seeds ``seed, seed + 1, ...``, modulo ``2**32``).
        seed: Seed of the split, the label shuffles and the random vectors.
        items: The held-out items' inputs, in the order of ``correct``'s columns (empty in
            files saved before it was recorded).
        fit_items: The items whose prompts the AIE and the heads' mean outputs were taken over.
        only_correct: Whether those were only items the model answers few-shot.
        predictions: Per condition, the top next token of each held-out item, in the order of
            ``correct``'s columns (the random condition: its first seed's; empty in files saved
            before it was recorded). A vector that makes the model say one token everywhere
            (a bare ``" "``, ``" The"``) scores 0 without saying why; these do.
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        random_heads: The random-heads controls' draws (``n_random_heads``), each as many
            ``(layer, head)`` pairs as :attr:`heads`, none of them in it.

    Example:
        >>> import mechprobe as mp
        >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=2, progress=False)
        >>> res.conditions[:3], res.accuracy.shape
        (('zero-shot', 'few-shot', 'function vector'), (6,))
    """

    task: str
    aie: np.ndarray
    aie_spread: np.ndarray
    aie_random: np.ndarray
    heads: tuple[tuple[int, int], ...]
    vector: np.ndarray
    layer: int
    conditions: tuple[str, ...]
    accuracy: np.ndarray
    correct: np.ndarray
    norms: np.ndarray
    n_prompts: int
    n_random: int
    seed: int = 0
    items: tuple[str, ...] = ()
    fit_items: tuple[str, ...] = ()
    model_name: str = ""
    model_dtype: str = ""
    only_correct: bool = False
    predictions: tuple[tuple[str, ...], ...] = ()
    random_heads: tuple[tuple[tuple[int, int], ...], ...] = ()

    def to_frame(self) -> pd.DataFrame:
        """One row per head: its site (``"head@3, head 2"``: the z its mean output was written at),
        kind, layer, head, effect (Todd et al.'s average indirect effect, AIE: :attr:`aie`), its
        spread over prompts, random_effect (the random controls' AIE), top (whether it is in the
        FV).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=4, progress=False)
            >>> list(res.to_frame().columns)
            ['site', 'kind', 'layer', 'head', 'effect', 'spread', 'random_effect', 'top']
        """
        n_layers, n_heads = self.aie.shape
        top = set(self.heads)
        # The site each head's mean output was written at (its z, hook_z), as in every frame.
        located = site_columns(
            [Site("head", la, head=h) for la in range(n_layers) for h in range(n_heads)]
        )
        return pd.DataFrame(
            {
                **{key: located[key] for key in ("site", "kind", "layer", "head")},
                "effect": self.aie.ravel(),
                "spread": self.aie_spread.ravel(),
                "random_effect": self.aie_random.ravel(),
                "top": [(la, h) in top for la in range(n_layers) for h in range(n_heads)],
            }
        )

    def intervention(
        self, layer: int | None = None, *, scale: float = 1.0
    ) -> dict[SiteLike, Intervention]:
        """The FV as an edit for :func:`mechprobe.run`, :func:`mechprobe.generate` or
        :func:`mechprobe.intervene`: ``scale`` times :attr:`vector` added to the residual stream
        after block ``layer`` (default :attr:`layer`) at each prompt's last token, as the
        accuracies were measured.

        Args:
            layer: The block after which the FV is added (negative counts from the end; None:
                :attr:`layer`, where it was measured).
            scale: The FV's multiplier.

        Returns:
            ``{Site("mlp_out", layer): Add(scale * vector, positions=-1)}``: added to the block's
            MLP output, which is what it adds to the residual stream.

        Example:
            >>> import mechprobe as mp
            >>> model = mp.tiny_model()
            >>> fv = mp.function_vector(model, "capitals", n_prompts=2, progress=False)
            >>> out = mp.run(model, ["Q: Chile A:"], fv.intervention(layer=1), progress=False)
            >>> list(fv.intervention())
            [Site(kind='mlp_out', layer=1, head=None, positions=None)]
        """
        n_layers = self.aie.shape[0]
        at = self.layer if layer is None else check_int(layer, "layer", -n_layers, n_layers - 1)
        scale = check_float(scale, "scale")
        # A copy: a loaded result's vector is read-only, which torch warns about when wrapped.
        vector = torch.tensor(np.array(self.vector), dtype=torch.float32) * scale
        return {Site("mlp_out", at % n_layers): Add(vector, positions=-1)}

    @property
    def accuracy_solved(self) -> np.ndarray:
        """``[conditions]`` top-1 accuracy on the held-out items the intact model answers
        few-shot: Todd et al.'s evaluation set (their ``filter_set``), where :attr:`accuracy`
        counts every held-out item. NaN where it answers none.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=2, progress=False)
            >>> res.accuracy_solved.shape
            (6,)
        """
        solved = self.correct[self.conditions.index("few-shot")] == 1.0
        if not solved.any():
            return np.full(len(self.conditions), np.nan)
        return self.correct[:, solved].mean(axis=1)

    def summary(self) -> pd.DataFrame:
        """Accuracy of each condition on the held-out zero-shot prompts (all of them, and those
        the model answers few-shot, as Todd et al. count: :attr:`accuracy_solved`), with the norm
        added, and the commonest top next token with its share of the items (an FV that only
        makes the model say ``" "`` shows here; empty in files saved before it was recorded).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=4, progress=False)
            >>> res.summary().columns.tolist()
            ['condition', 'accuracy', 'accuracy_solved', 'norm', 'top_prediction', 'top_share']
        """
        commonest = [_commonest(tokens) for tokens in self.predictions] or [
            ("", np.nan) for _ in self.conditions
        ]
        return pd.DataFrame(
            {
                "condition": self.conditions,
                "accuracy": self.accuracy,
                "accuracy_solved": self.accuracy_solved,
                "norm": self.norms,
                "top_prediction": [token for token, _ in commonest],
                "top_share": [share for _, share in commonest],
            }
        )

    def _describe(self) -> str:
        acc = dict(zip(self.conditions, self.accuracy, strict=True))
        return (
            f"{self.task}: FV of {len(self.heads)} heads at layer {self.layer}; zero-shot "
            f"accuracy {acc['zero-shot']:.2f} -> {acc['function vector']:.2f} with the FV "
            f"(random {acc['random vector']:.2f}, o-vector {acc['o-vector']:.2f}, few-shot "
            f"{acc['few-shot']:.2f})"
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Heatmap of the heads' AIE (layers x heads), the FV's heads outlined and the layer it
        is added at marked, beside the accuracy of each condition (into ``ax``: the heatmap).

        Args:
            ax: Draw the heatmap alone into these axes (default: a new figure, with the accuracy
                bars).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=4, progress=False)
            >>> len(res.plot().axes)  # heatmap, its colour bar, the accuracy bars
            3
        """
        from matplotlib.patches import Rectangle

        n_layers, n_heads = self.aie.shape
        height = max(3.0, 0.2 * n_layers + 1.5)
        if ax is None:
            from matplotlib.figure import Figure
            from matplotlib.layout_engine import ConstrainedLayoutEngine

            # The headline (FV beside its controls) was in the table only. The gap keeps the
            # colour bar's label clear of the accuracy axis's label beside it.
            fig = Figure(
                figsize=(max(4.0, 0.4 * n_heads + 2) + 4.0, height),
                layout=ConstrainedLayoutEngine(wspace=0.12),
            )
            ax, bars = fig.subplots(1, 2, width_ratios=[1.2, 1.0])
            self._bars(bars)
        else:
            fig = figure_of(ax)
        finite = np.abs(self.aie[np.isfinite(self.aie)])
        lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(self.aie, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        for layer, head in self.heads:
            ax.add_patch(
                Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.2)
            )
        ax.axhline(self.layer, color="black", ls=":", lw=1)
        ax.text(n_heads - 0.5, self.layer, " FV added", va="center", ha="left", fontsize=7)
        ax.set_xticks(range(n_heads))
        ax.set_yticks(range(0, n_layers, 1 if n_layers <= 16 else 2))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, label="average indirect effect (answer prob.)", pad=0.02)
        ax.set_title(literal(f"{self.task}: heads' AIE, FV heads outlined"), fontsize=9)
        return fig

    def _bars(self, ax: Axes) -> None:
        """Top-1 accuracy per condition, values on the bars, the held-out items counted."""
        x = np.arange(len(self.conditions))
        drawn = ax.bar(x, self.accuracy, color="tab:blue")
        ax.bar_label(drawn, fmt="%.2f", fontsize=7)
        ax.set_xticks(x, [literal(c) for c in self.conditions], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("top-1 accuracy (first answer token)")
        ax.set_title(
            f"held out: {self.correct.shape[-1]} items, FV at layer {self.layer}", fontsize=9
        )


def shuffled_prompts(task: Task, *, seed: int = 0) -> list[str]:
    """Few-shot prompts of the task's items whose demonstrations' answers are shuffled among
    them (a new permutation per item), so the prompt no longer shows the task.

    Args:
        task: The task: its shots are the demonstrations, its items the queries.
        seed: Seed of the permutations.

    Returns:
        One prompt per item of ``task``, in order: :meth:`Task.prompt` of the item's input with
        the shots' answers permuted (never left in their own order, where there are two shots
        or more).

    Raises:
        ValueError: Every demonstration has the same answer (nothing to shuffle).

    Example:
        >>> import mechprobe as mp
        >>> task = mp.load_task("capitals").with_shots(3).subset(2)
        >>> len(shuffled_prompts(task)), shuffled_prompts(task)[0].count("\\n")
        (2, 7)
    """
    rng = _random.Random(check_seed(seed))
    outputs = [s.output for s in task.shots]
    if len(outputs) > 1 and len(set(outputs)) == 1:
        raise ValueError(
            f"Every demonstration of {task.name!r} answers {outputs[0]!r}: shuffling the answers "
            "cannot corrupt the prompt. Use demonstrations with different answers."
        )
    prompts = []
    for item in task.items:
        order = list(range(len(outputs)))
        if len(order) > 1:
            # Never the unshuffled labels: the answers in shot order must change, not merely the
            # positions (two shots sharing an answer swapped gave the clean prompt back).
            while [outputs[k] for k in order] == outputs:
                rng.shuffle(order)
        prompts.append(task.prompt(item.input, shot_outputs=[outputs[k] for k in order]))
    return prompts


def _accuracy(
    model: Any,
    prompts: list[str],
    answers: list[int],
    vector: torch.Tensor | None,
    layer: int,
    batch_size: int | None = 32,
) -> np.ndarray:
    """Per prompt: whether the top next token is the answer's first token, with ``vector``
    added to the residual stream after block ``layer`` at the last token."""
    logits = _next_logits(model, prompts, vector, layer, batch_size)
    return top1_hit(logits, torch.as_tensor(answers)).cpu().numpy().astype(float)


def _next_logits(
    model: Any,
    prompts: list[str],
    vector: torch.Tensor | None,
    layer: int,
    batch_size: int | None,
) -> torch.Tensor:
    """``[prompts, vocab]`` next-token logits at each prompt's last token, with ``vector`` added
    to the residual stream after block ``layer`` there."""
    spec: dict[SiteLike, Intervention] | None = None
    if vector is not None:
        spec = {Site("mlp_out", layer): Add(vector, positions=-1)}
    out = run(model, prompts, spec, logit_positions=-1, batch_size=batch_size, progress=False)
    return out.logits[:, 0]


def _random_vectors(vector: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """``n`` random directions scaled to ``vector``'s norm: vector j is ``control_seed(seed,
    j)``'s draw, as every random control of the API (one generator for all made vector j depend
    on the vectors before it)."""
    draws = [
        torch.randn(
            vector.shape,
            generator=torch.Generator().manual_seed(control_seed(seed, j)),
            dtype=torch.float32,
        )
        for j in range(n)
    ]
    return [r * (vector.norm() / r.norm()) for r in draws]


def _sampled_prompts(pool: Task, fit: Task, shots: int, seed: int) -> tuple[list[str], list[str]]:
    """``(clean, shuffled)`` prompts of ``fit``'s items, each showing ``shots`` demonstrations
    drawn from the other items of ``pool`` (a new draw per prompt, ``random.Random(seed)`` in item
    order), and the same demonstrations with their answers shuffled (Todd et al.'s contexts)."""
    rng = _random.Random(seed)
    clean, shuffled = [], []
    for i, item in enumerate(fit.items):
        others = [other for other in pool.items if other.input != item.input]
        if len(others) < shots:
            raise ValueError(
                f"shots={shots} demonstrations per prompt, but the fit split of {pool.name!r} "
                f"has {len(others)} other items: pass fewer shots or a smaller test_size."
            )
        one = replace(fit, shots=tuple(rng.sample(others, shots)), items=(item,))
        clean.append(one.prompt(item.input))
        shuffled += shuffled_prompts(one, seed=control_seed(seed, i))
    return clean, shuffled


def _check_heads(heads: Any, n_layers: int, n_heads: int) -> tuple[tuple[int, int], ...]:
    """``heads`` as ``((layer, head), ...)``, each in the model and named once: pairs, or the
    ``(layer, head, score)`` triples of ``HeadScoreResult.top``; a negative layer counts from
    the end, as ``layers=`` does everywhere."""
    if (
        isinstance(heads, np.ndarray)
        and heads.dtype.kind == "f"
        and heads.ndim == 2
        and heads.shape[1] in (2, 3)
        and np.all(heads[:, :2] == np.floor(heads[:, :2]))
    ):  # np.array(HeadScoreResult.top(k)): the triples' scores made every entry a float
        heads = heads[:, :2].astype(np.int64)
    pairs = list(heads) if isinstance(heads, (Sequence, np.ndarray)) else None
    if not pairs or any(
        not isinstance(p, (Sequence, np.ndarray)) or len(p) not in (2, 3) for p in pairs
    ):
        raise ValueError(
            f"heads takes (layer, head) pairs, such as [(9, 1), (11, 3)] (or HeadScoreResult.top's "
            f"(layer, head, score) triples); got {heads!r}."
        )
    out = tuple(
        (
            check_int(p[0], "a head's layer", -n_layers, n_layers - 1) % n_layers,
            check_int(p[1], "a head's index", 0, n_heads - 1),
        )
        for p in pairs
    )
    if len(set(out)) < len(out):
        raise ValueError(f"heads names a head twice: {list(out)}.")
    return out


def _shared_first_token(answers: list[int]) -> int | None:
    """The first token that starts a fifth or more of the answers (more than one), if any."""
    token, count = Counter(answers).most_common(1)[0]
    return token if count > 1 and count / len(answers) >= _SHARED_FIRST_TOKEN else None


def _warn_shared_first_tokens(
    model: Any, answers: list[int], caller: str = "function_vector"
) -> None:
    """Warn when one first token starts many held-out answers: a top-1 hit on it is then no
    evidence of the answer (review 26b: every number on SmolLM2 starts with ``' '``; a model that
    always predicted it scored 0.99 zero-shot and 1.00 with the FV)."""
    token = _shared_first_token(answers)
    if token is not None:
        count = answers.count(token)
        share = count / len(answers)
        text = token_texts(model_adapter(model).tokenizer, [token])[0]
        warn(
            f"{caller} scores each held-out answer by its first token, and {count} of "
            f"{len(answers)} answers start with {text!r}: a model that always predicts it scores "
            f"{share:.2f}. Read the accuracies against that, or use a task whose answers start "
            "with distinct tokens (score_task's exact column checks whole answers)."
        )


def _warn_copying_scores(
    model: Any, task: Task, answers: list[int], caller: str = "function_vector"
) -> None:
    """Warn when many held-out answers of an abstractive task start with their own input's first
    token: a model that copies the query then scores on them (review 38b: 27% of Todd et al.'s
    singular-plural items; SmolLM2 copies the query word on their antonyms). Not for extractive
    tasks, whose answers are in the query by design."""
    if task.kind == "extractive":  # the answer is in the query by design: copying is the task
        return
    inputs = first_token_ids(model, task.arguments())
    # a first token many answers share is warned of already (a byte-level model's ' ')
    shared = _shared_first_token(answers)
    same = sum(a == b != shared for a, b in zip(inputs, answers, strict=True))
    if same >= max(2, _COPIED_SHARE * len(answers)):
        warn(
            f"{caller} scores each held-out answer by its first token, and {same} of "
            f"{len(answers)} answers start with their own input's first token: a model that "
            "repeats the query scores on those. Read the accuracies against that, or check "
            "whole answers (score_task's exact column)."
        )


def _random_heads(
    top: tuple[tuple[int, int], ...], shape: tuple[int, int], n: int, seed: int
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """``n`` draws of ``len(top)`` heads from those outside ``top``, draw ``j`` by
    ``random.Random(control_seed(seed, j))`` (in layer, head order)."""
    outside = [(la, h) for la in range(shape[0]) for h in range(shape[1]) if (la, h) not in top]
    if n and len(outside) < len(top):
        raise ValueError(
            f"n_random_heads draws {len(top)} heads outside the FV's, but the model has only "
            f"{len(outside)} others: pass fewer heads (n_heads) or n_random_heads=0."
        )
    return tuple(
        tuple(sorted(_random.Random(control_seed(seed, j)).sample(outside, len(top))))
        for j in range(n)
    )


def _mean_head_outputs(
    model: Any, prompts: list[str], heads: set[tuple[int, int]], batch_size: int | None
) -> dict[tuple[int, int], torch.Tensor]:
    """``{(layer, head): [d_model]}`` each head's mean output at the prompts' last token,
    ``mean(z) @ W_O[head]`` in float64 (one pass capturing them all)."""
    sites = {head: Site("head", head[0], head=head[1], positions=-1) for head in sorted(heads)}
    with torch.no_grad():
        captured = run(model, prompts, capture=list(sites.values()), logit_positions=-1,
                       batch_size=batch_size, progress=False)  # fmt: skip
        out = {}
        for (layer, head), site in sites.items():
            z = captured[site][:, -1].double().mean(0).cpu()
            out[(layer, head)] = z @ model.blocks[layer].attn.W_O[head].detach().double().cpu()
    return out


def _summed(
    outputs: dict[tuple[int, int], torch.Tensor], heads: Sequence[tuple[int, int]], d_model: int
) -> torch.Tensor:
    """``[d_model]`` float32 sum of ``heads``' mean outputs, added in ``heads``' order."""
    total = torch.zeros(d_model, dtype=torch.float64)
    for head in heads:
        total += outputs[head]
    return total.float()


def _commonest(tokens: Sequence[str]) -> tuple[str, float]:
    """The commonest of ``tokens`` and its share (``("", nan)`` for none, or for a condition
    that was not run, whose tokens are all ``""``)."""
    if not any(tokens):
        return "", float("nan")
    token, count = Counter(tokens).most_common(1)[0]
    return token, count / len(tokens)


def _warn_one_token(task: str, predictions: Sequence[str], hits: np.ndarray) -> None:
    """Warn when the FV makes more than half of the held-out prompts predict one token that is
    not their answer (review 36a: capitals on SmolLM2, a bare ``' '`` for 7 of 8): its accuracy
    then says nothing of the task, only that the vector pushes that token."""
    token, share = _commonest(predictions)
    wrong = [not hit for p, hit in zip(predictions, hits, strict=True) if p == token]
    if len(predictions) > 1 and share > 0.5 and np.mean(wrong) > 0.5:
        warn(
            f"{task}: with the function vector, {share:.0%} of the held-out prompts predict "
            f"{token!r}, mostly not their answer: the vector pushes that token rather than the "
            "task. See summary()'s top_prediction; try another layer (function_vector_sweep) "
            "or a task the model does in context."
        )


def _warn_heads_like_noise(task: str, aie: np.ndarray, aie_random: np.ndarray) -> None:
    """Warn when no head's AIE exceeds the largest random control's: the top heads are then
    picked from noise (review 36a: capitals on SmolLM2, 0.034 against 0.038), and so is the FV."""
    controls = aie_random[np.isfinite(aie_random)]
    if not controls.size or not np.isfinite(aie).any():
        return
    best, noise = float(np.nanmax(aie)), float(controls.max())
    if best <= noise:
        warn(
            f"{task}: the largest head effect (AIE {best:.3g}) is no larger than the largest "
            f"random control's ({noise:.3g}): the top heads, and the FV made of them, cannot be "
            "told from noise. Use more prompts (n_prompts), prompts the model answers, or a task "
            "the model does in context."
        )


@evaluates
def function_vector(
    model: Any,
    task: Task | str,
    *,
    layer: int | None = None,
    n_heads: int | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    shots: int | None = None,
    n_prompts: int = 20,
    test_size: float | int = 0.5,
    only_correct: bool = False,
    n_random: int = 3,
    n_random_heads: int = 0,
    batch_size: int | None = 32,
    seed: int = 0,
    progress: bool = True,
) -> FunctionVectorResult:
    """A task's function vector, its heads and its accuracy beside random vectors of its norm,
    the task's o-vector and the intact model.

    The cost is the AIE: every head's mean output patched into shuffled-label prompts, one cell
    per head and fit prompt, ``1 + n_random`` times. On SmolLM2 (270 heads, 2-core CPU, one
    thread), ``capitals`` at ``n_prompts=6, shots=3, n_random=1`` took 60 s on a
    ``TransformerBridge`` (TransformerLens 4.3 and 3.9 alike) and 59 s on a
    ``HookedTransformer``, with the same heads and accuracies. Give ``heads=`` to skip the
    AIE.

    Args:
        model: A TransformerLens model.
        task: A :class:`mechprobe.Task` (its shots are the demonstrations) or a built-in name.
        layer: Block after which the vectors are added (default ``n_layers // 3``, as Todd et
            al.); the o-vector is fit at this layer's MLP.
        n_heads: The number of top heads (by the task's AIE) whose mean outputs make the FV
            (default 10, as Todd et al.).
        heads: Instead, the ``(layer, head)`` pairs (negative layers from the end; or
            ``HeadScoreResult.top``'s triples) whose mean outputs make the FV, such as
            Todd et al.'s universal set: the top heads of the AIE averaged over several tasks,
            ``np.mean([r.aie for r in results], 0)``. The AIE is then not measured (NaN in the
            result): only the heads' mean outputs are, so a layer sweep,
            ``[function_vector(model, task, layer=l, heads=res.heads) for l in ...]``, costs the
            accuracies alone.
        shots: Demonstrations per fit prompt drawn at random from the other fit items, a new
            draw per prompt (``random.Random(seed)``, in item order), as Todd et al. do (10);
            None: every fit prompt shows the task's own shots, so the prompts differ only in
            their query. The held-out few-shot prompts keep the task's shots either way.
        n_prompts: Fit items (few-shot prompts) the AIE and the means are averaged over.
        test_size: Held-out share (or count) of the items the accuracies are measured on.
        only_correct: Fit on the items the model answers few-shot only (with the task's own
            shots; top-1 on the answer's first token), as Todd et al.'s code does
            (``filter_set``): the heads' means and effects are then taken where the model does
            the task. False (default): every fit item.
        n_random: Random controls: per head in the AIE, and random vectors of the FV's norm.
        n_random_heads: Random-heads controls: draws of as many heads as the FV has, from the
            heads outside it (``random.Random(seed + j)`` for draw ``j``), their mean outputs
            summed as the FV's are and added the same way, as they are and rescaled to the FV's
            norm (conditions ``"random heads"`` and ``"random heads (FV norm)"``, the mean over
            draws). A random vector tests the FV's direction against any direction; this tests
            the FV's heads against any heads' mean outputs, which carry the prompts' format
            too. 0 (default): none.
        batch_size: Prompts per forward pass where whole prompts run (the head means, the
            accuracies; None: all at once); the AIE's cells are packed by :func:`ablate_cells`.
        seed: Seed of the split, the label shuffles and the random directions.
        progress: Show progress bars.

    Returns:
        A :class:`FunctionVectorResult`.

    Raises:
        ValueError: A task with fewer than two shots (nothing to shuffle), or bad counts.

    Warns:
        UserWarning: A fifth or more of the held-out answers start with the same token: its
            share is what always predicting that token scores (a byte-level model's ``' '``).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.function_vector(mp.tiny_model(), "capitals", n_prompts=4, progress=False)
        >>> res.aie.shape, len(res.heads), res.vector.shape
        ((3, 4), 10, (64,))
    """
    task = as_task(task)
    n_layers, heads_per_layer = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layer = n_layers // 3 if layer is None else check_int(layer, "layer", -n_layers, n_layers - 1)
    layer %= n_layers
    if heads is not None and n_heads is not None:
        raise ValueError("Pass n_heads= (the task's top heads) or heads= (chosen heads), not both.")
    given = None if heads is None else _check_heads(heads, n_layers, heads_per_layer)
    if given is None:  # chosen heads need no count (a small model has fewer than 10)
        n_heads = 10 if n_heads is None else n_heads
        check_int(n_heads, "n_heads", 1, n_layers * heads_per_layer)
    check_int(n_prompts, "n_prompts", 1)
    check_int(n_random, "n_random", 0)
    check_int(n_random_heads, "n_random_heads", 0)
    size = len(given) if given is not None else int(n_heads or 0)
    if n_random_heads and n_layers * heads_per_layer - size < size:  # before the AIE's cost
        raise ValueError(
            f"n_random_heads draws {size} heads outside the FV's, but the model has only "
            f"{n_layers * heads_per_layer - size} others: pass fewer heads (n_heads) or "
            "n_random_heads=0."
        )
    check_batch_size(batch_size)
    seed = check_seed(seed)
    only_correct = check_bool(only_correct, "only_correct")
    if shots is not None:
        check_int(shots, "shots", 2)
    if shots is None and len(task.shots) < 2:
        raise ValueError(
            f"Task {task.name!r} has {len(task.shots)} shot(s): shuffled labels need at least two "
            "demonstrations; use a task with more shots."
        )
    pool, test = task.split(test_size, seed=seed)
    if only_correct:  # Todd et al.'s filter_set: queries the model answers few-shot
        solved = _accuracy(model, pool.prompts(), first_token_ids(model, pool.answers()), None, 0,
                           batch_size)  # fmt: skip
        if not solved.any():
            raise ValueError(
                f"only_correct=True, but the model answers none of the {len(pool)} fit items of "
                f"{task.name!r} few-shot: pass only_correct=False, or a task the model does."
            )
        pool = pool.subset([i for i, hit in enumerate(solved) if hit])
    fit = pool.subset(min(n_prompts, len(pool)), seed=seed)
    if shots is None:
        clean, shuffled = fit.prompts(), shuffled_prompts(fit, seed=seed)
    else:
        clean, shuffled = _sampled_prompts(pool, fit, shots, seed)
    answers = first_token_ids(model, fit.answers())
    held_answers = first_token_ids(model, test.answers())
    _warn_shared_first_tokens(model, held_answers)  # before the expensive part
    _warn_copying_scores(model, test, held_answers)
    shape = (n_layers, heads_per_layer)
    if given is None:
        aie_res = ablate_cells(
            model,
            shuffled,
            "head",
            -1,
            answer_prob(answers),
            method="mean",
            reference=clean,
            reference_positions=-1,
            n_random=n_random,
            seed=seed,
            progress=progress,
        )
        aie = aie_res.effect[:, 0].reshape(shape)
        per_prompt = aie_res.per_pair[:, :, 0] - aie_res.clean[:, None]  # each prompt's effect
        aie_spread = spread(per_prompt).reshape(shape)  # over prompts (NaN for one)
        aie_random = aie_res.random_effect[:, 0].reshape(shape)
    else:  # chosen heads need only their mean outputs: the costly AIE is not measured
        aie = aie_spread = aie_random = np.full(shape, np.nan)
    top = given
    if top is None:  # the task's own top heads by AIE
        order = np.argsort(-aie.ravel(), kind="stable")[: cast(int, n_heads)]
        top = tuple((int(i) // heads_per_layer, int(i) % heads_per_layer) for i in order)
        _warn_heads_like_noise(task.name, aie, aie_random)
    random_heads = _random_heads(top, shape, n_random_heads, seed)
    outputs = _mean_head_outputs(model, clean, {*top, *(h for draw in random_heads for h in draw)},
                                 batch_size)  # fmt: skip
    vector = _summed(outputs, top, int(model.cfg.d_model))
    head_vectors = [_summed(outputs, draw, int(model.cfg.d_model)) for draw in random_heads]
    held = test.with_shots(0).prompts()
    fitted = task_pass(model, fit, batch_size=batch_size, progress=False)
    # Merullo et al. average correctly answered prompts; a model that answers none (a random
    # test model) gets the mean over all of them.
    ovector = fit_ovector(fitted, layer, only_correct=bool(fitted.score.correct.any()))
    o = ovector.vector.float().cpu()
    o_scaled = o * (vector.norm() / o.norm().clamp_min(1e-30))
    randoms = _random_vectors(vector, n_random, seed)
    # One pass per condition, one per seed for the random vectors (their hits averaged); the
    # bar covers what follows the AIE's own.
    passes = [
        ("zero-shot", held, None),
        ("few-shot", test.prompts(), None),
        ("function vector", held, vector),
        *[("random vector", held, r) for r in randoms],
        ("o-vector", held, o),
        ("o-vector (FV norm)", held, o_scaled),
        *[("random heads", held, h) for h in head_vectors],
        *[("random heads (FV norm)", held, h * (vector.norm() / h.norm().clamp_min(1e-30)))
          for h in head_vectors],
    ]  # fmt: skip
    tokenizer = model_adapter(model).tokenizer
    hits: dict[str, list[np.ndarray]] = {}
    tops: dict[str, list[str]] = {}
    sizes: dict[str, list[float]] = {}
    for name, prompts, added in progress_bar(
        passes, progress=progress, desc="function vector: accuracies"
    ):
        logits = _next_logits(model, prompts, added, layer, batch_size)
        hit = top1_hit(logits, torch.as_tensor(held_answers)).cpu().numpy().astype(float)
        hits.setdefault(name, []).append(hit)
        tops.setdefault(name, token_texts(tokenizer, logits.argmax(-1).tolist()))  # first seed's
        if added is not None:
            sizes.setdefault(name, []).append(float(added.norm()))
    conditions = _CONDITIONS + (_HEADS_CONDITIONS if n_random_heads else ())
    rows = {
        name: np.mean(hits[name], axis=0) if name in hits else np.full(len(held), np.nan)
        for name in conditions
    }
    _warn_one_token(task.name, tops["function vector"], rows["function vector"])
    # Each condition's norm is that of the vectors it added (their mean; NaN for none).
    norms = [np.mean(sizes[name]) if name in sizes else np.nan for name in conditions]
    return FunctionVectorResult(
        task=task.name,
        aie=aie,
        aie_spread=aie_spread,
        aie_random=aie_random,
        heads=top,
        vector=vector.cpu().numpy(),
        layer=layer,
        conditions=tuple(rows),
        accuracy=np.array([v.mean() for v in rows.values()]),
        correct=np.stack(list(rows.values())),
        norms=np.array(norms),
        n_prompts=len(clean),
        n_random=n_random,
        seed=seed,
        items=tuple(test.inputs()),
        fit_items=tuple(fit.inputs()),
        only_correct=only_correct,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
        predictions=tuple(tuple(tops.get(name, [""] * len(held))) for name in conditions),
        random_heads=random_heads,
    )
