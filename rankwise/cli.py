"""The `rankwise` command (typer + rich). Thin: parse arguments, call the library, print.

Each area of the library contributes its commands through a `commands.py` module that defines
`register(app: typer.Typer) -> None`; this file only lists those modules.
"""
from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="rankwise",
    help="Low-rank deep learning: adapters, low-rank training, pretraining, compression, federated, analysis.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Areas that add commands. A module not yet present in this checkout is skipped (areas land one by one).
COMMAND_MODULES = (
    "rankwise.core.commands",       # methods, finetune, demo
    "rankwise.train.commands",
    "rankwise.adapters.commands",   # compose
    "rankwise.pretrain.commands",   # pretrain
    "rankwise.optim.commands",
    "rankwise.compress.commands",   # compress
    "rankwise.federated.commands",  # federate
    "rankwise.solvers.commands",    # solve ...
    "rankwise.layers.commands",
    "rankwise.analysis.commands",   # analyze, eval mnn
    "rankwise.convert",             # convert
    "rankwise.arena",               # bench arena
    "rankwise.generation",          # generate, chat
)


def _version(value: bool) -> None:
    if value:
        from rankwise import __version__

        typer.echo(f"rankwise {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the rankwise version and exit.")) -> None:
    """Low-rank deep learning: adapters, low-rank training, pretraining, compression, federated, analysis."""


def _register_all() -> None:
    for module_name in COMMAND_MODULES:
        if importlib.util.find_spec(module_name) is not None:
            importlib.import_module(module_name).register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
