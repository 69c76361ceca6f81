"""Greedy generation with interventions, against Hugging Face's own cached ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_of, hook_count

import mechprobe as mp
from mechprobe.core import _models

PROMPTS = ["Hi", "Hello there"]
STEPS = 6


def _decoder_layer(hf, layer: int) -> torch.nn.Module:
    body = getattr(hf, "model", None) or hf.transformer
    return (body.layers if hasattr(body, "layers") else body.h)[layer]


def _hf_greedy(
    hf, ids: torch.Tensor, edit=None, layer: int = 1, steps: int = STEPS
) -> tuple[list[int], np.ndarray, float]:
    """Hugging Face's cached greedy generation of one prompt, with ``edit(hidden, prefill)``
    applied to decoder layer ``layer``'s output on every call; ``(tokens, log-probs of the
    tokens, smallest gap between the top two logits)``."""
    handle = None
    if edit is not None:

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = edit(hidden.clone(), prefill=hidden.shape[1] > 1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = _decoder_layer(hf, layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=steps,
                min_new_tokens=steps,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                pad_token_id=2,
            )
    finally:
        if handle is not None:
            handle.remove()
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    logits = torch.stack(out.logits)[:, 0].double()  # [steps, vocab], before any processor
    logp = torch.log_softmax(logits, dim=-1)
    top2 = logits.topk(2, dim=-1).values
    return (
        tokens,
        logp[torch.arange(len(tokens)), tokens].numpy(),
        float((top2[:, 0] - top2[:, 1]).min()),
    )


def _fresh_hf(model):
    """A Hugging Face model with the tiny model's weights, untouched by TransformerLens: the
    bridge wraps its own Hugging Face model's modules, whose key/value cache then stays empty
    (the TransformerLens 4.3 pitfall this module works around)."""
    arch = hf_of(model).config.model_type
    fresh = _models._tiny_hf(0, model.cfg.n_layers, model.cfg.d_model, arch)[0]
    ids = model.to_tokens(PROMPTS[1])
    with torch.no_grad():  # the same weights: the same logits
        torch.testing.assert_close(fresh(ids).logits, model(ids), atol=1e-5, rtol=0)
    return fresh


def _check_equal(res: mp.GenerationResult, model, edit=None) -> None:
    hf = _fresh_hf(model)
    for i, prompt in enumerate(PROMPTS):
        tokens, logp, gap = _hf_greedy(hf, model.to_tokens(prompt), edit)
        # Token equality is meaningful only where no two logits nearly tie (float32 rounding of
        # a cached and a recomputed pass differ by ~1e-6): the prompts here keep gaps above 1e-3.
        assert gap > 1e-3
        assert res.tokens[i].tolist() == tokens
        np.testing.assert_allclose(res.logprobs[i], logp, atol=1e-4)
        assert res.finished[i] == "length"


def test_greedy_equals_hugging_faces_cached_generate(tiny):
    """The whole sequence recomputed per token (batched, left-padded) gives the tokens and
    log-probabilities of Hugging Face's generation with its key/value cache, one prompt at a
    time."""
    res = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS, stop_at_eos=False, progress=False)
    _check_equal(res, tiny)
    one = mp.generate(tiny, PROMPTS[1], max_new_tokens=STEPS, stop_at_eos=False, batch_size=1)
    assert one.tokens[0].tolist() == res.tokens[1].tolist()


def test_an_edit_at_the_prompts_last_token_is_made_once_as_in_a_cached_generation(tiny):
    """positions=-1 counts in the prompt: its last token carries the edit at every step, as a
    cached generation that edited it in the prefill pass and kept it; generated tokens do not."""
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 8
    spec = {mp.Site("resid_post", 1): mp.Add(v, positions=-1)}
    res = mp.generate(tiny, PROMPTS, spec, max_new_tokens=STEPS, stop_at_eos=False)

    def edit(hidden, prefill):
        if prefill:
            hidden[:, -1] += v
        return hidden

    _check_equal(res, tiny, edit)
    plain = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS, stop_at_eos=False)
    assert any(a.tolist() != b.tolist() for a, b in zip(res.tokens, plain.tokens, strict=True))
    # The site's own positions mean the same as the intervention's.
    on_site = {mp.Site("resid_post", 1, positions=-1): mp.Add(v)}
    same = mp.generate(tiny, PROMPTS, on_site, max_new_tokens=STEPS, stop_at_eos=False)
    assert [t.tolist() for t in same.tokens] == [t.tolist() for t in res.tokens]


def test_an_edit_at_every_position_reaches_the_generated_tokens(tiny):
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(1)) * 8
    res = mp.generate(
        tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v)}, max_new_tokens=STEPS,
        stop_at_eos=False,
    )  # fmt: skip

    def edit(hidden, prefill):
        return hidden + v

    _check_equal(res, tiny, edit)
    # how hard it steered (the title said "Add(positions=None)")
    assert res.interventions == (
        f"resid_post@1: Add(scale=1, |v|={float(v.norm()):.3g}, positions=None)",
    )

    class Scale(mp.Intervention):  # a user's own: its "scale" is not a number
        def __init__(self, scale, positions=None):
            super().__init__(positions)
            self.scale = scale

        def edit(self, selected, hook):
            return selected * self.scale

    half = torch.full((tiny.cfg.d_model,), 0.5)
    mine = mp.generate(tiny, "Hi", {"blocks.1.hook_resid_post": Scale(half)}, max_new_tokens=2)
    assert mine.interventions == ("blocks.1.hook_resid_post: Scale(positions=None)",)
    ax = res.plot().axes[0]  # the tokens on their points: a dip is read off the figure
    assert [a.get_text() for a in ax.texts] == [
        mp.core.token_label(w, 10) for words in res.token_strings for w in words
    ]


def test_non_finite_logits_stop_generation_by_name(tiny):
    # argmax of NaN logits is token 0: a float16 overflow generated token 0 on and on, with only
    # its mean log-probability (NaN) to show for it (review 20b).
    class Overflow(mp.Intervention):  # Add refuses a NaN vector; an edit can still make one
        def edit(self, selected, hook):
            return selected * float("nan")

    mp.generate(tiny, "Hi", max_new_tokens=1)  # a bridge's first forward adds hooks of its own
    before = hook_count(tiny)
    with pytest.raises(ValueError, match=r"Prompt 0's next-token logits are not finite at step 0"):
        mp.generate(tiny, "Hi", {mp.Site("resid_post", 2): Overflow()}, max_new_tokens=3)
    assert hook_count(tiny) == before


def test_eos_and_stop_strings_end_a_completion(tiny):
    plain = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS, stop_at_eos=False)
    # The tiny model never ranks its EOS (a zero unembedding) first: make the token it
    # generates third the tokenizer's EOS instead (a property: set, then set back).
    tokenizer, eos = tiny.tokenizer, tiny.tokenizer.eos_token_id
    tokenizer.eos_token_id = int(plain.tokens[0][2])
    try:
        ended = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS)
        kept = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS, stop_at_eos=False)
    finally:
        tokenizer.eos_token_id = eos
    first = plain.tokens[0].tolist().index(int(plain.tokens[0][2]))  # it may come earlier too
    assert ended.finished[0] == "eos"
    assert ended.tokens[0].tolist() == plain.tokens[0][: first + 1].tolist()
    assert ended.completions[0] == tokenizer.decode(plain.tokens[0][:first].tolist())
    assert kept.finished[0] == "length" and len(kept.tokens[0]) == STEPS

    text = plain.completions[0]
    stop = next(c for c in text[1:] if c.isascii() and c.isprintable())
    cut = mp.generate(tiny, PROMPTS, max_new_tokens=STEPS, stop_strings=stop, stop_at_eos=False)
    assert cut.finished[0] == "stop" and cut.completions[0] == text[: text.index(stop)]
    n = len(cut.tokens[0])
    assert cut.tokens[0].tolist() == plain.tokens[0][:n].tolist() and n < STEPS
    assert cut.finished[1] in ("stop", "length")


def test_result_protocol_and_round_trip(tiny, tmp_path):
    res = mp.generate(tiny, PROMPTS, max_new_tokens=3, progress=False)
    frame = res.to_frame()
    assert len(frame) == 6 and list(res.summary()["n_tokens"]) == [3, 3]
    assert list(frame["token"]) == mp.core.token_texts(tiny.tokenizer, frame["token_id"])
    assert "prompt" in repr(res) and "<table" in res._repr_html_()
    assert len(res.plot().axes) == 1
    for suffix in (".json", ".npz"):
        back = mp.GenerationResult.load(res.save(tmp_path / f"gen{suffix}"))
        assert back.completions == res.completions and back.finished == res.finished
        assert [t.tolist() for t in back.tokens] == [t.tolist() for t in res.tokens]
        assert back.token_strings == res.token_strings
        np.testing.assert_allclose(np.concatenate(back.logprobs), np.concatenate(res.logprobs))


def test_the_legend_sits_below_the_axes_and_names_a_chat_prompt_by_its_user_turn(tiny):
    # Review 26a F7: the legend (lower right, inside) covered a completion's last steps, and a
    # chat-template prompt was named by the template's tail "…nd|>\\n<|im_start|>assistant\\n".
    import io

    from matplotlib.figure import Figure

    chat = "<|im_start|>user\nName a city & a river.<|im_end|>\n<|im_start|>assistant\n"
    res = mp.generate(tiny, [*PROMPTS, chat], max_new_tokens=4, progress=False)
    for fig in (res.plot(), Figure(figsize=(10, 4), layout="constrained")):
        ax = fig.axes[0] if fig.axes else fig.subplots(1, 2)[1]
        if ax.get_legend() is None:
            assert res.plot(ax=ax) is fig
        fig.savefig(io.BytesIO(), format="png")  # lays the figure out
        legend = ax.get_legend()
        labels = [text.get_text() for text in legend.get_texts()]
        assert labels[-1] == "Name a city & a river."
        assert legend.get_window_extent().y1 < ax.xaxis.label.get_window_extent().y0
        assert ax.yaxis.label.get_window_extent().x0 >= 0  # the layout kept the y label
    assert res.summary()["prompt_text"].iloc[-1] == "Name a city & a river."


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "message"),
    [
        ({}, {"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({}, {"stop_strings": [""]}, ValueError, "stop_strings must be non-empty"),
        ({mp.Site("mlp_out", 0): mp.Capture()}, {}, ValueError, "records no activations"),
        ({mp.Site("mlp_out", 0): mp.Ablate("mean")}, {}, ValueError, "Pass mean="),
        ({mp.Site("mlp_out", 9): mp.Ablate("zero")}, {}, ValueError, "layer"),
        ({mp.Site("mlp_out", 0): "add"}, {}, TypeError, "not an intervention"),
        (
            {mp.Site("mlp_out", 0): mp.Add(torch.ones(64), positions=-9)},
            {},
            ValueError,
            "outside prompt 1,",  # the user's index, not the row of its chunk
        ),
        ({mp.Site("mlp_out", 0): mp.Gradient()}, {}, ValueError, "runs without gradients"),
        ([mp.Add(torch.ones(64))], {}, TypeError, "must map sites to interventions"),
        ({mp.Site("mlp_out", 0): mp.Replace(torch.ones(3, 64))}, {}, ValueError, "grows"),
        (
            {mp.Site("pattern", 0, head=0): mp.Replace(torch.ones(3), positions=-1)},
            {},
            ValueError,
            "pattern's rows are as long as the sequence",
        ),
        (
            {mp.Site("pattern", 0, head=1): mp.Ablate("mean", mean=torch.ones(3))},
            {},
            ValueError,
            "pattern",
        ),
        ({}, {"top_k": 5}, ValueError, "pass temperature > 0"),
        ({}, {"top_p": 0.9}, ValueError, "pass temperature > 0"),
        ({}, {"temperature": 1.0, "top_k": 0}, ValueError, "top_k"),
        ({}, {"temperature": 1.0, "top_p": 0.0}, ValueError, "top_p"),
        ({}, {"temperature": 1.0, "top_p": 1.5}, ValueError, "top_p"),
    ],
)
def test_bad_input_fails_before_any_token(tiny, spec, kwargs, error, message):
    passes = []
    before = hook_count(tiny)
    counter = tiny.embed.register_forward_hook(lambda *_: passes.append(1))
    try:
        # One prompt per chunk, the short one second: nothing of the first may run before a
        # position outside the second is found.
        with pytest.raises(error, match=message):
            mp.generate(tiny, PROMPTS[::-1], spec, batch_size=1, progress=False, **kwargs)
    finally:
        counter.remove()
    assert hook_count(tiny) == before and not passes


def test_run_names_the_prompt_a_position_falls_outside_before_any_pass(tiny):
    passes = []
    counter = tiny.embed.register_forward_hook(lambda *_: passes.append(1))
    try:
        with pytest.raises(ValueError, match="outside prompt 2,"):
            mp.run(
                tiny,
                ["Hello there", "Hello you", "Hi"],
                {mp.Site("mlp_out", 0): mp.Add(torch.ones(64), positions=[0, -9])},
                batch_size=1,
                progress=False,
            )
    finally:
        counter.remove()
    assert not passes


def test_a_batch_generates_as_its_prompts(tiny):
    plain = mp.generate(tiny, PROMPTS, max_new_tokens=3, progress=False)
    for padding_side in ("left", "right"):
        batch = mp.tokenize(tiny, PROMPTS, padding_side=padding_side)
        res = mp.generate(tiny, batch, max_new_tokens=3, progress=False)
        assert res.prompts == plain.prompts
        assert [t.tolist() for t in res.tokens] == [t.tolist() for t in plain.tokens]
    ids = mp.Batch.from_tokens(tiny.to_tokens(PROMPTS[1]))  # no strings: decoded from the ids
    from_ids = mp.generate(tiny, ids, max_new_tokens=3, progress=False)
    assert from_ids.tokens[0].tolist() == plain.tokens[1].tolist()
    assert from_ids.prompts == (tiny.tokenizer.decode(tiny.to_tokens(PROMPTS[1])[0]),)


def test_a_one_row_replace_over_every_position_and_a_zeroed_pattern_still_generate(tiny):
    # What grows with the sequence is refused; these do not, and equal their plain-hook versions.
    spec = {
        mp.Site("resid_post", 0): mp.Replace(torch.ones(1, 64)),
        mp.Site("pattern", 1, head=2): mp.Ablate(positions=-1),
    }
    res = mp.generate(tiny, PROMPTS, spec, max_new_tokens=3, progress=False)
    for i, prompt in enumerate(PROMPTS):
        ids = tiny.to_tokens(prompt)
        n = ids.shape[1]
        for step in range(3):

            def fill(act, hook):
                act[:] = 1.0
                return act

            def zero(pattern, hook, last=n - 1):
                pattern[:, 2, last] = 0.0  # the prompt's last token's row, as it grows
                return pattern

            hooks = [("blocks.0.hook_resid_post", fill), ("blocks.1.attn.hook_pattern", zero)]
            with torch.no_grad():
                logits = tiny.run_with_hooks(ids, fwd_hooks=hooks)[0, -1]
            token = int(logits.argmax())
            assert res.tokens[i][step] == token
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


@pytest.mark.parametrize(
    ("site", "edit"),
    [
        ("blocks.0.attn.hook_pattern", mp.Replace(torch.tensor(0.05))),  # a 0-d value broadcasts
        ("blocks.0.attn.hook_attn_scores", mp.Ablate()),
        ("blocks.1.attn.hook_pattern", mp.Add(torch.tensor(0.1))),
    ],
)
def test_an_attention_map_edit_generates_as_each_prompt_alone(tiny, site, edit):
    # An edit of a whole map keeps the masked entries: a short prompt never attends to the
    # padding of its batch, in the prompt's pass or in the steps (cached or recomputed).
    prompts = ["The cat sat on the", "Hi"]
    both = mp.generate(tiny, prompts, {site: edit}, max_new_tokens=4, progress=False)
    for i, prompt in enumerate(prompts):
        alone = mp.generate(tiny, [prompt], {site: edit}, max_new_tokens=4, progress=False)
        assert both.tokens[i].tolist() == alone.tokens[0].tolist()
        np.testing.assert_allclose(both.logprobs[i], alone.logprobs[0], atol=1e-4)


def test_an_exception_mid_generation_leaves_the_model_as_it_was(tiny):
    class Fails(mp.Intervention):
        calls = 0

        def edit(self, selected, hook):
            Fails.calls += 1
            if Fails.calls == 3:
                raise RuntimeError("boom")
            return None

    before, logits = hook_count(tiny), tiny(tiny.to_tokens("Hi")).detach()
    with pytest.raises(RuntimeError, match="boom"):
        mp.generate(tiny, PROMPTS, {mp.Site("mlp_out", 0): Fails()}, max_new_tokens=5)
    assert hook_count(tiny) == before
    torch.testing.assert_close(tiny(tiny.to_tokens("Hi")).detach(), logits, rtol=0, atol=0)


@pytest.mark.integration
def test_smollm2_completes_a_capital_as_hugging_faces_cached_generation(smollm2):
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_pretrained(_models.cache_dir() / "smollm2-135m-f32")
    prompt = mp.load_task("capitals").with_shots(3).prompt("Poland")
    res = mp.generate(
        smollm2, [prompt, "The capital of Egypt is"], max_new_tokens=8, stop_strings="\n"
    )
    assert res.completions[0] == " Warsaw" and res.finished[0] == "stop"
    v = torch.randn(576, generator=torch.Generator().manual_seed(0)) * 30
    steered = mp.generate(
        smollm2, prompt, {mp.Site("resid_post", 10): mp.Add(v, positions=-1)}, max_new_tokens=8,
        stop_at_eos=False,
    )  # fmt: skip
    ids = smollm2.to_tokens(prompt)

    def edit(hidden, prefill):
        if prefill:
            hidden[:, -1] += v
        return hidden

    tokens, logp, gap = _hf_greedy(fresh, ids, edit, layer=10, steps=8)
    assert gap > 1e-3  # no near-tie: the tokens must agree
    assert steered.tokens[0].tolist() == tokens
    np.testing.assert_allclose(steered.logprobs[0], logp, atol=1e-3)


@pytest.mark.parametrize("position", [np.int64(-1), torch.tensor(-1), [-1], (-1,)])
def test_numpy_tensor_and_list_positions_work_like_ints(tiny, position):
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0)) * 8
    as_int = mp.generate(tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v, positions=-1)})
    other = mp.generate(tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v, positions=position)})
    assert [t.tolist() for t in other.tokens] == [t.tolist() for t in as_int.tokens]


def test_a_generation_longer_than_the_context_is_refused_before_any_token(tiny):
    n_ctx = int(tiny.cfg.n_ctx)
    with pytest.raises(ValueError, match=f"context of {n_ctx} tokens: lower max_new_tokens"):
        mp.generate(tiny, PROMPTS, max_new_tokens=n_ctx)


def test_samples_are_keyed_by_prompt_and_seed(tiny):
    """A prompt's sample does not depend on the prompts, batch size or order beside it; the
    second copy of a prompt is another draw; another seed draws others."""
    kw = {"max_new_tokens": STEPS, "temperature": 1.0, "stop_at_eos": False}
    both = mp.generate(tiny, ["Hi", "Hello there", "Hi"], **kw)
    alone = mp.generate(tiny, ["Hello there"], **kw)
    one_by_one = mp.generate(tiny, ["Hello there", "Hi"], batch_size=1, **kw)
    assert both.tokens[1].tolist() == alone.tokens[0].tolist() == one_by_one.tokens[0].tolist()
    assert both.tokens[0].tolist() == one_by_one.tokens[1].tolist()
    assert both.tokens[0].tolist() != both.tokens[2].tolist()  # copies draw apart
    other = mp.generate(tiny, ["Hello there"], seed=1, **kw)
    assert other.tokens[0].tolist() != alone.tokens[0].tolist()
    assert (both.temperature, both.seed) == (1.0, 0)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_sampled_first_tokens_follow_the_tempered_distribution(tiny, temperature):
    """400 copies of one prompt, one token each: every token's frequency is within four binomial
    standard deviations of ``softmax(logits / temperature)``; the recorded log-probabilities are
    the model's own (untempered)."""
    n = 400
    res = mp.generate(tiny, ["Hi"] * n, max_new_tokens=1, temperature=temperature)
    first = np.array([int(t[0]) for t in res.tokens])
    logits = mp.run(tiny, ["Hi"], logit_positions=-1).logits[0, 0].double()
    p = torch.softmax(logits / temperature, dim=-1).numpy()
    freq = np.bincount(first, minlength=len(p)) / n
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * sd + 1.0 / n), np.abs(freq - p).max()
    own = torch.log_softmax(logits, dim=-1).numpy()
    # float32 logits of a 400-row batch against one row: rounding of ~1e-6
    np.testing.assert_allclose([lp[0] for lp in res.logprobs], own[first], atol=1e-5)


def test_a_row_that_stops_early_does_not_move_the_others_positions(tiny):
    """Rows that finished keep growing in the batch (their tokens dropped), so every row's
    prompt positions stay at one offset from the end: a row stopping early raised "position
    outside prompt" for an edit at -2 a few steps later, and would have shifted the others."""
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(2)) * 8
    spec = {mp.Site("resid_post", 1): mp.Add(v, positions=-2)}
    kw = {"max_new_tokens": STEPS, "stop_at_eos": False}
    plain = mp.generate(tiny, PROMPTS, spec, **kw)
    stop = next(c for c in plain.completions[0] if c.isascii() and c.isprintable())
    early = mp.generate(tiny, PROMPTS, spec, stop_strings=stop, **kw)
    assert early.finished[0] == "stop" and len(early.tokens[0]) < STEPS
    alone = mp.generate(tiny, PROMPTS[1], spec, stop_strings=stop, **kw)
    assert early.tokens[1].tolist() == alone.tokens[0].tolist()


def test_a_replace_with_one_value_per_prompt_follows_its_prompt_through_chunks(tiny):
    """Replace values ``[prompts, 1, d]`` are cut to each chunk's rows, so batch_size=1 gives
    the batch's completions, and each prompt's completion is Hugging Face's with its own row
    written at the prompt's last token in the prefill pass."""
    values = torch.randn(2, 1, tiny.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 4
    spec = {mp.Site("resid_post", 1): mp.Replace(values, positions=-1)}
    kw = {"max_new_tokens": STEPS, "stop_at_eos": False}
    together = mp.generate(tiny, PROMPTS, spec, **kw)
    one_by_one = mp.generate(tiny, PROMPTS, spec, batch_size=1, **kw)
    assert [t.tolist() for t in one_by_one.tokens] == [t.tolist() for t in together.tokens]
    hf = _fresh_hf(tiny)
    for i, prompt in enumerate(PROMPTS):

        def edit(hidden, prefill, i=i):
            if prefill:
                hidden[:, -1] = values[i, 0]
            return hidden

        tokens, logp, gap = _hf_greedy(hf, tiny.to_tokens(prompt), edit)
        assert gap > 1e-3 and together.tokens[i].tolist() == tokens
        np.testing.assert_allclose(together.logprobs[i], logp, atol=1e-4)


def _hugging_face_distribution(logits, temperature, top_k=None, top_p=None):
    """The distribution Hugging Face's samplers draw from: its own warpers, in its order."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TemperatureLogitsWarper(temperature)(None, logits[None].float().clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return torch.softmax(scores, dim=-1)[0]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [(1.0, 1, None), (1.0, 7, None), (0.7, None, 0.5), (1.3, 20, 0.9), (1.0, None, 1.0)],
)
def test_the_sampling_distribution_is_hugging_faces(temperature, top_k, top_p):
    from mechprobe.core._generation import _sampling_distribution

    logits = torch.randn(300, generator=torch.Generator().manual_seed(3)) * 3
    logits[10] = logits[11] = logits.max() + 1  # a tie at the top
    want = _hugging_face_distribution(logits, temperature, top_k, top_p)
    got = _sampling_distribution(logits, temperature, top_k, top_p)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=0)
    if top_k == 1:  # the k-th value is tied: both tied tokens are kept
        assert int((got > 0).sum()) == 2


@pytest.mark.parametrize(("top_k", "top_p"), [(5, None), (None, 0.6)])
def test_sampled_first_tokens_follow_the_narrowed_distribution(tiny, tmp_path, top_k, top_p):
    """400 draws of one token: none outside Hugging Face's kept set, every frequency within four
    binomial standard deviations of its renormalised distribution; the setting is saved."""
    n = 400
    res = mp.generate(tiny, ["Hi"] * n, max_new_tokens=1, temperature=1.0, top_k=top_k, top_p=top_p)
    first = np.array([int(t[0]) for t in res.tokens])
    logits = mp.run(tiny, ["Hi"], logit_positions=-1).logits[0, 0].double()
    p = _hugging_face_distribution(logits, 1.0, top_k, top_p).double().numpy()
    assert (p > 0).sum() < len(p) / 4  # the narrowing matters here
    assert np.all(p[first] > 0), "a token outside the kept set was drawn"
    freq = np.bincount(first, minlength=len(p)) / n
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(freq - p) <= 4 * sd + 1.0 / n), np.abs(freq - p).max()
    back = mp.GenerationResult.load(res.save(tmp_path / "narrow.json"))
    assert (back.top_k, back.top_p) == (top_k, top_p)
    assert "top-" in res.plot().axes[0].get_title()


def test_a_token_with_a_zero_embedding_is_no_wrong_batch(tiny):
    """The end-of-sequence (and padding) token's embedding row is zero in the tiny models: the
    batch check compared directions by cosine and refused every pass holding it, so a sampled
    row ending early made the default batch size fail where batch_size=1 did not."""
    eos = tiny.tokenizer.eos_token_id
    if float(tiny.W_E[eos].abs().max()) != 0:
        pytest.skip("this tiny model's end-of-sequence embedding is not zero")
    prompts = ["Hi", "Hello there", "Hi", "abc"]
    kw = {"max_new_tokens": 6, "temperature": 1.0, "seed": 1, "progress": False}
    alone = mp.generate(tiny, prompts, batch_size=1, **kw)
    assert "eos" in alone.finished  # the case: one row stops while others go on
    together = mp.generate(tiny, prompts, **kw)
    assert [t.tolist() for t in together.tokens] == [t.tolist() for t in alone.tokens]
    text = "Hi" + tiny.tokenizer.decode([eos])
    out = mp.run(tiny, [text, "Hello there"], logit_positions=-1, progress=False)
    plain = tiny(tiny.to_tokens(text))[0, -1]
    torch.testing.assert_close(out.logits[0, 0], plain.detach(), atol=1e-5, rtol=0)
    # The check still sees a forwarded token that differs from the batch's zero-row token.
    batch = mp.tokenize(tiny, [text])
    other = batch.tokens.clone()
    other[0, -1] = 5
    edit = {mp.Site("resid_post", 0): mp.Add(torch.zeros(64))}
    with (
        pytest.raises(ValueError, match="not those of the batch"),
        mp.intervene(tiny, edit, batch=batch),
    ):
        tiny(other, attention_mask=batch.attention_mask)


def test_a_tiny_temperature_samples_the_top_token_and_no_stop_strings_is_none(tiny):
    greedy = mp.generate(tiny, PROMPTS, max_new_tokens=3, progress=False)
    cold = mp.generate(tiny, PROMPTS, max_new_tokens=3, temperature=1e-40, progress=False)
    assert [t.tolist() for t in cold.tokens] == [t.tolist() for t in greedy.tokens]
    plain = mp.generate(tiny, PROMPTS, max_new_tokens=3, stop_strings=None, progress=False)
    assert plain.completions == greedy.completions


def _kind(model) -> str:
    return mp.core.model_adapter(model).kind


def test_the_key_value_cache_gives_the_recomputed_tokens(tiny):
    """HookedTransformers generate with TransformerLens's cache by default: the same tokens and
    log-probabilities as recomputing the sequence, whatever the interventions do."""
    if _kind(tiny) != "hooked":
        with pytest.raises(ValueError, match="needs a HookedTransformer"):
            mp.generate(tiny, PROMPTS, max_new_tokens=2, use_cache=True)
        return
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(tiny.cfg.d_model, generator=gen) * 6
    basis = torch.linalg.qr(torch.randn(tiny.cfg.d_model, 3, generator=gen))[0].T
    specs = [
        {},
        {mp.Site("resid_post", 1): mp.Add(v, positions=-1)},
        {mp.Site("resid_post", 0): mp.Add(v)},  # every position, generated ones included
        {mp.Site("resid_post", 0, positions="generated"): mp.Add(v)},  # generated ones only
        {mp.Site("mlp_out", 1): mp.Project(remove=basis), mp.Site("head", 1, head=2): mp.Ablate()},
        {mp.Site("resid_pre", 2, positions=[0, -1]): mp.Replace(v)},
        {mp.Site("pattern", 1, head=0): mp.Ablate()},
    ]
    for spec in specs:
        for kwargs in ({}, {"temperature": 1.0, "seed": 3}):
            common = {"max_new_tokens": STEPS, "stop_at_eos": False, "batch_size": 2, **kwargs}
            cached = mp.generate(tiny, [*PROMPTS, "A b"], spec, **common)
            again = mp.generate(tiny, [*PROMPTS, "A b"], spec, use_cache=False, **common)
            assert [t.tolist() for t in cached.tokens] == [t.tolist() for t in again.tokens], spec
            for a, b in zip(cached.logprobs, again.logprobs, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-4)


def test_an_exception_in_a_cached_step_leaves_the_model_as_it_was(tiny):
    if _kind(tiny) != "hooked":
        pytest.skip("the key/value cache is a HookedTransformer's")

    class Fails(mp.Intervention):
        calls = 0

        def edit(self, selected, hook):
            Fails.calls += 1
            if Fails.calls == 3:  # in a cached step, after the prompt's pass
                raise RuntimeError("boom")
            return None

    tokens = tiny.to_tokens("Hi there")
    with torch.no_grad():
        before = tiny(tokens)
    hooks = hook_count(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        mp.generate(tiny, "Hi", {mp.Site("resid_post", 0): Fails()}, max_new_tokens=4)
    assert hook_count(tiny) == hooks
    with torch.no_grad():
        assert torch.equal(tiny(tokens), before)


def test_a_hook_function_indexing_positions_sees_the_whole_sequence_at_every_step(tiny):
    # With the key/value cache (a HookedTransformer's default) a function got [batch, 1, d] after
    # the prompt: act[:, 1] raised IndexError, act[:, :2] edited each new token instead.
    def second(act, hook):
        act[:, 1] = 0.0

    common = {"max_new_tokens": STEPS, "stop_at_eos": False, "progress": False}
    name = "blocks.1.hook_resid_post"
    by_function = mp.generate(tiny, "A cat sat", {name: second}, **common)
    expected = mp.generate(tiny, "A cat sat", {name: mp.Ablate(positions=[1])}, **common)
    plain = mp.generate(tiny, "A cat sat", **common)
    assert by_function.tokens[0].tolist() == expected.tokens[0].tolist()
    np.testing.assert_allclose(by_function.logprobs[0], expected.logprobs[0], atol=1e-5)
    assert not np.allclose(by_function.logprobs[0], plain.logprobs[0], atol=1e-3)


def test_an_edit_of_the_generated_tokens_leaves_the_prompt_alone(tiny):
    # Steering the response only (contrastive activation addition): positions="generated".
    v = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(4)) * 8
    common = {"max_new_tokens": STEPS, "stop_at_eos": False, "progress": False}
    res = mp.generate(tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v, positions="generated")},
                      **common)  # fmt: skip

    def edit(hidden, prefill):  # Hugging Face's cached steps: each new token, alone
        return hidden if prefill else hidden + v

    _check_equal(res, tiny, edit)
    everywhere = mp.generate(tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v)}, **common)
    assert [t.tolist() for t in res.tokens] != [t.tolist() for t in everywhere.tokens]
    on_site = {mp.Site("resid_post", 1, positions="generated"): mp.Add(v)}
    same = mp.generate(tiny, PROMPTS, on_site, **common)
    assert [t.tolist() for t in same.tokens] == [t.tolist() for t in res.tokens]
    assert res.interventions[0].endswith("positions='generated')")
    with pytest.raises(ValueError, match=r"'generated', the new tokens, is mp\.generate's"):
        mp.run(tiny, PROMPTS, {mp.Site("resid_post", 1): mp.Add(v, positions="generated")})
