"""Spectra of weights and of learned low-rank updates: singular values, stable/effective rank,
subspace similarity between two adapters, and PNG plots.

* stable rank ||W||_F^2 / ||W||_2^2 and effective rank exp(H(sigma / sum sigma)) (Roy & Vetterli 2007)
  come from `rankwise.linalg`;
* energy rank: the smallest k keeping `fraction` of ||W||_F^2;
* subspace similarity phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j), as in LoRA's analysis of
  which directions two runs share (Hu et al., arXiv 2106.09685, sec. 7.2).

An update is either a dense tensor (out x in) or a factored pair `(B, A)` with `B @ A` the update;
factored updates are analysed through `linalg.factored_svd` without forming the dense matrix.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.core.errors import CheckpointError, ShapeError
from rankwise.linalg import effective_rank, factored_svd, stable_rank, subspace_similarity
from rankwise.linalg import energy_rank as linalg_energy_rank

Update = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass
class Spectrum:
    """Singular values (descending) and left singular vectors (for subspace comparisons) of one matrix."""

    name: str
    shape: tuple[int, int]
    singular_values: torch.Tensor
    left_vectors: torch.Tensor

    def report(self, fraction: float = 0.9) -> dict:
        S = self.singular_values
        diag = torch.diag(S)
        return {
            "name": self.name, "shape": list(self.shape), "top_singular_value": float(S[0]) if S.numel() else 0.0,
            "stable_rank": stable_rank(diag), "effective_rank": effective_rank(diag),
            "energy_rank": energy_rank(S, fraction), "numerical_rank": numerical_rank(S, self.shape),
        }


def spectrum(name: str, update: Update) -> Spectrum:
    """SVD of a dense matrix or of a factored `(B, A)` update."""
    if isinstance(update, tuple):
        B, A = update
        if B.dim() != 2 or A.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ShapeError(f"{name}: factors must be B (out x r) and A (r x in), got {tuple(B.shape)} and {tuple(A.shape)}.")
        U, S, _ = factored_svd(B, A)
        shape = (B.shape[0], A.shape[1])
    else:
        if update.dim() != 2:
            raise ShapeError(f"{name}: expected a 2-D matrix, got shape {tuple(update.shape)}.")
        U, S, _ = torch.linalg.svd(update.double(), full_matrices=False)
        shape = tuple(update.shape)
    if not torch.isfinite(S).all():
        raise ShapeError(f"{name}: the matrix has NaN/inf entries.")
    return Spectrum(name, shape, S, U)


def energy_rank(singular_values: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest k with sum_{i<=k} sigma_i^2 >= fraction * sum sigma^2 (0 for a zero matrix)."""
    if not bool((singular_values != 0).any()):
        return 0
    return linalg_energy_rank(singular_values, fraction)


def numerical_rank(singular_values: torch.Tensor, shape: tuple[int, int]) -> int:
    """Number of singular values above max(shape) * eps * sigma_1 (numpy's matrix_rank rule)."""
    if singular_values.numel() == 0 or singular_values[0] == 0:
        return 0
    tol = max(shape) * torch.finfo(torch.float32).eps * singular_values[0]
    return int((singular_values > tol).sum())


def similarity_grid(first: Spectrum, second: Spectrum, rank: int) -> torch.Tensor:
    """phi(i, j) for i, j = 1..rank between the top left singular subspaces of two updates."""
    if first.shape[0] != second.shape[0]:
        raise ShapeError(f"cannot compare {first.name} {first.shape} with {second.name} {second.shape}: output sizes differ.")
    rank = min(rank, first.left_vectors.shape[1], second.left_vectors.shape[1])
    grid = torch.zeros(rank, rank, dtype=torch.float64)
    for i in range(1, rank + 1):
        for j in range(1, rank + 1):
            grid[i - 1, j - 1] = subspace_similarity(first.left_vectors, second.left_vectors, i, j)
    return grid


def read_lora_updates(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factored updates `(scale * B, A)` per layer from a PEFT-layout LoRA directory.

    Reads `adapter_config.json` (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) and pairs the
    `*.lora_A.weight` / `*.lora_B.weight` tensors of `adapter_model.safetensors`. Works without the base
    model; methods whose update needs the base weights go through `rankwise.load_adapter` instead.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: ADAPTER_DIR must hold adapter_config.json and adapter_model.safetensors.")
    from rankwise.core.io import read_config_dict

    config = read_config_dict(adapter_dir)  # every parse failure (bad JSON, not UTF-8, too deep) is a CheckpointError
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{weights_path} cannot be read as safetensors ({error}): the file is truncated or corrupted.") from error
    updates = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in tensors:
            raise CheckpointError(f"{weights_path}: {key} has no matching {b_key}.")
        B = tensors[b_key]
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        rank = A.shape[0]
        pattern_key = _pattern_key(config.get("rank_pattern", {}), name)
        alpha_key = _pattern_key(config.get("alpha_pattern", {}), name)
        alpha = config["alpha_pattern"][alpha_key] if alpha_key else config.get("lora_alpha", config.get("r", rank))
        if pattern_key is not None and config["rank_pattern"][pattern_key] != rank:
            raise CheckpointError(f"{name}: rank_pattern says r={config['rank_pattern'][pattern_key]} but lora_A has {rank} rows.")
        scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        updates[name] = (B.double() * scale, A.double())
    if not updates:
        raise CheckpointError(f"{weights_path} holds no lora_A/lora_B pairs: is it a LoRA-family adapter?")
    return updates


def _pattern_key(pattern: dict, name: str) -> str | None:
    """The rank_pattern/alpha_pattern key that applies to module `name` (PEFT's rule: the key, a regex,
    matches the end of the dotted name)."""
    return next((key for key in pattern if re.fullmatch(rf"(.*\.)?({key})", name)), None)


def adapter_updates(adapter_dir: str | Path, base: str | Path | None = None, num_labels: int | None = None) -> dict[str, Update]:
    """The learned update of every adapted layer of a saved adapter.

    Without `base`: LoRA-layout files are read directly as factors (no base model needed).
    With `base` (a local transformers directory, the model the adapter was trained on, loaded as a
    sequence classifier like `rankwise finetune` does): `rankwise.load_adapter` rebuilds the adapted
    model and each layer's `delta_weight` gives the dense update; this works for every registered method,
    including those whose update depends on the base weights.
    """
    if base is None:
        try:
            return read_lora_updates(adapter_dir)
        except CheckpointError as error:
            if "no lora_A/lora_B pairs" in str(error):
                raise CheckpointError(f"{error} For other methods pass --base MODEL_DIR (the model it was trained on).") from None
            raise
    import rankwise
    from rankwise.data.models import load_classifier

    if num_labels is None:
        num_labels = _saved_num_labels(Path(adapter_dir) / "adapter_model.safetensors", Path(base))
    model, _ = load_classifier(base, num_labels, with_tokenizer=False)  # weights only: no tokenizer needed
    adapted = rankwise.load_adapter(model, adapter_dir)
    return dict(adapted.delta_weights())


def _saved_num_labels(weights_path: Path, base: Path) -> int:
    """Rows of a classifier head saved with the adapter (modules_to_save), else the base's own label count, else 2."""
    from safetensors import safe_open

    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing: ADAPTER_DIR must hold adapter_model.safetensors.")
    with safe_open(str(weights_path), framework="pt") as handle:
        for key in handle.keys():
            if "classifier" in key and key.endswith("weight") and len(handle.get_slice(key).get_shape()) == 2:
                return handle.get_slice(key).get_shape()[0]
    try:
        return len(json.loads((base / "config.json").read_text()).get("id2label", {})) or 2
    except (OSError, json.JSONDecodeError):
        return 2


def plot_spectra(spectra: list[Spectrum], path: str | Path, title: str = "singular spectra") -> Path:
    """Normalised singular values sigma_i / sigma_1 (log scale) of every matrix, one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for item in spectra:
        S = item.singular_values
        if S.numel() and S[0] > 0:
            axis.semilogy(range(1, S.numel() + 1), (S / S[0]).clamp_min(1e-16).numpy(), lw=1, alpha=0.7,
                          label=item.name if len(spectra) <= 12 else None)
    axis.set_xlabel("index i")
    axis.set_ylabel("sigma_i / sigma_1")
    axis.set_title(title)
    if len(spectra) <= 12:
        axis.legend(fontsize=6)
    return _save(figure, path)


def plot_similarity(grid: torch.Tensor, path: str | Path, title: str = "subspace similarity phi(i, j)") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(grid.numpy(), vmin=0, vmax=1, origin="lower", cmap="viridis",
                        extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
    figure.colorbar(image, ax=axis)
    axis.set_xlabel("j (second adapter)")
    axis.set_ylabel("i (first adapter)")
    axis.set_title(title)
    return _save(figure, path)


def _save(figure, path: str | Path) -> Path:
    import os

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    figure.tight_layout()
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, path)
    return path


def analyze_updates(
    updates: dict[str, Update], out_dir: str | Path, compare: dict[str, Update] | None = None, rank: int = 8,
) -> dict:
    """Report + plots for a set of updates (and, with `compare`, their similarity to another set).

    Writes `spectra.png`, `report.json` and, when comparing, `similarity.png` (the mean phi grid over
    the layers both sets share). Returns the report dict.
    """
    out_dir = Path(out_dir)
    spectra = [spectrum(name, update) for name, update in updates.items()]
    report: dict = {"layers": [item.report() for item in spectra]}
    plot_spectra(spectra, out_dir / "spectra.png")
    if compare is not None:
        shared = [name for name in updates if name in compare]
        if not shared:
            raise ShapeError("the two adapters share no layer names: nothing to compare.")
        grids = {name: similarity_grid(spectrum(name, updates[name]), spectrum(name, compare[name]), rank) for name in shared}
        size = min(g.shape[0] for g in grids.values())
        mean_grid = torch.stack([g[:size, :size] for g in grids.values()]).mean(0)
        report["similarity"] = {name: float(g[size - 1, size - 1]) for name, g in grids.items()}
        report["similarity_grid"] = mean_grid.tolist()
        plot_similarity(mean_grid, out_dir / "similarity.png")
    temporary = out_dir / "report.json.tmp"
    temporary.write_text(json.dumps(report, indent=2))
    temporary.replace(out_dir / "report.json")
    return report

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "spectra", "paper": "2106.09685", "runs": "rankwise analyze ADAPTER_DIR; rankwise.analysis.spectra",
     "summary": "singular spectra, effective rank, subspace similarity of updates"},
)
