"""Break-for-Make's two stages on the arena budget: old (stage 1 alone, no partners) vs the completed method
(stage-1 MCP partner losses; stage 2 from the composition with the Riemannian-preconditioned AdamW), and step time
against LoRA.

    PYTHONPATH=. python bench/b4m_stages.py [--steps 48 --lr 0.016]

Budget (the arena's, bench/results/arena/NOTES.md): all-MiniLM-L6-v2 + 3-class tweets, batch 16, max_length 64,
rank 8 on query/key/value/dense, linear schedule, 6 % warm-up, grad-norm 1, test accuracy on 400 tweets.
lr 0.016 (the arena's pick for b4m). Text stands in for SDXL: "content" = the first 768 training tweets, "style" =
the next 768, and three further disjoint 768-tweet sets are the auxiliary partners. Runs share one process, so
step-time ratios share the machine's load (noisy on a shared box). Writes bench/results/b4m_stages.json.
"""
from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

import torch

from rankwise.adapters.b4m import compose
from rankwise.data.text import load_text_classification
from rankwise.train.finetune import FinetuneSpec, finetune_classifier
from rankwise.train.loop import TrainConfig

TARGETS = ["query", "key", "value", "dense"]


def write_csv(path: Path, texts, labels, names) -> str:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((t, names[y]) for t, y in zip(texts, labels))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=0.016)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="bench/results/b4m_stages.json")
    parser.add_argument("--stage2-lr", type=float, default=None, help="stage 2's lr (default --lr)")
    parser.add_argument("--stage2-only", default=None, help="a previous run's work directory: re-run stage 2 only, "
                        "appending its rows to --output")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.steps * 16
    sets = load_text_classification(None, train_size=5 * n, test_size=400, seed=0)
    work = Path(tempfile.mkdtemp(prefix="b4m-bench-"))
    files = [write_csv(work / f"set{i}.csv", sets.train_texts[i * n:(i + 1) * n], sets.train_labels[i * n:(i + 1) * n],
                       sets.label_names) for i in range(5)]
    content, style, partners = files[0], files[1], files[2:]

    def data(path):
        return _with_test(load_text_classification(path, train_size=n, test_size=1, seed=0), sets)

    def run(name, path, method="b4m", rank=8, lr=None, **options):
        lr = lr or args.lr
        spec = FinetuneSpec(method=method, rank=rank, targets=TARGETS, method_options=options, max_length=64,
                            batch_size=16, train=TrainConfig(lr=lr, max_steps=args.steps, seed=0, eval_every=10**6))  # no eval inside the timed loop
        metrics = finetune_classifier(data(path), spec, work / name, progress=False)
        row = {"run": name, "lr": lr, "before": metrics["before"]["accuracy"], "accuracy": metrics["after"]["accuracy"], "test_loss": metrics["after"]["loss"],
               "step_s": metrics["train_seconds"] / metrics["optimizer_steps"],
               "final_train_loss": [h for h in metrics["history"] if "loss" in h][-1]["loss"]}
        print(json.dumps(row), flush=True)
        return row

    lr2 = args.stage2_lr or args.lr
    if args.stage2_only:
        old = Path(args.stage2_only)
        content, style = str(old / "set0.csv"), str(old / "set1.csv")
        result = json.loads(Path(args.output).read_text())
        rows = result["rows"]
        for optimizer in ("riemannian", "adamw"):
            name = f"b4m-joint stage 2, {optimizer}, lr {lr2:g}"
            rows.append(run(name, style, lr=lr2, role="joint", optimizer=optimizer, init_from=str(old / "fused"),
                            partner_data=[content]))
            rows[-1]["step_vs_lora"] = rows[-1]["step_s"] / rows[0]["step_s"]
        Path(args.output).write_text(json.dumps(result, indent=2))
        return
    rows = [run("lora", content, method="lora"),
            run("b4m-content-old (no partners)", content, role="content"),
            run("b4m-content-MCP (3 partners)", content, role="content", partner_data=partners),
            run("b4m-style-MCP (3 partners)", style, role="style", partner_data=[files[0]] + partners[:2])]
    compose(work / "b4m-content-MCP (3 partners)" / "adapter", work / "b4m-style-MCP (3 partners)" / "adapter", work / "fused")
    rows += [run("b4m-joint stage 2, RiemannianAdamW", style, lr=lr2, role="joint", init_from=str(work / "fused"),
                 partner_data=[content]),
             run("b4m-joint stage 2, AdamW (old optimizer)", style, lr=lr2, role="joint", optimizer="adamw",
                 init_from=str(work / "fused"), partner_data=[content])]
    lora_step = rows[0]["step_s"]
    for row in rows:
        row["step_vs_lora"] = row["step_s"] / lora_step
    result = {"budget": {"steps": args.steps, "batch_size": 16, "lr": args.lr, "rank": 8, "targets": TARGETS,
                         "threads": args.threads, "test": 400, "model": "all-MiniLM-L6-v2 (embedded)"}, "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def _with_test(data, reference):
    """The partner/concept file's training rows with the shared 400 test tweets (one test set for every run)."""
    import dataclasses

    if data.label_names != reference.label_names:
        raise SystemExit(f"label sets differ: {data.label_names} vs {reference.label_names}")
    return dataclasses.replace(data, test_texts=reference.test_texts, test_labels=list(reference.test_labels))


if __name__ == "__main__":
    main()
