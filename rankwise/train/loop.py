"""A plain, readable training loop: the one `rankwise finetune` uses.

    for epoch: for batch: loss = loss_fn(model, batch) / accum; backward
        every accum micro-batches: clip -> after_backward -> optimizer.step -> schedule.step -> zero_grad
                                   -> on_step_end -> checkpoint (every N) -> evaluate (every M)
    callbacks see: on_step_start, after_backward, on_step_end, on_eval

The hook order is the one `transformers.Trainer` uses (`on_step_begin`, clip, `on_pre_optimizer_step`,
step, `on_step_end`), so a callback behaves the same here and behind `rankwise.train.hf.TrainerBridge`.
Training procedures (ALLoRA, IncreLoRA, ...) are `Callback`s; they may change the model and the
optimizer in `on_step_end`, between optimizer steps.

A method can bring its own callbacks: where a paper's training is more than the loss (SaRA's nuclear norm
and progressive re-selection, SNELLA's sparsity allocation), the method's config returns them from
`training_callbacks(model, adapter_name)`, and `train` adds them for every active adapter of the model
(`method_callbacks`), after the ones it is given. So `rankwise finetune`, a direct `train(...)` and the
Trainer bridge (`rankwise.train.hf.method_bridges`) all run the method as its paper trains it.

Checkpoints (`<output_dir>/checkpoint-<step>/`) hold safetensors for tensors and JSON for scalars
(model, optimizer, schedule, RNG, callbacks); `resume_from=` continues a run to the same parameters
an uninterrupted run with the same seed reaches.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Protocol, runtime_checkable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from rankwise.core.errors import CheckpointError, ConfigError, TrainingError

if TYPE_CHECKING:
    from rankwise.train.distributed import DataParallel


@runtime_checkable
class Callback(Protocol):
    """Hooks the loop calls; implement any subset (missing hooks are skipped).

    Optional: `state_dict() -> dict` (tensors and JSON values) and `load_state_dict(d, state)` to be
    checkpointed; `supports_resume = False` for a callback whose changes cannot be replayed from a checkpoint.
    """

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
    schedule: str = "linear"  # "linear" | "cosine" | "constant" (transformers' formulas)
    warmup_ratio: float = 0.06
    warmup_steps: int | None = None  # when set, overrides warmup_ratio (optimizer steps)
    max_steps: int = 0  # > 0: train exactly this many optimizer steps (overrides epochs; the data repeats as needed)
    seed: int = 0
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end of each epoch)
    checkpoint_every: int = 0  # optimizer steps between checkpoints (0: none); needs output_dir
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (older ones are deleted)
    # On CPU, LoRA's B=0 start gives Adam denormal second moments whose arithmetic is ~100x slower
    # (measured: 0.45 s of a 1.7 s MiniLM step). Flushing them to zero changes values below 1e-38 only.
    flush_denormals: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, "epochs", "an integer >= 1"),
            (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 1, "lr",
             "a finite number in (0, 1] (AdamW learning rates are typically 1e-5 .. 1e-2)"),
            (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 10,
             "weight_decay", "a finite number in [0, 10]"),
            (self.max_steps >= 0, "max_steps", "an integer >= 0 (0: run the full epochs)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps", "None or an integer >= 0"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (self.schedule in ("linear", "cosine", "constant"), "schedule", "'linear', 'cosine' or 'constant'"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "None or a number > 0"),
            (self.eval_every >= 0, "eval_every", "an integer >= 0"),
            (self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints", "an integer >= 1"),
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
    total_steps: int = 0     # optimizer steps the whole run will take
    batch_index: int = 0     # micro-batches of the current epoch already consumed
    config: TrainConfig | None = None
    data_parallel: Any = None  # rankwise.train.distributed.DataParallel in a multi-process run: callbacks that
                               # gather statistics from this rank's rows average them through it


class LRFactor:
    """Learning-rate multiplier at a step: warm-up then linear/cosine decay (transformers' formulas).

    A plain object (not a closure) so `LambdaLR.state_dict()` records it as JSON. `start` shifts the
    clock: a parameter group added at step `start` gets its own warm-up (IncreLoRA's "restart warmup").
    """

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int, start: int = 0):
        self.schedule, self.total_steps, self.warmup_steps, self.start = schedule, total_steps, warmup_steps, start

    def __call__(self, step: int) -> float:
        step = step - self.start
        total = self.total_steps - self.start
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if self.schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        return 1.0


def lr_lambda(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    return LRFactor(schedule, total_steps, warmup_steps)


def add_param_group(state: TrainState, params: list[torch.nn.Parameter], restart_warmup: bool = True, **group) -> None:
    """Add new tensors to the optimizer *and* the LR schedule (a plain `add_param_group` would leave the
    schedule blind to the group, so it would train at a constant LR)."""
    optimizer, scheduler = state.optimizer, state.scheduler
    if not isinstance(getattr(scheduler, "lr_lambdas", [None])[0], LRFactor):
        raise ConfigError("this procedure adds parameter groups, which needs a rankwise LR schedule: with transformers.Trainer "
                          "pass optimizers=(opt, rankwise.train.hf.bridge_scheduler(opt, 'linear', max_steps, warmup_steps))")
    base_lr = group.pop("lr", optimizer.defaults["lr"])
    optimizer.add_param_group({"params": params, "lr": base_lr, **group})
    template = scheduler.lr_lambdas[0]
    start = scheduler.last_epoch if restart_warmup else template.start
    factor = LRFactor(template.schedule, template.total_steps, template.warmup_steps, start)
    scheduler.base_lrs.append(base_lr)
    scheduler.lr_lambdas.append(factor)
    optimizer.param_groups[-1]["initial_lr"] = base_lr
    optimizer.param_groups[-1]["lr"] = base_lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _call(callbacks: Iterable[Any], hook: str, *args) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def method_callbacks(model: torch.nn.Module) -> list[Any]:
    """The callbacks the methods of `model`'s active adapters bring (`AdapterConfig.training_callbacks`).

    `model` is an `AdaptedModel` or a module holding one (a wrapper adding a loss); any other model has none.
    A method whose adapter is not trainable (loaded with `is_trainable=False`) gets none.
    """
    from rankwise.core.model import AdaptedModel

    adapted = model if isinstance(model, AdaptedModel) else next(
        (m for m in model.modules() if isinstance(m, AdaptedModel)), None)
    if adapted is None:
        return []
    found = []
    for name in list(adapted.active_adapters):
        found.extend(adapted.configs[name].training_callbacks(adapted, name))
    return found


def _with_method_callbacks(model, callbacks: list[Any]) -> list[Any]:
    # A callback the caller built itself for the same method and adapter replaces the automatic one.
    given = {getattr(cb, "method_key", None) for cb in callbacks} - {None}
    return callbacks + [cb for cb in method_callbacks(model) if getattr(cb, "method_key", None) not in given]


def build_optimizer(model, config: TrainConfig, param_groups, total_steps: int):
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise ConfigError("nothing to train: the model has no parameter with requires_grad=True")
    optimizer = None
    for adapter_config in getattr(model, "configs", {}).values():  # an adapter method may bring its own optimizer
        make = getattr(adapter_config, "make_optimizer", None)
        optimizer = make(model, groups, lr=config.lr, weight_decay=config.weight_decay) if make else None
        if optimizer is not None:
            break
    if optimizer is None:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(config.warmup_ratio * total_steps)
    factors = [LRFactor(config.schedule, total_steps, warmup) for _ in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    return optimizer, scheduler


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True):
    """Flush denormal floats to zero inside the block (CPU only; a no-op where unsupported).

    torch cannot read the current setting, so flushing is switched off on exit rather than restored."""
    if not enabled:
        yield
        return
    previous_supported = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if previous_supported:
            torch.set_flush_denormal(False)


def train(
    model: torch.nn.Module,
    batches: Callable[[int], list[Any]],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    config: TrainConfig,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    callbacks: Iterable[Any] = (),
    param_groups: list[dict[str, Any]] | None = None,
    progress: bool = True,
    *,
    output_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    stop_after: int | None = None,
    data_parallel: "DataParallel | None" = None,
    with_method_callbacks: bool = True,
) -> TrainState:
    """Train `model`. `batches(epoch)` returns that epoch's list of batches; it must give the same list for
    the same epoch every time (shuffle with a seed derived from the epoch) so that a resumed run sees the same data.

    `param_groups` default to every trainable parameter; adapted models pass `model.parameter_groups(lr)`
    so per-group learning-rate multipliers are honoured.
    `output_dir`: where `metrics.jsonl` and `checkpoint-<step>/` go (checkpoints every `config.checkpoint_every`).
    `resume_from`: a checkpoint directory, or `"latest"` for the newest one in `output_dir`.
    `stop_after`: end after this many optimizer steps (the schedule still spans the whole run): an interruption.
    `data_parallel`: a `rankwise.train.distributed.DataParallel` (one per process). `batches(epoch)` then still
    returns the *global* batches (identical on every rank); each rank trains on its shard of rows, the
    trainable gradients are averaged over the ranks before clipping, and only rank 0 writes files or shows progress.
    `with_method_callbacks`: add the callbacks the model's methods bring (`method_callbacks`: SaRA, SNELLA);
    False trains on the loss alone (not the paper's method for those).
    """
    from rankwise.train import checkpoint as ckpt

    callbacks = list(callbacks)
    if with_method_callbacks:
        callbacks = _with_method_callbacks(model, callbacks)
    if config.checkpoint_every and output_dir is None:
        raise ConfigError("TrainConfig.checkpoint_every is set but train(output_dir=None): give an output_dir for the checkpoints")
    seed_everything(config.seed)
    steps_per_epoch = math.ceil(len(batches(0)) / config.grad_accum)
    if steps_per_epoch == 0:
        raise ConfigError("no training batches: the training data is empty")
    total = config.max_steps or steps_per_epoch * config.epochs
    epochs = math.ceil(total / steps_per_epoch) if config.max_steps else config.epochs
    optimizer, scheduler = build_optimizer(model, config, param_groups, total)
    state = TrainState(model, optimizer, scheduler, total_steps=total, config=config, data_parallel=data_parallel)
    if resume_from is not None:
        ckpt.load_checkpoint(ckpt.resolve(resume_from, output_dir), state, callbacks)
    dp = data_parallel
    is_main = dp is None or dp.is_main
    if dp is not None:
        dp.broadcast_parameters([p for g in optimizer.param_groups for p in g["params"]])
    metrics = ckpt.MetricsLog(output_dir if is_main else None, state.history if resume_from is not None else None)
    columns = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    with denormals_flushed(config.flush_denormals), Progress(*columns, disable=not (progress and is_main), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=state.step, loss=state.loss)
        for epoch in range(state.epoch, epochs):
            state.epoch = epoch
            model.train()
            epoch_batches = batches(epoch)
            running = 0.0
            for i in range(state.batch_index, len(epoch_batches)):
                if stop_after is not None and state.step >= stop_after:
                    return state
                if state.step >= total:  # --max-steps reached mid-epoch
                    break
                if i % config.grad_accum == 0:
                    _call(callbacks, "on_step_start", state)
                if dp is None:
                    loss = loss_fn(model, epoch_batches[i]) / config.grad_accum
                else:  # this rank's rows; the weight makes the ranks' average the global batch's gradient
                    local, weight = dp.shard(epoch_batches[i])
                    loss = loss_fn(model, local) * weight / config.grad_accum
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"the training loss became {value} at optimizer step {state.step + 1} "
                                        f"(epoch {epoch}, batch {i}): training stopped and nothing was saved; lower "
                                        "the learning rate, keep gradient clipping on, or use float32")
                loss.backward()
                running += value
                state.batch_index = i + 1
                if (i + 1) % config.grad_accum != 0 and i + 1 != len(epoch_batches):
                    continue
                if dp is not None:  # once per optimizer step, before clipping: the clip sees the global gradient
                    running = dp.sync_gradients([p for g in optimizer.param_groups for p in g["params"]], running)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], config.max_grad_norm)
                _call(callbacks, "after_backward", state)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.loss = running
                record = {"step": state.step, "epoch": epoch, "loss": running, "lr": scheduler.get_last_lr()[0]}
                state.history.append(record)
                metrics.write(record)
                running = 0.0
                _call(callbacks, "on_step_end", state)
                bar.update(task, advance=1, loss=state.loss)
                if state.batch_index == len(epoch_batches):  # a checkpoint at an epoch's end resumes in the next epoch
                    state.epoch, state.batch_index = epoch + 1, 0
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    if is_main:  # the ranks hold identical states: one copy
                        ckpt.save_checkpoint(Path(output_dir), state, callbacks, config.keep_checkpoints)
                    if dp is not None:
                        dp.barrier()
                state.epoch = epoch
                if evaluate and config.eval_every and state.step % config.eval_every == 0:
                    _run_eval(state, evaluate, callbacks, metrics)
            state.batch_index = 0
            if evaluate and not config.eval_every:
                _run_eval(state, evaluate, callbacks, metrics)
            if state.step >= total:
                break
        state.epoch = epochs
    return state


def _run_eval(state: TrainState, evaluate, callbacks, metrics) -> None:
    # Evaluation must not draw from the training RNG streams: a checkpoint saved just before it would
    # otherwise resume with different dropout masks (e.g. an evaluate() that leaves dropout on).
    python_state = random.getstate()
    state.model.eval()  # evaluation sees the model as inference does (no dropout); train() is restored below
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        metrics_now = evaluate(state.model)
    random.setstate(python_state)
    record = {"step": state.step, "epoch": state.epoch, **{f"eval_{k}": v for k, v in metrics_now.items()}}
    state.history.append(record)
    metrics.write(record)
    _call(callbacks, "on_eval", state, metrics_now)
    state.model.train()


def jsonable(value: Any) -> Any:
    """JSON form of optimizer/scheduler scalars (tuples become lists, tensors are not allowed here)."""
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    raise CheckpointError(f"cannot store {type(value).__name__} value {value!r} as JSON in a checkpoint")


def dumps(data: Any) -> str:
    return json.dumps(jsonable(data), indent=1)
