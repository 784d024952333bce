"""A plain, readable training loop: the one `rankwise finetune` uses.

    for epoch: for batch: loss = loss_fn(model, batch) / accum; backward; (every accum) clip, step, schedule
    callbacks see: on_step_start, after_backward, on_step_end, on_eval

Training procedures (ALLoRA, IncreLoRA, ...) are `Callback`s; they may change the model and the
optimizer between steps.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rankwise.core.errors import ConfigError


@runtime_checkable
class Callback(Protocol):
    """Hooks the loop calls; implement any subset (missing hooks are skipped)."""

    def on_step_start(self, state: "TrainState") -> None: ...
    def after_backward(self, state: "TrainState") -> None: ...
    def on_step_end(self, state: "TrainState") -> None: ...
    def on_eval(self, state: "TrainState", metrics: dict[str, float]) -> None: ...


@dataclass
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    schedule: str = "linear"  # "linear" | "cosine" | "constant"
    warmup_ratio: float = 0.06
    seed: int = 0
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end of each epoch)

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs", "an integer >= 1"),
            (self.lr > 0, "lr", "a number > 0"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (self.schedule in ("linear", "cosine", "constant"), "schedule", "'linear', 'cosine' or 'constant'"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "None or a number > 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: expected {allowed}.")


@dataclass
class TrainState:
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0            # optimizer steps taken
    epoch: int = 0
    loss: float = float("nan")
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _call(callbacks: Iterable[Any], hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def train(
    model: torch.nn.Module,
    batches: Callable[[int], list[Any]],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    config: TrainConfig,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    callbacks: Iterable[Any] = (),
    param_groups: list[dict[str, Any]] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train `model`. `batches(epoch)` returns that epoch's list of batches (shuffled by the caller's seed).

    `param_groups` default to every trainable parameter; adapted models pass `model.parameter_groups(lr)`
    so per-group learning-rate multipliers are honoured.
    """
    callbacks = list(callbacks)
    seed_everything(config.seed)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(batches(0)) / config.grad_accum)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, total, int(config.warmup_ratio * total))
    )
    state = TrainState(model, optimizer, scheduler)
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=total, loss=float("nan"))
        for epoch in range(config.epochs):
            state.epoch = epoch
            model.train()
            epoch_batches = batches(epoch)
            running = 0.0
            for i, batch in enumerate(epoch_batches):
                if i % config.grad_accum == 0:
                    _call(callbacks, "on_step_start", state)
                loss = loss_fn(model, batch) / config.grad_accum
                loss.backward()
                running += float(loss.detach())
                last_micro = (i + 1) % config.grad_accum == 0 or i + 1 == len(epoch_batches)
                if not last_micro:
                    continue
                _call(callbacks, "after_backward", state)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.loss = running
                state.history.append({"step": state.step, "epoch": epoch, "loss": running, "lr": scheduler.get_last_lr()[0]})
                running = 0.0
                _call(callbacks, "on_step_end", state)
                bar.update(task, advance=1, loss=state.loss)
                if evaluate and config.eval_every and state.step % config.eval_every == 0:
                    _run_eval(state, evaluate, callbacks)
            if evaluate and not config.eval_every:
                _run_eval(state, evaluate, callbacks)
    return state


def _run_eval(state: TrainState, evaluate, callbacks) -> None:
    metrics = evaluate(state.model)
    state.history.append({"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics.items()}})
    _call(callbacks, "on_eval", state, metrics)
    state.model.train()
