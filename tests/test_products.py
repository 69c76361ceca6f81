"""The narrow products behind probe fitting equal torch.matmul, on every path they take."""

from __future__ import annotations

import pytest
import torch

import mechprobe as mp
from mechprobe._fit import _products as _products
from mechprobe._fit._paths import _onednn_works


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_products_equal_matmul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(10, 64, generator=gen, dtype=dtype)
    x = torch.randn(3000, 64, generator=gen, dtype=dtype)
    g = torch.randn(10, 3000, generator=gen, dtype=dtype)
    reference_forward = (w.double() @ x.double().T).to(dtype)
    reference_backward = (g.double() @ x.double()).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(
        _products.times_transposed(w, x), reference_forward, rtol=tol, atol=tol
    )
    torch.testing.assert_close(_products.times(g, x), reference_backward, rtol=tol, atol=tol)


def test_strided_inputs_take_matmul_and_agree() -> None:
    gen = torch.Generator().manual_seed(1)
    stacked = torch.randn(2000, 3, 64, generator=gen)
    x = stacked[:, 1]  # a strided layer view: oneDNN would copy it, so matmul runs instead
    w, g = torch.randn(10, 64, generator=gen), torch.randn(10, 2000, generator=gen)
    assert not _products._fast(w, x)
    torch.testing.assert_close(_products.times_transposed(w, x), w @ x.T)
    torch.testing.assert_close(_products.times(g, x), g @ x)


def test_fast_path_is_taken_where_onednn_works() -> None:
    w, x = torch.randn(10, 64), torch.randn(100, 64)
    assert _products._fast(w, x) == _onednn_works()
    assert not _products._fast(w.double(), x.double())
    with mp.solver_path(products="matmul"):
        assert not _products._fast(w, x)


def test_products_equal_matmul_on_every_path(every_solver_path) -> None:
    gen = torch.Generator().manual_seed(2)
    w, x = torch.randn(10, 64, generator=gen), torch.randn(3000, 64, generator=gen)
    assert _products._fast(w, x) == (every_solver_path.products == "onednn")
    torch.testing.assert_close(
        _products.times_transposed(w, x), (w.double() @ x.double().T).float(), rtol=1e-4, atol=1e-4
    )
