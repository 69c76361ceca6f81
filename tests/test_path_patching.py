"""Path patching against Wang et al.'s three steps written out with hooks, and TransformerLens's
direct path patcher."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from transformer_lens import patching as tl_patching

import mechprobe as mp
from tests.conftest import hook_count, pass_recorder

CLEAN, CORRUPT = "A cat sat", "A bat sat"
ANS, WRONG = 100, 101
METRIC = mp.logit_diff(ANS, WRONG)


def _metric(logits: torch.Tensor) -> float:
    return float(logits[0, -1, ANS] - logits[0, -1, WRONG])


def _explicit(
    model,
    sender: mp.Site,
    receiver: mp.Site | None,
    *,
    live_mlps: bool = False,
    noising: bool = False,
    positions: list[int] | None = None,
) -> float:
    """Wang et al. (2022), step by step. (1) Cache the clean and corrupt runs. (2) Run corrupt with
    the sender patched to its clean value and every other head's z and every MLP's output frozen
    at their corrupt values; keep the receiver's input there (its q, k or v, which a frozen stream
    makes exactly "corrupt plus the sender's change"). (3) Run corrupt with only the receiver's
    q/k/v replaced by what step 2 kept; read the metric. For the final residual, step 2's logits
    are the answer. ``live_mlps``: step 2 freezes the heads only and the MLPs recompute (Wang et
    al.'s ``freeze_mlps=False``); ``noising``: the clean run is edited with corrupt values;
    ``positions``: the sender takes its clean value at these positions only."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    if noising:
        clean, corrupt = corrupt, clean
    at = slice(None) if positions is None else sorted({p % clean.shape[1] for p in positions})
    n_layers = model.cfg.n_layers
    with torch.no_grad():
        _, c_cache = model.run_with_cache(clean)
        _, x_cache = model.run_with_cache(corrupt)

        def freeze(name, patch_head=None):
            def hook(act, hook):
                act = x_cache[name].clone()
                if patch_head is not None:
                    act[:, at, patch_head] = c_cache[name][:, at, patch_head]
                return act

            return hook

        hooks = []
        for layer in range(n_layers):
            z = f"blocks.{layer}.attn.hook_z"
            mlp = f"blocks.{layer}.hook_mlp_out"
            is_head = sender.kind == "head" and sender.layer == layer
            if sender.kind == "resid_pre" and layer == 0:  # the embeddings' write, block 0's input

                def clean_input(act, hook, name=f"blocks.{layer}.hook_resid_pre"):
                    act = x_cache[name].clone()
                    act[:, at] = c_cache[name][:, at]
                    return act

                hooks.append((f"blocks.{layer}.hook_resid_pre", clean_input))
            hooks.append((z, freeze(z, sender.head if is_head else None)))
            if sender.kind == "mlp_out" and sender.layer == layer:

                def clean_mlp(act, hook, name=mlp):
                    act = x_cache[name].clone()
                    act[:, at] = c_cache[name][:, at]
                    return act

                hooks.append((mlp, clean_mlp))
            elif not live_mlps:
                hooks.append((mlp, freeze(mlp)))
        kept = {}
        if receiver is not None:
            name = receiver.hook_name

            def keep(act, hook):
                kept["value"] = (
                    act[:, :, receiver.head].clone() if receiver.head is not None else (act.clone())
                )

            hooks.append((name, keep))
        logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
        if receiver is None:
            return _metric(logits)

        def put(act, hook):
            if receiver.head is None:  # an MLP's input: what the MLP alone reads
                return kept["value"]
            act = act.clone()
            act[:, :, receiver.head] = kept["value"]
            return act

        return _metric(model.run_with_hooks(corrupt, fwd_hooks=[(receiver.hook_name, put)]))


SENDERS = [mp.Site("head", 0, head=1), mp.Site("head", 1, head=3), mp.Site("mlp_out", 0)]


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_head_receivers_equal_the_explicit_three_steps(tiny, kind, cell_packing):
    receivers = [mp.Site(kind, 2, head=h) for h in range(2)] + [mp.Site(kind, 1, head=0)]
    res = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, receivers, METRIC, n_random=1)
    for s, sender in enumerate(SENDERS):
        for r, receiver in enumerate(receivers):
            if receiver.layer <= sender.layer:
                assert np.isnan(res.values[s, r])
                continue
            expected = _explicit(tiny, sender, receiver)
            np.testing.assert_allclose(res.values[s, r], expected, atol=1e-5)
    finite = res.values[np.isfinite(res.values)]
    assert np.abs(finite - res.corrupt_metric).max() > 1e-3  # some path matters


def test_mlp_input_receivers_equal_the_explicit_three_steps(tiny):
    # An MLP's input reads the stream after its own layer's attention: head 1.3 reaches MLP 1's
    # input, MLP 1's own output does not.
    senders = [*SENDERS, mp.Site("mlp_out", 1)]
    receivers = [mp.Site("mlp_in", layer) for layer in range(3)]
    res = mp.path_patch(tiny, CLEAN, CORRUPT, senders, receivers, METRIC, n_random=1)
    flag = bool(getattr(tiny.cfg, "use_hook_mlp_in", False))
    tiny.set_use_hook_mlp_in(True)  # the three steps read and write hook_mlp_in themselves
    try:
        for s, sender in enumerate(senders):
            for r, receiver in enumerate(receivers):
                own = sender.kind == "mlp_out" and sender.layer == receiver.layer
                if receiver.layer < sender.layer or own:
                    assert np.isnan(res.values[s, r]), (sender, receiver)
                    continue
                expected = _explicit(tiny, sender, receiver)
                np.testing.assert_allclose(res.values[s, r], expected, atol=1e-5)
    finally:
        tiny.set_use_hook_mlp_in(flag)
    assert np.isfinite(res.values[1, 1])  # head 1.3 -> MLP 1's input


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_live_mlps_equal_the_explicit_three_steps(tiny, direction, cell_packing):
    """freeze_mlps=False: Wang et al.'s default, only the heads frozen in step 2, so what the MLPs
    between sender and receiver make of the sender's change reaches the receiver too."""
    senders = [*SENDERS, mp.Site("mlp_out", 1), mp.Site("head", 2, head=0)]
    receivers = [
        None, mp.Site("q", 2, head=1), mp.Site("k", 2, head=0), mp.Site("v", 1, head=1),
        mp.Site("mlp_in", 1), mp.Site("mlp_in", 2),
    ]  # fmt: skip
    targets = ["final" if r is None else r for r in receivers]
    kwargs = {"n_random": 1, "direction": direction, "progress": False}
    live = mp.path_patch(
        tiny, CLEAN, CORRUPT, senders, targets, METRIC, freeze_mlps=False, **kwargs
    )
    frozen = mp.path_patch(tiny, CLEAN, CORRUPT, senders, targets, METRIC, **kwargs)
    assert live.freeze_mlps is False and frozen.freeze_mlps is True
    flag = bool(getattr(tiny.cfg, "use_hook_mlp_in", False))
    tiny.set_use_hook_mlp_in(True)  # the three steps read and write hook_mlp_in themselves
    try:
        for s, sender in enumerate(senders):
            for r, receiver in enumerate(receivers):
                if np.isnan(frozen.values[s, r]):  # no path either way
                    assert np.isnan(live.values[s, r])
                    continue
                expected = _explicit(
                    tiny, sender, receiver, live_mlps=True, noising=direction == "noising"
                )
                np.testing.assert_allclose(
                    live.values[s, r], expected, atol=1e-5, err_msg=f"{sender} -> {receiver}"
                )
    finally:
        tiny.set_use_hook_mlp_in(flag)
    # Head 0.1 -> final runs through MLPs 0, 1 and 2: live and frozen differ. Where no MLP lies
    # between (MLP 1 -> MLP 2's input, head 2.0 -> MLP 2's input) they agree.
    assert abs(live.values[0, 0] - frozen.values[0, 0]) > 1e-3
    for s, r in [(3, 5), (4, 5)]:
        assert np.isfinite(live.values[s, r])
        np.testing.assert_allclose(live.values[s, r], frozen.values[s, r], atol=1e-5)
    np.testing.assert_array_equal(np.isnan(live.random), np.isnan(frozen.random))


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_live_mlps_at_some_positions_equal_the_explicit_three_steps(architecture):
    """The live pass runs only the positions passed on, as short rows whose block-0 input is set
    to the run's: on GPT-2 that input carries the absolute positions. Positions 3, 9 and -1 of
    a 10-token pair (9 and -1 one token, passed on once), the change reaching the final
    residual, a query and an MLP's input; a random control moves the stream by the change's
    norm at each position."""
    model = mp.tiny_model(architecture=architecture)
    senders = [mp.Site("head", 0, head=1), mp.Site("mlp_out", 0), mp.Site("head", 1, head=2)]
    receivers = [None, mp.Site("q", 2, head=1), mp.Site("mlp_in", 2)]
    targets = ["final" if r is None else r for r in receivers]
    positions = [3, 9, -1]
    res = mp.path_patch(
        model, CLEAN, CORRUPT, senders, targets, METRIC, positions=positions, freeze_mlps=False,
        n_random=1, progress=False,
    )  # fmt: skip
    flag = bool(getattr(model.cfg, "use_hook_mlp_in", False))
    model.set_use_hook_mlp_in(True)
    try:
        for s, sender in enumerate(senders):
            for r, receiver in enumerate(receivers):
                expected = _explicit(model, sender, receiver, live_mlps=True, positions=positions)
                np.testing.assert_allclose(res.values[s, r], expected, atol=1e-5)
    finally:
        model.set_use_hook_mlp_in(flag)
    assert np.isfinite(res.random).all()


@pytest.mark.parametrize("freeze_mlps", [True, False])
def test_the_embeddings_as_a_sender_equal_the_explicit_three_steps(tiny, freeze_mlps):
    """``"embed"`` sends block 0's input, the embeddings' write (review 33b F6: the changed
    token's direct path to a head's value was visible only through MLP 0); every layer reads it,
    layer 0's q/k/v and MLP included."""
    receivers = [
        None, mp.Site("q", 0, head=1), mp.Site("k", 0, head=0), mp.Site("v", 2, head=1),
        mp.Site("mlp_in", 0), mp.Site("mlp_in", 2),
    ]  # fmt: skip
    targets = ["final" if r is None else r for r in receivers]
    res = mp.path_patch(
        tiny, CLEAN, CORRUPT, "embed", targets, METRIC, freeze_mlps=freeze_mlps, n_random=1,
        progress=False,
    )  # fmt: skip
    assert res.senders == ("resid_pre@0",) and res.sender_layers == (0,)
    flag = bool(getattr(tiny.cfg, "use_hook_mlp_in", False))
    tiny.set_use_hook_mlp_in(True)  # the three steps read and write hook_mlp_in themselves
    try:
        for r, receiver in enumerate(receivers):
            expected = _explicit(tiny, mp.Site("resid_pre", 0), receiver, live_mlps=not freeze_mlps)
            np.testing.assert_allclose(res.values[0, r], expected, atol=1e-5, err_msg=str(receiver))
    finally:
        tiny.set_use_hook_mlp_in(flag)
    assert np.isfinite(res.values).all()
    assert np.abs(res.values[0, 1:] - res.corrupt_metric).max() > 1e-3  # the token matters
    # The final residual at the last token: its own embedding is the same in both prompts, and
    # nothing else reaches it with the attention frozen.
    assert res.values[0, 0] == pytest.approx(res.corrupt_metric, abs=1e-5)


def test_the_embeddings_as_a_sender_by_any_name(tiny):
    names = ["embed", "resid_pre@0", "blocks.0.hook_resid_pre", mp.Site("resid_pre", 0)]
    runs = [
        mp.path_patch(tiny, CLEAN, CORRUPT, [name, "mlp_out"], "q", METRIC, n_random=0,
                      layers=[0], receiver_layers=[1], progress=False)
        for name in names
    ]  # fmt: skip
    for other in runs[1:]:
        assert other.senders == runs[0].senders == ("resid_pre@0", "mlp_out@0")
        np.testing.assert_array_equal(other.values, runs[0].values)
    # in a group, the embeddings' change passes on with the others'
    group = mp.path_patch(
        tiny, CLEAN, CORRUPT, {"input": ["embed", "mlp_out@0"]}, "q", METRIC, n_random=0,
        layers=[0], receiver_layers=[1], method="attribution", progress=False,
    )  # fmt: skip
    alone = mp.path_patch(
        tiny, CLEAN, CORRUPT, ["embed", "mlp_out@0"], "q", METRIC, n_random=0,
        layers=[0], receiver_layers=[1], method="attribution", progress=False,
    )  # fmt: skip
    np.testing.assert_allclose(
        group.values[0] - group.corrupt_metric,
        (alone.values - alone.corrupt_metric).sum(0),
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="carries positions"):
        mp.path_patch(tiny, CLEAN, CORRUPT, mp.Site("resid_pre", 0, positions=-1), "final", METRIC)
    with pytest.raises(ValueError, match="embed"):  # the kinds accepted say so
        mp.path_patch(tiny, CLEAN, CORRUPT, "resid_post", "final", METRIC)


def test_live_mlps_do_not_depend_on_how_senders_are_batched(tiny):
    args = (tiny, CLEAN, CORRUPT, "head", ["final", "q"], METRIC)
    kwargs = {"freeze_mlps": False, "n_random": 2, "progress": False}
    one = mp.path_patch(*args, cells_per_batch=1, **kwargs)
    many = mp.path_patch(*args, **kwargs)
    # float32 passes of other batch shapes round differently (1.6e-6 seen on a HookedTransformer):
    # the tolerance of every path comparison here.
    np.testing.assert_allclose(one.per_pair, many.per_pair, atol=1e-5)
    np.testing.assert_allclose(one.random, many.random, atol=1e-5)


def test_final_receiver_is_the_direct_effect_on_the_logits(tiny):
    senders = ["head", mp.Site("mlp_out", 1)]
    res = mp.path_patch(tiny, CLEAN, CORRUPT, senders, "final", METRIC, n_random=2)
    assert res.receivers == ("final",) and res.values.shape == (13, 1)
    for s, (label, layer, head) in enumerate(
        zip(res.senders, res.sender_layers, res.sender_heads, strict=True)
    ):
        kind = "head" if head is not None else "mlp_out"
        expected = _explicit(tiny, mp.Site(kind, layer, head=head), None)
        np.testing.assert_allclose(res.values[s, 0], expected, atol=1e-5, err_msg=label)
    # A direct path at the last position only: the same as passing the change on there alone.
    last = mp.path_patch(tiny, CLEAN, CORRUPT, senders, "final", METRIC, positions=[-1])
    np.testing.assert_allclose(last.values, res.values, atol=1e-5)
    assert np.isfinite(res.random).all() and res.random.shape == (2, 1, 13, 1)


def test_two_positions_on_one_token_pass_its_change_on_once(tiny):
    """positions=[6, -1] on a 7-token pair name one token twice: the final receiver counted the
    sender's change there twice (mlp_out@2: 0.85 instead of 2.57, the sign of its effect
    flipped). Each token's change is passed on once, to every receiver."""
    clean, corrupt = ["The cat sat", "Hi cat"], ["The dog sat", "Hi bat"]
    receivers = ["final", mp.Site("q", 2, head=0)]
    both = mp.path_patch(
        tiny, clean, corrupt, "mlp_out", receivers, mp.logit_diff([86, 86], [58, 58]),
        positions=[6, -1], n_random=1,
    )  # fmt: skip
    alone = mp.path_patch(
        tiny, clean[1], corrupt[1], "mlp_out", receivers, mp.logit_diff(86, 58), positions=[-1],
        n_random=0,
    )  # fmt: skip
    np.testing.assert_allclose(both.per_pair[1], alone.per_pair[0], atol=1e-5)
    with pytest.raises(ValueError, match="both name token 6"):
        mp.path_patch(tiny, "Hi cats", "Hi bat", "mlp_out", "final", mp.logit_diff(86, 58),
                      positions=[6, -1])  # fmt: skip


@pytest.mark.skipif(
    not hasattr(tl_patching, "get_act_patch_direct_path"),
    reason="TransformerLens 3.9 has no get_act_patch_direct_path (added in 4.x)",
)
def test_equals_transformerlens_direct_path_patching():
    model = mp.tiny_model(seed=2, n_kv_heads=4)  # TL's k/v direct paths refuse GQA
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    with torch.no_grad():
        _, c_cache = model.run_with_cache(clean)
        _, x_cache = model.run_with_cache(corrupt)
        theirs = tl_patching.get_act_patch_direct_path(
            model, corrupt, c_cache, x_cache, _metric_tensor, 0, 2, "k", verbose=False
        )
    receivers = [mp.Site("k", layer, head=h) for layer in (1, 2) for h in range(4)]
    ours = mp.path_patch(
        model, clean, corrupt, mp.Site("head", 0, head=2), receivers, METRIC, n_random=0
    )
    np.testing.assert_allclose(ours.values[0], theirs[1:].reshape(-1).numpy(), atol=1e-5)


def _metric_tensor(logits: torch.Tensor) -> torch.Tensor:
    return logits[0, -1, ANS] - logits[0, -1, WRONG]


@pytest.mark.parametrize("method", ["exact", "attribution"])
def test_the_model_keeps_no_state(tiny, method):
    before = hook_count(tiny)
    flag = bool(getattr(tiny.cfg, "use_split_qkv_input", False))
    with torch.no_grad():
        intact = tiny(tiny.to_tokens(CLEAN))

    def bad(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        mp.path_patch(tiny, CLEAN, CORRUPT, "mlp_out", "q", bad, method=method)
    if method == "attribution":
        with pytest.raises(ValueError, match="without a gradient"):
            mp.path_patch(
                tiny, CLEAN, CORRUPT, "mlp_out", "q", lambda lg: lg[:, 5].detach(), method=method
            )
    assert bool(getattr(tiny.cfg, "use_split_qkv_input", False)) == flag
    assert hook_count(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(tiny.to_tokens(CLEAN)), intact)


def test_result_protocol(tiny, tmp_path):
    res = mp.path_patch(tiny, CLEAN, CORRUPT, "head", ["final", "q"], METRIC, layers=[0, 2])
    frame = res.to_frame()
    assert len(frame) == res.values.size
    assert {"effect", "spread", "random_effect"} <= set(frame.columns)
    back = mp.PathPatchResult.load(res.save(tmp_path / "path.json"))
    np.testing.assert_array_equal(back.per_pair, res.per_pair)
    assert back.receivers == res.receivers and back.sender_heads == res.sender_heads
    assert len(res.plot().axes) == 2
    assert "sender" in res.summary().columns and len(repr(res)) < 200
    # One receiver's paths (review 33b F7): by label or by kind, the largest of those alone.
    to_final = res.summary(top=3, receiver="final")
    frame = res.to_frame().query("receiver == 'final'").dropna(subset=["value"])
    largest = frame.loc[frame["effect"].abs().sort_values(ascending=False).index[:3], "sender"]
    assert to_final["sender"].tolist() == largest.tolist()
    assert set(res.summary(top=50, receiver="q")["receiver"]) <= {
        r for r in res.receivers if r.startswith("q@")
    }
    q2 = res.summary(top=50, receiver="q@2")  # every head of layer 2's queries (review 34a F8)
    assert len(q2) and set(q2["receiver"]) <= {r for r in res.receivers if r.startswith("q@2,")}
    with pytest.raises(ValueError, match="names no receiver") as refused:
        res.summary(receiver="k")
    for offered in re.findall(r"'([^']+)'", str(refused.value).split("here:")[1])[:4]:
        if "@" in offered and "," in offered:
            assert len(res.summary(receiver=offered))  # every label it offers is accepted
    # The normalised recovery beside each value, as PatchResult.summary has it (33b F7).
    top = res.summary(top=4)
    rows = (
        res.to_frame()
        .set_index(["sender", "receiver"])
        .loc[list(zip(top["sender"], top["receiver"], strict=True)), "normalised"]
    )
    np.testing.assert_array_equal(top["normalised"].to_numpy(), rows.to_numpy())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"senders": "resid_pre"}, "not accepted here"),
        ({"receivers": "mlp_out"}, "not accepted here"),
        ({"receivers": []}, "empty"),
        ({"direction": "sideways"}, "denoising"),
        ({"method": "guess"}, "'exact' or 'attribution'"),
        ({"method": "attribution", "freeze_mlps": False}, "freeze_mlps=False applies to"),
        ({"senders": []}, "senders is empty: pass a site kind such as 'head'"),
        # a Site's own positions were dropped: every position was patched, without a word
        ({"senders": mp.Site("mlp_out", 0, positions=[-1])}, "senders: .* carries positions"),
        (
            {"receivers": ["final", mp.Site("mlp_in", 2, positions=[-1])]},
            "receivers: .* carries positions",
        ),
    ],
)
def test_bad_input_fails_before_running(tiny, kwargs, message):
    args = {"senders": "head", "receivers": "final"} | kwargs
    with pytest.raises(ValueError, match=message):
        mp.path_patch(tiny, CLEAN, CORRUPT, metric=METRIC, **args)


@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_runs_pairs_of_one_length_together_with_each_pairs_own_numbers(tiny, direction):
    """Pairs whose edited prompts share a length run in one forward and backward pass (at most
    cells_per_batch of them, fewer where memory_budget asks): every pair's estimates, controls
    and metrics equal one pair a pass, for q/k/v, MLP and final receivers."""
    clean = ["A cat sat", "The dog ran far", "A cow sat", "A hen sat", "Hi"]
    corrupt = ["A bat sat", "The cat ran far", "A cat sat", "A dog sat", "Yo"]
    metric = mp.logit_diff([100, 7, 101, 55, 3], [101, 8, 100, 56, 4])
    receivers = [mp.Site("q", 2, head=1), mp.Site("v", 2, head=0), mp.Site("mlp_in", 1), "final"]
    kw = {"method": "attribution", "n_random": 2, "direction": direction, "progress": False,
          "positions": [-2, -1]}  # fmt: skip
    one = mp.path_patch(tiny, clean, corrupt, "head", receivers, metric, cells_per_batch=1, **kw)
    for extra in ({}, {"memory_budget": 1}):
        got = mp.path_patch(tiny, clean, corrupt, "head", receivers, metric, **extra, **kw)
        for field in ("values", "random", "clean", "corrupt"):
            a, b = getattr(got, field), getattr(one, field)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=field)
    seen, metric_fn = pass_recorder()

    mp.path_patch(tiny, clean, corrupt, "head", "final", metric_fn, **{**kw, "n_random": 0})
    assert seen[-3:] == [[0, 2, 3], [1], [4]]  # the gradient passes come last


@pytest.mark.parametrize(
    "receiver",
    [
        None,
        mp.Site("q", 2, head=1),
        mp.Site("k", 2, head=0),
        mp.Site("v", 1, head=1),
        mp.Site("mlp_in", 0),
    ],
    ids=["final", "q", "k", "v", "mlp_in"],
)
@pytest.mark.parametrize("direction", ["denoising", "noising"])
def test_attribution_is_the_paths_first_order_term_written_out_with_hooks(
    tiny, receiver, direction
):
    """``base + d/d eps metric(base, receiver input + eps * delta)`` at eps = 0, where delta is
    the sender's source-minus-base write read from each run's cache (denoising: the clean
    source, the corrupt base; noising the other way), and the derivative is autograd's through
    plain TransformerLens hooks."""
    sender = mp.Site("head", 0, head=2)
    target = "final" if receiver is None else receiver
    res = mp.path_patch(
        tiny, CLEAN, CORRUPT, sender, target, METRIC, method="attribution", n_random=0,
        direction=direction, progress=False,
    )  # fmt: skip
    clean, corrupt = tiny.to_tokens(CLEAN), tiny.to_tokens(CORRUPT)
    if direction == "noising":
        clean, corrupt = corrupt, clean  # the source read, and the run differentiated
    with torch.no_grad():
        _, c_cache = tiny.run_with_cache(clean)
        _, x_cache = tiny.run_with_cache(corrupt)
    z = "blocks.0.attn.hook_z"
    delta = (c_cache[z][0, :, 2] - x_cache[z][0, :, 2]) @ tiny.blocks[0].attn.W_O[2].detach()
    eps = torch.zeros((), requires_grad=True)
    if receiver is None:
        name = f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"

        def add(act, hook):
            return act + eps * delta  # the metric reads the last position only

    elif receiver.kind == "mlp_in":
        name = "blocks.0.hook_mlp_in"

        def add(act, hook):
            return act + eps * delta  # head 0.2 writes before MLP 0 reads

    else:
        name = f"blocks.{receiver.layer}.hook_{receiver.kind}_input"

        def add(act, hook):
            act = act.clone()
            act[:, :, receiver.head] = act[:, :, receiver.head] + eps * delta
            return act

    flags = (tiny.cfg.use_split_qkv_input, tiny.cfg.use_hook_mlp_in)
    tiny.set_use_split_qkv_input(True)
    tiny.set_use_hook_mlp_in(True)
    try:
        with torch.enable_grad():
            logits = tiny.run_with_hooks(corrupt, fwd_hooks=[(name, add)])
            value = _metric_tensor(logits)
            (slope,) = torch.autograd.grad(value, eps)
        value = value.detach()
    finally:
        tiny.set_use_split_qkv_input(flags[0])
        tiny.set_use_hook_mlp_in(flags[1])
    assert res.direction == ("attribution" if direction == "denoising" else "attribution-noising")
    assert res.method == "attribution"
    base = res.corrupt[0] if direction == "denoising" else res.clean[0]
    assert base == pytest.approx(float(value), abs=1e-5)
    assert res.values[0, 0] == pytest.approx(float(value) + float(slope), abs=1e-4)
    # the effect is read from the run that was edited
    assert res.effect[0, 0] == pytest.approx(float(slope), abs=1e-4)
    assert res.effect[0, 0] == pytest.approx(float(slope), abs=1e-4)


def test_attribution_estimates_every_path_of_the_exact_run(tiny):
    """Every path the exact run patches gets an estimate and a control of each (NaN exactly where
    there is no path), on the same corrupt runs; parts join like the exact results. (How close
    the estimates come is the model's business: the test above checks the first-order term, and
    docs/causal.md and the benchmark measure the agreement on SmolLM2; on this random tiny
    model, whose changes are large, MLP inputs are far from linear.)"""
    senders = ["head", "mlp_out", "attn_out"]
    receivers = ["final", "q", "k", "v", "mlp_in"]
    args = (tiny, [CLEAN, "Hi yo sat"], [CORRUPT, "Yo yo sat"], senders, receivers)
    exact = mp.path_patch(*args, METRIC, progress=False)
    est = mp.path_patch(*args, METRIC, method="attribution", progress=False)
    assert np.array_equal(np.isnan(exact.values), np.isnan(est.values))
    assert est.random.shape == exact.random.shape
    assert np.array_equal(np.isnan(exact.random), np.isnan(est.random))
    np.testing.assert_allclose(est.corrupt, exact.corrupt, atol=1e-5)
    parts = [
        mp.path_patch(tiny, c, k, "head", ["final", "q"], METRIC, method="attribution")
        for c, k in [(CLEAN, CORRUPT), ("Hi yo sat", "Yo yo sat")]
    ]
    joined = mp.PathPatchResult.concat(parts)
    whole = mp.path_patch(
        tiny, [CLEAN, "Hi yo sat"], [CORRUPT, "Yo yo sat"], "head", ["final", "q"], METRIC,
        method="attribution",
    )  # fmt: skip
    np.testing.assert_allclose(joined.per_pair, whole.per_pair, atol=1e-6)
    np.testing.assert_allclose(joined.random, whole.random, atol=1e-6)


def test_receiver_layers_cover_the_receivers_alone(tiny):
    # one layers= covered both: "heads of layers 0-1 to the queries of layer 2" needed Sites
    split = mp.path_patch(
        tiny, CLEAN, CORRUPT, "head", "q", METRIC, layers=[0, 1], receiver_layers=[2],
        n_random=0, progress=False,
    )  # fmt: skip
    n_heads = tiny.cfg.n_heads
    assert split.senders == tuple(f"head@{la}, head {h}" for la in (0, 1) for h in range(n_heads))
    assert split.receivers == tuple(f"q@2, head {h}" for h in range(n_heads))
    by_sites = mp.path_patch(
        tiny, CLEAN, CORRUPT,
        [mp.Site("head", la, head=h) for la in (0, 1) for h in range(n_heads)],
        [mp.Site("q", 2, head=h) for h in range(n_heads)],
        METRIC, n_random=0, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(split.per_pair, by_sites.per_pair)
    assert np.isfinite(split.values).all()


def test_results_say_their_method(tiny):
    kw = {"n_random": 0, "progress": False}
    exact = mp.path_patch(tiny, CLEAN, CORRUPT, "mlp_out", "final", METRIC, **kw)
    guess = mp.path_patch(
        tiny, CLEAN, CORRUPT, "mlp_out", "final", METRIC, method="attribution", **kw
    )
    assert (exact.method, guess.method) == ("exact", "attribution")
    cells = mp.patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, METRIC, **kw)
    grads = mp.attribution_patch(tiny, CLEAN, CORRUPT, "mlp_out", -1, METRIC, **kw)
    assert (cells.method, grads.method) == ("exact", "attribution")


def test_a_large_path_figure_stays_readable():
    # 72 x 72 heads drew a 27 x 19.5 inch canvas with a label per head ("head@14, head 0").
    model = mp.tiny_model(n_layers=12)  # 48 heads
    res = mp.path_patch(
        model, "A cat", "A bat", "head", "q", mp.logit_diff(5, 6), positions=-1,
        method="attribution", n_random=0, progress=False,
    )  # fmt: skip
    assert res.values.shape == (48, 48)
    fig = res.plot()
    width, height = fig.get_size_inches()
    assert width <= 14 and height <= 12
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"head L{i}H0" for i in range(12)]
    assert [t.get_text() for t in ax.get_xticklabels()] == [f"q L{i}H0" for i in range(12)]
    # the metric's tokens on a second line (review 26a F10)
    assert ax.get_title().split("\n")[0] == "path patching, head to q (attribution)"
    # A key or value head is not the query head of that number (review 33b).
    kv = mp.path_patch(
        model, "A cat", "A bat", mp.Site("head", 0, head=0), ["k", "q"], mp.logit_diff(5, 6),
        layers=[0, 1], positions=-1, method="attribution", n_random=0, progress=False,
    )  # fmt: skip
    labels = [t.get_text() for t in kv.plot().axes[0].get_xticklabels()]
    assert "k L1 kv0" in labels and "q L1H0" in labels and "k L1H0" not in labels


def test_head_senders_where_heads_do_not_sum_to_the_attention_output_are_refused():
    # Gemma 2 norms the attention output after the heads: a head's own write is not defined.
    gemma = mp.tiny_model(architecture="gemma2")
    with pytest.raises(ValueError, match=r"head senders at layer 0: .*not the sum of its heads"):
        mp.path_patch(gemma, "A cat", "A bat", "head", "final", mp.logit_diff(1, 2), layers=[0])


def test_a_call_with_no_path_at_all_is_refused_and_receivers_name_final(tiny):
    # Senders and receivers swapped returned an all-NaN result and an empty summary without a
    # word (review 24a); a receiver the generic message did not know ("logits") was answered
    # with examples (Site('mlp_out', 4)) that receivers refuse, and no word of "final".
    with pytest.raises(ValueError, match=r"No path: every receiver .* are senders and receivers"):
        mp.path_patch(tiny, CLEAN, CORRUPT, mp.Site("head", 2, head=1), mp.Site("q", 0, head=0),
                      METRIC, progress=False)  # fmt: skip
    for wrong in ("logits", "resid_post", mp.Site("mlp_out", 1)):
        with pytest.raises(ValueError, match="receivers also takes 'final'") as caught:
            mp.path_patch(tiny, CLEAN, CORRUPT, "head", wrong, METRIC, progress=False)
        assert "mlp_out', 4" not in str(caught.value)
    # A sweep where only some paths exist still runs: those are NaN, the rest are values.
    some = mp.path_patch(tiny, CLEAN, CORRUPT, "head", mp.Site("q", 1, head=0), METRIC,
                         progress=False)  # fmt: skip
    assert np.isnan(some.values).any() and np.isfinite(some.values).any()


def test_head_out_senders_keep_their_kind_and_equal_head_senders(tiny):
    # A head_out sender was relabelled "head@L, head H", so its frame did not merge on the label
    # with patch(..., "head_out@L, head H") (review 24b F8); the values were and are the same.
    kw = {"layers": [0, 1], "n_random": 0, "progress": False}
    heads = mp.path_patch(tiny, CLEAN, CORRUPT, "head", "final", METRIC, **kw)
    outs = mp.path_patch(tiny, CLEAN, CORRUPT, "head_out", "final", METRIC, **kw)
    np.testing.assert_allclose(outs.values, heads.values, rtol=0, atol=1e-6)
    assert all(s.startswith("head_out@") for s in outs.senders)
    assert outs.senders[3] == str(mp.Site("head_out", 0, head=3))


@pytest.mark.parametrize(
    ("receivers", "method"), [("final", "exact"), ("final", "attribution"), ("q", "attribution")]
)
def test_a_metric_not_finite_on_the_unpatched_runs_is_refused(tiny, receivers, method):
    # Review 26b S3: only the engine's passes (q/k/v) checked it; "final" and method="attribution"
    # returned all-NaN results.
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=r"gave nan on an unpatched \(source\) run: make it"):
        mp.path_patch(
            tiny, CLEAN, CORRUPT, "head", receivers, lambda lg: lg[:, 0] * torch.nan, method=method
        )
    assert hook_count(tiny) == before


@pytest.mark.parametrize("receiver_layers", [[9], [2]])
def test_receiver_layers_with_final_receivers_is_refused(tiny, receiver_layers):
    # Review 26b L3: unused with "final", it ran without complaint (even [9] on 3 layers).
    with pytest.raises(
        ValueError, match=r"receiver_layers=\[\d\] is given, but receivers is 'final'"
    ):
        mp.path_patch(tiny, CLEAN, CORRUPT, "head", "final", mp.logit_diff(1, 2),
                      receiver_layers=receiver_layers)  # fmt: skip
    # Only receiver Sites: each carries its layer, so receiver_layers would be ignored too.
    with pytest.raises(
        ValueError, match=r"receiver_layers=\[\d\] is given, but every entry"
    ) as err:
        mp.path_patch(tiny, CLEAN, CORRUPT, "head", mp.Site("q", 2, head=0), mp.logit_diff(1, 2),
                      receiver_layers=receiver_layers)  # fmt: skip
    assert "also takes 'final'" not in str(err.value)  # no answer to this error (review 26b)


def test_receiver_layers_choose_a_kind_beside_final(tiny):
    res = mp.path_patch(tiny, CLEAN, CORRUPT, "mlp_out", ["final", "mlp_in"], mp.logit_diff(1, 2),
                        layers=[0], receiver_layers=[2], n_random=0)  # fmt: skip
    assert res.receivers == ("final", "mlp_in@2")
    # layers= alone with receiver Sites keeps choosing the senders' layers, as before.
    res = mp.path_patch(tiny, CLEAN, CORRUPT, "mlp_out", mp.Site("mlp_in", 2), mp.logit_diff(1, 2),
                        layers=[0, 1], n_random=0)  # fmt: skip
    assert res.senders == ("mlp_out@0", "mlp_out@1") and res.receivers == ("mlp_in@2",)


def test_a_path_patch_figure_names_the_metrics_tokens(tiny):
    # Review 26a F10: the colour bar read "change of logit_diff", the title no metric at all.
    res = mp.path_patch(tiny, CLEAN, CORRUPT, SENDERS, "final", mp.logit_diff("x", "y"),
                        n_random=1, progress=False)  # fmt: skip
    assert (res.answer_tokens, res.wrong_tokens) == (("x",), ("y",))
    fig = res.plot()
    assert fig.axes[0].get_title().endswith("\nlogit['x'] - logit['y']")
    assert fig.axes[-1].get_ylabel() == "change of logit['x'] - logit['y']"
