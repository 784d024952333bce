"""A PEFT LoRA directory that vLLM loads: one valid rank, decoder projections only, no embeddings or heads.

vLLM's LoRA kernels are compiled for a fixed set of ranks and apply a LoRA to the decoder projections;
it refuses files that carry `modules_to_save`, embedding or `lm_head` tensors, biases or DoRA. So:

    every adapted layer  ──SVD (rankwise.convert.lora_factors)──>  B_l (out x r_l), A_l (r_l x in),  scaling 1
    r_file = smallest of VLLM_RANKS >= max_l r_l;  B_l, A_l zero-padded to r_file  (B_l A_l unchanged)
    adapter_config.json: peft_type LORA, r = lora_alpha = r_file, target_modules = the projections' short names

Layers that are not decoder projections (an embedding, `lm_head`, any other linear or conv) and the
source's `modules_to_save` are left out; the report lists them and the measured output difference includes
their absence. Projections of the short names that the source did not adapt get zero factors, so PEFT and
vLLM find every module they expect.

    report = export_vllm_lora(base, "runs/nola/adapter", "runs/nola-vllm", rank=16)
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.export.common import (
    DECODER_PROJECTIONS,
    check_rank,
    default_rank,
    export_directory,
    factorize,
    load_source,
    measure,
    pad_rank,
)

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's supported max_lora_rank values


def vllm_rank(rank: int) -> int:
    """The smallest rank vLLM supports that is >= `rank`."""
    for allowed in VLLM_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"rank {rank} is above vLLM's largest LoRA rank {VLLM_RANKS[-1]}: pass --rank {VLLM_RANKS[-1]} or less")


def export_vllm_lora(
    base_model: nn.Module,
    adapter_dir: str | Path,
    output_dir: str | Path,
    rank: int | str | None = None,
    tol: float | None = None,
    sample_inputs: Any = None,
    target_modules: tuple[str, ...] = DECODER_PROJECTIONS,
    base_model_name_or_path: str | None = None,
    progress: Callable[[str], None] | None = None,
):
    """Write a vLLM-valid PEFT LoRA for the adapter in `adapter_dir`; return the report.

    `rank` is per layer before rounding up (default: the source's rank), or "auto" with `tol`.
    `target_modules` are the module short names kept (vLLM's LLaMA set by default).
    """
    from rankwise.convert import REPORT_NAME, ConversionReport, _lora_model

    config, source = load_source(base_model, adapter_dir, "exported for vLLM")
    rank = default_rank(config) if rank is None else rank
    check_rank(rank, tol)
    report = ConversionReport(config.method_name, "auto" if rank == "auto" else "fixed", tol, target="vllm")
    factors, report.layers = factorize(source, rank, tol, progress)
    layers = dict(source.adapted_layers())
    kept = {}
    for name, (B, A) in factors.items():
        short = name.rsplit(".", 1)[-1]
        if layers[name].kind != "linear" or short not in target_modules:
            reason = "embedding" if layers[name].kind == "embedding" else f"not one of vLLM's LoRA targets {list(target_modules)}"
            report.dropped.append({"module": name, "reason": reason})
        else:
            kept[name] = (B, A)
    for name, _ in source.saved_modules():
        report.dropped.append({"module": name, "reason": "modules_to_save (a full trained copy): vLLM LoRA files cannot hold it"})
    if not kept:
        raise ConfigError(
            f"nothing to export for vLLM: the adapter changes {sorted(factors) or 'no layers'}, none of them a "
            f"projection vLLM applies LoRA to ({', '.join(target_modules)})"
        )
    if report.dropped:
        warnings.warn(
            "left out of the vLLM LoRA: " + "; ".join(f"{d['module']} ({d['reason']})" for d in report.dropped), stacklevel=2
        )
    r_file = vllm_rank(max(B.shape[1] for B, _ in kept.values()))
    report.file_rank = r_file
    kept = {name: pad_rank(B, A, r_file) for name, (B, A) in kept.items()}
    shorts = sorted({name.rsplit(".", 1)[-1] for name in kept})
    # Same-named projections the source left alone: zero factors, so the short-name targets match a complete file.
    for name, module in base_model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in shorts and name not in kept:
            kept[name] = (torch.zeros(module.out_features, r_file), torch.zeros(r_file, module.in_features))

    state = {}
    for name, (B, A) in sorted(kept.items()):
        state[f"base_model.model.{name}.lora_A.weight"] = A.cpu().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = B.cpu().contiguous()
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(base_model, "config", None), "name_or_path", None) or None
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r_file, "lora_alpha": r_file, "target_modules": shorts, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
    }
    report.lora_params = sum(t.numel() for t in state.values())
    from rankwise.core.io import read_weights

    report.source_params = sum(v.numel() for v in read_weights(adapter_dir).values())
    measure(report, source, _lora_model(base_model, source, kept, keep_saved=False), base_model, sample_inputs)

    with export_directory(output_dir) as stage:
        save_file(state, str(stage / "adapter_model.safetensors"), metadata={"format": "pt"})
        (stage / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
        (stage / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))
    return report
