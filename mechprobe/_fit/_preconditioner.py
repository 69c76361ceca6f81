"""The preconditioner of the batched logistic fits: a Cholesky factor of the loss's Hessian.

Multinomial logistic regression's Hessian is ``E[(diag p - p pᵀ) ⊗ (x - μ)(x - μ)ᵀ] + l2 I``. Up to
its class structure it is ``E[c_i (x_i - μ)(x_i - μ)ᵀ] + l2 I`` with ``c_i`` the softmax curvature
``mean_k p_ik (1 - p_ik)`` of row ``i``. The fits whiten their weights by the Cholesky factor of that
matrix, estimated on 4,096-8,191 evenly spaced rows (all rows of smaller sets), so that L-BFGS
sees a well-conditioned problem on correlated features (activations are). The Gram matrix is
computed in bfloat16 or in the features' dtype as :func:`mechprobe.solver_path` decides; either
factor preconditions the same problem, so the optimum does not depend on it.

How many rows: fewer cost more passes than their Gram saves (SmolLM2 POS activations, 10,097
rows, probe_layers: 21.9 evaluations per layer with all 8,078 training rows, 35.2 with 4,039 or
2,693, a few layers taking 60-135); more than 4,096-8,191 did not pay at 100,970 rows (layers
10-16: 22.9, 34.4, 23.3 and 21.6 evaluations with 4,252, 8,975, 20,194 and 40,388 rows;
25.6, 39.0, 30.2 and 32.0 s on one thread). The count is sensitive to the factor: a layer whose
factor fits its curvature badly can take 40-130 evaluations where its neighbours take 15-25.
The first factor alone is as sensitive: built on every second (third) of 1,600 training rows,
probe_layers took 20.9 (23.9) evaluations per layer instead of 13.9 at 2,000 rows, 2.19 (2.59) s
instead of 1.67 s on one thread with the AVX2 paths forced, where the float32 Gram matrices are
a fifth of the time (at 10,097 rows too: 2.2 of 9.8 s, beside 4.5 s of products).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechprobe._fit._paths import current_solver_path

PRECONDITIONER_ROWS = 4096  # rows are taken with stride n // this: 4,096 to 8,191 of them


def preconditioner(
    sample: Tensor,
    mean: Tensor,
    curvature: Tensor,
    l2: float,
    inv_scale: Tensor | None = None,
) -> Tensor:
    """Cholesky factor of ``E[c_i (f_i - μ)(f_i - μ)ᵀ] + l2 I`` per problem, over sample rows.

    ``sample [b, s, d]``, ``mean [b, d]`` (of the features ``f = x · inv_scale``), ``curvature
    [b, s]``. ``c_i`` is the softmax curvature at row ``i``, so the factor approximates the Hessian
    of the loss (Böhning's bound with ``c_i = 1/4`` fits early iterations, but once predictions
    are confident the true curvature is far smaller and whitening by the full covariance would
    ill-condition a problem that ``l2`` keeps well-conditioned).
    """
    dtype, d = sample.dtype, sample.shape[2]
    eye = torch.eye(d, dtype=dtype, device=sample.device)
    fast = current_solver_path().uses_bfloat16_gram(sample)
    factors = []
    for i, c in enumerate(curvature):
        uniform = bool((c == c[0]).all())
        weight = float(c[0]) / len(c) if uniform else 1.0 / len(c)
        for low in (True, False) if fast else (False,):
            # bfloat16 products are ~4x faster where the CPU has them; a preconditioner need not
            # be exact, but their rounding may cost definiteness: then the dtype of the sample.
            # Centred (and scaled) rows are written once, straight in the Gram's dtype.
            rows = torch.empty(
                sample[i].shape, dtype=torch.bfloat16 if low else dtype, device=sample.device
            )
            centred = rows if uniform else torch.empty_like(sample[i])
            if inv_scale is None:
                torch.sub(sample[i], mean[i].to(dtype), out=centred)
            else:
                torch.addcmul(-mean[i].to(dtype), sample[i], inv_scale[i], out=centred)
            if not uniform:
                torch.mul(centred, c.sqrt()[:, None], out=rows)
            second = gram(rows).to(dtype).mul_(weight).add_(eye, alpha=l2)
            factor, info = torch.linalg.cholesky_ex(second)
            if int(info) == 0:
                break
        factors.append(factor)
    return torch.stack(factors)


def change_factor(old: Tensor, new: Tensor, block: Tensor, *, gradients: bool) -> Tensor:
    """Re-express vectors whitened by Cholesky factor ``old`` in the variables of ``new``.

    With weights ``W = L⁻ᵀ V`` fixed, ``V' = L'ᵀ L⁻ᵀ V`` (points and steps) and gradients map by
    ``L'⁻¹ L``. ``old``, ``new`` are ``[..., d, d]``; ``block [..., d, r]`` holds ``r`` vectors as
    columns (one solve and one product for all of them).

    Example:
        >>> import torch
        >>> A = torch.randn(4, 4, dtype=torch.float64)
        >>> old = torch.linalg.cholesky(A @ A.T + torch.eye(4, dtype=torch.float64))
        >>> new = torch.linalg.cholesky(A.T @ A + torch.eye(4, dtype=torch.float64))
        >>> V, G = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
        >>> W = torch.linalg.solve_triangular(old.mT, V, upper=True)
        >>> V2 = change_factor(old, new, V, gradients=False)
        >>> torch.allclose(torch.linalg.solve_triangular(new.mT, V2, upper=True), W)
        True
        >>> G2 = change_factor(old, new, G, gradients=True)  # pairings gᵀv are kept
        >>> torch.allclose((G2 * V2).sum(0), (G * V).sum(0))
        True
    """
    if gradients:
        return torch.linalg.solve_triangular(new, old @ block, upper=False)
    return new.mT @ torch.linalg.solve_triangular(old.mT, block, upper=True)


def gram(rows: Tensor, blocks: int = 4) -> Tensor:
    """``rowsᵀ rows`` for ``rows [n, d]``, from the products of its lower block triangle.

    A Gram matrix is symmetric: of ``blocks²`` block products, the ``blocks (blocks + 1) / 2``
    on and below the diagonal determine it. With four blocks that is 10 of 16, measured 27%
    faster than the full product at 8,000 x 576 (float32, 2 threads; 1.26x at 1,600 rows).
    numpy's ``a.T @ a`` (OpenBLAS's syrk) was faster still in float32 on the project's AMD EPYC
    (one thread: 5.9-6.3 vs 8.1-8.4 ms at 1,600 x 576, 31-34 vs 48 ms at 8,078), about 5% of
    ``probe_layers`` at 2,000 rows; not used, as OpenBLAS's own thread pool would compete with
    the probe workers' threads unless limited process-wide (scipy's ``ssyrk`` holds the GIL).

    Example:
        >>> import torch
        >>> rows = torch.randn(100, 10, dtype=torch.float64)
        >>> torch.allclose(gram(rows), rows.T @ rows)
        True
    """
    d = rows.shape[1]
    edges = [d * i // blocks for i in range(blocks + 1)]
    out = torch.empty(d, d, dtype=rows.dtype, device=rows.device)
    for i in range(blocks):
        rows_i = rows[:, edges[i] : edges[i + 1]]
        for j in range(i + 1):
            block = rows_i.T @ rows[:, edges[j] : edges[j + 1]]
            out[edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = block
            if j < i:
                out[edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = block.T
    return out


def covariance_preconditioner(covariance: Tensor, curvature: float, l2: float) -> Tensor:
    """Cholesky factor of ``curvature · C + l2 I`` per problem, from a given covariance.

    ``covariance [b, d, d]`` is ``C = E[(f - μ)(f - μ)ᵀ]`` of the features; ``curvature`` the
    uniform softmax curvature of the first iterate. The same factor as :func:`preconditioner`
    with uniform curvature, without the pass over the rows. Computed in float64.

    Example:
        >>> import torch
        >>> f = torch.randn(1, 500, 4, dtype=torch.float64)
        >>> centred = f - f.mean(1, keepdim=True)
        >>> C = centred.mT @ centred / 500
        >>> curvature = torch.full((1, 500), 0.25, dtype=torch.float64)
        >>> direct = preconditioner(f, f.mean(1), curvature, 1e-3)
        >>> torch.allclose(covariance_preconditioner(C, 0.25, 1e-3), direct)
        True
    """
    C = covariance.to(torch.float64)
    eye = torch.eye(C.shape[-1], dtype=torch.float64, device=C.device)
    return torch.linalg.cholesky(curvature * C + l2 * eye)
