"""Top eigenvector from a random-order row stream vs a full `eigh`, and Oja's rule.

For each (d, R) we build n light rows N(0, I) plus h = 10 heavy rows along a hidden direction
(the spec's instance, methods-theory.md 4(a)), shuffle, and measure for each method
|<v, v1>| (v1 from `torch.linalg.eigh` of the full A^T A), wall time (single thread) and the floats
it must hold: streaming (h + 2) d; full eigh n d for A (or d^2 for a streamed Gram) plus d^2;
Oja d. Oja's learning rate is tuned per instance over {1e-5, 1e-4, 1e-3} (its best is reported).

    PYTHONPATH=. python bench/bench_streaming_eig.py --out bench/results/streaming_eig.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rankwise.solvers.streaming_eig import streaming_top_eigenvector


def instance(d, n, c, h=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d, generator=g, dtype=torch.float64)
    v /= v.norm()
    heavy = (c * n / h) ** 0.5 * (v + 0.05 * torch.randn(h, d, generator=g, dtype=torch.float64))
    return torch.cat([torch.randn(n, d, generator=g, dtype=torch.float64), heavy])[torch.randperm(n + h, generator=g)]


def oja(A, lr):
    z = torch.ones(A.shape[1], dtype=torch.float64) / A.shape[1] ** 0.5
    for a in A:
        z = z + lr * a * float(a @ z)
        z = z / z.norm()
    return z


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[100, 400, 1600])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--gaps", type=float, nargs="+", default=[1, 3, 10, 30], help="heavy mass c (R grows with c)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/streaming_eig.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    for d in args.dims:
        for c in args.gaps:
            A = instance(d, args.rows, c)
            start = time.perf_counter()
            evals, evecs = torch.linalg.eigh(A.T @ A)
            eigh_seconds = time.perf_counter() - start
            v1, gap = evecs[:, -1], float(evals[-1] / evals[-2])
            row = {"d": d, "n": A.shape[0], "heavy_mass_c": c, "gap_R": gap, "eigh_seconds": eigh_seconds,
                   "eigh_floats": A.numel() + d * d, "eigh_floats_streamed_gram": 2 * d * d}
            for handle_heavy, name in ((True, "streaming"), (False, "streaming_no_heavy")):
                result = streaming_top_eigenvector(A, handle_heavy=handle_heavy)
                row[f"{name}_correlation"] = abs(float(result.solution @ v1))
                row[f"{name}_seconds"] = result.seconds
                row[f"{name}_floats"] = result.info["stored_floats"]
            if d <= 400:  # Oja is a Python loop over rows: slow at large d x n
                best = max((abs(float(oja(A, lr) @ v1)), lr) for lr in (1e-5, 1e-4, 1e-3))
                row["oja_best_correlation"], row["oja_best_lr"] = best
            print(json.dumps(row), flush=True)
            runs.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
