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
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from rankwise.compress._common import LowRankLinear, get_module, set_module
from rankwise.core.errors import CheckpointError, short_repr
from rankwise.core.io import atomic_directory, atomic_write, atomic_write_text

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


def _build(name: str, spec: dict[str, Any], device: str | None = None) -> nn.Module:
    """One module from its spec; a spec the builder cannot use is a `CheckpointError` naming the module."""
    try:
        if device is None:
            return MODULE_KINDS[spec["kind"]][2](spec)
        with torch.device(device):
            return MODULE_KINDS[spec["kind"]][2](spec)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"{STRUCTURE}: module {name!r} has an unusable spec {short_repr(spec)} ({short_repr(str(exc))})") from None


def apply_structure(model: nn.Module, structure: dict[str, dict[str, Any]],
                    file_shapes: dict[str, tuple[int, ...]] | None = None) -> nn.Module:
    """Replace modules of `model` whose kind or shape differs from `structure` by freshly built ones.

    With `file_shapes` (the weights file's header), each module is first built on the meta device and its
    tensor shapes compared with the file, so a damaged spec (say in=10**12) is refused before any allocation.
    """
    dtype = next(model.parameters()).dtype
    for name, spec in structure.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind not in MODULE_KINDS:
            raise CheckpointError(f"{STRUCTURE}: module {name!r} has unknown kind {short_repr(kind)}: newer rankwise version?")
        try:
            current = get_module(model, name)
        except (AttributeError, IndexError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{STRUCTURE}: module {name!r} does not exist in {type(model).__name__}") from exc
        if _kind_of(current) == kind and _spec_of(current, kind) == spec:
            continue
        if file_shapes is not None:
            for key, tensor in _build(name, spec, "meta").state_dict().items():
                saved = file_shapes.get(f"{name}.{key}")
                if saved != tuple(tensor.shape):
                    raise CheckpointError(f"{STRUCTURE}: module {name!r} {short_repr(spec)} needs {name}.{key} of shape "
                                          f"{tuple(tensor.shape)}, {WEIGHTS} has {saved}: the files do not belong together")
        set_module(model, name, _build(name, spec).to(dtype))
    return model


def _check_schema(meta: Any, path: Path) -> dict[str, Any]:
    """`compression.json` must be what `save_compressed` writes; anything else is a `CheckpointError` naming the key."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(meta).__name__}")
    expected = {"format_version": int, "model_class": str, "method": (str, type(None)), "method_config": dict, "modules": dict}
    for key, kind in expected.items():
        if key not in meta:
            raise CheckpointError(f"{path} lacks {key!r}: not a file written by `rankwise compress`, or damaged")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"{path}: {key}={short_repr(meta[key])} has the wrong type; the file is damaged")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is not {FORMAT_VERSION}: written by another rankwise version")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise CheckpointError(f"{path}: modules[{short_repr(name)}]={short_repr(spec)} must be an object with a 'kind'")
        for field, value in spec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not -1 <= value < 2**40:
                raise CheckpointError(f"{path}: modules[{short_repr(name)}].{field}={short_repr(value)} is out of range")
    return meta


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError) on damaged headers
        raise CheckpointError(f"cannot read {path}: {short_repr(str(exc))}; the file is truncated or corrupted") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, method_config: dict[str, Any] | None = None,
                    method: str | None = None) -> int:
    """Write the compressed model to `out_dir`; returns the weights file size in bytes.

    The three files are staged in a sibling directory swapped in at once (`atomic_directory`): a crash leaves
    the previous compressed model complete, never new weights beside an old structure.
    """
    out = Path(out_dir)
    with atomic_directory(out) as stage:
        atomic_write(stage / WEIGHTS, lambda tmp: save_model(model, tmp, metadata={"format": "pt", "rankwise": "compressed"}))
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _write_json(stage / HF_CONFIG, config.to_dict())
        _write_json(stage / STRUCTURE, {
            "format_version": FORMAT_VERSION,
            "model_class": type(model).__name__,
            "method": method,
            "method_config": method_config or {},
            "modules": model_structure(model),
        })
    return (out / WEIGHTS).stat().st_size


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
    except RecursionError:
        raise CheckpointError(f"{root / STRUCTURE} is nested too deeply: the file is damaged") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{root / STRUCTURE} cannot be read as JSON ({short_repr(str(exc))})") from None
    meta = _check_schema(meta, root / STRUCTURE)
    shapes = _header_shapes(root / WEIGHTS)
    if model is None:
        model = _build_transformers_model(root, meta["model_class"], shapes, meta["modules"])
    apply_structure(model, meta["modules"], shapes)
    try:
        missing, unexpected = load_model(model, str(root / WEIGHTS), strict=False)
    except Exception as exc:  # safetensors raises plain errors on truncated/corrupt files and shape mismatches
        raise CheckpointError(f"cannot load {root / WEIGHTS}: {exc}") from exc
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS} does not match the recorded structure: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _build_transformers_model(root: Path, class_name: str | None, shapes: dict | None = None,
                              structure: dict | None = None) -> nn.Module:
    if not (root / HF_CONFIG).exists() or not class_name:
        raise CheckpointError(f"{root} has no {HF_CONFIG}: pass `model=` (a fresh model of the original architecture)")
    import transformers

    # Only a model class: any other top-level transformers callable (a pipeline, a trainer...) is refused.
    cls = getattr(transformers, class_name, None) if class_name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{STRUCTURE}: model_class {short_repr(class_name)} is not a transformers PreTrainedModel "
                              "class; the file is damaged (or pass `model=` a fresh model of the original architecture)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(root))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{root / HF_CONFIG} cannot be read as a transformers config ({short_repr(str(exc))})") from None
    if shapes is not None:
        # Build on the meta device first (no memory): a damaged config.json (hidden_size=10**9) is refused here,
        # by comparing every tensor shape with the weights file's header, not by the allocator.
        try:
            with torch.device("meta"):
                probe = cls(config)
                dense_bytes = sum(t.numel() * t.element_size() for t in probe.state_dict().values())
                probe = apply_structure(probe, structure or {}, shapes)
        except CheckpointError:
            raise
        except Exception as exc:  # a config transformers itself cannot build a model from
            raise CheckpointError(f"{root / HF_CONFIG} does not build a {class_name} ({short_repr(str(exc))})") from None
        # The architecture is built dense before its compressed modules are swapped in: it must fit in memory.
        memory = _physical_memory()
        if memory and dense_bytes > memory:
            raise CheckpointError(f"{root / HF_CONFIG} describes a {class_name} of {dense_bytes / 2**30:,.0f} GiB before "
                                  f"compression, more than this machine's {memory / 2**30:,.0f} GiB: the files do not "
                                  "belong together or config.json is damaged")
        wrong = [f"{k} {tuple(v.shape)} vs {shapes[k]}" for k, v in probe.state_dict().items() if k in shapes and tuple(v.shape) != shapes[k]]
        if wrong:
            raise CheckpointError(f"{root / HF_CONFIG} and {WEIGHTS} do not belong together: {wrong[:3]}")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    model = cls(config)
    return model.to(dtype) if isinstance(dtype, torch.dtype) else model
