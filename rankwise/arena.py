"""The method arena: every registered adapter (and PEFT's version where PEFT has the method) on one task.

Equal budget: the same training batches and number of steps for everyone; each contender gets its best
learning rate from a small grid (chosen on a validation split, reported on a separate test split).
Recorded per contender, in one run on one machine:

    accuracy           test accuracy at the learning rate that was best on validation
    trainable          trainable parameters (adapter + the classifier head every contender trains)
    file_kb            adapter directory size (adapter_config.json + adapter_model.safetensors)
    step_x_floor       train-step time / the frozen floor's (forward + input-gradient backward, no update),
                       both timed round-robin in the same loop so machine load hits them alike
    train_memory_mb    tensors saved for backward (deduplicated, base weights excluded) + trainable state
                       (parameter, gradient, two AdamW moments): the memory training adds above the frozen model
    merge_ms           time to fold the adapter into the base weights
    latency_ms         eval forward on one test batch, unmerged and merged

Each contender's result is written atomically to `<output>/results/<contender>.json`; a rerun skips
contenders that finished (failures are retried), so an interrupted arena resumes. A contender that
raises records its error in the table instead of stopping the arena.

    rankwise bench arena --output bench/results/arena           # MiniLM + tweets
    rankwise bench arena --quick --output /tmp/arena             # CI: tiny model from a config, a few steps
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from rankwise.core.io import atomic_write, atomic_write_text

COLUMNS = ("accuracy", "trainable", "file_kb", "step_x_floor", "train_memory_mb", "merge_ms", "latency_unmerged_ms", "latency_merged_ms")
LABELS = dict(zip(COLUMNS, ("acc", "trainable", "file KB", "step/floor", "mem MB", "merge ms", "latency ms", "merged ms")))


@dataclass
class ArenaSpec:
    steps: int = 150                    # optimizer steps per run (equal for every contender)
    batch_size: int = 16
    rank: int = 8                       # each method's rank field; other hyper-parameters keep the config's defaults
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    lrs: tuple[float, ...] = (5e-4, 2e-3, 8e-3)
    max_length: int = 64
    eval_size: int = 400                # validation and test examples (each)
    methods: Optional[list[str]] = None  # default: every registered method
    peft: bool = True                   # also run PEFT's implementation where PEFT has the method
    timing_rounds: int = 8
    seed: int = 0
    quick: bool = False                 # tiny BERT built from a config (byte tokens), for CI
    model_path: Optional[str] = None
    data_path: Optional[str] = None


QUICK = dict(steps=3, batch_size=8, lrs=(1e-3, 1e-2), eval_size=24, timing_rounds=2, quick=True, max_length=32)


@dataclass
class Task:
    base: nn.Module                     # pristine classifier every contender copies (same head init for all)
    head: list[str]
    train: list[dict]
    val: list[dict]
    test: list[dict]
    description: str


def contenders(spec: ArenaSpec) -> list[str]:
    """Contender names: each method's registry name, and `peft-<name>` where PEFT has the method."""
    import rankwise

    infos = rankwise.list_methods() if spec.methods is None else [rankwise.get_method(m) for m in spec.methods]
    names = []
    for info in infos:
        names.append(info.name)
        if spec.peft and _peft_type(info) is not None:
            names.append(f"peft-{info.name}")
    return names


# PEFT renamed or absorbed some methods: Bone lives on in PEFT as MiSS (same tensors and maths; PEFT deleted
# `BoneConfig` in #3051), so PEFT's twin of rankwise's Bone is PEFT's MissConfig with the same options.
PEFT_SUCCESSORS = {"BONE": "MISS"}


def _peft_type(info) -> Optional[str]:
    """PEFT's PeftType for a registered method, or None when the installed PEFT lacks it (or is absent)."""
    if not info.peft_type:
        return None
    try:
        from peft import PeftType
    except ImportError:
        return None
    known = {t.value for t in PeftType}
    for candidate in (info.peft_type, PEFT_SUCCESSORS.get(info.peft_type)):
        if candidate in known:
            return candidate
    return None


def peft_config(config, peft_type: str):
    """PEFT's config object equal to a rankwise config: same fields, PEFT's class for `peft_type`.

    Fields PEFT's class lacks are dropped only when they hold their "off" value (None / the neutral value);
    anything else would silently change the method, so it is an error.
    """
    import inspect

    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    from rankwise.core.errors import ConfigError

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    accepted = set(inspect.signature(cls).parameters)
    data = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", "task_type")}
    lost = {k: v for k, v in data.items() if k not in accepted and v is not None}
    if lost:
        raise ConfigError(f"PEFT's {cls.__name__} has no field(s) {sorted(lost)} (values {lost}); "
                          "the PEFT twin would not be the same method. Leave them unset for the arena.")
    return cls(**{k: v for k, v in data.items() if k in accepted})


# ---- the task -------------------------------------------------------------------------------------

def _byte_ids(texts: list[str], max_length: int) -> list[list[int]]:
    return [[b + 1 for b in text.encode("utf-8")[:max_length]] or [1] for text in texts]  # 0 is padding


def tiny_classifier(num_labels: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def build_task(spec: ArenaSpec) -> Task:
    from rankwise.data.models import load_classifier
    from rankwise.data.text import load_text_classification
    from rankwise.train.finetune import HEAD_NAMES, _batches, _encode

    data = load_text_classification(spec.data_path, spec.steps * spec.batch_size, 2 * spec.eval_size, spec.seed)
    torch.manual_seed(spec.seed)
    if spec.quick and spec.model_path is None:
        base, pad_id = tiny_classifier(len(data.label_names)), 0
        encode = lambda texts: _byte_ids(texts, spec.max_length)  # noqa: E731
        model_name = "tiny BERT (config, byte tokens)"
    else:
        base, tokenizer = load_classifier(spec.model_path, len(data.label_names))
        pad_id = tokenizer.pad_token_id or 0
        encode = lambda texts: _encode(tokenizer, texts, spec.max_length)  # noqa: E731
        model_name = Path(spec.model_path).name if spec.model_path else "all-MiniLM-L6-v2 (embedded)"
    half = len(data.test_texts) // 2
    test_ids = encode(data.test_texts)
    return Task(
        base=base.eval(),
        head=[name for name, _ in base.named_children() if name in HEAD_NAMES],
        train=_batches(encode(data.train_texts), data.train_labels, spec.batch_size, pad_id, seed=spec.seed),
        val=_batches(test_ids[:half], data.test_labels[:half], 64, pad_id),
        test=_batches(test_ids[half:], data.test_labels[half:], 64, pad_id),
        description=f"{model_name} on {data.source}: {len(data.train_texts)} train, {half} val, {len(test_ids) - half} test",
    )


# ---- one contender ---------------------------------------------------------------------------------

def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def method_setup(info, base: nn.Module, spec: ArenaSpec) -> tuple[list[str], dict[str, Any]]:
    """(target_modules, config options) of a method in the arena.

    Every method gets `spec.rank` in its rank field and `spec.targets`, except where that setting is not the
    method (each exception follows the method's spec and is recorded in the result's `config`):
      dept  - adapts the input embedding, not linear layers; the position table covers `max_length` rows and the
              prompt keeps the reference's prompt/length ratio (40 of 256 -> max_length / 6.4); A, B train at
              0.1 x lr (the reference's 0.01 with its 3e-1 prompt rate would leave them frozen at our rates).
      mos   - the shared pool must hold r - private_rank vectors per layer: equivalent_rank is the default (4,
              half LoRA's budget) or, on shallow models, the smallest value that lets every layer draw them.
      bone  - run as Bone's weight-guided "Bat" variant; Bone's default is MiSS's shard sharing, run as `miss`.
      randlora - its default randlora_alpha (20 x rank, PEFT's ratio) keeps the scale at 20; its adapter
              parameters train at a tenth of the grid (ADAPTER_LR_SCALE).
    """
    from rankwise.core.config import matches_module

    targets = list(spec.targets)
    options: dict[str, Any] = {}
    if info.config_cls.rank_field:
        options[info.config_cls.rank_field] = spec.rank
    if info.name == "dept":
        targets = [_module_name(base, base.get_input_embeddings()).rsplit(".", 1)[-1]]
        options.update(max_length=spec.max_length, num_virtual_tokens=max(1, round(spec.max_length * 40 / 256)),
                       embedding_lr_scale=0.1)
    elif info.name == "mos":
        from rankwise.adapters.mos import pool_key

        defaults = info.config_cls()
        groups: dict[str, int] = {}
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear) and matches_module(name, targets):
                key = pool_key(name, module)
                groups[key] = groups.get(key, 0) + 1
        depth = min(groups.values(), default=1)
        r, p = spec.rank, min(defaults.private_rank, spec.rank)
        needed = p + -(-(r - p) // depth)  # r - p <= (R_eq - p) * depth
        options.update(private_rank=p, equivalent_rank=max(min(defaults.equivalent_rank, r), needed))
        if options["equivalent_rank"] == p and r != p:  # pure private needs r == R_eq
            options["equivalent_rank"] += 1
    elif info.name == "bone":
        options.update(init_weights="bat")
    return targets, options


def build_contender(name: str, task: Task, spec: ArenaSpec):
    """(model, info, config) for contender `name` on a fresh copy of the base."""
    import rankwise

    is_peft = name.startswith("peft-")
    info = rankwise.get_method(name[len("peft-"):] if is_peft else name)
    targets, options = method_setup(info, task.base, spec)
    config = info.config_cls(target_modules=targets, modules_to_save=task.head, **options)
    base = copy.deepcopy(task.base)
    if is_peft:
        import peft

        peft_type = _peft_type(info)
        if peft_type is None:
            from rankwise.core.errors import ConfigError

            raise ConfigError(f"the installed PEFT has no {info.peft_type} (nor a successor): drop {name!r} or use --no-peft")
        return peft.get_peft_model(base, peft_config(config, peft_type)), info, config
    return rankwise.adapt(base, config), info, config


# The adapter's own parameters train at (grid lr x this); the classifier head always trains at the grid lr.
# RandLoRA: its update sums r*N ~ min(out, in) basis products, each scalar moved ~lr per Adam step, at
# scale randlora_alpha / r = 20, so at LoRA's rates it overshoots: with alpha = 20 r on MiniLM, |dW| / |W|
# after 8 steps is 5-11 % at lr 1e-3 (LoRA r=8: 1-2.5 % at its best 4e-3, divergence at 7-17 %), and both
# rankwise and PEFT RandLoRA stayed at chance over the whole 1e-3..1.6e-2 grid. Its official scripts train
# at 1e-4 and PEFT's docs warn of instability at high rates: a tenth of the grid.
ADAPTER_LR_SCALE = {"randlora": 0.1}


def _param_groups(model, lr: float, head: list[str], adapter_scale: float = 1.0):
    if adapter_scale == 1.0:
        if hasattr(model, "parameter_groups"):
            return model.parameter_groups(lr)
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    in_head = {id(p) for n, p in model.named_parameters() if p.requires_grad and set(n.split(".")) & set(head)}
    heads = [p for p in model.parameters() if id(p) in in_head]
    if hasattr(model, "parameter_groups"):
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in in_head]} for g in model.parameter_groups(lr * adapter_scale)]
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in in_head], "lr": lr * adapter_scale}]
    return [g for g in groups if g["params"]] + [{"params": heads, "lr": lr}]


def train_and_select(name: str, task: Task, spec: ArenaSpec, on_step: Callable[[], None]) -> tuple[Any, dict]:
    """Train once per learning rate; keep the model best on validation. Returns (model, record)."""
    from rankwise.train.finetune import evaluate
    from rankwise.train.loop import TrainConfig, train

    class _Tick:
        def on_step_end(self, state):
            on_step()

    best, record, per_lr = None, {}, []
    scale = ADAPTER_LR_SCALE.get(name[len("peft-"):] if name.startswith("peft-") else name, 1.0)
    for lr in spec.lrs:
        model, _, _ = build_contender(name, task, spec)
        started = time.perf_counter()
        state = train(model, batches=lambda epoch: task.train, loss_fn=lambda m, b: m(**b).loss,
                      config=TrainConfig(epochs=1, lr=lr, seed=spec.seed), param_groups=_param_groups(model, lr, task.head, scale),
                      callbacks=[_Tick()], progress=False)
        val = evaluate(model, task.val)
        per_lr.append({"lr": lr, "adapter_lr": lr * scale, "val_accuracy": val["accuracy"], "val_loss": val["loss"], "final_train_loss": state.loss,
                       "train_seconds": time.perf_counter() - started})
        if best is None or (val["accuracy"], -val["loss"]) > (record["val_accuracy"], -record["val_loss"]):
            best, record = model, {"lr": lr, "val_accuracy": val["accuracy"], "val_loss": val["loss"]}
        else:
            del model
    test = evaluate(best, task.test)
    return best, {**record, "accuracy": test["accuracy"], "test_loss": test["loss"], "lr_grid": per_lr}


def saved_bytes(model, directory: Path) -> int:
    model.save_pretrained(directory)  # rankwise and PEFT both spell it so
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
    record: dict[str, Any] = {"contender": name, "implementation": "peft" if name.startswith("peft-") else "rankwise"}
    started = time.perf_counter()
    try:
        model, info, config = build_contender(name, task, spec)
        record.update(method=info.name, family=info.family, paper=info.paper, config=config.to_dict())
        if record["implementation"] == "peft":
            record["peft_type"] = _peft_type(info)
        del model
        best, selected = train_and_select(name, task, spec, on_step)
        record.update(selected)
        record.update(measure_costs(best, task, spec, output / "adapters" / name))
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the arena
        record["error"] = f"{type(err).__name__}: {err}"
        record["traceback"] = traceback.format_exc(limit=6)
    record["seconds"] = time.perf_counter() - started
    return record


# ---- the whole arena --------------------------------------------------------------------------------

def result_path(output: Path, name: str) -> Path:
    return output / "results" / f"{name}.json"


def run_arena(spec: ArenaSpec, output: str | Path, fresh: bool = False, progress: bool = True,
              console=None) -> list[dict[str, Any]]:
    """Run (or resume) the arena; write results/*.json, arena.json and the plots into `output`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from rankwise.core.errors import ConfigError

    console = console or Console()
    output = Path(output)
    if spec.steps < 1 or spec.batch_size < 1 or not spec.lrs or any(lr <= 0 for lr in spec.lrs):
        raise ConfigError(f"arena needs steps >= 1, batch_size >= 1 and positive learning rates; got {spec}")
    names = contenders(spec)
    done = {}
    for name in names:
        path = result_path(output, name)
        if path.is_file() and not fresh:
            previous = json.loads(path.read_text())
            if "error" not in previous and previous.get("spec") == _spec_key(spec):
                done[name] = previous
    todo = [n for n in names if n not in done]
    if done:
        console.print(f"resuming: {len(done)} finished contender(s) kept ({', '.join(done)}); running {len(todo)}")
    task = build_task(spec) if todo else None
    if task is not None:
        console.print(f"[bold]arena[/bold]: {task.description}; {spec.steps} steps x batch {spec.batch_size}, lr grid {list(spec.lrs)}")
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress) as bar:
        overall = bar.add_task("contenders", total=len(names), completed=len(done))
        for name in todo:
            steps = bar.add_task(f"  {name}", total=spec.steps * len(spec.lrs))
            record = run_contender(name, task, spec, output, on_step=lambda s=steps: bar.advance(s))
            record["spec"] = _spec_key(spec)
            atomic_write_text(result_path(output, name), json.dumps(record, indent=2, default=str))
            done[name] = record
            bar.remove_task(steps)
            bar.advance(overall)
            if "error" in record:
                console.print(f"[red]{name} failed:[/red] {record['error']}")
    results = [done[n] for n in names]
    write_summary(results, spec, output, task.description if task else None)
    console.print(results_table(results, title=f"arena ({'quick' if spec.quick else 'full'}): {output}"))
    return results


def _spec_key(spec: ArenaSpec) -> dict[str, Any]:
    """What a stored result must match to be reused (not the contender list: adding a method resumes)."""
    key = asdict(spec)
    key.pop("methods")
    key.pop("peft")
    key["lrs"] = list(spec.lrs)
    return key


def write_summary(results: list[dict[str, Any]], spec: ArenaSpec, output: Path, description: str | None) -> None:
    from rankwise.core.io import atomic_write_text as write

    previous = output / "arena.json"
    if description is None and previous.is_file():  # every contender resumed: keep the task line of the run
        description = json.loads(previous.read_text()).get("task")
    payload = {"benchmark": "arena", "task": description, "spec": _spec_key(spec), "machine": machine(),
               "columns": list(COLUMNS), "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results]}
    write(output / "arena.json", json.dumps(payload, indent=2, default=str))
    budget = (f"{spec.steps} steps x batch {spec.batch_size} (max_length {spec.max_length}), rank {spec.rank}, "
              f"targets {spec.targets}, lr grid {list(spec.lrs)} (best on validation, reported on test), "
              f"{spec.timing_rounds} timing rounds, seed {spec.seed}")
    write(output / "arena.md", f"# Arena ({'quick' if spec.quick else 'full'})\n\nTask: {description or 'resumed run'}.  \n"
          f"Budget: {budget}.  \nMachine: {machine()}.\n\n{markdown_table(results)}\n")
    ok = [r for r in results if "error" not in r]
    plot_scatter(ok, "trainable", "trainable parameters (log)", output / "accuracy_vs_params.png", log_x=True)
    plot_scatter(ok, "step_x_floor", "train-step time / frozen floor", output / "accuracy_vs_step_time.png")


def machine() -> dict[str, Any]:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def plot_scatter(results: list[dict[str, Any]], x_key: str, x_label: str, path: Path, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, marker, color in (("rankwise", "o", "tab:blue"), ("peft", "s", "tab:orange")):
        rows = [r for r in results if r["implementation"] == impl]
        ax.scatter([r[x_key] for r in rows], [r["accuracy"] for r in rows], marker=marker, color=color, label=impl, s=45)
        for r in rows:
            ax.annotate(r["contender"], (r[x_key], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"arena: accuracy vs {x_label.split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _fmt(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if key == "trainable":
        return f"{value:,}"
    if key == "accuracy":
        return f"{value:.3f}"
    if key == "step_x_floor":
        return f"{value:.2f}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _lr_cell(r: dict[str, Any]) -> str:
    """The selected grid rate, and the adapter's own rate where it differs (ADAPTER_LR_SCALE)."""
    adapter = next((g.get("adapter_lr") for g in r.get("lr_grid", []) if g["lr"] == r["lr"]), None)
    return f"{r['lr']:g}" + (f" (adapter {adapter:g})" if adapter is not None and adapter != r["lr"] else "")


def results_table(results: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title)
    table.add_column("contender")
    for col in COLUMNS:
        table.add_column(LABELS[col], justify="right")
    table.add_column("lr", justify="right")
    table.add_column("error")
    for r in results:
        if "error" in r:
            table.add_row(r["contender"], *["-"] * (len(COLUMNS) + 1), f"[red]{r['error'][:80]}")
        else:
            table.add_row(r["contender"], *[_fmt(r.get(c), c) for c in COLUMNS], _lr_cell(r), r.get("merge_error", "")[:60])
    return table


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The arena table as Markdown (for the README and the docs)."""
    head = ["contender", *COLUMNS, "lr"]
    lines = ["| " + " | ".join(LABELS.get(h, h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["contender"], *(["error: " + r["error"][:60]] + [""] * len(COLUMNS) if "error" in r
                                   else [_fmt(r.get(c), c) for c in COLUMNS] + [_lr_cell(r)])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- command line -----------------------------------------------------------------------------------

def register(app) -> None:
    import typer

    bench = typer.Typer(help="Benchmarks: the method arena.", no_args_is_help=True)

    @bench.command("arena")
    def arena(
        output: Path = typer.Option(Path("bench/results/arena"), help="Output directory (results/, arena.json, PNGs)."),
        quick: bool = typer.Option(False, "--quick", help="CI mode: tiny model built from a config, a few steps."),
        steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps per run (same for every contender)."),
        batch_size: Optional[int] = typer.Option(None, min=1),
        rank: int = typer.Option(8, min=1, help="Each method's rank field; other fields keep their defaults."),
        lrs: Optional[str] = typer.Option(None, help="Comma-separated learning-rate grid, e.g. 5e-4,2e-3,8e-3."),
        methods: Optional[str] = typer.Option(None, help="Comma-separated subset of methods (default: all registered)."),
        peft: bool = typer.Option(True, "--peft/--no-peft", help="Also run PEFT's implementation where it exists."),
        model: Optional[Path] = typer.Option(None, help="Local transformers model dir (default: embedded MiniLM)."),
        data: Optional[Path] = typer.Option(None, help="CSV/JSONL with text,label (default: embedded tweets)."),
        fresh: bool = typer.Option(False, "--fresh", help="Ignore finished results and run everything again."),
        threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    ) -> None:
        """Run every adapter method (and PEFT's where it exists) on one task with an equal budget; table, JSON, PNGs."""
        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError

        if threads:
            torch.set_num_threads(threads)
        spec = ArenaSpec(**(QUICK if quick else {}))
        overrides = {"steps": steps, "batch_size": batch_size, "rank": rank, "peft": peft,
                     "model_path": str(model) if model else None, "data_path": str(data) if data else None,
                     "methods": methods.split(",") if methods else None,
                     "lrs": tuple(float(x) for x in lrs.split(",")) if lrs else None}
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        try:
            run_arena(spec, output, fresh=fresh)
        except RankwiseError as err:
            print_error(err)
            raise typer.Exit(2) from None

    app.add_typer(bench, name="bench")
