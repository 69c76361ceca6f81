"""The probe benchmark's own logic, on tiny inputs: its cache and the rows it derives."""

from __future__ import annotations

import numpy as np
import pytest

import mechprobe as mp
from benchmarks import bench_probes


def test_a_cache_left_by_another_collection_is_collected_again(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHPROBE_CACHE", str(tmp_path))
    old = bench_probes._cached_collect(tiny, ["An old text"], "acts")
    new_texts = ["A cat sat", "The dog ran off"]
    # mechprobe refuses the folder for another collection; the benchmark owns it and re-collects
    with pytest.raises(ValueError, match="different collection"):
        mp.collect(tiny, new_texts, "resid_post", out_dir=tmp_path / "bench" / "acts")
    got = bench_probes._cached_collect(tiny, new_texts, "acts")
    want = mp.collect(tiny, new_texts, "resid_post", progress=False)
    assert got.values.shape != old.values.shape
    np.testing.assert_array_equal(np.asarray(got.values), np.asarray(want.values))


def test_a_folder_that_is_no_collection_is_not_deleted(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHPROBE_CACHE", str(tmp_path))
    folder = tmp_path / "bench" / "acts"
    folder.mkdir(parents=True)
    (folder / "values.npy").write_bytes(b"not a collection")
    with pytest.raises(ValueError, match="different collection"):
        bench_probes._cached_collect(tiny, ["A cat"], "acts")
    assert (folder / "values.npy").read_bytes() == b"not a collection"


def test_rows_divide_the_measured_times(monkeypatch):
    times = iter([2.0, 8.0, 1.0, 12.0, 1.2, 11.0, 0.8, 13.0])  # ours/theirs: 1 thread, 3 runs
    monkeypatch.setattr(bench_probes, "_timed", lambda fn: (fn(), t := next(times), t))
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 2, 8)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    one, default, faster = bench_probes._compare(X, y, "tiny", repeats=3)
    assert one["ratio"] == pytest.approx(8.0 / 2.0)
    assert default["ratio"] == pytest.approx(12.0 / 1.0)  # medians: 1.0 against 12.0
    # each side's faster setting: mechprobe's default threads (1.0), scikit-learn's one (8.0)
    assert faster["ratio"] == pytest.approx(8.0 / 1.0)
    assert "one thread" in faster["detail"] and "default threads" in faster["detail"]


def test_inlp_rows_add_the_reference_cut_to_mechprobes_fits():
    from benchmarks import bench_nullspace

    X, y = bench_nullspace._planted(600, 16, 3, 2, 2.0)
    rows = bench_nullspace._compare(X, y, "tiny", bench_nullspace._svc, "LinearSVC")
    fits = len(mp.inlp(X, y, bench_nullspace._ITERS, progress=False).accuracies) - 1
    assert fits < bench_nullspace._ITERS  # two planted directions: mechprobe stops early
    assert len(rows) == 2
    assert f"{fits} iterations (mechprobe's count of fits that removed" in rows[1]["baseline"]
    # the cut reference removes one LinearSVC row per class and fit: 3 * fits directions
    assert f"removes {3 * fits} directions" in rows[1]["detail"]


def test_both_tracing_loops_give_causal_traces_numbers(tiny):
    import torch

    from benchmarks import bench_tracing as bt

    layers = [0, 2]
    res = mp.causal_trace(
        tiny, bt.PROMPT, bt.SUBJECT, sites="resid_post", layers=layers, n_noise=bt.N_NOISE,
        n_random=0, progress=False,
    )  # fmt: skip
    with torch.no_grad():
        answer = int(tiny(tiny.to_tokens(bt.PROMPT))[0, -1].argmax())
    for loop in (bt._loop, bt._rome_loop):
        got = loop(tiny, layers, res.subjects[0], res.noise_level, answer).mean(-1)
        np.testing.assert_allclose(got, res.scores[0][0], atol=1e-5, err_msg=loop.__name__)
