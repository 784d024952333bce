"""Step-time overhead of training procedures vs plain LoRA (same model, same batch, same run).

    PYTHONPATH=. python bench/train_step_overhead.py [--steps 30] [--out bench/results/train_step_overhead.json]

A tiny BERT (hidden 256, 4 layers, seq 128, batch 8) with LoRA r=8 on query/value/dense; one step is
forward + backward + clip + the procedure's after_backward + AdamW step. Procedures are timed interleaved
(round-robin, median of repeats) so background load hits all of them alike. Ratios are vs plain LoRA.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import BertConfig, BertModel

import rankwise
from rankwise.train.allora import ALLoRA
from rankwise.train.ggpo import GGPO


def build(procedure: str | None):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = rankwise.adapt(BertModel(cfg), rankwise.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value", "dense"]))
    callbacks = []
    if procedure == "ggpo":
        callbacks.append(GGPO(model))
    elif procedure == "allora":
        ALLoRA(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer, callbacks


def step(model, optimizer, callbacks, ids):
    loss = model(input_ids=ids).last_hidden_state.pow(2).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    for cb in callbacks:
        cb.after_backward(None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/train_step_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 1000, (8, 128))
    runs = {name: build(None if name == "lora" else name) for name in ("lora", "ggpo", "allora")}
    for name, (model, opt, cbs) in runs.items():
        for _ in range(3):
            step(model, opt, cbs, ids)  # warm-up (GGPO starts perturbing after its first after_backward)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (model, opt, cbs) in runs.items():
            start = time.perf_counter()
            for _ in range(args.steps // args.repeats):
                step(model, opt, cbs, ids)
            times[name].append((time.perf_counter() - start) / (args.steps // args.repeats))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "train step time vs plain LoRA", "model": "BERT h256 L4 seq128 bs8, LoRA r8 query/value/dense",
        "threads": 1, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "seconds_per_step": median, "ratio_vs_lora": {n: median[n] / median["lora"] for n in median},
        "all_repeats": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"seconds_per_step": median, "ratio_vs_lora": result["ratio_vs_lora"]}, indent=2))


if __name__ == "__main__":
    main()
