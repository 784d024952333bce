"""Bad input gets a clear RankwiseError and leaves the model unchanged; saving is atomic."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import rankwise
from rankwise.core import io as rio
from rankwise.core.errors import CheckpointError, ConfigError, TargetError

from toy_models import MLP, tiny_bert


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    current = model.state_dict()
    return set(current) == set(state) and all(torch.equal(current[k], state[k]) for k in state)


def test_unknown_method_suggests_close_names():
    with pytest.raises(ConfigError, match="Did you mean lora"):
        rankwise.get_method("lorra")


@pytest.mark.parametrize("field,value", [("r", 0), ("r", -2), ("r", 2.5), ("lora_alpha", 0), ("lora_dropout", 1.0),
                                         ("init_lora_weights", "bogus"), ("rank_pattern", {"x": 0})])
def test_bad_lora_fields(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.LoraConfig(target_modules=["lin0"], **{field: value})


def test_rank_larger_than_layer_leaves_model_unchanged():
    base = MLP()
    state = _state(base)
    with pytest.raises(ConfigError, match=r"r=17 is too large for 'lin0'.*at most 16"):
        rankwise.adapt(base, rankwise.LoraConfig(target_modules=["lin0"], r=17))
    assert _same(base, state) and isinstance(base.lin0, torch.nn.Linear)
    assert all(p.requires_grad for p in base.parameters())


def test_targets_matching_nothing_list_closest_names():
    base = tiny_bert()
    with pytest.raises(TargetError, match=r"matched no layer.*Closest layer names: \['query'\]"):
        rankwise.adapt(base, rankwise.LoraConfig(target_modules=["querry"]))
    assert not any(isinstance(m, rankwise.core.layer.AdaptedLayer) for m in base.modules())


def test_unsupported_layer_kind_is_named():
    @rankwise.register("test-linear-only", adapter=rankwise.adapters.lora.LoraAdapter, family="test", paper="-")
    class LinearOnly(rankwise.LoraConfig):
        supported_layers = ("linear",)

    try:
        from toy_models import ConvNet

        with pytest.raises(TargetError, match="cannot adapt conv layer 'conv1'"):
            rankwise.adapt(ConvNet(), LinearOnly(target_modules=["conv1", "fc"]))
    finally:
        rankwise.core.registry._REGISTRY.pop("test-linear-only")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    base = MLP()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False))
    model.save_adapter(tmp_path)
    return base, tmp_path


def test_missing_adapter_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        rankwise.load_adapter(MLP(), tmp_path / "nope")


def test_truncated_weights_file(saved):
    base, path = saved
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    state = _state(base)
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        rankwise.load_adapter(base, path)
    assert _same(base, state)


def test_corrupted_config(saved):
    base, path = saved
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        rankwise.load_adapter(base, path)


def test_adapter_from_another_model_names_key_and_shapes(saved):
    _, path = saved

    class Wider(MLP):
        def __init__(self):
            super().__init__()
            self.lin1 = torch.nn.Linear(32, 40)
            self.head = torch.nn.Linear(40, 4)

    other = Wider()
    state = _state(other)
    with pytest.raises(CheckpointError, match=r"shape mismatch for base_model\.model\.lin1\.lora_B\.weight: file has \(24, 4\), model expects \(40, 4\)"):
        rankwise.load_adapter(other, path)
    assert _same(other, state)
    assert not any(isinstance(m, rankwise.core.layer.AdaptedLayer) for m in other.modules())
    assert all(p.requires_grad for p in other.parameters())


def test_missing_keys_are_named(saved):
    base, path = saved
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "adapter_model.safetensors")
    weights.pop("base_model.model.lin0.lora_A.weight")
    save_file(weights, path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['base_model\.model\.lin0\.lora_A\.weight'\]"):
        rankwise.load_adapter(base, path)


def test_unknown_config_key_from_newer_version(saved):
    base, path = saved
    config = json.loads((path / "adapter_config.json").read_text())
    config["shiny_new_option"] = 3
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="shiny_new_option.*strict=False"):
        rankwise.load_adapter(base, path)
    with pytest.warns(UserWarning, match="shiny_new_option"):
        rankwise.load_adapter(base, path, strict=False)


def test_load_into_existing_model_failure_keeps_adapters(saved, tmp_path):
    base, path = saved
    model = rankwise.adapt(base, rankwise.LoraConfig(target_modules=["lin0"], r=2))
    (path / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        model.load_adapter(path, adapter_name="second")
    assert list(model.configs) == ["default"]
    assert all(list(layer.adapters) == ["default"] for _, layer in model.adapted_layers())


def test_save_is_atomic(saved, monkeypatch):
    base, path = saved
    before = (path / "adapter_model.safetensors").read_bytes()
    model = rankwise.adapt(base, rankwise.LoraConfig(target_modules=["lin0", "lin1"], r=4))

    def crash(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("crash mid-save")

    monkeypatch.setattr(rio, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter(path)
    assert (path / "adapter_model.safetensors").read_bytes() == before
    assert not [p for p in path.iterdir() if p.name.startswith(".")], "temp files must be cleaned up"


def test_safe_merge_refuses_non_finite():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0"], r=2, init_lora_weights=False))
    layer = dict(model.adapted_layers())["lin0"]
    before = layer.base_layer.weight.clone()
    with torch.no_grad():
        layer.adapters["default"].lora_B[0, 0] = float("nan")
    with pytest.raises(rankwise.MergeError, match="non-finite"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


def test_adapter_management_errors():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(rankwise.AdapterStateError, match="already exists"):
        model.add_adapter("default", rankwise.LoraConfig(target_modules=["lin0"], r=2))
    with pytest.raises(rankwise.AdapterStateError, match="unknown adapter"):
        model.set_adapter("ghost")
    model.merge_adapter()
    with pytest.raises(rankwise.AdapterStateError, match="merged"):
        model.delete_adapter("default")
    with pytest.raises(rankwise.AdapterStateError, match="unmerge first"):
        model(torch.randn(2, 16), adapter_names=["default", "__base__"])
