"""DCT column selection (SVD-free) vs GaLore's SVD projector: refresh time and optimizer-state memory.

Same layers (d=512 LLaMA block shapes), same gradients, one run: for each rank the time to compute a
new projection (GaLore: fp32 SVD; DCT: one n x n matmul or one FFT, plus a top-k) and the resulting
low-rank gradient, interleaved, medians; and the optimizer-state bytes after one step, against
full AdamW (2 m n floats per matrix). JSON: results/dct_vs_svd.json.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from rankwise.optim.dct import DCTAdamW
from rankwise.optim.galore import GaLoreAdamW, optimizer_state_bytes
from timing import interleaved_medians, write_json


def refresh_call(optimizer, param, grad):
    group = optimizer.param_groups[0]

    def call():
        state = {"step": 0}
        optimizer._project(state, grad, group)
    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1376)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = [(args.d, args.d), (args.ffn, args.d), (args.d, args.ffn)]
    results = {"projection_seconds": {}, "state_bytes": {}}
    for rank in args.ranks:
        per_shape = {}
        for shape in shapes:
            grad = torch.randn(shape)
            param = nn.Parameter(torch.zeros(shape))
            calls = {
                "galore_svd": refresh_call(GaLoreAdamW([{"params": [param], "rank": rank}]), param, grad),
                "dct_matmul": refresh_call(DCTAdamW([{"params": [param], "rank": rank}]), param, grad),
                "dct_makhoul": refresh_call(DCTAdamW([{"params": [param], "rank": rank, "sim_type": "makhoul"}]),
                                            param, grad),
            }
            medians = interleaved_medians(calls, rounds=args.rounds)
            per_shape["x".join(map(str, shape))] = {**medians,
                                                    "svd_over_dct_matmul": medians["galore_svd"] / medians["dct_matmul"],
                                                    "svd_over_dct_makhoul": medians["galore_svd"] / medians["dct_makhoul"]}
        results["projection_seconds"][f"rank_{rank}"] = per_shape
        # state memory on a 2-block model's worth of these layers
        params = {name: [nn.Parameter(torch.zeros(s)) for s in shapes * 2] for name in ("adamw", "galore", "dct")}
        optimizers = {"adamw": torch.optim.AdamW(params["adamw"]),
                      "galore": GaLoreAdamW([{"params": params["galore"], "rank": rank}]),
                      "dct": DCTAdamW([{"params": params["dct"], "rank": rank}])}
        for name, optimizer in optimizers.items():
            for p in params[name]:
                p.grad = torch.randn_like(p)
            optimizer.step()
        state = {name: optimizer_state_bytes(opt) for name, opt in optimizers.items()}
        state["galore_over_adamw"] = state["galore"] / state["adamw"]
        state["dct_over_adamw"] = state["dct"] / state["adamw"]
        state["dct_over_galore"] = state["dct"] / state["galore"]
        results["state_bytes"][f"rank_{rank}"] = state
        print(rank, {k: round(v["svd_over_dct_matmul"], 2) for k, v in per_shape.items()},
              {k: round(v, 3) for k, v in state.items() if "over" in k})
    path = write_json("dct_vs_svd", {"config": vars(args), **results})
    print(f"-> {path}")


if __name__ == "__main__":
    main()
