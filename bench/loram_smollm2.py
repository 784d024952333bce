"""LoRAM vs plain LoRA on SmolLM2-135M, adapting to the King James Bible (held-out perplexity).

Arms (same LoRA r=8/alpha=16 on q,k,v,o,gate,up,down, same steps, batches and learning rate):
- LoRA trained on the full model, merged;
- LoRAM: LoRA trained on a structurally pruned copy (ratio of MLP neurons and KV heads kept in the
  pruned blocks), recovered by zero-filling and merged into the full model;
- LoRAM with the paper's step 1b: `--align-steps` of full-parameter continued pre-training of the
  pruned model on the training text first (the pruned model's held-out perplexity before/after);
- LoRAM with gradient importance (first-order Taylor, LLM-Pruner) instead of activation energy;
- QLoRAM: the pruned base quantized to int8 before LoRA;
- the base model. Also: wall time of the training phase and parameters of the model trained on.
`--arms` picks a subset (the 2-core CI box is slow).

    PYTHONPATH=. python bench/loram_smollm2.py --ratio 0.5 --steps 20 --align-steps 20
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
from rankwise.compress.loram import LoramConfig, align_pruned, prune_llama, recover_adapter, train_lora
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
    parser.add_argument("--align-steps", type=int, default=20)
    parser.add_argument("--align-lr", type=float, default=1e-4)
    parser.add_argument("--arms", default="lora_full,loram,loram_aligned,loram_gradient,qloram_int8")
    args = parser.parse_args()
    arms = set(args.arms.split(","))
    torch.set_num_threads(1)
    model, tokenizer = load()
    chunks = token_chunks(tokenizer, real_text("auto"), 128)
    train, held_out = split_calibration_eval(chunks, args.train_seqs, 16, 4)
    config = LoramConfig(ratio=args.ratio, steps=args.steps, lr=args.lr)
    rows = {"base": {"perplexity": perplexity(model, held_out), "params": count_parameters(model)}}
    print(rows, flush=True)

    if "lora_full" in arms:
        start = time.perf_counter()
        adapted, history = train_lora(model, train, config)
        rows["lora_full"] = {"train_seconds": time.perf_counter() - start,
                             "trained_model_params": count_parameters(model),
                             "loss_first": history[0], "loss_last": history[-1]}
        merged = adapted.merge_and_unload()
        rows["lora_full"]["perplexity"] = perplexity(merged, held_out)
        print("lora_full", rows["lora_full"], flush=True)

    for arm in ("loram", "loram_aligned", "loram_gradient", "qloram_int8"):
        if arm not in arms:
            continue
        model, _ = load()
        torch.manual_seed(0)
        start = time.perf_counter()
        importance = "gradient" if arm == "loram_gradient" else "activation"
        pruned, index = prune_llama(model, train, config.ratio, config.prune_attention, config.keep_first,
                                    config.keep_last, importance)
        row = {"prune_seconds": time.perf_counter() - start, "trained_model_params": count_parameters(pruned),
               "pruned_perplexity": perplexity(pruned, held_out)}
        if arm == "loram_aligned":
            start = time.perf_counter()
            info = align_pruned(pruned, train, args.align_steps, args.align_lr)
            row.update({"align_seconds": time.perf_counter() - start, "align_steps": args.align_steps,
                        "align_lr": args.align_lr, "align_loss_before": info["loss_before"],
                        "align_loss_after": info["loss_after"], "aligned_pruned_perplexity": perplexity(pruned, held_out)})
        if arm == "qloram_int8":
            from rankwise.quant import quantize_base

            row["quantized_layers"] = len(quantize_base(pruned, "int8").layers)
        start = time.perf_counter()
        small, history = train_lora(pruned, train, config)
        row.update({"train_seconds": time.perf_counter() - start, "loss_first": history[0], "loss_last": history[-1]})
        merged = recover_adapter(small, model, index, config).merge_and_unload()
        row["perplexity"] = perplexity(merged, held_out)
        rows[arm] = row
        print(arm, row, flush=True)
    out = {"meta": {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "text": "King James Bible",
                    "train": f"{args.train_seqs} x 128 tokens, batch 4, {args.steps} steps, AdamW lr {args.lr}",
                    "held_out": "16 x 128 tokens from the end of the text", "ratio": args.ratio, "threads": 1,
                    "align": f"{args.align_steps} steps, AdamW lr {args.align_lr}, LM head frozen, on the train rows"},
           "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "loram_smollm2.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / "loram_smollm2.json")


if __name__ == "__main__":
    main()
