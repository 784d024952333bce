"""SubGM: sub-gradient method for robust over-parameterised matrix sensing.

Ma & Fattahi, "Global convergence of sub-gradient method for robust matrix recovery: small
initialization, noisy measurements, and over-parameterization", arXiv 2202.08788.

Problem: recover a PSD rank-r matrix X* (d x d) from `y_i = <A_i, X*> + s_i`, where a fraction of the
`s_i` are arbitrary (large) outliers. Fit `min_U (1/m) ||y - A(U U^T)||_1` with U (d x r'), r' >= r,
possibly r' = d (the rank need not be known)::

    U_0 = alpha * B / ||B||_2              B Gaussian (d x r'), alpha tiny (1e-8)
    res = A(U_t U_t^T) - y                 (m,)
    D_t = (1/m) sum_i sign(res_i) (A_i + A_i^T) U_t      a sub-gradient of the l1 loss
    U_{t+1} = U_t - eta_0 rho^t D_t        geometric step decay

Small initialisation is what makes the method agnostic to r': the spurious directions start at
alpha and never grow, so the error floor shrinks polynomially with alpha.

Budget rule (spec): the total step budget eta_0 / (1 - rho) must be large enough for the signal to
grow from alpha to 1 (about 50 with sigma_1(X*) = 1). `normalize=True` rescales y so that the
defaults apply whatever the scale of X*, and undoes the scaling on the solution.
"""
from __future__ import annotations

import math

import torch

from rankwise.linalg import relative_error, seeded_generator
from rankwise.solvers.result import (
    SolverResult,
    Stopwatch,
    measurement_tensor,
    require_positive,
    require_rank,
)

# median |N(0, 1)|: turns the median of |y| into a robust estimate of ||X*||_F for Gaussian A_i
_HALF_NORMAL_MEDIAN = 0.6744897501960817


def subgm(
    A: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    *,
    init_scale: float = 1e-8,
    step: float = 0.5,
    decay: float = 0.99,
    iterations: int = 3000,
    tol: float = 0.0,
    normalize: bool = True,
    seed: int = 0,
    target: torch.Tensor | None = None,
) -> SolverResult:
    """Recover a PSD low-rank X from measurements with outliers by SubGM on the l1 loss.

    Args:
        A: (m, d, d) measurement matrices. y: (m,) measurements, possibly with gross outliers.
        rank: search rank r' (may over-estimate the true rank, up to d).
        init_scale: alpha, the norm of the initial U (small: 1e-8).
        step: eta_0 in the step schedule eta_t = step * decay**t.
        decay: the schedule's geometric factor (eta_t = step * decay**t).
        iterations: maximum number of steps; `tol > 0` stops earlier when ||U_{t+1}-U_t|| <= tol ||U_t||.
        normalize: divide y by a robust estimate of ||X*||_F (median |y| / 0.674) so the default
            steps fit any scale; the returned solution is rescaled back.
        target: optional X* to record `rel_err` in the history.

    Returns a `SolverResult` with `solution = U U^T` (d x d), `factors = (U,)` and histories
    `loss` (mean absolute residual) and, with `target`, `rel_err`.
    """
    A, y = measurement_tensor(A, y, square=True)
    m, d, _ = A.shape
    require_rank("rank", rank, d, "the matrix size d")
    require_positive("init_scale", init_scale)
    require_positive("step", step)
    require_positive("decay", decay, 1.0)
    if iterations < 1:
        raise ValueError(f"iterations={iterations} is invalid: expected >= 1.")

    scale = float(y.abs().median()) / _HALF_NORMAL_MEDIAN if normalize else 1.0
    if scale <= 0:
        scale = 1.0
    A_flat = A.reshape(m, d * d)
    y_work = y / scale
    target_work = None if target is None else target.double() / scale

    B = torch.randn(d, rank, generator=seeded_generator(seed), dtype=torch.float64)
    U = init_scale * B / torch.linalg.matrix_norm(B, ord=2)
    history: dict[str, list[float]] = {"loss": []}
    if target_work is not None:
        history["rel_err"] = []

    eta = step
    t = 0
    with Stopwatch() as clock:
        for t in range(1, iterations + 1):
            residual = A_flat @ (U @ U.T).reshape(-1) - y_work
            history["loss"].append(float(residual.abs().mean()) * scale)
            S = (torch.sign(residual) @ A_flat).reshape(d, d) / m
            update = eta * ((S + S.T) @ U)
            U = U - update
            eta *= decay
            if target_work is not None:
                history["rel_err"].append(relative_error(U @ U.T, target_work))
            if tol > 0 and torch.linalg.norm(update) <= tol * torch.linalg.norm(U):
                break
    U = U * math.sqrt(scale)
    return SolverResult(
        solution=U @ U.T, factors=(U,), history=history, iterations=t, seconds=clock.seconds,
        info={"scale": scale},
    )

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "subgm", "paper": "2202.08788", "runs": "rankwise solve subgm; rankwise.solvers.subgm",
     "summary": "sub-gradient method for robust over-parameterised sensing"},
)
