"""Quantized frozen base: SmolLM2-135M, LoRA r16 on every linear layer (q, k, v, o, gate, up, down), B=4, T=256.

Each variant runs in a fresh process (peak memory does not mix):
  fp32        the base loaded in fp32 (the reference run)
  int8        fp32 load, then rankwise.quantize_base(model, "int8")
  int4        fp32 load, then quantize_base(model, "int4", group_size=64)   (int4 values stored unpacked in int8)
  int8-lean   the bf16 cache loaded as bf16, quantize_base(..., compute_dtype=float32) upcasts each linear just
              before quantizing it, then the rest is cast to fp32:
              no full fp32 copy of the model ever exists (the "quantize while loading" recipe)
Reported per variant: RSS after imports (runtime), after load (+ quantization), peak RSS of the whole process
(VmHWM), peak RSS of the training steps alone, median step time, tokens/s.

    python bench/bench_quant.py                  # all variants -> bench/results/quant_smollm2.json
    python bench/bench_quant.py --variant int8   # one variant (prints one JSON row)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import machine, peak_rss_mib, reset_peak_rss, rss_mib, write_json  # noqa: E402

VARIANTS = ("fp32", "int8", "int4", "int8-lean")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(variant: str):
    from transformers import AutoModelForCausalLM

    import rankwise
    from rankwise.data.offline_assets import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.float32)
    report = None
    if variant in ("int8", "int4"):
        report = rankwise.quantize_base(model, variant).to_dict()
        report.pop("layers")
    return model, report


def run_variant(variant: str, batch: int, seq: int, steps: int, checkpointing: bool = False) -> dict:
    torch.set_num_threads(1)
    import rankwise

    rss_imports = rss_mib()
    if variant == "int8-lean":
        model, report = load_lean()
    else:
        model, report = load(variant)
    rss_loaded = rss_mib()
    peak_load = peak_rss_mib()
    if checkpointing:  # activations are most of the peak at B=4, T=256: QLoRA pairs the quantized base with this
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    adapted.train()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen) for _ in range(steps + 1)]
    reset_peak_rss()
    times, losses = [], []
    for ids in batches:
        start = time.perf_counter()
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = sorted(times[1:])[len(times[1:]) // 2]  # the first step (allocator warm-up) is not timed
    return {
        "variant": variant, "rss_after_imports_mib": rss_imports, "rss_after_load_mib": rss_loaded,
        "peak_rss_load_mib": peak_load, "peak_rss_train_mib": peak_rss_mib(),
        "peak_rss_process_mib": max(peak_load, peak_rss_mib()), "step_seconds_median": step,
        "tokens_per_s": batch * seq / step, "losses": losses, "quant_report": report, "gradient_checkpointing": checkpointing,
    }


def load_lean():
    """bf16 load; each linear upcast to fp32 just before it is quantized (never a full fp32 copy)."""
    from transformers import AutoModelForCausalLM

    import rankwise
    from rankwise.data.offline_assets import smollm2_dir

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir()), dtype=torch.bfloat16)
    report = rankwise.quantize_base(model, "int8", compute_dtype=torch.float32).to_dict()
    report.pop("layers")
    model.float()  # embeddings (tied head) and norms
    return model, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=VARIANTS)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="quant_smollm2")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset (fp32 is required for ratios)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (every variant)")
    parser.add_argument("--allocators", default="glibc-default,mmap-threshold-128k", help="comma-separated subset")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.steps, args.gradient_checkpointing)), flush=True)
        return
    # glibc's default heap keeps freed holes that later large allocations cannot reuse, so peak RSS also
    # measures fragmentation; a fixed mmap threshold returns every large tensor to the OS when it is freed,
    # so the second setting shows what the tensors themselves hold.
    allocators = {"glibc-default": {}, "mmap-threshold-128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}
    allocators = {name: allocators[name] for name in args.allocators.split(",")}
    rows: dict[str, dict] = {}
    for alloc, env in allocators.items():
        rows[alloc] = {}
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
            lines = (out.stdout if out.returncode == 0 else out.stderr).strip().splitlines() or ["no output"]
            row = json.loads(lines[-1]) if out.returncode == 0 else {"variant": variant, "error": lines[-1]}
            rows[alloc][variant] = row
            print(alloc, variant, {k: v for k, v in row.items() if k not in ("quant_report", "losses")}, flush=True)
        fp32 = rows[alloc]["fp32"]
        for row in rows[alloc].values():
            if "peak_rss_process_mib" in row and "peak_rss_process_mib" in fp32:
                row["peak_rss_x_fp32"] = row["peak_rss_process_mib"] / fp32["peak_rss_process_mib"]
                row["static_rss_x_fp32"] = row["rss_after_load_mib"] / fp32["rss_after_load_mib"]
                row["time_x_fp32"] = row["step_seconds_median"] / fp32["step_seconds_median"]
    payload = {"model": "SmolLM2-135M-Instruct", "adapter": "LoRA r16 alpha 32 on q,k,v,o,gate,up,down",
               "batch": args.batch, "seq": args.seq, "steps": args.steps,
               "gradient_checkpointing": args.gradient_checkpointing, "machine": machine(), "rows": rows}
    print(write_json(args.out, payload))


if __name__ == "__main__":
    main()
