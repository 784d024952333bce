"""Printing for the `rankwise` command: errors that survive any terminal width."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape


def print_error(error: object, console: Console | None = None) -> None:
    """Print `error: MESSAGE` on one logical line.

    rich hard-wraps at the console width (80 when stdout is not a terminal), which splits a message
    wherever a long path happens to push it, so the same error reads differently from one directory
    to the next (and `grep`/tests looking for a phrase miss it). `soft_wrap` leaves wrapping to the
    terminal. The message is escaped because paths and reprs may contain `[...]`, which rich would
    otherwise take for markup and drop.
    """
    (console or Console()).print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
