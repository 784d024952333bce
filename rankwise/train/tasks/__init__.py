"""Fine-tuning tasks: what `rankwise.train.finetune.finetune` plugs into the one training loop.

A task supplies the base model's kind, the default adapter targets, data loading and collation, the loss
and its evaluation; the loop, callbacks (procedures), checkpoints, progress and metrics files are shared.

    classification  sequence classifier (AutoModelForSequenceClassification), accuracy      -> classification.py
    causal-lm       instruction-tuned decoder (AutoModelForCausalLM), loss / perplexity and
                    exact-match of greedy generations on held-out prompts                  -> causal_lm.py
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from rankwise.core.errors import ConfigError

TASK_NAMES = ("classification", "causal-lm")


class Task(Protocol):
    name: str  # "classification" | "causal-lm" (the `task` of rankwise.data.models.load_base)
    # True when the loop's in-training evaluation is the full evaluation (its last one can serve as "after")
    eval_in_loop_is_full: bool

    def num_labels(self) -> int | None: ...
    def default_targets(self, model) -> list[str] | str: ...
    def head_modules(self, model) -> list[str]: ...
    def prepare(self, tokenizer, spec) -> None: ...
    def train_batches(self, epoch: int) -> list[dict[str, torch.Tensor]]: ...
    def split_validation(self) -> list[dict[str, torch.Tensor]]: ...
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def evaluate(self, model, data_parallel=None, full: bool = True) -> dict[str, Any]: ...
    def summary(self) -> str: ...
    def extra_metrics(self) -> dict[str, Any]: ...


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def check_task(name: str) -> str:
    if name not in TASK_NAMES:
        raise ConfigError(f"task={name!r} is invalid: expected one of {', '.join(TASK_NAMES)}")
    return name
