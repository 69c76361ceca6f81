"""Lenses past the logit lens: the tuned lens (training, files), the Patchscope, one ``lens=``."""

from __future__ import annotations

import gc
import hashlib
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core import readout
from mechprobe.lens._train import _Step
from mechprobe.lens._tuned import package_unembedding_hash
from tests.conftest import TEST_KINDS, hook_count

TEXT = [
    "The cat sat on the mat while the dog slept by the door of the old house. " * 6,
    "Rivers carry water from the hills to the sea, and the sea returns it as rain. " * 6,
    "A committee of the Senate met on Tuesday to discuss the budget for the next year. " * 6,
]
RESID = ("resid_pre", "resid_mid", "resid_post")


@pytest.fixture(scope="module")
def tiny():
    """This file's own tiny model: run_with_cache (the hand computations) leaves the bridge's own
    hooks on a model, which the session's shared one must not carry into other tests."""
    return mp.tiny_model(seed=0)


def _random_lens(model, seed: int = 0, scale: float = 0.05) -> mp.TunedLens:
    """Identity translators plus seeded noise: a lens whose every translator does something."""
    lens = mp.TunedLens.identity(model)
    g = torch.Generator().manual_seed(seed)
    for kind in lens.weights:
        lens.weights[kind] += scale * torch.randn(lens.weights[kind].shape, generator=g)
        lens.biases[kind] += scale * torch.randn(lens.biases[kind].shape, generator=g)
    return lens


def _by_hand(
    model, prompt: str, lens: mp.TunedLens | None, kinds=RESID
) -> dict[tuple[str, int], torch.Tensor]:
    """Log-probabilities at the prompt's last token for every residual (kind, layer), computed from
    TransformerLens's own cache, ``ln_final`` and ``unembed`` (not through mechprobe's readout)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(prompt)
    out = {}
    for kind in kinds:
        for layer in range(model.cfg.n_layers):
            h = cache[f"blocks.{layer}.hook_{kind}"][0, -1].float()
            if lens is not None:
                pair = lens.translator(kind, layer)
                if pair is not None:
                    w, b = pair
                    h = h + w @ h + b
            with torch.no_grad():
                logits = model.unembed(model.ln_final(h[None, None]))[0, 0]
            out[kind, layer] = logits.log_softmax(-1)
    return out


# -- one lens= ------------------------------------------------------------------------------


def test_identity_tuned_lens_decodes_exactly_like_the_logit_lens(tiny):
    prompts = ["Hello there, my friend", "The capital of France is"]
    kwargs = {"targets": [" you", " Paris city"], "sites": list(RESID), "positions": "all"}
    plain = mp.logit_lens(tiny, prompts, **kwargs, progress=False)
    tuned = mp.logit_lens(tiny, prompts, **kwargs, lens=mp.TunedLens.identity(tiny))
    for field in ("top_ids", "top_probs", "entropy", "kl_to_final", "position_rank"):
        np.testing.assert_array_equal(getattr(plain, field), getattr(tuned, field), err_msg=field)
    np.testing.assert_array_equal(plain.target_logprob, tuned.target_logprob)
    assert plain.lens == "logit" and tuned.lens.startswith("tuned (")
    assert "tuned lens" in repr(tuned) and "tuned lens" not in repr(plain)


def test_tuned_lens_matches_a_hand_computation_from_the_cache(tiny):
    lens = _random_lens(tiny)
    prompt = "Rivers carry water to the sea"
    res = mp.logit_lens(tiny, prompt, targets=" rain", sites=list(RESID), lens=lens, top_k=5)
    hand = _by_hand(tiny, prompt, lens)
    rain = res.target_tokens[0][0][0]  # the first token's probability at the last position
    for e, (kind, layer) in enumerate(zip(res.sites, res.layers, strict=True)):
        lp = hand[kind, layer]
        assert np.log(res.target_prob[0, e, 0]) == pytest.approx(float(lp[rain]), abs=2e-5)
        assert list(res.top_ids[0, e, -1]) == lp.topk(5).indices.tolist()
    # The translators did something: the tuned read-out differs from the logit lens's.
    plain = _by_hand(tiny, prompt, None)
    assert not torch.allclose(plain["resid_mid", 1], hand["resid_mid", 1])
    # resid_pre at layer l > 0 is resid_post at l - 1 (same vector, same translator).
    pre2, post1 = res.sites.index("resid_pre") + 2, res.sites.index("resid_post") + 1
    assert res.layers[pre2] == 2 and res.layers[post1] == 1
    np.testing.assert_allclose(res.target_logprob[0, pre2], res.target_logprob[0, post1], rtol=1e-6)
    # The last block's output is what the readout decodes: its translator is the identity.
    last = res.sites.index("resid_post") + tiny.cfg.n_layers - 1
    assert lens.translator("resid_post", tiny.cfg.n_layers - 1) is None
    np.testing.assert_allclose(res.kl_to_final[0, last], 0.0, atol=1e-6)


def test_bad_lenses_raise_before_any_forward_pass(tiny):
    before = hook_count(tiny)
    with pytest.raises(ValueError, match="lens must be 'logit', 'patchscope', a TunedLens"):
        mp.logit_lens(tiny, "Hi", lens="tuned")  # type: ignore[arg-type]
    # "patchscope" is the default Patchscope, as the CLI's --lens patchscope (review 37a)
    named = mp.logit_lens(tiny, "Hi", lens="patchscope", progress=False)
    built = mp.logit_lens(tiny, "Hi", lens=mp.Patchscope(), progress=False)
    np.testing.assert_array_equal(named.kl_to_final, built.kl_to_final)
    assert named.lens == built.lens
    with pytest.raises(ValueError, match="not attn_out"):
        mp.logit_lens(tiny, "Hi", sites="attn_out", lens=mp.TunedLens.identity(tiny))
    only_post = mp.TunedLens.identity(tiny, ["resid_post"])
    with pytest.raises(ValueError, match="no translator for resid_mid at layer 0"):
        mp.logit_lens(tiny, "Hi", sites="resid_mid", lens=only_post)
    # A trajectory reads resid_post - mlp_out (resid_mid): refused before the task is run.
    with pytest.raises(ValueError, match="no translator for resid_mid"):
        mp.trajectory(tiny, mp.load_task("capitals").subset(2), lens=only_post, progress=False)
    with pytest.raises(ValueError, match="was made for 3 layers"):
        mp.logit_lens(mp.tiny_model(n_layers=4), "Hi", lens=mp.TunedLens.identity(tiny))
    assert hook_count(tiny) == before


def test_trajectory_through_an_identity_lens_equals_the_logit_lens(tiny):
    task = mp.load_task("capitals").subset(4)
    plain = mp.trajectory(tiny, task, progress=False)
    tuned = mp.trajectory(tiny, task, lens=mp.TunedLens.identity(tiny), progress=False)
    for field in ("argument_rank", "answer_rank", "argument_rank_no_ffn", "answer_rank_no_ffn"):
        np.testing.assert_array_equal(getattr(plain, field), getattr(tuned, field))
    assert plain.lens == "logit" and tuned.lens.startswith("tuned (")
    back = mp.Trajectory.from_dict(json.loads(json.dumps(tuned.to_dict())))
    assert back.lens == tuned.lens
    # A lens that changes the read-out changes the ranks (the argument is actually used).
    moved = mp.trajectory(tiny, task, lens=_random_lens(tiny, scale=0.5), progress=False)
    assert (moved.argument_rank != plain.argument_rank).any()
    np.testing.assert_array_equal(moved.argument_rank[:, -1], plain.argument_rank[:, -1])


# -- files ----------------------------------------------------------------------------------


def test_safetensors_round_trip_with_a_format_tag(tiny, tmp_path):
    lens = _random_lens(tiny, seed=3)
    lens.info = {"steps": 7, "text": "train"}
    path = lens.save(tmp_path / "sub" / "lens.safetensors")
    back = mp.TunedLens.load(path)
    assert back.layers == lens.layers and back.info == lens.info
    assert back.model_name == lens.model_name and back.n_layers == lens.n_layers
    for kind in lens.weights:
        assert torch.equal(back.weights[kind], lens.weights[kind])
        assert torch.equal(back.biases[kind], lens.biases[kind])
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    assert set(tensors) == {f"{k}.{t}" for k in RESID for t in ("weight", "bias", "layers")}
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, foreign, metadata={"format": "something.else"})
    with pytest.raises(ValueError, match="not a saved mechprobe tuned lens"):
        mp.TunedLens.load(foreign)
    with pytest.raises(ValueError, match=r"\.safetensors file"):
        lens.save(tmp_path / "lens.pt")
    with pytest.raises(FileNotFoundError, match="No tuned lens"):
        mp.TunedLens.load(tmp_path / "missing.safetensors")
    # The one tensor-file writer's digests: a changed byte in a translator is found and named.
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    name = next(k for k in header if k.endswith(".weight"))
    data[8 + size + header[name]["data_offsets"][0] + 1] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"tensor '{name}' does not match its SHA-256"):
        mp.TunedLens.load(path)


def test_reads_the_tuned_lens_package_layout(tiny, tmp_path):
    # The tuned-lens package writes config.json and params.pt (a state dict of its translators,
    # translator i reading Hugging Face's hidden_states[i]); we write that layout here.
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(n):
        state[f"{i}.weight"] = 0.05 * torch.randn(d, d, generator=g)
        state[f"{i}.bias"] = 0.05 * torch.randn(d, generator=g)
    folder = tmp_path / "lens"
    folder.mkdir()
    config = {"base_model_name_or_path": "tiny", "d_model": d, "num_hidden_layers": n, "bias": True}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "params.pt")
    lens = mp.TunedLens.load(folder)
    assert lens.layers == {"resid_pre": (0,), "resid_post": tuple(range(n - 1))}
    x = torch.randn(3, d, generator=g)
    for kind, layer, i in [("resid_pre", 0, 0), ("resid_post", 0, 1), ("resid_pre", 2, 2)]:
        w, b = state[f"{i}.weight"], state[f"{i}.bias"]
        want = x + x @ w.T + b
        torch.testing.assert_close(lens.translate(tiny, kind, layer, x), want)
    # It decodes like the same translators applied by hand.
    res = mp.logit_lens(tiny, "The sea", targets=" rain", sites="resid_post", lens=lens)
    hand = _by_hand(tiny, "The sea", lens, kinds=["resid_post"])
    rain = res.target_tokens[0][0][0]
    got = [float(v) for v in np.log(res.target_prob[0, :, 0])]
    assert got == pytest.approx([float(hand["resid_post", i][rain]) for i in range(n)], abs=2e-5)

    # weights_only=True: a params.pt that would run code on loading is refused.
    class Payload:
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"0.weight": Payload()}, folder / "params.pt")
    with pytest.raises(
        ValueError, match=r"not a readable tuned-lens folder \(params\.pt: "
    ) as info:
        mp.TunedLens.load(folder)
    assert "weights_only=False" not in str(info.value)  # torch's advice, which would run code
    (folder / "params.pt").unlink()
    with pytest.raises(ValueError, match=r"params\.pt is missing"):
        mp.TunedLens.load(folder)


def _exported(tiny, sites=("resid_pre", "resid_mid", "resid_post")):
    """A lens trained for two steps: translators that differ from the identity and each other."""
    return mp.train_tuned_lens(tiny, TEXT, sites=list(sites), n_tokens=128, seq_len=32,
                               tokens_per_step=64, progress=False)  # fmt: skip


def test_a_lens_saved_in_the_tuned_lens_layout_reads_back(tiny, tmp_path):
    # Review 37a F5: a lens could be read from the tuned-lens package's folders, not written to
    # them, so a lens trained here could not be used with that package's tools.
    lens = _exported(tiny)
    with pytest.warns(UserWarning, match="3 resid_mid translators are not written"):
        folder = lens.save_tuned_lens(tmp_path / "lens", tiny)
    config = json.loads((folder / "config.json").read_text())
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    # the fields of the package's TunedLensConfig, and its hash of this model's unembedding
    assert config == {
        "base_model_name_or_path": lens.model_name, "d_model": d, "num_hidden_layers": n,
        "bias": True, "base_model_revision": None,
        "unembed_hash": package_unembedding_hash(tiny), "lens_type": "linear_tuned_lens",
    }  # fmt: skip
    state = torch.load(folder / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{p}" for i in range(n) for p in ("weight", "bias"))
    # translator i reads hidden_states[i]: resid_pre 0, then resid_post i - 1
    for i, (kind, j) in enumerate([("resid_pre", 0)] + [("resid_post", k) for k in range(n - 1)]):
        torch.testing.assert_close(state[f"{i}.weight"], lens.weights[kind][j], rtol=0, atol=0)
        torch.testing.assert_close(state[f"{i}.bias"], lens.biases[kind][j], rtol=0, atol=0)
        assert state[f"{i}.weight"].untyped_storage().nbytes() == d * d * 4  # no shared storage
    back = mp.TunedLens.load(folder)
    assert back.layers == {"resid_pre": (0,), "resid_post": tuple(range(n - 1))}
    with warnings.catch_warnings():  # the hash it wrote is this model's: no warning
        warnings.simplefilter("error")
        ours = mp.logit_lens(tiny, "The sea", lens=lens, progress=False)
        theirs = mp.logit_lens(tiny, "The sea", lens=back, progress=False)
    np.testing.assert_allclose(theirs.top_probs, ours.top_probs, atol=1e-6)
    # a lens without a translator for the embeddings: refused, or the logit lens written there
    post = _exported(tiny, sites=["resid_post"])
    with pytest.raises(ValueError, match=r"none at resid_pre 0\. Train with sites including"):
        post.save_tuned_lens(tmp_path / "post")
    filled = mp.TunedLens.load(
        post.save_tuned_lens(tmp_path / "post", tiny, identity_where_missing=True)
    )
    assert float(filled.weights["resid_pre"].abs().max()) == 0.0
    torch.testing.assert_close(filled.weights["resid_post"], post.weights["resid_post"])
    with pytest.raises(ValueError, match="is a file"):
        lens.save_tuned_lens(folder / "config.json")
    # another model of the same shape: its hash would tell the package the lens is its own
    other = mp.tiny_model(seed=1)
    with pytest.raises(ValueError, match="trained with another unembedding than"):
        lens.save_tuned_lens(tmp_path / "other", other)
    assert not (tmp_path / "other").exists()
    # review 38a: a lens with no block-input translator would be the logit lens under a tuned
    # lens's name; without the model no hash is written, which turns the package's check off
    mid = mp.TunedLens.identity(tiny, sites=["resid_mid"])
    with pytest.raises(ValueError, match="no translator for any block input"):
        mid.save_tuned_lens(tmp_path / "mid", tiny, identity_where_missing=True)
    with pytest.warns(UserWarning) as caught:
        lens.save_tuned_lens(tmp_path / "unhashed")
    assert any("writes no unembed_hash" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "unhashed" / "config.json").read_text())["unembed_hash"] is None
    with pytest.raises(ValueError, match="cannot be a folder under it"):
        lens.save_tuned_lens(folder / "config.json" / "sub", tiny)


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_the_tuned_lens_package_decodes_an_exported_lens_as_mechprobe_does(tmp_path, architecture):
    # The package's own loader and forward (tuned-lens 0.2.0, installed beside TransformerLens
    # 3.9 by the Makefile: it reads Hugging Face models and HookedTransformers, and its import of
    # HookedTransformer fails under TransformerLens 4).
    installed = Path(sys.prefix) / "tuned-lens"  # the Makefile's --target folder (why: there)
    if installed.is_dir() and str(installed) not in sys.path:
        sys.path.append(str(installed))  # appended: this repository's `tests` stays first
    package = pytest.importorskip("tuned_lens.nn.lenses")
    try:
        tiny = mp.tiny_model(kind="hooked", architecture=architecture)
    except RuntimeError:  # HookedUnavailable: TransformerLens 4 removed HookedTransformer
        pytest.skip("a HookedTransformer needs TransformerLens 3.x (make test-tl3 runs this)")
    lens = _exported(tiny, sites=["resid_pre", "resid_post"])
    folder = lens.save_tuned_lens(tmp_path / "lens", tiny)
    theirs = package.TunedLens.from_model_and_pretrained(tiny, str(folder))
    prompt = "A cat sat on"
    _, cache = tiny.run_with_cache(prompt)
    ours = mp.logit_lens(tiny, prompt, lens=lens, sites=["resid_pre", "resid_post"],
                         positions="all", top_k=5, progress=False)  # fmt: skip
    for i in range(tiny.cfg.n_layers):
        with torch.no_grad():
            probs = torch.softmax(theirs(cache[f"blocks.{i}.hook_resid_pre"], i), -1)[0]
        kind, layer = ("resid_pre", 0) if i == 0 else ("resid_post", i - 1)
        e = list(zip(ours.sites, ours.layers, strict=True)).index((kind, layer))
        top = torch.topk(probs, 5, dim=-1)
        np.testing.assert_array_equal(top.indices.numpy(), ours.top_ids[0, e])
        np.testing.assert_allclose(top.values.numpy(), ours.top_probs[0, e], atol=1e-5)


def test_a_tuned_lens_package_folder_is_checked_against_the_model(tiny, tmp_path):
    # The package's config.json carries unembed_hash (its tensor_hash of the HF unembedding);
    # it was ignored, so a lens for another model decoded without a word.
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    weight = tiny.original_model.lm_head.weight.detach().float().numpy()
    own = hashlib.sha256(str.encode(np.array_str(weight, precision=1))).hexdigest()  # as theirs
    state = {f"{i}.{p}": torch.zeros((d, d) if p == "weight" else (d,))
             for i in range(n) for p in ("weight", "bias")}  # fmt: skip
    for name, digest in (("own", own), ("other", "0" * 64)):
        folder = tmp_path / name
        folder.mkdir()
        config = {"base_model_name_or_path": "tiny-x", "d_model": d, "num_hidden_layers": n,
                  "unembed_hash": digest}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config))
        torch.save(state, folder / "params.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mp.logit_lens(tiny, "The sea", lens=mp.TunedLens.load(tmp_path / "own"))
    other = mp.TunedLens.load(tmp_path / "other")
    model_name = tiny.cfg.model_name
    # The warning names the lens's model and the model decoded (it named the lens's twice).
    with pytest.warns(UserWarning, match=rf"trained on tiny-x\) .* than {re.escape(model_name)}'s"):
        mp.logit_lens(tiny, "The sea", lens=other)


def test_tuned_lens_refuses_translators_at_layers_it_cannot_have(tiny):
    lens = mp.TunedLens.identity(tiny)
    w, b = lens.weights["resid_post"][:2], lens.biases["resid_post"][:2]
    n = tiny.cfg.n_layers
    for layers, message in (([7, 9], r"0\.\.1 of a 3-layer model.*\[7, 9\]"),
                            ([2, 0], r"output itself\), not \[2\]"),
                            ([-1, 0], r"not \[-1\]"),
                            ([0, 0], "repeat a layer")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            mp.TunedLens({"resid_post": w}, {"resid_post": b}, {"resid_post": layers}, n_layers=n)


# -- training -------------------------------------------------------------------------------


def test_kl_gradient_matches_autograd(tiny):
    # _Step computes KL(final || lens) and its gradient in closed form; check both against torch.
    step = _Step(tiny, "float32", chunk_rows=5)
    g = torch.Generator().manual_seed(1)
    final = torch.randn(4, 64, generator=g)
    u = torch.randn(8, 64, generator=g)  # two translators x four tokens
    m, c, a = step.targets(final)
    kl, grad = step.loss_and_grad(u, m, c, a)
    p = readout(tiny, final).log_softmax(-1)
    uu = u.clone().requires_grad_(True)
    q = (uu @ tiny.W_U + tiny.b_U).log_softmax(-1)
    want = (p.exp() * (p - q.reshape(2, 4, -1))).sum(-1).reshape(-1)
    want.sum().backward()
    torch.testing.assert_close(kl, want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, uu.grad, rtol=1e-4, atol=1e-6)


_SETTINGS = {
    "sites": ["resid_mid", "resid_post"],
    "n_tokens": 256,
    "seq_len": 32,
    "tokens_per_step": 64,
    "progress": False,
}


def _train(model, **kwargs):
    return mp.train_tuned_lens(model, TEXT, **{**_SETTINGS, **kwargs})


def test_training_is_deterministic_for_a_seed_and_lowers_the_loss(tiny):
    a, b, c = _train(tiny, seed=5), _train(tiny, seed=5), _train(tiny, seed=6)
    for kind in a.weights:
        assert torch.equal(a.weights[kind], b.weights[kind])
        assert torch.equal(a.biases[kind], b.biases[kind])
    assert not torch.equal(a.weights["resid_mid"], c.weights["resid_mid"])
    assert a.info["steps"] == 4 and a.info["tokens"] == 256 and a.info["seed"] == 5
    assert a.info["documents"] == 3  # TEXT's three: one window from each before any second
    assert a.info["model_dtype"] == "float32"  # the weights it read (translators are float32)
    # Trained on the same text, the lens reads it closer to the model's output than the logit lens.
    cmp = mp.compare_lenses(
        tiny, {"logit": "logit", "tuned": a}, TEXT, sites="resid_mid", n_tokens=128, seq_len=32
    )
    assert (cmp.kl[1] < cmp.kl[0]).all(), cmp.kl
    assert cmp.seed == 0  # the result says how to reproduce it


def test_training_works_where_the_caller_turned_gradients_off(tiny):
    # It failed under torch.set_grad_enabled(False) and inference_mode.
    expected = _train(tiny, seed=5, n_tokens=128)
    for off in (torch.no_grad(), torch.inference_mode()):
        with off:
            got = _train(tiny, seed=5, n_tokens=128)
        for kind in expected.weights:
            assert torch.equal(got.weights[kind], expected.weights[kind]), kind
        assert got.info["loss_per_step"] == expected.info["loss_per_step"]
    assert torch.is_grad_enabled()


def test_training_resumes_from_a_checkpoint_to_the_same_lens(tiny, tmp_path, monkeypatch):
    with torch.no_grad():  # a bridge adds hooks of its own at its first forward pass
        tiny(tiny.to_tokens("warm"))
    before = hook_count(tiny)
    whole = _train(tiny, optimizer="adam", seed=2)
    folder = tmp_path / "ckpt"
    calls = {"n": 0}
    real = _Step.loss_and_grad

    def crash_on_third(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(_Step, "loss_and_grad", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        _train(tiny, optimizer="adam", seed=2, checkpoint=folder, checkpoint_every=2)
    monkeypatch.setattr(_Step, "loss_and_grad", real)
    assert (folder / "checkpoint.safetensors").is_file()
    resumed = _train(tiny, optimizer="adam", seed=2, checkpoint=folder, checkpoint_every=2)
    assert resumed.info["resumed_at"] == 2
    for kind in whole.weights:
        assert torch.equal(whole.weights[kind], resumed.weights[kind]), kind
    assert resumed.info["loss_per_step"] == whole.info["loss_per_step"]
    assert resumed.info["last_step_kl"] == whole.info["last_step_kl"]
    # Called again on the finished checkpoint: no step runs, and the info is still whole (the
    # last step's KL per translator was missing).
    again = _train(tiny, optimizer="adam", seed=2, checkpoint=folder, checkpoint_every=2)
    assert again.info["resumed_at"] == again.info["steps"]
    assert again.info["last_step_kl"] == whole.info["last_step_kl"]
    for kind in whole.weights:
        assert torch.equal(whole.weights[kind], again.weights[kind]), kind
    with pytest.raises(ValueError, match=r"other settings .*seed"):
        _train(tiny, optimizer="adam", seed=3, checkpoint=folder)
    # Other texts of the same type, or other weights under the same model name, are other
    # settings too (both used to resume silently into the first run's lens).
    other_text = {**_SETTINGS, "optimizer": "adam", "seed": 2, "checkpoint": folder}
    with pytest.raises(ValueError, match=r"other settings \(text_sha256 differ"):
        mp.train_tuned_lens(tiny, [t.upper() for t in TEXT], **other_text)
    other = mp.tiny_model(seed=1)  # this file's tiny model with other weights
    other.cfg.model_name = tiny.cfg.model_name  # ... under the same name (as fine-tuned copies)
    with pytest.raises(ValueError, match=r"other settings \(unembedding differ"):
        _train(other, optimizer="adam", seed=2, checkpoint=folder)
    assert hook_count(tiny) == before
    assert all(p.requires_grad for p in tiny.ln_final.parameters())


@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_both_precisions_train_and_auto_picks_by_the_device(tiny, precision, monkeypatch):
    # Each path runs here whatever this CPU has (forced); bfloat16 rounds the two vocabulary
    # products' inputs to 8 significant bits, so its KL and gradient agree with float32's to
    # about 2^-8 relative, and its lens reads the text as well as float32's.
    step, exact = _Step(tiny, precision, chunk_rows=5), _Step(tiny, "float32", chunk_rows=5)
    g = torch.Generator().manual_seed(3)
    final, u = torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g)
    kl, grad = step.loss_and_grad(u, *step.targets(final))
    kl32, grad32 = exact.loss_and_grad(u, *exact.targets(final))
    torch.testing.assert_close(kl, kl32, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, grad32, rtol=2e-2, atol=2e-2)
    lens = _train(tiny, precision=precision, seed=5)
    assert lens.info["precision"] == precision
    cmp = mp.compare_lenses(
        tiny, {"logit": "logit", "tuned": lens}, TEXT, sites="resid_mid", n_tokens=128, seq_len=32
    )
    assert (cmp.kl[1] < cmp.kl[0]).all(), cmp.kl
    # "auto" takes bfloat16 only where the device multiplies it natively (emulated bfloat16 is
    # hundreds of times slower than float32 on an AVX2-only CPU).
    native = precision == "bfloat16"
    monkeypatch.setattr("mechprobe.lens._train.native_bfloat16", lambda device: native)
    assert _train(tiny, n_tokens=64, seed=5).info["precision"] == precision


def test_training_rejects_bad_settings(tiny):
    with pytest.raises(ValueError, match="multiple of seq_len"):
        _train(tiny, tokens_per_step=48)
    with pytest.raises(ValueError, match="fewer than the"):
        _train(tiny, n_tokens=100_000)
    with pytest.raises(ValueError, match="not 'attn_out'"):
        _train(tiny, sites=["attn_out"])
    with pytest.raises(ValueError, match="optimizer"):
        _train(tiny, optimizer="lbfgs")


def test_default_text_is_large_and_its_held_out_split_is_disjoint():
    train, held = mp.english_text("train"), mp.english_text("heldout")
    assert len(train) == 225 and len(held) == 24
    assert not set(train) & set(held)
    words = sum(len(d.split()) for d in train + held)
    assert words > 1_500_000  # about 2.5M SmolLM2 tokens
    assert mp.read_texts("heldout") == held


# -- Patchscope -----------------------------------------------------------------------------


def test_patchscope_matches_a_hand_written_patch(tiny):
    scope = mp.Patchscope(target_layer=1)
    ids, place = scope.tokens(tiny)
    assert tiny.to_str_tokens(torch.tensor(ids))[place] == "?"
    x = torch.randn(3, tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    before = hook_count(tiny)
    got = scope.translate(tiny, "resid_post", 0, x)
    assert hook_count(tiny) == before
    n = tiny.cfg.n_layers
    want = []
    for v in x:

        def patch(act, hook, v=v):
            act[:, place] = v
            return act

        def keep(act, hook):
            want.append(act[0, -1].detach().clone())

        hooks = [("blocks.1.hook_resid_post", patch), (f"blocks.{n - 1}.hook_resid_post", keep)]
        with torch.no_grad():
            tiny.run_with_hooks(torch.tensor([ids]), fwd_hooks=hooks)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-5)
    # Patching the last block's output at the read-out token gives the vector back.
    last = mp.Patchscope().translate(tiny, "resid_post", n - 1, x)
    torch.testing.assert_close(last, x)


def test_a_patchscope_transform_maps_each_vector_before_it_is_written(tiny):
    # Review 31b M5: the paper's affine mappings (layer l to the target layer) had no place.
    x = torch.randn(3, tiny.cfg.d_model, generator=torch.Generator().manual_seed(1))
    seen = []

    def affine(v, layer):
        seen.append(layer)
        return 2 * v + 0.5

    mapped = mp.Patchscope(target_layer=1, transform=affine)
    plain = mp.Patchscope(target_layer=1)
    got = mapped.translate(tiny, "resid_post", 0, x)
    torch.testing.assert_close(got, plain.translate(tiny, "resid_post", 0, 2 * x + 0.5))
    assert seen == [0] and mapped.describe().endswith("layer 1, transformed)")
    with pytest.raises(ValueError, match=r"must return a tensor of x's shape \(3, 64\)"):
        mp.Patchscope(transform=lambda v, layer: v[:, :8]).translate(tiny, "resid_post", 0, x)
    with pytest.raises(TypeError, match="transform must be a function"):
        mp.Patchscope(transform="affine")  # type: ignore[arg-type]


def test_patchscope_in_logit_lens_and_its_errors(tiny):
    scope = mp.Patchscope(batch_size=2)
    res = mp.logit_lens(tiny, "The sea is", targets=" blue sky", lens=scope, positions="all")
    assert res.lens.startswith("patchscope (") and np.isfinite(res.target_logprob).all()
    n = tiny.cfg.n_layers
    # At the last layer the Patchscope gives the model's own output back (the same readout).
    np.testing.assert_allclose(res.kl_to_final[0, n - 1], 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="does not occur"):
        mp.Patchscope("cat -> cat;", placeholder="?")
    with pytest.raises(ValueError, match="out of range"):
        mp.logit_lens(tiny, "Hi", lens=mp.Patchscope(target_layer=9))
    with pytest.raises(ValueError, match="not mlp_out"):
        mp.logit_lens(tiny, "Hi", sites="mlp_out", lens=scope)


@pytest.mark.parametrize(
    "scope", [mp.Patchscope(target_layer=0), mp.Patchscope("cat -> cat; dog -> dog; ? ->")]
)
def test_patchscope_kl_is_to_the_models_own_output(tiny, scope):
    """kl_to_final is KL(the model's own next-token distribution || the Patchscope's reading),
    whichever layers are decoded: with the last layer among them, it was taken against the
    Patchscope's reading of that layer (0.45 instead of 0.25 at layer 0 for target_layer=0)."""
    prompt = "Hello there friend"
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(tiny.to_tokens(prompt))
        own = logits[0, -1].log_softmax(-1)
        every = mp.logit_lens(tiny, prompt, layers="all", lens=scope, progress=False)
        for layer in range(tiny.cfg.n_layers):
            h = cache[f"blocks.{layer}.hook_resid_post"][0, -1:]
            q = readout(tiny, scope.translate(tiny, "resid_post", layer, h))[0].log_softmax(-1)
            want = float((own.exp() * (own - q)).sum())
            assert every.kl_to_final[0, layer, 0] == pytest.approx(want, rel=1e-3, abs=1e-5)
            one = mp.logit_lens(tiny, prompt, layers=[layer], lens=scope, progress=False)
            assert one.kl_to_final[0, 0, 0] == pytest.approx(want, rel=1e-3, abs=1e-5)


# -- compare_lenses -------------------------------------------------------------------------


def test_compare_lenses_against_a_hand_computation(tiny, tmp_path):
    lens = _random_lens(tiny, seed=4)
    scope = mp.Patchscope()
    cmp = mp.compare_lenses(
        tiny,
        {"logit": "logit", "tuned": lens, "patchscope": scope},
        TEXT,
        sites=["resid_mid", "resid_post"],
        n_tokens=32,
        seq_len=16,
        seed=1,
    )
    assert cmp.lenses == ("logit", "tuned", "patchscope") and cmp.n_positions == 2 * 15
    windows = mp.lens._text.token_windows(tiny, TEXT, seq_len=16, n_windows=2, seed=1)
    _, cache = tiny.run_with_cache(windows)
    n = tiny.cfg.n_layers
    final = cache[f"blocks.{n - 1}.hook_resid_post"][:, 1:].reshape(-1, 64)
    p = readout(tiny, final).log_softmax(-1)
    for e, (kind, layer) in enumerate(zip(cmp.sites, cmp.layers, strict=True)):
        h = cache[f"blocks.{layer}.hook_{kind}"][:, 1:].reshape(-1, 64)
        for i, obj in enumerate((mp.LogitLens(), lens, scope)):
            q = readout(tiny, obj.translate(tiny, kind, layer, h)).log_softmax(-1)
            kl = (p.exp() * (p - q)).sum(-1)
            assert cmp.kl[i, e] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
            hits = (q.argmax(-1) == p.argmax(-1)).double().mean()
            assert cmp.precision[i, e] == pytest.approx(float(hits))
            # Standard errors over the two windows (their positions are not independent):
            # the SD of the windows' means over sqrt(2), |a - b| / 2.
            kl_w = kl.double().reshape(2, 15).mean(1)
            want = float(abs(kl_w[0] - kl_w[1]) / 2)
            assert cmp.kl_sem[i, e] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert cmp.precision[:, -1] == pytest.approx(1.0)  # the last layer is the model's output
    frame = cmp.to_frame()
    assert len(frame) == 3 * len(cmp.sites) and set(frame["lens"]) == set(cmp.lenses)
    assert "kl_to_final tuned" in cmp.summary().columns
    for suffix in (".json", ".npz", ".safetensors"):
        back = mp.LensComparison.load(cmp.save(tmp_path / f"cmp{suffix}"))
        np.testing.assert_array_equal(back.kl, cmp.kl)
        assert back.lenses == cmp.lenses and back.descriptions == cmp.descriptions
    fig = cmp.plot()
    # a band of one standard error over windows per lens
    kl_band, p_band = fig.axes[0].collections[0], fig.axes[1].collections[0]
    cols = [i for i, s in enumerate(cmp.sites) if s == cmp.sites[0]]
    top = kl_band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(float((cmp.kl[0, cols] + cmp.kl_sem[0, cols]).max()))
    p = cmp.precision[0, cols]
    se = cmp.precision_sem[0, cols]
    assert p_band.get_paths()[0].vertices[:, 1].min() == pytest.approx(float((p - se).min()))
    one = mp.compare_lenses(
        tiny, ["logit"], ["Hello there friend"], positions=[-1], n_tokens=4, seq_len=4
    )
    lone = one.plot()  # a standard error over one position is undefined: no band (it drew 0)
    assert not lone.axes[0].collections and "bands" not in lone.get_suptitle()


def test_windows_come_from_as_many_documents_as_they_can(tiny) -> None:
    """Review 37a: each document was cut to its end before the next was read, so 1,024 held-out
    tokens were one speech and 2,048 training tokens two. One window per document in turn now,
    each document's windows in a seeded order of its own; the count is recorded."""
    from mechprobe.lens._text import sample_windows

    docs = [f"document {k}: " + " ".join(f"w{k}x{i}" for i in range(60)) for k in range(5)]

    def sources(windows):
        # which document each window's text comes from (its words name it)
        texts = [tiny.tokenizer.decode(row[1:]) for row in windows.tolist()]
        return [next(k for k in range(5) if f"w{k}x" in t) for t in texts]

    five, n = sample_windows(tiny, docs, 32, 5, seed=3)
    assert n == 5 and sorted(sources(five)) == [0, 1, 2, 3, 4]
    seven, n = sample_windows(tiny, docs, 32, 7, seed=3)
    assert n == 5 and sorted(np.bincount(sources(seven), minlength=5).tolist()) == [1, 1, 1, 2, 2]
    again, _ = sample_windows(tiny, docs, 32, 7, seed=3)
    assert torch.equal(again, seven) and not torch.equal(
        sample_windows(tiny, docs, 32, 7, 4)[0], seven
    )
    # A document's window is not always its opening one.
    firsts = {tuple(sample_windows(tiny, docs[:1], 32, 1, seed=s)[0][0].tolist()) for s in range(6)}
    assert len(firsts) > 1
    held, n_held = sample_windows(tiny, "heldout", 64, 8, seed=0)
    assert n_held == 8 and held.shape == (8, 64)
    cmp = mp.compare_lenses(tiny, ["logit"], docs, n_tokens=7 * 32, seq_len=32, progress=False)
    assert (cmp.n_windows, cmp.n_documents) == (7, 5) and "5 documents" in repr(cmp)


class _Constant(mp.Lens):
    """Replaces layer 0's vectors by ``value`` (zeros: every logit equal; NaN: NaN logits)."""

    kinds = ("resid_post",)

    def __init__(self, value: float) -> None:
        self.value = value

    def translate(self, model, kind, layer, x):
        return torch.full_like(x, self.value) if layer == 0 else x

    def describe(self) -> str:
        return f"constant {self.value}"


def test_precision_is_the_lens_top1_being_the_models_and_nan_logits_are_refused(tiny):
    # A lens whose logits are all equal scored precision@1 = 1.0 (the model's top-1 had rank 0:
    # no logit above it), and a NaN lens too (NaN compares false).
    cmp = mp.compare_lenses(tiny, {"zero": _Constant(0.0)}, TEXT, n_tokens=32, seq_len=16)
    windows = mp.lens._text.token_windows(tiny, TEXT, seq_len=16, n_windows=2, seed=0)
    _, cache = tiny.run_with_cache(windows)
    final = cache[f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"][:, 1:].reshape(-1, 64)
    q = readout(tiny, torch.zeros_like(final))
    assert bool((q == q[:, :1]).all())  # every logit equal
    hooks = hook_count(tiny)  # the bridge's own, added at its first forward pass
    hits = (q.argmax(-1) == readout(tiny, final).argmax(-1)).double().mean()
    assert cmp.precision[0, 0] == pytest.approx(float(hits)) and cmp.precision[0, 0] < 0.5
    with pytest.raises(ValueError, match="resid_post layer 0 through constant nan hold NaN"):
        mp.compare_lenses(tiny, {"nan": _Constant(float("nan"))}, TEXT, n_tokens=32, seq_len=16)
    with pytest.raises(ValueError, match="resid_post layer 0 hold NaN or infinity"):
        mp.logit_lens(tiny, "Hello there", targets=" a", lens=_Constant(float("nan")))
    assert hook_count(tiny) == hooks


# -- SmolLM2 --------------------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_tuned_lens_beats_the_logit_lens_on_held_out_text_at_every_layer(smollm2):
    # 4 steps of one 128-token window, resid_post only (29 translators), 256 held-out tokens:
    # about a minute on one AVX2 core in float32. The smallest margin was 0.45 nats (layer 28,
    # 1.78 -> 1.33) with 512 held-out tokens.
    lens = mp.train_tuned_lens(
        smollm2, sites="resid_post", n_tokens=512, tokens_per_step=128, progress=False
    )
    cmp = mp.compare_lenses(
        smollm2, {"logit": "logit", "tuned": lens}, "heldout", n_tokens=256, progress=False
    )
    n = smollm2.cfg.n_layers
    logit, tuned = cmp.kl[0, : n - 1], cmp.kl[1, : n - 1]
    assert (tuned < logit).all(), np.c_[logit, tuned]
    # The last block's output is the model's own distribution under both lenses.
    assert cmp.kl[:, n - 1] == pytest.approx(0.0, abs=1e-4)


def test_cli_lens_option(tiny, tmp_path, capsys, monkeypatch):
    from mechprobe.cli import main as cli_main

    path = mp.TunedLens.identity(tiny).save(tmp_path / "lens.safetensors")
    for spec, name in [(str(path), "tuned ("), ("patchscope", "patchscope ("), ("logit", "logit")]:
        out = tmp_path / "out.json"
        args = ["lens", "The sea", "--target", " x", "--json", str(out), "--model", "tiny"]
        assert cli_main([*args, "--lens", spec]) == 0
        assert mp.LensResult.load(out).lens.startswith(name)
    capsys.readouterr()
    monkeypatch.setattr("mechprobe.cli.lens.load", lambda name: pytest.fail("the model was loaded"))
    assert cli_main(["lens", "Hi", "--lens", str(tmp_path / "none.safetensors")]) == 2
    assert "LENS is 'logit', 'patchscope'" in capsys.readouterr().err


def test_read_texts_from_files_and_folders(tmp_path):
    (tmp_path / "b.txt").write_text("Second text.", encoding="utf-8")
    (tmp_path / "a.txt").write_text("First text.", encoding="utf-8")
    (tmp_path / "skip.md").write_text("Not read.", encoding="utf-8")
    assert mp.read_texts(tmp_path) == ["First text.", "Second text."]
    assert mp.read_texts(str(tmp_path / "b.txt")) == ["Second text."]
    with pytest.raises(ValueError, match="neither 'train', 'heldout', 'all' nor an existing"):
        mp.read_texts("The cat sat.")
    # A paragraph is too long for a file name: OSError "File name too long" before (review 21b).
    with pytest.raises(ValueError, match="pass a list of strings for literal text"):
        mp.read_texts("the quick brown fox " * 20)
    with pytest.raises(ValueError, match="pass a list of strings for literal text"):
        mp.read_texts("nul\x00byte")
    with pytest.raises(ValueError, match="empty"):
        mp.read_texts(["  ", ""])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no \.txt file"):
        mp.read_texts(tmp_path / "empty")


def test_compare_lenses_names_three_of_a_kind_apart(tiny):
    cmp = mp.compare_lenses(
        tiny, [mp.Patchscope(target_layer=i) for i in range(3)], ["one two three four " * 20],
        n_tokens=64, seq_len=32, progress=False,
    )  # fmt: skip
    assert cmp.lenses == ("patchscope_0", "patchscope_1", "patchscope_2")  # was _0, _0, plain
    assert len([c for c in cmp.summary().columns if "patchscope" in c]) >= 3
    with pytest.raises(ValueError, match=r"Two lenses have one name as text: \['1', '1'\]"):
        mp.compare_lenses(tiny, {1: "logit", "1": "logit"}, ["one two"], progress=False)


def test_training_and_comparison_refuse_settings_that_do_nothing_or_misread() -> None:
    """momentum=1 trained nothing (step lr * (1 - momentum) = 0) and looked normal; warmup_steps=-1
    changed the schedule; seed=-1 failed in numpy; sites=[] failed in torch's optimiser; one lens
    as a string was read letter by letter."""
    model = mp.tiny_model()
    text = ["The cat sat on the mat. " * 40]
    kw = {"sites": "resid_post", "n_tokens": 64, "seq_len": 32, "tokens_per_step": 32,
          "progress": False}  # fmt: skip
    with pytest.raises(ValueError, match="momentum must be below 1"):
        mp.train_tuned_lens(model, text, momentum=1.0, **kw)
    with pytest.raises(ValueError, match="warmup_steps"):
        mp.train_tuned_lens(model, text, warmup_steps=-1, **kw)
    with pytest.warns(UserWarning, match="not below the 2 steps"):
        mp.train_tuned_lens(model, text, warmup_steps=5, **kw)
    with pytest.raises(ValueError, match="seed"):
        mp.train_tuned_lens(model, text, seed=-1, **kw)
    with pytest.raises(ValueError, match="sites is empty"):
        mp.train_tuned_lens(model, text, **{**kw, "sites": []})
    with pytest.raises(ValueError, match="seed"):
        mp.load_task("capitals").subset(3, seed=-1)
    assert len(mp.load_task("capitals").subset(np.int64(3))) == 3
    one = mp.compare_lenses(model, "logit", ["one two three four " * 20], n_tokens=64,
                            seq_len=32, progress=False)  # fmt: skip
    assert one.lenses == ("logit",)


def test_read_texts_all_is_the_whole_corpus() -> None:
    assert mp.read_texts("all") == mp.english_text("all")


@pytest.mark.integration
def test_a_placeholder_inside_a_token_is_refused(smollm2) -> None:
    """The placeholder "s" of "I like cats" is inside the token " cats", which was patched."""
    with pytest.raises(ValueError, match="does not start on a token boundary"):
        mp.Patchscope("I like cats", "s").tokens(smollm2)
    ids, at = mp.Patchscope("I like cats ->", "cats").tokens(smollm2)
    assert smollm2.tokenizer.decode([ids[at]]) == " cats"
    assert mp.Patchscope().tokens(smollm2)[1] == 21  # the default prompt's " ?", its last token


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_windows_longer_than_the_context_are_refused(architecture):
    # GPT-2 failed with a bare IndexError past its 512 positions; Llama (rotary) evaluated and
    # trained on 599 positions it never saw, silently.
    model = mp.tiny_model(architecture=architecture)
    assert int(model.cfg.n_ctx) == 512
    with pytest.raises(ValueError, match="seq_len=600 is longer than the model's context of 512"):
        mp.compare_lenses(model, ["logit"], "heldout", n_tokens=600, seq_len=600, progress=False)
    with pytest.raises(ValueError, match="seq_len=513 is longer than the model's context of 512"):
        mp.train_tuned_lens(model, "train", n_tokens=513, seq_len=513, tokens_per_step=513)
    # with the default tokens_per_step, the context is named first (review 42a S10: it said
    # "tokens_per_step must be at least 1000")
    with pytest.raises(ValueError, match="seq_len=1000 is longer than the model's context"):
        mp.train_tuned_lens(model, "train", n_tokens=1000, seq_len=1000)
    windows = mp.lens._text.token_windows(model, "heldout", seq_len=512, n_windows=1)
    assert tuple(windows.shape) == (1, 512)  # the context itself is allowed


def test_training_on_the_held_out_split_warns(tiny):
    # compare_lenses measures on "heldout" by default: a lens trained there is compared on its
    # own training text, which nothing said.
    with pytest.warns(UserWarning, match="trains on the split that compare_lenses measures on"):
        mp.train_tuned_lens(tiny, "heldout", n_tokens=32, seq_len=16, tokens_per_step=16,
                            progress=False)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mp.train_tuned_lens(tiny, "train", n_tokens=32, seq_len=16, tokens_per_step=16,
                            progress=False)  # fmt: skip


def test_compare_lenses_names_positions_it_cannot_read(tiny):
    # 1.5 and None gave "'float' object is not iterable"; now core's position_list reads them.
    for bad in (1.5, None, [], [5, 5]):
        with pytest.raises(ValueError, match=r"(?i)positions (must be an int|repeat)"):
            mp.compare_lenses(tiny, ["logit"], TEXT, n_tokens=32, seq_len=16, positions=bad)


def test_text_sources_and_short_documents_are_named(tiny) -> None:
    # 123 gave "'int' object is not iterable"; 100 sentences of 29 tokens each gave "The text
    # holds 0 windows ... pass more text" with 2,900 tokens in hand.
    with pytest.raises(TypeError, match=r"text takes 'train', 'heldout', 'all', a \.txt file"):
        mp.read_texts(123)  # type: ignore[arg-type]
    short = ["The cat sat on the mat today."] * 100
    kw = {"n_tokens": 64, "seq_len": 32, "progress": False}
    with pytest.raises(ValueError, match=r"100 of its 100 documents \(2900 tokens in all\) are sh"):
        mp.compare_lenses(tiny, ["logit"], short, **kw)
    joined = mp.compare_lenses(tiny, ["logit"], [" ".join(short)], **kw)
    assert joined.n_positions == 62
    with pytest.raises(ValueError, match=r"positions \(of windows of seq_len=32 tokens\)"):
        mp.compare_lenses(tiny, ["logit"], [" ".join(short)], positions=[40], **kw)


def test_a_tuned_lens_names_itself_apart_and_checks_widths(tiny) -> None:
    lens = mp.TunedLens.identity(tiny)
    other = mp.TunedLens(
        {k: w + 0.01 for k, w in lens.weights.items()}, lens.biases, lens.layers,
        n_layers=lens.n_layers, model_name=lens.model_name,
    )  # fmt: skip
    assert lens.describe() != other.describe()  # were equal: results could not tell them apart
    assert lens.describe().startswith("tuned (") and lens.digest()[:12] in lens.describe()
    again = mp.TunedLens(lens.weights, lens.biases, lens.layers, n_layers=lens.n_layers)
    assert again.digest() == lens.digest()
    text = ["The cat sat on the mat. " * 40]
    trained = mp.train_tuned_lens(tiny, text, sites="resid_post", n_tokens=64, seq_len=32,
                                  tokens_per_step=32, progress=False)  # fmt: skip
    assert trained.digest() != mp.TunedLens.identity(tiny, ["resid_post"]).digest()
    with pytest.raises(TypeError, match=r"TunedLens\.load takes a path"):
        mp.TunedLens.load(123)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match="x has width 32, and this tuned lens translates d_model 64"
    ):
        lens.translate(tiny, "resid_post", 0, torch.zeros(2, 32))  # was a raw matmul error


def test_a_patchscope_keeps_no_model_alive() -> None:
    # Its target tokens were cached by id(model): a later model could reuse a freed id and read
    # the tokens of another tokenizer. The cache holds models weakly now.
    scope, model = mp.Patchscope(), mp.tiny_model()
    ids, at = scope.tokens(model)
    assert ids[at] == model.to_single_token("?") and len(scope._tokens) == 1
    del model
    gc.collect()
    assert len(scope._tokens) == 0


def test_a_patchscope_that_cannot_see_its_patch_warns(tiny) -> None:
    # Written after the last attention and read at a later token, the patch changes nothing:
    # every decode was the same (rank 239 for every prompt in review 16d), without a word.
    scope = mp.Patchscope("x -> x; ? ->", "?", target_layer=-1)
    with pytest.warns(UserWarning, match=r"resid_post 2 \(the last layer, after its attention\)"):
        res = mp.logit_lens(tiny, ["Hello there", "A cat"], lens=scope, progress=False)
    frame = res.to_frame()
    assert frame.groupby("layer")["top1_token"].nunique().eq(1).all()  # the claim the warning makes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mp.logit_lens(tiny, ["Hello there"], lens=mp.Patchscope(), progress=False)
        mp.logit_lens(tiny, ["Hi"], lens=mp.Patchscope("x -> x; ? ->", "?"), layers=[0, 1])
    # Written at the last layer where it is read (review 37a): the logit lens, exactly.
    at_last = mp.Patchscope(target_layer=-1)
    with pytest.warns(UserWarning, match=r"decodes them exactly as the logit lens does"):
        same = mp.logit_lens(tiny, ["Hello there"], lens=at_last, progress=False)
    plain = mp.logit_lens(tiny, ["Hello there"], progress=False)
    np.testing.assert_allclose(same.kl_to_final, plain.kl_to_final, atol=1e-5)
    np.testing.assert_array_equal(same.top_ids, plain.top_ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_lens_reads_its_model_in_another_dtype_without_a_warning(tmp_path, dtype):
    # The digest of a float32 unembedding differs from its bfloat16 rounding's: a lens trained
    # on the float32 model warned "trained with another unembedding" on the same model in
    # bfloat16 (its read-outs were fine). Another model still gets the warning.
    kind = TEST_KINDS[0]
    lens = mp.TunedLens.identity(mp.tiny_model(kind=kind))
    back = mp.TunedLens.load(lens.save(tmp_path / "lens.safetensors"))
    same = mp.tiny_model(kind=kind).to(dtype)
    other = mp.tiny_model(kind=kind, seed=1)
    for read in (lens, back):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            read.check(same, [("resid_post", 0)])
        with pytest.warns(UserWarning, match="trained with another unembedding"):
            read.check(other, [("resid_post", 0)])


def test_training_that_diverges_is_refused_naming_lr(tiny):
    # Review 26b S2: lr=1e20 returned a lens of NaN weights (loss 1.03, 1.48, 1.34, nan, ...).
    with pytest.raises(
        ValueError, match=r"diverged at step \d+ of 8 .*lr=1e\+20\): pass a smaller"
    ):
        _train(tiny, sites="resid_post", n_tokens=256, tokens_per_step=32, lr=1e20)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_tuned_lens_of_non_finite_weights_is_refused(tiny, tmp_path, bad):
    lens = mp.TunedLens.identity(tiny, ["resid_post"])
    w, b = lens.weights["resid_post"].clone(), lens.biases["resid_post"].clone()
    w[1, 3, 4] = bad
    with pytest.raises(
        ValueError, match=r"resid_post.weight holds NaN or infinity .*layer\(s\) \[1\]"
    ):
        mp.TunedLens({"resid_post": w}, {"resid_post": b}, lens.layers, n_layers=3)
    # The same translators in a tuned-lens package folder.
    n, d = tiny.cfg.n_layers, tiny.cfg.d_model
    state = {f"{i}.{p}": torch.zeros((d, d) if p == "weight" else (d,))
             for i in range(n) for p in ("weight", "bias")}  # fmt: skip
    state["0.bias"][5] = bad
    (tmp_path / "config.json").write_text(json.dumps({"d_model": d, "num_hidden_layers": n}))
    torch.save(state, tmp_path / "params.pt")
    with pytest.raises(ValueError, match=r"params\.pt: 0\.bias holds NaN or infinity: retrain"):
        mp.TunedLens.load(tmp_path)


def _package_folder(tmp_path, model, config=None, state=None):
    n, d = model.cfg.n_layers, model.cfg.d_model
    default = {f"{i}.{p}": torch.zeros((d, d) if p == "weight" else (d,))
               for i in range(n) for p in ("weight", "bias")}  # fmt: skip
    folder = tmp_path / "lens"
    folder.mkdir(exist_ok=True)
    text = (
        config
        if isinstance(config, str)
        else json.dumps({"d_model": d, "num_hidden_layers": n} if config is None else config)
    )
    (folder / "config.json").write_text(text)
    if isinstance(state, bytes):
        (folder / "params.pt").write_bytes(state)
    else:
        torch.save(default if state is None else state(default), folder / "params.pt")
    return folder


@pytest.mark.parametrize(
    ("config", "state", "message"),
    [
        ({}, None, r"config\.json: no 'num_hidden_layers' entry"),
        ("{not json", None, r"config\.json: not JSON, Expecting property name"),
        ("[1, 2]", None, r"config\.json: a JSON list, not an object"),
        ({"d_model": "abc", "num_hidden_layers": 3}, None, r"d_model is 'abc', not a positive"),
        (None, b"junk bytes", r"params\.pt: torch\.load\(weights_only=True\) cannot read it"),
        (None, lambda s: {k: v for k, v in s.items() if k != "0.bias"}, r"translator 0's bias"),
        (None, lambda s: {**s, "1.weight": 3}, r"translator 1 is missing or not \[64, 64\]"),
    ],
    ids=["empty", "not_json", "list", "d_model_text", "junk", "no_bias", "not_tensor"],
)
def test_an_unreadable_tuned_lens_package_folder_is_refused_naming_the_file(
    tiny, tmp_path, config, state, message
):
    # Review 26b E2: raw KeyError, JSONDecodeError, AttributeError, UnpicklingError (with torch's
    # advice to turn weights_only off), ValueError from int().
    folder = _package_folder(tmp_path, tiny, config, state)
    with pytest.raises(ValueError, match=message) as info:
        mp.TunedLens.load(folder)
    assert "weights_only=False" not in str(info.value)
    if "config" in message or "params" in message:
        assert str(info.value).startswith(f"{folder} is not a readable tuned-lens folder (")


def _checkpointed(model, folder):
    return _train(model, seed=2, n_tokens=128, checkpoint=folder, checkpoint_every=2)


def test_a_damaged_training_checkpoint_is_refused_naming_the_folder(tiny, tmp_path):
    # Review 26b S6: a bit flip in a checkpoint's tensors resumed silently (some into weights of
    # 1e36); a truncated one gave safetensors' raw "incomplete metadata".
    folder = tmp_path / "ckpt"
    whole = _checkpointed(tiny, folder)
    path = folder / "checkpoint.safetensors"
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-100] ^= 0x40  # in the last tensor's bytes
    path.write_bytes(bytes(flipped))
    message = rf"checkpoint in {re.escape(str(folder))} cannot be resumed from \(.*"
    with pytest.raises(ValueError, match=message + "does not match its SHA-256 digest.*delete"):
        _checkpointed(tiny, folder)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match=message + "or pass another checkpoint folder"):
        _checkpointed(tiny, folder)
    # Intact, it resumes (at its end) to the same lens.
    path.write_bytes(bytes(data))
    again = _checkpointed(tiny, folder)
    assert again.info["resumed_at"] == 2
    for kind in whole.weights:
        assert torch.equal(whole.weights[kind], again.weights[kind]), kind


def test_a_checkpoint_written_before_digests_still_resumes(tiny, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = tmp_path / "ckpt"
    whole = _checkpointed(tiny, folder)
    path = folder / "checkpoint.safetensors"
    with safe_open(str(path), framework="pt") as f:  # rewritten as before: state, no digests
        state = f.metadata()["state"]
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata={"state": state})
    again = _checkpointed(tiny, folder)
    assert again.info["resumed_at"] == 2
    for kind in whole.weights:
        assert torch.equal(whole.weights[kind], again.weights[kind]), kind


def test_a_training_whose_finite_loss_rose_warns(tiny):
    # Review 26b L11: a too-high lr gave a lens worse than the logit lens it started from, every
    # loss finite, and no word. 30 steps of 32 tokens at lr=1e4: 0.90 -> 1.21 (the last three).
    text = ["The cat sat on the mat. " * 40]
    settings = {"sites": "resid_post", "n_tokens": 960, "seq_len": 32, "tokens_per_step": 32}
    with pytest.warns(UserWarning, match=r"training loss rose from .* lr \(e\.g\. 1000\)"):
        high = mp.train_tuned_lens(tiny, text, lr=1e4, progress=False, **settings)
    log = high.info["loss_per_step"]
    assert np.mean(log[-3:]) > 1.1 * log[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = mp.train_tuned_lens(tiny, text, progress=False, **settings)
    assert default.info["loss_per_step"][-1] < default.info["loss_per_step"][0]
