"""`rankwise solve ...`: run a solver on matrices from .npy / .npz / .mtx files.

File layouts:
  complete  .mtx (Matrix Market coordinate: the observed entries) or .npz with rows, cols, values, shape
  sense     .npz with A (m, n1, n2) and y (m,)           (also `subgm`)
  eig       .npy (n, d) rows (memory-mapped and streamed in chunks) or .npz with one array / key "A"
Results are written atomically to --out (.npz or .npy) and summarised on the terminal.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from rankwise.core.console import print_error
from rankwise.core.errors import CheckpointError, ConfigError, RankwiseError

console = Console()
solve_app = typer.Typer(help="Low-rank solvers: matrix completion, sensing, SubGM, streaming top eigenvector.", no_args_is_help=True)


def _open(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist.")
    if path.suffix not in (".npy", ".npz", ".mtx"):
        raise ConfigError(f"{path} has suffix {path.suffix!r}: expected .npy, .npz or .mtx.")
    try:
        if path.suffix == ".mtx":
            import scipy.io

            return scipy.io.mmread(str(path))
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False, mmap_mode="r")
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{path} cannot be read ({error}): is it a valid {path.suffix} file?") from error


def _require_keys(path: Path, archive, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in archive]
    if missing:
        raise CheckpointError(f"{path} lacks array(s) {missing}: expected keys {list(keys)}.")


def load_observations(path: Path):
    """(rows, cols, values, shape) of a partially observed matrix from .mtx or .npz."""
    data = _open(path)
    if path.suffix == ".mtx":
        import scipy.sparse

        if not scipy.sparse.issparse(data):
            raise ConfigError(f"{path} is a dense Matrix Market array: completion needs the coordinate format (observed entries only).")
        coo = data.tocoo()
        return torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64)), torch.from_numpy(coo.data.astype(np.float64)), coo.shape
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: completion input must be .mtx or .npz (rows, cols, values, shape), never a dense mask.")
    _require_keys(path, data, ("rows", "cols", "values", "shape"))
    return (torch.from_numpy(data["rows"]), torch.from_numpy(data["cols"]), torch.from_numpy(data["values"]),
            tuple(int(s) for s in data["shape"]))


def load_measurements(path: Path):
    data = _open(path)
    if path.suffix != ".npz":
        raise ConfigError(f"{path}: sensing input must be an .npz with arrays A (m, n1, n2) and y (m,).")
    _require_keys(path, data, ("A", "y"))
    return torch.from_numpy(data["A"]), torch.from_numpy(data["y"])


def save_arrays(path: Path, **arrays) -> None:
    """Atomic .npz/.npy write (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        if path.suffix == ".npy":
            (array,) = arrays.values()
            np.save(handle, array)
        else:
            np.savez(handle, **arrays)
    os.replace(temporary, path)


def _show(title: str, summary: dict, out: Path) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    table.add_row("written", str(out))
    console.print(table)


def _run(title: str, function, *args, **kwargs):
    try:
        with console.status(f"{title}..."):
            return function(*args, **kwargs)
    except RankwiseError as error:
        print_error(error, console)
        raise typer.Exit(2) from error


@solve_app.command("complete")
def complete_command(
    file: Path = typer.Argument(..., help=".mtx or .npz (rows, cols, values, shape) of observed entries"),
    rank: int = typer.Option(..., "--rank", "-r"),
    iterations: int = typer.Option(30),
    solver: str = typer.Option("auto", help="auto (picks from the rank: see the docs), sketch (sketched CG, inexact) or exact"),
    delta: float = typer.Option(1e-10, help="relative residual of each inexact least-squares solve"),
    tol: float = typer.Option(0.0, help="stop when the observed-entry relative error is <= tol"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("completion.npz"), "--output", "-o", "--out", help="writes U and V (M ~ U @ V.T)"),
):
    """Robust alternating-minimisation matrix completion (arXiv 2302.11068)."""
    from rankwise.solvers.completion import altmin_completion

    rows, cols, values, shape = _run("reading", load_observations, file)
    result = _run("completing", altmin_completion, rows, cols, values, shape, rank,
                  iterations=iterations, solver=solver, delta=delta, tol=tol, seed=seed)
    save_arrays(out, U=result.factors[0].numpy(), V=result.factors[1].numpy())
    _show(f"completion {shape[0]}x{shape[1]}, rank {rank}", result.summary(), out)


@solve_app.command("sense")
def sense_command(
    file: Path = typer.Argument(..., help=".npz with A (m, n1, n2) and y (m,)"),
    rank: int = typer.Option(..., "--rank", "-r"),
    symmetric: bool = typer.Option(False, help="fit X X^T (PSD) instead of F G^T"),
    correction: str = typer.Option("auto", help="one-step correction: auto, none, or an iteration number"),
    init_scale: float = typer.Option(0.1), lr: float = typer.Option(0.1), iterations: int = typer.Option(3000),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("sensing.npz"), "--output", "-o", "--out"),
):
    """Factored GD matrix sensing with the one-step correction (arXiv 2310.01769)."""
    from rankwise.solvers.sensing import matrix_sensing

    A, y = _run("reading", load_measurements, file)
    at = None if symmetric or correction == "none" else ("auto" if correction == "auto" else int(correction))
    result = _run("sensing", matrix_sensing, A, y, rank, symmetric=symmetric, init_scale=init_scale, lr=lr,
                  iterations=iterations, correction_at=at, seed=seed)
    save_arrays(out, M=result.solution.numpy(), **{f"factor{i}": f.numpy() for i, f in enumerate(result.factors)})
    _show("matrix sensing", result.summary(), out)


@solve_app.command("subgm")
def subgm_command(
    file: Path = typer.Argument(..., help=".npz with A (m, d, d) and y (m,), y may contain outliers"),
    rank: int = typer.Option(..., "--rank", "-r", help="search rank (may over-estimate, up to d)"),
    init_scale: float = typer.Option(1e-8), step: float = typer.Option(0.5), decay: float = typer.Option(0.99),
    iterations: int = typer.Option(3000), seed: int = typer.Option(0),
    out: Path = typer.Option(Path("subgm.npz"), "--output", "-o", "--out"),
):
    """Robust PSD low-rank recovery with the sub-gradient method (arXiv 2202.08788)."""
    from rankwise.solvers.subgm import subgm

    A, y = _run("reading", load_measurements, file)
    result = _run("SubGM", subgm, A, y, rank, init_scale=init_scale, step=step, decay=decay, iterations=iterations, seed=seed)
    save_arrays(out, X=result.solution.numpy(), U=result.factors[0].numpy())
    _show("SubGM", result.summary(), out)


@solve_app.command("eig")
def eig_command(
    file: Path = typer.Argument(..., help=".npy (n, d) of rows, streamed from disk"),
    blocks: int = typer.Option(None, help="power steps (default max(5, 2 ln d))"),
    shuffle: bool = typer.Option(True, help="visit rows in a random order (the method assumes random order)"),
    chunk: int = typer.Option(4096, help="rows read from disk at a time"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("top_eigenvector.npy"), "--output", "-o", "--out"),
):
    """Top eigenvector of A^T A in one random-order pass over the rows (arXiv 2412.11963)."""
    from rankwise.solvers.streaming_eig import streaming_top_eigenvector

    data = _run("reading", _open, file)
    if file.suffix == ".npz":
        data = data["A"] if "A" in data else next(iter(data.values()))
    if data.ndim != 2:
        raise typer.BadParameter(f"{file} holds an array of shape {data.shape}: expected (n, d) rows.")
    n = data.shape[0]
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)

    def stream():
        for start in range(0, n, chunk):
            yield torch.from_numpy(np.asarray(data[order[start:start + chunk]], dtype=np.float64))

    result = _run("streaming", streaming_top_eigenvector, stream(), n_rows=n, blocks=blocks, seed=seed)
    save_arrays(out, v=result.solution.numpy())
    _show(f"top eigenvector, {n} rows x {data.shape[1]}", result.summary(), out)


def register(app: typer.Typer) -> None:
    app.add_typer(solve_app, name="solve")


