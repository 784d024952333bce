"""The method arena: every registered adapter (and PEFT's version where PEFT has the method) on one task.

Equal budget: the same training batches and number of steps for everyone; each contender gets its best
learning rate from a small grid (chosen on a validation split, reported on a separate test split).
The first row, `head`, is the baseline: the same budget spent on the classifier head alone (a linear probe on
the frozen encoder), so each adapter row reads as what the adapter adds over the head it also trains.
Recorded per contender, in one run on one machine:

    accuracy           test accuracy at the learning rate that was best on validation
    trainable          trainable parameters (adapter + the classifier head every contender trains)
    file_kb            adapter directory size (adapter_config.json + adapter_model.safetensors; the baseline
                       has only the head tensors' safetensors file)
    step_x_floor       train-step time / the frozen floor's (forward + input-gradient backward, no update),
                       both timed round-robin in the same loop so machine load hits them alike
    train_memory_mb    tensors saved for backward (deduplicated, base weights excluded) + trainable state
                       (parameter, gradient, two AdamW moments): the memory training adds above the frozen model
    merge_ms           time to fold the adapter into the base weights (none for the baseline)
    latency_ms         eval forward on one test batch, unmerged and merged (the baseline's is the frozen model's)

Each contender's result is written atomically to `<output>/results/<contender>.json`; a rerun skips
contenders that finished (failures are retried), so an interrupted arena resumes. A contender that
raises records its error in the table instead of stopping the arena.

    rankwise bench arena --output bench/results/arena           # MiniLM + tweets
    rankwise bench arena --quick --output /tmp/arena             # CI: tiny model from a config, a few steps

Modules: `contenders` (spec, task, who competes, building each model), `measure` (training one contender and
measuring its costs), `report` (arena.json, arena.md, tables, plots); this one runs the arena and its command.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from rankwise.arena.contenders import (HEAD_ONLY, QUICK, ArenaSpec, HeadOnly, Task, build_contender, build_task,
                                       contenders, method_setup, peft_config, spec_key)
from rankwise.arena.measure import measure_costs, run_contender, train_and_select
from rankwise.arena.report import COLUMNS, LABELS, markdown_table, results_table, write_summary
from rankwise.core.io import atomic_write_text

__all__ = ["COLUMNS", "HEAD_ONLY", "LABELS", "QUICK", "ArenaSpec", "HeadOnly", "Task", "build_contender",
           "build_task", "contenders", "markdown_table", "measure_costs", "method_setup", "peft_config", "register",
           "result_path", "results_table", "run_arena", "run_contender", "train_and_select"]

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
            if "error" not in previous and previous.get("spec") == spec_key(spec):
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
            record["spec"] = spec_key(spec)
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


# ---- command line -----------------------------------------------------------------------------------

def register(app) -> None:
    import typer

    bench = typer.Typer(help="Benchmarks: the method arena.", no_args_is_help=True)

    @bench.command("arena")
    def arena(
        output: Path = typer.Option(Path("bench/results/arena"), "--output", "-o", "--out", help="Output directory (results/, arena.json, PNGs)."),
        quick: bool = typer.Option(False, "--quick", help="CI mode: tiny model built from a config, a few steps."),
        steps: Optional[int] = typer.Option(None, min=1, help="Optimizer steps per run (same for every contender)."),
        batch_size: Optional[int] = typer.Option(None, min=1),
        rank: int = typer.Option(8, min=1, help="Each method's rank field; other fields keep their defaults."),
        lrs: Optional[str] = typer.Option(None, help="Comma-separated learning-rate grid, e.g. 5e-4,2e-3,8e-3."),
        methods: Optional[str] = typer.Option(None, help="Comma-separated subset: method names and/or `head`, the "
                                               "head-only baseline (default: the baseline and every registered method)."),
        peft: bool = typer.Option(True, "--peft/--no-peft", help="Also run PEFT's implementation where it exists."),
        model: Optional[Path] = typer.Option(None, help="Local transformers model dir (default: embedded MiniLM)."),
        data: Optional[Path] = typer.Option(None, help="CSV/JSONL with text,label (default: embedded tweets)."),
        fresh: bool = typer.Option(False, "--fresh", help="Ignore finished results and run everything again."),
        threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda: where contenders run."),
    ) -> None:
        """Run the head-only baseline and every adapter method (and PEFT's where it exists) on one task with an equal
        budget; table, JSON, PNGs."""
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
            from rankwise.data.models import resolve_device

            spec = replace(spec, device=resolve_device(device).type)  # a clear error before anything runs
            run_arena(spec, output, fresh=fresh)
        except RankwiseError as err:
            print_error(err)
            raise typer.Exit(2) from None

    app.add_typer(bench, name="bench")
