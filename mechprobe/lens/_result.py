""":class:`LensResult`: what :func:`mechprobe.logit_lens` found, as arrays, a tidy frame and files.

Arrays are numpy, indexed ``[prompt, entry, position, ...]``: an *entry* is one decoded site at one
layer (``sites[e]``, ``layers[e]``), a *position* one column of the prompt-position grid
(``positions[b, k]``, the token index in the unpadded prompt, BOS included; ``-1`` marks a column
that a shorter prompt lacks when ``positions="all"``). Files are JSON or npz, never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mechprobe.core import Result, float64_columns, site_columns, token_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LensResult"]

FRAME_COLUMNS = (
    "lens",
    "prompt",
    "site",
    "kind",
    "layer",
    "position",
    "token",
    "target",
    "rank",
    "prob",
    "logprob",
    "entropy",
    "kl_to_final",
    "top1_token",
    "top1_prob",
)


# Positions the notebook view of a LensResult draws (the last ones).
_HTML_POSITIONS = 24


@dataclass(frozen=True, eq=False, repr=False)
class LensResult(Result, format="mechprobe.LensResult", version=3, html_figure=True):
    """Logit-lens read-outs for prompts x decoded entries x prompt positions (x targets).

    Attributes:
        prompts: The prompts, as given.
        prompt_tokens: Each prompt's tokens as text (BOS included where the model prepends one).
        sites: ``[E]`` site kind of each decoded entry (``"resid_post"``, ``"mlp_out"``, ...).
        layers: ``[E]`` block index of each entry (``resid_post`` at layer l is
            ``blocks.l.hook_resid_post``).
        positions: ``[B, K]`` unpadded prompt position of each grid column (-1: none).
        top_ids: ``[B, E, K, top_k]`` token ids, most probable first (-1 where no position).
        top_probs: ``[B, E, K, top_k]`` their probabilities.
        entropy: ``[B, E, K]`` entropy of each lens distribution, in nats.
        kl_to_final: ``[B, E, K]`` KL(final || lens) in nats, final = the model's own output.
        targets: The targets of each prompt (possibly none).
        target_tokens: Token ids of each target (several tokens are scored by teacher forcing).
        position_rank: ``[B, E, K, T]`` rank (0 = top-1) of each target's first token at each grid
            position: the number of other tokens whose logit is at least the target's, so ties
            count against it (-1 where the prompt has fewer targets).
        position_prob: ``[B, E, K, T]`` probability of each target's first token there.
        target_rank: ``[B, E, T]`` first-token rank at the prompt's last token.
        target_prob: ``[B, E, T]`` first-token probability at the prompt's last token.
        target_logprob: ``[B, E, T]`` teacher-forced log-probability of the whole target.
        token_text: Decoded text of every token id in ``top_ids`` and ``target_tokens``.
        model_name: The model's name, for the record.
        model_dtype: The model's weights' dtype (``"float32"``, ``"bfloat16"``...), for the
            record (empty in files saved before results recorded it).
        lens: The lens that decoded it (``"logit"``, ``"tuned (...)"``, ``"patchscope (...)"``).

    Example:
        >>> import mechprobe as mp
        >>> lens = mp.logit_lens(mp.tiny_model(), "Hi", targets=" a")
        >>> list(lens.to_frame().columns[:6])
        ['lens', 'prompt', 'site', 'kind', 'layer', 'position']
    """

    prompts: tuple[str, ...]
    prompt_tokens: tuple[tuple[str, ...], ...]
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    positions: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    entropy: np.ndarray
    kl_to_final: np.ndarray
    targets: tuple[tuple[str, ...], ...]
    target_tokens: tuple[tuple[tuple[int, ...], ...], ...]
    position_rank: np.ndarray
    position_prob: np.ndarray
    target_rank: np.ndarray
    target_prob: np.ndarray
    target_logprob: np.ndarray
    token_text: dict[int, str]
    model_name: str = ""
    model_dtype: str = ""
    lens: str = "logit"

    def entries(self, site: str | None = None) -> list[int]:
        """Entry indices of one site kind, by increasing layer (``None``: the first kind decoded).

        Args:
            site: A decoded site kind (``"resid_post"``, ``"mlp_out"``...), or None.

        Returns:
            The indices of that kind's entries on the entry axis ``E``, by increasing layer.

        Raises:
            ValueError: ``site`` was not decoded; the message lists the kinds that were.
        """
        kind = self.sites[0] if site is None else site
        found = sorted(
            (i for i, s in enumerate(self.sites) if s == kind), key=self.layers.__getitem__
        )
        if not found:
            raise ValueError(
                f"Site {site!r} was not decoded; this result has {sorted(set(self.sites))}."
            )
        return found

    def text(self, token_id: int) -> str:
        """The decoded text of a token id seen in this result.

        Args:
            token_id: A token id.

        Returns:
            Its decoded text, or ``"<id>"`` for an id this result did not record.
        """
        return self.token_text.get(int(token_id), f"<{int(token_id)}>")

    def check_prompt(self, prompt: int) -> int:
        """Validate a prompt index (negative counts from the end).

        Args:
            prompt: A prompt index, negative counting from the end.

        Returns:
            The index as a non-negative int.

        Raises:
            ValueError: Not an int index of one of the prompts.
        """
        n = len(self.prompts)
        if not isinstance(prompt, (int, np.integer)) or not -n <= prompt < n:
            raise ValueError(f"prompt must be an index in 0..{n - 1}, got {prompt!r}.")
        return int(prompt) % n

    def to_frame(self) -> pd.DataFrame:
        """One row per (prompt, site, layer, position, target): a tidy frame.

        Columns: ``prompt, site, layer, position, token`` (the input token there), ``target``
        (None for a prompt without targets), ``rank`` and ``prob`` of the target's first token,
        ``logprob`` of the whole target by teacher forcing (only at the prompt's last token, NaN
        elsewhere: a continuation only follows the whole prompt), ``entropy`` and ``kl_to_final``
        (nats), ``top1_token`` (the decoded top token's text) and ``top1_prob``.
        """
        frames = []
        for b in range(len(self.prompts)):
            ks = np.nonzero(self.positions[b] >= 0)[0]
            n_t = len(self.targets[b])
            e, k, t = (
                a.ravel()
                for a in np.meshgrid(
                    np.arange(len(self.sites)), ks, np.arange(max(n_t, 1)), indexing="ij"
                )
            )
            pos = self.positions[b, k]
            top1 = self.top_ids[b, e, k, 0]
            missing = np.full(len(e), np.nan)  # no target (the frame's floats are float64)
            frame = {
                "lens": self.lens,
                "prompt": np.full(len(e), b),
                **self._located(e),
                "position": pos,
                "token": np.asarray(self.prompt_tokens[b], dtype=object)[pos],
                "target": np.asarray(self.targets[b], dtype=object)[t] if n_t else None,
                "rank": pd.array(self.position_rank[b, e, k, t], dtype="Int64") if n_t else pd.NA,
                "prob": self.position_prob[b, e, k, t] if n_t else missing,
                "logprob": np.where(
                    pos == len(self.prompt_tokens[b]) - 1,
                    self.target_logprob[b, e, t] if n_t else missing,
                    missing,
                ),
                "entropy": self.entropy[b, e, k],
                "kl_to_final": self.kl_to_final[b, e, k],
                "top1_token": [self.text(i) for i in top1],
                "top1_prob": self.top_probs[b, e, k, 0],
            }
            frames.append(pd.DataFrame(frame))
        out = pd.concat(frames, ignore_index=True)
        out["rank"] = out["rank"].astype("Int64")
        return float64_columns(out[list(FRAME_COLUMNS)])

    def logit_diff(self, answer: int = 0, wrong: int = 1) -> np.ndarray:
        """``[B, E, K]`` the lens's logit of one target minus another's, at every decoded entry
        and position: the per-layer logit difference of IOI-style analyses.

        Targets are slots of each prompt's ``targets`` (``answer=0, wrong=1`` for
        ``targets=[answer, wrong]``); each is scored by its first token. The difference of two
        logits is the difference of their log-probabilities (the normaliser cancels), so it is
        computed from ``position_prob``: NaN where a column holds no position, where a prompt has
        fewer targets, or where a probability underflowed (below about e^-103 in float32).

        Args:
            answer: The slot of the answer among each prompt's targets (0: the first).
            wrong: The slot of the wrong target (1: the second); not ``answer``.

        Returns:
            ``[n_prompts, n_entries, n_positions]`` float64 array of logit differences (NaN where
            unknown, as above).

        Raises:
            ValueError: A prompt's two targets share their first token (their difference would
                be 0 everywhere), or a slot the result lacks.

        Example:
            >>> import mechprobe as mp
            >>> pair = ["e", "t"]  # each prompt's answer and wrong token
            >>> lens = mp.logit_lens(mp.tiny_model(), ["Hi", "Hey"], targets=[pair, pair])
            >>> lens.logit_diff(0, 1).shape  # prompts x entries x positions
            (2, 3, 1)
        """
        n_t = self.position_prob.shape[-1]
        for name, slot in (("answer", answer), ("wrong", wrong)):
            if not isinstance(slot, (int, np.integer)) or isinstance(slot, bool):
                raise TypeError(f"{name} is a target slot (an int), got {slot!r}.")
            if not 0 <= slot < n_t:
                raise ValueError(
                    f"{name}={slot} is not a target slot: this result has {n_t} target(s) per "
                    f"prompt ({', '.join(map(repr, self.targets[0])) or 'none'} for prompt 0); "
                    "pass targets=[answer, wrong] to logit_lens."
                )
        if answer == wrong:
            raise ValueError(f"answer and wrong are the same target slot ({answer}).")
        for i, (targets, ids) in enumerate(zip(self.targets, self.target_tokens, strict=True)):
            if len(ids) > max(answer, wrong) and ids[answer][0] == ids[wrong][0]:
                # Both first-token logits are the same one: a difference of 0 everywhere.
                raise ValueError(
                    f"Prompt {i}'s targets {targets[answer]!r} and {targets[wrong]!r} share their "
                    f"first token {self.text(ids[answer][0])!r}, and logit_diff scores first "
                    "tokens: choose targets whose first tokens differ (target_logprob scores "
                    "whole targets)."
                )
        prob = self.position_prob.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            diff = np.log(prob[..., answer]) - np.log(prob[..., wrong])
        # Unscored slots hold rank -1; underflowed probabilities give ±inf: both unknown.
        known = (self.position_rank[..., answer] >= 0) & (self.position_rank[..., wrong] >= 0)
        return np.where(known & np.isfinite(diff), diff, np.nan)

    def _located(self, entries: np.ndarray) -> dict[str, Any]:
        """Frame columns ``site`` (label: ``"resid_post@3"``), ``kind`` and ``layer`` of each
        row's decoded entry (the keys every result's frame is joined on)."""
        located = site_columns([f"{self.sites[e]}@{self.layers[e]}" for e in entries])
        return {"site": located["site"], "kind": located["kind"], "layer": located["layer"]}

    def top_frame(self) -> pd.DataFrame:
        """One row per (prompt, site, position) and each of the top-k decoded tokens: its
        ``rank`` (0 is the top-1), ``decoded_token`` and ``decoded_token_id`` and ``prob``
        (``site`` the entry's label, ``"resid_post@3"``, beside its ``kind`` and ``layer``; as
        in :meth:`to_frame`, ``token`` would be the input token, so the prediction is named
        apart)."""
        b, e, k, j = np.nonzero(self.top_ids >= 0)
        ids = self.top_ids[b, e, k, j]
        frame = pd.DataFrame(
            {
                "prompt": b,
                **self._located(e),
                "position": self.positions[b, k],
                "rank": j,
                "decoded_token": [self.text(i) for i in ids],
                "decoded_token_id": ids,
                "prob": self.top_probs[b, e, k, j],
            }
        )
        return float64_columns(frame)

    def summary(self) -> pd.DataFrame:
        """One row per decoded entry (site, kind, layer), over every prompt's last decoded position (its
        last token where that was decoded): the mean KL to the final distribution and entropy
        (nats), prompt 0's top-1 token (whitespace shown as ``␣`` and ``\\n``) and its probability
        (columns named ``(prompt 0)`` where there are several prompts), and the mean rank across
        prompts of each target's first token. A target column is named by the target (``rank ' a'``) where
        every prompt has the same targets, else by its slot (``rank target 0``: each prompt's
        first target, whatever it is).

        Example:
            >>> import mechprobe as mp
            >>> lens = mp.logit_lens(mp.tiny_model(), ["Hi", "Hey"], targets=" a")
            >>> list(lens.summary().columns)
            ['site', 'kind', 'layer', 'kl_to_final', 'entropy', 'top1_token (prompt 0)', 'top1_prob (prompt 0)', "rank ' a'"]
        """
        rows = np.arange(len(self.prompts))
        # The column of each prompt's latest decoded real position (unused slots hold -1 or lie
        # past the prompt): its last token when positions include it.
        last = np.array(
            [
                int(np.argmax(np.where((p >= 0) & (p < len(t)), p, -1)))
                for p, t in zip(self.positions, self.prompt_tokens, strict=True)
            ]
        )
        frame = pd.DataFrame(
            {
                **self._located(np.arange(len(self.sites))),
                "kl_to_final": self.kl_to_final[rows, :, last].mean(0),
                "entropy": self.entropy[rows, :, last].mean(0),
                # Whitespace made visible (a bare " " or "\n" printed as a blank cell).
                "top1_token": [
                    token_label(self.text(i), 40) for i in self.top_ids[0, :, last[0], 0]
                ],
                "top1_prob": self.top_probs[0, :, last[0], 0],
            }
        )
        if len(self.prompts) > 1:  # the other columns are means over prompts; these are not
            frame = frame.rename(
                columns={
                    "top1_token": "top1_token (prompt 0)",
                    "top1_prob": "top1_prob (prompt 0)",
                }
            )
        shared = all(tuple(t) == tuple(self.targets[0]) for t in self.targets)
        for t in range(self.target_rank.shape[2]):
            # At the same decoded position as the other columns (the prompt's last token only
            # where it was decoded; target_rank is always the last token's).
            ranks = self.position_rank[rows, :, last, t].astype(float)
            ranks[ranks < 0] = np.nan
            label = repr(self.targets[0][t]) if shared else f"target {t}"
            if len(rows) == 1:  # one prompt's rank is a count, not a mean (it printed "248.0")
                frame[f"rank {label}"] = pd.array(
                    [None if np.isnan(r) else int(r) for r in ranks[0]], dtype="Int64"
                )
            else:
                frame[f"rank {label}"] = np.nanmean(ranks, axis=0)
        return float64_columns(frame)

    def _describe(self) -> str:
        kinds = ", ".join(dict.fromkeys(self.sites))
        n_targets = max((len(t) for t in self.targets), default=0)
        through = "" if self.lens == "logit" else f", {self.lens.split(' ')[0]} lens"
        return (
            f"{len(self.prompts)} prompt(s) x {len(self.sites)} entries ({kinds}, layers "
            f"{min(self.layers)}-{max(self.layers)}) x {self.positions.shape[1]} position(s), "
            f"{n_targets} target(s){through}"
        )

    def plot(self, ax: Axes | None = None, *, kind: str = "heatmap", **kwargs: Any) -> Figure:
        """The logit-lens heatmap (``kind="trajectory"``: the targets' ranks); options as
        :meth:`plot_heatmap` and :meth:`plot_trajectory`.

        Args:
            ax: Draw into these axes (default: a new figure).
            kind: ``"heatmap"`` or ``"trajectory"``.
            **kwargs: Options of :meth:`plot_heatmap` or :meth:`plot_trajectory` (``prompt=``,
                ``site=``...).

        Returns:
            The figure drawn into (``ax``'s, when given).

        Raises:
            ValueError: An unknown ``kind``.

        Example:
            >>> import mechprobe as mp
            >>> fig = mp.logit_lens(mp.tiny_model(), "Hi", targets=" a").plot(kind="trajectory")
            >>> len(fig.axes)
            1
        """
        if kind == "heatmap":
            return self.plot_heatmap(ax=ax, **kwargs)
        if kind == "trajectory":
            return self.plot_trajectory(ax=ax, **kwargs)
        raise ValueError(f"kind must be 'heatmap' or 'trajectory', got {kind!r}.")

    def _html_plot(self) -> Figure:
        # The heatmap widens with every position: 2.5 MB of HTML for one 397-token prompt.
        return self.plot_heatmap(last=_HTML_POSITIONS)

    def plot_heatmap(
        self, prompt: int | None = None, *, ax: Axes | None = None, **kwargs: Any
    ) -> Figure:
        """Layers x positions (x prompts, where each was decoded at one position), coloured by
        top-1 probability or a target's rank, annotated with the top-1 token: see
        :func:`mechprobe.lens._plots.heatmap` for the options.

        Args:
            prompt: The prompt drawn (None: every prompt, where each was decoded at one position;
                else prompt 0).
            ax: Draw into these axes (default: a new figure).
            **kwargs: ``site``, ``color`` (``"prob"`` or ``"rank"``), ``target``, ``label_width``
                and ``last``, as :func:`mechprobe.lens._plots.heatmap` takes them.

        Returns:
            The figure drawn into (``ax``'s, when given), with its colour bar.
        """
        from mechprobe.lens._plots import heatmap

        return heatmap(self, prompt, ax=ax, **kwargs)

    def plot_trajectory(
        self, prompt: int | list[int] | None = None, *, ax: Axes | None = None, **kwargs: Any
    ) -> Figure:
        """Each target's rank (or probability) across layers at each prompt's last token, a panel
        per prompt: see :func:`mechprobe.lens._plots.trajectory`.

        Args:
            prompt: A prompt index or several, one panel each (None: every prompt, the first six of
                more; with ``ax``, the first).
            ax: Draw into these axes (one prompt only; default: a new figure).
            **kwargs: ``site``, ``metric`` (``"rank"``, ``"prob"`` or ``"logprob"``) and ``titles``,
                as :func:`mechprobe.lens._plots.trajectory` takes them.

        Returns:
            The figure drawn into (``ax``'s, when given).
        """
        from mechprobe.lens._plots import trajectory

        return trajectory(self, prompt, ax=ax, **kwargs)
