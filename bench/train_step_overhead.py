"""Step-time overhead of every training procedure vs plain LoRA (same model, same batch, same run).

    PYTHONPATH=. python bench/train_step_overhead.py [--steps 30] [--repeats 5] [--out bench/results/train_step_overhead.json]

A tiny BERT (hidden 256, 4 layers, seq 128, batch 8) with LoRA r=8 on query/value/dense. One step is what
the rankwise loop does: on_step_start, forward + backward, clip, after_backward, AdamW step, on_step_end.
Rank-changing procedures are timed in their steady phase (no growth/shrink step inside the timing):
IncreLoRA while scoring (explicit dW + hook), TriAdaptLoRA at rank 8 with its core and regulariser, Maestro
with ordered dropout + group lasso, DiffoRA in its search phase (one extra held-out forward/backward per step).
TRP trains dense weights, so it is compared with dense training of the same layers ("full"), projecting every step.
Configurations are timed round-robin, median over repeats, so background load hits them alike.
Denormals are flushed to zero as the rankwise loop does (TrainConfig.flush_denormals); --keep-denormals turns it off.
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
from rankwise.train.loop import TrainState
from rankwise.train.procedures import build_procedure

TARGETS = ["query", "value", "dense"]


def loss_fn(model, ids):
    return model(input_ids=ids).last_hidden_state.pow(2).mean()


def build(name: str, ids):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                     max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertModel(cfg)
    if name in ("full", "trp"):
        model = base.requires_grad_(False)
        from rankwise.train.procedures import dense_trainable

        dense_trainable(model, TARGETS, [])
    else:
        model = rankwise.adapt(base, rankwise.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
    options = {
        "increlora": {"target_rank": 16, "init_warmup": 10**6},
        "triadapt": {"reference_rank": 16, "init_warmup": 10**6},
        "maestro": {"shrink_every": 10**6},
        "diffora": {"search_steps": 10**6},
        "trp": {"period": 1},
    }
    callbacks = []
    if name not in ("lora", "full"):
        callbacks.append(build_procedure(name, model, val_batches=[ids], loss_fn=loss_fn, **options.get(name, {})))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return TrainState(model, optimizer, None, total_steps=10**6), callbacks


def step(state: TrainState, callbacks, ids) -> None:
    for cb in callbacks:
        getattr(cb, "on_step_start", lambda s: None)(state)
    loss_fn(state.model, ids).backward()
    torch.nn.utils.clip_grad_norm_([p for g in state.optimizer.param_groups for p in g["params"]], 1.0)
    for cb in callbacks:
        getattr(cb, "after_backward", lambda s: None)(state)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    for cb in callbacks:
        getattr(cb, "on_step_end", lambda s: None)(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="lora,allora,ggpo,increlora,triadapt,maestro,diffora,full,trp")
    parser.add_argument("--out", default="bench/results/train_step_overhead.json")
    parser.add_argument("--keep-denormals", action="store_true", help="do not flush denormals (the rankwise loop does)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(not args.keep_denormals)
    ids = torch.randint(0, 1000, (8, 128))
    runs = {name: build(name, ids) for name in args.only.split(",")}
    for state, callbacks in runs.values():
        for _ in range(2):
            step(state, callbacks, ids)  # warm-up (GGPO starts perturbing after its first after_backward)
    per_repeat = max(1, args.steps // args.repeats)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (state, callbacks) in runs.items():
            start = time.perf_counter()
            for _ in range(per_repeat):
                step(state, callbacks, ids)
            times[name].append((time.perf_counter() - start) / per_repeat)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = {n: median[n] / median["full" if n in ("full", "trp") else "lora"] for n in median if "lora" in median or n in ("full", "trp")}
    result = {
        "benchmark": "train step time vs plain LoRA (TRP: vs dense training of the same layers)",
        "model": "BERT h256 L4 seq128 bs8, LoRA r8 on query/value/dense", "threads": 1,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "load_average": list(__import__("os").getloadavg()), "flush_denormals": not args.keep_denormals,
        "cpu_seconds_total": time.process_time(),
        "seconds_per_step": median, "ratio": ratio, "all_repeats": times,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({"seconds_per_step": median, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
