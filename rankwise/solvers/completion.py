"""Robust alternating minimisation for matrix completion, with sketched inexact least-squares updates.

Gu, Song, Yin & Zhang, "Low rank matrix completion via robust alternating minimization in nearly
linear time", arXiv 2302.11068 (on the AltMinComplete skeleton of Jain, Netrapalli & Sanghavi 2013).

Observations come as index arrays `(rows, cols, values)` — never a dense mask — so memory is
O(|Omega| + (m + n) k)::

    U_0 = top-k left singular vectors of (1/p) P_Omega(M)          (scipy sparse svds)
    repeat T times:
        V^ = argmin_V ||P_Omega(U V^T - M)||   one k-dim least squares per column
        V  = qr(V^).Q
        U^ = argmin_U ||P_Omega(U V^T - M)||   one per row
        U  = qr(U^).Q            (the last U^ is kept un-normalised: M ~ U^ V^T)

The paper's point is that each least-squares solve may be *inexact*: a CountSketch of the k-column
design `U[I_j]` (s = 2k rows) gives a QR preconditioner R, then conjugate gradients on the
preconditioned normal equations stops at relative residual `delta`. Geometric convergence survives,
with a final error floor ~ delta, at O(|Omega| k log(1/delta)) per sweep instead of O(|Omega| k^2).
All columns are solved at once as one batched CG; `solver="exact"` forms the k x k normal
equations instead (batched Cholesky) for comparison.

`solver="auto"` (the default) picks by `choose_solver`: measured on exact rank-r problems with
3 n r ln n samples (bench/completion_solver_choice.py), the exact normal equations were 2.8-8.7x
faster at every rank (5-40) and size (1000-4000), because batched CG needs ~k passes over the
observations (each O(|Omega| k)) per half-sweep where forming the Gram matrices is one O(|Omega| k^2) pass.
"""
from __future__ import annotations

from typing import Callable

import warnings

import numpy as np
import torch

from rankwise.core.errors import ConfigError, ShapeError
from rankwise.linalg import seeded_generator
from rankwise.solvers.result import SolverResult, Stopwatch, require_finite, require_positive, require_rank

# entries; above this only the factors are returned. 1e6 (8 MB) keeps memory linear in |Omega| at scale: a
# 2000 x 2000 problem with 1e5 observations would otherwise end by forming a 32 MB dense matrix for 2.4 MB of data
_DENSE_SOLUTION_LIMIT = 1_000_000
_CHUNK = 1 << 14  # observations per chunk when forming k x k outer products (exact solver): bounds its memory
SOLVERS = ("auto", "sketch", "exact")
AUTO_MEASURED_MAX_RANK = 40  # the largest rank in bench/results/completion_solver_choice.json


def choose_solver(rank: int, shape: tuple[int, int], observations: int) -> str:
    """The least-squares solver `solver="auto"` uses. Measured rule: "exact" at every rank and size.

    Per half-sweep, exact costs one O(|Omega| k^2) pass (plus n k^3 / 3 for the Cholesky factors); sketched
    CG costs c passes of O(|Omega| k), c = CG steps per half-sweep. Sketch could only win if c << k, but the
    bench (n = 1000-4000, r = 5-40, 3 n r ln n samples, default delta = 1e-10 with warm starts) measured
    c ~ 0.7-1.1 k and exact 2.8-8.7x faster at equal error in the same number of sweeps; exact also holds
    less memory (n k^2 Gram entries against n (2k + k) k sketch entries). So neither the rank nor the sizes
    flip the choice in the measured range (rank <= AUTO_MEASURED_MAX_RANK); above it the cost model gives
    no reason to switch either. At 1e5 and 1e6 observations (bench/completion_scale.py, up to 20000 x 20000)
    exact stayed 4-8x faster per sweep with the same held-out error. `shape` and `observations` are kept so a measured size term can be added.
    """
    del rank, shape, observations  # the measured time ratio did not depend on them (see the docstring)
    return "exact"


def _check_observations(rows, cols, values, shape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, cols, values = (torch.as_tensor(a) for a in (rows, cols, values))
    if len(shape) != 2 or min(shape) < 1:
        raise ShapeError(f"shape must be (m, n) with m, n >= 1, got {tuple(shape)}.")
    if rows.dim() != 1 or cols.dim() != 1 or values.dim() != 1 or not (len(rows) == len(cols) == len(values)):
        raise ShapeError(
            f"rows, cols and values must be 1-D arrays of equal length, got {tuple(rows.shape)}, "
            f"{tuple(cols.shape)}, {tuple(values.shape)}."
        )
    if rows.is_floating_point() or cols.is_floating_point():
        raise ShapeError("rows and cols must be integer index arrays.")
    require_finite("values", values)
    m, n = shape
    if int(rows.min()) < 0 or int(rows.max()) >= m or int(cols.min()) < 0 or int(cols.max()) >= n:
        raise ShapeError(f"an observation index is outside the matrix shape {m}x{n}: check rows/cols (0-based).")
    return rows.long(), cols.long(), values.double()


def _initial_left_factor(rows, cols, values, shape, rank, seed) -> torch.Tensor:
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import svds

    p = len(values) / (shape[0] * shape[1])
    sparse = coo_matrix((values.numpy() / p, (rows.numpy(), cols.numpy())), shape=shape).tocsr()
    if rank >= min(shape):  # svds needs k < min(shape)
        U = np.linalg.svd(sparse.toarray(), full_matrices=False)[0][:, :rank]
    else:
        v0 = np.random.default_rng(seed).standard_normal(min(shape))
        U = svds(sparse, k=rank, v0=v0)[0]
    return torch.linalg.qr(torch.from_numpy(np.ascontiguousarray(U))).Q


class _Groups:
    """Observations sorted by the factor being solved for (columns when solving V, rows when solving U).

    Sorting once makes every per-group sum a CSR sparse x dense product: O(|Omega|) memory, no dense mask.
    """

    def __init__(self, groups: torch.Tensor, other: torch.Tensor, values: torch.Tensor, n_groups: int):
        order = torch.argsort(groups, stable=True)
        self.groups, self.other, self.values, self.n_groups = groups[order], other[order], values[order], n_groups
        counts = torch.bincount(self.groups, minlength=n_groups)
        crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR is beta": we only use CSR @ dense
            self.summer = torch.sparse_csr_tensor(
                crow, torch.arange(len(order)), torch.ones(len(order), dtype=torch.float64), size=(n_groups, len(order)),
            )

    def sum(self, per_observation: torch.Tensor) -> torch.Tensor:
        """(|Omega|, c) -> (n_groups, c): the sum over each group's observations."""
        return self.summer @ per_observation


def _exact_solve(basis_rows: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Per group g: argmin_v ||U_I v - b|| via the k x k normal equations (O(|Omega| k^2))."""
    k = basis_rows.shape[1]
    gram = torch.zeros(groups.n_groups, k * k, dtype=torch.float64)
    for start in range(0, len(groups.groups), _CHUNK):
        rows = basis_rows[start:start + _CHUNK]
        gram.index_add_(0, groups.groups[start:start + _CHUNK], (rows[:, :, None] * rows[:, None, :]).reshape(-1, k * k))
    rhs = groups.sum(basis_rows * groups.values[:, None])
    gram = gram.reshape(-1, k, k)
    # a group with fewer than k observations is under-determined: a tiny ridge keeps the solve defined
    ridge = 1e-12 * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1.0)
    gram = gram + ridge[:, None, None] * torch.eye(k, dtype=torch.float64)
    return torch.cholesky_solve(rhs[:, :, None], torch.linalg.cholesky(gram))[:, :, 0]


def _sketched_cg_solve(
    basis_rows: torch.Tensor, groups: _Groups, delta: float, sketch_size: int, max_cg: int,
    generator: torch.Generator, start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Same problems as `_exact_solve`, solved to relative normal-equation residual `delta`.

    Preconditioner: R from QR of a CountSketch S U_I (s rows per group: each observation is hashed
    to one of s buckets with a random sign). CG then runs on W^T W z = W^T b, W = U_I R^{-1}, whose
    condition number is O(1) with high probability; x = R^{-1} z. It stops for a group when
    ||W^T r|| <= delta ||W^T b||; `start` warm-starts from a previous solution.
    """
    k = basis_rows.shape[1]
    n_groups = groups.n_groups
    bucket = torch.randint(sketch_size, (len(groups.groups),), generator=generator)
    sign = torch.randint(2, (len(groups.groups),), generator=generator, dtype=torch.float64) * 2 - 1
    sketch = torch.zeros(n_groups * sketch_size, k, dtype=torch.float64)
    sketch.index_add_(0, groups.groups * sketch_size + bucket, basis_rows * sign[:, None])
    # a tiny ridge (1e-12 of the group's energy) keeps groups with fewer than k observations well posed;
    # it enters the preconditioner as k extra sketch rows sqrt(ridge) I
    ridge = 1e-12 * groups.sum((basis_rows * basis_rows).sum(1, keepdim=True))[:, 0].clamp_min(1e-300)
    eye = torch.eye(k, dtype=torch.float64).expand(n_groups, k, k) * ridge.sqrt()[:, None, None]
    R = torch.linalg.qr(torch.cat([sketch.reshape(n_groups, sketch_size, k), eye], dim=1), mode="r")[1]

    def r_inv(z):  # R^{-1} z, batched
        return torch.linalg.solve_triangular(R, z[:, :, None], upper=True)[:, :, 0]

    def r_inv_t(z):  # R^{-T} z
        return torch.linalg.solve_triangular(R.transpose(1, 2), z[:, :, None], upper=False)[:, :, 0]

    def normal_op(z):  # W^T W z
        x = r_inv(z)
        return r_inv_t(groups.sum(basis_rows * (basis_rows * x[groups.groups]).sum(1, keepdim=True)) + ridge[:, None] * x)

    rhs = r_inv_t(groups.sum(basis_rows * groups.values[:, None]))  # W^T b
    stop = (delta**2) * (rhs * rhs).sum(1)
    if start is None:
        z, residual = torch.zeros_like(rhs), rhs
    else:
        z = (R @ start[:, :, None])[:, :, 0]
        residual = rhs - normal_op(z)
    direction = residual.clone()
    rho = (residual * residual).sum(1)
    steps = 0
    for steps in range(1, max_cg + 1):
        active = rho > stop
        if not bool(active.any()):
            steps -= 1
            break
        q = normal_op(direction)
        alpha = torch.where(active, rho / (direction * q).sum(1).clamp_min(1e-300), torch.zeros_like(rho))
        z = z + alpha[:, None] * direction
        residual = residual - alpha[:, None] * q
        rho_new = (residual * residual).sum(1)
        beta = torch.where(active, rho_new / rho.clamp_min(1e-300), torch.zeros_like(rho))
        direction = residual + beta[:, None] * direction
        rho = torch.where(active, rho_new, rho)
    return r_inv(z), steps


def factor_relative_error(U, V, target_U, target_V) -> float:
    """||U V^T - U* V*^T||_F / ||U* V*^T||_F in O((m + n) k^2), without forming either matrix.

    The difference is [U, -U*] [V, V*]^T; QR of both tall factors reduces it to a 2k x 2k product.
    (Expanding the Gram terms instead cancels catastrophically and floors at ~1e-8 in float64.)
    """
    R_left = torch.linalg.qr(torch.cat([U, -target_U], 1), mode="r").R
    R_right = torch.linalg.qr(torch.cat([V, target_V], 1), mode="r").R
    R_target_left = torch.linalg.qr(target_U, mode="r").R
    R_target_right = torch.linalg.qr(target_V, mode="r").R
    target_norm = float(torch.linalg.norm(R_target_left @ R_target_right.T))
    return float(torch.linalg.norm(R_left @ R_right.T)) / max(target_norm, 1e-300)


def altmin_completion(
    rows, cols, values, shape: tuple[int, int], rank: int,
    *,
    iterations: int = 30,
    solver: str = "auto",
    delta: float = 1e-10,
    sketch_size: int | None = None,
    max_cg: int = 60,
    warm_start: bool = True,
    forcing: float = 0.0,
    tol: float = 0.0,
    seed: int = 0,
    target: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> SolverResult:
    """Complete an m x n matrix of rank `rank` from observed entries `values[i]` at `(rows[i], cols[i])`.

    Args:
        solver: "auto" (default: `choose_solver` picks the faster of the two from the rank), "sketch"
            (sketch-preconditioned CG to relative residual `delta`, the paper's inexact update) or
            "exact" (normal equations). `info["solver"]` says which one ran.
        sketch_size: CountSketch rows per column (default 2k).
        max_cg: cap on CG steps per half-sweep.
        warm_start: start each CG from the current model written in the new basis (few steps once
            the iterates settle); False starts from zero as in the paper's analysis.
        forcing: > 0 solves each sweep only to max(delta, forcing * current observed error) (an
            inexact-Newton forcing term: accuracy where it matters, few CG steps early on).
        tol: stop when the tracked relative error (against `target` if given, else on the observed
            entries) is <= tol.
        target: optional ground truth, dense (m x n) or factors (U*, V*), to record `rel_err`.
        callback: called as callback(t, U, V) after every sweep (M ~ U V^T).

    Returns a `SolverResult` with `factors=(U, V)` (M ~ U @ V.T), `solution` the dense U V^T when it
    has at most 1e6 entries (else None: nothing m x n is formed, memory stays O(|Omega| + (m + n) k)), histories `observed_rel_err`, `seconds`, and `rel_err` with a
    target; `info["cg_steps"]` is the total number of CG steps.
    """
    rows, cols, values = _check_observations(rows, cols, values, shape)
    m, n = shape
    require_rank("rank", rank, min(m, n), "min(m, n) of the matrix")
    if solver not in SOLVERS:
        raise ConfigError(f"solver={solver!r} is invalid: expected one of {SOLVERS}.")
    if solver == "auto":
        solver = choose_solver(rank, (m, n), len(values))
    require_positive("delta", delta, 1.0, inclusive_upper=False)
    sketch_size = 2 * rank if sketch_size is None else sketch_size
    if not isinstance(sketch_size, int) or sketch_size < rank:
        raise ConfigError(f"sketch_size={sketch_size} is smaller than rank={rank}: use at least rank (2*rank is typical).")
    if isinstance(target, torch.Tensor) and tuple(target.shape) != (m, n):
        raise ShapeError(f"target has shape {tuple(target.shape)}, expected {(m, n)}.")

    generator = seeded_generator(seed)
    values_norm = float(torch.linalg.norm(values))
    history: dict[str, list[float]] = {"observed_rel_err": [], "seconds": []}
    if target is not None:
        history["rel_err"] = []
    cg_steps = 0

    by_column = _Groups(cols, rows, values, n)  # solving V: one problem per column
    by_row = _Groups(rows, cols, values, m)

    def solve(basis, groups, start):
        nonlocal cg_steps
        observed = history["observed_rel_err"]
        tolerance = max(delta, forcing * observed[-1]) if forcing > 0 and observed else delta
        basis_rows = basis[groups.other]
        if solver == "exact":
            return _exact_solve(basis_rows, groups)
        solution, steps = _sketched_cg_solve(
            basis_rows, groups, tolerance, sketch_size, max_cg, generator, start if warm_start else None
        )
        cg_steps += steps
        return solution

    t = 0
    V_hat = None
    with Stopwatch() as clock:
        U = _initial_left_factor(rows, cols, values, shape, rank, seed)
        for t in range(1, iterations + 1):
            # warm start: the current model U_hat V^T = U (R_U V^T) written in the new basis U
            V_hat = solve(U, by_column, None if V_hat is None else V @ R_U.T)
            V, R_V = torch.linalg.qr(V_hat)
            U_hat = solve(V, by_row, U @ R_V.T)
            observed = (U_hat[rows] * V[cols]).sum(1) - values
            history["observed_rel_err"].append(float(torch.linalg.norm(observed)) / max(values_norm, 1e-300))
            if target is not None:
                if isinstance(target, torch.Tensor):
                    error = float(torch.linalg.norm(U_hat @ V.T - target.double()) / torch.linalg.norm(target.double()))
                else:
                    error = factor_relative_error(U_hat, V, target[0].double(), target[1].double())
                history["rel_err"].append(error)
            history["seconds"].append(clock.elapsed())
            if callback is not None:
                callback(t, U_hat, V)
            tracked = history["rel_err" if target is not None else "observed_rel_err"][-1]
            if tracked <= tol:
                break
            U, R_U = torch.linalg.qr(U_hat)
    solution = U_hat @ V.T if m * n <= _DENSE_SOLUTION_LIMIT else None
    return SolverResult(
        solution=solution, factors=(U_hat, V), history=history, iterations=t, seconds=clock.seconds,
        info={"cg_steps": cg_steps, "observations": len(values), "solver": solver, "warm_start": warm_start},
    )

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "altmin-completion", "paper": "2302.11068", "runs": "rankwise solve complete; rankwise.solvers.altmin_completion",
     "summary": "robust alternating minimisation for matrix completion"},
)
