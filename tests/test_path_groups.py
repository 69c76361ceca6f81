"""Groups of senders and receivers in path_patch (``senders={"S-inhibition": [...]}``) against
Wang et al.'s three steps written out with hooks for several senders and receivers at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp
from tests.conftest import hook_count

CLEAN, CORRUPT = "A cat sat", "A bat sat"
ANS, WRONG = 100, 101
METRIC = mp.logit_diff(ANS, WRONG)


def _metric(logits: torch.Tensor) -> float:
    return float(logits[0, -1, ANS] - logits[0, -1, WRONG])


def _three_steps(model, senders: list[mp.Site], receivers: list[mp.Site] | None) -> float:
    """(1) cache both runs; (2) run corrupt with every sender at its clean value and every
    other head's z and every MLP's output frozen at corrupt, keeping each receiver's input;
    (3) run corrupt with all those inputs in place at once (None: step 2's logits)."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    with torch.no_grad():
        _, c_cache = model.run_with_cache(clean)
        _, x_cache = model.run_with_cache(corrupt)

        def frozen(name, heads=(), whole=False):
            def hook(act, hook):
                act = x_cache[name].clone()
                for h in heads:
                    act[:, :, h] = c_cache[name][:, :, h]
                if whole:
                    act = c_cache[name].clone()
                return act

            return hook

        hooks = []
        for layer in range(model.cfg.n_layers):
            z, mlp = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"
            heads = [s.head for s in senders if s.kind == "head" and s.layer == layer]
            hooks.append((z, frozen(z, heads)))
            patched = any(s.kind == "mlp_out" and s.layer == layer for s in senders)
            hooks.append((mlp, frozen(mlp, whole=patched)))
        kept = {}

        def keep(receiver):
            def hook(act, hook):
                kept[receiver] = act[:, :, receiver.head].clone()

            return hook

        hooks += [(r.hook_name, keep(r)) for r in receivers or []]
        logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
        if receivers is None:
            return _metric(logits)

        def put(name):
            def hook(act, hook):
                act = act.clone()
                for r in receivers:
                    if r.hook_name == name:
                        act[:, :, r.head] = kept[r]
                return act

            return hook

        names = list(dict.fromkeys(r.hook_name for r in receivers))
        return _metric(model.run_with_hooks(corrupt, fwd_hooks=[(n, put(n)) for n in names]))


SENDERS = {
    "early": [mp.Site("head", 0, head=1), mp.Site("head", 0, head=3), mp.Site("mlp_out", 0)],
    "late": [mp.Site("head", 1, head=2), mp.Site("head", 2, head=0)],  # head 2.0 reaches no q@2
}
RECEIVERS = {
    "q@2 heads 0, 1": [mp.Site("q", 2, head=0), mp.Site("q", 2, head=1)],
    "v@2, k@1": [mp.Site("v", 2, head=1), mp.Site("k", 1, head=0)],
}


def test_groups_equal_the_three_steps_with_every_member_at_once(tiny):
    res = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, RECEIVERS, METRIC, n_random=1)
    assert res.senders == ("early", "late") and res.receivers == tuple(RECEIVERS)
    assert res.sender_layers == (None, None) and res.receiver_heads == (None, None)
    assert res.sender_members[0] == ("head@0, head 1", "head@0, head 3", "mlp_out@0")
    for a, senders in enumerate(SENDERS.values()):
        for b, receivers in enumerate(RECEIVERS.values()):
            # each receiver takes the changes of the senders before it (Wang's step 2 does so
            # by itself: a later sender cannot reach an earlier input)
            expected = _three_steps(tiny, senders, receivers)
            np.testing.assert_allclose(res.values[a, b], expected, atol=1e-5, err_msg=(a, b))
    # a group is not its best member: the joint patch differs from each one alone
    alone = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS["early"], RECEIVERS["q@2 heads 0, 1"][0],
                          METRIC, n_random=0)  # fmt: skip
    assert not np.allclose(alone.values[:, 0], res.values[0, 0], atol=1e-4)


def test_a_sender_group_to_the_final_residual(tiny):
    res = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, "final", METRIC, n_random=0)
    for a, senders in enumerate(SENDERS.values()):
        np.testing.assert_allclose(res.values[a, 0], _three_steps(tiny, senders, None), atol=1e-5)


def test_attribution_of_groups_adds_its_paths(tiny):
    flat_s = [s for group in SENDERS.values() for s in group]
    flat_r = [r for group in RECEIVERS.values() for r in group]
    kwargs = {"method": "attribution", "n_random": 2, "progress": False}
    grouped = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, RECEIVERS, METRIC, **kwargs)
    flat = mp.path_patch(tiny, CLEAN, CORRUPT, flat_s, flat_r, METRIC, **kwargs)
    change = flat.values - flat.corrupt_metric
    starts = np.cumsum([0, *map(len, SENDERS.values())])
    ends = np.cumsum([0, *map(len, RECEIVERS.values())])
    for a in range(2):
        for b in range(2):
            block = change[starts[a] : starts[a + 1], ends[b] : ends[b + 1]]
            expected = flat.corrupt_metric + np.nansum(block)
            np.testing.assert_allclose(grouped.values[a, b], expected, atol=1e-6)
    # controls are the flat controls added the same way: same seeds, same changes
    assert grouped.random.shape == (2, 1, 2, 2)


def test_group_rows_keep_the_result_protocol(tiny, tmp_path):
    res = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, RECEIVERS, METRIC, n_random=0)
    res.save(tmp_path / "groups.json")
    back = mp.PathPatchResult.load(tmp_path / "groups.json")
    assert back.sender_members == res.sender_members and back.receiver_layers == (None, None)
    frame = res.to_frame()
    assert frame["sender_layer"].isna().all() and len(frame) == 4
    assert res.plot() is not None and len(res.summary(top=4)) == 4
    single = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, "final", METRIC, n_random=0)
    assert single.plot() is not None  # one receiver: no layer x head grid for groups


@pytest.mark.parametrize(
    ("senders", "receivers", "kwargs", "message"),
    [
        ({}, "final", {}, "names no group"),
        (SENDERS, {"mixed": ["final", mp.Site("q", 2, head=0)]}, {}, "Give 'final' a row"),
        (SENDERS, "final", {"freeze_mlps": False}, "takes single senders"),
        ({"": SENDERS["early"]}, "final", {}, "non-empty strings"),
    ],
)
def test_bad_groups_are_refused_before_running(tiny, senders, receivers, kwargs, message):
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=message):
        mp.path_patch(tiny, CLEAN, CORRUPT, senders, receivers, METRIC, **kwargs)
    assert hook_count(tiny) == before
