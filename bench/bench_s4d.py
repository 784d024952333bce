"""S4D throughput: FFT-convolution forward vs the plain recurrent scan of the same layer.

Batch 8, H = N = 64, L in {256, 1024, 4096}; tokens per second (batch * L / seconds) of
`S4D.forward` (FFT, O(H L log L) plus the O(H N L) kernel) against `S4D.forward_recurrent` (one
step per token), both in inference mode, single thread; plus the FFT path's training step
(forward + backward). The outputs of both paths are compared as a sanity check.

    PYTHONPATH=. python bench/bench_s4d.py --out bench/results/s4d.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rankwise.layers.s4d import S4D


def seconds(function, repeats):
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/s4d.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = S4D(64, 64)
    runs = []
    for L in args.lengths:
        u = torch.randn(args.batch, 64, L)
        with torch.no_grad():
            fft = seconds(lambda: layer(u), 5)
            scan = seconds(lambda: layer.forward_recurrent(u), 1)
            max_diff = float((layer(u) - layer.forward_recurrent(u)).abs().max())

        def train_step():
            layer.zero_grad()
            layer(u).square().mean().backward()

        train = seconds(train_step, 3)
        tokens = args.batch * L
        row = {"L": L, "batch": args.batch, "fft_tokens_per_s": tokens / fft, "scan_tokens_per_s": tokens / scan,
               "speedup": scan / fft, "fft_train_step_tokens_per_s": tokens / train, "max_abs_diff": max_diff}
        print(json.dumps(row), flush=True)
        runs.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": 1, "H": 64, "N": 64, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
