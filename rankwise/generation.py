"""Greedy generation through a (possibly adapted) causal LM, and the `rankwise generate` / `rankwise chat` commands.

Prompts are rendered with the tokenizer's chat template (the fallback format of `rankwise.data.instructions`
when it has none), left-padded into batches, and decoded up to the template's end-of-turn marker.
An `AdaptedModel`'s adapters live inside the wrapped model's layers, so `model.generate` uses the active adapter(s).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from rankwise.data.instructions import end_of_turn_marker, render, reply_from_generation


def _stop_ids(tokenizer, marker: str) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker_ids = tokenizer(marker, add_special_tokens=False)["input_ids"] if marker else []
    if len(marker_ids) == 1 and marker_ids[0] not in ids:
        ids.append(marker_ids[0])
    return ids


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int = 64,
                     batch_size: int = 16, max_prompt_tokens: int | None = None) -> list[str]:
    """Greedy reply to each conversation (a list of messages ending with a user turn).

    max_prompt_tokens: keep only the last that many prompt tokens (prompts longer than the training length)."""
    from rankwise.data.instructions import collate

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    marker = end_of_turn_marker(tokenizer)
    stop = _stop_ids(tokenizer, marker)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    replies = []
    try:
        for start in range(0, len(conversations), batch_size):
            chunk = conversations[start : start + batch_size]
            ids = [tokenizer(render(tokenizer, c, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
                   for c in chunk]
            if max_prompt_tokens:
                ids = [x[-max_prompt_tokens:] for x in ids]
            # AdaptedModel.generate runs an input-side adapter's own generate hook (DePT's prompt, left padding aware)
            batch = collate(ids, ids, pad_id, left=True)
            out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop or None,
                                 pad_token_id=pad_id)
            rows = out[:, batch["input_ids"].shape[1]:]
            for row in rows:
                text = tokenizer.decode(row.tolist(), skip_special_tokens=False)
                for cut in (marker, tokenizer.eos_token, tokenizer.pad_token):
                    if cut:
                        text = text.split(cut)[0]
                replies.append(reply_from_generation(text, marker))
    finally:
        model.train(was_training)
    return replies


def exact_match(prediction: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace, case-insensitive."""
    return prediction.strip().casefold() == reference.strip().casefold()


def load_for_generation(model_path=None, adapters: list[str] = (), use: str | None = None, device: str = "auto",
                        dtype: str = "float32"):
    """(model, tokenizer): the base causal LM, with the named adapters loaded (`name=DIR` or `DIR`), `use` active."""
    import rankwise
    from rankwise.core.errors import ConfigError
    from rankwise.data.models import check_load_args, load_base

    check_load_args("causal-lm", dtype, device)
    named = []
    for k, item in enumerate(adapters):
        name, sep, directory = item.partition("=")
        if not sep:
            name, directory = ("default" if len(adapters) == 1 else f"adapter{k}"), item
        if not (Path(directory) / "adapter_config.json").is_file():
            raise ConfigError(f"--adapter {item!r}: {directory!r} has no adapter_config.json (not an adapter directory)")
        named.append((name, directory))
    if len({n for n, _ in named}) != len(named):
        raise ConfigError(f"--adapter names must be unique, got {[n for n, _ in named]}")
    if use is not None and use not in {n for n, _ in named}:
        raise ConfigError(f"--use {use!r} is not one of the loaded adapters {[n for n, _ in named]}")
    base, tokenizer = load_base(model_path, task="causal-lm", dtype=dtype, device=device)
    if not named:
        return base.eval(), tokenizer
    model = rankwise.load_adapter(base, named[0][1], adapter_name=named[0][0])
    for name, directory in named[1:]:
        model.load_adapter(directory, adapter_name=name)
    model.set_adapter(use or named[0][0])
    model.to(next(base.parameters()).device)
    return model.eval(), tokenizer


def register(app) -> None:
    import contextlib

    import typer
    from rich.console import Console

    console = Console()

    # The options `generate` and `chat` share, defined once (typer reads each OptionInfo; it does not change it).
    adapter_option = typer.Option([], help="Adapter directory, or name=DIR; repeatable (several adapters: pick one with --use).")
    use_option = typer.Option(None, help="Name of the adapter to use when several are loaded.")
    model_option = typer.Option(None, help="Base model directory (default: embedded SmolLM2-135M-Instruct).")
    system_option = typer.Option(None, help="Optional system message.")
    device_option = typer.Option("auto", help="auto | cpu | cuda")
    dtype_option = typer.Option("float32", help="float32 | bfloat16 (base weights)")

    @contextlib.contextmanager
    def exit_2_on_rankwise_error():
        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError

        try:
            yield
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None

    def system_turn(system: Optional[str]) -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    @app.command("generate")
    def generate(
        prompt: str = typer.Option(..., help="The user message (rendered with the model's chat template)."),
        adapter: list[str] = adapter_option,
        use: Optional[str] = use_option,
        model: Optional[Path] = model_option,
        system: Optional[str] = system_option,
        max_new_tokens: int = typer.Option(64, min=1),
        device: str = device_option,
        dtype: str = dtype_option,
    ) -> None:
        """Greedy generation from the base model, or through an adapter (several: --adapter name=DIR --use name)."""
        with exit_2_on_rankwise_error():
            lm, tokenizer = load_for_generation(model, adapter, use, device, dtype)
            messages = system_turn(system) + [{"role": "user", "content": prompt}]
            reply = generate_replies(lm, tokenizer, [messages], max_new_tokens=max_new_tokens)[0]
        typer.echo(reply)

    @app.command("chat")
    def chat(
        adapter: list[str] = adapter_option,
        use: Optional[str] = use_option,
        model: Optional[Path] = model_option,
        system: Optional[str] = system_option,
        max_new_tokens: int = typer.Option(128, min=1),
        device: str = device_option,
        dtype: str = dtype_option,
    ) -> None:
        """Multi-turn chat: one user turn per line of stdin (empty line, 'exit' or end of input stops)."""
        import sys

        with exit_2_on_rankwise_error():
            lm, tokenizer = load_for_generation(model, adapter, use, device, dtype)
            messages = system_turn(system)
            interactive = sys.stdin.isatty()
            while True:
                if interactive:
                    console.print("[bold]you>[/bold] ", end="")
                line = sys.stdin.readline()
                if not line or not line.strip() or line.strip() in ("exit", "quit"):
                    break
                messages.append({"role": "user", "content": line.rstrip("\n")})
                reply = generate_replies(lm, tokenizer, [messages], max_new_tokens=max_new_tokens)[0]
                messages.append({"role": "assistant", "content": reply})
                typer.echo(f"assistant> {reply}")
