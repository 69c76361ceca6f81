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
                torch.testing.assert_close(got[real][:, :, real], own.transpose(0, 1))
            # zeros at every padded query row and key column
            pad = batch.attention_mask[i] == 0
            assert float(got[..., pad].abs().sum()) == 0.0
            if not (isinstance(site, mp.Site) and site.positions == -1):
                assert float(got[pad].abs().sum()) == 0.0
        assert n == len(real)
