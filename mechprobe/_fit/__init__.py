"""The batched logistic solver behind probes, INLP and the scalar mix (private to mechprobe).

One L-BFGS over many independent problems (``batched_lbfgs``), the multinomial L2 logistic fit of
many layers at once (``fit_logistic``), its preconditioner and products, and the switch that
forces the CPU-dependent kernel paths (``solver_path``, re-exported as :func:`mechprobe.solver_path`).
"""

from mechprobe._fit._lbfgs import batched_lbfgs
from mechprobe._fit._logistic import LogisticFit, fit_logistic, softmax_penalty
from mechprobe._fit._paths import SolverPath, current_solver_path, solver_path
from mechprobe._fit._preconditioner import (
    PRECONDITIONER_ROWS,
    change_factor,
    covariance_preconditioner,
    preconditioner,
)

__all__ = [
    "PRECONDITIONER_ROWS",
    "LogisticFit",
    "SolverPath",
    "batched_lbfgs",
    "change_factor",
    "covariance_preconditioner",
    "current_solver_path",
    "fit_logistic",
    "preconditioner",
    "softmax_penalty",
    "solver_path",
]
