"""The sequence-classification task: texts + labels -> a classifier head; scored by accuracy."""
from __future__ import annotations

import random
from typing import Any

import torch

from rankwise.data.text import TextClassificationData
from rankwise.train.tasks import model_device, to_device

HEAD_NAMES = ("classifier", "score")
BERT_TARGETS = ["query", "key", "value", "dense"]


def encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def collate(ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def make_batches(ids, labels, batch_size, pad_id, seed=None):
    order = list(range(len(ids)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    else:  # evaluation: group similar lengths so batches carry little padding
        order.sort(key=lambda i: len(ids[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [collate([ids[j] for j in c], [labels[j] for j in c], pad_id) for c in chunks]


@torch.no_grad()
def evaluate_accuracy(model, batches, data_parallel=None) -> dict[str, float]:
    """Accuracy and mean loss; with `data_parallel` each rank takes every world-th batch and the sums are all-reduced."""
    model.eval()
    device = model_device(model)
    if data_parallel is not None:
        batches = batches[data_parallel.rank :: data_parallel.world_size]
    correct, total, loss = 0, 0, 0.0
    for batch in batches:
        batch = to_device(batch, device)
        out = model(**batch)
        loss += float(out.loss) * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        total += len(batch["labels"])
    if data_parallel is not None:
        correct, total, loss = data_parallel.all_reduce_sums([correct, total, loss])
    return {"accuracy": correct / total, "loss": loss / total}


class ClassificationTask:
    name = "classification"
    eval_in_loop_is_full = True

    def __init__(self, data: TextClassificationData):
        self.data = data

    def num_labels(self) -> int:
        return len(self.data.label_names)

    def default_targets(self, model) -> list[str]:
        return list(BERT_TARGETS)

    def head_modules(self, model) -> list[str]:
        return [name for name, _ in model.named_children() if name in HEAD_NAMES]

    def prepare(self, tokenizer, spec) -> None:
        self.spec, self.pad_id = spec, tokenizer.pad_token_id or 0
        self.train_ids = encode_texts(tokenizer, self.data.train_texts, spec.max_length)
        self.train_labels = list(self.data.train_labels)
        self.test_batches = make_batches(encode_texts(tokenizer, self.data.test_texts, spec.max_length),
                                         self.data.test_labels, 64, self.pad_id)

    def train_batches(self, epoch: int):
        return make_batches(self.train_ids, self.train_labels, self.spec.batch_size, self.pad_id,
                            seed=self.spec.train.seed + epoch)

    def split_validation(self):
        cut = max(1, len(self.train_ids) // 10)
        val = make_batches(self.train_ids[-cut:], self.train_labels[-cut:], self.spec.batch_size, self.pad_id)
        self.train_ids, self.train_labels = self.train_ids[:-cut], self.train_labels[:-cut]
        return val

    def loss(self, model, batch):
        return model(**batch).loss

    def evaluate(self, model, data_parallel=None, full: bool = True) -> dict[str, Any]:
        return evaluate_accuracy(model, self.test_batches, data_parallel)

    def summary(self) -> str:
        return self.data.summary()

    def extra_metrics(self) -> dict[str, Any]:
        labels = self.data.test_labels
        return {"label_names": self.data.label_names,
                "majority_baseline": max(labels.count(k) for k in set(labels)) / len(labels)}
