"""CLI commands of the core: `rankwise methods`, `rankwise finetune`, `rankwise demo`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def _parse_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _report(metrics: dict, output: Path) -> None:
    table = Table(title=f"{metrics['method']} on {metrics['data']}")
    for col in ("", "accuracy", "loss"):
        table.add_column(col, justify="right" if col else "left")
    table.add_row("untuned (before)", f"{metrics['before']['accuracy']:.3f}", f"{metrics['before']['loss']:.3f}")
    table.add_row("fine-tuned (after)", f"{metrics['after']['accuracy']:.3f}", f"{metrics['after']['loss']:.3f}")
    table.add_row("majority class", f"{metrics['majority_baseline']:.3f}", "")
    console.print(table)
    t = metrics["trainable"]
    console.print(
        f"trainable {t['trainable']:,} of {t['total']:,} parameters ({t['percent']:.2f}%), "
        f"trained in {metrics['train_seconds']:.0f}s. Saved adapter, metrics.json and curve.png in {output}/"
    )


def register(app: typer.Typer) -> None:
    @app.command("methods")
    def methods(
        family: Optional[str] = typer.Option(None, "--family", help="Only this family: adapter, procedure, optimizer, "
                                             "pretraining, compressor, federated, solver, analysis, layer."),
        as_json: bool = typer.Option(False, "--json", help="Print the catalog as JSON (a list of objects) for scripts."),
    ) -> None:
        """List every method rankwise implements: family, paper (arXiv) and the command or API that runs it."""
        from rankwise.core.catalog import catalog, resolve_family
        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError

        try:
            wanted = resolve_family(family) if family is not None else None
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None
        entries = [e for e in catalog() if wanted is None or e.family == wanted]
        if as_json:
            typer.echo(json.dumps([e.to_dict() for e in entries], indent=2))
            return
        table = Table(title=f"rankwise methods{f' ({wanted})' if wanted else ''}: {len(entries)}")
        for col in ("family", "method", "paper (arXiv)", "runs with", "what"):
            table.add_column(col, overflow="fold")
        for e in entries:
            table.add_row(e.family, e.name, e.paper or "-", e.runs, e.summary)
        console.print(table)

    @app.command("finetune")
    def finetune(
        method: str = typer.Option("lora", help="Registered method name (see `rankwise methods`)."),
        rank: Optional[int] = typer.Option(None, min=1, help="Rank (the method's rank field); default: the method's own default."),
        targets: str = typer.Option("query,key,value,dense", help="Comma-separated module names, a regex, or 'all-linear'."),
        option: list[str] = typer.Option([], "--option", "-o", help="Extra method field as key=value (JSON values), repeatable."),
        epochs: int = typer.Option(2, min=1),
        lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW, linear decay)."),
        batch_size: int = typer.Option(32, min=1),
        max_length: int = typer.Option(64, min=8, help="Tokens per text."),
        train_size: int = typer.Option(3000, min=1),
        test_size: int = typer.Option(1000, min=1),
        data: Optional[Path] = typer.Option(None, help="CSV/JSONL with text,label columns (default: embedded tweets)."),
        text_field: str = typer.Option("text"),
        label_field: str = typer.Option("label"),
        model: Optional[Path] = typer.Option(None, help="Local transformers model dir (default: embedded all-MiniLM-L6-v2)."),
        output: Path = typer.Option(Path("runs/finetune"), help="Output directory."),
        seed: int = typer.Option(0),
        threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
        procedure: Optional[str] = typer.Option(None, help="Training procedure: allora, ggpo, increlora, triadapt, diffora, maestro, trp."),
        procedure_option: list[str] = typer.Option([], "--procedure-option", "-p", help="Procedure argument as key=value (JSON values), repeatable."),
        nproc: int = typer.Option(1, help="Data-parallel processes on this machine (torch.distributed: gloo on CPU, NCCL on GPU); "
                                          "--batch-size is the global batch. Several machines: see docs/distributed.md."),
    ) -> None:
        """Fine-tune a text classifier with an adapter; evaluate before and after; save adapter, metrics, plot."""
        import torch

        from rankwise.core.console import print_error
        from rankwise.core.errors import ConfigError, RankwiseError
        from rankwise.data.text import load_text_classification
        from rankwise.train import distributed
        from rankwise.train.finetune import FinetuneSpec, finetune_classifier
        from rankwise.train.loop import TrainConfig

        external = distributed.launched_externally()  # torchrun / accelerate launch started this process
        if threads and not (nproc > 1 or external):
            torch.set_num_threads(threads)
        target_list = targets if targets == "all-linear" or "*" in targets or "(" in targets else [t for t in targets.split(",") if t]
        try:
            distributed.check_nproc(nproc)
            if external and nproc > 1:
                raise ConfigError(f"--nproc={nproc} inside a torchrun/accelerate launch: the launcher already started "
                                  f"{os.environ['WORLD_SIZE']} processes; drop --nproc (set the launcher's --nproc_per_node)")
            dataset = load_text_classification(data, train_size, test_size, seed, text_field, label_field)
            spec = FinetuneSpec(
                method=method, rank=rank or None, targets=target_list, method_options=_parse_options(option),
                max_length=max_length, batch_size=batch_size, train=TrainConfig(epochs=epochs, lr=lr, seed=seed),
                procedure=procedure, procedure_options=_parse_options(procedure_option),
            )
            if external:
                if threads:
                    torch.set_num_threads(threads)
                dp = distributed.init_from_env()
                if dp.is_main:
                    console.print(f"[bold]{dataset.summary()}[/bold] on {dp.world_size} processes ({distributed.default_backend()})")
                metrics = finetune_classifier(dataset, spec, output, model_path=model, data_parallel=dp)
                if not dp.is_main:
                    return
            elif nproc > 1:
                from rankwise.train.finetune import finetune_worker

                console.print(f"[bold]{dataset.summary()}[/bold] on {nproc} processes ({distributed.default_backend()})")
                distributed.launch(finetune_worker, nproc, args=(dataset, spec, output, model), threads=threads)
                metrics = json.loads((output / "metrics.json").read_text())
            else:
                console.print(f"[bold]{dataset.summary()}[/bold]")
                metrics = finetune_classifier(dataset, spec, output, model_path=model)
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None
        _report(metrics, output)

    @app.command("demo")
    def demo(output: Path = typer.Option(Path("runs/demo"), help="Output directory.")) -> None:
        """LoRA on the embedded all-MiniLM-L6-v2 + 3-class tweet sentiment, before/after table (a few minutes on 2 CPU cores)."""
        finetune(
            method="lora", rank=8, targets="query,key,value,dense", option=["lora_alpha=16"], epochs=2, lr=2e-3,
            batch_size=32, max_length=64, train_size=2400, test_size=800, data=None, text_field="text",
            label_field="label", model=None, output=output, seed=0, threads=0, procedure=None, procedure_option=[], nproc=1,
        )
