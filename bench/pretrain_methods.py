"""`rankwise pretrain` arms side by side: full AdamW, GaLore, DCT, SLTrain, LOST at the same tokens.

Each arm is a fresh `rankwise pretrain` process (so peak RSS is its own) on the same corpus, the same
batches (same seed) and the same model size; reported per arm: optimizer-state bytes (all, and on the
attention/MLP matrices), peak RSS, median step time, validation perplexity at equal tokens, and the
ratios against full-rank AdamW from the same run. The issue's goal is checked from those numbers:
GaLore/DCT state on the projected matrices <= 1/4 of AdamW's, perplexity within 10 % of full rank.
JSON: results/pretrain_methods.json (rewritten after every arm); curves: results/pretrain_methods.png.
Runs (models) go to ROOT/runs/pretrain_methods/ARM (git-ignored), e.g. for bench/welore_flow.py.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rankwise.pretrain.recipe import DEFAULT_GAP, DEFAULT_SPARSITY, plot_curves
from timing import RESULTS, write_json

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = ("params", "attn_mlp_params", "optimizer_state_bytes", "projected_matrices_state_bytes", "peak_rss_mb",
            "step_time_median_s", "wall_seconds", "tokens", "final_train_loss", "final_val_ppl")
RATIO_KEYS = ("optimizer_state_bytes", "projected_matrices_state_bytes", "peak_rss_mb", "step_time_median_s",
              "final_val_ppl", "params")
GOAL = {"projected_state_ratio_max": 0.25, "val_ppl_ratio_max": 1.10}


def arm_command(method: str, args, out: Path) -> list[str]:
    command = [sys.executable, "-m", "rankwise.cli", "pretrain", "--method", method, "--corpus", args.corpus,
               "--out", str(out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--hidden-size", str(args.hidden_size),
               "--intermediate-size", str(args.intermediate_size), "--num-layers", str(args.num_layers),
               "--num-heads", str(args.num_heads), "--eval-every", str(args.eval_every),
               "--threads", str(args.threads), "--seed", str(args.seed), "--quiet"]
    if method != "full":
        command += ["--rank", str(args.rank)]
    if args.lr is not None:
        command += ["--lr", str(args.lr)]
    if args.update_proj_gap is not None and method in DEFAULT_GAP:
        command += ["--update-proj-gap", str(args.update_proj_gap)]
    return command


def run_arm(method: str, args, runs: Path) -> dict:
    out = runs / method
    result = subprocess.run(arm_command(method, args, out), capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode != 0:  # keep the other arms; the failure is recorded, not hidden
        return {"failed": True, "returncode": result.returncode, "stderr_tail": result.stderr[-2000:],
                "stdout_tail": result.stdout[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["pretrain_config"] = json.loads((out / "pretrain_config.json").read_text())
    return metrics


def summarise(metrics: dict[str, dict]) -> dict:
    full = metrics.get("full")
    full = None if full is None or full.get("failed") else full
    summary = {}
    for method, m in metrics.items():
        if m.get("failed"):
            summary[method] = m
            continue
        config = m["pretrain_config"]
        row = {key: m[key] for key in ROW_KEYS}
        row["hyper"] = {key: config[key] for key in ("lr", "rank", "update_proj_gap", "galore_scale", "sparsity",
                                                     "gamma", "weight_decay", "warmup_ratio", "min_lr_ratio")}
        row["hyper"]["effective_lr"] = m["lr"]
        if method in DEFAULT_GAP and config["update_proj_gap"] is None:
            row["hyper"]["update_proj_gap"] = DEFAULT_GAP[method]
        if method in DEFAULT_SPARSITY and config["sparsity"] is None:
            row["hyper"]["sparsity"] = DEFAULT_SPARSITY[method]
        if full:
            row["ratio_vs_full"] = {key: (m[key] / full[key] if full[key] else None) for key in RATIO_KEYS}
            if method in ("galore", "dct"):
                state, ppl = (row["ratio_vs_full"]["projected_matrices_state_bytes"],
                              row["ratio_vs_full"]["final_val_ppl"])
                row["goal"] = {"state_ok": state <= GOAL["projected_state_ratio_max"],
                               "ppl_ok": ppl <= GOAL["val_ppl_ratio_max"]}
        summary[method] = row
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["full", "galore", "dct", "sltrain", "lost"])
    parser.add_argument("--corpus", default="kjv")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=688)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--rank", type=int, default=32, help="d/8 for the default d=256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="peak lr for every arm (default: each method's own)")
    parser.add_argument("--update-proj-gap", type=int, default=None,
                        help="projector refresh period for galore/dct (default: each method's own)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=1, help="arms run at once (step times then share the CPU)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "pretrain_methods")
    parser.add_argument("--name", default="pretrain_methods", help="results/NAME.json and NAME.png")
    args = parser.parse_args()
    metrics: dict[str, dict] = {}

    def record(method: str) -> None:
        metrics[method] = run_arm(method, args, args.runs)
        ok = {k: v for k, v in metrics.items() if not v.get("failed")}
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        write_json(args.name, {"config": config, "goal": GOAL, "arms": summarise(metrics),
                               "curves": {k: v["val_curve"] for k, v in ok.items()}})
        if ok:
            plot_curves(ok, RESULTS / f"{args.name}.png",
                        title=f"{args.corpus}: validation perplexity, d={args.hidden_size}, rank {args.rank}")
        row = summarise(metrics)[method]
        print(method, "FAILED" if row.get("failed") else (round(row["final_val_ppl"], 3), row.get("ratio_vs_full")),
              flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(record, args.methods))
    print("->", RESULTS / f"{args.name}.json")


if __name__ == "__main__":
    main()
