"""`rankwise analyze ADAPTER_DIR`, `rankwise eval mnn MODEL --data FILE`, `rankwise intrinsic-dim`."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from rankwise.core.console import print_error
from rankwise.core.errors import RankwiseError

console = Console()
eval_app = typer.Typer(help="Evaluate models with low-rank metrics.", no_args_is_help=True)


def _fail(error: Exception) -> None:
    print_error(error, console)
    raise typer.Exit(2) from error


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2))
    temporary.replace(path)


def analyze_command(
    adapter_dir: Path = typer.Argument(..., help="adapter directory (adapter_config.json + adapter_model.safetensors)"),
    compare: Path = typer.Option(None, help="a second adapter directory: subspace similarity per shared layer"),
    rank: int = typer.Option(8, help="largest i, j in the similarity grid phi(i, j)"),
    base: Path = typer.Option(None, help="local model dir the adapter was trained on: needed for non-LoRA methods"),
    num_labels: int = typer.Option(None, help="classifier labels of --base (default: from the saved head, else 2)"),
    out: Path = typer.Option(None, "--output", "-o", "--out", help="output directory (default ADAPTER_DIR/analysis)"),
):
    """Singular spectra, stable/effective/energy rank of every learned update; PNG plots + report.json."""
    from rankwise.analysis.spectra import adapter_updates, analyze_updates

    out = out or adapter_dir / "analysis"
    try:
        with console.status("analysing"):
            updates = adapter_updates(adapter_dir, base, num_labels)
            other = adapter_updates(compare, base, num_labels) if compare is not None else None
            report = analyze_updates(updates, out, other, rank)
    except RankwiseError as error:
        _fail(error)
    table = Table(title=f"{adapter_dir}: {len(report['layers'])} updates")
    for column in ("layer", "shape", "sigma_1", "stable", "effective", "90% energy"):
        table.add_column(column, justify="right" if column != "layer" else "left")
    for row in report["layers"]:
        table.add_row(row["name"], "x".join(map(str, row["shape"])), f"{row['top_singular_value']:.3g}",
                      f"{row['stable_rank']:.2f}", f"{row['effective_rank']:.2f}", str(row["energy_rank"]))
    console.print(table)
    if "similarity" in report:
        mean = sum(report["similarity"].values()) / len(report["similarity"])
        console.print(f"mean subspace similarity phi({rank},{rank}) with {compare}: {mean:.3f}")
    console.print(f"wrote {out}/report.json, spectra.png" + (", similarity.png" if compare else ""))


@eval_app.command("mnn")
def mnn_command(
    model: str = typer.Argument(..., help="local HF model directory, 'minilm' or 'smollm2' (offline packages)"),
    data: Path = typer.Option(..., "--data", help=".txt (one text per line), .jsonl or .json"),
    field: str = typer.Option(None, help="JSON field holding the text (default response/output/text)"),
    entropy: bool = typer.Option(False, help="also compute SVD-based matrix entropy and time both"),
    max_length: int = typer.Option(2048), limit: int = typer.Option(None, help="use the first N texts"),
    out: Path = typer.Option(None, "--output", "-o", "--out", help="write the result JSON here"),
    device: str = typer.Option("auto", help="auto (CUDA if available) | cpu | cuda: where the model runs"),
):
    """Matrix Nuclear-Norm (arXiv 2410.10672) of a model's hidden states on a text file."""
    from rankwise.analysis.mnn import evaluate_texts, load_base_model, read_texts

    from rankwise.data.models import resolve_device

    try:
        torch_device = resolve_device(device)  # before anything loads
        texts = read_texts(data, field)[:limit]
        with console.status(f"loading {model}"):
            network, tokenizer = load_base_model(model)
            network.to(torch_device)
    except RankwiseError as error:
        _fail(error)
    metrics = ("mnn", "entropy") if entropy else ("mnn",)
    with Progress(console=console) as progress:
        task = progress.add_task("scoring", total=len(texts))
        result = evaluate_texts(network, tokenizer, texts, metrics=metrics, max_length=max_length,
                                progress=lambda i: progress.update(task, completed=i))
    result = {"model": model, "data": str(data), **result}
    console.print_json(json.dumps({k: v for k, v in result.items() if k != "per_sequence"}))
    if out is not None:
        _write_json(out, result)


def intrinsic_dim_command(
    dims: str = typer.Option("20,80,160,320,640", help="comma-separated subspace sizes d"),
    projection: str = typer.Option("dense", help="dense, sparse (the paper's sparse random projection) or fastfood"),
    seeds: int = typer.Option(3), steps: int = typer.Option(300),
    out: Path = typer.Option(None, "--output", "-o", "--out", help="write the sweep JSON here"),
):
    """Intrinsic dimension sweep (arXiv 1804.08838) on sklearn digits: accuracy by d and d_int90."""
    from rankwise.analysis.intrinsic_dim import intrinsic_dimension_sweep

    try:
        result = intrinsic_dimension_sweep([int(d) for d in dims.split(",")], projection=projection,
                                           seeds=tuple(range(seeds)), steps=steps, progress=console.log)
    except (RankwiseError, ValueError) as error:
        _fail(error)
    console.print_json(json.dumps(result))
    if out is not None:
        _write_json(out, result)


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_command)
    app.command("intrinsic-dim")(intrinsic_dim_command)
    app.add_typer(eval_app, name="eval")
