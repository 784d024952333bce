"""CLI commands of the core: `rankwise methods`, `rankwise finetune`, `rankwise demo`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from rankwise.core.errors import ConfigError

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
    if metrics.get("task") == "causal-lm":
        _report_causal_lm(metrics)
    else:
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


def _report_causal_lm(metrics: dict) -> None:
    before, after = metrics["before"], metrics["after"]
    table = Table(title=f"{metrics['method']} on {metrics['data']}")
    for col in ("", "held-out loss", "perplexity", f"exact match ({metrics['exact_match_prompts']} prompts)"):
        table.add_column(col, justify="right" if col else "left")
    for label, m in (("base (before)", before), ("fine-tuned (after)", after)):
        table.add_row(label, f"{m['loss']:.3f}", f"{m['perplexity']:.2f}", f"{m['exact_match']:.3f}")
    console.print(table)
    samples = Table(title="sample generations (greedy, held-out prompts)", show_lines=True)
    for col in ("prompt", "reference", "before", "after"):
        samples.add_column(col, overflow="fold")
    for b, a in zip(before.get("samples", []), after.get("samples", [])):
        samples.add_row(b["prompt"].split("\n\n")[-1][-200:], b["reference"], b["generated"], a["generated"])
    console.print(samples)
    notes = []
    if metrics.get("chat_template", "").startswith("fallback"):
        notes.append("the tokenizer has no chat template: the fallback '### User: / ### Assistant:' format was used")
    if metrics.get("truncated_train_examples"):
        notes.append(f"{metrics['truncated_train_examples']} training example(s) were longer than --max-length and "
                     f"truncated ({metrics.get('dropped_train_examples', 0)} dropped: no reply token left)")
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}")


# Defaults that differ by task (None on the command line = take the task's).
TASK_DEFAULTS = {
    "classification": {"max_length": 64, "train_size": 3000, "test_size": 1000, "batch_size": 32},
    "causal-lm": {"max_length": 256, "train_size": 1000, "test_size": 200, "batch_size": 8},
}


def _warmup(value: float) -> dict:
    """--warmup: a ratio of the run's optimizer steps when < 1, else a number of steps."""
    if value < 0 or value != value:
        raise ConfigError(f"--warmup={value} is invalid: expected a ratio in [0, 1) or a number of steps >= 1")
    if value < 1:
        return {"warmup_ratio": float(value)}
    if value != int(value):
        raise ConfigError(f"--warmup={value} is invalid: a value >= 1 is a number of steps (an integer)")
    return {"warmup_steps": int(value)}


def _alpha_dropout_options(method: str, lora_alpha: float | None, lora_dropout: float | None) -> dict:
    """Map --lora-alpha/--lora-dropout onto the method's own field (lora_alpha, <method>_alpha, alpha, ...)."""
    import dataclasses

    import rankwise

    info = rankwise.get_method(method)
    names = [f.name for f in dataclasses.fields(info.config_cls)]
    options = {}
    for flag, value, suffix in (("--lora-alpha", lora_alpha, "alpha"), ("--lora-dropout", lora_dropout, "dropout")):
        if value is None:
            continue
        fields = [n for n in names if n == f"lora_{suffix}"] or [n for n in names if n == suffix or n.endswith(f"_{suffix}")]
        if len(fields) != 1:
            raise ConfigError(f"{flag}: method {info.name!r} has no {suffix} field ({'several: ' + ', '.join(fields) if fields else 'none'}); "
                               f"drop {flag}, or set a field by name with --option FIELD=VALUE")
        options[fields[0]] = value
    return options


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
        Console().print(table)  # a console made now sizes the table to the terminal (COLUMNS) of this call

    @app.command("finetune")
    def finetune(
        task: str = typer.Option("classification", help="classification (text -> label) | causal-lm (instruction tuning)."),
        method: str = typer.Option("lora", help="Registered method name (see `rankwise methods`)."),
        rank: Optional[int] = typer.Option(None, min=1, help="Rank (the method's rank field); default: the method's own default."),
        targets: Optional[str] = typer.Option(None, help="Comma-separated module names, a regex, or 'all-linear'. Default: "
                                              "query,key,value,dense (classification); q,k,v,o,gate,up,down_proj (causal-lm)."),
        option: list[str] = typer.Option([], "--option", help="Extra method field as key=value (JSON values), repeatable."),
        lora_alpha: Optional[float] = typer.Option(None, help="The method's alpha field (lora_alpha, <method>_alpha, ...)."),
        lora_dropout: Optional[float] = typer.Option(None, help="The method's dropout field (lora_dropout, ...)."),
        epochs: int = typer.Option(2, min=1),
        max_steps: int = typer.Option(0, min=0, help="Train exactly this many optimizer steps (0: --epochs full passes)."),
        lr: float = typer.Option(1e-3, help="Peak learning rate (AdamW)."),
        weight_decay: float = typer.Option(0.0, help="AdamW weight decay."),
        scheduler: str = typer.Option("linear", help="LR schedule after warm-up: linear | cosine | constant."),
        warmup: float = typer.Option(0.06, help="Warm-up: a ratio of the optimizer steps if < 1, else a number of steps."),
        grad_accum: int = typer.Option(1, min=1, help="Micro-batches per optimizer step (gradient accumulation)."),
        batch_size: Optional[int] = typer.Option(None, min=1, help="Examples per micro-batch (default 32; causal-lm 8)."),
        max_length: Optional[int] = typer.Option(None, min=8, help="Tokens per example (default 64; causal-lm 256); longer "
                                                 "examples are truncated and counted."),
        packing: bool = typer.Option(False, "--packing", help="causal-lm: pack whole examples into rows of --max-length."),
        train_size: Optional[int] = typer.Option(None, min=1, help="Training examples (default 3000; causal-lm 1000)."),
        test_size: Optional[int] = typer.Option(None, min=1, help="Held-out examples (default 1000; causal-lm 200)."),
        eval_generations: int = typer.Option(64, min=1, help="causal-lm: held-out prompts scored by exact match."),
        max_new_tokens: int = typer.Option(32, min=1, help="causal-lm: longest generated reply in the evaluation."),
        eval_steps: int = typer.Option(0, min=0, help="Evaluate every N optimizer steps (0: at each epoch's end)."),
        save_steps: int = typer.Option(0, min=0, help="Checkpoint every N optimizer steps under --output (0: none)."),
        resume: Optional[str] = typer.Option(None, help="Resume from a checkpoint directory, or 'latest' in --output."),
        report_to: str = typer.Option("none", help="none | tensorboard (event files in OUTPUT/tensorboard)."),
        data: Optional[Path] = typer.Option(None, help="classification: CSV/JSONL with text,label columns (default: embedded "
                                            "tweets); causal-lm: JSONL with prompt/response or messages (default: the "
                                            "tweets as a sentiment instruction task)."),
        text_field: str = typer.Option("text"),
        label_field: str = typer.Option("label"),
        model: Optional[Path] = typer.Option(None, help="Local transformers model dir (default: embedded all-MiniLM-L6-v2; "
                                             "causal-lm: embedded SmolLM2-135M-Instruct)."),
        dtype: str = typer.Option("float32", help="Base weights: float32 | bfloat16 (adapters stay float32)."),
        device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda."),
        quantize: Optional[str] = typer.Option(None, help="Weight-only quantized frozen base: int8 | int4 (rankwise.quant)."),
        gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations in backward (less memory)."),
        output: Path = typer.Option(Path("runs/finetune"), "--output", "-o", "--out", help="Output directory (--out: deprecated alias)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in --output."),
        seed: int = typer.Option(0),
        threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
        procedure: Optional[str] = typer.Option(None, help="Training procedure: allora, ggpo, increlora, triadapt, diffora, maestro, trp."),
        procedure_option: list[str] = typer.Option([], "--procedure-option", "-p", help="Procedure argument as key=value (JSON values), repeatable."),
        nproc: int = typer.Option(1, help="Data-parallel processes on this machine (torch.distributed: gloo on CPU, NCCL on GPU); "
                                          "--batch-size is the global batch. Several machines: see docs/distributed.md."),
    ) -> None:
        """Fine-tune with an adapter (a text classifier, or an LLM on instructions); evaluate before and after; save adapter, metrics, plot."""
        import torch

        import rankwise
        from rankwise.core.console import print_error
        from rankwise.core.errors import RankwiseError
        from rankwise.data.models import check_load_args
        from rankwise.train import distributed
        from rankwise.train.finetune import FinetuneSpec, check_output_dir, finetune as run_finetune
        from rankwise.train.loop import TrainConfig
        from rankwise.train.procedures import get_procedure
        from rankwise.train.tasks import check_task

        external = distributed.launched_externally()  # torchrun / accelerate launch started this process
        if threads and not (nproc > 1 or external):
            torch.set_num_threads(threads)
        target_list = None if targets is None else (
            targets if targets == "all-linear" or "*" in targets or "(" in targets else [t for t in targets.split(",") if t])
        try:
            # Everything that can be checked without the model or the data, first.
            check_task(task)
            rankwise.get_method(method)
            if procedure is not None:
                get_procedure(procedure)
            check_load_args(task, dtype, device, quantize)
            if report_to not in ("none", "tensorboard"):
                raise ConfigError(f"--report-to={report_to!r} is invalid: expected none or tensorboard")
            defaults = TASK_DEFAULTS[task]
            method_options = {**_parse_options(option), **_alpha_dropout_options(method, lora_alpha, lora_dropout)}
            train_config = TrainConfig(epochs=epochs, lr=lr, seed=seed, weight_decay=weight_decay, schedule=scheduler,
                                       grad_accum=grad_accum, max_steps=max_steps, eval_every=eval_steps,
                                       checkpoint_every=save_steps, **_warmup(warmup))
            spec = FinetuneSpec(
                method=method, rank=rank or None, targets=target_list if target_list is not None or task == "causal-lm"
                else ["query", "key", "value", "dense"], method_options=method_options,
                max_length=max_length or defaults["max_length"], batch_size=batch_size or defaults["batch_size"],
                train=train_config, procedure=procedure, procedure_options=_parse_options(procedure_option),
                device=device, dtype=dtype, quantize=quantize, gradient_checkpointing=gradient_checkpointing,
                packing=packing, resume=resume, report_to=report_to,
            )
            distributed.check_nproc(nproc)
            if external and nproc > 1:
                raise ConfigError(f"--nproc={nproc} inside a torchrun/accelerate launch: the launcher already started "
                                  f"{os.environ['WORLD_SIZE']} processes; drop --nproc (set the launcher's --nproc_per_node)")
            if not external or os.environ.get("RANK", "0") == "0":  # rank 0 alone writes
                check_output_dir(output, overwrite, resume=resume is not None)
            train_n, test_n = train_size or defaults["train_size"], test_size or defaults["test_size"]
            if task == "causal-lm":
                from rankwise.data.instructions import load_instructions
                from rankwise.train.tasks.causal_lm import CausalLMTask

                the_task = CausalLMTask(load_instructions(data, train_n, test_n, seed), eval_generations, max_new_tokens)
            else:
                from rankwise.data.text import load_text_classification
                from rankwise.train.tasks.classification import ClassificationTask

                the_task = ClassificationTask(load_text_classification(data, train_n, test_n, seed, text_field, label_field))
            summary = the_task.summary()
            if external:
                if threads:
                    torch.set_num_threads(threads)
                dp = distributed.init_from_env()
                if dp.is_main:
                    console.print(f"[bold]{summary}[/bold] on {dp.world_size} processes ({distributed.default_backend()})")
                metrics = run_finetune(the_task, spec, output, model_path=model, data_parallel=dp, overwrite=True)
                if not dp.is_main:
                    return
            elif nproc > 1:
                from rankwise.train.finetune import finetune_worker

                console.print(f"[bold]{summary}[/bold] on {nproc} processes ({distributed.default_backend()})")
                distributed.launch(finetune_worker, nproc, args=(the_task, spec, output, model), threads=threads)
                metrics = json.loads((output / "metrics.json").read_text())
            else:
                console.print(f"[bold]{summary}[/bold]")
                metrics = run_finetune(the_task, spec, output, model_path=model, overwrite=True)
        except RankwiseError as err:
            print_error(err, console)
            raise typer.Exit(2) from None
        _report(metrics, output)

    @app.command("demo")
    def demo(
        task: str = typer.Option("classification", help="classification (MiniLM + tweets) | causal-lm (SmolLM2 + tweet instructions)."),
        output: Optional[Path] = typer.Option(None, "--output", "-o", "--out", help="Output directory (default runs/demo, runs/demo-llm)."),
        device: str = typer.Option("auto", help="auto | cpu | cuda"),
    ) -> None:
        """LoRA before/after in a few minutes on 2 CPU cores: a tweet-sentiment classifier (default) or, with
        --task causal-lm, SmolLM2-135M-Instruct instruction-tuned on the tweets as a sentiment task."""
        import inspect

        args = {name: p.default.default if hasattr(p.default, "default") else p.default
                for name, p in inspect.signature(finetune).parameters.items()}
        if task == "causal-lm":
            args.update(DEMO_CAUSAL_LM)
            args["output"] = output or Path("runs/demo-llm")
        else:
            args.update(method="lora", rank=8, targets="query,key,value,dense", option=["lora_alpha=16"], epochs=2,
                        lr=2e-3, batch_size=32, max_length=64, train_size=2400, test_size=800)
            args["output"] = output or Path("runs/demo")
        args.update(task=task, device=device, overwrite=True)
        finetune(**args)


# The causal-LM demo: tuned to finish in under 10 minutes on 2 CPU cores with a visible gain (see docs/guides/llm.md).
DEMO_CAUSAL_LM = dict(method="lora", rank=8, targets=None, option=[], lora_alpha=16.0, epochs=1, max_steps=0, lr=2e-3,
                      batch_size=8, max_length=128, train_size=192, test_size=48, eval_generations=40, max_new_tokens=6,
                      warmup=0.1)
