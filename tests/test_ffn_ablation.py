"""Top-down FFN ablation against manual hooks; the layer schedule; the mean over real tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core._batching import tokenize
from mechprobe.relational._ablation import _intact_pass, _removed


def test_schedule_of_sixths():
    assert [len(r) for r in _removed(30, 6)] == [0, 5, 10, 15, 20, 25, 30]
    assert _removed(30, 6)[1] == (25, 26, 27, 28, 29)
    assert _removed(24, 6)[1] == (20, 21, 22, 23)
    assert [len(r) for r in _removed(3, 6)] == [0, 1, 1, 2, 2, 3, 3]  # halves round up


def _greedy_with_zeroed(model, prompts, layers):
    def zero(act, hook):
        return torch.zeros_like(act)

    preds = []
    for p in prompts:
        with torch.no_grad():
            logits = model.run_with_hooks(
                model.to_tokens(p),
                fwd_hooks=[(f"blocks.{layer}.hook_mlp_out", zero) for layer in layers],
            )
        preds.append(int(logits[0, -1].argmax()))
    return np.array(preds)


def test_accuracy_equals_manual_zero_ablation(tiny):
    task = mp.load_task("capitals").with_shots(1).subset(3, seed=0)
    res = mp.ffn_ablation(tiny, task, parts=3, batch_size=2)
    assert res.removed == ((), (2,), (1, 2), (0, 1, 2))
    first = np.array(
        [tiny.tokenizer(a, add_special_tokens=False)["input_ids"][0] for a in task.answers()]
    )
    for k, layers in enumerate(res.removed):
        preds = _greedy_with_zeroed(tiny, task.prompts(), layers)
        assert np.array_equal(res.predicted[0][k], preds)
        assert res.accuracy[0, k] == pytest.approx(np.mean(preds == first))


def test_mean_is_over_real_tokens_without_bos(tiny):
    prompts = ["Hello there, friend", "Hi"]
    batch = tokenize(tiny, prompts)  # right-padded: the pads must not enter the mean
    _, _, means = _intact_pass(tiny, batch, torch.zeros(2, dtype=torch.long), True, batch_size=1)
    rows = []
    for p in prompts:
        _, cache = tiny.run_with_cache(tiny.to_tokens(p))
        rows.append(
            torch.stack([cache[f"blocks.{layer}.hook_mlp_out"][0, 1:] for layer in range(3)])
        )
    want = torch.cat(rows, dim=1).mean(1)  # [layer, d], every token but BOS
    assert means is not None and torch.allclose(means, want, atol=1e-5)


def test_mean_ablation_uses_that_mean(tiny):
    task = mp.load_task("capitals").with_shots(1).subset(3, seed=0)
    res = mp.ffn_ablation(tiny, task, parts=1, method="mean")
    first = torch.zeros(len(task), dtype=torch.long)  # answers: not used by the means
    _, _, means = _intact_pass(tiny, tokenize(tiny, task.prompts()), first, True, batch_size=None)
    assert means is not None
    preds = []
    for p in task.prompts():
        hooks = [
            (
                f"blocks.{layer}.hook_mlp_out",
                lambda a, hook, layer=layer: means[layer].expand_as(a).clone(),
            )
            for layer in range(3)
        ]
        with torch.no_grad():
            preds.append(
                int(tiny.run_with_hooks(tiny.to_tokens(p), fwd_hooks=hooks)[0, -1].argmax())
            )
    assert np.array_equal(res.predicted[0][1], preds)


def test_two_tasks_roundtrip_and_plot(tiny, tmp_path):
    tasks = [mp.load_task(n).with_shots(1).subset(2) for n in ("capitals", "capitals_extractive")]
    res = mp.ffn_ablation(tiny, tasks, parts=2)
    assert res.tasks == ("capitals", "capitals_extractive")
    assert res.kinds == ("abstractive", "extractive") and res.accuracy.shape == (2, 3)
    back = mp.AblationResult.load(res.save(tmp_path / "ablation.json"))
    assert np.array_equal(back.accuracy, res.accuracy)
    assert all(np.array_equal(a, b) for a, b in zip(back.predicted, res.predicted, strict=True))
    assert len(res.to_frame()) == 6 and list(res.fraction_removed) == [0.0, 2 / 3, 1.0]
    # Two tasks at the same accuracy hid each other: drawn apart, a task that cannot be drawn
    # relative to an intact 0 says so
    lines = res.plot().axes[0].lines
    assert not np.array_equal(lines[0].get_xdata(), lines[1].get_xdata())
    legend = [t.get_text() for t in res.plot(relative=True).axes[0].get_legend().get_texts()]
    for name, row in zip(res.tasks, res.accuracy, strict=True):
        hidden = row[0] == 0
        assert any(text.startswith(name) and text.endswith("(intact 0: not drawn)") == hidden
                   for text in legend)  # fmt: skip
    with pytest.raises(ValueError, match="method"):
        mp.ffn_ablation(tiny, tasks, method="half")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parts"):
        mp.ffn_ablation(tiny, tasks, parts=0)


def test_more_parts_than_layers_runs_each_distinct_step_once(tiny, monkeypatch):
    """Sixths of 3 layers round to 0, 1, 1, 2, 2, 3, 3 layers: a repeated step's predictions
    are the previous step's (same layers), not a second identical pass."""
    import mechprobe.relational._ablation as ablation

    calls = []
    real_run = ablation.run
    monkeypatch.setattr(ablation, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    task = mp.load_task("capitals").with_shots(1).subset(3, seed=0)
    res = mp.ffn_ablation(tiny, task, parts=6, progress=False)
    assert [len(r) for r in res.removed] == [0, 1, 1, 2, 2, 3, 3]
    assert len(calls) == 3  # the ablated passes: 1, 2 and 3 layers
    for k, layers in enumerate(res.removed):
        assert np.array_equal(
            res.predicted[0][k], _greedy_with_zeroed(tiny, task.prompts(), layers)
        )
    assert list(res.summary().columns[-4:]) == ["removed 0", "removed 1", "removed 2", "removed 3"]
