"""The switch that forces the solver's kernel paths, and the solver under the lowest instruction set."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mechprobe as mp
from mechprobe._fit import _paths as solver_paths
from mechprobe._fit import _preconditioner as _preconditioner
from mechprobe._fit._paths import SolverPath, current_solver_path


def test_presets_and_settings_parse() -> None:
    assert SolverPath.parse("portable") == SolverPath("matmul", "float32")
    assert SolverPath.parse(" AUTO ") == SolverPath("auto", "auto")
    assert SolverPath.parse("gram=bfloat16") == SolverPath("auto", "bfloat16")
    assert SolverPath.parse("products=onednn, gram=float32") == SolverPath("onednn", "float32")
    with pytest.raises(ValueError, match=r"'portable' or e\.g\."):
        SolverPath.parse("fast")
    with pytest.raises(ValueError, match="products must be one of"):
        SolverPath.parse("products=mkl")
    with pytest.raises(ValueError, match="gram must be one of"):
        mp.SolverPath(gram="float16")  # type: ignore[arg-type]


def test_environment_variable_and_context_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MECHPROBE_SOLVER_PATH", "portable")
    assert current_solver_path() == SolverPath("matmul", "float32")
    with mp.solver_path(gram="bfloat16") as inner:  # starts from the path in force
        assert inner == SolverPath("matmul", "bfloat16") == current_solver_path()
        with mp.solver_path("auto"):
            assert current_solver_path() == SolverPath("auto", "auto")
        assert current_solver_path() == inner
    assert current_solver_path() == SolverPath("matmul", "float32")
    with pytest.raises(KeyError), mp.solver_path(products="matmul"):
        raise KeyError("restored on errors too")
    assert current_solver_path().products == "matmul"  # the environment's again


def test_forcing_onednn_where_it_cannot_run_fails_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver_paths, "_onednn_works", lambda: False)
    with (
        pytest.raises(RuntimeError, match="products='onednn' was forced"),
        mp.solver_path(products="onednn"),
    ):
        pass
    assert not SolverPath("auto").uses_onednn()  # auto quietly takes matmul


def test_gram_choice_follows_the_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    x32, x64 = torch.randn(50, 4), torch.randn(50, 4, dtype=torch.float64)
    assert SolverPath(gram="bfloat16").uses_bfloat16_gram(x64)  # forced: any float dtype
    assert not SolverPath(gram="float32").uses_bfloat16_gram(x32)
    assert not SolverPath(gram="auto").uses_bfloat16_gram(x64)  # auto: float32 only
    seen: list[torch.dtype] = []
    cholesky = torch.linalg.cholesky_ex

    def spy(matrix: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(matrix.dtype)
        return cholesky(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    sample = torch.randn(1, 300, 8)
    mean, curvature = sample.mean(1).double(), torch.full((1, 300), 0.25)
    with mp.solver_path(gram="bfloat16"):
        low = _preconditioner.preconditioner(sample, mean, curvature, 1e-3)
    with mp.solver_path(gram="float32"):
        exact = _preconditioner.preconditioner(sample, mean, curvature, 1e-3)
    assert seen == [torch.float32, torch.float32]  # the factor is always taken in the dtype of X
    # a bfloat16 Gram is a rounded Gram: close, not equal
    assert 0 < float((low - exact).abs().max()) < 0.05 * float(exact.abs().max())


@pytest.mark.skipif(
    sys.platform != "linux", reason="instruction-set variables are read on Linux x86"
)
@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() in {"AVX2", "DEFAULT"},
    reason="this CPU has no AVX-512: the suite itself already runs at the lowest instruction set",
)
def test_solver_tests_pass_under_the_lowest_instruction_set() -> None:
    # As on a CPU without AMX or AVX-512 (or on one with them, forced off): PyTorch's kernels and
    # oneDNN are limited to AVX2 for the whole child process.
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")
    root = Path(__file__).resolve().parent.parent
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert probe.stdout.strip() in {"AVX2", "DEFAULT"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_logistic.py",
            "-k",
            "sklearn or float32 or gradient",
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
