"""AFM vs weight SVD on a real CTR task: DeepFM on MovieLens-100k (label = rating >= 4), AUC on a held-out split.

Arms at equal parameter counts: the MLP tower (dnn.0, dnn.2) compressed to several ratios, and the
field embeddings (dim 16) compressed to ranks 8/4/2, by AFM (output/lookup covariance) and by plain
truncated SVD of the weights/tables. Calibration = 20k training rows (the paper uses the whole
training set). Also AFM+Act (ReLU between the factors) after one fine-tuning epoch.

    PYTHONPATH=. python bench/compress_ctr.py
"""
from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import torch

from rankwise.compress import compress
from rankwise.compress._common import count_parameters
from rankwise.compress.afm import LowRankEmbedding, embedding_shrinks
from rankwise.data.movielens import DeepFM, ctr_metrics, load_movielens_ctr, train_ctr
from rankwise.linalg import truncated_svd

RESULTS = Path(__file__).parent / "results"
MLP = [r"^dnn\.[02]$"]
EMB = [r"^embeddings\.\d$"]


def svd_embeddings(model: DeepFM, rank: int) -> DeepFM:
    """The data-free baseline for tables: rank-k SVD of each table, uniform over rows."""
    for f, table in enumerate(model.embeddings):
        if not embedding_shrinks(table, rank):
            continue
        U, S, Vh = truncated_svd(table.weight.detach(), rank)
        new = LowRankEmbedding(table.num_embeddings, table.embedding_dim, rank)
        with torch.no_grad():
            new.table.weight.copy_(U * S)
            new.up.weight.copy_(Vh.T)
            new.up.bias.zero_()
        model.embeddings[f] = new
    return model


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = load_movielens_ctr()
    train, valid, test = data.split()
    torch.manual_seed(0)
    base = train_ctr(DeepFM(data.field_sizes), train, epochs=2)
    calibration = list(train.features[:20000].split(2048))
    rows = [{"arm": "uncompressed", "params": count_parameters(base), **ctr_metrics(base, test)}]
    print(rows[-1], flush=True)

    def record(arm, model, **extra):
        rows.append({"arm": arm, "params": count_parameters(model), **ctr_metrics(model, test), **extra})
        print(rows[-1], flush=True)

    for ratio in (0.3, 0.1, 0.05, 0.02):
        afm, report = compress(copy.deepcopy(base), "afm", calibration, ratio=ratio, target_modules=MLP)
        record("afm mlp", afm, ratio=ratio, ranks={k: v.get("rank") for k, v in report.layers.items()})
        svd, report = compress(copy.deepcopy(base), "svd", ratio=ratio, target_modules=MLP)
        record("svd mlp", svd, ratio=ratio, ranks={k: v.get("rank") for k, v in report.layers.items()})
    for rank in (8, 4, 2):
        afm, _ = compress(copy.deepcopy(base), "afm", calibration, ratio=1.0, target_modules=EMB, embedding_rank=rank)
        record("afm embeddings", afm, embedding_rank=rank)
        record("svd embeddings", svd_embeddings(copy.deepcopy(base), rank), embedding_rank=rank)
    # the paper's setting: MLP to a small rank and embeddings 16 -> 2, then AFM+Act with fine-tuning
    both = MLP + EMB
    afm, _ = compress(copy.deepcopy(base), "afm", calibration, ratio=0.1, target_modules=both, embedding_rank=2)
    record("afm mlp 0.1 + embeddings 2", afm)
    act, _ = compress(copy.deepcopy(base), "afm", calibration, ratio=0.1, target_modules=both, embedding_rank=2,
                      activation="relu", finetune_steps=0)
    record("afm+act (no fine-tune)", act)
    # the library's fine-tuning stage: labelled calibration = the whole training split, one pass (the default)
    order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(0))
    pairs = [(train.features[i], train.labels[i]) for i in order.split(512)]
    tuned, report = compress(copy.deepcopy(base), "afm", pairs, ratio=0.1, target_modules=both, embedding_rank=2,
                             activation="relu")
    info = report.extra["finetune"]
    record("afm+act + compress fine-tune stage (1 epoch)", tuned, steps=info["steps"],
           train_loss_before=info["loss_before"], train_loss_after=info["loss_after"])
    record("afm+act + 1 epoch fine-tune", train_ctr(act, train, epochs=1, lr=1e-3))
    record("afm + 1 epoch fine-tune", train_ctr(afm, train, epochs=1, lr=1e-3))
    record("uncompressed + 1 more epoch", train_ctr(copy.deepcopy(base), train, epochs=1, lr=1e-3))
    out = {"meta": {"data": "MovieLens-100k (recbole wheel), label rating>=4, split 80/10/10 seed 2020",
                    "model": "DeepFM dim 16, MLP 200-200", "metric": "test AUC / logloss",
                    "calibration_rows": 20000, "seconds": time.perf_counter() - start}, "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    tmp = RESULTS / "compress_ctr.json.tmp"
    tmp.write_text(json.dumps(out, indent=2))
    os.replace(tmp, RESULTS / "compress_ctr.json")


if __name__ == "__main__":
    main()
