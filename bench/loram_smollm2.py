"""LoRAM vs plain LoRA on SmolLM2-135M, adapting to the King James Bible (held-out perplexity).

Arms (same LoRA r=8/alpha=16 on q,k,v,o,gate,up,down, same steps, batches and learning rate):
- LoRA trained on the full model, merged;
- LoRAM: LoRA trained on a structurally pruned copy (ratio of MLP neurons and KV heads kept in the
  pruned blocks), recovered by zero-filling and merged into the full model;
- the base model. Also: wall time of the training phase and parameters of the model trained on.
No alignment pre-training of the pruned model (the paper's step 1b) is done.

    PYTHONPATH=. python bench/loram_smollm2.py --ratio 0.5 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rankwise.compress._common import count_parameters
from rankwise.compress.evaluate import perplexity, split_calibration_eval, token_chunks
from rankwise.compress.loram import LoramConfig, prune_llama, recover_adapter, train_lora
from rankwise.data.offline_assets import real_text, smollm2_dir

RESULTS = Path(__file__).parent / "results"


def load():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-seqs", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = load()
    chunks = token_chunks(tokenizer, real_text("auto"), 128)
    train, held_out = split_calibration_eval(chunks, args.train_seqs, 16, 4)
    config = LoramConfig(ratio=args.ratio, steps=args.steps, lr=args.lr)
    rows = {"base": {"perplexity": perplexity(model, held_out), "params": count_parameters(model)}}
    print(rows, flush=True)

    start = time.perf_counter()
    adapted, history = train_lora(model, train, config)
    rows["lora_full"] = {"train_seconds": time.perf_counter() - start, "trained_model_params": count_parameters(model),
                         "loss_first": history[0], "loss_last": history[-1]}
    merged = adapted.merge_and_unload()
    rows["lora_full"]["perplexity"] = perplexity(merged, held_out)
    print(rows["lora_full"], flush=True)

    model, _ = load()
    start = time.perf_counter()
    pruned, index = prune_llama(model, train, config.ratio, config.prune_attention, config.keep_first, config.keep_last)
    prune_seconds = time.perf_counter() - start
    rows["pruned_alone"] = {"perplexity": perplexity(pruned, held_out), "params": count_parameters(pruned)}
    start = time.perf_counter()
    small, history = train_lora(pruned, train, config)
    train_seconds = time.perf_counter() - start
    merged = recover_adapter(small, model, index, config).merge_and_unload()
    rows["loram"] = {"train_seconds": train_seconds, "prune_seconds": prune_seconds,
                     "trained_model_params": count_parameters(pruned), "loss_first": history[0],
                     "loss_last": history[-1], "perplexity": perplexity(merged, held_out)}
    print(rows["loram"], flush=True)
    out = {"meta": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "text": "King James Bible",
                    "train": f"{args.train_seqs} x 128 tokens, batch 4, {args.steps} steps, AdamW lr {args.lr}",
                    "held_out": "16 x 128 tokens from the end of the text", "ratio": args.ratio, "threads": 1},
           "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "loram_smollm2.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / "loram_smollm2.json")


if __name__ == "__main__":
    main()
