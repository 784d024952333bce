"""Compression quality on a real encoder: all-MiniLM-L6-v2 (BERT, 6 layers).

Quality = (1) mean cosine similarity of the compressed model's sentence embeddings (masked mean
pooling) to the original's on 500 held-out tweets, and (2) test accuracy of a logistic-regression
probe trained on each model's own embeddings of 1000 tweets (3-class sentiment, the embedded
classification task; the original model's probe is the reference), and (3) the accuracy of the
*original* model's probe applied unchanged to the compressed model's embeddings ("frozen probe": can the
compressed encoder replace the original under an existing classifier?). Calibration = 256 other tweets.
Every encoder linear (query/key/value/attention output/intermediate/output, 36 layers) is compressed.
MoDeGPT runs on the BERT blocks (no RoPE, biases carried). Calibration statistics skip padded positions.

    PYTHONPATH=. python bench/compress_minilm.py --methods svd lord afm modegpt pela --ratios 0.9 0.8 0.7 0.5
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from _compress_results import existing_rows, merge_results, plot  # bench/ is on sys.path when run as a script
from rankwise.compress import get_method
from rankwise.compress.evaluate import cpu_latency_ms, embedding_cosine, mean_pooled_embeddings
from rankwise.data.offline_assets import minilm_dir
from rankwise.data.text import load_text_classification

RESULTS = Path(__file__).parent / "results"


def batches(tokenizer, texts, size=32):
    return [dict(tokenizer(texts[i:i + size], padding=True, truncation=True, max_length=64, return_tensors="pt"))
            for i in range(0, len(texts), size)]


def fit_probe(train_x, train_y):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(train_x.numpy(), train_y)


def probe_predictions(train_x, train_y, test_x, probe=None) -> list[int]:
    probe = probe if probe is not None else fit_probe(train_x, train_y)
    return [int(p) for p in probe.predict(test_x.numpy())]


def accuracy(predictions: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(predictions, labels)) / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["svd", "lord", "afm", "modegpt", "pela"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.9, 0.8, 0.7, 0.5])
    parser.add_argument("--option", nargs="*", default=[])
    parser.add_argument("--variant", default="")
    parser.add_argument("--probe-train", type=int, default=1000, help="tweets the logistic probe is trained on")
    parser.add_argument("--test", type=int, default=500, help="held-out tweets for the cosine and the probe")
    parser.add_argument("--results", default="compress_minilm", help="JSON/PNG name under bench/results/")
    parser.add_argument("--skip-existing", action="store_true",
                        help="resume: skip (method, variant, ratio) rows already in the results JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    base = AutoModel.from_pretrained(str(path), dtype=torch.float32).eval()
    n_train = args.probe_train
    data = load_text_classification(train_size=n_train + 256, test_size=args.test, seed=0)
    calibration = batches(tokenizer, data.train_texts[n_train:n_train + 256])
    train_b, test_b = batches(tokenizer, data.train_texts[:n_train]), batches(tokenizer, data.test_texts)
    train_y, test_y = data.train_labels[:n_train], data.test_labels
    ref_train, ref_test = mean_pooled_embeddings(base, train_b), mean_pooled_embeddings(base, test_b)
    base_probe = fit_probe(ref_train, train_y)
    base_acc = accuracy(probe_predictions(ref_train, train_y, ref_test, base_probe), test_y)
    meta = {"model": "all-MiniLM-L6-v2", "data": data.summary(), "base": 1.0, "base_probe_accuracy": base_acc,
            "probe": f"logistic regression on {n_train} tweets' embeddings, accuracy on the {len(test_y)} held-out "
                     "tweets (binomial s.e. ~" f"{(base_acc * (1 - base_acc) / len(test_y)) ** 0.5:.3f})",
            "test_labels": "".join(str(y) for y in test_y),
            "base_latency_ms": cpu_latency_ms(base, test_b[0], repeats=3), "latency_batch": "32 tweets, <=64 tokens",
            "threads": 1}
    print(meta, flush=True)
    for method in args.methods:
        config_cls, run = get_method(method)
        for ratio in args.ratios:
            if args.skip_existing and (method, args.variant, ratio) in existing_rows(RESULTS / f"{args.results}.json"):
                print(f"skip {method} {args.variant!r} {ratio}: already measured", flush=True)
                continue
            model = copy.deepcopy(base)
            start = time.perf_counter()
            model, report = run(model, config_cls(ratio=ratio, **options), calibration)
            seconds = time.perf_counter() - start
            emb_train, emb_test = mean_pooled_embeddings(model, train_b), mean_pooled_embeddings(model, test_b)
            predictions = probe_predictions(emb_train, train_y, emb_test)
            frozen = probe_predictions(None, None, emb_test, base_probe)
            row = {"method": method, "variant": args.variant, "ratio": ratio, "measured_ratio": report.compressed_ratio,
                   "cosine": embedding_cosine(ref_test, emb_test),
                   "probe_accuracy": accuracy(predictions, test_y),
                   # kept so the table can compare methods on the same tweets (paired), not just by two noisy rates
                   "probe_predictions": "".join(str(p) for p in predictions),
                   "frozen_probe_accuracy": accuracy(frozen, test_y),
                   "frozen_probe_predictions": "".join(str(p) for p in frozen),
                   "params_after": report.params_after, "params_before": report.params_before,
                   "latency_ms": cpu_latency_ms(model, test_b[0], repeats=3), "compress_seconds": seconds,
                   "options": options}
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_predictions")}), flush=True)
            data_out = merge_results(RESULTS / f"{args.results}.json", [row], meta)
            plot(data_out, RESULTS / f"{args.results}.png", metric="cosine",
                 title="all-MiniLM-L6-v2: embedding cosine to the original (held-out tweets)")


if __name__ == "__main__":
    main()
