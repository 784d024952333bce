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


# ---- the other directories rankwise writes (item 13) -------------------------------------------------
def test_training_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    from rankwise.train import checkpoint as ckpt
    from rankwise.train.loop import TrainState

    model = _lora()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainState(model=model, optimizer=optimizer, scheduler=scheduler, step=5)
    ckpt.save_checkpoint(tmp_path, state, [], keep=2)
    before = (tmp_path / "checkpoint-5" / ckpt.TENSORS).read_bytes()
    real = ckpt.save_file

    def crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        raise KeyboardInterrupt("killed before state.json")

    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, state, [], keep=2)
    assert (tmp_path / "checkpoint-5" / ckpt.TENSORS).read_bytes() == before
    assert (tmp_path / "checkpoint-5" / ckpt.STATE).is_file() and _leftovers(tmp_path) == []


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def compressed(tmp_path):
    from rankwise.compress import compress, save_compressed

    model, _ = compress(_tiny_llama(), "svd", None, ratio=0.5)
    save_compressed(model, tmp_path / "c", method="svd")
    return tmp_path / "c", model


def test_compressed_save_is_atomic(compressed, monkeypatch):
    from rankwise.compress import serialize

    path, model = compressed
    ids = torch.randint(0, 64, (1, 8))
    before = serialize.load_compressed(path)(ids).logits
    other = _tiny_llama()
    with torch.no_grad():
        other.lm_head.weight.mul_(2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed before compression.json")

    monkeypatch.setattr(serialize, "_write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        serialize.save_compressed(other, path)
    monkeypatch.undo()
    torch.testing.assert_close(serialize.load_compressed(path)(ids).logits, before)
    assert _leftovers(path.parent) == []


def test_pretrain_run_save_is_atomic(tmp_path, monkeypatch):
    from rankwise.pretrain import recipe

    model = torch.nn.Linear(4, 4)
    config = recipe.PretrainConfig()
    recipe.save_run(tmp_path / "run", model, config, {"val_curve": [{"tokens": 1, "val_ppl": 3.0}]})
    before = (tmp_path / "run" / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while plotting")

    monkeypatch.setattr(recipe, "plot_curves", crash)
    with pytest.raises(KeyboardInterrupt):
        recipe.save_run(tmp_path / "run", torch.nn.Linear(4, 4), config, {"val_curve": [{"tokens": 1, "val_ppl": 9.0}]})
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val_curve"][0]["val_ppl"] == 3.0
    assert _leftovers(tmp_path) == []


# ---- loading adapters (item 14, 18) -------------------------------------------------------------------
def _edit_config(directory, **changes):
    path = directory / rio.CONFIG_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_deeply_nested_config_is_a_checkpoint_error(saved):
    directory, x, _ = saved
    (directory / rio.CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        rankwise.load_adapter(MLP(), directory)


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"", b"[1, 2]", b"null"])
def test_every_config_parse_failure_is_a_checkpoint_error(saved, content):
    directory, x, _ = saved
    (directory / rio.CONFIG_NAME).write_bytes(content)
    with pytest.raises(CheckpointError):
        rankwise.load_adapter(MLP(), directory)


def test_missing_rank_names_the_field_not_another_model(saved):
    directory, x, _ = saved  # saved with r=4; without `r` the config's default r=8 applies
    _edit_config(directory, r=None)
    with pytest.raises(CheckpointError, match=r"config and the weights disagree.*r=8 \(adapter_config.json does not set it"):
        rankwise.load_adapter(MLP(), directory)


def test_long_string_values_are_cut_in_errors(saved):
    directory, x, _ = saved
    _edit_config(directory, init_lora_weights="y" * 5_000_000)
    with pytest.raises(rankwise.ConfigError) as err:
        rankwise.load_adapter(MLP(), directory)
    assert len(str(err.value)) < 1000


def test_non_finite_adapter_tensors_are_refused_naming_them(saved):
    from safetensors.torch import load_file, save_file

    directory, x, _ = saved
    weights = load_file(str(directory / rio.WEIGHTS_NAME))
    key = sorted(weights)[0]
    weights[key][0, 0] = float("nan")
    save_file(weights, str(directory / rio.WEIGHTS_NAME))
    base = MLP()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"{key}.*inf or NaN"):
        rankwise.load_adapter(base, directory)
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())


def test_non_float_adapter_tensors_are_refused_not_cast(saved):
    from safetensors.torch import load_file, save_file

    directory, x, _ = saved
    weights = load_file(str(directory / rio.WEIGHTS_NAME))
    key = sorted(weights)[0]
    weights[key] = weights[key].to(torch.int64)
    save_file(weights, str(directory / rio.WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=f"wrong kind.*{key} .torch.int64, expected torch.float32"):
        rankwise.load_adapter(MLP(), directory)


# ---- rankwise's own formats (item 18) -----------------------------------------------------------------
def _structure(path):
    return json.loads((path / "compression.json").read_text())


@pytest.mark.parametrize("damage", ["drop_modules", "modules_list", "kind_missing", "huge_in", "missing_field",
                                    "model_class_callable", "model_class_dotted", "not_utf8", "nested", "version"])
def test_damaged_compressed_directory_is_a_checkpoint_error(compressed, damage):
    from rankwise.compress import load_compressed

    path, _ = compressed
    meta = _structure(path)
    name = next(n for n, spec in meta["modules"].items() if "in" in spec)
    if damage == "drop_modules":
        del meta["modules"]
    elif damage == "modules_list":
        meta["modules"] = [1, 2]
    elif damage == "kind_missing":
        meta["modules"][name] = {"in": 3}
    elif damage == "huge_in":
        meta["modules"][name] = {**meta["modules"][name], "in": 10**11}
    elif damage == "missing_field":
        meta["modules"][name] = {k: v for k, v in meta["modules"][name].items() if k not in ("in", "num")}
    elif damage == "model_class_callable":
        meta["model_class"] = "pipeline"  # a top-level transformers callable, not a model class
    elif damage == "model_class_dotted":
        meta["model_class"] = "os.system"
    elif damage == "version":
        meta["format_version"] = 99
    if damage == "not_utf8":
        (path / "compression.json").write_bytes(b"\xff\xfe{")
    elif damage == "nested":
        (path / "compression.json").write_text("[" * 100_000 + "]" * 100_000)
    else:
        (path / "compression.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_compressed(path)


def test_damaged_hf_config_of_a_compressed_model_is_refused_before_allocation(compressed):
    from rankwise.compress import load_compressed

    path, _ = compressed
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 10**10  # 3 x 32 x 1e10 floats: would end in an allocator error
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not belong together|does not build|more than this machine"):
        load_compressed(path)


@pytest.fixture
def federated_checkpoint(tmp_path):
    pytest.importorskip("flwr")
    from rankwise.federated.simulation import FederatedRun, initial_state, save_checkpoint
    from rankwise.federated.task import HeadSpec, save_features

    x, y = torch.randn(20, 8), torch.randint(0, 2, (20,))
    features = save_features(tmp_path / "f.safetensors", {"train_x": x, "train_y": y, "test_x": x, "test_y": y})
    run = FederatedRun(features=str(features), strategy="ffa-lora", clients=2, alpha=None,
                       head=HeadSpec(in_features=8, hidden=8, num_classes=2, rank=2))
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, run, 1, initial_state(run), [])
    return directory, run


@pytest.mark.parametrize("tensors", ["../f.safetensors", "/etc/passwd", "sub/round-0001.safetensors", 7])
def test_federated_checkpoint_tensor_file_is_confined_to_its_directory(federated_checkpoint, tensors):
    from rankwise.federated.simulation import STATE_FILE, load_checkpoint

    directory, run = federated_checkpoint
    record = json.loads((directory / STATE_FILE).read_text())
    assert load_checkpoint(directory, run)[0] == 1
    record["tensors"] = tensors
    (directory / STATE_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="tensors"):
        load_checkpoint(directory, run)


@pytest.mark.parametrize("content", ["[" * 100_000, "[1]", '{"round": "x", "tensors": "round-0001.safetensors", "run": {}, "history": []}',
                                     '{"round": 1}'])
def test_damaged_federated_checkpoint_json_is_a_checkpoint_error(federated_checkpoint, content):
    from rankwise.federated.simulation import STATE_FILE, load_checkpoint

    directory, run = federated_checkpoint
    (directory / STATE_FILE).write_text(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(directory, run)


def test_federated_checkpoint_leftovers_are_removed(federated_checkpoint):
    from rankwise.federated.simulation import initial_state, save_checkpoint

    directory, run = federated_checkpoint
    (directory / ".round-0007.safetensors.abcd1234").write_bytes(b"partial")
    save_checkpoint(directory, run, 2, initial_state(run), [])
    assert _leftovers(directory) == []


# ---- merge all or nothing (item 15) -------------------------------------------------------------------
@pytest.mark.parametrize("safe_merge", [True, False])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_merge_is_all_or_nothing_and_refuses_non_finite_by_default(safe_merge, how):
    model = _lora()
    layers = dict(model.adapted_layers())
    before = {name: layer.base_layer.weight.clone() for name, layer in layers.items()}
    with torch.no_grad():
        layers["lin1"].adapters["default"].lora_B[0, 0] = float("inf")  # the later layer: lin0 would merge first
    with pytest.raises(rankwise.MergeError, match="lin1.*non-finite"):
        getattr(model, how)(safe_merge=safe_merge)
    for name, layer in layers.items():
        assert torch.equal(layer.base_layer.weight, before[name]), name
        assert layer.merged_adapters == []
    with torch.no_grad():
        layers["lin1"].adapters["default"].lora_B[0, 0] = 0.0
    model.merge_adapter(safe_merge=safe_merge)
    model.unmerge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.base_layer.weight, before[name])


def test_save_through_a_symlinked_directory_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    _lora(alpha=8).save_adapter(real)
    (tmp_path / "link").symlink_to(real)
    _lora(alpha=16).save_adapter(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and rio.read_config(real).lora_alpha == 16
    assert _leftovers(tmp_path) == []


def test_analyze_on_a_damaged_config_is_a_clear_cli_error(saved):
    from typer.testing import CliRunner

    from rankwise.cli import app

    directory, x, _ = saved
    (directory / rio.CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    result = CliRunner().invoke(app, ["analyze", str(directory)])
    assert result.exit_code == 2 and "nested too deeply" in " ".join(result.output.split()), result.output
