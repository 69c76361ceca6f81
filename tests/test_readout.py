"""The one readout: every reader of hidden states gives the model's own logits, also on an
architecture whose logits pass through a transform after the unembedding (Gemma 2's soft cap)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import mechprobe as mp
from mechprobe.core import readout

PROMPTS = ["Hello there, my friend", "Hi"]


@pytest.fixture(scope="module")
def capped() -> Any:
    model = mp.tiny_model(architecture="gemma2")
    assert model.cfg.output_logits_soft_cap == 2.0
    return model


def _model_logits(model: Any, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(model.to_tokens(prompt))[0].float()


def test_an_empty_readout_is_on_the_models_device() -> None:
    # It was a CPU tensor whatever the model's device, so a torch.cat with the logits of a
    # non-empty input failed on an accelerator (review 28a, minor). "meta" stands in for one.
    model = mp.tiny_model().to("meta")
    empty = mp.core.readout(model, torch.empty(2, 0, 64, device="meta"))
    assert empty.shape == (2, 0, 259) and empty.device.type == "meta"
    assert empty.dtype == torch.float32


def test_the_soft_cap_is_real(capped) -> None:
    logits = _model_logits(capped, PROMPTS[0])
    assert float(logits.abs().max()) < 2.0  # 2 tanh(z / 2): every logit is capped
    _, cache = capped.run_with_cache(capped.to_tokens(PROMPTS[0]))
    final = cache[f"blocks.{capped.cfg.n_layers - 1}.hook_resid_post"][0]
    uncapped = capped.unembed(capped.ln_final(final[None]))[0].detach()
    assert float(uncapped.abs().max()) > 2.5  # reading the stream without the cap is wrong
    torch.testing.assert_close(readout(capped, final), logits, atol=1e-5, rtol=0)


def test_run_and_the_lens_give_the_models_logits(capped) -> None:
    out = mp.run(capped, PROMPTS, logit_positions=-1)
    lens = mp.logit_lens(capped, PROMPTS, layers=-1, top_k=5)
    for b, prompt in enumerate(PROMPTS):
        want = _model_logits(capped, prompt)[-1]
        torch.testing.assert_close(out.logits[b, 0], want, atol=1e-5, rtol=0)
        top = torch.softmax(want, -1).topk(5)
        np.testing.assert_array_equal(lens.top_ids[b, 0, 0], top.indices.numpy())
        np.testing.assert_allclose(lens.top_probs[b, 0, 0], top.values.numpy(), atol=1e-5)
        assert abs(float(lens.kl_to_final[b, 0, 0])) < 1e-5


def test_trajectory_and_scoring_rank_the_models_logits(capped) -> None:
    task = mp.load_task("capitals").with_shots(1).subset(3)
    traj = mp.trajectory(capped, task, progress=False)
    score = mp.score_task(capped, task, progress=False)
    for i, prompt in enumerate(task.prompts()):
        logits = _model_logits(capped, prompt)[-1]
        answer = score.answer_ids[i][0]
        rank = int((logits > logits[answer]).sum())
        assert score.first_rank[i] == rank == traj.answer_rank[i, -1]
        assert score.predicted[i] == int(logits.argmax())


def test_patching_metrics_read_the_models_logits(capped) -> None:
    res = mp.patch(capped, "Hi cat", "Hi bat", "mlp_out", -1, mp.logit_diff(5, 7), progress=False)
    clean, corrupt = _model_logits(capped, "Hi cat")[-1], _model_logits(capped, "Hi bat")[-1]
    assert res.clean[0] == pytest.approx(float(clean[5] - clean[7]), abs=1e-5)
    assert res.corrupt[0] == pytest.approx(float(corrupt[5] - corrupt[7]), abs=1e-5)


# The readout's statistics kernels against plain computations: torch.topk, and log_softmax in
# float64 with the 0 * log 0 = 0 convention, on logits with ties and -inf.


def _tied_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Logits with many exact ties (a few integer levels), whole blocks of -inf, and rows that
    have fewer finite logits than a top-k asks for."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randint(-4, 5, (n, vocab), generator=gen).float()
    z[: n // 2] += torch.randn(n // 2, vocab, generator=gen)  # half the rows without ties
    z[:, 256:768] = -torch.inf  # two whole blocks of the top-k search
    z[1, :] = -torch.inf
    z[1, [7, vocab - 1]] = 3.0  # two finite logits, tied, one in the tail
    z[2, :] = 2.0  # every logit tied
    z[3, -5:] = 50.0  # the maximum in the tail only
    return z


@pytest.mark.parametrize("vocab", [259, 4096, 5000])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_equals_torch_topk_with_ties_and_minus_inf(vocab, k) -> None:
    from mechprobe.core._readout import _top_k

    z = _tied_logits(8, vocab, seed=vocab + k)
    values, indices = _top_k(z, k)
    want = torch.topk(z, k, dim=-1)
    assert torch.equal(values, want.values)  # exact, -inf included
    assert torch.equal(z.gather(1, indices), values)  # the indices point at those values
    assert all(len(set(row.tolist())) == k for row in indices)  # k distinct tokens per row
    if k == 1:  # the first maximal index, as argmax
        assert torch.equal(indices[:, 0], z.argmax(-1))


class _Linear:
    """A stand-in model for Readout: ``ln_final`` is a fixed RMS norm, logits ``x W + b``."""

    def __init__(self, d_model: int, vocab: int, seed: int, minus_inf: bool) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.W_U = torch.randn(d_model, vocab, generator=gen) * 2
        self.b_U = torch.randn(vocab, generator=gen)
        if minus_inf:
            self.b_U[100:400] = -torch.inf  # tokens that can never come out: p = 0 at z = -inf

    def ln_final(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    # What the readout asks of a model's adapter (core's model_adapter answers for real models).
    output_transform = None

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.W_U, self.b_U

    def attached_hooks(self, *prefixes: str) -> list[str]:
        return []  # no hook points, so none holds a hook


def _plain_stats(model: _Linear, vecs: list[torch.Tensor], final: torch.Tensor, ids, top_k: int):
    """Every statistic of Readout.grid from the same float32 logits in float64, with plain ops."""
    logits = [torch.addmm(model.b_U, model.ln_final(x), model.W_U).double() for x in vecs]
    lp_f = torch.log_softmax(torch.addmm(model.b_U, model.ln_final(final), model.W_U).double(), -1)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("entropy", "kl", "rank", "logprob")}
    out["top"] = []
    for z in logits:
        lp = torch.log_softmax(z, -1)
        p, p_f = lp.exp(), lp_f.exp()
        zero = torch.zeros((), dtype=torch.float64)
        out["entropy"].append(-torch.where(p > 0, p * lp, zero).sum(-1))
        out["kl"].append(torch.where(p_f > 0, p_f * (lp_f - lp), zero).sum(-1))
        z_t = z.gather(1, ids)
        # ties count against the target: the other tokens at least as high
        out["rank"].append((z[:, None, :] >= z_t[:, :, None]).sum(-1) - 1)
        out["logprob"].append(lp.gather(1, ids))
        out["top"].append(torch.topk(lp, top_k).values.exp())
    return {k: torch.stack(v, 1) for k, v in out.items()}


@pytest.mark.parametrize("minus_inf", [False, True])
@pytest.mark.parametrize(("n", "chunk", "sweep_rows"), [(13, 64, 5), (13, 8, 3), (3, 64, 7)])
def test_readout_statistics_equal_float64_log_softmax(
    monkeypatch, n, chunk, sweep_rows, minus_inf
) -> None:
    import mechprobe.core._readout as ro

    vocab, d_model = 20_000, 16
    # Blocks of a few rows: within one entry's queries (13 queries, 5 rows), across entries
    # (3 queries, 7 rows: two entries per block) and chunks that split the queries (8 of 13).
    monkeypatch.setattr(ro, "_SWEEP_BYTES", sweep_rows * vocab * 4)
    model = _Linear(d_model, vocab, seed=n, minus_inf=minus_inf)
    monkeypatch.setattr(ro, "model_adapter", lambda m: m)  # the stand-in is its own adapter
    gen = torch.Generator().manual_seed(1)
    final = torch.randn(n, d_model, generator=gen)
    vecs = [final * 0.3 + torch.randn(n, d_model, generator=gen) for _ in range(4)]
    # The final vectors themselves (decoded once, with the final distribution) and a copy of them
    # (decoded as any other entry) in the middle of the list.
    vecs[1:1] = [final, final.clone()]
    ids = torch.randint(0, vocab, (n, 2), generator=gen)
    ids[0, 1] = 150  # a token at -inf
    readout = ro.Readout(model, chunk)
    assert readout._rows == min(chunk, sweep_rows)
    got = readout.grid(vecs, final, ids, top_k=5)
    want = _plain_stats(model, vecs, final, ids, top_k=5)
    for key in ("entropy", "kl", "logprob"):
        torch.testing.assert_close(got[key].double(), want[key], atol=2e-5, rtol=0, msg=key)
    torch.testing.assert_close(got["top_probs"].double(), want["top"], atol=1e-6, rtol=1e-5)
    assert torch.equal(got["rank"], want["rank"])
    assert (got["kl"][:, 1] == 0).all()  # the final layer against itself
    assert got["kl"][:, 2].abs().max() < 1e-5  # its copy, decoded again
    for key in ("top_ids", "rank"):
        assert torch.equal(got[key][:, 1], got[key][:, 2])
    lp = readout.token_logprobs(vecs, ids[:, 0])
    torch.testing.assert_close(lp.double(), want["logprob"][:, :, 0], atol=2e-5, rtol=0)


def test_log_sum_exp_is_exact_at_a_full_vocabulary(monkeypatch) -> None:
    # Softmax's own normaliser is rounded: at V = 49,152 its probabilities summed to 1 +- 1e-5,
    # which would put log p_top (and every log-probability) off by as much. The readout divides by
    # the exact sum of the probabilities; what is left is the rounding of the logits themselves.
    import mechprobe.core._readout as ro
    from mechprobe.core._readout import Readout

    monkeypatch.setattr(ro, "model_adapter", lambda m: m)  # the stand-in is its own adapter
    model = _Linear(d_model=8, vocab=49_152, seed=3, minus_inf=False)
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    tokens = torch.arange(40) * 1000
    readout = Readout(model, 64)
    lp = readout.token_logprobs([x], tokens)[:, 0]
    z = torch.addmm(model.b_U, model.ln_final(x), model.W_U).double()
    want = torch.log_softmax(z, -1)[torch.arange(40), tokens]
    assert float(z.abs().max()) > 20  # large logits: the float32 sums are at their worst
    torch.testing.assert_close(lp.double(), want, atol=3e-6, rtol=0)
    # The final distribution against itself: KL 0 up to the rounding of the logits.
    grid = readout.grid([x], x, tokens[:, None], top_k=1)
    assert float(grid["kl"].abs().max()) < 3e-6
    torch.testing.assert_close(grid["logprob"][:, 0, 0].double(), want, atol=3e-6, rtol=0)
