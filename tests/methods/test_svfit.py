"""SVFit numeric checks (spec methods-adapters-a.md section 5)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise
from toy_models import MLP, ConvNet


def with_spectrum(singular_values, out_f=12, in_f=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(singular_values), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(singular_values), generator=gen))
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(U @ torch.diag(torch.tensor(singular_values)) @ V.T)
    return nn.Sequential(layer)


def test_zero_delta_at_init_and_r_trainable_per_layer():
    model = rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin0", "lin1"], r=5))
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())
    assert model.trainable_summary()["trainable"] == 2 * 5
    assert all(n.endswith("svfit_s") for n, p in model.named_parameters() if p.requires_grad)


def test_energy_rule_picks_smallest_rank():
    model = rankwise.adapt(with_spectrum([10.0, 1.0, 0.1, 0.01]), rankwise.SvfitConfig(target_modules=["0"]))
    assert model.model[0].adapters["default"].r == 1  # 100 / 101.01 = 0.99
    model = rankwise.adapt(with_spectrum([10.0, 1.0, 0.1, 0.01]), rankwise.SvfitConfig(target_modules=["0"], energy=0.9999))
    assert model.model[0].adapters["default"].r == 2


def test_scaled_singular_values_change_only_the_top_r():
    sigma = [8.0, 5.0, 3.0, 1.0, 0.5]
    model = rankwise.adapt(with_spectrum(sigma), rankwise.SvfitConfig(target_modules=["0"], r=2))
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.svfit_s.mul_(2)
    weight = model.model[0].weight_matrix() + model.delta_weights()["0"]
    got = torch.linalg.svdvals(weight)[:5]
    torch.testing.assert_close(got, torch.tensor([16.0, 10.0, 3.0, 1.0, 0.5]), atol=1e-4, rtol=1e-5)
    assert torch.linalg.matrix_rank(model.delta_weights()["0"]) == 2


def test_literal_form_reconstructs_the_weight_and_matches_fast_path():
    model = rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin1"], r=6))
    adapter, layer = model.model.lin1.adapters["default"], model.model.lin1
    W = layer.weight_matrix().detach()
    U, s, V, sigma = adapter.svfit_U, adapter.svfit_s.detach(), adapter.svfit_V, adapter.svfit_sigma
    residual = W - U @ torch.diag(sigma) @ V
    torch.testing.assert_close(residual + U @ torch.diag(s) @ V, W, atol=1e-5 * W.abs().max(), rtol=0)
    with torch.no_grad():
        adapter.svfit_s.add_(torch.randn(6))
    x = torch.randn(7, 32)
    literal = x @ (residual + U @ torch.diag(adapter.svfit_s.detach()) @ V).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x).detach(), literal, atol=1e-5, rtol=1e-5)


def test_conv_kernel_is_factorised_flat():
    model = rankwise.adapt(ConvNet(), rankwise.SvfitConfig(target_modules=["conv2"], r=3))
    adapter = model.model.conv2.adapters["default"]
    assert adapter.svfit_U.shape == (16, 3) and adapter.svfit_V.shape == (3, 16 * 9)
    with torch.no_grad():
        adapter.svfit_s.add_(1.0)
    assert model.delta_weights()["conv2"].shape == (16, 16, 3, 3)


@pytest.mark.parametrize("kwargs,field", [({"r": 0}, "r"), ({"r": 1.5}, "r"), ({"energy": 0}, "energy"), ({"energy": 1.5}, "energy")])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.SvfitConfig(target_modules=["lin0"], **kwargs)


def test_rank_larger_than_layer():
    with pytest.raises(rankwise.ConfigError, match="singular values is at most 16"):
        rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin0"], r=17))
