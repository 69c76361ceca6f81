"""The logit lens against independent computations: HF hidden states, the model's own logits."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import hf_of, hook_count
from matplotlib.figure import Figure

import mechprobe as mp
from mechprobe.cli import main as cli_main
from mechprobe.cli.lens import unescape
from mechprobe.core import token_label

PROMPTS = ["The quick brown fox", "Hi", "A somewhat longer prompt, with commas"]


def _ids(model, prompt: str, target: str = "") -> torch.Tensor:
    """Token ids built by hand (BOS + prompt + target), independent of mechprobe's batching."""
    tok = model.tokenizer
    ids = [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]
    if target:
        ids += tok(target, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def _hf_final_norm(hf) -> torch.nn.Module:
    """The Hugging Face model's final norm (Llama's ``model.norm``, GPT-2's ``transformer.ln_f``)."""
    return hf.model.norm if hasattr(hf, "model") else hf.transformer.ln_f


def _hf_layer_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """``[layers, seq, vocab]`` log-probs from HF's hidden states through its own norm + lm_head."""
    hf = hf_of(model)
    with torch.no_grad():
        hidden = hf(ids, output_hidden_states=True).hidden_states
        n = len(hidden) - 1
        # hidden_states[i + 1] is block i's output; HF already applied the final norm to the last.
        norm = _hf_final_norm(hf)
        states = [norm(hidden[i + 1]) if i < n - 1 else hidden[n] for i in range(n)]
        return torch.stack([hf.lm_head(h)[0].log_softmax(-1) for h in states])


def _full_logprobs(result: mp.LensResult, b: int, e: int, k: int, vocab: int) -> np.ndarray:
    """Rebuild a full log-prob vector from a top_k = vocab result."""
    out = np.full(vocab, np.nan)
    out[result.top_ids[b, e, k]] = np.log(result.top_probs[b, e, k].astype(np.float64))
    return out


def test_every_layer_matches_hf_hidden_states_through_norm_and_lm_head(tiny):
    vocab = tiny.cfg.d_vocab
    result = mp.logit_lens(tiny, PROMPTS, positions="all", top_k=vocab)
    assert result.layers == (0, 1, 2) and result.sites == ("resid_post",) * 3
    for b, prompt in enumerate(PROMPTS):
        ref = _hf_layer_logprobs(tiny, _ids(tiny, prompt)).double()
        assert result.positions[b, : ref.shape[1]].tolist() == list(range(ref.shape[1]))
        assert (result.positions[b, ref.shape[1] :] == -1).all()
        for layer in range(3):
            for k in range(ref.shape[1]):
                ours = _full_logprobs(result, b, layer, k, vocab)
                np.testing.assert_allclose(ours, ref[layer, k].numpy(), atol=1e-4, rtol=0)
                p, lp, lp_final = ref[layer, k].exp(), ref[layer, k], ref[-1, k]
                entropy = float(-(p * lp).sum())
                kl = float((lp_final.exp() * (lp_final - lp)).sum())
                assert result.entropy[b, layer, k] == pytest.approx(entropy, abs=1e-4)
                assert result.kl_to_final[b, layer, k] == pytest.approx(kl, abs=1e-4)
    assert np.abs(result.kl_to_final[:, -1][result.positions >= 0]).max() < 1e-4


def test_logit_diff_is_the_difference_of_hf_logits_at_every_layer_and_position(tiny):
    # Single-character targets: the tiny tokenizer splits " a" into a space and "a", so two
    # targets with a leading space would share their first token.
    prompts, pairs = PROMPTS[:2], [["e", "t"], ["o", "x"]]
    result = mp.logit_lens(tiny, prompts, positions="all", targets=pairs)
    diff = result.logit_diff(0, 1)
    assert diff.shape == (len(prompts), 3, result.positions.shape[1])
    hf = hf_of(tiny)
    for b, prompt in enumerate(prompts):
        a, w = (tiny.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in pairs[b])
        ids = _ids(tiny, prompt)
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states
            norm = _hf_final_norm(hf)
            for layer in range(3):
                h = hidden[layer + 1] if layer == 2 else norm(hidden[layer + 1])
                logits = hf.lm_head(h)[0].double()
                ref = (logits[:, a] - logits[:, w]).numpy()
                np.testing.assert_allclose(diff[b, layer, : len(ref)], ref, atol=2e-4, rtol=0)
        assert np.isnan(diff[b, :, ids.shape[1] :]).all()  # columns past the prompt
    assert np.abs(result.logit_diff(1, 0) + diff)[np.isfinite(diff)].max() < 1e-12
    with pytest.raises(ValueError, match="not a target slot"):
        result.logit_diff(0, 2)
    with pytest.raises(ValueError, match="same target slot"):
        result.logit_diff(1, 1)
    # Targets with one first token (" a" and " b" both start with the tiny tokenizer's space)
    # gave a difference of 0 at every layer, silently.
    shared = mp.logit_lens(tiny, prompts[0], targets=[" a", " b"])
    with pytest.raises(ValueError, match=r"Prompt 0's targets ' a' and ' b' share their first"):
        shared.logit_diff(0, 1)


def test_last_layer_equals_model_log_softmax_logits(tiny):
    vocab = tiny.cfg.d_vocab
    result = mp.logit_lens(tiny, PROMPTS, positions=[0, -2, -1], top_k=vocab)
    for b, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            logprobs = tiny(_ids(tiny, prompt))[0].log_softmax(-1)
        for k, pos in enumerate(result.positions[b]):
            ours = _full_logprobs(result, b, 2, k, vocab)
            assert np.abs(ours - logprobs[pos].numpy()).max() <= 1e-4


def test_component_writes_are_decoded_on_their_own(tiny):
    sites = ["resid_pre", "attn_out", mp.Site("mlp_out", 1), "blocks.2.hook_resid_mid"]
    result = mp.logit_lens(tiny, PROMPTS[:2], sites=sites, positions=-1, top_k=tiny.cfg.d_vocab)
    assert result.sites == ("resid_pre",) * 3 + ("attn_out",) * 3 + ("mlp_out", "resid_mid")
    assert result.layers == (0, 1, 2, 0, 1, 2, 1, 2)
    hf = hf_of(tiny)
    names = [
        f"blocks.{layer}.hook_{kind}"
        for kind, layer in zip(result.sites, result.layers, strict=True)
    ]
    captured = mp.run(tiny, PROMPTS[:2], capture=names, logit_positions=-1)
    for e, name in enumerate(names):
        for b in range(2):
            x = captured[name][b, captured.batch.last_index[b]]
            with torch.no_grad():
                ref = hf.lm_head(_hf_final_norm(hf)(x)).log_softmax(-1).double().numpy()
            ours = _full_logprobs(result, b, e, 0, tiny.cfg.d_vocab)
            np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_readout_is_the_models_own_final_norm_and_unembedding(tiny):
    from mechprobe.core._readout import Readout

    x = torch.randn(11, tiny.cfg.d_model) * 3
    readout = Readout(tiny, chunk=4)
    with torch.no_grad():
        ref = tiny.unembed(tiny.ln_final(x[None]))[0]
        for s in range(0, 11, 4):  # buffers are reused: each chunk must still be right
            torch.testing.assert_close(readout.logits(x[s : s + 4]), ref[s : s + 4])
        lp = readout.token_logprobs([x, x * 0.5], torch.arange(11))
        for e, scale in enumerate([1.0, 0.5]):
            want = tiny.unembed(tiny.ln_final(x[None] * scale))[0].log_softmax(-1)
            torch.testing.assert_close(lp[:, e], want[torch.arange(11), torch.arange(11)])


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_with_padding_equals_one_prompt_at_a_time(tiny, side):
    targets = [[" fox", "x"], [" there"], ["!", " ab"]]  # multi-token targets (byte tokenizer)
    batched = mp.logit_lens(
        tiny, PROMPTS, positions=[0, 1, -1], targets=targets, top_k=5, padding_side=side
    )
    for b, prompt in enumerate(PROMPTS):
        one = mp.logit_lens(tiny, [prompt], positions=[0, 1, -1], targets=[targets[b]], top_k=5)
        n_t = len(targets[b])
        assert batched.positions[b].tolist() == one.positions[0].tolist()
        assert np.array_equal(batched.top_ids[b], one.top_ids[0])
        for name in ("top_probs", "entropy", "kl_to_final"):
            np.testing.assert_allclose(getattr(batched, name)[b], getattr(one, name)[0], atol=1e-5)
        for name in ("target_logprob", "target_prob", "position_prob"):
            np.testing.assert_allclose(
                getattr(batched, name)[b, ..., :n_t], getattr(one, name)[0], atol=1e-5
            )
        assert np.array_equal(batched.target_rank[b, :, :n_t], one.target_rank[0])
    assert (batched.target_rank[1, :, 1] == -1).all()  # prompt 1 has one target only
    assert np.isnan(batched.target_logprob[1, :, 1]).all()


def test_all_positions_with_different_lengths_and_chunking_agree(tiny):
    big = mp.logit_lens(tiny, PROMPTS, positions="all", targets=" ab", top_k=4)
    small = mp.logit_lens(
        tiny, PROMPTS, positions="all", targets=" ab", top_k=4, batch_size=2, chunk_size=7
    )
    for name in ("top_probs", "entropy", "kl_to_final", "target_logprob", "position_prob"):
        np.testing.assert_allclose(getattr(big, name), getattr(small, name), atol=1e-5)
    assert np.array_equal(big.top_ids, small.top_ids)
    lengths = [len(t) for t in big.prompt_tokens]
    assert [int((row >= 0).sum()) for row in big.positions] == lengths
    assert big.positions.shape == (3, max(lengths))


def test_multi_token_target_is_teacher_forced_not_truncated(tiny):
    prompt, target = "Hello", " world!"
    result = mp.logit_lens(tiny, prompt, targets=[target, " w"], top_k=3)
    ids = _ids(tiny, prompt, target)
    n_target = len(tiny.tokenizer(target, add_special_tokens=False)["input_ids"])
    assert n_target > 1 and len(result.target_tokens[0][0]) == n_target
    start = ids.shape[1] - n_target
    with torch.no_grad():
        logprobs = tiny(ids)[0].log_softmax(-1)
    expected = sum(float(logprobs[start + j - 1, ids[0, start + j]]) for j in range(n_target))
    assert result.target_logprob[0, -1, 0] == pytest.approx(expected, abs=1e-4)
    # Every layer: the same sum from HF's hidden states (independent decoding).
    ref = _hf_layer_logprobs(tiny, ids)
    for layer in range(3):
        want = sum(float(ref[layer, start + j - 1, ids[0, start + j]]) for j in range(n_target))
        assert result.target_logprob[0, layer, 0] == pytest.approx(want, abs=1e-4)
        first = float(ref[layer, start - 1, ids[0, start]])
        assert result.target_prob[0, layer, 0] == pytest.approx(math.exp(first), abs=1e-5)
        rank = int((ref[layer, start - 1] > ref[layer, start - 1, ids[0, start]]).sum())
        assert result.target_rank[0, layer, 0] == rank
    # " w" shares the first token with " world!" but not its continuation.
    assert result.target_rank[0, :, 1].tolist() == result.target_rank[0, :, 0].tolist()
    assert (result.target_logprob[0, :, 0] < result.target_logprob[0, :, 1] - 1e-3).all()


def test_frame_is_tidy_and_consistent_with_the_arrays(tiny):
    result = mp.logit_lens(tiny, PROMPTS[:2], positions="all", targets=[" a", " b"], top_k=3)
    frame = result.to_frame()
    required = ["prompt", "site", "layer", "position", "target", "rank", "prob", "logprob"]
    assert set([*required, "entropy", "kl_to_final"]) <= set(frame.columns)
    lengths = [len(t) for t in result.prompt_tokens]
    assert len(frame) == 3 * sum(lengths)  # 3 layers x positions x 1 target
    assert not frame.duplicated(["prompt", "layer", "position", "target"]).any()
    last = frame["position"] == frame["prompt"].map(lambda b: lengths[b] - 1)
    assert frame.loc[last, "logprob"].notna().all() and frame.loc[~last, "logprob"].isna().all()
    row = frame[(frame.prompt == 1) & (frame.layer == 2) & last].iloc[0]
    assert row["logprob"] == pytest.approx(result.target_logprob[1, 2, 0])
    assert row["top1_token"] == result.text(result.top_ids[1, 2, lengths[1] - 1, 0])
    assert row["token"] == result.prompt_tokens[1][-1]
    top1_rows = frame[frame["rank"] == 0]
    assert (top1_rows["prob"] == top1_rows["top1_prob"]).all()
    untargeted = mp.logit_lens(tiny, "Hi").to_frame()
    assert len(untargeted) == 3 and untargeted["target"].isna().all()
    top = result.top_frame()
    assert len(top) == 3 * sum(lengths) * 3
    assert (top.groupby(["prompt", "layer", "position"])["prob"].diff().dropna() <= 0).all()
    first = top[(top["rank"] == 0) & (top.prompt == 1) & (top.layer == 2)]
    assert (
        first["decoded_token"].tolist()
        == frame[(frame.prompt == 1) & (frame.layer == 2)]["top1_token"].tolist()
    )


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_save_and_load_round_trip_without_pickle(tiny, tmp_path, suffix):
    result = mp.logit_lens(
        tiny, PROMPTS[:2], positions="all", targets=[[" a", " bc"], [" d"]], top_k=3
    )
    path = result.save(tmp_path / f"lens{suffix}")
    if suffix == ".json":
        json.loads(path.read_text())  # strict JSON: no NaN literals
        assert "NaN" not in path.read_text()
    loaded = mp.LensResult.load(path)
    for name in ("positions", "top_ids", "top_probs", "position_rank", "target_logprob"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(result, name))
        assert getattr(loaded, name).dtype == getattr(result, name).dtype
    assert loaded.targets == result.targets and loaded.target_tokens == result.target_tokens
    assert loaded.token_text == result.token_text and loaded.prompts == result.prompts
    assert loaded.to_frame().equals(result.to_frame())
    with pytest.raises(ValueError, match=r"\.json, \.npz or \.safetensors"):
        result.save(tmp_path / "lens.pkl")


def test_bad_input_raises_clear_errors(tiny):
    with pytest.raises(ValueError, match="resid_post"):
        mp.logit_lens(tiny, "Hi", sites="resid_psot")
    with pytest.raises(ValueError, match="attn_out"):
        mp.logit_lens(tiny, "Hi", sites=[mp.Site("head", 0, head=1)])
    with pytest.raises(ValueError, match="sites is empty"):
        mp.logit_lens(tiny, "Hi", sites=[])
    with pytest.raises(ValueError, match="prompt list is empty"):
        mp.logit_lens(tiny, [])
    with pytest.raises(ValueError, match="Target 0 of prompt 1 is empty"):
        mp.logit_lens(tiny, ["Hi", "Ho"], targets=[" a", ""])
    with pytest.raises(ValueError, match="2 prompts and 3 target"):
        mp.logit_lens(tiny, ["Hi", "Ho"], targets=[" a", " b", " c"])
    # These failed inside list(): "'NoneType' object is not iterable".
    for bad, named in [([None], "entry 0 is NoneType"), (1, "got int 1"), ([" a", 3], "entry 1")]:
        with pytest.raises(TypeError, match=f"targets takes a string, .*; {named}"):
            mp.logit_lens(tiny, ["Hi", "Ho"], targets=bad)
    # Token 2 of "Hi" (BOS H i) twice: its rows were decoded and listed twice.
    with pytest.raises(ValueError, match=r"positions \[2, -1\] name the same token of prompt 1"):
        mp.logit_lens(tiny, ["Hello", "Hi"], positions=[2, -1])
    with pytest.raises(ValueError, match="outside prompt 1"):
        mp.logit_lens(tiny, ["Hello", "Hi"], positions=[4])
    with pytest.raises(ValueError, match="top_k must be between 1 and"):
        mp.logit_lens(tiny, "Hi", top_k=0)
    with pytest.raises(TypeError, match=r"top_k must be an int, got float 2\.0"):
        mp.logit_lens(tiny, "Hi", top_k=2.0)
    # A 0-d tensor count was refused as "top_k must be an int, got Tensor" (review 28a X2).
    three = mp.logit_lens(tiny, "Hi", top_k=torch.tensor(3), chunk_size=np.int64(2))
    assert three.top_ids.shape[-1] == 3
    with pytest.raises(ValueError, match="pass positions= to logit_lens"):
        mp.logit_lens(tiny, "Hi", sites=[mp.Site("resid_post", 0, positions=-1)])
    with pytest.raises(ValueError, match="out of range"):
        mp.logit_lens(tiny, "Hi", sites=[mp.Site("resid_post", 7)])


def test_the_lens_leaves_the_model_as_it_was(tiny):
    # The lens ends each forward pass after the last block: no hook or state may survive that.
    ids = _ids(tiny, PROMPTS[0])
    with torch.no_grad():
        logits_before = tiny(ids)
    before = hook_count(tiny)
    mp.logit_lens(tiny, PROMPTS, positions="all", targets=" ab")
    assert hook_count(tiny) == before
    with torch.no_grad():
        assert torch.equal(tiny(ids), logits_before)
    with pytest.raises(ValueError):
        mp.logit_lens(tiny, PROMPTS, positions=[40])
    assert hook_count(tiny) == before


def test_figures(tiny):
    result = mp.logit_lens(tiny, PROMPTS[:2], positions="all", targets=[[" a", " b"]] * 2)
    fig = result.plot_heatmap(1)
    assert isinstance(fig, Figure)
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, len(result.prompt_tokens[1]))
    np.testing.assert_allclose(image, result.top_probs[1, :, : image.shape[1], 0])
    assert len(fig.axes[0].texts) == image.size  # one top-1 label per cell
    rank_fig = result.plot(color="rank", target=" b")
    assert rank_fig.axes[0].images[0].get_array()[0, 0] == result.position_rank[0, 0, 0, 1] + 1
    traj = result.plot(kind="trajectory", prompt=[0, 1], metric="rank")
    assert len(traj.axes) == 2 and len(traj.axes[0].lines) == 2
    np.testing.assert_allclose(traj.axes[1].lines[0].get_ydata(), result.target_rank[1, :, 0] + 1)
    with pytest.raises(ValueError, match="no target"):
        result.plot(color="rank", target=" zz")


def test_default_figures_show_every_prompt_and_the_top_of_the_rank_axis(tiny):
    # positions=-1 (the default) drew prompt 0's one column in a 2.25-inch strip, title and
    # colour bar clipped; the trajectory drew prompt 0 alone, its rank axis stopping short of 1.
    prompts = [*PROMPTS[:2], "abc"]
    result = mp.logit_lens(tiny, prompts, targets=[[" a", " b"]] * 3, progress=False)
    fig = result.plot()
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 3)  # layers x prompts, each at its decoded (last) token
    for b in range(3):
        c = int(np.nonzero(result.positions[b] >= 0)[0][0])
        np.testing.assert_allclose(image[:, b], result.top_probs[b, :, c, 0])
    assert fig.get_size_inches()[0] >= 5.0 and fig.axes[0].get_title() == "Logit lens, 3 prompts"
    ticks = [tick.get_text() for tick in fig.axes[0].get_xticklabels()]
    assert [tick.split(":")[0] for tick in ticks] == ["0", "1", "2"]
    assert result.plot_heatmap(2).axes[0].images[0].get_array().shape == (3, 1)
    ranks = result.plot_heatmap(color="rank", target=" b").axes[0].images[0].get_array()
    np.testing.assert_allclose(ranks[:, 2], result.position_rank[2, :, 0, 1] + 1)
    traj = result.plot_trajectory()
    assert len(traj.axes) == 3
    top, bottom = traj.axes[0].get_ylim()[::-1]
    assert top < 1 and bottom > result.target_rank.max() + 1  # top-1 always on the axis
    every = mp.logit_lens(tiny, PROMPTS[:2], positions="all", progress=False)
    assert every.plot().axes[0].get_title().startswith("Logit lens, prompt 0 of 2: ")
    assert traj.axes[0].get_ylim() == (traj.axes[0].get_ylim()[0], 0.8)
    assert result.plot_trajectory(metric="prob").axes[0].get_ylim() == (-0.02, 1.02)
    # 73 positions drew a 56-inch figure; a second site kind was left out without a word
    sites = ["resid_mid", "resid_post"]
    long = mp.logit_lens(tiny, "abcdefgh " * 7, sites=sites, positions="all", progress=False)
    wide = long.plot()
    n = len(long.prompt_tokens[0])
    assert wide.axes[0].images[0].get_array().shape == (3, 20) and n > 40
    assert f"(last 20 of {n} positions) (also decoded: resid_post; pass site=)" in (
        wide.axes[0].get_title()
    )
    assert long.plot(site="resid_post", last=n).axes[0].images[0].get_array().shape == (3, n)
    for bad in (0, -3):  # 0 drew every column, -3 all but the first three
        with pytest.raises(ValueError, match="last"):
            long.plot(last=bad)
    with pytest.raises(ValueError, match="empty list"):
        result.plot_trajectory(prompt=[])
    # summary(): its top-1 columns are prompt 0's (the rest are means over prompts): say so
    summary = result.summary()
    assert "top1_token (prompt 0)" in summary and "top1_token" not in summary
    assert "top1_token" in mp.logit_lens(tiny, "Hi", progress=False).summary()


def test_summary_shows_whitespace_tokens(tiny):
    # A top-1 " " or "\n" printed as a blank cell in the summary (the heatmap showed "␣").
    result = mp.logit_lens(tiny, "Hi", progress=False)
    space, newline = tiny.tokenizer(" \n", add_special_tokens=False)["input_ids"]
    assert tiny.tokenizer.decode([space, newline]) == " \n"
    top = result.top_ids.copy()
    top[0, 0, :, 0], top[0, 1, :, 0] = space, newline
    texts = {**result.token_text, space: " ", newline: "\n"}
    summary = dataclasses.replace(result, top_ids=top, token_text=texts).summary()
    assert summary["top1_token"].tolist()[:2] == ["␣", "\\n"]


def test_cli_end_to_end_on_tiny(tmp_path, capsys):
    png, out = tmp_path / "lens.png", tmp_path / "lens.json"
    code = cli_main(
        [
            "lens",
            "Q: hi\\nA:",
            "--target",
            " x",
            "--target",
            " yz",
            "--positions",
            "all",
            "--plot",
            str(png),
            "--json",
            str(out),
            "--model",
            "tiny",
        ]
    )
    assert code == 0 and png.stat().st_size > 0
    result = mp.LensResult.load(out)
    assert result.prompts == ("Q: hi\nA:",)  # the escape was interpreted
    assert result.targets == ((" x", " yz"),)
    assert result.positions.shape == (1, len(result.prompt_tokens[0]))
    printed = capsys.readouterr().out
    assert "' x' rank" in printed and "' yz' rank" in printed
    assert len([line for line in printed.splitlines() if line.strip()[:1].isdigit()]) == 3
    assert cli_main(["lens", "Hi", "--sites", "resid_psot", "--model", "tiny"]) == 2
    assert "resid_post" in capsys.readouterr().err
    assert unescape(r"a\\nb\tc\nd") == "a\\nb\tc\nd"
    folder = tmp_path / "run"
    assert cli_main(["lens", "Q: hi\\nA:", "--model", "tiny", "--out", str(folder)]) == 0
    # report.md records the prompt analysed, not the escape typed
    assert "prompts: ['Q: hi\\nA:']" in (folder / "report.md").read_text(encoding="utf-8")


def test_cli_configures_the_patchscope(tmp_path, capsys):
    # Its target prompt, placeholder and layer could not be set from the shell.
    out = tmp_path / "scope.json"
    args = ["lens", "Hi there", "--model", "tiny", "--quiet", "--lens", "patchscope"]
    scope = ["--patchscope-prompt", "a -> a;\\n# -> ", "--patchscope-placeholder", "#"]
    assert cli_main([*args, *scope, "--patchscope-layer", "1", "--json", str(out)]) == 0
    got = mp.LensResult.load(out)
    expected = mp.logit_lens(
        mp.tiny_model(),
        "Hi there",
        lens=mp.Patchscope("a -> a;\n# -> ", "#", target_layer=1),  # the escape interpreted
        progress=False,
    )
    assert got.lens == expected.lens and "layer 1" in got.lens
    np.testing.assert_array_equal(got.top_ids, expected.top_ids)
    np.testing.assert_allclose(got.top_probs, expected.top_probs, rtol=1e-6)
    default = mp.logit_lens(mp.tiny_model(), "Hi there", lens=mp.Patchscope(), progress=False)
    assert not np.array_equal(got.top_probs, default.top_probs)
    capsys.readouterr()
    # Settings for another lens would be ignored: refused, as is a placeholder not in the prompt.
    assert cli_main(["lens", "Hi", "--model", "tiny", "--patchscope-layer", "1"]) == 2
    assert "configure --lens patchscope, not --lens logit" in capsys.readouterr().err
    assert cli_main([*args, "--patchscope-prompt", "no placeholder here"]) == 2
    assert "does not occur in the target prompt" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "where", "message"),
    [
        ("--json", "missing/lens.json", "does not exist"),
        ("--plot", "", "is a folder"),
        ("--trajectory", "file.txt/t.png", "is a file|does not exist"),
    ],
)
def test_cli_refuses_unwritable_outputs_before_any_work(
    tmp_path, capsys, monkeypatch, option, where, message
):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.setattr("mechprobe.cli.lens.load", lambda name: pytest.fail("the model was loaded"))
    args = ["lens", "Hi", "--target", " x", option, str(tmp_path / where), "--model", "tiny"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err
    assert re.search(message, err)


@pytest.mark.integration
def test_smollm2_poland_answers_warsaw_and_last_layer_equals_logits(smollm2):
    # Zero-shot, SmolLM2-135M answers " The" (Warsaw ranks 6th); with three demonstrations it
    # answers " Warsaw" (the same prompt as demos/logit_lens.py).
    prompt = mp.load_task("capitals").with_shots(3).prompt("Poland")
    result = mp.logit_lens(smollm2, prompt, targets=[" Warsaw", " Poland"], top_k=50)
    assert result.text(result.top_ids[0, -1, 0, 0]) == " Warsaw"
    assert result.target_rank[0, -1, 0] == 0 and result.layers[-1] == 29
    with torch.no_grad():
        logprobs = smollm2(smollm2.to_tokens(prompt))[0, -1].log_softmax(-1)
    ids = torch.as_tensor(result.top_ids[0, -1, 0])
    ours = np.log(result.top_probs[0, -1, 0].astype(np.float64))
    assert np.abs(ours - logprobs[ids].double().numpy()).max() <= 1e-4
    for t, target in enumerate([" Warsaw", " Poland"]):
        token_ids = smollm2.tokenizer(target, add_special_tokens=False)["input_ids"]
        assert len(token_ids) == 1  # both are single tokens in SmolLM2's vocabulary
        assert result.target_logprob[0, -1, t] == pytest.approx(
            float(logprobs[token_ids[0]]), abs=1e-4
        )
    assert abs(result.kl_to_final[0, -1, 0]) < 1e-4
    # The answer only surfaces in the last layers (see docs): not top-1 before layer 29.
    assert (result.target_rank[0, :-1, 0] > 0).all()


def test_a_batch_reads_as_its_strings_and_a_token_batch_is_refused(tiny) -> None:
    prompts = ["Hello there", "Hi"]
    batch = mp.tokenize(tiny, prompts, padding_side="left")
    want = mp.logit_lens(tiny, prompts, targets=" a", progress=False)
    got = mp.logit_lens(tiny, batch, targets=" a", progress=False)
    np.testing.assert_array_equal(got.target_rank, want.target_rank)
    np.testing.assert_allclose(got.kl_to_final, want.kl_to_final)
    acts = mp.collect(tiny, batch, "resid_post", progress=False)
    np.testing.assert_array_equal(acts.values, mp.collect(tiny, prompts, progress=False).values)
    from_ids = mp.Batch(batch.tokens, batch.attention_mask, "left", ("", ""))
    for fn in (mp.logit_lens, mp.collect):
        with pytest.raises(TypeError, match="built from token ids"):
            fn(tiny, from_ids, progress=False)


def test_summary_reads_the_last_decoded_position_and_names_shared_targets_only(tiny) -> None:
    prompts = ["Hello there", "Hi"]
    # Positions without the last token: the summary reads the last decoded one (it raised).
    early = mp.logit_lens(tiny, prompts, positions=[0], targets=" a", progress=False)
    frame = early.summary()
    np.testing.assert_allclose(frame["kl_to_final"], early.kl_to_final[:, :, 0].mean(0))
    np.testing.assert_allclose(frame["entropy"], early.entropy[:, :, 0].mean(0))
    # The rank at that same position, not at the (undecoded) last token.
    np.testing.assert_allclose(frame["rank ' a'"], early.position_rank[:, :, 0, 0].mean(0))
    assert not np.allclose(frame["rank ' a'"], early.target_rank[:, :, 0].mean(0))
    # Different targets per prompt: a column per slot, not named after prompt 0's target.
    mixed = mp.logit_lens(tiny, prompts, targets=[[" a"], [" zz"]], progress=False)
    frame = mixed.summary()
    assert "rank target 0" in frame.columns and "rank ' a'" not in frame.columns
    np.testing.assert_allclose(frame["rank target 0"], mixed.target_rank[:, :, 0].mean(0))
    # One prompt: its ranks are counts (review 37a: "248.0"), a missing one <NA>, not NaN.
    one = mp.logit_lens(tiny, "Hello there", targets=" a", progress=False)
    column = one.summary()["rank ' a'"]
    assert str(column.dtype) == "Int64"
    assert column.tolist() == one.target_rank[0, :, 0].tolist()


@pytest.mark.parametrize("bad", [True, [0, False], 1.0, []])
def test_positions_refuse_what_is_no_position(tiny, bad) -> None:
    # A bool was read as position 1 here (run and patch refused it): one reading everywhere.
    with pytest.raises(ValueError, match="Positions must be an int"):
        mp.logit_lens(tiny, ["Hello there"], positions=bad, progress=False)


def test_columns_of_several_prompts_say_what_sets_each_prompt_apart(tiny):
    # Review 26a F8: templated prompts all end in ":", and the columns read "0: :", "1: :",
    # "2: :"; nothing on the figure said which column was Poland.
    prompts = [f"Q: What is the capital of {c}?\nA:" for c in ("France", "Poland", "Portugal")]
    fig = mp.logit_lens(tiny, prompts, progress=False).plot()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0: France", "1: Poland", "2: Portugal"]
    assert "each decoded at its token ':'" in ax.get_xlabel()
    # decoded at different tokens: the token is kept beside what differs
    mixed = mp.logit_lens(tiny, ["the cat sat", "the dog ran"], progress=False).plot()
    ticks = [t.get_text() for t in mixed.axes[0].get_xticklabels()]
    assert ticks[0].startswith("0: cat sat | ") and ticks[1].startswith("1: dog ran | ")
    same = mp.logit_lens(tiny, ["abc", "abc"], progress=False).plot()  # nothing differs
    assert [t.get_text() for t in same.axes[0].get_xticklabels()] == ["0: c", "1: c"]


def test_a_long_prompt_draws_at_most_16_inches_wide(tiny):
    # A 55-token few-shot prompt drew its last 40 positions 31.5 inches wide (review 26a F2):
    # capped as patching's figures are, the default draws fewer columns and says so.
    long = mp.logit_lens(tiny, "abcdefgh " * 7, positions="all", progress=False)
    n = len(long.prompt_tokens[0])
    fig = long.plot()
    assert fig.get_size_inches()[0] <= 16.0
    assert fig.axes[0].images[0].get_array().shape[1] == 20
    assert f"(last 20 of {n} positions)" in fig.axes[0].get_title()
    every = long.plot(last=n)  # asked for all: narrower columns, not a wider figure
    assert every.get_size_inches()[0] <= 16.0
    assert every.axes[0].images[0].get_array().shape[1] == n
    assert max(len(text.get_text()) for text in every.axes[0].texts) <= 8


def test_the_notebook_view_of_a_long_prompt_stays_small():
    """The heatmap widens with every position: the HTML of one 397-token prompt was 2.5 MB on a
    30-layer model. The notebook view draws the last 24 positions and says so."""
    result = mp.logit_lens(mp.tiny_model(), " ".join(["w"] * 200), positions="all", progress=False)
    page = result._repr_html_()
    assert "<img" in page and len(page) < 150_000
    title = result.plot_heatmap(last=24).axes[0].get_title()
    assert f"last 24 of {len(result.prompt_tokens[0])} positions" in title


def test_one_column_reads_and_a_long_title_is_wrapped_to_the_figure(tiny):
    # Review 26a F13: one decoded position drew its lone tick (":") rotated, a dot pair; with a
    # second site kind named, the title ran past both edges of the 5-inch figure.
    import io

    prompt = "Q: What is the capital of France?\nA:"
    result = mp.logit_lens(tiny, prompt, sites=["attn_out", "mlp_out"], progress=False)
    fig = result.plot()
    ax = fig.axes[0]
    (tick,) = ax.get_xticklabels()
    last = len(result.prompt_tokens[0]) - 1
    token = result.prompt_tokens[0][last]
    assert tick.get_text() == f"'{token}' (position {last}, the last)"
    assert tick.get_rotation() == 0
    assert "(also decoded: mlp_out; pass site=)" in ax.get_title().replace("\n", " ")
    assert "\n" in ax.get_title()  # wrapped
    fig.savefig(io.BytesIO(), format="png")
    box = ax.title.get_window_extent()
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width


def test_a_frames_probabilities_have_one_dtype_with_and_without_targets(tiny):
    # Review 26a F12: prob and logprob were float32 with targets and float64 without, so two
    # lens frames concatenated changed dtype.
    bare = mp.logit_lens(tiny, "Hi there", progress=False).to_frame()
    aimed = mp.logit_lens(tiny, "Hi there", targets=" a", progress=False).to_frame()
    for column in ("prob", "logprob"):
        assert bare[column].dtype == aimed[column].dtype == aimed["kl_to_final"].dtype, column
        assert bare[column].isna().all()


def test_heatmap_ticks_say_each_tokens_position(tiny):
    # Review 26a F13: the x label said "input token (position)" and the ticks only the token;
    # in a few-shot prompt "What" appears at several positions.
    lens = mp.logit_lens(tiny, "Hi cat Hi cat", positions="all", progress=False)
    ticks = [t.get_text() for t in lens.plot_heatmap().axes[0].get_xticklabels()]
    tokens = lens.prompt_tokens[0]
    assert ticks == [f"{token_label(tokens[p], 12)} ({p})" for p in range(len(tokens))]
    first = tokens.index(tokens[-1])  # "t" of the first "cat", repeated last
    assert first < len(tokens) - 1 and ticks[first] != ticks[-1]
