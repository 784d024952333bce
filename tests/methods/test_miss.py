"""MiSS / Bone numeric checks (spec methods-adapters-a.md section 6), PEFT `miss` files both ways."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise
from peft_interop import ATOL, peft_to_rankwise, rankwise_to_peft


def single(in_f, out_f, **kwargs):
    torch.manual_seed(0)
    return rankwise.adapt(nn.Sequential(nn.Linear(in_f, out_f)), rankwise.MissConfig(target_modules=["0"], **kwargs))


@pytest.mark.parametrize("in_f", [16, 18])  # 18: the input is zero-padded to a multiple of r
def test_chunk_sum_forward_equals_tiled_delta(in_f):
    model = single(in_f, 12, r=4, init_weights=False)
    delta = model.delta_weights()["0"]
    block = model.model[0].adapters["default"].miss_block.detach()
    for o in range(12):
        for j in range(in_f):
            assert delta[o, j] == block[j % 4, o]
    x = torch.randn(5, in_f)
    expected = model.model[0].base_layer(x) + x @ delta.T
    torch.testing.assert_close(model(x).detach(), expected, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta) <= 4


@pytest.mark.parametrize("mode,count", [(True, 4 * 12), ("bat", 4 * 12), ("mini", 4 * 3)])
def test_zero_init_and_trainable_count(mode, count):
    model = single(16, 12, r=4, init_weights=mode, mini_r=3)
    assert torch.count_nonzero(model.delta_weights()["0"]) == 0
    assert model.trainable_summary()["trainable"] == count


def test_bat_block_formula_and_exact_unmerge():
    model = single(8, 12, r=4, init_weights="bat")
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.miss_block.copy_(torch.randn(3, 4, 4) * 0.3)
    W = model.model[0].weight_matrix().detach().clone()
    delta = model.delta_weights()["0"]
    B = adapter.miss_block.detach()
    for i in range(3):
        for j in range(2):
            block = W[4 * i:4 * i + 4, 4 * j:4 * j + 4]
            torch.testing.assert_close(delta[4 * i:4 * i + 4, 4 * j:4 * j + 4], block @ B[i] + B[i])
    x = torch.randn(5, 8)
    before = model(x).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(x).detach(), before, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(model.model[0].weight_matrix().detach(), W, atol=1e-5, rtol=1e-5)


def test_mini_repeats_the_shard_along_out():
    model = single(16, 12, r=4, init_weights="mini", mini_r=3)
    with torch.no_grad():
        model.model[0].adapters["default"].miss_block.copy_(torch.arange(12.0).view(4, 3))
    delta = model.delta_weights()["0"]
    torch.testing.assert_close(delta[:3], delta[3:6])
    assert delta[1, 5] == 5 % 4 * 3 + 1


@pytest.mark.parametrize("mode", [True, "bat", "mini"])
def test_rankwise_file_loads_in_peft(mode, tmp_path):
    expected, got = rankwise_to_peft(rankwise.MissConfig(r=4, mini_r=4, init_weights=mode, target_modules=["query", "value"]), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MISS"
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", [True, "bat", "mini"])
def test_peft_file_loads_in_rankwise(mode, tmp_path):
    from peft import MissConfig

    expected, got = peft_to_rankwise(MissConfig(r=4, mini_r=4, init_weights=mode, target_modules=["query", "value", "dense"]), tmp_path)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_legacy_bone_file_loads_and_matches_miss(tmp_path):
    from peft import MissConfig
    from safetensors.torch import load_file, save_file

    expected, _ = peft_to_rankwise(MissConfig(r=4, target_modules=["query", "value"]), tmp_path / "miss")
    legacy = tmp_path / "bone"
    legacy.mkdir()
    state = load_file(str(tmp_path / "miss" / "adapter_model.safetensors"))
    save_file({k.replace("miss_block", "bone_block"): v for k, v in state.items()}, str(legacy / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in ("miss_dropout", "mini_r")}
    (legacy / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "BONE"}))
    from peft_interop import bert_inputs, fresh_bert, hidden

    loaded = rankwise.load_adapter(fresh_bert(), legacy)
    assert isinstance(loaded.configs["default"], rankwise.BoneConfig)
    torch.testing.assert_close(hidden(loaded, bert_inputs()), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "r"), ({"mini_r": 0}, "mini_r"), ({"miss_dropout": -0.1}, "miss_dropout"),
    ({"init_weights": "pissa"}, "init_weights"), ({"init_weights": "bat", "miss_dropout": 0.1}, "miss_dropout"),
])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.MissConfig(target_modules=["0"], **kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"r": 17}, "r must be <= in_features"), ({"r": 5, "init_weights": "bat"}, "divide both"),
    ({"r": 4, "init_weights": "mini", "mini_r": 5}, "must divide out_features"),
])
def test_layer_limits(kwargs, message):
    base = nn.Sequential(nn.Linear(16, 12))
    with pytest.raises(rankwise.ConfigError, match=message):
        rankwise.adapt(base, rankwise.MissConfig(target_modules=["0"], **kwargs))
    assert isinstance(base[0], nn.Linear)


def test_defaults_follow_peft():
    from peft import MissConfig

    ours, theirs = rankwise.MissConfig(target_modules=["x"]), MissConfig(target_modules=["x"])
    for field in ("r", "miss_dropout", "mini_r", "init_weights"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.to_dict()["bias"] == theirs.bias == "none"
    bone = rankwise.BoneConfig(target_modules=["x"])  # legacy PEFT BoneConfig: r=64, init_weights=True
    assert (bone.r, bone.init_weights) == (64, True)
