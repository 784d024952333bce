"""Merged model directory: the adapter folded into the base weights, saved as a plain transformers model.

    base W (out x in) ──┐
                        ├─ W' = W + ΔW   (merge_and_unload, safe merge)  ── save_pretrained(OUT) + tokenizer
    adapter ΔW ─────────┘

`AutoModelForCausalLM.from_pretrained(OUT)` (or the base's own class) then gives the adapted model's
outputs with no rankwise installed. The export reloads OUT and measures that on sample inputs.

Tied embeddings: when the input embedding and the output head share one weight and the adapter changes
either (an adapter on `embed_tokens` or `lm_head`, or either in `modules_to_save`), merging into the
shared tensor would change both. The export unties them first (the head gets its own copy, the config
says `tie_word_embeddings: false`) and says so in the report.

    report = export_merged(base, "runs/lora/adapter", "runs/merged", tokenizer=tok, sample_inputs=batch)
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.export.common import (
    export_directory,
    load_source,
    measure,
    module_touches,
    tied_embedding_names,
)


def export_merged(
    base_model: nn.Module,
    adapter_dir: str | Path,
    output_dir: str | Path,
    tokenizer: Any = None,
    sample_inputs: Any = None,
    dtype: torch.dtype | None = None,
):
    """Write `output_dir`: `base_model` with the adapter in `adapter_dir` merged in; return the report.

    `base_model` (a transformers `PreTrainedModel`) is not modified. `tokenizer`, when given, is saved with
    the model. `dtype` is the stored weight type (default: the base's). Errors are measured against the
    adapter on `base_model` as given, so a bf16 export shows what rounding W + ΔW to bf16 loses (an update
    smaller than bf16's resolution of W would vanish: the report then says so). The directory is built next
    to `output_dir` and moved into place when complete.
    """
    from rankwise.convert import REPORT_NAME, ConversionReport, LayerReport

    if not hasattr(base_model, "save_pretrained"):
        raise ConfigError(
            f"a merged export needs a transformers model (with save_pretrained); got {type(base_model).__name__}"
        )
    output_dir = Path(output_dir)
    notes: list[str] = []
    config, reference = load_source(base_model, adapter_dir, "merged")  # the adapted model, un-merged: the yardstick
    base = copy.deepcopy(base_model).eval()
    if dtype is not None:
        base = base.to(dtype)
    tied = tied_embedding_names(base)
    changed = [name for name, _ in [*reference.adapted_layers(), *reference.saved_modules()]]
    touched = [name for name in changed if module_touches(name, tied)]
    if touched:
        # Merging into the shared tensor would change the embedding and the head alike: give the head its own copy.
        _untie(base)
        notes.append(
            f"untied the input embedding and output head ({', '.join(tied)}): the adapter changes {', '.join(touched)}; "
            "the merged model stores both (tie_word_embeddings: false)"
        )
    _, source = load_source(base, adapter_dir, "merged")
    report = ConversionReport(config.method_name, "merged", None, target="merged", notes=notes)
    layers = dict(reference.adapted_layers())
    deltas = reference.delta_weights("default")
    expected = {}
    with torch.no_grad():
        for name, delta in deltas.items():
            expected[name] = layers[name].weight_matrix().float() + delta.float()
    merged = source.merge_and_unload(safe_merge=True)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, want in expected.items():
            got = _canonical(modules[name], layers[name]).float()
            error = float((got - want).norm() / deltas[name].float().norm().clamp_min(1e-30))
            shape = list(want.shape)
            report.layers.append(LayerReport(name, layers[name].kind, shape, min(shape[0], want[0].numel()), error))
    if report.max_relative_error > 0.01:
        worst = max(report.layers, key=lambda layer: layer.relative_error)
        stored = next(p for p in merged.parameters()).dtype
        report.notes.append(
            f"stored in {str(stored).replace('torch.', '')}, rounding W + ΔW loses up to {worst.relative_error:.0%} of a layer's "
            f"update ({worst.module}); export with dtype float32 to keep it"
        )
    from rankwise.core.io import read_weights

    report.source_params = sum(v.numel() for v in read_weights(adapter_dir).values())
    report.lora_params = sum(p.numel() for p in merged.parameters())  # the whole model: what a merged export holds

    with export_directory(output_dir) as stage:
        merged.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        else:
            report.notes.append("no tokenizer was given: the directory holds the model only (pass --model DIR with one)")
        if sample_inputs is not None:
            reloaded = type(merged).from_pretrained(stage).eval()
            measure(report, reference, reloaded, base_model, sample_inputs)
        (stage / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))
    return report


def _untie(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda **_: None)(decoder=True)
    if text_config is not None and hasattr(text_config, "tie_word_embeddings"):
        text_config.tie_word_embeddings = False


def _canonical(module: nn.Module, layer) -> torch.Tensor:
    w = module.weight
    return w.T if (layer.transposed or layer.kind == "embedding") else w
