"""Train-step time, activation memory, peak RSS, trainable parameters and file size of the issue-3 adapters
against the frozen floor and PEFT, on a MiniLM-size BERT encoder (hidden 384, 6 layers, B=16, T=128).

    PYTHONPATH=. python bench/bench_randlora.py [--steps 12] [--threads 2] [--out bench/results/bench_randlora.json]

Floor = the frozen base with gradients flowing to the input embeddings through every layer (forward +
input-gradient backward): what any adapter step must at least cost. Every method is timed in the same
process, round-robin one step at a time (so machine noise hits all alike), median of `--steps` steps after
warm-up. Activation memory = bytes of the tensors autograd saves for backward (unique storages, excluding
parameters and buffers). Peak RSS = high-water resident memory (VmHWM, reset after the model is built) of a fresh subprocess
running 3 steps of one method.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import rankwise  # noqa: E402

TARGETS = ["query", "value"]  # PEFT's default targets for BERT


def build_base() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config).train()


def rankwise_configs() -> dict[str, rankwise.AdapterConfig]:
    return {
        "rankwise-randlora": rankwise.RandLoraConfig(r=32, randlora_alpha=640, target_modules=TARGETS),
        "rankwise-lora-r8": rankwise.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        "rankwise-nola": rankwise.NolaConfig(r=8, num_bases_a=256, num_bases_b=256, target_modules=TARGETS),
        "rankwise-loldu": rankwise.LolduConfig(target_modules=TARGETS),
        "rankwise-svfit": rankwise.SvfitConfig(target_modules=TARGETS),
        "rankwise-miss": rankwise.MissConfig(r=64, target_modules=TARGETS),
        "rankwise-miss-bat": rankwise.MissConfig(r=64, init_weights="bat", target_modules=TARGETS),
        **({"rankwise-salt": rankwise.SaltConfig(target_modules=TARGETS)} if hasattr(rankwise, "SaltConfig") else {}),
    }


def peft_configs() -> dict:
    from peft import LoraConfig, MissConfig, RandLoraConfig

    return {
        "peft-randlora": RandLoraConfig(r=32, randlora_alpha=640, target_modules=TARGETS),
        "peft-lora-r8": LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS),
        "peft-miss": MissConfig(r=64, target_modules=TARGETS),
        "peft-miss-bat": MissConfig(r=64, init_weights="bat", target_modules=TARGETS),
    }


def build(name: str):
    """(model, trainable params) for one entry of the bench."""
    base = build_base()
    if name == "floor":
        for p in base.parameters():
            p.requires_grad_(False)
        return base, []
    if name == "full-finetune":
        return base, list(base.parameters())
    if name.startswith("peft-"):
        from peft import get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, peft_configs()[name])
    else:
        model = rankwise.adapt(base, rankwise_configs()[name])
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def make_batch(batch: int, seq: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, seq, 384, generator=gen), torch.randn(batch, seq, 384, generator=gen)


def train_step(model, optimizer, embeds, target):
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    inputs = embeds.detach().requires_grad_(True)  # gradients flow through every layer to the input
    out = model(inputs_embeds=inputs).last_hidden_state
    torch.nn.functional.mse_loss(out, target).backward()
    if optimizer is not None:
        optimizer.step()


def saved_activation_bytes(model, embeds, target) -> int:
    """Bytes autograd keeps for backward in one step (unique storages; parameters and buffers excluded)."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inputs = embeds.detach().requires_grad_(True)
        out = model(inputs_embeds=inputs).last_hidden_state
        loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    return sum(storages.values())


def file_size(model, name: str) -> int | None:
    if name in ("floor", "full-finetune"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if name.startswith("peft-"):
                model.save_pretrained(tmp)
            else:
                model.save_adapter(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def peak_rss_child(name: str, batch: int, seq: int, threads: int) -> float:
    """Peak resident memory (MiB) of a fresh process that builds `name` and runs 3 train steps."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); sys.argv = ['x']\n"
        "import bench.bench_randlora as b\n"
        "torch.set_num_threads(%d)\n"
        "model, params = b.build(%r)\n"
        "opt = torch.optim.AdamW(params, lr=1e-4) if params else None\n"
        "embeds, target = b.make_batch(%d, %d)\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"  # reset the high-water mark: ru_maxrss survives fork+exec
        "for _ in range(3): b.train_step(model, opt, embeds, target)\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n"
    ) % (str(ROOT), threads, name, batch, seq)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(result.stdout.split()[-1]) / 1024.0  # VmHWM is in kB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", nargs="*", help="names to run (default: all)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-method subprocess RSS measurement")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_randlora.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = ["floor", "full-finetune", *rankwise_configs(), *peft_configs()]
    if args.only:
        names = [n for n in names if n in args.only or n == "floor"]
    embeds, target = make_batch(args.batch, args.seq)

    entries = {}
    for name in names:
        model, params = build(name)
        optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
        entries[name] = {"model": model, "optimizer": optimizer, "times": [],
                         "trainable": sum(p.numel() for p in params)}
    for _ in range(args.warmup):
        for entry in entries.values():
            train_step(entry["model"], entry["optimizer"], embeds, target)
    for step in range(args.steps):
        for name, entry in entries.items():
            start = time.perf_counter()
            train_step(entry["model"], entry["optimizer"], embeds, target)
            entry["times"].append(time.perf_counter() - start)
        print(f"step {step + 1}/{args.steps}", file=sys.stderr)

    floor = statistics.median(entries["floor"]["times"])
    results = {}
    for name, entry in entries.items():
        median = statistics.median(entry["times"])
        results[name] = {
            "step_ms_median": round(1000 * median, 2),
            "step_ms_quartiles": [round(1000 * q, 2) for q in statistics.quantiles(entry["times"], n=4)],
            "x_floor": round(median / floor, 3),
            "trainable_params": entry["trainable"],
            "adapter_file_bytes": file_size(entry["model"], name),
            "saved_activation_mib": round(saved_activation_bytes(entry["model"], embeds, target) / 2**20, 2),
        }
    for ours, peer in (("rankwise-randlora", "peft-randlora"), ("rankwise-lora-r8", "peft-lora-r8"),
                       ("rankwise-miss", "peft-miss"), ("rankwise-miss-bat", "peft-miss-bat")):
        if ours in results and peer in results:
            results[ours]["x_peft"] = round(results[ours]["step_ms_median"] / results[peer]["step_ms_median"], 3)
    if not args.no_rss:
        for name in results:
            results[name]["peak_rss_mib"] = round(peak_rss_child(name, args.batch, args.seq, args.threads), 1)
    report = {
        "model": "BertModel(hidden 384, 6 layers, 12 heads, ffn 1536) from config, fp32",
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
        "targets": TARGETS, "floor": "frozen base, input gradients through every layer",
        "torch": torch.__version__, "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    width = max(len(n) for n in results)
    for name, row in results.items():
        extra = f"  x_peft {row['x_peft']}" if "x_peft" in row else ""
        print(f"{name:<{width}}  {row['step_ms_median']:8.1f} ms  x_floor {row['x_floor']:.3f}{extra}  "
              f"act {row['saved_activation_mib']:7.1f} MiB  rss {row.get('peak_rss_mib', '-')}  "
              f"trainable {row['trainable_params']:,}  file {row['adapter_file_bytes']}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
