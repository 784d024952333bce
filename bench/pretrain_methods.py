"""`rankwise pretrain` arms side by side: full AdamW, GaLore, DCT, SLTrain, LOST at the same tokens.

Each arm is a fresh `rankwise pretrain` process (so peak RSS is its own); reported per arm:
optimizer-state bytes (all, and on the attention/MLP matrices), peak RSS, median step time,
validation perplexity at equal tokens, and the ratios against full-rank AdamW from the same run.
JSON: results/pretrain_methods.json; curves: results/pretrain_methods.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rankwise.pretrain.recipe import plot_curves
from timing import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]


def run_arm(method: str, args, out: Path) -> dict:
    command = [sys.executable, "-m", "rankwise.cli", "pretrain", "--method", method, "--corpus", args.corpus,
               "--out", str(out / method), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--eval-every", str(args.eval_every), "--threads", str(args.threads), "--quiet"]
    if method != "full":
        command += ["--rank", str(args.rank)]
    subprocess.run(command, check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads((out / method / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["full", "galore", "dct", "sltrain", "lost"])
    parser.add_argument("--corpus", default="kjv")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--rank", type=int, default=32, help="d/8 for the default d=256")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="arms run at once (step times then share the CPU)")
    args = parser.parse_args()
    out = RESULTS / "pretrain_runs"
    with ThreadPoolExecutor(args.parallel) as pool:
        metrics = dict(zip(args.methods, pool.map(lambda m: run_arm(m, args, out), args.methods)))
    full = metrics.get("full")
    summary = {}
    for method, m in metrics.items():
        row = {key: m[key] for key in ("params", "attn_mlp_params", "optimizer_state_bytes",
                                      "projected_matrices_state_bytes", "peak_rss_mb", "step_time_median_s",
                                      "tokens", "final_val_ppl")}
        if full:
            row["ratio_vs_full"] = {key: (m[key] / full[key] if full[key] else None) for key in
                                    ("optimizer_state_bytes", "projected_matrices_state_bytes", "peak_rss_mb",
                                     "step_time_median_s", "final_val_ppl", "params")}
        summary[method] = row
    plot_curves(metrics, RESULTS / "pretrain_methods.png", title=f"{args.corpus}: validation perplexity, rank {args.rank}")
    path = write_json("pretrain_methods", {"config": vars(args), "arms": summary,
                                           "curves": {k: v["val_curve"] for k, v in metrics.items()}})
    for method, row in summary.items():
        print(method, round(row["final_val_ppl"], 3), row.get("ratio_vs_full"))
    print("->", path)


if __name__ == "__main__":
    main()
