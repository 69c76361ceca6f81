"""Ranks: ties count against the target, everywhere a rank is read.

A tie is no evidence for the target. The case that matters is a readout whose logits are all
equal, as decoding a zeroed residual stream gives (RMSNorm of zero is zero, and the tiny Llama's
unembedding has no bias): every target must then rank ``vocab - 1``, not 0, which counting only
strictly larger logits reported as a perfect top-1 hit.
"""

from __future__ import annotations

import numpy as np
import torch

import mechprobe as mp
from mechprobe.core import target_rank, top1_hit


def test_target_rank_against_a_sort_with_ties_broken_against_the_target():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 6, (40, 30), generator=gen).float()  # many ties
    ids = torch.randint(0, 30, (40, 3), generator=gen)
    got = target_rank(logits, logits.gather(1, ids))
    for i in range(40):
        for t in range(3):
            # position of the target in a descending order that puts it after its equals
            order = sorted(range(30), key=lambda j: (-logits[i, j].item(), j == ids[i, t].item()))
            assert got[i, t].item() == order.index(ids[i, t].item())


def test_top1_hit_is_rank_zero_and_no_tie_for_first_counts():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 3, (200, 6), generator=gen).float()  # many ties for first
    target = torch.randint(0, 6, (200,), generator=gen)
    got = top1_hit(logits, target)
    best = logits.max(-1).values
    alone = (logits == best[:, None]).sum(-1) == 1
    assert torch.equal(got, alone & (logits.gather(1, target[:, None])[:, 0] == best))
    argmax_hits = logits.argmax(-1) == target  # the old rule: the lowest tied id wins
    assert bool((argmax_hits & ~got).any())  # ...which this data exercises


def _zeroed(model):
    """The last block's output zeroed: every analysis reads all-equal final logits."""
    return mp.intervene(model, {mp.Site("resid_post", model.cfg.n_layers - 1): mp.Ablate("zero")})


def test_a_flat_readout_ranks_every_target_last(tiny):
    vocab, last = tiny.cfg.d_vocab, tiny.cfg.n_layers - 1
    task = mp.load_task("capitals").subset(3)
    o = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with _zeroed(tiny):
        lens = mp.logit_lens(tiny, ["Hi there", "A cat"], targets=[" a", " b"], progress=False)
        score = mp.score_task(tiny, task, progress=False).to_frame()
        traj = mp.trajectory(tiny, task, progress=False).to_frame()
        effect = mp.ovector_intervention(
            tiny, {"o": o}, ["Hi there", "A cat"], [" a", " b"], layers=[0], progress=False
        ).to_frame()
    frame = lens.to_frame()
    final = frame[frame.layer == last]
    assert len(final) == 2 and (final["rank"] == vocab - 1).all()
    np.testing.assert_allclose(final["prob"], 1 / vocab, rtol=1e-5)
    assert (score["first_rank"] == vocab - 1).all() and not score["correct"].any()
    at_last = traj[(traj.layer == last) & (traj.readout == "resid_post")]
    assert (at_last["rank"] == vocab - 1).all() and not at_last["correct"].any()
    assert (effect["rank"] == vocab - 1).all(), effect
