"""One contender: train it at each grid rate, keep the best on validation, then measure what it costs."""
from __future__ import annotations

import copy
import statistics
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from rankwise.arena.contenders import ArenaSpec, HeadOnly, Task, build_contender, implementation, peft_type

def _param_groups(model, lr: float):
    """Every method trains at the grid rate, its head included (rankwise models honour their own lr_scale groups).

    RandLoRA once ran at a tenth of the grid: at PEFT's alpha 640 with r=8 it sat at chance at every rate. With
    alpha = 20 x r (now the default) it trains at the grid's 1e-3 (validation 0.675, test 0.695 in a side run) and
    diverges at 4e-3 like the others do at their top rates, so the grid alone picks its rate.
    """
    if hasattr(model, "parameter_groups"):
        return model.parameter_groups(lr)
    return [{"params": [p for p in model.parameters() if p.requires_grad]}]


def train_and_select(name: str, task: Task, spec: ArenaSpec, on_step: Callable[[], None]) -> tuple[Any, dict]:
    """Train once per learning rate; keep the model best on validation. Returns (model, record)."""
    from rankwise.train.finetune import evaluate
    from rankwise.train.loop import TrainConfig, train

    class _Tick:
        def on_step_end(self, state):
            on_step()

    best, record, per_lr = None, {}, []
    for lr in spec.lrs:
        model, _, _ = build_contender(name, task, spec)
        started = time.perf_counter()
        state = train(model, batches=lambda epoch: task.train, loss_fn=lambda m, b: m(**b).loss,
                      config=TrainConfig(epochs=1, lr=lr, seed=spec.seed), param_groups=_param_groups(model, lr),
                      callbacks=[_Tick()], progress=False)
        val = evaluate(model, task.val)
        per_lr.append({"lr": lr, "val_accuracy": val["accuracy"], "val_loss": val["loss"], "final_train_loss": state.loss,
                       "train_seconds": time.perf_counter() - started})
        if best is None or (val["accuracy"], -val["loss"]) > (record["val_accuracy"], -record["val_loss"]):
            best, record = model, {"lr": lr, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
        else:
            del model
    test = evaluate(best, task.test)
    return best, {**record, "accuracy": test["accuracy"], "test_loss": test["loss"], "lr_grid": per_lr}


def saved_bytes(model, directory: Path) -> int:
    model.save_pretrained(directory)  # rankwise, PEFT and the head-only baseline all spell it so
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def training_memory_bytes(step: Callable[[], None], params: list[torch.nn.Parameter], weights: set[int]) -> int:
    """Bytes of tensors saved for backward during `step` (storage-deduplicated; parameters, whose storage
    ids are in `weights`, excluded) plus the trainable state: parameter, gradient and AdamW's two moments."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) + 4 * sum(p.numel() * p.element_size() for p in params)


def paired_medians(first: Callable[[], None], second: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of two callables timed alternately (one warm-up each), so load drifts hit both."""
    first(), second()
    a, b = [], []
    for _ in range(rounds):
        for fn, out in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _timed_ms(fn: Callable[[], None], repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def measure_costs(model, task: Task, spec: ArenaSpec, adapter_dir: Path) -> dict[str, Any]:
    """File size, latency unmerged/merged, merge time, train memory and step time vs the frozen floor."""
    batch = task.test[0]
    trainable = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, Any] = {"trainable": sum(p.numel() for p in trainable), "file_kb": saved_bytes(model, adapter_dir) / 1024}

    model.eval()
    with torch.no_grad():
        forward = lambda: model(**batch)  # noqa: E731
        forward()
        out["latency_unmerged_ms"] = _timed_ms(forward, spec.timing_rounds)
        if isinstance(model, HeadOnly):  # no adapter to fold in: the latency above is the frozen model's own
            out["merge_ms"] = out["latency_merged_ms"] = None
        else:
            try:
                started = time.perf_counter()
                model.merge_adapter()
                out["merge_ms"] = 1000 * (time.perf_counter() - started)
                out["latency_merged_ms"] = _timed_ms(forward, spec.timing_rounds)
                model.unmerge_adapter()
            except Exception as err:  # noqa: BLE001 - an unmergeable method says why in the table
                out["merge_ms"] = out["latency_merged_ms"] = None
                out["merge_error"] = f"{type(err).__name__}: {err}"

    floor = copy.deepcopy(task.base)
    weights = {p.untyped_storage().data_ptr() for m in (floor, model) for p in m.parameters()}
    for p in floor.parameters():
        p.requires_grad_(False)
    embed = floor.get_input_embeddings()
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)  # timing only: the evaluated adapter is already saved

    def floor_step():
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)  # backward through every layer, no update
        floor(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()

    def adapter_step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    floor.train()
    floor_s, step_s = paired_medians(floor_step, adapter_step, spec.timing_rounds)
    out.update(step_ms=1000 * step_s, floor_step_ms=1000 * floor_s, step_x_floor=step_s / floor_s,
               train_memory_mb=training_memory_bytes(adapter_step, trainable, weights) / 2**20,
               floor_memory_mb=training_memory_bytes(floor_step, [], weights) / 2**20)
    return out


def run_contender(name: str, task: Task, spec: ArenaSpec, output: Path, on_step: Callable[[], None]) -> dict[str, Any]:
    record: dict[str, Any] = {"contender": name, "implementation": implementation(name)}
    started = time.perf_counter()
    try:
        model, info, config = build_contender(name, task, spec)
        if info is None:
            record["trained_modules"] = list(task.head)
        else:
            record.update(method=info.name, family=info.family, paper=info.paper, config=config.to_dict())
        if record["implementation"] == "peft":
            record["peft_type"] = peft_type(info)
        del model
        best, selected = train_and_select(name, task, spec, on_step)
        record.update(selected)
        record.update(measure_costs(best, task, spec, output / "adapters" / name))
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the arena
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=6)
    record["seconds"] = time.perf_counter() - started
    return record
