"""Fine-tune a sequence classifier with any registered adapter method: what `rankwise finetune` runs.

`rankwise finetune --nproc N` runs the same function in N processes (`finetune_worker`), data-parallel
through `rankwise.train.distributed`: every rank tokenizes the same data, trains on its rows of each batch,
evaluates its share of the test batches; rank 0 alone writes the adapter, metrics and plot.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.data.models import load_classifier
from rankwise.data.text import TextClassificationData
from rankwise.train.loop import TrainConfig, train
from rankwise.train.procedures import build_procedure, dense_trainable, finish_procedure, get_procedure, save_dense_low_rank

HEAD_NAMES = ("classifier", "score")


@dataclass
class FinetuneSpec:
    method: str = "lora"
    rank: int | None = 8
    targets: list[str] | str | None = field(default_factory=lambda: ["query", "key", "value", "dense"])
    method_options: dict[str, Any] = field(default_factory=dict)
    max_length: int = 64
    batch_size: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)
    procedure: str | None = None  # a training procedure (rankwise.train.procedures), e.g. "increlora"
    procedure_options: dict[str, Any] = field(default_factory=dict)


def build_config(spec: FinetuneSpec, head: list[str]):
    info = rankwise.get_method(spec.method)
    kwargs = dict(spec.method_options)
    if spec.rank is not None:
        if info.config_cls.rank_field is None:
            raise ConfigError(f"method {info.name!r} has no rank; drop --rank")
        kwargs[info.config_cls.rank_field] = spec.rank
    return info.config_cls(target_modules=spec.targets, modules_to_save=head, **kwargs)


def _encode(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def _collate(ids: list[list[int]], labels: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels)}


def _batches(ids, labels, batch_size, pad_id, seed=None):
    order = list(range(len(ids)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    else:  # evaluation: group similar lengths so batches carry little padding
        order.sort(key=lambda i: len(ids[i]))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [_collate([ids[j] for j in c], [labels[j] for j in c], pad_id) for c in chunks]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model, batches, data_parallel=None) -> dict[str, float]:
    """Accuracy and mean loss; with `data_parallel` each rank takes every world-th batch and the sums are all-reduced."""
    model.eval()
    device = next(model.parameters()).device
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


def finetune_classifier(
    data: TextClassificationData,
    spec: FinetuneSpec,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    progress: bool = True,
    data_parallel=None,
) -> dict[str, Any]:
    """Adapt, train, evaluate before/after, and save adapter + metrics.json + curve.png under `output_dir`.

    `data_parallel`: this process's `rankwise.train.distributed.DataParallel` in a multi-process run
    (`spec.batch_size` is then the global batch, split over the ranks); only rank 0 writes files.
    """
    output_dir = Path(output_dir)
    dp = data_parallel
    is_main = dp is None or dp.is_main
    progress = progress and is_main
    torch.manual_seed(spec.train.seed)
    base, tokenizer = load_classifier(model_path, num_labels=len(data.label_names))
    head = [name for name, _ in base.named_children() if name in HEAD_NAMES]
    dense = spec.procedure is not None and get_procedure(spec.procedure).name == "trp"
    model = dense_trainable(base, spec.targets, head) if dense else rankwise.adapt(base, build_config(spec, head))
    device = dp.device if dp is not None else torch.device("cpu")
    model.to(device)
    pad_id = tokenizer.pad_token_id or 0
    train_ids = _encode(tokenizer, data.train_texts, spec.max_length)
    train_labels = list(data.train_labels)
    test_batches = _batches(_encode(tokenizer, data.test_texts, spec.max_length), data.test_labels, 64, pad_id)
    loss_fn = lambda m, batch: m(**to_device(batch, device)).loss  # noqa: E731
    callbacks, val_batches = [], None
    if spec.procedure is not None:
        if "val_batches" in get_procedure(spec.procedure).needs:  # held out from the training data, never the test set
            cut = max(1, len(train_ids) // 10)
            val_batches = _batches(train_ids[-cut:], train_labels[-cut:], spec.batch_size, pad_id)
            train_ids, train_labels = train_ids[:-cut], train_labels[:-cut]
        callbacks.append(build_procedure(spec.procedure, model, val_batches=val_batches, loss_fn=loss_fn, **spec.procedure_options))

    if dp is not None and spec.batch_size < dp.world_size:
        raise ConfigError(f"batch_size={spec.batch_size} is smaller than the {dp.world_size} processes: "
                          f"the batch size is global (split over the processes); use --batch-size >= {dp.world_size}")
    before = evaluate(model, test_batches, dp)
    started = time.perf_counter()
    state = train(
        model,
        batches=lambda epoch: _batches(train_ids, train_labels, spec.batch_size, pad_id, seed=spec.train.seed + epoch),
        loss_fn=loss_fn,
        config=spec.train,
        evaluate=lambda m: evaluate(m, test_batches, dp),
        callbacks=callbacks,
        param_groups=None if dense else model.parameter_groups(spec.train.lr, spec.train.weight_decay),
        progress=progress,
        data_parallel=dp,
    )
    train_seconds = time.perf_counter() - started
    procedure_summary = finish_procedure(callbacks[0], output_dir if is_main else None, _console(progress)) if callbacks else None
    if dense:
        procedure_summary["low_rank"] = save_dense_low_rank(model, callbacks[0], output_dir / "low_rank" if is_main else None)
    evals = [h for h in state.history if "eval_accuracy" in h]
    if not callbacks and evals and evals[-1]["step"] == state.step:  # the loop already evaluated the final weights
        after = {"accuracy": evals[-1]["eval_accuracy"], "loss": evals[-1]["eval_loss"]}
    else:  # a procedure may change the model when it finishes (e.g. TRP's final low-rank substitution)
        after = evaluate(model, test_batches, dp)
    if not is_main:
        return {"before": before, "after": after, "history": state.history}
    if not dense:
        model.save_adapter(output_dir / "adapter")
    metrics = {
        "method": spec.method,
        "data": data.summary(),
        "label_names": data.label_names,
        "before": before,
        "after": after,
        "majority_baseline": max(data.test_labels.count(k) for k in set(data.test_labels)) / len(data.test_labels),
        "trainable": trainable_summary(model),
        "procedure": procedure_summary,
        "train_seconds": train_seconds,
        "processes": 1 if dp is None else dp.world_size,
        "spec": {**asdict(spec), "train": asdict(spec.train)},
        "history": state.history,
    }
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    plot_curves(state.history, output_dir / "curve.png", title=f"{spec.method} on {data.source}")
    return metrics


def finetune_worker(data: TextClassificationData, spec: FinetuneSpec, output_dir: str | Path, model_path=None) -> None:
    """One rank of `rankwise finetune --nproc N` (the process group is already joined)."""
    import torch.distributed as dist

    from rankwise.train.distributed import DataParallel

    finetune_classifier(data, spec, output_dir, model_path, data_parallel=DataParallel(dist.get_rank(), dist.get_world_size()))


def trainable_summary(model) -> dict[str, int | float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def _console(progress: bool):
    from rich.console import Console

    return Console() if progress else None


def plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history if "loss" in h]
    ax.plot(steps, [h["loss"] for h in history if "loss" in h], color="tab:blue", alpha=0.8, label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss")
    evals = [h for h in history if "eval_accuracy" in h]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([h["step"] for h in evals], [h["eval_accuracy"] for h in evals], "o-", color="tab:red", label="test accuracy")
        ax2.set_ylabel("test accuracy")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
