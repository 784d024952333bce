"""Matrix completion: rankwise robust AltMin (sketched CG and exact) against SoftImpute-ALS.

Problem: n x n, rank k = 10, Gaussian factors, |Omega| = ratio * ((2n - k) k) observations drawn
uniformly without replacement (ratio 1 is the number of degrees of freedom; ratio 3 already leaves
rows with < k samples here, so ratio 5 is "near the information limit" for an algorithm that must
be exact). Measured: wall time until the relative Frobenius error ||UV^T - M*|| / ||M*|| <= 1e-6,
and the peak resident memory above the inputs (VmHWM reset after the problem is built), each method
in a fresh single-threaded process. Every run also records when it first reached 1e-2 ... 1e-6, so the
peer can be compared at equal error even when its time budget ends before 1e-6.

Peer: SoftImpute-ALS (Hastie, Mazumder, Lee & Zadeh 2015, Alg. 3.1; the algorithm of R's
softImpute, type="als") written with scipy.sparse, lambda = 0 (the exact-recovery limit): per
iteration O(|Omega| k + n k^2), same memory class as ours. No maintained Python package of it
installs without TensorFlow (fancyimpute), hence the scipy version here.

    PYTHONPATH=. python bench/bench_completion.py --sizes 2000 5000 10000 20000 --out bench/results/completion.json
    (--append adds sizes to an existing file, so each size can run as its own job)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

TARGET = 1e-6
LEVELS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def make_problem(n: int, k: int, ratio: float, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, k, generator=g, dtype=torch.float64)
    V = torch.randn(n, k, generator=g, dtype=torch.float64)
    count = int(ratio * (2 * n - k) * k)
    # sample linear indices, drop repeats: never a dense n x n mask
    linear = torch.unique(torch.randint(n * n, (int(count * 1.05) + 100,), generator=g))
    linear = linear[torch.randperm(len(linear), generator=g)[:count]]
    rows, cols = linear // n, linear % n
    return rows, cols, (U[rows] * V[cols]).sum(1), (U, V)


def soft_impute_als(rows, cols, values, shape, k, *, lam=0.0, max_seconds=300.0, target=None, seed=0,
                    max_iterations=None, on_sweep=None):
    """SoftImpute-ALS with the sparse + low-rank trick; returns (history of (seconds, rel_err), iterations).

    `max_iterations` stops after that many sweeps; `on_sweep(iteration, seconds, U * D^2, V)` is called after
    each (its time is not counted in `seconds`, M ~ (U D^2) V^T)."""
    import numpy as np
    import scipy.sparse as sp
    import torch

    from rankwise.solvers.completion import factor_relative_error

    m, n = shape
    rows, cols, values = rows.numpy(), cols.numpy(), values.numpy()
    rng = np.random.default_rng(seed)
    U = np.linalg.qr(rng.standard_normal((m, k)))[0]
    D = np.ones(k)
    V = np.zeros((n, k))
    history = []
    start = time.perf_counter()
    paused = 0.0  # seconds spent in on_sweep, left out of the timings
    iteration = 0
    while True:
        iteration += 1
        # B-step: B~ = (X*)^T U D (D^2 + lam)^-1 with X* = P_Omega(M - A B^T) + A B^T
        residual = values - ((U[rows] * D**2) * V[cols]).sum(1)
        S = sp.csr_matrix((residual, (rows, cols)), shape=shape)
        B = (S.T @ U + V * D**2) * (D / (D**2 + lam))
        V, d2, Rt = np.linalg.svd(B * D, full_matrices=False)
        D, U = np.sqrt(d2), U @ Rt.T
        # A-step, symmetric
        residual = values - ((U[rows] * D**2) * V[cols]).sum(1)
        S = sp.csr_matrix((residual, (rows, cols)), shape=shape)
        A = (S @ V + U * D**2) * (D / (D**2 + lam))
        U, d2, Rt = np.linalg.svd(A * D, full_matrices=False)
        D, V = np.sqrt(d2), V @ Rt.T
        elapsed = time.perf_counter() - start - paused
        if on_sweep is not None:
            pause = time.perf_counter()
            on_sweep(iteration, elapsed, U * D**2, V)
            paused += time.perf_counter() - pause
        error = factor_relative_error(torch.from_numpy(U * D**2), torch.from_numpy(V), *target) if target is not None else float("nan")
        history.append((elapsed, error))
        if error <= TARGET or elapsed > max_seconds or not np.isfinite(error if target is not None else D.sum()) or iteration == max_iterations:
            return history, iteration


def _child(method, n, k, ratio, max_seconds, queue):
    import sys

    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import peak_rss_mib, reset_peak_rss, rss_mib

    from rankwise.solvers.completion import altmin_completion

    rows, cols, values, target = make_problem(n, k, ratio)
    # ru_maxrss would carry the spawning parent's peak across fork+exec; VmHWM is this process's own
    base_mb = rss_mib()
    reset_peak_rss()
    if method == "softimpute_als":
        history, iterations = soft_impute_als(rows, cols, values, (n, n), k, max_seconds=max_seconds, target=target)
    else:
        solver = "exact" if method == "rankwise_exact" else "sketch"
        result = altmin_completion(rows, cols, values, (n, n), k, iterations=200, solver=solver, tol=TARGET,
                                   target=target, delta=1e-8, max_cg=20, forcing=0.1)
        history = list(zip(result.history["seconds"], result.history["rel_err"]))
        iterations = result.iterations
    reached = next((s for s, e in history if e <= TARGET), None)
    queue.put({
        "method": method, "n": n, "rank": k, "observations": len(values), "ratio_to_dof": ratio,
        "iterations": iterations, "seconds_to_1e-6": reached, "final_rel_err": history[-1][1],
        "total_seconds": history[-1][0], "time_budget": max_seconds or None,
        "seconds_to": {f"{level:.0e}": next((s for s, e in history if e <= level), None) for level in LEVELS},
        "peak_rss_above_inputs_mb": peak_rss_mib() - base_mb,
        "observations_mb": len(values) * 3 * 8 / 2**20,
    })


def summarize(rows) -> list[dict]:
    """Per size: the speedup of our fastest solver over the peer at the deepest error both reached, and a
    lower bound at 1e-6 (peer budget / our time) when the peer ran out of time first."""
    out = []
    for n in sorted({r["n"] for r in rows}):
        ours = [r for r in rows if r["n"] == n and r["method"] != "softimpute_als"]
        peer = next((r for r in rows if r["n"] == n and r["method"] == "softimpute_als"), None)
        if not ours or peer is None:
            continue
        best = min(ours, key=lambda r: r["seconds_to_1e-6"] or float("inf"))
        common = [lv for lv in best["seconds_to"] if best["seconds_to"][lv] and peer["seconds_to"][lv]]
        level = min(common, key=float) if common else None
        row = {"n": n, "observations": best["observations"], "fastest": best["method"],
               "ours_seconds_to_1e-6": best["seconds_to_1e-6"], "peer_seconds_to_1e-6": peer["seconds_to_1e-6"],
               "peer_final_rel_err": peer["final_rel_err"], "deepest_common_error": level,
               "speedup_at_deepest_common_error": level and peer["seconds_to"][level] / best["seconds_to"][level],
               "ours_peak_mb": best["peak_rss_above_inputs_mb"], "peer_peak_mb": peer["peak_rss_above_inputs_mb"]}
        if best["seconds_to_1e-6"]:
            if peer["seconds_to_1e-6"]:
                row["speedup_at_1e-6"] = peer["seconds_to_1e-6"] / best["seconds_to_1e-6"]
            else:
                row["speedup_at_1e-6_at_least"] = peer["total_seconds"] / best["seconds_to_1e-6"]
        out.append(row)
    return out


def run(method, n, k, ratio, max_seconds):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, n, k, ratio, max_seconds, queue))
    process.start()
    result = queue.get()
    process.join()
    print(json.dumps(result), flush=True)  # each run as it ends: a size cut short still leaves its finished runs
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=5.0)
    parser.add_argument("--peer-budget", type=float, default=600.0, help="max seconds for the peer per size")
    parser.add_argument("--peer-factor", type=float, default=10.0,
                        help="the peer gets max(60, factor x our best time) seconds, capped by --peer-budget")
    parser.add_argument("--append", action="store_true", help="keep the runs already in --out (other sizes)")
    parser.add_argument("--exact-up-to", type=int, default=5000, help="also run the exact solver up to this n")
    parser.add_argument("--out", type=Path, default=Path("bench/results/completion.json"))
    args = parser.parse_args()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    rows = json.loads(args.out.read_text())["runs"] if args.append and args.out.is_file() else []
    rows = [r for r in rows if r["n"] not in args.sizes]
    for n in args.sizes:
        methods = ("rankwise_sketch", "rankwise_exact") if n <= args.exact_up_to else ("rankwise_sketch",)
        ours = [run(method, n, args.rank, args.ratio, 0) for method in methods]
        best = min(r["total_seconds"] for r in ours)
        peer = run("softimpute_als", n, args.rank, args.ratio, min(args.peer_budget, max(60.0, args.peer_factor * best)))
        rows += ours + [peer]
        rows.sort(key=lambda r: r["n"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        temporary = args.out.with_suffix(".tmp")
        temporary.write_text(json.dumps({"target_rel_err": TARGET, "threads": 1, "summary": summarize(rows), "runs": rows}, indent=2))
        temporary.replace(args.out)


if __name__ == "__main__":
    main()
