"""Adapter files: `adapter_config.json` + `adapter_model.safetensors`, PEFT's layout.

Keys are `base_model.model.<module path>.<adapter key>` without the adapter name, as PEFT writes
them; an adapter other than the first is saved in a sub-directory named after it. Files are written
atomically; loading validates every key and shape before touching the model (an adapter may first refuse
its entries or resize to them, `Adapter.prepare_load`).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankwise.core.config import AdapterConfig
from rankwise.core.errors import CheckpointError, ConfigError, short_repr

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
SHARED_PREFIX = "rankwise_shared."


# Names of what an interrupted save can leave behind: `atomic_write`'s temp files (`.<name>.<8 random chars>`,
# mkstemp's pattern), a staged directory (`.<dir>.saving-<random>`) and a swapped-out old one (`.<dir>.old-<random>`).
_TEMP_FILE = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]{8}$")
_STAGED_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<what>saving|old)-[A-Za-z0-9_]{8}$")


def _umask() -> int:
    """The process umask (read without changing it where /proc allows; files get 0o666 & ~umask, as `open` gives)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory, name: str | None = None) -> list[Path]:
    """Delete what interrupted saves left in `directory` (for the file or directory `name`, or for every name).

    A swapped-out old directory whose target is missing (a crash between the two renames of a directory swap)
    is renamed back instead: it is the last complete save. Returns the paths removed or restored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    touched = []
    for entry in directory.iterdir():
        staged = _STAGED_DIR.match(entry.name)
        if staged and entry.is_dir() and (name is None or staged["name"] == name):
            target = directory / staged["name"]
            if staged["what"] == "old" and not target.exists():
                os.rename(entry, target)
            else:
                shutil.rmtree(entry, ignore_errors=True)
            touched.append(entry)
            continue
        temp = _TEMP_FILE.match(entry.name)
        if temp and entry.is_file() and (name is None or temp["name"] == name) and not _STAGED_DIR.match(entry.name):
            entry.unlink(missing_ok=True)
            touched.append(entry)
    return touched


def atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same directory and `os.replace` it: a crash leaves the old file.

    The file gets the user's umask (0644 typically; mkstemp alone would leave 0600), and temp files of the
    same name left by an earlier crash are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if not any(_STAGED_DIR.match(p.name) for p in path.parents):  # a staged directory syncs its files itself
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _link_tree(source: Path, destination: Path) -> None:
    """Carry an entry of the old directory into the staged one: hard links (no copy), copies where linking fails."""
    if source.is_dir() and not source.is_symlink():
        destination.mkdir()
        for child in source.iterdir():
            _link_tree(child, destination / child.name)
        return
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _swap_in(stage: Path, target: Path) -> None:
    if not target.exists():
        os.rename(stage, target)
        return
    if _exchange(stage, target):
        shutil.rmtree(stage, ignore_errors=True)  # `stage` now holds the old directory
        return
    # Two renames: a crash between them leaves the old save as `.<name>.old-*`, which the next save or load
    # (`remove_stale_temps`) renames back.
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rmdir(old)
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target, keep_other_entries: bool = True):
    """Write a whole directory at once: yields an empty staged sibling, swapped in place of `target` on success.

        with atomic_directory("out/adapter") as stage:      # out/.adapter.saving-XXXXXXXX/
            write(stage / "adapter_config.json"); write(stage / "adapter_model.safetensors")
        # out/adapter/ now holds both new files, or (after a crash or an exception) both old ones

    Entries of the old directory the new save does not write (other adapters' sub-directories, user files)
    are carried over as hard links when `keep_other_entries`. Leftovers of interrupted saves are removed first.
    A directory that is the working directory (or holds it) cannot be swapped: it is written file by file.
    """
    target = Path(target).absolute()
    if target.is_symlink():  # swap the directory the link points at, and keep the link
        target = target.resolve()
    cwd = Path.cwd()
    if target == cwd or target in cwd.parents:
        target.mkdir(parents=True, exist_ok=True)
        yield target
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target.parent, target.name)
    if target.is_dir():
        remove_stale_temps(target)
    elif target.exists():
        raise CheckpointError(f"cannot save into {target}: it is a file, not a directory")
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())
        yield stage
        for path in stage.rglob("*"):
            if path.is_file():
                if not path.is_symlink():
                    os.chmod(path, 0o666 & ~_umask())
                _fsync(path)
        if keep_other_entries and target.is_dir():
            for entry in target.iterdir():
                if not (stage / entry.name).exists() and not _TEMP_FILE.match(entry.name) and not _STAGED_DIR.match(entry.name):
                    _link_tree(entry, stage / entry.name)
        _swap_in(stage, target)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


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
    """Write the adapters (config + weights of each) into `directory` as one atomic step (`atomic_directory`):
    after a crash the directory holds the previous save complete, never a new config beside old weights."""
    names = list(model.configs) if adapter_names is None else adapter_names
    first = next(iter(model.configs))
    for name in names:
        if name not in model.configs:
            raise ConfigError(f"cannot save unknown adapter {name!r}; known: {list(model.configs)}")
    with atomic_directory(directory) as stage:
        for name in names:
            target = Path(stage) if name == first else Path(stage) / name
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


def recover_directory(directory) -> None:
    """A directory swap killed between its two renames leaves the last complete save as `.<name>.old-*`: rename it back."""
    directory = Path(directory).absolute()
    if not directory.exists() and directory.parent.is_dir():
        remove_stale_temps(directory.parent, directory.name)


def read_config_dict(directory) -> dict:
    """The raw `adapter_config.json` object; every way it can fail to parse is a `CheckpointError`."""
    recover_directory(directory)
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG_NAME} in {Path(directory)}: not an adapter directory (save one with model.save_adapter)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be an adapter config; the file is damaged") from None
    except (ValueError, UnicodeDecodeError, OSError, MemoryError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path} is not valid JSON ({short_repr(str(err))}); the file is corrupted or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object (the adapter config), not {type(data).__name__}")
    return data


def read_config(directory, strict: bool = True) -> AdapterConfig:
    return AdapterConfig.from_dict(read_config_dict(directory), strict=strict)


def read_weights(directory) -> dict[str, torch.Tensor]:
    """The adapter's tensors; a damaged file is a `CheckpointError`."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (PEFT .bin pickles are not read: re-save with safe_serialization=True)" if (Path(directory) / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"no {WEIGHTS_NAME} in {Path(directory)}{hint}")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} cannot be read as safetensors ({err}); the file is truncated or corrupted") from None
    return weights


def _disagreement(config: AdapterConfig, raw: dict | None, file_shape: tuple, model_shape: tuple) -> str:
    """Why the config and the weights disagree on a shape, naming the config field where it can."""
    fields = [f.name for f in dataclasses.fields(config)]
    absent = [f for f in fields if raw is not None and f not in raw and f not in ("target_modules", "exclude_modules",
                                                                              "modules_to_save", "task_type")]
    suspects = []
    for field in fields:
        value = getattr(config, field)
        if isinstance(value, int) and not isinstance(value, bool) and value in model_shape and value not in file_shape:
            suspects.append(field)
    if config.rank_field in suspects:
        suspects.remove(config.rank_field)
        suspects.insert(0, config.rank_field)
    parts = []
    for field in suspects[:2]:
        note = f" ({CONFIG_NAME} does not set it: the default was used)" if field in absent else ""
        parts.append(f"{field}={getattr(config, field)}{note}")
    if parts:
        return (f"the config and the weights disagree: the config's {' and '.join(parts)} does not fit the saved tensors. "
                f"Fix {CONFIG_NAME} (or re-save the adapter)")
    if absent:
        return f"the config and the weights disagree ({CONFIG_NAME} does not set {absent[:4]}, defaults were used) or it was saved from a different model"
    return "adapter saved from a different model?"


def _prepare_adapters(model, adapter_name: str, weights: dict[str, torch.Tensor]) -> None:
    """Show each adapter its file entries first (`Adapter.prepare_load`): it may refuse them or resize to them."""
    for module_name, layer in model.adapted_layers():
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        prefix = f"{PREFIX}{module_name}."
        keys = {key: prefix + adapter.save_key(key) for key in adapter.state_dict()}
        adapter.prepare_load({key: weights[file_key] for key, file_key in keys.items() if file_key in weights}, layer)


def _check_and_load(model, adapter_name: str, weights: dict[str, torch.Tensor], raw_config: dict | None = None) -> None:
    config = model.configs[adapter_name]
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
            file_shape, model_shape = tuple(weights[key].shape), tuple(tensor.shape)
            raise CheckpointError(
                f"shape mismatch for {key}: file has {file_shape}, model expects {model_shape}: "
                f"{_disagreement(config, raw_config, file_shape, model_shape)}"
            )
    # A float tensor of the model stored as integers or bools (or the reverse) is no file rankwise or PEFT wrote:
    # refused, never cast by `copy_`.
    odd = sorted(f"{key} ({weights[key].dtype}, expected {tensor.dtype})" for key, tensor in expected.items()
                 if weights[key].is_floating_point() != tensor.is_floating_point() or
                 (not tensor.is_floating_point() and weights[key].dtype != tensor.dtype))
    if odd:
        raise CheckpointError(f"adapter file holds tensors of the wrong kind {odd[:5]}{' ...' if len(odd) > 5 else ''}: "
                              "not cast; the file is damaged or of another kind")
    bad = sorted(key for key, t in expected.items() if weights[key].is_floating_point() and not torch.isfinite(weights[key]).all())
    if bad:
        raise CheckpointError(
            f"adapter tensors {bad[:5]}{' ...' if len(bad) > 5 else ''} ({len(bad)}) hold inf or NaN: the training that "
            "wrote them diverged. Loading them would give non-finite outputs; re-train (lower the learning rate) or "
            "load an earlier checkpoint"
        )
    with torch.no_grad():
        for key, tensor in expected.items():
            tensor.copy_(weights[key])


def load_adapter_into(model, directory, adapter_name: str = "default", strict: bool = True) -> None:
    """Add the adapter saved in `directory` to an `AdaptedModel`; on any error the model is unchanged."""
    raw = read_config_dict(directory)
    config = AdapterConfig.from_dict(raw, strict=strict)
    weights = read_weights(directory)
    model.add_adapter(adapter_name, config)
    try:
        _check_and_load(model, adapter_name, weights, raw)
    except Exception:
        model.delete_adapter(adapter_name)
        raise


def load_adapter(base_model, directory, adapter_name: str = "default", strict: bool = True, is_trainable: bool = False):
    """Load a saved adapter onto `base_model` and return the `AdaptedModel` (frozen unless `is_trainable`).

    On any error `base_model` is left exactly as it was.
    """
    from rankwise.core.model import AdaptedModel

    raw = read_config_dict(directory)
    config = AdapterConfig.from_dict(raw, strict=strict)
    weights = read_weights(directory)
    model = AdaptedModel(base_model, config, adapter_name)
    try:
        _check_and_load(model, adapter_name, weights, raw)
    except Exception:
        model.unload()
        raise
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    return model
