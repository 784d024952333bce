"""Which least-squares solver is faster for AltMin completion: "sketch" (sketched CG) or "exact"?

Problem: n x n, exact rank r, Gaussian factors, |Omega| = 3 n r ln n entries drawn uniformly (issue 19
item 10). Each solver runs with the library defaults (delta=1e-10, max_cg=60, warm start) until the
relative Frobenius error against the truth is <= 1e-6; we record wall time, sweeps, CG steps and
seconds per sweep. Single thread. The rule behind `solver="auto"` is read off this table
(docs/solvers/completion.md).

    PYTHONPATH=. python bench/completion_solver_choice.py --out bench/results/completion_solver_choice.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rankwise.solvers.completion import altmin_completion

CASES = ((1000, 5), (1000, 10), (1000, 20), (1000, 40), (2000, 5), (2000, 10), (2000, 20), (4000, 10))


def problem(n: int, r: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, r, generator=g, dtype=torch.float64)
    V = torch.randn(n, r, generator=g, dtype=torch.float64)
    count = min(int(3 * n * r * math.log(n)), n * n // 2)
    linear = torch.unique(torch.randint(n * n, (int(count * 1.1) + 100,), generator=g))
    linear = linear[torch.randperm(len(linear), generator=g)[:count]]
    rows, cols = linear // n, linear % n
    return rows, cols, (U[rows] * V[cols]).sum(1), (U, V)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/completion_solver_choice.json"))
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for n, r in CASES:
        rows, cols, values, truth = problem(n, r)
        for solver in ("sketch", "exact"):
            start = time.perf_counter()
            result = altmin_completion(rows, cols, values, (n, n), r, iterations=args.iterations, solver=solver,
                                       tol=1e-6, target=truth)
            seconds = time.perf_counter() - start
            run = {"n": n, "rank": r, "observations": len(values), "solver": solver, "seconds": seconds,
                   "sweeps": result.iterations, "seconds_per_sweep": seconds / result.iterations,
                   "cg_steps": result.info["cg_steps"], "final_rel_err": result.history["rel_err"][-1]}
            runs.append(run)
            print(json.dumps(run), flush=True)
    ratios = []
    for n, r in CASES:
        pair = {x["solver"]: x for x in runs if x["n"] == n and x["rank"] == r}
        ratios.append({"n": n, "rank": r, "sketch_over_exact_seconds": pair["sketch"]["seconds"] / pair["exact"]["seconds"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temporary = args.out.with_suffix(".tmp")
    temporary.write_text(json.dumps({"target_rel_err": 1e-6, "threads": 1, "samples": "3 n r ln n",
                                     "summary": ratios, "runs": runs}, indent=2))
    temporary.replace(args.out)


if __name__ == "__main__":
    main()
