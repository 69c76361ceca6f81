"""Generation with interventions in place: :func:`generate` -> :class:`GenerationResult`.

What a steering vector, a function vector or an erasure does to what the model *says*. On a
``HookedTransformer`` (TransformerLens 3.x) the prompt runs once and each new token alone, with
TransformerLens's key/value cache (``use_cache``, on by default there). A ``TransformerBridge``
recomputes the whole sequence for every new token: TransformerLens 4.3's bridge leaves its cache
empty with transformers 5.24, so its ``generate`` degrades with the cache on. That costs one
forward pass of the sequence so far per token: for eight 3-shot SmolLM2 prompts, 5.2x Hugging
Face's cached ``generate`` at 10 new tokens and 8.7x at 40, and a little faster than the bridge's
``generate`` without its cache (``benchmarks/bench_generate.py``). It suits the completions an
analysis reads (a few to a few dozen tokens), not long texts. With the cache, SmolLM2 as a
``HookedTransformer`` is 2.2x and 3.2x faster at 10 and 40 tokens
(``benchmarks/bench_generate_hooked.py``). Both ways give the same tokens
(tested): with the cache, the prompt's positions are edited once, when the prompt runs, and an
edit of every position (``positions=None``) also reaches each new token as it runs.

Positions of the interventions count in the *prompt*: ``positions=-1`` is each prompt's last
token at every step, as in a cached generation, where that position is computed once, with the
edit, and kept (function vectors, o-vectors). ``positions=None`` (all) edits every position,
generated tokens included (steering vectors added everywhere), and ``positions="generated"`` the
generated tokens only (a steering vector added to the response and not to the prompt, as
contrastive activation addition does). So the completions equal those of
a cached generation with the edit applied when each position is first computed; the tests check
this against Hugging Face's own cached ``generate`` with a hook written by hand.

Each token is the most probable one (greedy, the default), or drawn at a ``temperature`` from a
generator per prompt keyed by ``seed`` and the prompt's tokens (``mechprobe.core.keyed_seed``),
so a prompt's sample does not depend on the prompts, batch size or order it runs with. ``top_k``
and ``top_p`` narrow the draw as Hugging Face's samplers do, in its order (temperature, then the
k most probable tokens, ties at the k-th kept, then the fewest most probable ones whose
probability reaches ``top_p``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch

from mechprobe.core._adapter import model_adapter, token_texts
from mechprobe.core._batching import (
    Batch,
    check_token_ids,
    pad_id,
    pad_rows,
    position_list,
    tokenize,
)
from mechprobe.core._eval_mode import evaluates
from mechprobe.core._hooks import (
    Ablate,
    Add,
    Capture,
    Intervention,
    InterventionSpec,
    Project,
    Replace,
    intervene,
    intervention_spec,
    is_hook_function,
    is_pooled,
)
from mechprobe.core._progress import progress_bar
from mechprobe.core._results import Result, literal, new_axes, token_label
from mechprobe.core._runner import (
    _items,
    _rows_of,
    check_spec_positions,
    forward,
    refuse_gradient,
    run,
)
from mechprobe.core._seeding import keyed_seed
from mechprobe.core._sites import Positions, Site, SiteLike, resolve_site
from mechprobe.core._validation import check_float, check_int, check_seed

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["GenerationResult", "generate"]

Finished = Literal["eos", "stop", "length"]
#: The positions of the tokens generated so far (``generate`` only).
GENERATED = "generated"


@dataclass(frozen=True, eq=False, repr=False)
class GenerationResult(Result, format="mechprobe.GenerationResult", version=1):
    """Completions of prompts (greedy or sampled), with the interventions that were in place.

    Attributes:
        prompts: The prompts, as given.
        completions: Per prompt, the generated text: without the end-of-sequence token, and cut
            before the first of ``stop_strings``.
        tokens: Per prompt, ``[n]`` the generated token ids (ending with the end-of-sequence
            token, or the one that completed a stop string, where generation stopped there).
        logprobs: Per prompt, ``[n]`` each generated token's log-probability under the model as
            run (interventions included).
        token_strings: Per prompt, each generated token decoded alone.
        finished: Per prompt, why generation stopped: ``"eos"``, ``"stop"`` (a stop string) or
            ``"length"`` (``max_new_tokens``).
        interventions: The interventions in place, as text (``"mlp_out@10: Add(scale=2, |v|=12.3, positions=-1)"``).
        max_new_tokens: The limit of new tokens per prompt.
        temperature: 0 for greedy completions, else the sampling temperature.
        seed: The seed of the draws (used when sampling).
        top_k: The draw's limit to the most probable tokens (None: none).
        top_p: The draw's nucleus: the probability its tokens reach (None: all tokens).
        model_name: The model's name (``cfg.model_name``), for the record (empty in files
            saved before results recorded it).
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).

    Example:
        >>> import mechprobe as mp
        >>> res = mp.generate(mp.tiny_model(), ["Hi", "Hello"], max_new_tokens=3, progress=False)
        >>> len(res.completions), [len(t) for t in res.tokens]
        (2, [3, 3])
    """

    prompts: tuple[str, ...]
    completions: tuple[str, ...]
    tokens: tuple[np.ndarray, ...]
    logprobs: tuple[np.ndarray, ...]
    token_strings: tuple[tuple[str, ...], ...]
    finished: tuple[str, ...]
    interventions: tuple[str, ...]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    top_k: int | None = None
    top_p: float | None = None
    model_name: str = ""
    model_dtype: str = ""

    def to_frame(self) -> pd.DataFrame:
        """One row per generated token: prompt index, step, ``token_id``, ``token`` (its text, as
        in every frame), log-probability. A token holding part of a character reads as its bytes
        (``<0xE2>``), so the ``token`` column joined equals ``completions`` only where every token
        holds whole characters.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.generate(mp.tiny_model(), "Hi", max_new_tokens=2, progress=False)
            >>> list(res.to_frame().columns)
            ['prompt', 'step', 'token_id', 'token', 'logprob']
        """
        columns = ["prompt", "step", "token_id", "token", "logprob"]
        rows = [
            {"prompt": i, "step": s, "token_id": int(t), "token": text, "logprob": float(lp)}
            for i, (ids, texts, lps) in enumerate(
                zip(self.tokens, self.token_strings, self.logprobs, strict=True)
            )
            for s, (t, text, lp) in enumerate(zip(ids, texts, lps, strict=True))
        ]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> pd.DataFrame:
        """One row per prompt: its index (``prompt``, as in :meth:`to_frame`), its end
        (``prompt_text``: of its last user turn in a chat template), the completion, its length
        in tokens, why it stopped and its mean log-probability.

        Example:
            >>> import mechprobe as mp
            >>> res = mp.generate(mp.tiny_model(), "Hi", max_new_tokens=2, progress=False)
            >>> list(res.summary().columns)
            ['prompt', 'prompt_text', 'completion', 'n_tokens', 'finished', 'mean_logprob']
        """
        return pd.DataFrame(
            {
                "prompt": np.arange(len(self.prompts)),
                "prompt_text": [_prompt_label(p) for p in self.prompts],
                "completion": list(self.completions),
                "n_tokens": [len(t) for t in self.tokens],
                "finished": list(self.finished),
                "mean_logprob": [float(lp.mean()) if lp.size else np.nan for lp in self.logprobs],
            }
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Each generated token's log-probability along its completion (one line per prompt, at
        most 20).

        Args:
            ax: Draw into these axes (default: a new figure).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Example:
            >>> import mechprobe as mp
            >>> res = mp.generate(mp.tiny_model(), ["Hi", "Yo"], max_new_tokens=3, progress=False)
            >>> len(res.plot().axes[0].lines)
            2
        """
        fig, ax = new_axes(ax, (6.0, 3.5))
        rows = list(zip(self.prompts, self.logprobs, self.token_strings, strict=True))[:20]
        for prompt, lps, words in rows:
            (line,) = ax.plot(
                np.arange(len(lps)), lps, marker=".", label=literal(_prompt_label(prompt, 30))
            )
            if len(rows) <= 3:  # the tokens themselves: a dip is read off the figure
                for i, (lp, word) in enumerate(zip(lps, words, strict=True)):
                    ax.annotate(literal(token_label(word, 10)), (i, lp), textcoords="offset points",
                                xytext=(0, 4), ha="center", fontsize=6, color=line.get_color())  # fmt: skip
        from matplotlib.ticker import MaxNLocator

        ax.margins(y=0.12)  # room for the token above the highest point
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("generated token")
        ax.set_ylabel("log-probability")
        where = "; ".join(self.interventions) if self.interventions else "no intervention"
        how = "greedy" if self.temperature == 0 else f"sampled at T={self.temperature:g}"
        how += "" if self.top_k is None else f", top-{self.top_k}"
        how += "" if self.top_p is None else f", top-p {self.top_p:g}"
        ax.set_title(literal(f"{how} generation ({_tail(where, 60)})"))
        if len(self.prompts) <= 8:  # below the axes: inside, it covered a completion's last steps
            # The gap in font sizes, clear of the x label at any height (a fraction of the axes'
            # height ran into it, and the layout then cut the y label).
            ax.legend(
                fontsize="small", loc="upper center", bbox_to_anchor=(0.5, 0.0), borderaxespad=4.5,
                ncol=2,
            )  # fmt: skip
        return fig

    def _describe(self) -> str:
        first = self.completions[0] if self.completions else ""
        edits = f"{len(self.interventions)} intervention(s)" if self.interventions else "intact"
        return (
            f"{len(self.prompts)} prompt(s), {edits}, up to {self.max_new_tokens} new tokens; "
            f"first: {_tail(first, 40)!r}"
        )


@evaluates
def generate(
    model: Any,
    prompts: Sequence[str] | str | Batch,
    interventions: InterventionSpec | None = None,
    *,
    max_new_tokens: int = 20,
    stop_strings: Sequence[str] | str = (),
    stop_at_eos: bool = True,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool | None = None,
    batch_size: int | None = 32,
    progress: bool = True,
) -> GenerationResult:
    """Complete prompts with interventions in place, greedily or by sampling (module docstring:
    positions count in the prompt; the whole sequence is recomputed for every token).

    Args:
        model: A TransformerLens model with a tokenizer.
        prompts: One prompt, a list of prompts, or a :class:`Batch` (re-padded on the left).
        interventions: ``{site: intervention(s)}`` as for :func:`mechprobe.intervene`; negative
            positions count from each prompt's last token, ``None`` edits every position,
            generated ones included, and ``"generated"`` the generated tokens only. Not accepted, as the sequence grows by a token per step: a
            ``Capture`` (capture with :func:`mechprobe.run` on the completed texts), a
            ``Gradient``, ``Ablate("mean")`` without ``mean=`` (the mean over the prompts would
            change as they grow), a ``Replace`` of one row per position over every position
            (``[seq, d]``), and any value written into an attention ``pattern`` (a zero
            ``Ablate`` works there).
        max_new_tokens: New tokens per prompt at most.
        stop_strings: Strings that end a completion (e.g. ``"\\n"`` for one-line answers; Hugging
            Face's name); the completion is cut before the first one.
        stop_at_eos: End a completion at the tokenizer's end-of-sequence token.
        temperature: 0 (the default) takes the most probable token; above 0, tokens are drawn
            from ``softmax(logits / temperature)``.
        top_k: When sampling, draw from the ``top_k`` most probable tokens only (tokens tied
            with the k-th are kept), as Hugging Face's ``top_k``. None: every token.
        top_p: When sampling, draw from the fewest most probable tokens whose probabilities
            (after ``temperature`` and ``top_k``) sum to at least ``top_p`` (nucleus sampling,
            Holtzman et al. 2020; Hugging Face's ``top_p``). None or 1: every token.
        seed: Seed of the draws when sampling. A prompt's draws come from ``seed`` and its
            tokens (and which copy of that prompt it is, so repeated prompts give different
            samples): the same whatever prompts, batch size or order it runs with.
        use_cache: Run each new token alone with TransformerLens's key/value cache (None, the
            default: on a ``HookedTransformer``, off on a ``TransformerBridge``, whose cache
            TransformerLens 4.3 leaves empty; True on a bridge is refused). The same tokens
            either way, within float rounding. A hook function ``fn(activation, hook)`` sees
            the left-padded sequence so far at every step (None then recomputes, also on a
            ``HookedTransformer``); with ``use_cache=True`` it sees the prompts once and then
            each new token alone (``[batch, 1, ...]``), so only a function that ignores
            positions (``act + v``) gives the same tokens both ways.
        batch_size: Prompts generated together (None: all at once).
        progress: Show a progress bar over tokens (``MECHPROBE_PROGRESS=0`` silences it).

    Returns:
        A :class:`GenerationResult`.

    Raises:
        ValueError: Before any forward pass: bad ``max_new_tokens``, ``stop_strings``,
            ``temperature``, ``top_k`` or ``top_p`` (or either of the last two without sampling),
            an intervention generation cannot apply (above), a site the model lacks, or a
            position outside some prompt (named by its index in ``prompts``).
        TypeError: ``interventions`` is not a ``{site: intervention(s)}`` mapping.

    Example:
        >>> import torch, mechprobe as mp
        >>> model = mp.tiny_model()
        >>> steer = {mp.Site("resid_post", 1): mp.Add(torch.randn(64) * 20, positions=-1)}
        >>> plain = mp.generate(model, "Hi", max_new_tokens=4, progress=False)
        >>> steered = mp.generate(model, "Hi", steer, max_new_tokens=4, progress=False)
        >>> len(plain.tokens[0]), len(steered.tokens[0])
        (4, 4)
    """
    check_int(max_new_tokens, "max_new_tokens", 1)
    temperature = check_float(temperature, "temperature", low=0.0)
    if top_k is not None:
        top_k = check_int(top_k, "top_k", 1)
    if top_p is not None:
        top_p = check_float(top_p, "top_p", 0.0, 1.0, low_open=True)
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(
            f"top_k={top_k} / top_p={top_p} narrow a sampled draw, but temperature=0 takes the "
            "most probable token: pass temperature > 0 (e.g. 1.0) to sample, or drop them."
        )
    seed = check_seed(seed)
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}.")
    spec = intervention_spec(interventions)
    for key, value in spec.items():
        _, site = resolve_site(model, key)  # an unknown site fails before any pass
        for item in _items(value):
            _check_item(key, site, item)
    batch = _left_padded(model, prompts)
    check_spec_positions(spec, batch)  # a position outside some prompt fails before any pass
    adapter = model_adapter(model)
    functions = any(is_hook_function(item) for value in spec.values() for item in _items(value))
    cached = _use_cache(adapter.kind, use_cache, functions)
    n_ctx = adapter.n_ctx
    longest = int(batch.lengths.max())
    if n_ctx is not None and longest + max_new_tokens > int(n_ctx):
        raise ValueError(
            f"A prompt of {longest} tokens and max_new_tokens={max_new_tokens} exceed the "
            f"model's context of {int(n_ctx)} tokens: lower max_new_tokens to at most "
            f"{int(n_ctx) - longest}, or shorten the prompt."
        )
    tok = adapter.tokenizer
    eos = tok.eos_token_id if stop_at_eos else None
    draws = _generators(batch, seed) if temperature > 0 else None
    out: list[tuple[list[int], list[float], str, Finished]] = []
    for rows, chunk in batch.chunks(batch_size):
        local = {k: [_rows_of(i, rows, len(batch)) for i in _items(v)] for k, v in spec.items()}
        pick = _Pick(temperature, None if draws is None else draws[rows], top_k, top_p)
        out += _complete(model, chunk, local, max_new_tokens, stops, eos, pick, progress, cached)
    return GenerationResult(
        prompts=tuple(batch.prompts),
        completions=tuple(text for _, _, text, _ in out),
        tokens=tuple(np.asarray(ids, dtype=np.int64) for ids, _, _, _ in out),
        logprobs=tuple(np.asarray(lps, dtype=np.float64) for _, lps, _, _ in out),
        token_strings=tuple(tuple(token_texts(tok, ids)) for ids, _, _, _ in out),
        finished=tuple(why for _, _, _, why in out),
        interventions=tuple(
            f"{key}: {_edit(item, _positions(key, item))}"
            for key, value in spec.items()
            for item in _items(value)
        ),
        max_new_tokens=int(max_new_tokens),
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        top_p=top_p,
        model_name=model_adapter(model).name,
        model_dtype=model_adapter(model).dtype_name,
    )


def _complete(
    model: Any,
    prompts: Batch,
    spec: dict[SiteLike, list[Intervention]],
    max_new_tokens: int,
    stops: list[str],
    eos: int | None,
    pick: _Pick,
    progress: bool,
    cached: bool = False,
) -> list[tuple[list[int], list[float], str, Finished]]:
    """Generate for one left-padded chunk: every row grows by one token per step (finished rows
    too, their extra tokens dropped), so the prompts' positions keep one offset from the end.
    A finished row's placeholder tokens never reach the others: rows do not attend across.
    ``cached``: the prompt once, then each new token alone (:class:`_CachedSteps`)."""
    tok = model_adapter(model).tokenizer
    # Every row, finished or not, grows by one token per step: a negative prompt position is
    # then the same offset from every row's end (run() resolves positions per row).
    seqs = [
        prompts.tokens[i][prompts.attention_mask[i].bool()].tolist() for i in range(len(prompts))
    ]
    new: list[list[int]] = [[] for _ in seqs]
    logprobs: list[list[float]] = [[] for _ in seqs]
    done: list[Finished | None] = [None] * len(seqs)
    texts = [""] * len(seqs)
    steps = _CachedSteps(model, prompts, spec) if cached else None
    for step in progress_bar(range(max_new_tokens), progress=progress, desc="generate"):
        if steps is not None:
            last = steps.next_logits([row[-1] for row in seqs] if step else None).double()
        else:
            batch = pad_rows(seqs, pad_id(model), "left", prompts.prompts)
            shifted = _shifted(spec, step)
            out = run(model, batch, shifted, logit_positions=-1, batch_size=None, progress=False)
            last = out.logits[:, 0].double()
        logp = torch.log_softmax(last, dim=-1)
        for i in range(len(seqs)):
            if done[i] is not None:
                seqs[i].append(int(last[i].argmax()))  # a placeholder, never read back
                continue
            if not bool(torch.isfinite(last[i]).all()):
                # argmax of NaN logits is token 0: the row went on with text nobody chose.
                causes = model_adapter(model).nan_causes(prompts.attention_mask, left=True)
                raise ValueError(
                    f"Prompt {i}'s next-token logits are not finite at step {step} (NaN or "
                    f"infinity: {causes}), so no token can be picked. Check the interventions' "
                    "vectors, or run the model in float32 or bfloat16."
                )
            token = pick(i, last[i])
            seqs[i].append(token)
            new[i].append(token)
            logprobs[i].append(float(logp[i, token]))
            if eos is not None and token == eos:
                done[i] = "eos"
                texts[i] = tok.decode(new[i][:-1])
                continue
            texts[i] = tok.decode(new[i])
            cut = min((texts[i].find(s) for s in stops if s in texts[i]), default=-1)
            if cut >= 0:
                done[i], texts[i] = "stop", texts[i][:cut]
        if all(d is not None for d in done):
            break
    return [
        (n, lp, text, d if d is not None else "length")
        for n, lp, text, d in zip(new, logprobs, texts, done, strict=True)
    ]


def _use_cache(kind: str, use_cache: bool | None, functions: bool = False) -> bool:
    """Whether to generate with the key/value cache (see :func:`generate`); ``functions``:
    whether a hook function is among the interventions (it could not tell a cached step, one
    new token, from the sequence, so None recomputes)."""
    if use_cache is None:
        return kind == "hooked" and not functions
    if not isinstance(use_cache, bool):
        raise TypeError(f"use_cache must be True, False or None, got {use_cache!r}.")
    if use_cache and kind != "hooked":
        raise ValueError(
            "use_cache=True needs a HookedTransformer: TransformerLens 4.3's bridge leaves its "
            "key/value cache empty with transformers 5.24, so a cached generation would read "
            "nothing of the prompt. Leave use_cache=None (the bridge recomputes the sequence)."
        )
    return use_cache


class _CachedSteps:
    """The next-token logits of a left-padded chunk with TransformerLens's key/value cache: the
    prompts run once with every intervention; each later token runs alone, with the
    interventions that act on every position (the prompt's positions were edited when the
    prompt ran, and stay edited in the cache)."""

    def __init__(self, model: Any, prompts: Batch, spec: dict[SiteLike, list[Intervention]]):
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        self.model, self.prompts, self.spec = model, prompts, spec
        device = model.W_E.device
        self.cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(prompts))
        self.keys = prompts.attention_mask
        self.everywhere: dict[SiteLike, list[Intervention]] = {}
        # The prompt runs without the edits of generated tokens; each new token, alone in its
        # pass, gets them with those of every position.
        self.spec = _shifted(spec, 0)
        for key, items in spec.items():
            for item in items:
                where = _positions(key, item)
                if where is None or where == GENERATED:
                    site, item = _placed(key, item, None)
                    self.everywhere.setdefault(site, []).append(item)

    def next_logits(self, new: list[int] | None) -> torch.Tensor:
        """``[rows, vocab]``: after the prompts (``new`` None), else after one new token each."""
        model, device = self.model, self.model.W_E.device
        with torch.no_grad():
            if new is None:
                batch = self.prompts
                self.keys = batch.attention_mask.clone()  # the real keys so far, per row
                with intervene(model, self.spec, batch=batch):
                    logits = forward(model, batch, past_kv_cache=self.cache)
            else:
                tokens = torch.tensor(new, device=device)[:, None]
                mask = torch.ones_like(tokens)
                self.keys = torch.cat([self.keys, mask.to(self.keys.device)], dim=1)
                # An attention-map edit keeps the prompts' padding masked in the cached keys.
                with intervene(model, self.everywhere, key_mask=self.keys):
                    logits = model(tokens, attention_mask=mask, past_kv_cache=self.cache)
        return logits[:, -1]


class _Pick:
    """The next token of a row from its logits: the first maximal one (Hugging Face's greedy
    search), or a draw from :func:`_sampling_distribution` with the row's own generator."""

    def __init__(
        self,
        temperature: float,
        generators: list[torch.Generator] | None,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> None:
        self.temperature, self.generators = temperature, generators
        self.top_k, self.top_p = top_k, top_p

    def __call__(self, row: int, logits: torch.Tensor) -> int:
        if self.generators is None:
            return int(logits.argmax())
        probs = _sampling_distribution(logits.cpu(), self.temperature, self.top_k, self.top_p)
        return int(torch.multinomial(probs, 1, generator=self.generators[row]))


def _sampling_distribution(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """``[vocab]`` the distribution a token is drawn from: ``softmax(logits / temperature)``
    restricted to the ``top_k`` most probable tokens (ties with the k-th kept), then to the fewest
    most probable ones whose probability reaches ``top_p`` (at least one), renormalised: Hugging
    Face's ``TopKLogitsWarper`` and ``TopPLogitsWarper``, in its order.

    Example:
        >>> p = _sampling_distribution(torch.tensor([2.0, 1.0, 0.0, -1.0]), 1.0, top_k=2)
        >>> [round(x, 3) for x in p.tolist()]
        [0.731, 0.269, 0.0, 0.0]
        >>> _sampling_distribution(torch.tensor([2.0, 1.0, 0.0]), 1.0, top_p=0.5).tolist()
        [1.0, 0.0, 0.0]
    """
    # Shifted first, so a tiny temperature sends the others to -inf, never inf - inf (NaN).
    scores = (logits.float() - logits.float().max()) / temperature
    if top_k is not None and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Ascending order: drop the low tail whose total stays within 1 - top_p, never the top.
        order = torch.argsort(scores)
        tail = torch.softmax(scores[order], dim=-1).cumsum(-1) <= 1 - top_p
        tail[-1] = False
        scores = scores.masked_fill(torch.zeros_like(tail).scatter(0, order, tail), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _generators(batch: Batch, seed: int) -> list[torch.Generator]:
    """One generator per prompt, keyed by ``seed``, its tokens and its copy number (the k-th
    time the same prompt appears)."""
    seen: dict[tuple[int, ...], int] = {}
    out = []
    for i in range(len(batch)):
        ids = batch.tokens[i][batch.attention_mask[i].bool()].tolist()
        copy_number = seen.get(tuple(ids), 0)
        seen[tuple(ids)] = copy_number + 1
        key = keyed_seed(seed, [ids], f"sample {copy_number}".encode())
        out.append(torch.Generator().manual_seed(key))
    return out


def _left_padded(model: Any, prompts: Sequence[str] | str | Batch) -> Batch:
    """The prompts tokenised and left-padded (every row then ends at the same column); a
    :class:`Batch` is re-padded from its real tokens, its prompts decoded when it has none."""
    if not isinstance(prompts, Batch):
        return tokenize(model, prompts, padding_side="left")
    rows = [
        prompts.tokens[i][prompts.attention_mask[i].bool()].tolist() for i in range(len(prompts))
    ]
    # Ids given by hand, before the tokenizer decodes them (a negative one: OverflowError there).
    check_token_ids(model, rows)
    texts = prompts.prompts
    if not all(texts):
        texts = tuple(model_adapter(model).tokenizer.decode(ids) for ids in rows)
    return pad_rows(rows, pad_id(model), "left", texts)


def _check_item(key: SiteLike, site: Site | None, item: Any) -> None:
    """Refuse what generation cannot apply (see :func:`generate`)."""
    if not isinstance(item, Intervention):
        raise TypeError(
            f"{type(item).__name__} at {key} is not an intervention: use Replace, Add, Ablate or "
            "Project, or a hook function fn(activation, hook)."
        )
    if isinstance(item, Capture):
        raise ValueError(
            f"A Capture at {key}: generate records no activations; run the completed texts "
            "through mp.run(..., capture=[...]) instead."
        )
    refuse_gradient(key, item, "generate()")
    grows = "the sequence grows by one token per step"
    if site is not None and site.kind == "pattern" and _sized(item):
        raise ValueError(
            f"{type(item).__name__} at {key}: an attention pattern's rows are as long as the "
            f"sequence, and {grows}, so a value fitted to the prompt fits step 0 only. In "
            "generate, ablate a pattern with Ablate('zero'), or edit the head's output (a "
            "'head' or 'head_out' site) instead."
        )
    positions = _positions(key, item)
    value = _replace_value(item)
    spans = positions is None or positions == GENERATED
    if spans and value is not None and value.ndim >= 2 and value.shape[-2] != 1:
        raise ValueError(
            f"Replace at {key} writes a value of shape {tuple(value.shape)} over every position, "
            f"and {grows}: pass one vector [d] (or [n_prompts, 1, d]) for every position, or "
            "positions= naming the prompt's positions its rows are for."
        )
    if is_pooled(item):
        raise ValueError(
            f"Ablate('mean') at {key} has no mean: over the prompts it would change as they "
            "grow. Pass mean= (e.g. a mean of mp.run captures over reference prompts)."
        )
    if isinstance(item, Replace) and isinstance(item.value, Capture) and item.value.value is None:
        raise ValueError(
            f"Replace at {key} reads a Capture that holds nothing yet: fill it in a run first."
        )


def _sized(item: Intervention) -> bool:
    """Whether an intervention carries a value sized to the site's last axis (every built-in one
    but a zero ablation; another subclass is taken to know what it does)."""
    if isinstance(item, Ablate):
        return item.method == "mean"
    return isinstance(item, (Replace, Add, Project))


def _replace_value(item: Intervention) -> torch.Tensor | None:
    """A Replace's value (what its Capture holds), else None."""
    if not isinstance(item, Replace):
        return None
    return item.value.value if isinstance(item.value, Capture) else item.value


def _positions(key: SiteLike, item: Intervention) -> Positions:
    """The positions an intervention acts on: its own, else its site's (None: all)."""
    if item.positions is not None:
        return item.positions
    return key.positions if isinstance(key, Site) else None


def _shift(positions: Any, step: int) -> Any:
    """Prompt positions as positions of the sequence after ``step`` generated tokens: negative
    ones move back by ``step``; ones counted from the start, and None or ``"all"``, stay."""
    if positions is None or isinstance(positions, str) or step == 0:
        return positions
    return [p - step if p < 0 else p for p in position_list(positions)]


def _shifted(
    spec: dict[SiteLike, list[Intervention]], step: int
) -> dict[SiteLike, list[Intervention]]:
    """``spec`` with every intervention's (or its site's) positions counted in the prompt, and
    ``"generated"`` as the ``step`` tokens generated so far (none at step 0: left out)."""
    out: dict[SiteLike, list[Intervention]] = {}
    for key, items in spec.items():
        for item in items:
            where = _positions(key, item)
            if where == GENERATED:
                if step == 0:
                    continue
                where = list(range(-step, 0))
            else:
                where = _shift(where, step)
            site, item = _placed(key, item, where)
            out.setdefault(site, []).append(item)
    return out


def _placed(key: SiteLike, item: Intervention, positions: Any) -> tuple[SiteLike, Intervention]:
    """``(site, item)`` acting on ``positions``: set where the positions were given (on the
    intervention, else on its Site), the site's own positions cleared under an item's."""
    if item.positions is not None:
        moved = copy.copy(item)  # a shallow copy: the same vectors, other positions
        moved.positions = positions
        return key, moved
    if isinstance(key, Site) and key.positions is not None:
        return dataclasses.replace(key, positions=positions), item
    return key, item


def _tail(text: str, width: int = 40) -> str:
    """The end of ``text`` in at most ``width`` characters (a prompt's end is what differs)."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else "…" + text[-(width - 1) :]


#: The user's turn in the chat templates met most (ChatML, Llama 3, Gemma, Llama 2 / Mistral).
_USER_TURNS = (
    re.compile(r"<\|im_start\|>user\s*(.*?)\s*(?:<\|im_end\|>|$)", re.S),
    re.compile(r"<\|start_header_id\|>user<\|end_header_id\|>\s*(.*?)\s*(?:<\|eot_id\|>|$)", re.S),
    re.compile(r"<start_of_turn>user\s*(.*?)\s*(?:<end_of_turn>|$)", re.S),
    re.compile(r"\[INST\]\s*(.*?)\s*(?:\[/INST\]|$)", re.S),
)


def _prompt_label(prompt: str, width: int = 40) -> str:
    """What names ``prompt`` in a legend or table: the end of its last user turn where it is in
    a chat template (the template's tail, ``"…nd|>\\n<|im_start|>assistant\\n"``, named
    nothing and was the same for every chat prompt), else the end of the prompt.

    Example:
        >>> _prompt_label("<|im_start|>user\\nName a city.<|im_end|>\\n<|im_start|>assistant\\n")
        'Name a city.'
        >>> _prompt_label("Q: capital of France?\\nA:")
        'Q: capital of France?\\\\nA:'
    """
    turns = [
        (m.start(1), m.group(1))
        for pattern in _USER_TURNS
        for m in pattern.finditer(prompt)
        if m.group(1).strip()
    ]
    # The last turn: in a conversation, the question being answered.
    return _tail(max(turns)[1] if turns else prompt, width)


def _edit(item: Any, positions: Any) -> str:
    """An intervention with its size where it has one: ``Add(scale=2, |v|=12.3, positions=-1)``
    (the title of a steered generation left out how hard it steered)."""
    parts = []
    # The library's Add only: a user's intervention may hold any "scale" or "vector" (a tensor
    # of scales made the description, built after generating, raise).
    if isinstance(item, Add):
        parts.append(f"scale={item.scale:g}")
        parts.append(f"|v|={float(item.vector.double().norm()):.3g}")
    parts.append(f"positions={positions!r}")
    return f"{getattr(item, 'label', type(item).__name__)}({', '.join(parts)})"
