"""Attribution patching against a gradient computed with plain TransformerLens hooks and leaf
tensors, its agreement with exact patching where the metric is linear, and its cleanliness after a
failing backward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp
from tests.conftest import hook_count, pass_recorder

CLEAN, CORRUPT = "A cat sat on", "A bat sat on"  # equal lengths, differ at position 2
ANS, WRONG = 100, 101
METRIC = mp.logit_diff(ANS, WRONG)


@pytest.fixture(scope="module")
def gqa():
    return mp.tiny_model(seed=3)


def _hand(model, site: mp.Site, noising: bool = False) -> np.ndarray:
    """(a_clean - a_corrupt) . d metric / d a at every position, written with plain hooks: the
    corrupt run's activation is replaced by a leaf tensor whose gradient autograd fills (with
    ``noising``, the runs swap roles: (a_corrupt - a_clean) . the clean run's gradient)."""
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    if noising:
        clean, corrupt = corrupt, clean
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    if site.kind == "head_out":
        name = f"blocks.{site.layer}.hook_attn_out"
        z_name = f"blocks.{site.layer}.attn.hook_z"
    else:
        name = site.hook_name
    leaf = {}

    def hook(act, hook):
        leaf["a"] = act.detach().clone().requires_grad_(True)
        return leaf["a"]

    seen = {}

    def keep(z, hook):
        seen["z"] = z.detach()

    hooks = [(name, hook)]
    if site.kind == "head_out":
        hooks.insert(0, (z_name, keep))
    with torch.enable_grad():
        logits = model.run_with_hooks(corrupt, fwd_hooks=hooks)
        out = logits[0, -1, ANS] - logits[0, -1, WRONG]
        (grad,) = torch.autograd.grad(out, [leaf["a"]])
    h = site.head
    if site.kind == "pattern":  # [batch, head, query, key]
        delta = cache[name][0, h] - leaf["a"].detach()[0, h]
        return (delta * grad[0, h]).sum(-1).numpy()
    if site.kind == "head_out":
        w_o = model.blocks[site.layer].attn.W_O[h].detach()
        delta = (cache[z_name][0, :, h] - seen["z"][0, :, h]) @ w_o
        return (delta * grad[0]).sum(-1).numpy()
    if h is not None:
        return (
            ((cache[name][0, :, h] - leaf["a"].detach()[0, :, h]) * grad[0, :, h]).sum(-1).numpy()
        )
    return ((cache[name][0] - leaf["a"].detach()[0]) * grad[0]).sum(-1).numpy()


@pytest.mark.parametrize(
    "site",
    [
        mp.Site("resid_pre", 1),
        mp.Site("mlp_out", 0),
        mp.Site("attn_out", 2),
        mp.Site("head", 1, head=3),
        mp.Site("q", 2, head=1),
        mp.Site("k", 1, head=1),  # a key/value head of the GQA model
        mp.Site("v", 0, head=0),
        mp.Site("pattern", 2, head=2),
        mp.Site("head_out", 1, head=2),
    ],
    ids=str,
)
def test_attribution_matches_hand_written_gradients(gqa, site):
    res = mp.attribution_patch(gqa, CLEAN, CORRUPT, [site], "all", METRIC, progress=False)
    estimate = res.values[0] - res.corrupt_metric
    np.testing.assert_allclose(estimate, _hand(gqa, site), rtol=1e-4, atol=1e-6)
    assert res.direction == "attribution"
    np.testing.assert_allclose(res.effect[0], estimate, atol=1e-9)
    # The unpatched runs are those of exact patching.
    exact = mp.patch(gqa, CLEAN, CORRUPT, [site], -1, METRIC, n_random=0, progress=False)
    np.testing.assert_allclose(
        [res.clean_metric, res.corrupt_metric],
        [exact.clean_metric, exact.corrupt_metric],
        atol=1e-5,
    )


@pytest.mark.parametrize("site", [mp.Site("mlp_out", 0), mp.Site("head", 1, head=3)], ids=str)
def test_every_position_at_once_is_the_sum_of_the_hand_estimates(gqa, site):
    # positions=None: the first-order estimate of patch(..., positions=None), the sum over
    # positions of (a_clean - a_corrupt) . grad (it was refused).
    res = mp.attribution_patch(gqa, CLEAN, CORRUPT, [site], None, METRIC, progress=False)
    assert res.positions == (None,) and res.values.shape == (1, 1)
    estimate = res.values[0, 0] - res.corrupt_metric
    assert estimate == pytest.approx(float(_hand(gqa, site).sum()), rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="positions=None patches every position at once"):
        mp.attribution_patch(gqa, "A cat", "A big bat", [site], None, METRIC)


@pytest.mark.parametrize(
    "site",
    [mp.Site("resid_pre", 1), mp.Site("head", 1, head=3), mp.Site("pattern", 2, head=2)],
    ids=str,
)
def test_noising_is_the_clean_runs_first_order_term(gqa, site):
    res = mp.attribution_patch(
        gqa, CLEAN, CORRUPT, [site], "all", METRIC, direction="noising", progress=False
    )
    assert res.direction == "attribution-noising" and res.method == "attribution"
    estimate = res.values[0] - res.clean_metric  # noising edits the clean run
    np.testing.assert_allclose(estimate, _hand(gqa, site, noising=True), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.effect[0], estimate, atol=1e-9)
    exact = mp.patch(
        gqa, CLEAN, CORRUPT, [site], -1, METRIC, direction="noising", n_random=0, progress=False
    )
    np.testing.assert_allclose(
        [res.clean_metric, res.corrupt_metric],
        [exact.clean_metric, exact.corrupt_metric],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="direction must be"):
        mp.attribution_patch(gqa, CLEAN, CORRUPT, [site], -1, METRIC, direction="sideways")


def test_head_out_equals_head_z(gqa):
    """A head's write is z @ W_O[head]; the first-order estimate is the same through either."""
    z = mp.attribution_patch(gqa, CLEAN, CORRUPT, "head", "all", METRIC, progress=False)
    out = mp.attribution_patch(gqa, CLEAN, CORRUPT, "head_out", "all", METRIC, progress=False)
    np.testing.assert_allclose(z.values, out.values, rtol=1e-4, atol=1e-5)


def test_agrees_with_exact_patching(gqa):
    """Cells exact patching leaves unchanged get a zero estimate (positions before the prompts
    differ; the last block's output at positions the metric does not read), and elsewhere the
    estimate tracks exact patching on the tiny model."""
    res = mp.attribution_patch(gqa, CLEAN, CORRUPT, "mlp_out", "all", METRIC, progress=False)
    exact = mp.patch(gqa, CLEAN, CORRUPT, "mlp_out", "all", METRIC, n_random=0, progress=False)
    last = gqa.cfg.n_layers - 1
    # After the last block only the last position reaches the logits: zero effect elsewhere.
    np.testing.assert_allclose(res.effect[last, :-1], 0.0, atol=1e-7)
    np.testing.assert_allclose(exact.effect[last, :-1], 0.0, atol=1e-5)
    # Unchanged positions (before the difference) have a_clean == a_corrupt: zero in both.
    np.testing.assert_allclose(res.effect[:, :2], 0.0, atol=1e-7)
    # Where the change is small the estimate tracks exact patching.
    assert np.corrcoef(res.effect.ravel(), exact.effect.ravel())[0, 1] > 0.5


def test_random_controls_have_the_patch_norm(gqa):
    res = mp.attribution_patch(
        gqa, CLEAN, CORRUPT, "resid_pre", -1, METRIC, n_random=4, seed=7, progress=False
    )
    again = mp.attribution_patch(
        gqa, CLEAN, CORRUPT, "resid_pre", -1, METRIC, n_random=4, seed=7, progress=False
    )
    np.testing.assert_array_equal(res.random, again.random)
    assert res.random.shape == (4, 1, gqa.cfg.n_layers, 1)
    # |u . g| * ||delta|| <= ||delta|| ||g||, and the random estimates differ from the patch's.
    assert np.isfinite(res.random).all()
    assert not np.allclose(res.random[0], res.per_pair)


@pytest.mark.parametrize("dims", [1, 2, 5, 64])
def test_a_controls_projection_is_a_random_directions(dims):
    """A control's estimate is ||delta|| ||g|| times u . g/||g|| for u uniform on the unit sphere
    of the cell's edits; it is drawn as z / sqrt(z^2 + chi2(dims - 1)) (three numbers a cell, not
    a direction as wide as the activation). Checked against explicit random directions: the
    squared cosine of a uniform direction with a fixed axis is Beta(1/2, (dims - 1)/2), and its
    sign is a fair coin."""
    from scipy import stats

    from mechprobe.patching._attribution import _random_projections

    n = 4000
    positions = torch.arange(n)
    cos = _random_projections(
        mp.Site("resid_pre", 1), torch.full((n,), float(dims)), positions, positions, 3,
        [torch.tensor([1, 2, 3])],
    ).numpy()  # fmt: skip
    assert cos.shape == (n,) and np.abs(cos).max() <= 1.0
    if dims == 1:
        assert set(np.unique(cos)) == {-1.0, 1.0}
    else:
        assert stats.kstest(cos**2, stats.beta(0.5, (dims - 1) / 2).cdf).pvalue > 0.01
    # with explicit directions, the same law (a two-sample test; both draws seeded)
    z = np.random.default_rng(0).standard_normal((n, dims))
    explicit = z[:, 0] / np.linalg.norm(z, axis=1)
    assert stats.ks_2samp(cos, explicit).pvalue > 0.01
    assert abs(np.mean(cos > 0) - 0.5) < 0.03


def test_backward_failure_leaves_no_state(gqa):
    """An exception inside the backward pass leaves no hooks, no parameter gradients and the
    model's outputs unchanged."""

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("boom in backward")

    def metric(logits):
        return Boom.apply(logits[:, ANS] - logits[:, WRONG])

    tokens = gqa.to_tokens(CLEAN)
    with torch.no_grad():
        before = gqa(tokens)
    hooks = hook_count(gqa)
    with pytest.raises(RuntimeError, match="boom in backward"):
        mp.attribution_patch(gqa, CLEAN, CORRUPT, "head", "all", metric, progress=False)
    assert hook_count(gqa) == hooks
    assert all(p.grad is None for p in gqa.parameters())
    with torch.no_grad():
        assert torch.equal(gqa(tokens), before)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gradients_switched_off_by_the_caller_give_the_same_numbers(gqa, mode):
    # torch.set_grad_enabled(False) (the first line of many TransformerLens notebooks) made every
    # call fail: "element 0 of tensors does not require grad".
    expected = mp.attribution_patch(gqa, CLEAN, CORRUPT, "head", -1, METRIC, progress=False)
    off = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with off:
        got = mp.attribution_patch(gqa, CLEAN, CORRUPT, "head", -1, METRIC, progress=False)
    np.testing.assert_array_equal(got.values, expected.values)
    np.testing.assert_array_equal(got.random, expected.random)
    assert torch.is_grad_enabled() and all(p.grad is None for p in gqa.parameters())


def test_a_metric_without_a_gradient_is_named(gqa):
    def flat(logits):
        return (logits.argmax(-1) == ANS).float()

    with pytest.raises(ValueError, match="'flat' gave a value without a gradient"):
        mp.attribution_patch(gqa, CLEAN, CORRUPT, "mlp_out", -1, flat, progress=False)


def test_a_metric_returning_a_scalar_is_refused_as_patch_refuses_it(gqa):
    # Attribution patching runs one pair per pass, so a summed metric gave right numbers here
    # while patch refused it: the same metric is refused by both, with the same message.
    def total(logits):
        return logits[:, ANS].sum() - logits[:, WRONG].sum()

    for analysis in (mp.attribution_patch, mp.patch):
        with pytest.raises(ValueError, match=r"shape \(\) for \d+ rows.*one value per row"):
            analysis(gqa, CLEAN, CORRUPT, "mlp_out", -1, total, progress=False)


def test_errors_before_any_forward(gqa):
    with pytest.raises(ValueError, match="corrupt prompt per clean"):
        mp.attribution_patch(gqa, ["a", "b"], ["c"], "mlp_out", -1, METRIC)
    with pytest.raises(ValueError, match="n_random"):
        mp.attribution_patch(gqa, CLEAN, CORRUPT, "mlp_out", -1, METRIC, n_random=-1)
    with pytest.raises(ValueError, match="Pattern cells"):
        mp.attribution_patch(gqa, "A cat sat", "A big bat sat", "pattern", [-1], METRIC)


def test_pairs_batched_by_length_give_each_pairs_own_numbers(gqa):
    """Pairs run together where their prompts' lengths agree (no padding): every batch size gives
    one pair at a time's numbers, each pair's metric bound to its own answers."""
    clean = ["A cat sat on", "The dog ran far away", "A bat sat on", "A cow sat on", "Hi"]
    corrupt = ["A bat sat on", "The cat ran far away", "A cat sat on", "A cat sat on", "Yo"]
    metric = mp.logit_diff([100, 7, 101, 55, 3], [101, 8, 100, 56, 4])
    sites = ["resid_pre", "head_out", mp.Site("pattern", 1, head=2), "mlp_out"]
    for direction in ("denoising", "noising"):
        one = mp.attribution_patch(gqa, clean, corrupt, sites, [-2, -1], metric, n_random=2,
                                   direction=direction, batch_size=1, progress=False)  # fmt: skip
        for size in (2, None):
            got = mp.attribution_patch(gqa, clean, corrupt, sites, [-2, -1], metric, n_random=2,
                                       direction=direction, batch_size=size, progress=False)  # fmt: skip
            for field in ("per_pair", "random", "clean_metric", "corrupt_metric"):
                a, b = getattr(got, field), getattr(one, field)
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=field)
    # The passes a metric sees: pairs of one length together, at most batch_size a pass.
    seen, metric_fn = pass_recorder()

    mp.attribution_patch(gqa, clean, corrupt, "resid_pre", -1, metric_fn, n_random=0,
                         batch_size=2, progress=False)  # fmt: skip
    # each pass twice: the read run, then the differentiated one
    assert seen == [[0, 2], [0, 2], [3], [3], [1], [1], [4], [4]]
    # A memory budget below one row's backward pass runs one pair a pass (one always runs).
    seen.clear()
    mp.attribution_patch(gqa, clean, corrupt, "resid_pre", -1, metric_fn, n_random=0,
                         memory_budget=1, progress=False)  # fmt: skip
    assert seen[::2] == [[0], [2], [3], [1], [4]]
    with pytest.raises(ValueError, match="batch_size"):
        mp.attribution_patch(gqa, CLEAN, CORRUPT, "resid_pre", -1, METRIC, batch_size=0)


def test_result_protocol(gqa, tmp_path):
    res = mp.attribution_patch(gqa, CLEAN, CORRUPT, "head", -1, METRIC, progress=False)
    back = mp.PatchResult.load(res.save(tmp_path / "attr.json"))
    np.testing.assert_array_equal(back.values, res.values)
    assert "attribution" in repr(res)
    assert res.plot().axes


def test_a_narrow_heatmaps_title_is_wrapped_to_its_figure(tiny):
    # attribution_patch(...).plot() on 6 positions: a one-line title ran past both edges of
    # its 4-inch figure (review 24a).
    res = mp.attribution_patch(tiny, "A cat sat", "A bat sat", "resid_pre", "all",
                               mp.logit_diff(1, 2), progress=False)  # fmt: skip
    fig = res.plot()
    title = fig.axes[0].get_title()
    assert "\n" in title and "attribution patching (estimated denoising)" in title.replace(
        "\n", " "
    )
    assert max(map(len, title.split("\n"))) <= 10 * fig.get_figwidth()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_metric_not_finite_on_the_unpatched_runs_is_refused(tiny, bad):
    # Review 26b S3: every value came back NaN with no word, where patch refused the metric.
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=rf"gave -?{bad} on an unpatched \(source\) run: make it"):
        mp.attribution_patch(tiny, CLEAN, CORRUPT, "resid_pre", -1, lambda lg: lg[:, 0] * bad)
    assert hook_count(tiny) == before
