"""Save and reload compressed models, no pickles. Two layouts, recorded in `compression.json`:

* **transformers layout** — the compressed model is still the original architecture with dense `nn.Linear` /
  `nn.Embedding` layers of the original shapes (a method that only rewrites weights, or `dense=True`, which
  multiplies every compressed layer back into a dense one and so gives up the size gain). The directory is a
  plain transformers directory (`save_pretrained`): `AutoModelForCausalLM.from_pretrained(dir)` gives the same
  outputs, and `compression.json` is only a record.

        out/  config.json  model.safetensors  compression.json  (tokenizer files)

* **rankwise layout** — layers stay factored (low-rank, gathered, scattered... any registered module kind).
  transformers cannot rebuild them, so it must refuse the directory instead of loading it with those weights
  randomly initialised: `config.json` carries `model_type` = `LOADER_POINTER` (the original one is kept under
  `rankwise_model_type`), which makes every `AutoConfig`/`AutoModel*.from_pretrained(dir)` raise transformers'
  "model type `...` not recognised" error whose text names `rankwise.compress.load_compressed`; and the
  weights are in `rankwise_model.safetensors`, a name transformers never opens, so a concrete class
  (`LlamaForCausalLM.from_pretrained(dir)`) fails with "no file named model.safetensors" instead of
  loading random weights. Tokenizer files stay standard (`AutoTokenizer.from_pretrained(dir)` works).

        out/  config.json (model_type = pointer)  rankwise_model.safetensors  compression.json  (tokenizer)

`compression.json` records the structure of every linear/embedding-like module (kind and shapes); the loader
rebuilds the original architecture from `config.json`, swaps in modules of the recorded kinds and shapes,
then loads the tensors strictly. Format 1 directories (before the layouts: original `config.json`, factors in
`model.safetensors`) still load through `load_compressed`.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from rankwise.compress._common import LowRankLinear, get_module, set_module
from rankwise.core.errors import CheckpointError, ConfigError, short_repr
from rankwise.core.io import atomic_directory, atomic_write, atomic_write_text

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1 dirs exist on users' disks: keep loading them
WEIGHTS, STRUCTURE, HF_CONFIG = "model.safetensors", "compression.json", "config.json"
FACTOR_WEIGHTS = "rankwise_model.safetensors"  # rankwise layout: a weights name transformers never looks for
LAYOUTS = {"transformers": WEIGHTS, "rankwise": FACTOR_WEIGHTS}
ORIGINAL_MODEL_TYPE = "rankwise_model_type"
# transformers prints the model_type verbatim in its "does not recognize this architecture" error: this is
# the sentence a user of plain `AutoModel.from_pretrained(dir)` reads
LOADER_POINTER = ("rankwise-compressed, not loadable by transformers alone: load it with "
                  "rankwise.compress.load_compressed(dir)")


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
    if meta["format_version"] not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: format_version {meta['format_version']} is not one of {READABLE_VERSIONS}: "
                              "written by another rankwise version")
    if meta["format_version"] >= 2 and meta.get("layout") not in LAYOUTS:
        raise CheckpointError(f"{path}: layout={short_repr(meta.get('layout'))} is not one of {sorted(LAYOUTS)}; "
                              "the file is damaged")
    for name, spec in meta["modules"].items():
        if not isinstance(spec, dict) or not isinstance(spec.get("kind"), str):
            raise CheckpointError(f"{path}: modules[{short_repr(name)}]={short_repr(spec)} must be an object with a 'kind'")
        for field, value in spec.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not -1 <= value < 2**40:
                raise CheckpointError(f"{path}: modules[{short_repr(name)}].{field}={short_repr(value)} is out of range")
    return meta


def weights_file(meta: dict[str, Any]) -> str:
    """The weights file name of a checked `compression.json` (format 1 had only `model.safetensors`)."""
    return WEIGHTS if meta["format_version"] == 1 else LAYOUTS[meta["layout"]]


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types (and OSError) on damaged headers
        raise CheckpointError(f"cannot read {path}: {short_repr(str(exc))}; the file is truncated or corrupted") from None


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def _original_architecture(model: nn.Module) -> nn.Module | None:
    """A fresh, meta-device model of `model`'s transformers class and config (no memory), or None."""
    config = getattr(model, "config", None)
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if not isinstance(model, PreTrainedModel) or config is None:
        return None
    try:
        with torch.device("meta"):
            return type(model)(copy.deepcopy(config))
    except Exception:  # a model transformers cannot rebuild from its own config is not a transformers layout
        return None


def _embeddings_tied_as_configured(model: nn.Module) -> bool:
    """transformers re-ties input and output embeddings on load when the config says so: they must be one tensor."""
    config = model.config
    tie = getattr(config, "tie_word_embeddings", False)
    if hasattr(config, "get_text_config"):
        tie = getattr(config.get_text_config(), "tie_word_embeddings", tie)
    if not tie:
        return True
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None:
        return True
    weight_in, weight_out = getattr(inputs, "weight", None), getattr(outputs, "weight", None)
    return isinstance(weight_in, torch.Tensor) and weight_in is weight_out


def transformers_loadable(model: nn.Module) -> bool:
    """True when `save_pretrained` of `model` reloads in plain transformers with the same outputs: the model is
    its class's original architecture (same state-dict keys and shapes, only `linear`/`embedding` modules)."""
    fresh = _original_architecture(model)
    if fresh is None:
        return False
    if any(spec["kind"] not in ("linear", "embedding") for spec in model_structure(model).values()):
        return False
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return ours == theirs and _embeddings_tied_as_configured(model)


def densified(model: nn.Module) -> nn.Module:
    """A copy of `model` with every compressed layer multiplied back into the original dense layer.

    Generic over module kinds: each recorded non-standard module is probed as an affine map
    (`rankwise.linalg.affine_map_of`) and replaced by an `nn.Linear` / `nn.Embedding` of the shape the
    original architecture has at that name. The outputs are unchanged (up to float rounding), the size gain is
    lost. A layer that is not affine (AFM's +Act) cannot be densified: `ConfigError` naming it.
    """
    from rankwise.linalg import affine_map_of

    fresh = _original_architecture(model)
    if fresh is None:
        raise ConfigError(f"dense=True needs a transformers model (rebuilt from its config), not {type(model).__name__}")
    out = copy.deepcopy(model)
    for name, spec in model_structure(out).items():
        if spec["kind"] in ("linear", "embedding"):
            continue
        module, original = get_module(out, name), get_module(fresh, name)
        reference = next(iter(module.parameters()), None)
        dtype, device = (reference.dtype, reference.device) if reference is not None else (torch.float32, "cpu")
        if isinstance(original, nn.Linear):
            found = affine_map_of(module, original.in_features)
            if found is None or found[0].shape != original.weight.shape:
                raise ConfigError(f"dense=True: module {name!r} ({spec['kind']}) is not a linear map of shape "
                                  f"{tuple(original.weight.shape)} (a nonlinear factorisation such as AFM +Act); save "
                                  "without --save-dense and load it with rankwise.compress.load_compressed")
            weight, bias = found
            if original.bias is None and bias.abs().max() > 1e-6 * (1 + weight.abs().max()):
                raise ConfigError(f"dense=True: module {name!r} ({spec['kind']}) has a bias the original "
                                  "nn.Linear has no room for; save without --save-dense")
            dense = nn.Linear(original.in_features, original.out_features, bias=original.bias is not None,
                              device=device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if dense.bias is not None:
                    dense.bias.copy_(bias)
        elif isinstance(original, nn.Embedding):
            with torch.no_grad():
                table = copy.deepcopy(module).double()(torch.arange(original.num_embeddings, device=device))
            if tuple(table.shape) != tuple(original.weight.shape):
                raise ConfigError(f"dense=True: module {name!r} ({spec['kind']}) gives a table of shape "
                                  f"{tuple(table.shape)}, the original embedding is {tuple(original.weight.shape)}")
            dense = nn.Embedding(original.num_embeddings, original.embedding_dim, padding_idx=original.padding_idx,
                                 device=device, dtype=dtype)
            with torch.no_grad():
                dense.weight.copy_(table)
        else:
            raise ConfigError(f"dense=True: module {name!r} replaced a {type(original).__name__}, which rankwise "
                              "cannot densify; save without --save-dense")
        set_module(out, name, dense)
    if not _embeddings_tied_as_configured(out):
        # one side of a tied pair was compressed: the dense copy keeps both tables, so the config must untie them
        out.config.tie_word_embeddings = False
        if hasattr(out.config, "get_text_config"):
            out.config.get_text_config().tie_word_embeddings = False
    return out


def _pointer_config(config) -> dict[str, Any]:
    """The config dict with `model_type` replaced by the loader pointer (the original kept beside it)."""
    data = config.to_dict()
    data[ORIGINAL_MODEL_TYPE] = data.get("model_type") or getattr(config, "model_type", None)
    data["model_type"] = LOADER_POINTER
    return data


def save_compressed(model: nn.Module, out_dir: str | os.PathLike, method_config: dict[str, Any] | None = None,
                    method: str | None = None, dense: bool = False) -> int:
    """Write the compressed model to `out_dir`; returns the weights file size in bytes.

    The transformers layout is used whenever the model is its original architecture (always with
    `dense=True`); otherwise the rankwise layout, which plain transformers refuses with a pointer to
    `load_compressed` (see the module docstring). The files are staged in a sibling directory swapped in at once
    (`atomic_directory`): a crash leaves the previous compressed model complete, never new weights beside an
    old structure.
    """
    if dense:
        model = densified(model)
        if not transformers_loadable(model):
            raise ConfigError(f"dense=True: the densified {type(model).__name__} still has layers of other shapes than "
                              "its config describes (a structured pruning such as ModeGPT's narrower MLPs); save without "
                              "--save-dense and load it with rankwise.compress.load_compressed")
    layout = "transformers" if transformers_loadable(model) else "rankwise"
    out = Path(out_dir)
    with atomic_directory(out) as stage:
        if layout == "transformers":
            # one file, so `load_compressed` and every transformers version read the same thing
            model.save_pretrained(str(stage), max_shard_size="10000GB")
            if not (stage / WEIGHTS).is_file():
                raise CheckpointError(f"save_pretrained did not write {WEIGHTS} in {stage}")
        else:
            atomic_write(stage / FACTOR_WEIGHTS,
                         lambda tmp: save_model(model, tmp, metadata={"format": "pt", "rankwise": "compressed"}))
            config = getattr(model, "config", None)
            if config is not None and hasattr(config, "to_dict"):
                _write_json(stage / HF_CONFIG, _pointer_config(config))
        _write_json(stage / STRUCTURE, {
            "format_version": FORMAT_VERSION,
            "layout": layout,
            "model_class": type(model).__name__,
            "method": method,
            "method_config": method_config or {},
            "dense": bool(dense),
            "modules": model_structure(model),
        })
    return (out / LAYOUTS[layout]).stat().st_size


def is_compressed_dir(path: str | os.PathLike) -> bool:
    """True for a directory written by `save_compressed` (any format version)."""
    return (Path(path) / STRUCTURE).is_file()


def read_structure(root: Path) -> dict[str, Any]:
    """The checked `compression.json` of a compressed directory."""
    if not (root / STRUCTURE).exists():
        raise CheckpointError(f"{root / STRUCTURE} is missing: is {root} a directory written by `rankwise compress`?")
    return _check_schema(_read_json(root / STRUCTURE), root / STRUCTURE)


def _read_json(path: Path) -> Any:
    """A JSON file of a compressed directory; a damaged one is a `CheckpointError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply: the file is damaged") from None
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise CheckpointError(f"{path} cannot be read as JSON ({short_repr(str(exc))})") from None


def load_compressed(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Reload a directory written by `save_compressed` (format 1 or 2, either layout).

    Transformers models are rebuilt from `config.json`; for any other model pass a freshly built
    `model` of the original architecture and it is restructured in place.
    """
    root = Path(path)
    meta = read_structure(root)
    weights = root / weights_file(meta)
    if not weights.exists():
        raise CheckpointError(f"{weights} is missing: is {root} a directory written by `rankwise compress`?")
    shapes = _header_shapes(weights)
    if model is None:
        model = _build_transformers_model(root, meta["model_class"], shapes, meta["modules"])
    apply_structure(model, meta["modules"], shapes)
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except Exception as exc:  # safetensors raises plain errors on truncated/corrupt files and shape mismatches
        raise CheckpointError(f"cannot load {weights}: {exc}") from exc
    if meta.get("layout") == "transformers":
        # save_pretrained drops the second name of tied tensors; the model's own tie covers them
        pointers: dict[int, int] = {}
        for tensor in model.state_dict().values():
            pointers[tensor.data_ptr()] = pointers.get(tensor.data_ptr(), 0) + 1
        missing = [k for k in missing if pointers[model.state_dict()[k].data_ptr()] < 2]
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the recorded structure: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def read_hf_config(root: Path):
    """The transformers config of a compressed directory, with the original `model_type` restored."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    data = _read_json(root / HF_CONFIG)
    if not isinstance(data, dict):
        raise CheckpointError(f"{root / HF_CONFIG} must hold a JSON object")
    if ORIGINAL_MODEL_TYPE in data:
        data["model_type"] = data.pop(ORIGINAL_MODEL_TYPE)
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise CheckpointError(f"{root / HF_CONFIG}: model_type {short_repr(model_type)} is not a transformers "
                              f"architecture of this version ({transformers.__version__})")
    try:
        return CONFIG_MAPPING[model_type].from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{root / HF_CONFIG} cannot be read as a transformers config ({short_repr(str(exc))})") from None


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
    config = read_hf_config(root)
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
