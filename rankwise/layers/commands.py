"""`rankwise s4d-demo`: the offline long-range sequence-classification demo of the S4D layer."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress

console = Console()


def s4d_demo_command(
    init: str = typer.Option("lin", help="A initialisation: lin, inv, real or rand"),
    side: int = typer.Option(8, help="digit side after upsampling: 8, 16 or 32 (sequence length 64, 256, 1024)"),
    epochs: int = typer.Option(40),
    d_model: int = typer.Option(64), d_state: int = typer.Option(64), n_layers: int = typer.Option(2),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, "--output", "-o", "--out", help="write the result as JSON here"),
):
    """Train an S4D classifier on permuted-pixel sklearn digits (runs offline) and report test accuracy."""
    from rankwise.layers.s4d_demo import run_sequence_demo

    with Progress(console=console) as progress:
        task = progress.add_task(f"S4D-{init} epochs", total=epochs)
        result = run_sequence_demo(
            init=init, side=side, epochs=epochs, d_model=d_model, d_state=d_state, n_layers=n_layers, seed=seed,
            progress=lambda epoch, loss: progress.update(task, completed=epoch, description=f"S4D-{init} loss {loss:.3f}"),
        )
    console.print_json(json.dumps(result))
    if out is not None:
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(json.dumps(result, indent=2))
        temporary.replace(out)


def register(app: typer.Typer) -> None:
    app.command("s4d-demo")(s4d_demo_command)
