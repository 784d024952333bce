"""Fine-tune a pretrained model with any registered adapter method: what `rankwise finetune` runs.

One recipe, `finetune(task, spec, ...)`, for every task (`rankwise.train.tasks`: sequence classification,
causal-LM instruction tuning); the task brings its data, loss and evaluation, the rest is shared.

`rankwise finetune --nproc N` runs the same function in N processes (`finetune_worker`), data-parallel
through `rankwise.train.distributed`: every rank tokenizes the same data, trains on its rows of each batch,
evaluates its share of the test batches; rank 0 alone writes the adapter, metrics and plot.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.data.text import TextClassificationData
from rankwise.train.loop import TrainConfig, train
from rankwise.train.procedures import build_procedure, dense_trainable, finish_procedure, get_procedure, save_dense_low_rank
from rankwise.train.tasks.classification import HEAD_NAMES, ClassificationTask, encode_texts as _encode  # noqa: F401
from rankwise.train.tasks.classification import evaluate_accuracy as evaluate  # noqa: F401  (arena uses these)
from rankwise.train.tasks.classification import make_batches as _batches  # noqa: F401
from rankwise.train.tasks import to_device  # noqa: F401

RUN_FILES = ("adapter", "metrics.json", "low_rank")  # what a finished run leaves; present = refuse to overwrite


@dataclass
class FinetuneSpec:
    method: str = "lora"
    rank: int | None = 8
    # None: the task's default (classification: BERT's query,key,value,dense; causal-lm: q,k,v,o,gate,up,down)
    targets: list[str] | str | None = field(default_factory=lambda: ["query", "key", "value", "dense"])
    method_options: dict[str, Any] = field(default_factory=dict)
    max_length: int = 64
    batch_size: int = 32
    train: TrainConfig = field(default_factory=TrainConfig)
    procedure: str | None = None  # a training procedure (rankwise.train.procedures), e.g. "increlora"
    procedure_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"          # "auto" | "cpu" | "cuda" (a data-parallel run uses its rank's device)
    dtype: str = "float32"       # base weights; "bfloat16" keeps adapters in float32 (as PEFT's autocast)
    quantize: str | None = None  # None | "int8" | "int4": weight-only quantized frozen base (rankwise.quant)
    gradient_checkpointing: bool = False
    packing: bool = False        # causal-lm: pack whole examples into rows of max_length
    resume: str | None = None    # a checkpoint directory, or "latest" (in the output directory)
    report_to: str = "none"      # "none" | "tensorboard"


def build_config(spec: FinetuneSpec, head: list[str], targets=None):
    info = rankwise.get_method(spec.method)
    kwargs = dict(spec.method_options)
    if spec.rank is not None:
        if info.config_cls.rank_field is None:
            raise ConfigError(f"method {info.name!r} has no rank; drop --rank")
        kwargs[info.config_cls.rank_field] = spec.rank
    if head:
        kwargs["modules_to_save"] = head
    return info.config_cls(target_modules=spec.targets if targets is None else targets, **kwargs)


def check_output_dir(output_dir: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse an output directory that would lose a finished run, or that cannot be written, before any work."""
    output_dir = Path(output_dir)
    for parent in [output_dir, *output_dir.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"output directory {str(output_dir)!r}: {str(parent)!r} is a file, not a directory; "
                              "pass another --output")
    present = [name for name in RUN_FILES if (output_dir / name).exists()]
    if present and not (overwrite or resume):
        raise ConfigError(f"output directory {str(output_dir)!r} already holds a run ({', '.join(present)}); pass "
                          "--overwrite to replace it, --resume to continue it, or another --output")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".rankwise-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output directory {str(output_dir)!r} is not writable ({err.strerror}); pass another --output") from None
    return output_dir


def finetune_classifier(
    data: TextClassificationData,
    spec: FinetuneSpec,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    progress: bool = True,
    data_parallel=None,
    overwrite: bool = True,
) -> dict[str, Any]:
    """Adapt, train, evaluate before/after, and save adapter + metrics.json + curve.png under `output_dir`.

    `data_parallel`: this process's `rankwise.train.distributed.DataParallel` in a multi-process run
    (`spec.batch_size` is then the global batch, split over the ranks); only rank 0 writes files.
    """
    return finetune(ClassificationTask(data), spec, output_dir, model_path, progress, data_parallel, overwrite)


def finetune(
    task,
    spec: FinetuneSpec,
    output_dir: str | Path,
    model_path: str | Path | None = None,
    progress: bool = True,
    data_parallel=None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The one fine-tuning recipe, for any task (`rankwise.train.tasks`): load the base, adapt it with
    `spec.method`, evaluate, train with the shared loop (procedures as callbacks), evaluate again, and save
    adapter/ + metrics.json + metrics.jsonl + curve.png under `output_dir` (rank 0 only in a data-parallel run).
    """
    from rankwise.data.models import check_load_args, load_base, resolve_device

    output_dir = Path(output_dir)
    dp = data_parallel
    is_main = dp is None or dp.is_main
    progress = progress and is_main
    rankwise.get_method(spec.method)  # unknown names fail before anything loads
    if spec.procedure is not None:
        get_procedure(spec.procedure)
    check_load_args(task.name, spec.dtype, spec.device, spec.quantize)
    if spec.report_to not in ("none", "tensorboard"):
        raise ConfigError(f"report_to={spec.report_to!r} is invalid: expected 'none' or 'tensorboard'")
    if is_main:
        check_output_dir(output_dir, overwrite, resume=spec.resume is not None)
    torch.manual_seed(spec.train.seed)
    device = dp.device if dp is not None else resolve_device(spec.device)
    base, tokenizer = load_base(model_path, task=task.name, num_labels=task.num_labels(), dtype=spec.dtype,
                                device="cpu", quantize=spec.quantize)
    targets = spec.targets if spec.targets is not None else task.default_targets(base)
    head = task.head_modules(base)
    if spec.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"--gradient-checkpointing: {type(base).__name__} does not support gradient checkpointing")
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    dense = spec.procedure is not None and get_procedure(spec.procedure).name == "trp"
    model = dense_trainable(base, targets, head) if dense else rankwise.adapt(base, build_config(spec, head, targets))
    model.to(device)
    task.prepare(tokenizer, spec)
    loss_fn = lambda m, batch: task.loss(m, to_device(batch, device))  # noqa: E731
    callbacks, procedure_cb = [], None
    if not dense:  # a method may need its own training parts (e.g. B4M's partner losses and stage-2 start)
        for adapter_config in model.configs.values():
            prepare = getattr(adapter_config, "prepare_finetune", None)
            if prepare is not None:
                callbacks.extend(prepare(model, task, tokenizer, spec, loss_fn, data_parallel=dp))
    if spec.procedure is not None:
        val_batches = task.split_validation() if "val_batches" in get_procedure(spec.procedure).needs else None
        procedure_cb = build_procedure(spec.procedure, model, val_batches=val_batches, loss_fn=loss_fn, **spec.procedure_options)
        callbacks.append(procedure_cb)
    if spec.report_to == "tensorboard" and is_main:
        from rankwise.train.reporting import TensorBoardCallback

        callbacks.append(TensorBoardCallback(output_dir / "tensorboard"))

    if dp is not None and spec.batch_size < dp.world_size:
        raise ConfigError(f"batch_size={spec.batch_size} is smaller than the {dp.world_size} processes: "
                          f"the batch size is global (split over the processes); use --batch-size >= {dp.world_size}")
    with _status(progress, "evaluating the untuned model"):
        before = task.evaluate(model, dp, full=True)
    started = time.perf_counter()
    try:
        state = train(
            model,
            batches=task.train_batches,
            loss_fn=loss_fn,
            config=spec.train,
            evaluate=lambda m: {k: v for k, v in task.evaluate(m, dp, full=False).items() if isinstance(v, (int, float))},
            callbacks=callbacks,
            param_groups=None if dense else model.parameter_groups(spec.train.lr, spec.train.weight_decay),
            progress=progress,
            data_parallel=dp,
            output_dir=output_dir if is_main else None,
            resume_from=spec.resume,
        )
    finally:
        for cb in callbacks:
            if hasattr(cb, "close"):
                cb.close()
    train_seconds = time.perf_counter() - started
    procedure_summary = finish_procedure(procedure_cb, output_dir if is_main else None, _console(progress)) if procedure_cb else None
    if dense:
        procedure_summary["low_rank"] = save_dense_low_rank(model, procedure_cb, output_dir / "low_rank" if is_main else None)
    evals = [h for h in state.history if "eval_loss" in h]
    if task.eval_in_loop_is_full and procedure_cb is None and evals and evals[-1]["step"] == state.step:
        after = {k[len("eval_"):]: v for k, v in evals[-1].items() if k.startswith("eval_")}
    else:  # a procedure may change the model when it finishes (e.g. TRP's final low-rank substitution)
        with _status(progress, "evaluating the fine-tuned model"):
            after = task.evaluate(model, dp, full=True)
    if not is_main:
        return {"before": before, "after": after, "history": state.history}
    if not dense:
        model.save_adapter(output_dir / "adapter")
    metrics = {
        "task": task.name,
        "method": spec.method,
        "data": task.summary(),
        "before": before,
        "after": after,
        **task.extra_metrics(),
        "trainable": trainable_summary(model),
        "procedure": procedure_summary,
        "train_seconds": train_seconds,
        "optimizer_steps": state.step,
        "device": str(device),
        "processes": 1 if dp is None else dp.world_size,
        "spec": {**asdict(spec), "train": asdict(spec.train)},
        "history": state.history,
    }
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    plot_curves(state.history, output_dir / "curve.png", title=f"{spec.method} on {task.summary().split(':')[0]}")
    return metrics


def finetune_worker(data, spec: FinetuneSpec, output_dir: str | Path, model_path=None) -> None:
    """One rank of `rankwise finetune --nproc N` (the process group is already joined).

    `data`: `TextClassificationData` (classification) or a task object."""
    import torch.distributed as dist

    from rankwise.train.distributed import DataParallel

    task = ClassificationTask(data) if isinstance(data, TextClassificationData) else data
    finetune(task, spec, output_dir, model_path, data_parallel=DataParallel(dist.get_rank(), dist.get_world_size()),
             overwrite=True)


def trainable_summary(model) -> dict[str, int | float]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def _status(progress: bool, message: str):
    """A spinner while an evaluation runs (generations can take a while on CPU)."""
    import contextlib

    return _console(True).status(message) if progress else contextlib.nullcontext()


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
    key = "eval_accuracy" if any("eval_accuracy" in h for h in history) else "eval_loss"
    evals = [h for h in history if key in h]
    if evals:
        ax2 = ax.twinx()
        label = "test accuracy" if key == "eval_accuracy" else "held-out loss"
        ax2.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", color="tab:red", label=label)
        ax2.set_ylabel(label)
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
