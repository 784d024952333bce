"""Matrix sensing by factored gradient descent, with the one-step correction for over-parameterisation.

Xiong, Ding & Du, "How over-parameterization slows down gradient descent in matrix sensing: the
curses of symmetry and initialization", ICLR 2024, arXiv 2310.01769.

Loss `L = 1/2 ||A(M) - y||^2`, with A near-isotropic (A_i Gaussian / sqrt(m)).

* symmetric: M = X X^T, X (n x k)         X <- X - lr (S + S^T) X,   S = A^*(A(X X^T) - y)
* asymmetric: M = F G^T, F (n1 x k), G (n2 x k), simultaneous updates
      E = A^*(A(F G^T) - y);   F <- F - lr E G;   G <- G - lr E^T F

What the paper proves, and the tests check on fitted slopes:
  symmetric k > r: error ~ 1/T (sublinear); symmetric k = r and asymmetric k = r: linear;
  asymmetric k > r: linear with a rate ~ alpha^2 (small init is slow).
The one-step correction (run once, at T1, when the fit is already close) makes the rate independent
of alpha::

    S = F^T F,  s^2 = ||F G^T||_2,   F <- s F S^{-1/2},   G <- G S^{1/2} / s      (F G^T unchanged)

after which F is perfectly conditioned and the G-subproblem strongly convex. The paper's exact
formula (its eq. 5.1) was not available to us; this is the spec's reconstruction, which reproduces
the claim (see tests/methods/test_sensing.py).
"""
from __future__ import annotations

import torch

from rankwise.core.errors import ConfigError
from rankwise.linalg import relative_error, seeded_generator
from rankwise.solvers.result import (
    SolverResult,
    Stopwatch,
    measurement_tensor,
    require_positive,
    require_rank,
)


def balance_factors(F: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-step correction: re-condition F (all singular values equal) keeping F G^T exactly."""
    evals, evecs = torch.linalg.eigh(F.T @ F)
    evals = evals.clamp_min(torch.finfo(evals.dtype).tiny)
    root = (evecs * evals.sqrt()) @ evecs.T
    inv_root = (evecs * evals.rsqrt()) @ evecs.T
    s = torch.linalg.matrix_norm(F @ G.T, ord=2).sqrt()
    return s * F @ inv_root, G @ root / s


def matrix_sensing(
    A: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    *,
    symmetric: bool = False,
    init_scale: float = 0.1,
    lr: float = 0.1,
    iterations: int = 3000,
    correction_at: int | str | None = None,
    correction_threshold: float = 0.05,
    seed: int = 0,
    target: torch.Tensor | None = None,
) -> SolverResult:
    """Factored gradient descent for `y_i = <A_i, M>` with search rank `rank` (may exceed the true rank).

    Args:
        A: (m, n1, n2) measurement matrices (square for `symmetric=True`); y: (m,).
        symmetric: fit M = X X^T (PSD problems) instead of F G^T.
        init_scale: alpha; X/F start with entries N(0, (alpha/sqrt(n))^2), G with alpha/3.
        lr: constant step size.
        correction_at: asymmetric only. None: plain GD. An int: apply `balance_factors` once at that
            iteration. "auto": apply it at the first iteration where ||A(FG^T) - y|| <=
            correction_threshold * ||y|| (usable when M* is unknown).
        target: optional M* to record `rel_err` per iteration.

    Returns a `SolverResult`: `solution` M, `factors` (X,) or (F, G), histories `loss` and `rel_err`;
    `info["corrected_at"]` is the iteration the correction ran at (or None).
    """
    A, y = measurement_tensor(A, y, square=symmetric)
    m, n1, n2 = A.shape
    require_rank("rank", rank, min(n1, n2), "min(n1, n2)")
    require_positive("init_scale", init_scale)
    require_positive("lr", lr)
    if correction_at is not None and symmetric:
        raise ConfigError("correction_at applies to the asymmetric parameterisation only: set symmetric=False.")
    if isinstance(correction_at, str) and correction_at != "auto":
        raise ConfigError(f"correction_at={correction_at!r} is invalid: expected None, an iteration number or 'auto'.")

    generator = seeded_generator(seed)
    A_flat = A.reshape(m, n1 * n2)
    target = None if target is None else target.double()
    y_norm = float(torch.linalg.norm(y))

    F = torch.randn(n1, rank, generator=generator, dtype=torch.float64) * (init_scale / n1**0.5)
    G = None if symmetric else torch.randn(n2, rank, generator=generator, dtype=torch.float64) * (init_scale / (3 * n2**0.5))
    history: dict[str, list[float]] = {"loss": []}
    if target is not None:
        history["rel_err"] = []
    corrected_at = None
    t = 0
    with Stopwatch() as clock:
        for t in range(1, iterations + 1):
            M = F @ (F if symmetric else G).T
            residual = A_flat @ M.reshape(-1) - y
            history["loss"].append(0.5 * float(residual @ residual))
            if target is not None:
                history["rel_err"].append(relative_error(M, target))
            if (
                not symmetric
                and corrected_at is None
                and (
                    (correction_at == "auto" and float(torch.linalg.norm(residual)) <= correction_threshold * y_norm)
                    or (isinstance(correction_at, int) and t - 1 == correction_at)
                )
            ):
                F, G = balance_factors(F, G)
                corrected_at = t - 1
            E = (residual @ A_flat).reshape(n1, n2)
            if symmetric:
                F = F - lr * ((E + E.T) @ F)
            else:
                F, G = F - lr * (E @ G), G - lr * (E.T @ F)
    M = F @ (F if symmetric else G).T
    factors = (F,) if symmetric else (F, G)
    return SolverResult(
        solution=M, factors=factors, history=history, iterations=t, seconds=clock.seconds,
        info={"corrected_at": corrected_at},
    )

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "matrix-sensing", "paper": "2310.01769", "runs": "rankwise solve sense; rankwise.solvers.matrix_sensing",
     "summary": "factored gradient descent with the one-step correction"},
)
