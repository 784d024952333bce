"""SLTrain activation memory and step time vs a dense linear layer (and the naive `F.linear(x, BA + S)`).

Activation memory = bytes saved for backward (counted with torch.autograd.graph.saved_tensors_hooks),
per layer and for a whole tiny LLaMA (4 layers, d=256) forward. Forward+backward time is interleaved,
medians. JSON: results/sltrain_memory.json.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.pretrain.recipe import PretrainConfig, build_model
from rankwise.pretrain.sltrain import SLTrainLinear, sparse_plus_low_rank
from timing import interleaved_medians, write_json


def saved_bytes(fn, exclude: tuple[nn.Module, ...] = ()) -> int:
    """Bytes saved for backward by `fn`; tensors of the `exclude` modules (parameters, buffers) are not counted."""
    total = 0
    seen = {(t.data_ptr(), t.numel(), t.dtype) for m in exclude for t in [*m.parameters(), *m.buffers()]}

    def pack(tensor):
        nonlocal total
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:  # tensors saved by several ops count once
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--delta", type=float, default=0.03)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.features
    dense = nn.Linear(n, n)
    sltrain = SLTrainLinear(n, n, rank=args.rank, delta=args.delta)
    nn.init.normal_(sltrain.lora_B, std=0.02)
    x = torch.randn(args.tokens, n, requires_grad=True)

    def naive():
        return F.linear(x, sparse_plus_low_rank(sltrain.lora_B, sltrain.scaled_A(), sltrain.sparse_values,
                                                sltrain.sparse_index), sltrain.bias)

    forwards = {"dense": lambda: dense(x), "sltrain": lambda: sltrain(x), "naive_ba_plus_s": naive}
    layer_bytes = {name: saved_bytes(fn) for name, fn in forwards.items()}
    # activations only: what a batch adds on top of the layer's own parameters and buffers
    activation_bytes = {name: saved_bytes(fn, (dense, sltrain)) for name, fn in forwards.items()}
    times = interleaved_medians({name: (lambda fn=fn: fn().sum().backward()) for name, fn in forwards.items()},
                                rounds=args.rounds)
    model_bytes = {}
    for method in ("full", "sltrain"):
        config = PretrainConfig(method=method, rank=args.rank // 2 if args.rank // 2 <= 64 else 64)
        model = build_model(config)
        ids = torch.randint(0, 256, (8, 128))
        model_bytes[method] = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss, (model,))
    result = {
        "config": vars(args),
        "layer_saved_bytes": layer_bytes,
        "layer_saved_ratio_vs_dense": {k: v / layer_bytes["dense"] for k, v in layer_bytes.items()},
        "layer_activation_bytes": activation_bytes,
        "layer_activation_ratio_vs_dense": {k: v / activation_bytes["dense"] for k, v in activation_bytes.items()},
        "layer_fwd_bwd_seconds": times,
        "layer_time_ratio_vs_dense": {k: v / times["dense"] for k, v in times.items()},
        "tiny_llama_activation_bytes": model_bytes,
        "tiny_llama_activation_ratio_sltrain_vs_full": model_bytes["sltrain"] / model_bytes["full"],
        "layer_params": {"dense": sum(p.numel() for p in dense.parameters()),
                         "sltrain": sum(p.numel() for p in sltrain.parameters())},
    }
    path = write_json("sltrain_memory", result)
    print({k: result[k] for k in ("layer_saved_ratio_vs_dense", "layer_activation_ratio_vs_dense",
                                  "layer_time_ratio_vs_dense", "tiny_llama_activation_ratio_sltrain_vs_full")}, "->", path)


if __name__ == "__main__":
    main()
