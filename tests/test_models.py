from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODELS, hf_of, tiny_of

import mechprobe as mp
from mechprobe.core import _models as models


def test_tiny_model_is_deterministic_and_matches_hf(tiny, request):
    name = request.node.callspec.params["tiny"]
    again = tiny_of(name, seed=0)
    other = tiny_of(name, seed=1)
    tokens = tiny.to_tokens("Hello there")
    with torch.no_grad():
        logits = tiny(tokens)
        assert torch.equal(logits, again(tokens))
        assert not torch.allclose(logits, other(tokens))
        hf = hf_of(tiny)(tokens).logits
    assert (logits - hf).abs().max().item() <= 1e-5


def test_unknown_hub_model_fails_offline_with_the_fix(monkeypatch):
    """Without opening a connection: huggingface_hub reads HF_HUB_OFFLINE when imported, and the
    variable alone (set later) left it retrying HTTP requests for 52 s on this machine."""
    import socket

    from huggingface_hub import constants

    # A user's process: huggingface_hub imported online (this suite exports HF_HUB_OFFLINE).
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(mp.ModelLoadError) as err:
        mp.load_model("no-such-org/no-such-model-xyz")
    message = str(err.value)
    assert "smollm2-135m" in message and "save_pretrained" in message
    assert attempts == [] and constants.HF_HUB_OFFLINE is False  # restored


def test_missing_local_folder_names_the_fix(tmp_path):
    with pytest.raises(mp.ModelLoadError, match="folder"):
        mp.load_model(str(tmp_path / "missing.bin"))


def test_empty_name_rejected():
    with pytest.raises(mp.ModelLoadError, match="non-empty"):
        mp.load_model("")


def test_local_folder_loads_and_matches(tiny, tmp_path, request):
    spec = TINY_MODELS[request.node.callspec.params["tiny"]]
    # the weights behind tiny_model(seed=0), loaded as the same kind of model
    hf_model, tokenizer = models._tiny_hf(0, 3, 64, spec.get("architecture", "llama"))
    hf_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = mp.load_model(str(tmp_path), kind=spec["kind"])
    assert type(loaded) is type(tiny)
    tokens = tiny.to_tokens("local folder")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens), tiny(tokens), atol=1e-5)


def _write_cache(folder: Path, source: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    files = {"model.safetensors": models._digest(folder / "model.safetensors")}
    (folder / models._MANIFEST).write_text(json.dumps({"source": source, "files": files}))


def test_cache_validation_detects_corrupt_and_partial_files(tmp_path):
    source = {"format": 1, "gguf": "x.gguf"}
    folder = tmp_path / "cache"
    _write_cache(folder, source)
    assert models._cache_is_valid(folder, source)
    assert not models._cache_is_valid(folder, {**source, "gguf": "other"})
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[10] ^= 0xFF  # one flipped bit-pattern: same size, different content
    (folder / "model.safetensors").write_bytes(bytes(data))
    assert not models._cache_is_valid(folder, source)
    (folder / "model.safetensors").write_bytes(b"weights" * 10)  # truncated
    assert not models._cache_is_valid(folder, source)
    (folder / models._MANIFEST).write_text("{not json")
    assert not models._cache_is_valid(folder, source)


def test_corrupt_cache_is_rebuilt_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHPROBE_CACHE", str(tmp_path))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(models, "_embedded_gguf", lambda name: gguf)
    source = models._source_id(gguf)
    folder = tmp_path / "smollm2-135m-f32"
    _write_cache(folder, source)
    (folder / "model.safetensors").write_bytes(b"corrupt")
    built = []

    def fake_build(g, f, s):
        built.append(f)
        raise RuntimeError("rebuild requested")

    monkeypatch.setattr(models, "_build_cache", fake_build)
    with pytest.warns(UserWarning, match="corrupt"), pytest.raises(RuntimeError, match="rebuild"):
        models._load_embedded("smollm2-135m", torch.float32)
    assert built == [folder]


@pytest.mark.integration
def test_smollm2_bridge_equals_hf_and_answers(smollm2):
    tokens = smollm2.to_tokens("Q: What is the capital of France?\nA:")
    with torch.no_grad():
        logits = smollm2(tokens)
        hf = smollm2.original_model(tokens).logits
    diff = (logits - hf).abs().max().item()
    print(f"bridge vs HF max abs diff: {diff:.3g}")
    assert diff <= 1e-4
    assert smollm2.cfg.n_layers == 30 and smollm2.cfg.d_model == 576
    assert smollm2.cfg.d_vocab == 49152
    assert smollm2.to_string(logits[0, -1].argmax()) == " Paris"


@pytest.mark.integration
def test_smollm2_tokenizer_is_parsed_once_and_prepends_bos(monkeypatch):
    # TransformerLens reloads a tokenizer that does not prepend BOS (a second parse of
    # tokenizer.json); load_model loads it the way TransformerLens keeps.
    from transformers import AutoTokenizer

    calls = []
    original = AutoTokenizer.from_pretrained

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", counted)
    model = mp.load_model()
    assert len(calls) == 1
    assert int(model.to_tokens("The capital of France")[0, 0]) == model.tokenizer.bos_token_id
    assert not any(module.training for module in model.modules())


@pytest.mark.integration
def test_smollm2_cache_is_faithful_to_the_gguf(smollm2):
    """The cache the session's model was loaded from (built by this code on a fresh machine) holds
    exactly the weights and tokenizer transformers reads from the GGUF itself (our one-pass reader
    against its loader), and the bridge gives the same logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = models._embedded_gguf("smollm2-135m")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder = models.cache_dir() / "smollm2-135m-f32"
    assert models._cache_is_valid(folder, models._source_id(gguf))
    cached = load_file(folder / "model.safetensors")
    expected = {k: v for k, v in direct.state_dict().items() if k != "lm_head.weight"}
    assert set(cached) == set(expected)
    assert all(torch.equal(cached[k], expected[k]) for k in expected)
    ours = AutoTokenizer.from_pretrained(folder)
    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert type(ours) is type(theirs)
    text = "Q: What is the capital of Côte d'Ivoire?<|im_end|>\n東京 A:  two  spaces"
    assert ours(text).input_ids == theirs(text).input_ids
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    assert [getattr(ours, s) for s in specials] == [getattr(theirs, s) for s in specials]
    assert len(ours) == len(theirs)
    tokens = smollm2.to_tokens("The quick brown fox jumps over")
    with torch.no_grad():
        diff = (direct(tokens).logits - smollm2(tokens)).abs().max().item()
    assert diff <= 1e-4


# --- issue 12 §3 item 8: unusable caches and devices say what to do ----------------------------


@pytest.mark.parametrize("kind", ["file", "read-only"])
def test_unwritable_cache_raises_model_load_error(tmp_path, monkeypatch, kind):
    if kind == "file":
        target = tmp_path / "cache-file"
        target.write_text("not a folder")
    else:
        target = tmp_path / "ro"
        target.mkdir()
        target.chmod(0o500)
        probe = target / "x"
        try:  # root ignores permissions: nothing to test then
            probe.write_text("")
            probe.unlink()
            pytest.skip("this user can write into read-only folders (root)")
        except OSError:
            pass
    monkeypatch.setenv("MECHPROBE_CACHE", str(target))
    with pytest.raises(mp.ModelLoadError, match="MECHPROBE_CACHE"):
        mp.tiny_model()


def test_cache_path_under_a_file_raises_model_load_error(tmp_path, monkeypatch):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setenv("MECHPROBE_CACHE", str(blocker / "inside"))
    with pytest.raises(mp.ModelLoadError, match="cannot be written"):
        mp.tiny_model()
    with pytest.raises(mp.ModelLoadError, match="cannot be written"):
        models._load_embedded("smollm2-135m", torch.float32)


def test_tiny_tokenizer_folder_without_its_config_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHPROBE_CACHE", str(tmp_path))
    first = models._tiny_tokenizer()
    (tmp_path / "tiny-tokenizer-v1" / "tokenizer_config.json").unlink()
    again = models._tiny_tokenizer()
    assert models._tiny_ids(again) == models._tiny_ids(first) == (1, 2, 2, 259)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_on_a_cpu_build_fails_before_loading(monkeypatch):
    monkeypatch.setattr(models, "_embedded_gguf", lambda name: pytest.fail("weights were read"))
    with pytest.raises(mp.ModelLoadError, match="no CUDA"):
        mp.load_model(device="cuda")
    with pytest.raises(mp.ModelLoadError, match="not a device"):
        mp.load_model(device="gpu9")


def test_a_model_kept_on_the_cpu_of_a_gpu_machine_takes_its_inputs_there(monkeypatch):
    """TransformerBridge records the best device present when none is named, without moving the
    weights there: on a GPU machine a CPU model then sent every input to CUDA (found on an H200,
    where 179 unit tests failed so). The bridge must name the weights' own device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as TL sees it
    model = mp.tiny_model()
    assert model.cfg.device == "cpu"
    tokens = model.to_tokens("Hi there")  # moved to cfg.device: CUDA before the fix
    assert tokens.device.type == "cpu"
    assert model(tokens).shape == (1, tokens.shape[1], 259)


def test_tiny_model_names_its_device_as_load_model_does():
    with pytest.raises(mp.ModelLoadError, match="not a device"):
        mp.tiny_model(device="gpu9")
    assert mp.tiny_model(device="cpu").cfg.device == "cpu"


def test_warm_cache_is_trusted_by_size_and_time_and_rehashed_when_they_change(
    tmp_path, monkeypatch
):
    source = {"format": 1, "gguf": "x.gguf"}
    folder = tmp_path / "cache"
    _write_cache(folder, source)
    hashed: list[Path] = []
    digest = models._digest

    def counting(path: Path) -> str:
        hashed.append(path)
        return digest(path)

    monkeypatch.setattr(models, "_digest", counting)
    assert models._cache_is_valid(folder, source)  # old-style manifest: hashed once, recorded
    assert len(hashed) == 1
    assert models._cache_is_valid(folder, source)  # size and time match: not hashed again
    assert len(hashed) == 1
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[3] ^= 0xFF
    weights.write_bytes(bytes(data))  # same size, new time, other bytes
    assert not models._cache_is_valid(folder, source)
    assert len(hashed) == 2


def test_a_cold_cache_is_built_by_one_process_while_others_wait(tmp_path):
    """Two processes starting cold together (make test runs two suites side by side) must not
    remove the copy the other is reading: the build waits for the cache entry's lock."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "tiny-tokenizer-v1"
    script = (
        "import transformers, mechprobe.core._models as m; print('ready', flush=True); "
        "m._tiny_tokenizer(); print('done', flush=True)"
    )
    env = {**os.environ, "MECHPROBE_CACHE": str(tmp_path)}
    with models._cache_lock(folder):
        proc = subprocess.Popen(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(2.0)  # the build itself takes a fraction of that once imports are done
            assert proc.poll() is None and not folder.exists(), "built while the lock was held"
        except BaseException:
            proc.kill()
            raise
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip() == "done"
    from transformers import AutoTokenizer

    assert models._tiny_ids(AutoTokenizer.from_pretrained(folder)) == (1, 2, 2, 259)
