"""Finding the layers a config targets, with errors that say what exists instead."""
from __future__ import annotations

import difflib

from torch import nn

from rankwise.core.config import AdapterConfig, matches_module
from rankwise.core.errors import TargetError
from rankwise.core.layer import AdaptedLayer, layer_kind

# Defaults when `target_modules` is None, keyed by transformers `model_type` (PEFT's choices).
DEFAULT_TARGETS = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}
# Output heads are never part of "all-linear" (PEFT's rule): adapting them rarely helps and breaks tied weights.
HEAD_NAMES = ("lm_head", "classifier", "score", "cls")


def candidate_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every wrappable layer by name; an already wrapped layer is listed under its own name, once."""
    found: dict[str, nn.Module] = {}
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip_prefixes):
            continue
        if isinstance(module, AdaptedLayer):
            found[name] = module
            skip_prefixes.append(name + ".")
        elif layer_kind(module) is not None and name:
            found[name] = module
    return found


def _kind(module: nn.Module) -> str:
    return module.kind if isinstance(module, AdaptedLayer) else layer_kind(module)


def _output_head_names(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if module is out or leaf in HEAD_NAMES:
            heads.add(name)
    return heads


def resolve_targets(model: nn.Module, config: AdapterConfig) -> dict[str, nn.Module]:
    """The layers `config` adapts, by name. Raises `TargetError` when nothing (usable) matches."""
    layers = candidate_layers(model)
    targets = config.target_modules
    method = config.method_name or type(config).__name__
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise TargetError(
                f"{method}: target_modules is not set and there is no default for model type {model_type!r}; "
                f"pass target_modules (e.g. {_suggest(layers)})"
            )
        targets = DEFAULT_TARGETS[model_type]
    if targets == "all-linear":
        heads = _output_head_names(model)
        chosen = {n: m for n, m in layers.items() if _kind(m) == "linear" and n not in heads}
    else:
        chosen = {n: m for n, m in layers.items() if matches_module(n, targets)}
    if config.exclude_modules is not None:
        chosen = {n: m for n, m in chosen.items() if not matches_module(n, config.exclude_modules)}
    if not chosen:
        wanted = targets if isinstance(targets, str) else ", ".join(targets)
        raise TargetError(f"{method}: target_modules={wanted!r} matched no layer. {_closest(targets, layers)}")
    unsupported = {n: _kind(m) for n, m in chosen.items() if _kind(m) not in config.supported_layers}
    if unsupported:
        first = next(iter(unsupported))
        raise TargetError(
            f"{method} cannot adapt {unsupported[first]} layer {first!r} ({len(unsupported)} such targets); "
            f"it supports {', '.join(config.supported_layers)} layers. Narrow target_modules or exclude_modules."
        )
    return chosen


def _suggest(layers: dict[str, nn.Module]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    return leaves[:8]


def _closest(targets, layers: dict[str, nn.Module]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    keys = [targets] if isinstance(targets, str) else list(targets)
    close = sorted({c for key in keys for c in difflib.get_close_matches(key.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.5)})
    hint = f"Closest layer names: {close}. " if close else ""
    return f"{hint}Adaptable layer names in this model: {leaves[:20]}{' ...' if len(leaves) > 20 else ''}"
