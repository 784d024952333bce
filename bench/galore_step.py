"""GaLoreAdamW vs galore-torch's AdamW: optimizer step time on the same layers with the same gradients.

LLaMA-60M-like decoder block shapes (d=512, ffn 1376), rank 128. Steps are interleaved (ours, theirs,
ours, ...) with identical gradients, and timed separately for projector-refresh steps (an SVD) and
ordinary steps. Also checks that both produce the same parameters. JSON: results/galore_step.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from references import galore_torch_adamw
from rankwise.optim.galore import GaLoreAdamW
from timing import write_json


def shapes(d: int, ffn: int, blocks: int) -> list[tuple[int, int]]:
    return [(d, d)] * 4 * blocks + [(ffn, d), (ffn, d), (d, ffn)] * blocks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--gap", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Reference = galore_torch_adamw()
    if Reference is None:
        raise SystemExit("galore-torch is not installed: pip install --no-deps galore-torch")
    torch.manual_seed(0)
    weights = [torch.randn(s) * 0.02 for s in shapes(args.d, args.ffn, args.blocks)]
    ours = [nn.Parameter(w.clone()) for w in weights]
    theirs = [nn.Parameter(w.clone()) for w in weights]
    group = {"rank": args.rank, "update_proj_gap": args.gap, "scale": 0.25, "proj_type": "std"}
    optimizers = {"rankwise": (GaLoreAdamW([{"params": ours, **group}], lr=1e-3), ours),
                  "galore_torch": (Reference([{"params": theirs, **group}], lr=1e-3, no_deprecation_warning=True), theirs)}
    times = {name: {"refresh": [], "ordinary": []} for name in optimizers}
    for step in range(args.steps):
        grads = [torch.randn_like(w) for w in weights]
        kind = "refresh" if step % args.gap == 0 else "ordinary"
        order = list(optimizers.items()) if step % 2 == 0 else list(optimizers.items())[::-1]
        for name, (optimizer, params) in order:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            start = time.perf_counter()
            optimizer.step()
            times[name][kind].append(time.perf_counter() - start)
    max_diff = max(float((a - b).detach().abs().max()) for a, b in zip(ours, theirs))
    result = {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()}
    for name in result:
        result[name]["mean_per_step"] = sum(map(sum, times[name].values())) / args.steps
    ratios = {kind: result["rankwise"][kind] / result["galore_torch"][kind] for kind in ("refresh", "ordinary", "mean_per_step")}
    path = write_json("galore_step", {"config": vars(args), "median_seconds": result,
                                      "ratio_rankwise_over_galore_torch": ratios, "max_param_difference": max_diff})
    print(f"rankwise / galore-torch step time: {ratios}; max |param diff| {max_diff:.2e} -> {path}")


if __name__ == "__main__":
    main()
