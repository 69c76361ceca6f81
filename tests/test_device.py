"""Every analysis on an accelerator gives the CPU's numbers, from the inputs a user has at hand.

A researcher loads the model on a GPU and passes what they already hold: CPU tensors, NumPy
arrays, results of an earlier call. Each test here runs one analysis on the same tiny model on the
CPU and on ``MECHPROBE_TEST_DEVICE`` (default: ``cuda`` where PyTorch sees one; skipped where
none is) and compares every number of the two results' ``to_frame()``.

Tolerances: float32 kernels on two devices sum in different orders, so activations agree to about
1e-6 relative; three layers, a softmax and a log keep that below ``_ATOL`` (1e-4) on these tiny
models. Ranks and top-1 hits compare exactly: on random weights no two logits lie within 1e-4.
Random controls are drawn from seeded CPU generators, so they are the same on every device.
Set ``MECHPROBE_TEST_DEVICE=cpu`` to run this file's own code on a machine with no accelerator.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import hook_count

import mechprobe as mp

_DEVICE = os.environ.get("MECHPROBE_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
pytestmark = pytest.mark.skipif(
    not _DEVICE, reason="no accelerator (set MECHPROBE_TEST_DEVICE to run on one)"
)
_ATOL = 1e-4


@pytest.fixture(scope="module")
def models() -> tuple[Any, Any]:
    """The same tiny Llama (seed 0) on the CPU and on the device under test."""
    return mp.tiny_model(), mp.tiny_model(device=_DEVICE)


def _numbers(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.reset_index(drop=True)


def assert_same_frames(cpu: Any, dev: Any) -> None:
    """Every column of the two results' frames equal: numbers to _ATOL, everything else exactly."""
    a, b = _numbers(cpu.to_frame()), _numbers(dev.to_frame())
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_float_dtype(x):
            np.testing.assert_allclose(
                x.to_numpy(float), y.to_numpy(float), atol=_ATOL, rtol=_ATOL, err_msg=col
            )
        else:
            assert x.tolist() == y.tolist(), col


def _on_cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def test_tiny_model_lands_on_the_device_with_the_cpu_weights(models):
    cpu, dev = models
    assert next(dev.parameters()).device.type == torch.device(_DEVICE).type
    tokens = cpu.to_tokens("The cat sat on the mat")
    want = cpu(tokens)
    got = dev(tokens.to(_DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=_ATOL, rtol=_ATOL)


def test_run_with_a_cpu_vector_added(models):
    o = torch.randn(64, generator=torch.Generator().manual_seed(1))  # the user's CPU tensor
    site = mp.Site("mlp_out", 1)
    outs = [
        mp.run(
            m, ["Hi there", "A cat"], {site: mp.Add(o, scale=2.0)}, capture=[site], progress=False
        )
        for m in models
    ]
    torch.testing.assert_close(_on_cpu(outs[1].logits), outs[0].logits, atol=_ATOL, rtol=_ATOL)
    torch.testing.assert_close(_on_cpu(outs[1][site]), outs[0][site], atol=_ATOL, rtol=_ATOL)


def test_intervene_with_a_cpu_projection_and_mean_ablation(models):
    basis = torch.linalg.qr(torch.randn(64, 3, generator=torch.Generator().manual_seed(2)))[0].T
    plans = {
        mp.Site("resid_post", 0): mp.Project(remove=basis),
        mp.Site("mlp_out", 2): mp.Ablate("mean"),
    }
    logits = []
    for m in models:
        batch = mp.tokenize(m, ["Hi there you", "A cat"])
        hooks = hook_count(m)
        with mp.intervene(m, plans, batch=batch):
            logits.append(m(batch.tokens.to(next(m.parameters()).device)).detach().cpu())
        assert hook_count(m) == hooks
    torch.testing.assert_close(logits[1], logits[0], atol=_ATOL, rtol=_ATOL)


def test_collect(models):
    acts = [
        mp.collect(m, ["a b", "cd e"], "resid_post", positions="all", progress=False)
        for m in models
    ]
    np.testing.assert_allclose(acts[1].values, acts[0].values, atol=_ATOL)
    assert acts[1].position.tolist() == acts[0].position.tolist()


def test_logit_lens(models):
    lenses = [
        mp.logit_lens(
            m, ["Hi there", "A cat"], positions="all", targets=[" a", " b"], top_k=3, progress=False
        )
        for m in models
    ]
    assert_same_frames(*lenses)


def test_trajectory(models):
    task = mp.load_task("capitals").subset(4)
    assert_same_frames(*[mp.trajectory(m, task, progress=False) for m in models])


def test_patch(models):
    res = [
        mp.patch(
            m,
            ["Hi cat", "A dog"],
            ["Hi bat", "A fog"],
            ["mlp_out", "resid_pre"],
            -1,
            mp.logit_diff(1, 2),
            n_random=2,
            progress=False,
        )
        for m in models
    ]
    assert_same_frames(*res)


def test_head_patch_and_attribution_patch(models):
    for fn in (mp.patch, mp.attribution_patch):
        res = [
            fn(m, "Hi cat", "Hi bat", "head", -1, mp.logit_diff(1, 2), n_random=1, progress=False)
            for m in models
        ]
        assert_same_frames(*res)


def test_path_patch(models):
    res = [
        mp.path_patch(
            m, "A cat", "A bat", "head", "final", mp.logit_diff(1, 2), n_random=1, progress=False
        )
        for m in models
    ]
    assert_same_frames(*res)


def test_causal_trace(models):
    res = [
        mp.causal_trace(
            m,
            "The cat sat on the",
            "cat",
            sites="mlp_out",
            n_noise=2,
            n_random=1,
            window=1,
            progress=False,
        )
        for m in models
    ]
    assert_same_frames(*res)


def test_ablate_cells(models):
    res = [
        mp.ablate_cells(
            m, ["Hi cat", "A dog"], "head", -1, mp.logit_diff(1, 2), n_random=1, progress=False
        )
        for m in models
    ]
    assert_same_frames(*res)


def test_function_vector(models):
    res = [
        mp.function_vector(m, "capitals", n_prompts=4, n_random=1, progress=False) for m in models
    ]
    assert_same_frames(*res)
    torch.testing.assert_close(
        _on_cpu(res[1].vector), _on_cpu(res[0].vector), atol=_ATOL, rtol=_ATOL
    )


def test_relational_analysis(models):
    res = [
        mp.relational_analysis(m, "capitals", n_items=6, ablation=False, n_random=1, progress=False)
        for m in models
    ]
    assert_same_frames(*res)


def test_ovector_from_the_cpu_on_the_device(models):
    """An o-vector extracted on the CPU model (as saved by an earlier session) steers the device."""
    o = mp.extract_ovector(models[0], ["Q: capital of Poland?\nA:"], layer=1, progress=False)
    ctx = mp.random_word_contexts([" Poland", " Chile"], seed=0)
    res = [
        mp.ovector_intervention(
            m, {"ovector": o}, ctx, [" Warsaw", " Santiago"], layers=[1, 2], progress=False
        )
        for m in models
    ]
    assert_same_frames(*res)


def test_ffn_ablation(models):
    task = mp.load_task("capitals").subset(3)
    assert_same_frames(*[mp.ffn_ablation(m, task, parts=3, progress=False) for m in models])


def test_tuned_lens_trained_on_the_device(models):
    text = ["The cat sat on the mat. " * 40]
    lenses = [
        mp.train_tuned_lens(
            m, text, sites="resid_post", n_tokens=64, seq_len=32, tokens_per_step=32, progress=False
        )
        for m in models
    ]
    cmp = [
        mp.compare_lenses(
            m,
            ["logit", lens],
            ["one two three four " * 20],
            n_tokens=64,
            seq_len=32,
            progress=False,
        )
        for m, lens in zip(models, lenses, strict=True)
    ]
    assert_same_frames(*cmp)
    # A lens trained on the CPU reads the device model (and back).
    crossed = mp.logit_lens(models[1], "Hi there", lens=lenses[0], progress=False)
    assert_same_frames(
        mp.logit_lens(models[0], "Hi there", lens=lenses[0], progress=False), crossed
    )


def test_patchscope_translates_a_cpu_tensor(models):
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3))
    out = [mp.Patchscope().translate(m, "resid_post", 1, x) for m in models]
    torch.testing.assert_close(_on_cpu(out[1]), _on_cpu(out[0]), atol=_ATOL, rtol=_ATOL)


def test_amnesic_with_one_eraser_on_both_devices(models):
    data = mp.ProbingDataset("toy", ["ab", "ba", "aa", "bb"] * 10, ["x", "y", "x", "y"] * 10)
    site = mp.Site("resid_post", 1)
    acts = mp.collect(models[0], data, site, progress=False)
    eraser = mp.inlp(torch.as_tensor(acts.layer(0)), acts.labels, 2, progress=False)
    results = [
        mp.amnesic(m, site, eraser, text=["Hello there", "Hi you"], n_random=1, progress=False)
        for m in models
    ]
    assert_same_frames(*results)


def test_inlp_on_device_activations_removes_the_cpu_subspace():
    """Each INLP probe stops at its gradient tolerance, so the two devices' directions differ by
    about that much, far below the distance of unrelated subspaces (about 1)."""
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(600, 16, generator=gen)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    cpu = mp.inlp(X, y, 2, progress=False)
    dev = mp.inlp(X.to(_DEVICE), y.to(_DEVICE), 2, progress=False)
    assert dev.n_removed == cpu.n_removed
    eye = torch.eye(16, dtype=torch.float64)
    p_cpu = eye - _on_cpu(cpu(eye))
    p_dev = eye - _on_cpu(dev(eye.to(_DEVICE))).double()
    assert float(torch.linalg.matrix_norm(p_cpu - p_dev, ord=2)) < 0.05


def test_leace_and_probe_on_device_tensors():
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(400, 8, generator=gen)
    y = (X[:, 0] > 0).long()
    cpu = mp.leace(X, y)
    dev = mp.leace(X.to(_DEVICE), y.to(_DEVICE))
    torch.testing.assert_close(_on_cpu(dev(X.to(_DEVICE))), cpu(X), atol=_ATOL, rtol=_ATOL)
    probe_cpu = mp.LinearProbe().fit(X, y)
    probe_dev = mp.LinearProbe().fit(X.to(_DEVICE), y.to(_DEVICE))
    np.testing.assert_allclose(
        np.asarray(_on_cpu(probe_dev.coef_)), np.asarray(_on_cpu(probe_cpu.coef_)), atol=1e-3
    )
    assert probe_dev.score(X.to(_DEVICE), y.to(_DEVICE)) == probe_cpu.score(X, y)


def test_probe_layers_on_device_activations():
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(300, 3, 8, generator=gen)
    y = torch.randint(0, 2, (300,), generator=gen)
    groups = torch.randint(0, 30, (300,), generator=gen)  # word types for the control task
    X[:, 1, 0] += 3 * y
    cpu = mp.probe_layers(X, y, groups=groups, scalar_mix=True, progress=False)
    dev = mp.probe_layers(
        X.to(_DEVICE), y.to(_DEVICE), groups=groups.to(_DEVICE), scalar_mix=True, progress=False
    )
    assert_same_frames(cpu, dev)
    scores = [mp.cumulative_scores(x, y, progress=False) for x in (X, X.to(_DEVICE))]
    assert_same_frames(*scores)
    # The MLP probe trains by minibatches to its tolerance: accuracies agree to a few test rows.
    mlp = [
        mp.probe_layers(x, y, groups=False, mlp=True, progress=False) for x in (X, X.to(_DEVICE))
    ]
    np.testing.assert_allclose(mlp[1].accuracy, mlp[0].accuracy, atol=0.05)


def test_an_exception_on_the_device_leaves_no_hooks(models):
    dev = models[1]
    before = dev(dev.to_tokens("Hi").to(_DEVICE)).detach().cpu()
    hooks = hook_count(dev)

    def boom(*_: Any) -> float:
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        mp.patch(dev, "Hi cat", "Hi bat", "mlp_out", -1, boom, progress=False)
    assert hook_count(dev) == hooks
    torch.testing.assert_close(dev(dev.to_tokens("Hi").to(_DEVICE)).detach().cpu(), before)


def test_layer_sweep(models):
    data = mp.ProbingDataset("toy", ["ab", "ba", "aa", "bb"] * 5, ["x", "y", "x", "y"] * 5)
    res = [
        mp.layer_sweep(m, data, [0, 2], "leace", text=["abab"], n_random=1, progress=False)
        for m in models
    ]
    assert_same_frames(*res)


def test_analogy_ffn_attribution_and_ovector_sweep(models):
    near = [mp.analogy(m, 80, 81, 82, top_k=3) for m in models]
    assert [t for t, _ in near[1]] == [t for t, _ in near[0]]
    np.testing.assert_allclose([c for _, c in near[1]], [c for _, c in near[0]], atol=_ATOL)
    task = mp.load_task("capitals").subset(3)
    got = [mp.ffn_attribution(m, task, layer=1, progress=False) for m in models]
    assert got[1].keys() == got[0].keys()
    for key, value in got[0].items():
        if isinstance(value, float):
            np.testing.assert_allclose(got[1][key], value, atol=_ATOL, err_msg=key)
        else:
            assert got[1][key] == value, key
    o = torch.randn(64, generator=torch.Generator().manual_seed(7))
    ctx = mp.random_word_contexts([" Poland", " Chile"])
    grids = [
        mp.ovector_sweep(m, {"ovector": o}, ctx, [" Warsaw", " Santiago"],
                         layers=[range(1, 3), range(2, 3)], scales=[1.0, 2.0], progress=False)
        for m in models
    ]  # fmt: skip
    assert_same_frames(*grids)


def test_sklearn_probes_take_device_tensors():
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(200, 3, 6, generator=gen)
    y = (X[:, 2, 0] > 0).long()
    for probe, x in ((mp.ScalarMixProbe(), X), (mp.MLPProbe(max_iter=50), X[:, 2])):
        cpu = probe.fit(x, y).predict(x)
        dev = probe.fit(x.to(_DEVICE), y.to(_DEVICE)).predict(x.to(_DEVICE))
        assert (np.asarray(cpu) != np.asarray(dev)).mean() < 0.05, type(probe).__name__
        assert probe.score(x.to(_DEVICE), y.to(_DEVICE)) > 0.9


def test_results_made_on_the_device_save_and_load(models, tmp_path):
    res = mp.function_vector(models[1], "capitals", n_prompts=4, n_random=1, progress=False)
    back = mp.load_result(res.save(tmp_path / "fv.json"))
    assert_same_frames(res, back)
    o = mp.extract_ovector(models[1], ["Q: capital of Poland?\nA:"], layer=1, progress=False)
    loaded = type(o).load(o.save(tmp_path / "o.safetensors"))
    torch.testing.assert_close(_on_cpu(loaded.vector), _on_cpu(o.vector))


def test_lenses_and_patchscopes_decode_on_the_device(models):
    task = mp.load_task("capitals").subset(3)
    lens = mp.TunedLens.identity(models[0])  # a CPU lens, as loaded from disk
    for spec in (mp.Patchscope(), lens):
        got = [mp.logit_lens(m, "Hi there", lens=spec, progress=False) for m in models]
        assert_same_frames(*got)
        traj = [mp.trajectory(m, task, lens=spec, progress=False) for m in models]
        assert_same_frames(*traj)
    scored = [mp.score_task(m, task, progress=False) for m in models]
    assert_same_frames(*scored)


def test_commands_run_on_the_device(tmp_path, capsys):
    from mechprobe.cli import main as cli_main

    runs = {}
    for device in ("cpu", _DEVICE):
        out = tmp_path / device.replace(":", "_")
        args = ["patch", "--clean", "A cat sat", "--corrupt", "A bat sat", "--answer", "1",
                "--wrong", "2", "--sites", "mlp_out", "--layers", "0-1"]  # fmt: skip
        assert (
            cli_main([*args, "--model", "tiny", "--device", device, "--quiet", "--out", str(out)])
            == 0
        )
        runs[device] = mp.load_result(out / "result.json")
    assert_same_frames(runs["cpu"], runs[_DEVICE])


# The embedded SmolLM2 (30 layers, 49,152 tokens) on the device, against the same model on the CPU.
# float32 on both: CUDA's matmuls do not use TF32 unless asked (torch's default), so the two differ
# only by summation order, about 1e-6 relative per product; thirty layers grow that to about 1e-4
# in the logits (|logit| < 40). _SMOL_ATOL (2e-3) holds probabilities and log-probabilities with
# a margin of ten. A rank moves by the number of tokens whose logit lies within that difference
# of the target's: at most one near the top, a few in the flat middle of an early layer's
# distribution, so ranks compare to max(1, 2% of the rank).
_SMOL_ATOL = 2e-3


@pytest.fixture(scope="module")
def smollm2_pair(smollm2: Any) -> tuple[Any, Any]:
    return smollm2, mp.load_model(device=_DEVICE)


def assert_close_frames(cpu: Any, dev: Any) -> None:
    """As assert_same_frames, at SmolLM2's tolerance: floats to _SMOL_ATOL, ranks as above."""
    a, b = _numbers(cpu.to_frame()), _numbers(dev.to_frame())
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_float_dtype(x):
            np.testing.assert_allclose(
                x.to_numpy(float), y.to_numpy(float), atol=_SMOL_ATOL, rtol=_SMOL_ATOL, err_msg=col
            )
        elif col == "rank":
            r_cpu, r_dev = x.to_numpy(float), y.to_numpy(float)
            allowed = np.maximum(1.0, 0.02 * r_cpu)
            worst = np.nanmax(np.abs(r_cpu - r_dev) - allowed)
            assert worst <= 0, f"rank moved {worst:.0f} past its allowance"
        elif col not in (
            "top1_token",
            "token",
        ):  # top-1 strings: compared where the margin is clear
            assert x.tolist() == y.tolist(), col


@pytest.mark.integration
def test_smollm2_lands_on_the_device_and_answers_as_on_the_cpu(smollm2_pair):
    cpu, dev = smollm2_pair
    assert next(dev.parameters()).device.type == torch.device(_DEVICE).type
    assert str(dev.cfg.device).startswith(torch.device(_DEVICE).type)
    tokens = cpu.to_tokens(["The capital of France is", "The capital of Japan is"])
    want = cpu(tokens)[:, -1]
    got = dev(tokens.to(_DEVICE))[:, -1].cpu()
    torch.testing.assert_close(got, want, atol=_SMOL_ATOL * 10, rtol=_SMOL_ATOL)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
    assert cpu.to_string(want.argmax(-1)[:, None]) == [" Paris", " Tokyo"]


@pytest.mark.integration
def test_smollm2_logit_lens_trajectory_and_relational_analysis(smollm2_pair):
    task = mp.load_task("capitals").subset(8)
    lenses = [
        mp.logit_lens(
            m,
            ["The capital of France is", "The capital of Japan is"],
            targets=[" Paris", " Tokyo"],
            progress=False,
        )
        for m in smollm2_pair
    ]
    assert_close_frames(*lenses)
    final = [f.to_frame().query("layer == 29") for f in lenses]
    assert (
        final[0]["top1_token"].tolist() == final[1]["top1_token"].tolist() == [" Paris", " Tokyo"]
    )
    assert_close_frames(*[mp.trajectory(m, task, progress=False) for m in smollm2_pair])
    res = [
        mp.relational_analysis(m, task, ablation=False, n_random=1, progress=False)
        for m in smollm2_pair
    ]
    assert_close_frames(*res)


@pytest.mark.integration
def test_smollm2_patch_and_causal_trace(smollm2_pair):
    patched = [
        mp.patch(
            m,
            "The capital of France is",
            "The capital of Japan is",
            "mlp_out",
            -1,
            mp.logit_diff(" Paris", " Tokyo"),
            layers=[0, 10, 20, 29],
            n_random=1,
            progress=False,
        )
        for m in smollm2_pair
    ]
    assert_close_frames(*patched)
    traced = [
        mp.causal_trace(
            m,
            "The Eiffel Tower is in the city of",
            "Eiffel Tower",
            sites="mlp_out",
            layers=[0, 5, 10, 15],
            n_noise=2,
            n_random=1,
            window=1,
            progress=False,
        )
        for m in smollm2_pair
    ]
    assert_close_frames(*traced)
