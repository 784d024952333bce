"""LoRA numerics: scaling rules, init options, delta formula, per-module ranks."""
from __future__ import annotations

import math

import pytest
import torch

import rankwise
from toy_models import MLP, ConvNet, EmbeddingModel


def _layer(model, name):
    return dict(model.adapted_layers())[name]


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / math.sqrt(4))])
def test_scaling(rslora, expected):
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0"], r=4, lora_alpha=16, use_rslora=rslora))
    assert _layer(model, "lin0").adapters["default"].scaling == pytest.approx(expected)


def test_delta_weight_is_scaled_BA_and_matches_forward():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0"], r=4, lora_alpha=8, init_lora_weights=False))
    layer = _layer(model, "lin0")
    a = layer.adapters["default"]
    torch.testing.assert_close(a.delta_weight(layer.weight_matrix()), 2.0 * a.lora_B @ a.lora_A)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.base_layer.weight + 2.0 * a.lora_B @ a.lora_A, layer.base_layer.bias)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(a.delta_weight(layer.weight_matrix())) == 4


def test_trainable_parameter_count_formula():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0", "lin1"], r=4))
    # r * (in + out) per layer: lin0 16->32, lin1 32->24
    assert model.trainable_summary()["trainable"] == 4 * (16 + 32) + 4 * (32 + 24)


def test_conv_delta_matches_conv_forward():
    torch.manual_seed(0)
    model = rankwise.adapt(ConvNet(), rankwise.LoraConfig(target_modules=["conv2"], r=3, init_lora_weights=False))
    layer = _layer(model, "conv2")
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        delta = layer.adapters["default"].delta_weight(layer.weight_matrix())
        assert delta.shape == layer.base_layer.weight.shape
        expected = layer.base_layer(x) + layer.conv(x, delta)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_embedding_delta_matches_lookup():
    model = rankwise.adapt(EmbeddingModel(), rankwise.LoraConfig(target_modules=["emb"], r=2, init_lora_weights=False))
    layer = _layer(model, "emb")
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        delta = layer.adapters["default"].delta_weight(layer.weight_matrix())  # (dim, num)
        torch.testing.assert_close(layer(ids), layer.base_layer(ids) + delta.T[ids], atol=1e-6, rtol=1e-6)


def test_gaussian_init_starts_at_zero_with_small_A():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin1"], r=8, init_lora_weights="gaussian"))
    a = _layer(model, "lin1").adapters["default"]
    assert torch.count_nonzero(a.lora_B) == 0
    assert a.lora_A.std().item() == pytest.approx(1 / 8, rel=0.3)


def test_pissa_moves_principal_subspace_into_adapter():
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = base(x)
        original = base.lin1.weight.clone()
    model = rankwise.adapt(base, rankwise.LoraConfig(target_modules=["lin1"], r=4, lora_alpha=4, init_lora_weights="pissa"))
    layer = _layer(model, "lin1")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        delta = layer.adapters["default"].delta_weight(layer.weight_matrix())
        U, S, Vh = torch.linalg.svd(original)
        torch.testing.assert_close(delta, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
        # The residual left in the base has the remaining singular values only.
        torch.testing.assert_close(torch.linalg.svdvals(layer.base_layer.weight)[:-4], S[4:], atol=1e-5, rtol=1e-4)


def test_rank_and_alpha_pattern():
    config = rankwise.LoraConfig(target_modules=["lin0", "lin1"], r=4, lora_alpha=8, rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 6})
    model = rankwise.adapt(MLP(), config)
    a0, a1 = _layer(model, "lin0").adapters["default"], _layer(model, "lin1").adapters["default"]
    assert (a0.r, a1.r) == (4, 2)
    assert (a0.scaling, a1.scaling) == (2.0, 3.0)


def test_dropout_only_in_training():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(target_modules=["lin0"], r=4, lora_dropout=0.5, init_lora_weights=False))
    x = torch.randn(8, 16)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        model.train()
        assert not torch.equal(model(x), model(x))
