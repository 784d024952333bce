"""The arena's outputs: arena.json, arena.md, the console table and the two accuracy plots."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from rankwise.arena.contenders import ArenaSpec, spec_key
from rankwise.core.io import atomic_write, atomic_write_text

COLUMNS = ("accuracy", "trainable", "file_kb", "step_x_floor", "train_memory_mb", "merge_ms", "latency_unmerged_ms", "latency_merged_ms")
LABELS = dict(zip(COLUMNS, ("acc", "trainable", "file KB", "step/floor", "mem MB", "merge ms", "latency ms", "merged ms")))

BASELINE_NOTE = ("`head (baseline)`: only the classifier head trains (a linear probe on the frozen encoder), same "
                 "batches, steps, schedule and lr grid. No adapter: nothing to merge, its latency is the frozen model's, "
                 "and its step and memory include no backward through the encoder.")


def write_summary(results: list[dict[str, Any]], spec: ArenaSpec, output: Path, description: str | None) -> None:
    previous = output / "arena.json"
    if description is None and previous.is_file():  # every contender resumed: keep the task line of the run
        description = json.loads(previous.read_text()).get("task")
    payload = {"benchmark": "arena", "task": description, "spec": spec_key(spec), "machine": machine(),
               "columns": list(COLUMNS), "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results]}
    atomic_write_text(output / "arena.json", json.dumps(payload, indent=2, default=str))
    budget = (f"{spec.steps} steps x batch {spec.batch_size} (max_length {spec.max_length}), rank {spec.rank}, "
              f"targets {spec.targets}, lr grid {list(spec.lrs)} (best on validation, reported on test), "
              f"{spec.timing_rounds} timing rounds, seed {spec.seed}")
    note = f"\n{BASELINE_NOTE}\n" if any(_is_baseline(r) for r in results) else ""
    atomic_write_text(output / "arena.md", f"# Arena ({'quick' if spec.quick else 'full'})\n\nTask: {description or 'resumed run'}.  \n"
                      f"Budget: {budget}.  \nMachine: {machine()}.\n\n{markdown_table(results)}\n{note}")
    ok = [r for r in results if "error" not in r]
    plot_scatter(ok, "trainable", "trainable parameters (log)", output / "accuracy_vs_params.png", log_x=True)
    plot_scatter(ok, "step_x_floor", "train-step time / frozen floor", output / "accuracy_vs_step_time.png")


def machine() -> dict[str, Any]:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def _is_baseline(r: dict[str, Any]) -> bool:
    return r.get("implementation") == "baseline"


def plot_scatter(results: list[dict[str, Any]], x_key: str, x_label: str, path: Path, log_x: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in filter(_is_baseline, results):  # drawn first, so the adapters' points sit on top of the line
        ax.axhline(r["accuracy"], color="gray", linestyle="--", linewidth=1, label=f"{r['contender']} only (baseline): {r['accuracy']:.3f}")
        ax.scatter([r[x_key]], [r["accuracy"]], marker="X", color="black", s=50)
        ax.annotate(r["contender"], (r[x_key], r["accuracy"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
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
    if isinstance(value, float):  # the baseline's memory is a fraction of a MB: one decimal would print 0.0
        return f"{value:.1f}" if value == 0 or abs(value) >= 1 else f"{value:.2g}"
    return str(value)


def _lr_cell(r: dict[str, Any]) -> str:
    return f"{r['lr']:g}"


def _name_cell(r: dict[str, Any]) -> str:
    return r["contender"] + (" (baseline)" if _is_baseline(r) else "")


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
            table.add_row(_name_cell(r), *["-"] * (len(COLUMNS) + 1), f"[red]{r['error'][:80]}")
        else:
            table.add_row(_name_cell(r), *[_fmt(r.get(c), c) for c in COLUMNS], _lr_cell(r), r.get("merge_error", "")[:60])
    return table


def markdown_table(results: list[dict[str, Any]]) -> str:
    """The arena table as Markdown (for the README and the docs)."""
    head = ["contender", *COLUMNS, "lr"]
    lines = ["| " + " | ".join(LABELS.get(h, h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [_name_cell(r), *(["error: " + r["error"][:60]] + [""] * len(COLUMNS) if "error" in r
                                  else [_fmt(r.get(c), c) for c in COLUMNS] + [_lr_cell(r)])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
