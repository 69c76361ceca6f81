"""SmolLM2 under both model types: the same lens, patching and erasure numbers.

Each number is checked against the Hugging Face model itself (loaded from mechprobe's weight cache,
without TransformerLens), in both environments: the TransformerBridge in `make test` (TL 4.3), the
bridge and the HookedTransformer in `make test-tl3` (TL 3.9), where they are also compared with
each other. Equal within 1e-4 where the weights are processed the same way (not at all, the
default); HookedTransformer.from_pretrained's default processing (`process_weights=True`) centres
the unembedding, which moves every raw logit by a constant per position: the last test shows it,
and that probabilities and logit differences do not move.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core import cache_dir, first_token_ids, model_adapter

pytestmark = [pytest.mark.integration, pytest.mark.model_kinds]

#: Entropy and KL are sums over SmolLM2's 49152 tokens of float32 terms as large as the logits (the
#: lens computes them in float32, ``lse - <p, z>``), so they carry a rounding of up to ~1e-3 where the
#: logits, log-probabilities and logit differences agree within 1e-4. Measured: the same model with
#: a centred unembedding (every logit shifted by a constant, KL mathematically unchanged) moves KL
#: by up to 1.7e-3 at KL ~15.
STAT_ATOL = 3e-3
PAIR = ("Q: What is the capital of France?\nA:", "Q: What is the capital of Poland?\nA:")
ANSWERS = (" Paris", " Warsaw")


def _hooked_available() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


HOOKED = _hooked_available()
needs_hooked = pytest.mark.skipif(
    not HOOKED, reason="HookedTransformer needs TransformerLens 3.x (make test-tl3)"
)


@pytest.fixture(scope="session")
def smollm2_hooked() -> Any:
    if not HOOKED:
        pytest.skip("HookedTransformer needs TransformerLens 3.x (make test-tl3)")
    return mp.load_model(kind="hooked")


@pytest.fixture(scope="session")
def hf(smollm2: Any) -> Any:
    """The Hugging Face model of the cached weights (the bridge's load wrote the cache)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(cache_dir() / "smollm2-135m-f32")
    return model.eval()


@pytest.fixture(params=["bridge", "hooked"])
def model(request: pytest.FixtureRequest, smollm2: Any) -> Any:
    if request.param == "bridge":
        return smollm2
    return request.getfixturevalue("smollm2_hooked")


def _ids(model: Any, prompt: str) -> torch.Tensor:
    tok = model.tokenizer
    return torch.tensor([[tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]])


def _answer_ids(model: Any) -> list[int]:
    return first_token_ids(model, list(ANSWERS))


def _hf_logits(hf: Any, ids: torch.Tensor, hooks: dict[int, Any] | None = None) -> torch.Tensor:
    """HF logits ``[seq, vocab]``; ``hooks`` maps a layer to a forward hook on its MLP or block."""
    handles = [module.register_forward_hook(fn) for module, fn in (hooks or {}).values()]
    try:
        with torch.no_grad():
            return hf(ids).logits[0]
    finally:
        for handle in handles:
            handle.remove()


def test_logits_equal_the_hugging_face_model(model: Any, hf: Any) -> None:
    for side in ("left", "right"):
        out = mp.run(model, list(PAIR), logit_positions="all", padding_side=side)  # type: ignore[arg-type]
        for b, prompt in enumerate(PAIR):
            real = out.batch.attention_mask[b].bool()
            want = _hf_logits(hf, _ids(model, prompt))
            diff = float((out.logits[b][real] - want).abs().max())
            print(f"{model_adapter(model).kind} vs HF logits, {side} padding: {diff:.2g}")
            assert diff <= 1e-4
    assert model.tokenizer.decode([int(out.logits[0, -1].argmax())]) == " Paris"


def test_every_site_kind_equals_the_hugging_face_modules(model: Any, hf: Any) -> None:
    adapter = model_adapter(model)
    ids = _ids(model, PAIR[0])
    layers = (0, 14, 29)
    sites = [adapter.hook_name(k, layer) for layer in layers for k in _KINDS]
    out = mp.run(model, PAIR[0], capture=sites, logit_positions=-1)
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for layer in layers:
        block = hf.model.layers[layer]
        handles += [
            block.self_attn.register_forward_hook(
                lambda m, a, o, layer=layer: seen.update({(layer, "attn_out"): o[0][0]})
            ),
            block.mlp.register_forward_hook(
                lambda m, a, o, layer=layer: seen.update({(layer, "mlp_out"): o[0]})
            ),
            block.self_attn.o_proj.register_forward_pre_hook(
                lambda m, a, layer=layer: seen.update({(layer, "head"): a[0][0]})
            ),
        ]
    try:
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:
        pre = hidden[layer][0]
        mid = pre + seen[layer, "attn_out"]
        ref = {
            "resid_pre": pre,
            "attn_out": seen[layer, "attn_out"],
            "resid_mid": mid,
            "mlp_out": seen[layer, "mlp_out"],
            "resid_post": mid + seen[layer, "mlp_out"],
            "head": seen[layer, "head"].reshape(pre.shape[0], adapter.n_heads, adapter.d_head),
        }
        for kind in _KINDS:
            ours = out[adapter.hook_name(kind, layer)][0]
            scale = max(1.0, float(ref[kind].abs().max()))  # residual norms grow to ~1000
            assert float((ours - ref[kind]).abs().max()) <= 1e-5 * scale + 1e-5, (layer, kind)


_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head")


def test_lens_numbers_equal_the_hugging_face_model(model: Any, hf: Any) -> None:
    lens = mp.logit_lens(model, list(PAIR), positions=-1, targets=list(ANSWERS))
    answers = _answer_ids(model)
    for b, prompt in enumerate(PAIR):
        with torch.no_grad():
            hidden = hf(_ids(model, prompt), output_hidden_states=True).hidden_states
            n = len(hidden) - 1  # HF applied the final norm to its last hidden state already
            states = [hf.model.norm(hidden[i + 1]) if i < n - 1 else hidden[n] for i in range(n)]
            logprobs = torch.stack([hf.lm_head(h)[0, -1].double().log_softmax(-1) for h in states])
        final = logprobs[-1]
        for layer in range(n):
            lp = logprobs[layer].double()
            entropy = float(-(lp.exp() * lp).sum())
            kl = float((final.exp() * (final - lp)).sum())
            assert lens.entropy[b, layer, 0] == pytest.approx(entropy, abs=STAT_ATOL)
            assert lens.kl_to_final[b, layer, 0] == pytest.approx(kl, abs=STAT_ATOL)
            assert lens.target_logprob[b, layer, 0] == pytest.approx(
                float(lp[answers[b]]), abs=1e-4
            )
    assert lens.target_rank[0, -1, 0] == 0  # the model answers " Paris" at its last layer


def test_patching_numbers_equal_the_hugging_face_model(model: Any, hf: Any) -> None:
    """FFN-output patching at the last token of every layer, against the same patch done on the
    Hugging Face modules one layer at a time."""
    clean, corrupt = PAIR
    paris, warsaw = _answer_ids(model)
    result = mp.patch(model, clean, corrupt, "mlp_out", -1, mp.logit_diff(paris, warsaw))
    clean_mlp: dict[int, torch.Tensor] = {}
    hooks = {
        layer: (
            hf.model.layers[layer].mlp,
            lambda m, a, o, layer=layer: clean_mlp.update({layer: o[0, -1].clone()}),
        )
        for layer in range(30)
    }
    clean_logits = _hf_logits(hf, _ids(model, clean), hooks)[-1]
    assert result.clean[0] == pytest.approx(
        float(clean_logits[paris] - clean_logits[warsaw]), abs=1e-4
    )

    def write(layer: int) -> Any:
        def fn(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            output[0, -1] = clean_mlp[layer]
            return output

        return fn

    want = []
    for layer in range(30):
        logits = _hf_logits(
            hf, _ids(model, corrupt), {0: (hf.model.layers[layer].mlp, write(layer))}
        )
        want.append(float(logits[-1, paris] - logits[-1, warsaw]))
    np.testing.assert_allclose(result.values[:, 0], want, atol=1e-4)
    assert max(want) - min(want) > 1.0  # some layers matter: the comparison is not of constants


def test_erasure_numbers_equal_the_hugging_face_model(model: Any, hf: Any) -> None:
    """A projection written into the residual stream at layer 20 (the erasure hook) moves the
    model's logits exactly as projecting the Hugging Face block's output does."""
    basis = torch.linalg.qr(torch.randn(576, 16, generator=torch.Generator().manual_seed(0)))[0]
    layer = 20
    out = mp.run(model, list(PAIR), {mp.Site("resid_post", layer): mp.Project(remove=basis.T)})

    def project(module: Any, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden - (hidden @ basis) @ basis.T
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    for b, prompt in enumerate(PAIR):
        want = _hf_logits(hf, _ids(model, prompt), {0: (hf.model.layers[layer], project)})
        plain = _hf_logits(hf, _ids(model, prompt))
        real = out.batch.attention_mask[b].bool()
        assert float((want - plain).abs().max()) > 0.1  # the erasure changes the logits
        assert float((out.logits[b][real] - want).abs().max()) <= 1e-4


@needs_hooked
def test_both_kinds_give_the_same_numbers(smollm2: Any, smollm2_hooked: Any) -> None:
    """TransformerLens 3.x's bridge and HookedTransformer side by side: lens, patching, amnesic,
    head scores and direct logit attribution."""
    both = (smollm2, smollm2_hooked)
    lens = [mp.logit_lens(m, list(PAIR), positions=[-2, -1], targets=list(ANSWERS)) for m in both]
    for field in ("top_probs", "target_logprob"):
        np.testing.assert_allclose(getattr(lens[1], field), getattr(lens[0], field), atol=1e-4)
    for field in ("entropy", "kl_to_final"):
        np.testing.assert_allclose(getattr(lens[1], field), getattr(lens[0], field), atol=STAT_ATOL)
    # A rank counts the logits above the target's: where the target sits in the vocabulary's
    # dense bulk (rank ~32,000 at an early layer), logits lie closer together than the kinds'
    # 1e-4 agreement and neighbours swap (32525 against 32526 on an AVX2 CPU). The top ranks,
    # which the lens is read for, are exact.
    ranks = [np.asarray(r.target_rank) for r in lens]
    top = ranks[0] < 100
    np.testing.assert_array_equal(ranks[1][top], ranks[0][top])
    np.testing.assert_allclose(ranks[1], ranks[0], rtol=1e-3)
    paris, warsaw = _answer_ids(smollm2)
    patched = [
        mp.patch(m, PAIR[0], PAIR[1], "resid_pre", "all", mp.logit_diff(paris, warsaw),
                 layers=range(0, 30, 3))
        for m in both
    ]  # fmt: skip
    np.testing.assert_allclose(patched[1].values, patched[0].values, atol=1e-4)
    metric = mp.logit_diff(paris, warsaw)
    for kind in ("head", "v"):  # query heads, and SmolLM2's 3 key/value heads per layer
        heads = [
            mp.patch(m, PAIR[0], PAIR[1], kind, -1, metric, layers=[20, 25], n_random=1)
            for m in both
        ]
        assert heads[0].values.shape == (2 * (9 if kind == "head" else 3), 1)
        np.testing.assert_allclose(heads[1].values, heads[0].values, atol=1e-4)
        np.testing.assert_allclose(heads[1].random, heads[0].random, atol=1e-4)
    grads = [
        mp.attribution_patch(m, PAIR[0], PAIR[1], "mlp_out", "all", metric, n_random=1)
        for m in both
    ]
    np.testing.assert_allclose(grads[1].values, grads[0].values, atol=1e-3)
    hook = "blocks.20.hook_resid_post"
    data = mp.country_dataset(n_countries=5, shots=(0, 1), seed=0)
    acts = mp.collect(smollm2, data, [hook])
    projection = mp.leace(acts.layer(0), acts.labels)
    task = mp.load_task("capitals").with_shots(3).subset(5, seed=0)
    records = [
        mp.amnesic(
            m, mp.Site("resid_post", 20), projection, task=task, text=list(PAIR),
            positions=-1, n_random=1, mlp=False,
        ).headline()
        for m in both
    ]  # fmt: skip
    for key in ("lm_kl", "random_control_lm_kl", "task_accuracy_before", "task_accuracy_after"):
        assert records[1][key] == pytest.approx(records[0][key], abs=1e-4), key
    scores = [mp.head_scores(m, seq_len=20, n_prompts=3, progress=False) for m in both]
    assert scores[1].tokens[0].tolist() == scores[0].tokens[0].tolist()
    np.testing.assert_allclose(scores[1].scores, scores[0].scores, atol=1e-4)
    direct = [
        mp.direct_logit_attribution(m, list(PAIR), metric, heads=True, positions=-2) for m in both
    ]
    np.testing.assert_allclose(direct[1].attributions, direct[0].attributions, atol=1e-3)


@needs_hooked
def test_default_processing_moves_raw_logits_not_probabilities(
    smollm2_hooked: Any, hf: Any
) -> None:
    """HookedTransformer.from_pretrained's default processing (fold layer norm, centre the
    unembedding) changes SmolLM2's raw logits by a constant per position: said here, and shown that
    probabilities, lens statistics and logit differences stay those of the unprocessed model."""
    processed = mp.load_model(kind="hooked", process_weights=True)
    assert model_adapter(processed).weights_processed
    ids = _ids(processed, PAIR[0])
    with torch.no_grad():
        logits = processed(ids)[0]
    shift = logits - _hf_logits(hf, ids)
    print(f"processed - HF raw logits: up to {float(shift.abs().max()):.3g}")
    assert float(shift.abs().max()) > 0.1
    assert float((shift - shift.mean(-1, keepdim=True)).abs().max()) < 1e-3
    torch.testing.assert_close(
        logits.log_softmax(-1), _hf_logits(hf, ids).log_softmax(-1), atol=1e-4, rtol=0
    )
    lens = [
        mp.logit_lens(m, list(PAIR), positions=-1, targets=list(ANSWERS))
        for m in (smollm2_hooked, processed)
    ]
    np.testing.assert_allclose(lens[1].target_logprob, lens[0].target_logprob, atol=1e-4)
    np.testing.assert_allclose(lens[1].kl_to_final, lens[0].kl_to_final, atol=STAT_ATOL)
    paris, warsaw = _answer_ids(processed)
    patched = [
        mp.patch(m, PAIR[0], PAIR[1], "mlp_out", -1, mp.logit_diff(paris, warsaw))
        for m in (smollm2_hooked, processed)
    ]
    np.testing.assert_allclose(patched[1].values, patched[0].values, atol=1e-4)
