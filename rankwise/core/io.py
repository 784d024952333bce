"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, PEFT's layout.

Keys are `base_model.model.<module path>.<adapter key>` without the adapter name, as PEFT writes
them; an adapter other than the first is saved in a sub-directory named after it. Files are written
atomically; loading validates every key and shape before touching the model (an adapter may first refuse
its entries or resize to them, `Adapter.prepare_load`).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankwise.core.config import AdapterConfig
from rankwise.core.errors import CheckpointError, ConfigError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "rankwise_shared."


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory and `os.replace` it: a crash leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def adapter_state_dict(model, adapter_name: str) -> dict[str, torch.Tensor]:
    """File key -> tensor for one adapter (shared tensors once, under `rankwise_shared.` unless renamed)."""
    state: dict[str, torch.Tensor] = {}
    for module_name, layer in model.adapted_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        for key, tensor in adapter.state_dict().items():
            state[f"{PREFIX}{module_name}.{adapter.save_key(key)}"] = tensor
    if adapter_name in model.shared:
        shared = model.shared[adapter_name]
        save_key = getattr(shared, "save_key", lambda k: SHARED_PREFIX + k)
        # `file_key` (optional) spells the whole key, for formats that keep shared tensors outside `base_model.model.`.
        file_key = getattr(shared, "file_key", lambda k: PREFIX + save_key(k))
        for key, tensor in shared.state_dict().items():
            state[file_key(key)] = tensor
    for module_name, module in model.saved_modules():
        if adapter_name in module.modules_to_save:
            for key, tensor in module.modules_to_save[adapter_name].state_dict().items():
                state[f"{PREFIX}{module_name}.{key}"] = tensor  # PEFT writes the copy under the module's own name
    return state


def save_adapter(model, directory, adapter_names: list[str] | None = None) -> None:
    directory = Path(directory)
    names = list(model.configs) if adapter_names is None else adapter_names
    first = next(iter(model.configs))
    for name in names:
        if name not in model.configs:
            raise ConfigError(f"cannot save unknown adapter {name!r}; known: {list(model.configs)}")
        target = directory if name == first else directory / name
        state, seen = {}, set()
        for key, tensor in adapter_state_dict(model, name).items():
            tensor = tensor.detach().contiguous().cpu()
            # safetensors refuses tensors sharing storage (a shared tensor listed under several keys): clone repeats.
            pointer = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
            state[key] = tensor.clone() if pointer in seen else tensor
            seen.add(pointer)
        config_dict = model.configs[name].to_dict()
        config_dict["inference_mode"] = True
        atomic_write(target / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_text(target / CONFIG_NAME, json.dumps(config_dict, indent=2))


def read_config(directory, strict: bool = True) -> AdapterConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {Path(directory)}: not an adapter directory (save one with model.save_adapter)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is corrupted or truncated") from None
    return AdapterConfig.from_dict(data, strict=strict)


def read_weights(directory) -> dict[str, torch.Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (PEFT .bin pickles are not read: re-save with safe_serialization=True)" if (Path(directory) / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"no {WEIGHTS_NAME} in {Path(directory)}{hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors ({err}); the file is truncated or corrupted") from None


def _prepare_adapters(model, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    """Show each adapter its file entries first (`Adapter.prepare_load`): it may refuse them or resize to them."""
    for module_name, layer in model.adapted_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        prefix = f"{PREFIX}{module_name}."
        keys = {key: prefix + adapter.save_key(key) for key in adapter.state_dict()}
        adapter.prepare_load({key: weights[file_key] for key, file_key in keys.items() if file_key in weights}, layer)


def _check_and_load(model, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    _prepare_adapters(model, adapter_name, weights)
    expected = adapter_state_dict(model, adapter_name)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''} ({len(unexpected)})")
        raise CheckpointError(f"adapter file does not fit this model: {'; '.join(parts)}. Was it saved from another model or config?")
    for key, tensor in expected.items():
        if tuple(weights[key].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"shape mismatch for {key}: file has {tuple(weights[key].shape)}, model expects {tuple(tensor.shape)} "
                "(adapter saved from a different model?)"
            )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(weights[key])


def load_adapter_into(model, directory, adapter_name: str = "default", strict: bool = True) -> None:
    """Add the adapter saved in `directory` to an `AdaptedModel`; on any error the model is unchanged."""
    config = read_config(directory, strict=strict)
    weights = read_weights(directory)
    model.add_adapter(adapter_name, config)
    try:
        _check_and_load(model, adapter_name, weights)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def load_adapter(base_model, directory, adapter_name: str = "default", strict: bool = True, is_trainable: bool = False):
    """Load a saved adapter onto `base_model` and return the `AdaptedModel` (frozen unless `is_trainable`).

    On any error `base_model` is left exactly as it was.
    """
    from rankwise.core.model import AdaptedModel

    config = read_config(directory, strict=strict)
    weights = read_weights(directory)
    model = AdaptedModel(base_model, config, adapter_name)
    try:
        _check_and_load(model, adapter_name, weights)
    except Exception:
        model.unload()
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
