from __future__ import annotations

import pytest
import torch

import mechprobe as mp

PROMPTS = ["The quick brown fox", "Hi", "A somewhat longer prompt here, with commas"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_tokenize_matches_to_tokens_row_by_row(tiny, side):
    batch = mp.tokenize(tiny, PROMPTS, padding_side=side)
    for i, prompt in enumerate(PROMPTS):
        real = batch.tokens[i][batch.attention_mask[i].bool()]
        assert torch.equal(real, tiny.to_tokens(prompt)[0])
        assert int(batch.tokens[i, batch.last_index[i]]) == int(real[-1])


def test_positions_are_per_row_and_padding_aware(tiny):
    right = mp.tokenize(tiny, ["abc", "a"], padding_side="right")
    left = mp.tokenize(tiny, ["abc", "a"], padding_side="left")
    assert right.positions(-1).tolist() == [[3], [1]]
    assert left.positions(-1).tolist() == [[3], [3]]
    assert left.positions([0, -1]).tolist() == [[0, 3], [2, 3]]
    with pytest.raises(ValueError, match="outside prompt 1"):
        right.positions(2)
    with pytest.raises(ValueError, match="different lengths"):
        right.positions("all")


def test_bad_prompts_are_rejected(tiny):
    with pytest.raises(ValueError, match="empty"):
        mp.tokenize(tiny, [])
    with pytest.raises(TypeError, match="not str"):
        mp.tokenize(tiny, ["ok", 3])  # type: ignore[list-item]


def test_targets_are_tokenised_after_the_prompt(tiny):
    batch, start, length = mp.tokenize_with_targets(tiny, ["Hi", "Hello"], [" a", " bc"])
    for i, (p, t) in enumerate([("Hi", " a"), ("Hello", " bc")]):
        row = batch.tokens[i][batch.attention_mask[i].bool()]
        n_prompt = tiny.to_tokens(p).shape[1]
        assert int(start[i]) == n_prompt and int(length[i]) == len(row) - n_prompt
        assert torch.equal(
            row[n_prompt:], torch.tensor(tiny.tokenizer(t, add_special_tokens=False)["input_ids"])
        )
    with pytest.raises(ValueError, match="one target per prompt"):
        mp.tokenize_with_targets(tiny, ["a", "b"], [" x"])


def test_chunks_trim_shared_padding(tiny):
    batch = mp.tokenize(tiny, PROMPTS, padding_side="left")
    parts = [chunk for _, chunk in batch.chunks(1)]
    assert [p.tokens.shape[1] for p in parts] == batch.lengths.tolist()
    assert all(bool(p.attention_mask.all()) for p in parts)


def test_a_moved_chunk_still_names_the_users_prompt(tiny):
    # Batch.to() dropped origin: after .to(device) a chunk's error named its own row 0, not the
    # prompt the user passed (review 28a, minor).
    chunk = mp.tokenize(tiny, PROMPTS).select([1]).to("cpu")
    assert chunk.origin == (1,)
    with pytest.raises(ValueError, match="outside prompt 1, which has"):
        chunk.positions([10])


def test_prompts_longer_than_the_context_are_refused(tiny):
    too_long = "x" * tiny.cfg.n_ctx  # BOS + n_ctx bytes: one token over
    with pytest.raises(ValueError, match="longer than the model's context of 512"):
        mp.tokenize(tiny, ["Hi", too_long])
    with pytest.raises(ValueError, match="with its target"):
        mp.tokenize_with_targets(tiny, ["x" * (tiny.cfg.n_ctx - 2)], [" ab"])
    with pytest.raises(ValueError, match="longer than the model's context"):
        mp.run(tiny, too_long)
    assert mp.tokenize(tiny, "x" * (tiny.cfg.n_ctx - 1)).tokens.shape == (1, 512)


@pytest.mark.parametrize("bad", [1.5, True, 0, "2"])
def test_batch_size_is_a_positive_int_or_none(tiny, bad):
    """1.5 and True ran one row per pass (truncated by int()). A wrong type is a TypeError, as
    where None is not allowed (collect, logit_lens); 0 a ValueError."""
    error = ValueError if bad == 0 and not isinstance(bad, bool) else TypeError
    with pytest.raises(error, match="batch_size must be a positive int or None"):
        mp.run(tiny, ["Hi", "Hello"], batch_size=bad, progress=False)
    with pytest.raises(error, match="batch_size must be"):
        mp.collect(tiny, ["Hi", "Hello"], "resid_post", batch_size=bad, progress=False)
    assert mp.run(tiny, ["Hi", "Hello"], batch_size=None, progress=False).logits.shape[0] == 2


def test_token_ids_make_a_batch_that_runs_as_the_model_does(tiny):
    # Token ids (a model without a tokenizer, or to_tokens output) had no way into run(): the
    # message said "pass strings".
    batch = mp.tokenize(tiny, ["Hello there", "Hi"])
    again = mp.Batch.from_tokens(batch.tokens, batch.attention_mask)
    assert torch.equal(again.tokens, batch.tokens)
    assert again.lengths.tolist() == batch.lengths.tolist()
    ids = batch.tokens[0]
    out = mp.run(tiny, mp.Batch.from_tokens(ids), logit_positions=-1, progress=False)
    with torch.no_grad():
        expected = tiny(ids[None])[:, -1]
    torch.testing.assert_close(out.logits[:, -1], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"integer ids, got \(2, 3\) torch.float32"):
        mp.Batch.from_tokens(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="attention_mask is"):
        mp.Batch.from_tokens(batch.tokens, torch.ones(1, 2))
    with pytest.raises(TypeError, match=r"Batch.from_tokens\(tokens\)"):
        mp.run(tiny, [ids], progress=False)


def test_a_left_padded_mask_read_as_right_padding_is_refused():
    # It gave last_index [2, 11] for [11, 11]: the last real token read from the padding.
    ids = torch.tensor([[0, 0, 5, 6], [4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match=r"not right-padded .* padding_side='left'"):
        mp.Batch.from_tokens(ids, mask)
    assert mp.Batch.from_tokens(ids, mask, padding_side="left").last_index.tolist() == [3, 3]
    with pytest.raises(ValueError, match="not left-padded"):
        mp.Batch.from_tokens(ids, torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]), padding_side="left")


_BAD = [torch.tensor([[1, 600, 61]]), torch.tensor([[1, 60, -5]])]


@pytest.mark.parametrize(
    "call",
    [
        lambda m, b: mp.run(m, b),
        lambda m, b: mp.generate(m, b, max_new_tokens=2),
        lambda m, b: mp.patch(m, b, b, "mlp_out", -1, mp.logit_diff(1, 2), n_random=0),
        lambda m, b: mp.ablate_cells(m, b, "mlp_out", -1, mp.logit_diff(1, 2), method="zero"),
        lambda m, b: mp.attribution_patch(m, b, b, "mlp_out", -1, mp.logit_diff(1, 2)),
        lambda m, b: mp.direct_logit_attribution(m, b, mp.logit_diff(1, 2)),
        lambda m, b: mp.head_scores(m, b),
    ],
    ids=["run", "generate", "patch", "ablate_cells", "attribution_patch", "dla", "head_scores"],
)
@pytest.mark.parametrize("ids", _BAD, ids=["too_large", "negative"])
def test_token_ids_outside_the_vocabulary_are_refused_by_name(tiny, call, ids):
    # Review 26b E1: a bare IndexError from torch's embedding (an OverflowError from the
    # tokenizer for a negative id in generate).
    bad = int(ids[ids.lt(0) | ids.ge(tiny.cfg.d_vocab)][0])
    pos = int(((ids < 0) | (ids >= tiny.cfg.d_vocab)).nonzero()[0, 1])
    message = rf"rompt 0 holds token id {bad} at position {pos}, outside the model's vocabulary "
    with pytest.raises(ValueError, match=message + rf"\(0\.\.{tiny.cfg.d_vocab - 1}\)"):
        call(tiny, mp.Batch.from_tokens(ids))


def test_ragged_token_rows_are_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"different lengths \(\[3, 4\]\): pad them .*attention_mask"
    ):
        mp.Batch.from_tokens([[1, 60, 61], [1, 62, 63, 64]])
    # Padded by hand with a mask, the same rows are a batch.
    batch = mp.Batch.from_tokens([[1, 60, 61, 0], [1, 62, 63, 64]], [[1, 1, 1, 0], [1, 1, 1, 1]])
    assert batch.last_index.tolist() == [2, 3]
