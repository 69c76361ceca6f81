"""Causal tracing with noise against the loop a user would write: one hooked forward pass per
(state, position, noise sample), with the same noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import mechprobe as mp
from tests.conftest import hook_count

PROMPT, SUBJECT = "The cat sat on a mat", "cat"


def _loop(model, prompt, subject, kind, window, n_noise, level, seed, answer):
    """ROME by hand: noise the subject's embeddings, restore one state (or a window of MLP
    outputs) from the clean run, read the answer's probability; one forward pass per cell."""
    tokens = model.to_tokens(prompt)
    start, stop = mp.patching._tracing.subject_span(model, prompt, subject)
    noise = mp.trace_noise(tokens[0], n_noise, stop - start, model.cfg.d_model, level, seed=seed)
    n_layers, seq = model.cfg.n_layers, tokens.shape[1]
    out = np.zeros((n_noise, n_layers, seq))
    corrupted = np.zeros(n_noise)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        for k in range(n_noise):

            def corrupt(emb, hook, k=k):
                emb = emb.clone()
                emb[0, start:stop] += noise[k]
                return emb

            logits = model.run_with_hooks(tokens, fwd_hooks=[("hook_embed", corrupt)])
            corrupted[k] = float(logits[0, -1].softmax(-1)[answer])
            for layer in range(n_layers):
                if kind in ("mlp_out", "attn_out") and window > 1:
                    lo, hi = (
                        max(0, layer - window // 2),
                        min(n_layers, layer + (window - 1) // 2 + 1),
                    )
                    restored = range(lo, hi)
                else:
                    restored = [layer]
                for p in range(seq):

                    def restore(act, hook, p=p):
                        act = act.clone()
                        act[0, p] = cache[hook.name][0, p]
                        return act

                    hooks = [("hook_embed", corrupt)]
                    hooks += [(f"blocks.{r}.hook_{kind}", restore) for r in restored]
                    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
                    out[k, layer, p] = float(logits[0, -1].softmax(-1)[answer])
    return out, corrupted


@pytest.mark.parametrize(("kind", "window"), [("resid_post", 1), ("mlp_out", 2), ("attn_out", 3)])
def test_equals_the_hand_written_loop(tiny, kind, window):
    res = mp.causal_trace(tiny, PROMPT, SUBJECT, sites=kind, window=window, n_noise=3, n_random=1)
    with torch.no_grad():
        answer = int(tiny(tiny.to_tokens(PROMPT))[0, -1].argmax())  # ROME: the model's own top
    assert res.answers == tuple(
        mp.core.token_texts(tiny.tokenizer, [answer])
    ) and res.answer_ids == (answer,)
    loop, corrupted = _loop(tiny, PROMPT, SUBJECT, kind, window, 3, res.noise_level, 0, answer)
    np.testing.assert_allclose(res.corrupted[0], corrupted, atol=1e-6)
    np.testing.assert_allclose(res.scores[0][0], loop.mean(0), atol=1e-6)
    np.testing.assert_allclose(res.noise_sd[0][0], loop.std(0), atol=1e-6)
    assert np.abs(res.indirect_effect(0)).max() > 1e-3


def test_invariants_and_the_noise_scale(tiny):
    res = mp.causal_trace(tiny, [PROMPT, "A dog ran"], ["cat", "dog"], n_noise=2, n_random=2)
    start, stop = res.subjects[0]
    assert res.tokens[0][start:stop] == tuple("cat")  # the byte-level tiny tokenizer
    for i in range(2):
        a, _ = res.subjects[i]
        # Before the subject nothing is noised: restoring changes nothing.
        np.testing.assert_allclose(res.indirect_effect(i)[..., :a], 0.0, atol=1e-7)
        # The last block's output at the last token is all the logits depend on.
        k = res.kinds.index("resid_post")
        np.testing.assert_allclose(res.scores[i][k, -1, -1], res.clean[i], atol=1e-6)
    assert res.clean.mean() > res.corrupted.mean()
    # The noise is 3 x the standard deviation of the subjects' embeddings (ROME's scale).
    with torch.no_grad():
        embeds = torch.cat(
            [
                tiny.embed(tiny.to_tokens(p))[0, a:b]
                for p, (a, b) in zip([PROMPT, "A dog ran"], res.subjects, strict=True)
            ]
        )
    np.testing.assert_allclose(res.noise_level, 3 * float(embeds.double().std()), rtol=1e-5)
    assert res.by_category().shape == (3, 3, 6)
    assert np.isfinite(res.by_category(random=True)).all()


def test_romes_noise_level_is_three_sds_of_the_subjects_embeddings_alone(tiny):
    """ROME's collect_embedding_std, written out: each subject tokenized alone (no BOS), the
    token embeddings pooled, 3 x their standard deviation; past 256 tokens the subjects run in
    several rows, which changes nothing."""
    subjects = ["cat", "Paris", "the quick brown fox"]
    with torch.no_grad():
        ids = [tiny.to_tokens(s, prepend_bos=False)[0] for s in subjects]
        pooled = torch.cat([tiny.embed(t[None])[0] for t in ids])
    expected = 3 * float(pooled.double().std())
    assert mp.trace_noise_level(tiny, subjects) == pytest.approx(expected, rel=1e-6)
    assert mp.trace_noise_level(tiny, subjects, factor=1.0) == pytest.approx(expected / 3)
    many = subjects * 40  # 1,080 tokens: five rows
    assert mp.trace_noise_level(tiny, many) == pytest.approx(
        3 * float(pooled.repeat(40, 1).double().std()), rel=1e-6
    )
    level = mp.trace_noise_level(tiny, subjects)
    res = mp.causal_trace(tiny, PROMPT, "cat", noise=level, n_noise=2, n_random=0)
    assert res.noise_level == level
    for bad in ([], [3], ""):
        with pytest.raises(ValueError):
            mp.trace_noise_level(tiny, bad)


def test_chunking_does_not_change_anything(tiny, cell_packing):
    from mechprobe.patching._engine import packing_works

    packs = packing_works(tiny)  # False on a HookedTransformer: chunking alone is compared
    runs = [
        mp.causal_trace(tiny, PROMPT, SUBJECT, n_noise=2, n_random=2, cells_per_batch=n, packed=p)
        for n, p in [(7, packs), (1000, packs), (50, False)]
    ]
    for other in runs[1:]:
        for a, b in zip(runs[0].scores + runs[0].random, other.scores + other.random, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.filterwarnings("ignore:causal_trace traces")  # char-level answers
def test_a_task_gives_prompts_subjects_and_answers(tiny, tmp_path):
    task = mp.load_task("capitals").with_shots(0).subset([0, 1])
    res = mp.causal_trace(tiny, task, sites="mlp_out", window=1, n_noise=2, n_random=1)
    assert res.answers == tuple(task.answers())
    assert ["".join(t[a:b]) for t, (a, b) in zip(res.tokens, res.subjects, strict=True)] == (
        task.inputs()
    )
    back = mp.TraceResult.load(res.save(tmp_path / "trace.json"))
    for a, b in zip(back.scores, res.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    assert back.subjects == res.subjects and back.tokens == res.tokens
    frame = res.to_frame()
    assert len(frame) == sum(s.size for s in res.scores)
    assert set(frame["category"]) >= {"last token", "first subject token"}
    assert len(res.plot().axes) == 2 and len(res.summary()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subjects": "dog"}, "not in the prompt"),
        ({"subjects": ["cat", "cat"]}, "one per prompt"),
        ({"sites": "head"}, "state kinds"),
        ({"window": 0}, "window"),
        ({"noise": -1.0}, "noise"),
        ({"n_noise": 0}, "n_noise"),
        # The answers were recorded in the result, unscored (and of any count).
        ({"answers": " x", "metric": mp.answer_prob(5)}, "answers= .* or metric=, not both"),
        ({"answers": True}, "strings or token ids, got bool"),
        ({"answers": 1.5}, "strings or token ids, got float"),  # was "'float' ... not iterable"
        ({"answers": -1}, "token id must be between 0 and"),
        ({"answers": [10**6]}, "token id must be between 0 and"),
        ({"answers": ""}, "tokenises to nothing"),
    ],
)
def test_bad_input_fails_before_running(tiny, kwargs, message):
    before = hook_count(tiny)
    args = {"subjects": SUBJECT} | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        mp.causal_trace(tiny, PROMPT, **args)
    assert hook_count(tiny) == before


def test_one_answer_string_is_every_prompts_answer(tiny):
    prompts, subjects = ["The cat sat on the", "A dog ran to the"], ["cat", "dog"]
    args = {"sites": "mlp_out", "n_noise": 2, "window": 1, "n_random": 0}
    one = mp.causal_trace(tiny, prompts, subjects, answers="x", **args)
    each = mp.causal_trace(tiny, prompts, subjects, answers=["x", "x"], **args)
    assert one.answers == each.answers == ("x", "x")
    for a, b in zip(one.scores, each.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="3 answers for 2 prompts"):
        mp.causal_trace(tiny, prompts, subjects, answers=["x"] * 3, **args)


def test_the_token_traced_is_recorded_and_can_be_given_back(tiny):
    # The default answer is the clean top token; its text was recorded and nothing else, and a
    # byte-level token's text ("\ufffd") encodes to other tokens: given back, it traced another.
    prompts, subjects = ["The cat sat on the", "A dog ran"], ["cat", "dog"]
    args = {"sites": "resid_post", "n_noise": 2, "n_random": 0, "progress": False}
    first = mp.causal_trace(tiny, prompts, subjects, **args)
    with torch.no_grad():
        top = [int(tiny(tiny.to_tokens(p))[0, -1].argmax()) for p in prompts]
    assert first.answer_ids == tuple(top)
    again = mp.causal_trace(tiny, prompts, subjects, answers=list(first.answer_ids), **args)
    assert again.answer_ids == first.answer_ids and again.answers == first.answers
    for a, b in zip(first.scores, again.scores, strict=True):
        np.testing.assert_array_equal(a, b)
    # A longer answer is traced by its first token, as ROME; the warning names that token.
    with pytest.warns(UserWarning, match=r"' mat' -> ' '"):
        longer = mp.causal_trace(tiny, prompts, subjects, answers=" mat", **args)
    assert longer.answer_ids == (tiny.to_single_token(" "),) * 2
    assert (
        mp.causal_trace(tiny, prompts, subjects, metric=mp.answer_prob(5), **args).answer_ids
        is None
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, 2, 4, 1.0), "n_noise must be at least 1"),  # was torch's "negative dimension"
        ((2, 2, 4, float("nan")), "level must be a finite number"),  # was NaN noise
        ((2, -1, 4, 1.0), "n_tokens must be at least 0"),
    ],
)
def test_trace_noise_checks_its_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        mp.trace_noise([1, 2], *args)


def test_prompts_of_another_type_are_named():
    with pytest.raises(TypeError, match="prompts takes a string, a list of strings or a Task"):
        mp.causal_trace(mp.tiny_model(), 123, "x")  # was "'int' object is not iterable"


def test_categories_average_each_prompt_first(tiny):
    prompts = ["The cat sat on the", "The enormous hairy dog sat on the"]
    res = mp.causal_trace(tiny, prompts, ["cat", "enormous hairy dog"], answers=["m", "m"],
                          sites="resid_post", n_noise=2, n_random=0, progress=False)  # fmt: skip
    # Per prompt, the mean over its middle-subject tokens and over its further tokens; then the
    # mean over the prompts that have them (the docstring said this was ROME's: it is not, 31b S1).
    middle, further = [], []
    for i, (start, stop) in enumerate(res.subjects):
        effect = res.indirect_effect(i)
        if stop - start > 2:
            middle.append(effect[..., start + 1 : stop - 1].mean(-1))
        further.append(effect[..., stop + 1 : effect.shape[-1] - 1].mean(-1))
    ours = res.by_category()
    np.testing.assert_allclose(ours[..., 1], np.mean(middle, axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ours[..., 4], np.mean(further, axis=0), rtol=1e-12, atol=1e-15)
    first = np.mean([res.indirect_effect(i)[..., s] for i, (s, _) in enumerate(res.subjects)], 0)
    np.testing.assert_allclose(ours[..., 0], first, rtol=1e-12, atol=1e-15)
    # The summary's spread is over the same per-prompt means (it was over every position of
    # the category, so a prompt with more further tokens weighed more).
    row = res.summary().iloc[0]
    layer = res.layers.index(row["layer"])
    per_prompt = []
    for i, (start, stop) in enumerate(res.subjects):
        cats = mp.patching._tracing._categories(start, stop, len(res.tokens[i]))
        at = [p for p, names in enumerate(cats) if row["category"] in names]
        if at:
            per_prompt.append(res.indirect_effect(i)[0, layer, at].mean())
    assert len(per_prompt) == 2
    assert row["spread"] == pytest.approx(float(np.std(per_prompt, ddof=1)), rel=1e-12)


def test_categories_pooled_over_tokens_are_romes_averages(tiny):
    """ROME's notebooks/average_causal_effects.ipynb, read_knowlege, written plainly: every
    token's row of a category appended over prompts, their mean, minus the mean low score."""
    prompts = ["The cat sat on the", "The enormous hairy dog sat on the old red mat near the"]
    res = mp.causal_trace(tiny, prompts, ["cat", "enormous hairy dog"], answers=["m", "m"],
                          sites="resid_post", n_noise=2, n_random=1, progress=False)  # fmt: skip
    for random in (False, True):
        rows: dict[str, list[np.ndarray]] = {
            k: [] for k in ("first", "middle", "last subject", "subsequent", "further", "last")
        }
        low = []
        for i, (first_e, last_e) in enumerate(res.subjects):  # ROME's e_range, end exclusive
            scores = (res.random if random else res.scores)[i]
            low.append(res.corrupted[i].mean())
            rows["first"].append(scores[..., first_e])
            rows["middle"] += [scores[..., t] for t in range(first_e + 1, last_e - 1)]
            rows["last subject"].append(scores[..., last_e - 1])
            rows["subsequent"].append(scores[..., last_e])
            rows["further"] += [scores[..., t] for t in range(last_e + 1, scores.shape[-1] - 1)]
            rows["last"].append(scores[..., -1])
        pooled = res.by_category(random, pool="token")
        for c, name in enumerate(rows):  # CATEGORIES' order
            rome = np.mean(rows[name], axis=0) - np.mean(low)
            np.testing.assert_allclose(pooled[..., c], rome, rtol=1e-12, atol=1e-15)
    # the prompt-first average differs on the many-token categories (6 and 9 further tokens)
    assert not np.allclose(pooled[..., 4], res.by_category(True)[..., 4], atol=1e-9)
    with pytest.raises(ValueError, match="pool must be 'prompt' or 'token'"):
        res.by_category(pool="rome")  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore:causal_trace traces")  # char-level answers
def test_a_tasks_subject_is_its_argument_not_its_whole_input(tiny):
    """An extractive item's input is a sentence and a question; the subject is the argument."""
    task = mp.load_task("capitals_extractive").with_shots(0).subset([0, 1])
    res = mp.causal_trace(tiny, task, sites="mlp_out", window=1, n_noise=2, n_random=1)
    noised = ["".join(t[a:b]).strip() for t, (a, b) in zip(res.tokens, res.subjects, strict=True)]
    assert noised == [a.strip() for a in task.arguments()]  # Afghanistan, Albania
    # Its last occurrence: in the question, after the sentence that gives the answer.
    after = ["".join(t[b:]) for t, (_, b) in zip(res.tokens, res.subjects, strict=True)]
    assert all(text.startswith("?") for text in after)


def test_a_prompts_trace_does_not_depend_on_its_place_in_the_list(tiny):
    prompts, subjects = ["The cat sat on a mat", "A dog ran far away"], ["cat", "dog"]
    kwargs = dict(sites="mlp_out", n_noise=3, n_random=2, noise=0.5, window=1, progress=False)
    both = mp.causal_trace(tiny, prompts, subjects, **kwargs)
    swapped = mp.causal_trace(tiny, prompts[::-1], subjects[::-1], **kwargs)
    alone = mp.causal_trace(tiny, prompts[1], subjects[1], **kwargs)
    for field in ("scores", "random"):  # the random controls too
        got = getattr(both, field)
        np.testing.assert_allclose(got[0], getattr(swapped, field)[1], atol=1e-6, err_msg=field)
        np.testing.assert_allclose(got[1], getattr(swapped, field)[0], atol=1e-6, err_msg=field)
        np.testing.assert_allclose(got[1], getattr(alone, field)[0], atol=1e-6, err_msg=field)
    with pytest.raises(TypeError, match="token ids"):
        mp.trace_noise(0, 2, 1, 8, 1.0)


def test_traces_of_split_prompts_join_into_one_run(tiny, tmp_path):
    prompts = ["The cat sat on a mat", "A dog ran far away", "My bird sang"]
    subjects = ["cat", "dog", "bird"]
    kwargs = dict(sites="mlp_out", n_noise=3, n_random=2, noise=0.5, window=1, progress=False)
    whole = mp.causal_trace(tiny, prompts, subjects, **kwargs)
    first = mp.causal_trace(tiny, prompts[:2], subjects[:2], **kwargs)
    saved = mp.TraceResult.load(first.save(tmp_path / "first.json"))
    joined = mp.TraceResult.concat(
        [saved, mp.causal_trace(tiny, prompts[2], subjects[2], **kwargs)]
    )
    for field in ("scores", "noise_sd", "random"):
        for got, want in zip(getattr(joined, field), getattr(whole, field), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=field)
    np.testing.assert_allclose(joined.corrupted, whole.corrupted, atol=1e-6)
    assert joined.subjects == whole.subjects and joined.tokens == whole.tokens
    np.testing.assert_allclose(joined.by_category(), whole.by_category(), atol=1e-6)
    # The default noise level comes from each call's subjects: parts without noise= differ.
    default = {k: v for k, v in kwargs.items() if k != "noise"}
    parts = [
        mp.causal_trace(tiny, p, s, **default)
        for p, s in zip(prompts[:2], subjects[:2], strict=True)
    ]
    with pytest.raises(ValueError, match="pass the same noise="):
        mp.TraceResult.concat(parts)
    with pytest.raises(TypeError, match="takes TraceResults"):
        mp.TraceResult.concat([])
    # Parts with other numbers of random controls average other draws (none: NaN controls).
    assert whole.n_random == 2 and saved.n_random == 2 and joined.n_random == 2
    bare = mp.causal_trace(tiny, prompts[2], subjects[2], **(kwargs | {"n_random": 0}))
    with pytest.raises(ValueError, match="n_random=0, part 0 2"):
        mp.TraceResult.concat([first, bare])


def test_the_figure_compares_kinds_on_one_scale_and_shows_harm(tiny):
    # Each panel had its own scale (a 0.09 MLP cell as dark as a 0.18 residual one), and vmin=0
    # painted negative effects (restoring hurt) white, as zero.
    from matplotlib.colors import TwoSlopeNorm

    res = mp.causal_trace(tiny, PROMPT, SUBJECT, n_noise=2, n_random=1, progress=False)
    grid = res.indirect_effect(0)
    assert grid.min() < 0 < grid.max()  # this trace has both signs
    fig = res.plot()
    images = [axis.images[0] for axis in fig.axes if axis.images]
    assert len(images) == 3 and len(fig.axes) == 4  # three panels, one colour bar
    for image, k in zip(images, range(3), strict=True):
        np.testing.assert_allclose(image.get_array(), grid[k].T)
        assert isinstance(image.norm, TwoSlopeNorm) and image.norm.vcenter == 0
        # Symmetric: a small harm is a pale colour, not the deepest (vmin was the minimum).
        reach = max(grid.max(), -grid.min())
        assert (image.norm.vmin, image.norm.vmax) == (pytest.approx(-reach), pytest.approx(reach))
    assert fig.get_suptitle().endswith("; * marks the noised subject's tokens")
    assert res.summary()["spread"].isna().all()  # over one prompt: undefined, it read 0
    # A category no prompt has (one-token subjects: no middle token) is grey, not white as 0
    two = mp.causal_trace(tiny, ["A cat sat", "A dog ran"], ["c", "d"], n_noise=2, n_random=1)
    image = two.plot().axes[0].images[0]
    middle = list(mp.patching._tracing.CATEGORIES).index("middle subject tokens")
    assert np.isnan(np.asarray(image.get_array(), dtype=float)[middle]).all()
    assert image.cmap.get_bad().tolist() == [0.85, 0.85, 0.85, 1.0]
    assert two.plot().get_suptitle().endswith("; grey: no such token in any prompt")
    own = res.plot(shared=False)
    assert len(own.axes) == 6
    assert own.axes[0].images[0].norm.vmax == pytest.approx(grid[0].max())


def test_joined_traces_keep_their_model_and_refuse_another(tiny):
    # TraceResult.concat dropped model_name ("") and joined traces of two models (review 20c).
    def trace(model, prompt):
        return mp.causal_trace(
            model, prompt, "cat", sites="mlp_out", n_noise=2, n_random=1, noise=0.5
        )

    one, two = trace(tiny, "The cat sat on the"), trace(tiny, "A cat ran to the")
    joined = mp.TraceResult.concat([one, two])
    assert joined.model_name == tiny.cfg.model_name
    # A part saved before results recorded the model joins any part.
    old = dataclasses.replace(two, model_name="")
    assert mp.TraceResult.concat([old, one]).model_name == tiny.cfg.model_name
    other = dataclasses.replace(two, model_name="another model")
    with pytest.raises(ValueError, match="part 1 has model_name='another model'"):
        mp.TraceResult.concat([one, other])
    patched = mp.patch(tiny, "A cat", "A bat", "mlp_out", -1, mp.logit_diff(1, 2))
    with pytest.raises(ValueError, match="part 1 has model_name='another model'"):
        mp.PatchResult.concat([patched, dataclasses.replace(patched, model_name="another model")])
    # The same for the model's dtype: a bfloat16 run's scores are not a float32 run's.
    assert joined.model_dtype == "float32"
    assert mp.TraceResult.concat([dataclasses.replace(one, model_dtype=""), two]).model_dtype == (
        "float32"
    )
    half = dataclasses.replace(two, model_dtype="bfloat16")
    differ = r"model_dtype='bfloat16', part 0 'float32'; .* one dtype"
    with pytest.raises(ValueError, match=differ):
        mp.TraceResult.concat([one, half])
    with pytest.raises(ValueError, match=differ):
        mp.PatchResult.concat([patched, dataclasses.replace(patched, model_dtype="bfloat16")])


def test_a_subject_inside_another_word_is_warned_of(tiny):
    # Review 26b L6: causal_trace(m, "concatenate this", "cat") noised part of "concatenate",
    # as ROME's substring match does, without a word.
    from mechprobe.patching._tracing import subject_span

    with pytest.warns(UserWarning, match=r"'cat' is part of the word 'concatenate' of the prompt"):
        assert subject_span(tiny, "please concatenate this", "cat") == (11, 14)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        subject_span(tiny, "The Eiffel Tower is in", "Eiffel Tower")
        subject_span(tiny, "Is it the U.S.A.?", "U.S.A.")
        subject_span(tiny, "Q: What is the capital of Poland?", " Poland")


@pytest.mark.parametrize(
    "ids", [[1.5, 2.0, 3.0], [True, False], [[1, 2, 3]], torch.tensor([1.0, 2.0])]
)
def test_trace_noise_takes_one_prompts_integer_ids(ids):
    # Review 26b L5: float ids hashed like ints ([1.0, 2.0, 3.0] gave [1, 2, 3]'s noise), bools
    # were taken and a batch of one row read as its row.
    with pytest.raises(TypeError, match="trace_noise takes one prompt's token ids, a 1-d list"):
        mp.trace_noise(ids, 2, 1, 4, 1.0)
    assert mp.trace_noise(torch.tensor([1, 2, 3]), 2, 1, 4, 1.0).equal(
        mp.trace_noise([1, 2, 3], 2, 1, 4, 1.0)
    )


def test_a_traces_titles_name_the_answer_traced(tiny):
    # Review 26a F10: the suptitle read "answer_prob: clean 0.304 ..." and the colour bars
    # "indirect effect on answer_prob": which answer, the figure did not say.
    trace = mp.causal_trace(tiny, ["ab cd"], subjects=["ab"], answers=["x"], n_noise=2,
                            progress=False)  # fmt: skip
    fig = trace.plot()
    assert fig.get_suptitle().startswith("p('x'): clean ")
    assert fig.axes[-1].get_ylabel() == "indirect effect on p('x')"
    own = mp.causal_trace(tiny, ["ab cd"], subjects=["ab"], metric=lambda lg: lg[:, 5],
                          n_noise=2, progress=False)  # fmt: skip
    assert own.plot().get_suptitle().startswith("<lambda>: clean ")


def test_every_field_has_its_own_attribute_entry():
    # "metric: The metric's name. seed: seed of the noise ..." rendered as one attribute,
    # leaving seed undocumented (review 28a D4); so did "kinds: ...; ``layers`` the layers".
    import inspect
    import re

    doc = inspect.getdoc(mp.TraceResult) or ""
    section = doc.split("Attributes:\n", 1)[1].split("\n\n", 1)[0]
    entries = set(re.findall(r"^    (\w+):", section, flags=re.M))
    fields = {f.name for f in dataclasses.fields(mp.TraceResult)}
    assert fields <= entries, f"no entry of their own: {sorted(fields - entries)}"
