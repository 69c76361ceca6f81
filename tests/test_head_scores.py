"""head_scores against the usual formulas written on the model's own cache, and TransformerLens's
detect_head; padding and batch independence; rules of one's own; the result protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hook_count
from transformer_lens.head_detector import detect_head

import mechprobe as mp

TEXT = "The cat sat on the mat, the cat sat."


def _patterns(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """``[head, q, k]`` per layer from the model's own cache, one prompt."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None])
    return [cache[f"blocks.{layer}.attn.hook_pattern"][0].double() for layer in range(3)]


def test_repeated_random_tokens_give_the_usual_diagonal_scores(tiny) -> None:
    n = 9
    res = mp.head_scores(tiny, seq_len=n, n_prompts=3, progress=False, seed=4)
    bos = tiny.tokenizer.bos_token_id
    per_prompt = np.zeros((3, 3, 3, tiny.cfg.n_heads))
    for p, ids in enumerate(res.tokens):
        tokens = torch.tensor(ids)
        assert len(tokens) == 2 * n + 1 and tokens[0] == bos
        half = tokens[1 : n + 1]
        assert torch.equal(tokens[n + 1 :], half) and len(set(half.tolist())) == n
        for layer, pattern in enumerate(_patterns(tiny, tokens)):
            q = torch.arange(n + 1, 2 * n + 1)
            # Olsson et al.: the diagonal seq_len back (duplicate) and seq_len - 1 back
            # (induction); the previous token from query 2 on (query 1's is BOS, left out)
            prev = torch.arange(2, 2 * n + 1)
            per_prompt[0, p, layer] = pattern[:, prev, prev - 1].mean(-1).numpy()
            per_prompt[1, p, layer] = pattern[:, q, q - n].mean(-1).numpy()
            per_prompt[2, p, layer] = pattern[:, q, q - n + 1].mean(-1).numpy()
    np.testing.assert_allclose(res.per_prompt, per_prompt, atol=1e-6)
    np.testing.assert_allclose(res.scores, per_prompt.mean(1), atol=1e-6)
    assert res.counts.tolist() == [[2 * n - 1] * 3, [n] * 3, [n] * 3]
    # even attention over q + 1 keys puts 1 / (q + 1) on the one target
    np.testing.assert_allclose(res.chance[2], np.mean(1 / (np.arange(n + 1, 2 * n + 1) + 1)))
    assert res.chance.shape == (3, 3)  # [kinds, layers]: every layer of the tiny Llama alike
    again = mp.head_scores(tiny, seq_len=n, n_prompts=3, progress=False, seed=4)
    assert again.prompts == res.prompts and np.array_equal(again.scores, res.scores)
    other = mp.head_scores(tiny, seq_len=n, n_prompts=3, progress=False, seed=5)
    assert other.prompts != res.prompts


@pytest.mark.parametrize("kind", ["duplicate_token", "induction"])
def test_prompts_agree_with_transformerlens_detect_head(tiny, kind) -> None:
    tokens = tiny.to_tokens(TEXT)[0]
    assert not bool((tokens[1:] == tokens[:-1]).any())  # detect_head counts those as induction
    res = mp.head_scores(tiny, TEXT, kinds=[kind], progress=False)
    theirs = detect_head(tiny, TEXT, f"{kind}_head").double().numpy()
    # detect_head divides by every query's attention (one per query), we by the scored queries
    share = res.counts[0, 0] / len(tokens)
    np.testing.assert_allclose(res.scores[0] * share, theirs, atol=1e-5)
    assert 0 < share < 1


def test_padding_and_batch_size_change_nothing(tiny) -> None:
    prompts = [TEXT, "abab cdcd", "Hi hi hi there, hi"]
    one = mp.head_scores(tiny, prompts, batch_size=1, progress=False)
    for side in ("right", "left"):
        batch = mp.tokenize(tiny, prompts, padding_side=side)
        many = mp.head_scores(tiny, batch, batch_size=3, progress=False)
        np.testing.assert_allclose(many.per_prompt, one.per_prompt, atol=1e-6)
        assert np.array_equal(many.counts, one.counts)
        np.testing.assert_allclose(many.chance, one.chance, atol=1e-12)
    assert one.prompts == tuple(prompts)


def test_a_rule_of_ones_own_and_the_layers_chosen(tiny) -> None:
    def induction(tokens: torch.Tensor) -> torch.Tensor:
        n = len(tokens)
        out = torch.zeros(n, n, dtype=torch.bool)
        for q in range(n):
            for k in range(1, q):
                out[q, k] = bool(tokens[k - 1] == tokens[q])
        return out

    built_in = mp.head_scores(tiny, seq_len=6, n_prompts=2, kinds=["induction"], progress=False)
    own = mp.head_scores(
        tiny, seq_len=6, n_prompts=2, kinds={"mine": induction}, layers=[2, 0], progress=False
    )
    assert own.kinds == ("mine",) and own.layers == (2, 0)
    np.testing.assert_allclose(own.scores[0], built_in.scores[0][[2, 0]], atol=1e-12)
    # Many kinds of one's own keep the repr one short line (353 characters with eight before).
    many = mp.head_scores(
        tiny, seq_len=6, n_prompts=2, kinds={f"kind number {i}": induction for i in range(8)},
        progress=False,
    )  # fmt: skip
    assert len(repr(many)) < 200 and "+5 kinds" in repr(many)
    assert many.summary()["head_kind"].nunique() == 8  # every kind is still in the summary


def test_chance_counts_only_the_keys_a_sliding_window_layer_sees() -> None:
    # Gemma 2 alternates sliding (window 64 in the tiny model) and full layers. chance was one
    # number per kind, even attention over every earlier key: near-uniform heads of a sliding
    # layer read 1.6x above it, and duplicate heads 0 against a chance above 0.
    gemma = mp.tiny_model(architecture="gemma2")
    n, window = 70, 64  # duplicate and induction targets 70 and 69 back: outside the window
    res = mp.head_scores(gemma, seq_len=n, n_prompts=2, progress=False)
    q = np.arange(2, 2 * n + 1)  # previous-token queries (query 1's previous token is BOS)
    second = np.arange(n + 1, 2 * n + 1)  # queries with a duplicate and an induction target
    full = [np.mean(1 / (q + 1)), np.mean(1 / (second + 1)), np.mean(1 / (second + 1))]
    sliding = [np.mean(1 / np.minimum(q + 1, window)), 0.0, 0.0]
    np.testing.assert_allclose(res.chance, np.array([sliding, full, sliding]).T, atol=1e-12)
    assert (res.scores[1:, [0, 2]] == 0).all()  # the model cannot see those targets either
    frame = res.to_frame()
    assert (frame.groupby(["head_kind", "layer"])["chance"].nunique() == 1).all()
    np.testing.assert_allclose(
        frame.query("head_kind == 'previous_token'").groupby("layer")["chance"].first(),
        res.chance[0],
    )
    low, high = f"{full[0]:.2g}", f"{sliding[0]:.2g}"
    assert low != high and res.plot().axes[0].get_title().endswith(f"(chance {low}-{high})")
    assert res.plot(kind="induction").axes[0].get_title().endswith(f"(chance 0-{full[2]:.2g})")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kinds": ["induction_head"]}, ValueError, "Unknown head kind"),
        ({"kinds": []}, ValueError, "kinds is empty"),
        ({"kinds": {"x": 3}}, TypeError, "callable rule"),
        ({"kinds": {"x": lambda t: torch.ones(len(t), len(t))}}, ValueError, "boolean"),
        (
            {"kinds": {"x": lambda t: torch.ones(len(t), len(t), dtype=torch.bool)}},
            ValueError,
            "at or after its query",
        ),
        ({"seq_len": 0}, ValueError, "seq_len"),
        ({"seq_len": 1}, ValueError, "seq_len must be at least 2"),  # induction: itself
        ({"seq_len": 10_000}, ValueError, "seq_len"),
        ({"layers": 7}, ValueError, "out of range"),
        ({"batch_size": 0}, ValueError, "batch_size"),
    ],
)
def test_bad_arguments_are_refused_and_leave_no_hooks(tiny, kwargs, error, message) -> None:
    before = hook_count(tiny)
    with pytest.raises(error, match=message):
        mp.head_scores(tiny, progress=False, **kwargs)
    assert hook_count(tiny) == before


def test_prompts_without_repeats_have_no_duplicate_targets(tiny) -> None:
    with pytest.raises(ValueError, match="No query of any prompt has duplicate_token"):
        mp.head_scores(tiny, "abc", kinds=["duplicate_token"], progress=False)
    res = mp.head_scores(tiny, ["abc", "abab"], kinds=["duplicate_token"], progress=False)
    assert res.counts.tolist() == [[0, 2]]
    assert np.isnan(res.per_prompt[0, 0]).all() and np.isfinite(res.scores).all()


def test_no_targets_says_why_for_each_source(tiny) -> None:
    # A rule marking only BOS (an "attention sink") has no targets: BOS never is one. The advice
    # "prompts=None for repeated random tokens" was given where prompts already were None.
    def sink(tokens):
        return torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril(-1) & (
            torch.arange(len(tokens)) == 0
        )

    with pytest.raises(ValueError, match="BOS is never a target") as error:
        mp.head_scores(tiny, ["abab"], kinds={"sink": sink}, progress=False)
    assert "prompts=None" not in str(error.value)
    with pytest.raises(ValueError, match="No query of repeated random tokens") as error:
        mp.head_scores(tiny, kinds={"sink": sink}, seq_len=4, n_prompts=1, progress=False)
    assert "prompts=None" not in str(error.value)


def test_the_result_protocol(tiny, tmp_path) -> None:
    res = mp.head_scores(tiny, seq_len=5, n_prompts=2, progress=False)
    frame = res.to_frame()
    assert len(frame) == 3 * 3 * tiny.cfg.n_heads
    # The spread is the sample SD over the two prompts, |a - b| / sqrt(2), as every spread.
    pair = res.per_prompt  # [kinds, prompts, layers, heads]
    expected = np.abs(pair[:, 0] - pair[:, 1]) / np.sqrt(2)
    np.testing.assert_allclose(frame["spread"].to_numpy(), expected.reshape(-1), rtol=1e-12)
    best = frame[frame.head_kind == "induction"].sort_values("score").iloc[-1]
    assert (int(best["layer"]), int(best["head"])) == res.top("induction", 1)[0][:2]
    with pytest.raises(ValueError, match="k must be"):  # not [] (review 42a S7)
        res.top("induction", k=0)
    assert len(res.summary(top=2)) == 6
    assert len(res.plot().axes) == 4  # three maps and their one colour bar (one scale, 0 to 1)
    for suffix in (".json", ".npz"):
        back = mp.HeadScoreResult.load(res.save(tmp_path / f"scores{suffix}"))
        assert np.array_equal(back.scores, res.scores) and back.prompts == res.prompts
        assert all(np.array_equal(a, b) for a, b in zip(back.tokens, res.tokens, strict=True))
    assert "repeated random tokens" in repr(res) and "<table" in res._repr_html_()
    assert "<img" in res._repr_html_()  # the layer x head maps, at a glance
    one = mp.head_scores(tiny, seq_len=6, n_prompts=1, progress=False)
    assert one.to_frame()["spread"].isna().all()  # a spread over one prompt is undefined (read 0)
    with pytest.raises(ValueError, match="was not scored"):
        res.plot(kind="copying")


@pytest.mark.integration
def test_smollm2_has_induction_heads_where_detect_head_finds_them(smollm2) -> None:
    res = mp.head_scores(smollm2, progress=False)
    layer, head, score = res.top("induction", 1)[0]
    # measured: L18H6 0.89, then layer 17's heads 3 and 4 (0.76); chance 0.014
    assert (layer, head) == (18, 6) and score > 0.8 and (res.chance[2] < 0.02).all()
    assert res.top("previous_token", 1)[0][2] > 0.8
    text = "The cat sat on the mat. The cat sat on the mat."
    ours = mp.head_scores(smollm2, text, kinds=["induction"], progress=False)
    theirs = detect_head(smollm2, text, "induction_head").double().numpy()
    share = ours.counts[0, 0] / smollm2.to_tokens(text).shape[1]
    np.testing.assert_allclose(ours.scores[0] * share, theirs, atol=1e-4)


def test_a_model_without_a_tokenizer_scores_token_ids() -> None:
    model = mp.tiny_model()
    ids = torch.tensor([[5, 6, 7, 5, 6, 7], [9, 8, 9, 8, 9, 8]])
    want = mp.head_scores(model, mp.Batch.from_tokens(ids), kinds=["induction"], progress=False)
    model.tokenizer = None  # a HookedTransformer built from a config has none
    got = mp.head_scores(model, mp.Batch.from_tokens(ids), kinds=["induction"], progress=False)
    random = mp.head_scores(model, seq_len=5, n_prompts=2, progress=False)
    assert got.prompts == ("5 6 7 5 6 7", "9 8 9 8 9 8") and len(random.tokens[0]) == 10
    np.testing.assert_allclose(got.scores, want.scores)
