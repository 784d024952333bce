"""Adapter commands for the `rankwise` CLI: `rankwise compose` (Break-for-Make)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rankwise.core.console import print_error
from rankwise.core.errors import RankwiseError


def register(app: typer.Typer) -> None:
    @app.command("compose")
    def compose_command(
        content: Path = typer.Argument(..., help="adapter directory of the content B4M adapter"),
        style: Path = typer.Argument(..., help="adapter directory of the style B4M adapter"),
        output: Path = typer.Option(..., "--output", "-o", help="new adapter directory to write"),
    ) -> None:
        """Splice a content and a style Break-for-Make adapter into one adapter (content's A, style's B)."""
        from rankwise.adapters.b4m import compose

        console = Console()
        try:
            report = compose(content, style, output)
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(code=1) from None
        console.print(f"composed {report['layers']} layers (rank {report['rank']}) into [bold]{report['output']}[/bold]")
