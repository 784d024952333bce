"""Save and reload compressed models: `model.safetensors` + `config.json` + `compression.json`, no pickles.

`compression.json` records the structure of every linear/embedding-like module (kind and shapes);
the loader rebuilds the original architecture from `config.json`, swaps in modules of the recorded
kinds and shapes, then loads the tensors strictly. Low-rank layers stay as their two factors.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from rankwise.compress._common import LowRankLinear, get_module, set_module
from rankwise.core.errors import CheckpointError
from rankwise.core.io import atomic_write, atomic_write_text

FORMAT_VERSION = 1
WEIGHTS, STRUCTURE, HF_CONFIG = "model.safetensors", "compression.json", "config.json"


def _linear_spec(m: nn.Linear) -> dict[str, Any]:
    return {"kind": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}


def _embedding_spec(m: nn.Embedding) -> dict[str, Any]:
    return {"kind": "embedding", "num": m.num_embeddings, "dim": m.embedding_dim, "padding_idx": m.padding_idx}


# kind -> (class, spec(module), build(spec)); compressors with their own module types add entries here
MODULE_KINDS: dict[str, tuple[type, Callable[[nn.Module], dict], Callable[[dict], nn.Module]]] = {
    "linear": (nn.Linear, _linear_spec, lambda s: nn.Linear(s["in"], s["out"], bias=s["bias"])),
    "embedding": (nn.Embedding, _embedding_spec,
                  lambda s: nn.Embedding(s["num"], s["dim"], padding_idx=s["padding_idx"])),
    "low_rank": (LowRankLinear, LowRankLinear.spec, LowRankLinear.from_spec),
}


def register_module_kind(kind: str, cls: type, spec: Callable[[nn.Module], dict], build: Callable[[dict], nn.Module]) -> None:
    MODULE_KINDS[kind] = (cls, spec, build)


def _kind_of(module: nn.Module) -> str | None:
    # exact type match first so subclasses (e.g. a compressed module built on nn.Linear) get their own kind
    for kind, (cls, _spec, _build) in MODULE_KINDS.items():
        if type(module) is cls:
            return kind
    return None


def _spec_of(module: nn.Module, kind: str) -> dict[str, Any]:
    return {**MODULE_KINDS[kind][1](module), "kind": kind}


def model_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """`{module name: spec}` for every module of a known kind (children of a recorded module are implied)."""
    structure: dict[str, dict[str, Any]] = {}
    composite: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in composite):
            continue
        kind = _kind_of(module)
        if kind is None:
            continue
        structure[name] = _spec_of(module, kind)
        if kind not in ("linear", "embedding"):
            composite.append(name)
    return structure


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace modules of `model` whose kind or shape differs from `structure` by freshly built ones."""
    dtype = next(model.parameters()).dtype
    for name, spec in structure.items():
        kind = spec.get("kind")
        if kind not in MODULE_KINDS:
            raise CheckpointError(f"{STRUCTURE}: module {name!r} has unknown kind {kind!r}: newer rankwise version?")
        try:
            current = get_module(model, name)
        except AttributeError as exc:
            raise CheckpointError(f"{STRUCTURE}: module {name!r} does not exist in {type(model).__name__}") from exc
        if _kind_of(current) == kind and _spec_of(current, kind) == spec:
            continue
        set_module(model, name, MODULE_KINDS[kind][2](spec).to(dtype))
    return model


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, method_config: dict[str, Any] | None = None,
                    method: str | None = None) -> int:
    """Write the compressed model to `out_dir`; returns the weights file size in bytes.

    Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS
    atomic_write(weights, lambda tmp: save_model(model, tmp, metadata={"format": "pt", "rankwise": "compressed"}))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        _write_json(out / HF_CONFIG, config.to_dict())
    _write_json(out / STRUCTURE, {
        "format_version": FORMAT_VERSION,
        "model_class": type(model).__name__,
        "method": method,
        "method_config": method_config or {},
        "modules": model_structure(model),
    })
    return weights.stat().st_size


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Reload a directory written by `save_compressed`.

    Transformers models are rebuilt from `config.json`; for any other model pass a freshly built
    `model` of the original architecture and it is restructured in place.
    """
    root = Path(path)
    for name in (WEIGHTS, STRUCTURE):
        if not (root / name).exists():
            raise CheckpointError(f"{root / name} is missing: is {root} a directory written by `rankwise compress`?")
    try:
        meta = json.loads((root / STRUCTURE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{root / STRUCTURE} is not valid JSON ({exc})") from exc
    if model is None:
        model = _build_transformers_model(root, meta.get("model_class"))
    apply_structure(model, meta.get("modules", {}))
    try:
        missing, unexpected = load_model(model, str(root / WEIGHTS), strict=False)
    except Exception as exc:  # safetensors raises plain errors on truncated/corrupt files and shape mismatches
        raise CheckpointError(f"cannot load {root / WEIGHTS}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS} does not match the recorded structure: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def _build_transformers_model(root: Path, class_name: str | None) -> nn.Module:
    if not (root / HF_CONFIG).exists() or not class_name:
        raise CheckpointError(f"{root} has no {HF_CONFIG}: pass `model=` (a fresh model of the original architecture)")
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise CheckpointError(f"{STRUCTURE}: model_class {class_name!r} is not a transformers class")
    config = transformers.AutoConfig.from_pretrained(str(root))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    model = cls(config)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model
