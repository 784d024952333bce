"""Issue 20 items 13, 14, 16, 18: saves are atomic as a whole, leave no temp files, keep the umask; loaders of
every rankwise format refuse damaged files with a CheckpointError."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import rankwise
from rankwise.core import io as rio
from rankwise.core.errors import CheckpointError

from toy_models import MLP


def _lora(alpha=8, seed=0):
    torch.manual_seed(seed)
    return rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=alpha,
                                                     init_lora_weights=False))


def _outputs(directory, x):
    torch.manual_seed(123)
    model = rankwise.load_adapter(MLP(), directory)
    with torch.no_grad():
        return model(x)


def _leftovers(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*"))


@pytest.fixture
def saved(tmp_path):
    directory = tmp_path / "adapter"
    old = _lora(alpha=8, seed=0)
    old.save_adapter(directory)
    x = torch.randn(3, 16)
    return directory, x, _outputs(directory, x)


@pytest.mark.parametrize("crash_in", ["config", "weights"])
def test_crash_between_writes_keeps_the_old_adapter(saved, monkeypatch, crash_in):
    directory, x, before = saved
    new = _lora(alpha=32, seed=1)  # differs in a scalar of the config and in the weights
    real_text, real_write = rio.atomic_write_text, rio.atomic_write

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(rio, "atomic_write_text" if crash_in == "config" else "atomic_write", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save_adapter(directory)
    monkeypatch.setattr(rio, "atomic_write_text", real_text)
    monkeypatch.setattr(rio, "atomic_write", real_write)
    assert torch.equal(_outputs(directory, x), before)
    assert rio.read_config(directory).lora_alpha == 8
    assert _leftovers(directory.parent) == []
    new.save_adapter(directory)
    assert rio.read_config(directory).lora_alpha == 32
    assert not torch.equal(_outputs(directory, x), before)


def test_leftovers_of_killed_saves_are_removed_by_the_next_save(saved):
    directory, x, before = saved
    (directory / ".adapter_model.safetensors.ab12cd34").write_bytes(b"x" * 1000)
    (directory / ".adapter_config.json.zz99yy88").write_text("{")
    stage = directory.parent / ".adapter.saving-q1w2e3r4"
    stage.mkdir()
    (stage / "adapter_model.safetensors").write_bytes(b"partial")
    _lora(alpha=16).save_adapter(directory)
    assert _leftovers(directory.parent) == []


def test_kill_between_the_two_renames_of_a_swap_is_recovered(saved):
    directory, x, before = saved
    os.rename(directory, directory.parent / ".adapter.old-a1b2c3d4")  # the state such a kill leaves
    assert torch.equal(_outputs(directory, x), before)
    assert _leftovers(directory.parent) == []


def test_swap_without_rename_exchange_is_atomic_too(saved, monkeypatch):
    directory, x, before = saved
    monkeypatch.setattr(rio, "_exchange", lambda a, b: False)
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_rename(src, dst)

    monkeypatch.setattr(rio.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        _lora(alpha=32, seed=1).save_adapter(directory)
    monkeypatch.setattr(rio.os, "rename", real_rename)
    assert torch.equal(_outputs(directory, x), before)
    assert _leftovers(directory.parent) == []
    _lora(alpha=32, seed=1).save_adapter(directory)
    assert rio.read_config(directory).lora_alpha == 32


def test_other_entries_of_the_directory_survive_a_save(tmp_path):
    model = _lora()
    model.add_adapter("second", rankwise.LoraConfig(target_modules=["lin0"], r=2))
    model.save_adapter(tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("notes")
    model.save_adapter(tmp_path / "a", adapter_names=["default"])
    assert (tmp_path / "a" / "README.md").read_text() == "notes"
    assert (tmp_path / "a" / "second" / rio.CONFIG_NAME).is_file()


def test_saved_files_get_the_umask_not_0600(tmp_path):
    previous = os.umask(0o022)
    try:
        _lora().save_adapter(tmp_path / "a")
        rio.atomic_write_text(tmp_path / "x.json", "{}")
    finally:
        os.umask(previous)
    for path in (tmp_path / "a" / rio.CONFIG_NAME, tmp_path / "a" / rio.WEIGHTS_NAME, tmp_path / "x.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
