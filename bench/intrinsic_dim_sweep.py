"""Intrinsic dimension sweep (Li et al., arXiv 1804.08838) on sklearn digits, dense and Fastfood projections.

    PYTHONPATH=. python bench/intrinsic_dim_sweep.py [--dims 20,40,80,160,320,640] [--seeds 2]

FC 64-100-100-10 (D = 17,610), 300 Adam steps per run, mean accuracy over seeds per d; d_int90 is the smallest
d whose mean reaches 90 % of direct training (the "individual" baseline, measured here with the same seeds).
One baseline is shared by both projections so their d_int90 are comparable. Writes
bench/results/intrinsic_dim.json (accuracy per d, d_int90, seconds per projection).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rankwise.analysis.intrinsic_dim import digits_task, fc_network, intrinsic_dimension_sweep, train_classifier
from rankwise.core.io import atomic_write_text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dims", default="20,40,80,160,320,640")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("bench/results/intrinsic_dim.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    dims, seeds = [int(d) for d in args.dims.split(",")], tuple(range(args.seeds))
    start = time.perf_counter()
    direct = [train_classifier(fc_network(seed=s), digits_task(s), steps=args.steps) for s in seeds]
    baseline = sum(direct) / len(direct)
    report = {"task": "sklearn digits, FC 64-100-100-10", "threads": 1, "baseline_per_seed": direct,
              "baseline": baseline, "baseline_seconds": time.perf_counter() - start, "sweeps": {}}
    print(f"direct training: {baseline:.4f} ({direct})", flush=True)
    for projection in ("dense", "fastfood"):
        start = time.perf_counter()
        result = intrinsic_dimension_sweep(dims, projection=projection, seeds=seeds, steps=args.steps, baseline=baseline,
                                           progress=lambda line: print(line, flush=True))
        result["seconds"] = time.perf_counter() - start
        report["sweeps"][projection] = result
        print(projection, "d_int90 =", result["d_int90"], f"({result['seconds']:.1f} s)", flush=True)
    report["load_average_at_end"] = list(os.getloadavg())
    atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
