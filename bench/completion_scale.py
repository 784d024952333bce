"""Matrix completion at 10^5 and 10^6 observed entries: seconds per sweep, held-out error at equal sweeps, memory.

Problem: exact rank-k (k = 10) m x n matrix M = U* V*^T with Gaussian factors; |Omega| training entries and
10,000 held-out entries drawn uniformly without replacement (index arrays only, never a dense mask). Every
method runs the same number of sweeps (one sweep = one update of each factor) in a fresh single-threaded
process; after each sweep we record the seconds (the evaluation itself is not timed) and the held-out relative
RMSE ||pred - M||_2 / ||M||_2 over the held-out entries. Memory: peak resident set above the inputs (VmHWM reset
once the problem is built) against what one dense m x n float64 matrix would take.

Methods:
- rankwise_exact / rankwise_sketch: `altmin_completion(solver=...)` with the library defaults (what `auto` picks
  is recorded as `auto_picks`).
- softimpute_als: SoftImpute-ALS, lambda = 0 (bench/bench_completion.py), an explicit-value peer.
- implicit_als_cg / implicit_als_cholesky: `implicit` 0.7.3's AlternatingLeastSquares (Hu, Koren & Volinsky 2008),
  CPU, float32, factors = k, regularization = 0.01 (its default), alpha = 1, one thread, conjugate-gradient (its
  default, 3 CG steps) or exact Cholesky updates. It solves a DIFFERENT problem, implicit feedback:
  min sum over ALL m n cells of w_ij (p_ij - x_i.y_j)^2 + 0.01 (||X||^2 + ||Y||^2), with unobserved cells
  w = 1, p = 0. Observed entries are given to it as confidence c_ij = sign(M_ij) (1 + |M_ij|), so observed cells
  get w = |M_ij| and p = 1 when M_ij > 0, p = 0 when M_ij < 0 (its negative-feedback convention; raw values in
  (-1, 1) would give negative weights). Its seconds per sweep compare the cost of one ALS sweep over the same
  sparsity pattern and rank; its held-out error against the VALUES shows it does not recover them (it is
  not an accuracy peer).

    PYTHONPATH=. python bench/completion_scale.py --out bench/results/completion_scale.json
    (--cases 1000x1000:100000 10000x10000:1000000, --append keeps other cases already in --out)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

HOLDOUT = 10_000
METHODS = ("rankwise_exact", "rankwise_sketch", "softimpute_als", "implicit_als_cg", "implicit_als_cholesky")


def make_problem(m: int, n: int, k: int, count: int, seed: int = 0):
    """(train rows, cols, values), (held-out rows, cols, values), (U*, V*): O(|Omega| + (m + n) k) memory."""
    import torch

    g = torch.Generator().manual_seed(seed)
    U = torch.randn(m, k, generator=g, dtype=torch.float64)
    V = torch.randn(n, k, generator=g, dtype=torch.float64)
    total = count + HOLDOUT
    linear = torch.unique(torch.randint(m * n, (int(total * 1.05) + 100,), generator=g))
    linear = linear[torch.randperm(len(linear), generator=g)[:total]]
    rows, cols = linear // n, linear % n
    values = (U[rows] * V[cols]).sum(1)
    return (rows[:count], cols[:count], values[:count]), (rows[count:], cols[count:], values[count:]), (U, V)


def _held_out_error(held, left, right) -> float:
    import numpy as np

    rows, cols, values = (np.asarray(a) for a in held)
    prediction = (np.asarray(left)[rows] * np.asarray(right)[cols]).sum(1)
    return float(np.linalg.norm(prediction - values) / np.linalg.norm(values))


def _run_rankwise(solver, train, held, shape, k, sweeps):
    from rankwise.solvers.completion import altmin_completion

    errors = []
    result = altmin_completion(*train, shape, k, iterations=sweeps, solver=solver,
                               callback=lambda t, U, V: errors.append(_held_out_error(held, U, V)))
    return result.history["seconds"], errors, {"cg_steps": result.info["cg_steps"],
                                               "dense_solution_formed": result.solution is not None}


def _run_softimpute(train, held, shape, k, sweeps):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_completion import soft_impute_als

    errors = []
    history, _ = soft_impute_als(*train, shape, k, max_seconds=float("inf"), max_iterations=sweeps,
                                 on_sweep=lambda t, s, left, right: errors.append(_held_out_error(held, left, right)))
    return [s for s, _ in history], errors, {}


def _run_implicit(use_cg, train, held, shape, k, sweeps):
    import numpy as np
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    rows, cols, values = (a.numpy() for a in train)
    confidence = np.sign(values) * (1.0 + np.abs(values))  # see the module docstring: weights |M|, p = [M > 0]
    user_items = sp.csr_matrix((confidence.astype(np.float32), (rows, cols)), shape=shape)
    model = AlternatingLeastSquares(factors=k, regularization=0.01, alpha=1.0, iterations=sweeps, use_cg=use_cg,
                                    num_threads=1, random_state=0, calculate_training_loss=False)
    seconds, errors = [], []

    def on_sweep(iteration, elapsed, loss):  # elapsed: this iteration only; the callback is not timed
        seconds.append((seconds[-1] if seconds else 0.0) + elapsed)
        errors.append(_held_out_error(held, model.user_factors, model.item_factors))

    start = time.perf_counter()
    model.fit(user_items, show_progress=False, callback=on_sweep)
    setup = time.perf_counter() - start - seconds[-1]  # csr checks, transpose, init (not in per-sweep times)
    return seconds, errors, {"setup_seconds": setup, "cg_steps_per_update": model.cg_steps if use_cg else None}


def _child(method, m, n, k, count, sweeps, queue):
    import sys

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import peak_rss_mib, reset_peak_rss, rss_mib

    import bench_completion  # noqa: F401  imported before the memory baseline, like the libraries below
    import implicit.cpu.als  # noqa: F401
    import scipy.sparse.linalg  # noqa: F401

    from rankwise.solvers.completion import choose_solver

    train, held, _ = make_problem(m, n, k, count)
    base_mb = rss_mib()
    reset_peak_rss()
    if method.startswith("rankwise_"):
        seconds, errors, extra = _run_rankwise(method.removeprefix("rankwise_"), train, held, (m, n), k, sweeps)
    elif method == "softimpute_als":
        seconds, errors, extra = _run_softimpute(train, held, (m, n), k, sweeps)
    else:
        seconds, errors, extra = _run_implicit(method == "implicit_als_cg", train, held, (m, n), k, sweeps)
    per_sweep = [b - a for a, b in zip([0.0] + seconds[:-1], seconds)]
    queue.put({
        "method": method, "m": m, "n": n, "rank": k, "observations": count, "held_out": HOLDOUT,
        "ratio_to_dof": count / ((m + n - k) * k), "sweeps": len(seconds), "auto_picks": choose_solver(k, (m, n), count),
        # the first sweep of ours also holds the initial sparse SVD: the median is the steady per-sweep cost
        "seconds_per_sweep_median": statistics.median(per_sweep), "first_sweep_seconds": per_sweep[0],
        "total_seconds": seconds[-1], "held_out_rel_rmse": errors,
        "final_held_out_rel_rmse": errors[-1],
        "peak_rss_above_inputs_mb": peak_rss_mib() - base_mb,
        "observations_mb": count * 3 * 8 / 2**20, "dense_matrix_mb": m * n * 8 / 2**20, **extra,
    })


def run(method, m, n, k, count, sweeps):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, m, n, k, count, sweeps, queue))
    process.start()
    result = queue.get()
    process.join()
    print(json.dumps({key: value for key, value in result.items() if key != "held_out_rel_rmse"}), flush=True)
    return result


def summarize(runs) -> list[dict]:
    out = []
    for case in sorted({(r["m"], r["n"], r["observations"]) for r in runs}):
        here = {r["method"]: r for r in runs if (r["m"], r["n"], r["observations"]) == case}
        row = {"shape": f"{case[0]}x{case[1]}", "observations": case[2]}
        for method, r in here.items():
            row[method] = {"s_per_sweep": r["seconds_per_sweep_median"], "held_out_rel_rmse": r["final_held_out_rel_rmse"],
                           "peak_mb": r["peak_rss_above_inputs_mb"]}
        out.append(row)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=["1000x1000:100000", "10000x10000:1000000"],
                        help="MxN:OBSERVATIONS")
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--sweeps", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--append", action="store_true", help="keep the runs of other cases already in --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/completion_scale.json"))
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cases = []
    for text in args.cases:
        size, count = text.split(":")
        m, n = (int(x) for x in size.lower().split("x"))
        cases.append((m, n, int(count)))
    runs = json.loads(args.out.read_text())["runs"] if args.append and args.out.is_file() else []
    for m, n, count in cases:
        runs = [r for r in runs if (r["m"], r["n"], r["observations"]) != (m, n, count) or r["method"] not in args.methods]
        runs += [run(method, m, n, args.rank, count, args.sweeps) for method in args.methods]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps({"threads": 1, "sweeps": args.sweeps, "held_out": HOLDOUT,
                                         "summary": summarize(runs), "runs": runs}, indent=2))
        temporary.replace(args.out)


if __name__ == "__main__":
    main()
