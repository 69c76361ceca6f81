"""run(): logits through the one readout, padding, chunks, and the full-forward fallback."""

from __future__ import annotations

import pytest
import torch

import mechprobe as mp
from tests.conftest import hook_count

PROMPTS = ["Hello there, friend", "Hi", "A longer prompt with more tokens in it"]


def _reference(model, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(prompt))[0]


def test_a_nan_logit_makes_the_loss_nan_not_zero(tiny) -> None:
    # nansum, there to skip padding, also skipped the model's own NaN: a float16 overflow (or a
    # NaN edit) read as a perfect loss of 0.0 (review 20b).
    class Overflow(mp.Intervention):  # Add refuses a NaN vector; an edit can still make one
        def edit(self, selected, hook):
            return selected * float("nan")

    out = mp.run(tiny, PROMPTS, {mp.Site("resid_post", 2): Overflow(positions=1)})
    loss = out.loss()
    assert torch.isnan(loss).all(), loss


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_logits_equal_the_model_whatever_the_padding(tiny, side: str) -> None:
    out = mp.run(tiny, PROMPTS, logit_positions=-1, padding_side=side, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(
            out.logits[i, 0], _reference(tiny, prompt)[-1], atol=1e-5, rtol=0
        )


def test_all_positions_hold_zeros_at_padding_and_the_model_elsewhere(tiny) -> None:
    batch = mp.tokenize(tiny, PROMPTS)
    out = mp.run(tiny, batch, batch_size=2, capture=[mp.Site("resid_post", 1)])
    for i, prompt in enumerate(PROMPTS):
        n = int(batch.lengths[i])
        torch.testing.assert_close(out.logits[i, :n], _reference(tiny, prompt), atol=1e-5, rtol=0)
        assert float(out.logits[i, n:].abs().sum()) == 0.0
        assert float(out[mp.Site("resid_post", 1)][i, n:].abs().sum()) == 0.0


def test_hooks_after_the_last_block_run_the_whole_forward(tiny) -> None:
    # An intervention on the final norm's output must still act on the logits.
    zero = {"ln_final.hook_normalized": mp.Ablate()}
    out = mp.run(tiny, "Hi", zero, logit_positions=-1)
    bias = tiny.b_U.float()
    torch.testing.assert_close(out.logits[0, 0], bias, atol=1e-6, rtol=0)


def test_a_users_own_hook_on_the_unembedding_acts_as_in_the_models_forward(tiny) -> None:
    # run() read the logits from the last block with W_U, skipping a hook the user had left on
    # unembed.hook_out, and so did patch, silently: its clean baseline was 2.57 where
    # model(tokens) said 3.57, while attribution_patch honoured it (review 21a).
    def lift(logits, hook):  # +1 on every seventh token's logit
        return logits + (torch.arange(logits.shape[-1], device=logits.device) % 7 == 0)

    plain = mp.run(tiny, "Hi there", logit_positions=-1).logits[0, 0]
    tiny.add_hook("unembed.hook_out", lift)
    try:
        with torch.no_grad():
            hand = tiny(tiny.to_tokens("Hi there"))[0, -1].float()
        got = mp.run(tiny, "Hi there", logit_positions=-1).logits[0, 0]
        # Analyses that decode residual vectors themselves say they skip it.
        with pytest.warns(UserWarning, match=r"unembed\.hook_out: .* does not act on these"):
            mp.patch(tiny, ["Hi there"], ["Hi where"], "resid_pre", -1, mp.logit_diff(7, 8))
    finally:
        tiny.reset_hooks()
    assert float(hand[7] - plain[7]) == pytest.approx(1.0, abs=1e-5)  # the hook acts by hand
    torch.testing.assert_close(got, hand, atol=1e-5, rtol=0)


def test_a_tensor_a_users_hook_keeps_is_not_the_result_nor_zeroed(tiny) -> None:
    """run's logits are its own tensor (one chunk: no copy) and padding is zeroed in place; a
    hook on the unembedding that keeps the tensor it is given had its padded logits zeroed and
    shared memory with the result (review 22a)."""
    kept = {}

    def grab(logits, hook):
        kept["logits"] = logits

    out = mp.run(tiny, ["Hi", "Hello there my"], {"unembed.hook_out": grab}, progress=False)
    held = kept["logits"]
    assert held.data_ptr() != out.logits.data_ptr()
    n_real = int(out.batch.attention_mask[0].sum())  # the first row is padded on the right
    assert float(held[0, n_real:].abs().max()) > 0  # the model's own logits there, untouched
    assert float(out.logits[0, n_real:].abs().max()) == 0  # the result's padding zeroed


def test_interventions_before_the_last_block_change_the_logits(tiny) -> None:
    plain = mp.run(tiny, "Hi", logit_positions=-1).logits
    ablated = mp.run(tiny, "Hi", {mp.Site("mlp_out", 2): mp.Ablate()}, logit_positions=-1).logits
    assert float((plain - ablated).abs().max()) > 1e-3


def test_chunks_take_their_own_rows_of_a_per_prompt_replace(tiny):
    site = mp.Site("resid_post", 1)
    sources = [f"Source prompt number {i}" for i in range(5)]
    targets = [f"Target {i}" for i in range(5)]
    read = mp.run(tiny, sources, capture=[mp.Site("resid_post", 1, positions=-1)], progress=False)
    values = next(iter(read.captures.values()))  # [5, 1, d]: one row per prompt
    runs = [
        mp.run(tiny, targets, {site: mp.Replace(values, positions=-1)}, logit_positions=-1,
               batch_size=b, progress=False).logits
        for b in (None, 2)
    ]  # fmt: skip
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=1e-5)
    for i in (0, 4):  # each prompt got its own row (not the last chunk's)
        alone = mp.run(tiny, targets[i : i + 1], {site: mp.Replace(values[i : i + 1], positions=-1)},
                       logit_positions=-1, progress=False).logits  # fmt: skip
        torch.testing.assert_close(runs[1][i], alone[0], atol=1e-5, rtol=1e-5)
    # A Capture among the interventions would keep the last chunk only: refused, with the fix.
    before = hook_count(tiny)
    with pytest.raises(ValueError, match="pass the site in capture="):
        mp.run(tiny, sources, {site: mp.Capture(positions=-1)}, batch_size=2, progress=False)
    assert hook_count(tiny) == before


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ([mp.Add(torch.ones(64))], TypeError, "must map sites to interventions"),
        ({mp.Site("resid_post", 0): mp.Gradient()}, ValueError, "mp.core.differentiate"),
    ],
)
def test_a_spec_run_cannot_apply_is_refused_before_any_pass(tiny, spec, error, message):
    before = hook_count(tiny)
    with pytest.raises(error, match=message):
        mp.run(tiny, ["Hi", "Hello"], spec, progress=False)
    assert hook_count(tiny) == before


def test_intervene_refuses_a_bare_list_of_interventions(tiny):
    before = hook_count(tiny)
    spec = [mp.Add(torch.ones(64))]
    with pytest.raises(TypeError, match="got a list: pass"), mp.intervene(tiny, spec):  # type: ignore[arg-type]
        pass
    assert hook_count(tiny) == before


@pytest.mark.parametrize("side", ["right", "left"])
def test_attention_maps_are_captured_query_major_whatever_the_chunks(tiny, side: str) -> None:
    # A pattern's key axis is as long as the chunk: chunks of other lengths used to fail to
    # place, and a hook name's [batch, head, q, k] was read as [batch, seq, ...] (rows x heads).
    sites = [
        "blocks.0.attn.hook_pattern",
        "blocks.1.attn.hook_attn_scores",
        mp.Site("pattern", 1, head=2),
        mp.Site("pattern", 0, head=1, positions=-1),
    ]
    out = mp.run(tiny, PROMPTS, capture=sites, batch_size=1, padding_side=side, progress=False)
    batch = out.batch
    assert batch is not None
    for i, prompt in enumerate(PROMPTS):
        n = int(batch.lengths[i])
        real = torch.nonzero(batch.attention_mask[i]).flatten()
        with torch.no_grad():
            _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        for site in sites:
            got = out[site][i]
            name = site if isinstance(site, str) else site.hook_name
            own = cache[name][0]  # [head, q, k]
            if isinstance(site, mp.Site):
                own = own[site.head]
                want = own[-1:] if site.positions == -1 else own
                rows = slice(None) if site.positions == -1 else real
                torch.testing.assert_close(got[rows][:, real], want, atol=1e-5, rtol=0)
            else:
                # masked scores: -inf on every model class (a bridge holds the dtype's lowest)
                own = own.masked_fill(own <= torch.finfo(own.dtype).min, -torch.inf)
                torch.testing.assert_close(got[real][:, :, real], own.transpose(0, 1))
            # zeros at every padded query row and key column
            pad = batch.attention_mask[i] == 0
            assert float(got[..., pad].abs().sum()) == 0.0
            if not (isinstance(site, mp.Site) and site.positions == -1):
                assert float(got[pad].abs().sum()) == 0.0
        assert n == len(real)


def _uniform_causal(pattern: torch.Tensor, hook) -> torch.Tensor:
    """What zeroed scores mean: each query spreads its attention evenly over keys 0..q."""
    n = pattern.shape[-1]
    allowed = torch.ones(n, n).tril()
    return (allowed / allowed.sum(-1, keepdim=True)).expand(pattern.shape).to(pattern.dtype)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("positions", [-1, None])
def test_edited_attention_scores_keep_the_mask_whatever_the_batch(
    tiny, side: str, positions
) -> None:
    # Zeroed scores used to overwrite the masked entries: short prompts attended to the batch's
    # padding (logits moved by 2.6) and every query to future keys. Independent reference: TL's
    # own hook writing a uniform causal pattern, on each prompt alone.
    site = "blocks.0.attn.hook_attn_scores"
    ablate = {site: mp.Ablate(positions=positions)}
    out = mp.run(tiny, PROMPTS, ablate, logit_positions=-1, padding_side=side, progress=False)
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny.to_tokens(prompt)
        hook = _uniform_causal
        if positions == -1:  # only the last query row is uniform

            def hook(pattern, hook, *, _n=tokens.shape[1]):
                pattern = pattern.clone()
                pattern[:, :, -1] = 1.0 / _n
                return pattern

        with torch.no_grad():
            want = tiny.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", hook)])
        torch.testing.assert_close(out.logits[i, 0], want[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_edited_patterns_never_weigh_padding_or_future_keys(tiny, side: str) -> None:
    # A constant written into a whole pattern lands on real past keys only: each prompt's
    # logits are those of the same edit on it alone (where the value's key axis is its own).
    site = "blocks.1.attn.hook_pattern"
    batch = mp.tokenize(tiny, PROMPTS, padding_side=side)
    edit = {site: mp.Replace(torch.full((batch.tokens.shape[1],), 0.1))}
    out = mp.run(tiny, batch, edit, logit_positions=-1, progress=False)
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny.to_tokens(prompt)
        n = tokens.shape[1]
        weights = torch.full((n, n), 0.1).tril()

        def hook(pattern, hook, *, _w=weights):
            return _w.expand(pattern.shape).to(pattern.dtype)

        with torch.no_grad():
            want = tiny.run_with_hooks(tokens, fwd_hooks=[(site, hook)])
        torch.testing.assert_close(out.logits[i, 0], want[0, -1], atol=1e-5, rtol=0)


def test_captured_scores_hold_minus_infinity_at_future_keys(tiny) -> None:
    # A bridge masks with the dtype's lowest value, a HookedTransformer with -inf.
    site = "blocks.0.attn.hook_attn_scores"
    scores = mp.run(tiny, ["Hello"], capture=[site], progress=False)[site][0]  # [q, head, k]
    future = torch.ones(scores.shape[0], scores.shape[0], dtype=torch.bool).triu(1)
    assert bool(torch.isneginf(scores.transpose(0, 1)[:, future]).all())
    assert bool(torch.isfinite(scores.transpose(0, 1)[:, ~future]).all())


@pytest.mark.parametrize(
    "site",
    ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores", mp.Site("pattern", 0, 1)],
)
def test_a_mean_over_an_attention_maps_padded_keys_is_refused(tiny, site) -> None:
    # Key j is a different token in each left-padded row: the mean depended on the padding side.
    before = hook_count(tiny)
    mean = {site: mp.Ablate("mean", positions=-1)}
    with pytest.raises(ValueError, match=r"an attention map.*ablate_cells"):
        mp.run(tiny, PROMPTS, mean, progress=False)
    with (
        pytest.raises(ValueError, match=r"an attention map.*ablate_cells"),
        mp.intervene(tiny, mean),
    ):
        pass
    assert hook_count(tiny) == before
    batch = mp.tokenize(tiny, PROMPTS)
    given = mp.Ablate("mean", mean=torch.full((batch.tokens.shape[1],), 0.05), positions=-1)
    assert (
        mp.run(tiny, batch, {site: given}, logit_positions=-1, progress=False)
        .logits.isfinite()
        .all()
    )


def test_a_key_vector_that_misses_the_chunks_keys_names_batch_size(tiny) -> None:
    batch = mp.tokenize(tiny, PROMPTS)
    add = {
        "blocks.1.attn.hook_attn_scores": mp.Add(torch.zeros(batch.tokens.shape[1]), positions=-1)
    }
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=r"keys of this forward pass.*batch_size=None"):
        mp.run(tiny, batch, add, batch_size=1, progress=False)
    assert hook_count(tiny) == before
    base = mp.run(tiny, batch, logit_positions=-1, progress=False).logits
    torch.testing.assert_close(
        mp.run(tiny, batch, add, logit_positions=-1, progress=False).logits, base
    )
    # One value for every key broadcasts whatever the chunk (a softmax ignores a shift).
    shift = {"blocks.1.attn.hook_attn_scores": mp.Add(torch.full((1,), 3.0), positions=-1)}
    shifted = mp.run(tiny, batch, shift, logit_positions=-1, batch_size=1, progress=False)
    torch.testing.assert_close(shifted.logits, base, atol=1e-5, rtol=0)


def test_a_key_mask_that_misses_the_keys_is_refused(tiny) -> None:
    # intervene(key_mask=) is for passes that read cached keys; a wrong width was ignored.
    tokens = tiny.to_tokens("Hello")
    before = hook_count(tiny)
    zero = {"blocks.0.attn.hook_attn_scores": mp.Ablate()}
    wrong = mp.intervene(tiny, zero, key_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"key mask has shape \(1, 3\)"), wrong, torch.no_grad():
        tiny(tokens)
    assert hook_count(tiny) == before
    with mp.intervene(tiny, zero, key_mask=torch.ones(1, tokens.shape[1])), torch.no_grad():
        masked = tiny(tokens)
    torch.testing.assert_close(masked, mp.run(tiny, ["Hello"], zero, progress=False).logits)


class _ZeroInPlace(mp.Intervention):
    """Zeroes its selection in place and returns it (a TransformerLens idiom)."""

    def edit(self, selected, hook):
        selected.zero_()
        return selected


class _ZeroInPlaceQuietly(_ZeroInPlace):
    def edit(self, selected, hook):
        super().edit(selected, hook)


@pytest.mark.parametrize("edit", [_ZeroInPlace, _ZeroInPlaceQuietly])
@pytest.mark.parametrize("side", ["right", "left"])
def test_an_edit_in_place_keeps_the_mask_too(tiny, edit, side) -> None:
    # The masked entries were read back after the edit: zeroed in place, they were lost and
    # every query attended to future keys and padding (logits off by 2.9).
    site = "blocks.1.attn.hook_attn_scores"
    kw = {"logit_positions": -1, "padding_side": side, "progress": False}
    got = mp.run(tiny, PROMPTS, {site: edit()}, **kw).logits
    want = mp.run(tiny, PROMPTS, {site: mp.Ablate()}, **kw).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for i, prompt in enumerate(PROMPTS):
        tokens = tiny.to_tokens(prompt)
        with torch.no_grad():
            hand = tiny.run_with_hooks(
                tokens, fwd_hooks=[(site.replace("attn_scores", "pattern"), _uniform_causal)]
            )
        torch.testing.assert_close(got[i, 0], hand[0, -1], atol=1e-5, rtol=0)


def test_a_gradient_at_a_pattern_is_the_models_own_at_every_key(tiny) -> None:
    # The mask-keeping cut a Gradient's derivative to 0 at future keys (hand: up to 0.6).
    site, tokens = "blocks.1.attn.hook_pattern", tiny.to_tokens("Hello there")
    g = mp.Gradient()
    with mp.intervene(tiny, {site: g}):
        out = tiny(tokens)[0, -1, 100]
    mp.core.differentiate(out, [g])
    seen = {}

    def keep(pattern, hook):
        pattern.retain_grad()
        seen["p"] = pattern
        return pattern

    tiny.run_with_hooks(tokens, fwd_hooks=[(site, keep)])[0, -1, 100].backward()
    want = seen["p"].grad.transpose(1, 2)  # query-major, as the Gradient sees it
    torch.testing.assert_close(g.grad, want, atol=1e-6, rtol=1e-5)
    n = tokens.shape[1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    assert float(want[0].transpose(0, 1)[:, future].abs().max()) > 1e-3  # not zero there
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_gradient_without_autograd_names_every_way_to_turn_it_back_on(tiny, mode) -> None:
    # The message named torch.no_grad alone, also under inference_mode (review 21a).
    tokens = tiny.to_tokens("Hello there")
    grad = {mp.Site("resid_post", 0): mp.Gradient()}
    message = r"torch.inference_mode\(False\), torch"
    with mode(), pytest.raises(RuntimeError, match=message), mp.intervene(tiny, grad):
        tiny(tokens)
    with torch.inference_mode(), torch.inference_mode(False), torch.enable_grad():  # as it says
        g = mp.Gradient()
        with mp.intervene(tiny, {mp.Site("resid_post", 0): g}):
            out = tiny(tokens)[0, -1, 100]
        mp.core.differentiate(out, [g])
    assert g.grad is not None and float(g.grad.abs().max()) > 0
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_loss_is_each_prompts_own_cross_entropy_whatever_the_padding(tiny, side: str) -> None:
    from conftest import hf_of  # pytest's conftest module, which holds the tiny models' twins

    out = mp.run(tiny, PROMPTS, padding_side=side, batch_size=2)
    hf = hf_of(tiny)
    for i, prompt in enumerate(PROMPTS):
        ids = tiny.to_tokens(prompt)
        with torch.no_grad():  # HF shifts the labels itself: its mean over the prompt alone
            ref = hf(ids, labels=ids).loss
        assert float(out.loss()[i]) == pytest.approx(float(ref), abs=1e-5)
    per_token = out.loss(per_token=True)
    assert per_token.shape == (len(PROMPTS), out.batch.tokens.shape[1] - 1)
    assert per_token.isfinite().sum(1).tolist() == (out.batch.lengths - 1).tolist()
    with pytest.raises(ValueError, match="logit_positions='all'"):
        mp.run(tiny, PROMPTS, logit_positions=-1).loss()


def test_loss_under_an_ablation_equals_transformerlens_loss_with_the_hook(tiny) -> None:
    site = mp.Site("mlp_out", 1)
    out = mp.run(tiny, PROMPTS, {site: mp.Ablate()})
    for i, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            ref = tiny.run_with_hooks(
                tiny.to_tokens(prompt),
                return_type="loss",
                fwd_hooks=[(site.hook_name, lambda act, hook: torch.zeros_like(act))],
            )
        assert float(out.loss()[i]) == pytest.approx(float(ref), abs=1e-5)
    intact = mp.run(tiny, PROMPTS).loss()
    assert (out.loss() - intact).abs().min() > 1e-3  # the hook changed every prompt's loss


@pytest.mark.parametrize("side", ["right", "left"])
def test_capture_means_leave_padding_out(tiny, side: str) -> None:
    # The zeros a capture holds at padding were averaged into a plain .mean (a steering vector
    # off by its padding share).
    # BOS counted too (SmolLM2's is 150x the text's norm): "all" in a Site kept padding in.
    site, every_position = mp.Site("resid_post", 1), mp.Site("resid_post", 1, positions="all")
    out = mp.run(tiny, PROMPTS, capture=[site, every_position], padding_side=side, batch_size=2)
    per_prompt, with_bos = [], []
    for prompt in PROMPTS:
        tokens = tiny.to_tokens(prompt)
        assert int(tokens[0, 0]) == tiny.tokenizer.bos_token_id
        _, cache = tiny.run_with_cache(tokens)
        with_bos.append(cache[site.hook_name][0].double())
        per_prompt.append(with_bos[-1][1:])  # the text's tokens: BOS left out
    for kept in (site, every_position):
        every = torch.cat(per_prompt).mean(0)
        torch.testing.assert_close(out.mean(kept).double(), every, atol=1e-5, rtol=0)
        expected = torch.stack([p.mean(0) for p in per_prompt])
        torch.testing.assert_close(
            out.mean(kept, per_prompt=True).double(), expected, atol=1e-5, rtol=0
        )
        counted = out.mean(kept, bos=True).double()
        torch.testing.assert_close(counted, torch.cat(with_bos).mean(0), atol=1e-5, rtol=0)
        assert (counted - every).abs().max() > 1e-3
    assert (out[site].double().mean((0, 1)) - every).abs().max() > 1e-3  # the trap it avoids
    # A prompt of BOS alone has no text to average: the mean was a silent all-NaN vector, and
    # mean-ablation said "no real token".
    alone = mp.run(tiny, [""], capture=[site], padding_side=side)
    with pytest.raises(ValueError, match="no token of the text to average"):
        alone.mean(site)
    assert torch.isfinite(alone.mean(site, bos=True)).all()
    with pytest.raises(ValueError, match="no token of the text was selected"):
        mp.run(tiny, [""], {site: mp.Ablate("mean")})
    last = mp.Site("resid_post", 1, positions=-1)
    chosen = mp.run(tiny, PROMPTS, capture=[last], padding_side=side)
    ends = torch.stack([p[-1] for p in per_prompt])
    torch.testing.assert_close(chosen.mean(last).double(), ends.mean(0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention map"):
        pattern = mp.Site("pattern", 0, head=0)
        mp.run(tiny, PROMPTS, capture=[pattern]).mean(pattern)


def test_capture_takes_a_kind_a_site_or_a_hook_name_alone(tiny) -> None:
    # capture="resid_post" was read as its letters: "Unknown hook name 'r'".
    every = mp.run(tiny, "Hi there", capture="resid_post", progress=False)
    assert list(every.captures) == [mp.Site("resid_post", i) for i in range(3)]
    one = mp.run(tiny, "Hi there", capture="blocks.1.hook_resid_post", progress=False)
    site = mp.run(tiny, "Hi there", capture=mp.Site("resid_post", 1), progress=False)
    assert torch.equal(one["blocks.1.hook_resid_post"], every[mp.Site("resid_post", 1)])
    assert torch.equal(site[mp.Site("resid_post", 1)], every[mp.Site("resid_post", 1)])
    with pytest.raises(KeyError, match=r"'resid_post' is a kind, one site per layer"):
        every["resid_post"]
    # A kind and one of its hook names are one place, captured once.
    twice = mp.run(tiny, "Hi", capture=["resid_post", "blocks.0.hook_resid_post"], progress=False)
    assert len(twice.captures) == 3
    mixed = mp.run(tiny, "Hi there", capture=["mlp_out", "blocks.0.hook_resid_pre"], progress=False)
    assert [str(s) for s in mixed.captures] == [
        "mlp_out@0", "mlp_out@1", "mlp_out@2", "blocks.0.hook_resid_pre"
    ]  # fmt: skip


def test_a_mean_ablation_after_the_blocks_is_measured_on_the_whole_pass(tiny) -> None:
    # The measuring pass always ended at the last block, so a mean at ln_final never came:
    # "never ran" warned, then "no token of the text was selected" blamed the prompts.
    site = "ln_final.hook_normalized"
    per_prompt = []
    for prompt in PROMPTS:
        _, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        per_prompt.append(cache[site][0, 1:].double())  # the text's tokens: BOS left out
    mean = torch.cat(per_prompt).mean(0)
    out = mp.run(tiny, PROMPTS, {site: mp.Ablate("mean")}, logit_positions=-1, batch_size=1)
    expected = (mean.float() @ tiny.W_U + tiny.b_U).expand(len(PROMPTS), -1)
    torch.testing.assert_close(out.logits[:, 0], expected, atol=1e-4, rtol=0)


def test_per_prompt_vectors_are_cut_to_each_chunk(tiny) -> None:
    # Only Replace was cut to a chunk's rows: a per-prompt Add vector (or Ablate mean) worked
    # with batch_size=None and failed at batch_size=1 with torch's bare "expanded size" error.
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(len(PROMPTS), 1, 64, generator=gen)
    site = mp.Site("resid_post", 0)
    for make in (lambda v: mp.Add(v, positions=-1), lambda v: mp.Ablate(mean=v, positions=-1)):
        kw = {"logit_positions": -1}
        whole = mp.run(tiny, PROMPTS, {site: make(vectors)}, batch_size=None, **kw)
        chunked = mp.run(tiny, PROMPTS, {site: make(vectors)}, batch_size=1, **kw)
        torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=0)
        for i, prompt in enumerate(PROMPTS):  # each prompt ran with its own vector
            alone = mp.run(tiny, [prompt], {site: make(vectors[i])}, **kw)
            torch.testing.assert_close(whole.logits[i], alone.logits[0], atol=1e-5, rtol=0)
    # At a hook with a head axis the selection is [batch, k, n_heads, d_head]: a shared
    # [k, n_heads, d_head] vector with k == the number of prompts is no per-prompt value (it
    # was cut by its first axis, 1.58 off), and a per-prompt one has four axes.
    heads, d_head = int(tiny.cfg.n_heads), int(tiny.cfg.d_head)
    k = len(PROMPTS)
    shared = torch.randn(k, heads, d_head, generator=gen)
    per_prompt = torch.randn(len(PROMPTS), 1, heads, d_head, generator=gen)
    z = "blocks.0.attn.hook_z"
    for value, where in ((shared, list(range(k))), (per_prompt, -1)):
        for make in (
            lambda v, p: mp.Add(v, positions=p),
            lambda v, p: mp.Ablate(mean=v, positions=p),
        ):
            whole = mp.run(tiny, PROMPTS, {z: make(value, where)}, batch_size=None, **kw)
            chunked = mp.run(tiny, PROMPTS, {z: make(value, where)}, batch_size=1, **kw)
            torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=0)


def test_gather_pairs_rows_with_positions(tiny) -> None:
    # Gather(rows=...) without cols kept every row, rows ignored.
    from mechprobe.core import Gather

    with pytest.raises(ValueError, match="pass cols= too"):
        Gather(rows=torch.tensor([0]))
    keep = Gather(rows=torch.tensor([1, 0]), cols=torch.tensor([2, 1]))
    batch = mp.tokenize(tiny, PROMPTS[:2])
    with mp.intervene(tiny, {"blocks.0.hook_resid_post": keep}, batch=batch):
        _, cache = tiny.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    state = cache["blocks.0.hook_resid_post"]
    assert keep.value is not None
    torch.testing.assert_close(keep.value, torch.stack([state[1, 2], state[0, 1]]))


def test_a_mean_is_measured_with_per_prompt_edits_cut_to_each_chunk(tiny) -> None:
    # The measuring pass of a mean-ablation ran the other interventions uncut: a per-prompt Add
    # vector failed there at batch_size=1 (torch's "expanded size"), where the run itself cut it.
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(PROMPTS), 1, 64, generator=gen)
    spec = {
        mp.Site("resid_post", 0): mp.Add(vectors, positions=-1),
        mp.Site("mlp_out", 1): mp.Ablate("mean"),
    }
    kw = {"logit_positions": -1}
    whole = mp.run(tiny, PROMPTS, spec, batch_size=None, **kw)
    chunked = mp.run(tiny, PROMPTS, spec, batch_size=1, **kw)
    torch.testing.assert_close(chunked.logits, whole.logits, atol=1e-5, rtol=0)


def test_a_model_set_to_prepend_no_bos_runs_every_analysis_without_it(tiny) -> None:
    """``model.cfg.default_prepend_bos = False`` (Merullo et al.'s GPT-2 code and a plain Hugging
    Face loop add no BOS; README): the lens, a run and an o-vector read the prompt's own tokens,
    each checked against the model run by hand on ``to_tokens(prepend_bos=False)``."""
    prompt = "Hi cat"
    ids = tiny.to_tokens(prompt, prepend_bos=False)
    assert ids[0, 0] != tiny.tokenizer.bos_token_id
    flag = tiny.cfg.default_prepend_bos
    tiny.cfg.default_prepend_bos = False
    try:
        lens = mp.logit_lens(tiny, prompt, progress=False)
        run = mp.run(tiny, [prompt], capture=["blocks.1.hook_mlp_out"], progress=False)
        ovector = mp.extract_ovector(tiny, prompt, layer=1, progress=False)
    finally:
        tiny.cfg.default_prepend_bos = flag
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(ids)
    assert len(lens.prompt_tokens[0]) == ids.shape[1]
    torch.testing.assert_close(torch.as_tensor(run.logits[0]), logits[0], rtol=1e-5, atol=1e-5)
    mlp_out = cache["blocks.1.hook_mlp_out"][0, -1]
    torch.testing.assert_close(
        torch.as_tensor(ovector.vector).float(), mlp_out, rtol=1e-5, atol=1e-6
    )
