"""What every serving export shares: load the source adapter, factorise it, measure, write directories atomically."""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.core.errors import ConfigError

# The projections every LLaMA-style decoder has (LLaMA, Mistral, Qwen2/3, Gemma, Phi-3 split...): what serving
# runtimes apply a LoRA to. Module names end with one of these.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def check_rank(rank: int | str, tol: float | None) -> None:
    if rank == "auto":
        if tol is None or not 0 <= tol < 1:
            raise ConfigError(f"rank='auto' needs tol in [0, 1) (the per-layer relative error), got tol={tol!r}")
    elif not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"rank={rank!r} is invalid: expected an integer >= 1 or 'auto' (with tol)")


def default_rank(config) -> int:
    """The rank an export uses when none is asked for: the source's own rank (largest per-layer), else 8.

    A LoRA source then converts exactly; a method with a rank field (NOLA, MiSS, ...) keeps that budget.
    """
    field = getattr(type(config), "rank_field", None)
    value = getattr(config, field, None) if field else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        return 8
    pattern = getattr(config, "rank_pattern", None) or {}
    return max([value, *(v for v in pattern.values() if isinstance(v, int))])


def load_source(base_model: nn.Module, adapter_dir, action: str):
    """(source config, adapted copy of the base) for a weight-changing adapter; others are refused by name."""
    from rankwise.core.io import load_adapter, read_config

    config = read_config(adapter_dir)
    reason = getattr(config, "unmergeable_reason", None)
    if reason:
        raise ConfigError(f"{config.method_name} adapters cannot be {action}: {reason}")
    return config, load_adapter(copy.deepcopy(base_model), adapter_dir).eval()


def factorize(source, rank: int | str, tol: float | None, progress: Callable[[str], None] | None = None):
    """{module: (B, A)} (scaling 1, B @ A ≈ ΔW flattened) and the per-layer reports, by truncated SVD."""
    from rankwise.convert import LayerReport, lora_factors

    layers = dict(source.adapted_layers())
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    reports = []
    for name, delta in source.delta_weights("default").items():
        if progress:
            progress(name)
        B, A, error = lora_factors(delta, rank, tol)
        factors[name] = (B, A)
        reports.append(LayerReport(name, layers[name].kind, list(delta.shape), B.shape[1], error))
    return factors, reports


def pad_rank(B: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of B and zero rows of A up to `rank`: the product B @ A is unchanged."""
    extra = rank - B.shape[1]
    if extra <= 0:
        return B, A
    return torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), torch.cat([A, A.new_zeros(extra, A.shape[1])], 0)


def measure(report, source, candidate, base_model, sample_inputs: Any) -> None:
    """Fill the report's output differences: the candidate against the adapted source on `sample_inputs`."""
    from rankwise.convert import run_model

    if sample_inputs is None:
        return
    y_source = run_model(source, sample_inputs)
    y_candidate = run_model(candidate, sample_inputs)
    y_base = run_model(base_model, sample_inputs)
    diff = y_candidate - y_source
    report.output_max_abs_diff = float(diff.abs().max())
    report.output_relative_diff = float(diff.norm() / y_source.norm().clamp_min(1e-30))
    effect = (y_source - y_base).norm()
    report.adapter_effect_relative_diff = float(diff.norm() / effect) if effect > 0 else 0.0


def tied_embedding_names(model: nn.Module) -> list[str]:
    """Module names of the input embedding and output head when they share one weight (else [])."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None:
        return []
    inp, out = get_in(), get_out()
    if inp is None or out is None or getattr(inp, "weight", None) is not getattr(out, "weight", 0):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(inp)], names[id(out)]]


def module_touches(module_name: str, names: list[str]) -> bool:
    return any(module_name == n or module_name.startswith(n + ".") for n in names)


def export_directory(output_dir):
    """`atomic_directory` for a serving export: the finished directory replaces `output_dir` whole.

        with export_directory(out) as stage:    # out/../.out.saving-XXXX/, swapped in on success
            write(stage / "adapter_model.safetensors")

    An existing FILE at `output_dir` is a ConfigError naming --output, raised before anything is written; an old
    output directory is replaced (its other entries are not carried over: an export is one whole directory).
    """
    from rankwise.core.io import atomic_directory

    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output {output_dir} exists and is a file: pass a directory path for --output")
    return atomic_directory(output_dir, keep_other_entries=False)
