"""FLoRA spec checks (docs: /work/shared/specs/methods-adapters-a.md section 7)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.linalg import tucker_product


def _adapter(model, name):
    return dict(model.adapted_layers())[name].adapters["default"]


def _randomise(adapter):
    with torch.no_grad():
        adapter.core.normal_()


def test_linear_mode_order_matches_closed_form():
    model = rankwise.adapt(nn.Sequential(nn.Linear(12, 20)), rankwise.FloraConfig(r=4, scale=2.0, target_modules=["0"]))
    a = _adapter(model, "0")
    _randomise(a)
    a_in, a_out = a.factors
    delta = a.delta_weight(None)
    assert delta.shape == (20, 12)
    torch.testing.assert_close(delta, 2.0 * a_out @ a.core.T @ a_in.T, atol=1e-5, rtol=1e-5)
    x = torch.randn(5, 12)
    torch.testing.assert_close(model(x), model.model[0].base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(6, 5), (4, 6, 3, 3), (4, 3, 2, 3, 3)])
def test_zero_delta_at_init_for_n_modes(shape):
    layer = {2: nn.Linear(shape[1], shape[0]), 4: nn.Conv2d(shape[1], shape[0], shape[2:]),
             5: nn.Conv3d(shape[1], shape[0], shape[2:])}[len(shape)]
    model = rankwise.adapt(nn.Sequential(layer), rankwise.FloraConfig(r=3, target_modules=["0"]))
    delta = _adapter(model, "0").delta_weight(None)
    assert delta.shape == shape and torch.count_nonzero(delta) == 0


def test_parameter_count_formula_conv_example():
    # 16 x 8 x 3 x 3 kernel, ranks [4, 4, 2, 2]: 4*4*2*2 + (8*4 + 16*4 + 3*2 + 3*2) = 64 + 108 = 172.
    model = rankwise.adapt(nn.Sequential(nn.Conv2d(8, 16, 3)), rankwise.FloraConfig(r=4, kernel_r=2, target_modules=["0"]))
    a = _adapter(model, "0")
    assert a.ranks == (4, 4, 2, 2)
    assert sum(p.numel() for p in a.parameters()) == 172
    assert math.prod(a.ranks) + sum(d * r for d, r in zip(a.mode_sizes, a.ranks)) == 172


@pytest.mark.parametrize("stride,padding,groups", [(2, 1, 1), (1, 0, 1), (1, 1, 4), (2, 1, 8)])
def test_conv_fast_path_equals_materialised_kernel(stride, padding, groups):
    conv = nn.Conv2d(8, 16, 3, stride=stride, padding=padding, groups=groups)
    model = rankwise.adapt(nn.Sequential(conv), rankwise.FloraConfig(r=4, scale=4.0, target_modules=["0"]))
    a = _adapter(model, "0")
    assert a.mode_sizes == (8 // groups, 16, 3, 3)  # the in-mode is in_channels / groups, not in_channels
    _randomise(a)
    x = torch.randn(2, 8, 9, 9)
    delta = a.delta_weight(None)
    expected = F.conv2d(x, conv.weight + delta, conv.bias, stride, padding, 1, groups)
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)


def test_conv_delta_is_tucker_not_flattened():
    model = rankwise.adapt(nn.Sequential(nn.Conv2d(8, 16, 3)), rankwise.FloraConfig(r=4, kernel_r=2, target_modules=["0"]))
    a = _adapter(model, "0")
    _randomise(a)
    delta = a.delta_weight(None)
    explicit = torch.einsum("abpq,ca,ob,hp,wq->ochw", a.core, *a.factors)
    torch.testing.assert_close(delta, explicit, atol=1e-5, rtol=1e-5)
    # Multilinear ranks of the update are bounded by the Tucker ranks in every mode.
    assert torch.linalg.matrix_rank(delta.permute(2, 0, 1, 3).reshape(3, -1)) <= 2


def test_reduces_to_lora_with_identity_core():
    model = rankwise.adapt(nn.Sequential(nn.Linear(10, 14)), rankwise.FloraConfig(r=3, target_modules=["0"]))
    a = _adapter(model, "0")
    with torch.no_grad():
        a.core.copy_(torch.eye(3))
    B, A = a.lora_factors()
    torch.testing.assert_close(a.delta_weight(None), a.factors[1] @ a.factors[0].T)
    torch.testing.assert_close(a.delta_weight(None), B @ A)


def test_only_core_gets_gradient_at_step_zero():
    model = rankwise.adapt(nn.Sequential(nn.Conv2d(4, 8, 3)), rankwise.FloraConfig(r=2, target_modules=["0"]))
    model(torch.randn(2, 4, 6, 6)).pow(2).sum().backward()
    a = _adapter(model, "0")
    assert a.core.grad.abs().sum() > 0
    assert all(f.grad is None or f.grad.abs().sum() == 0 for f in a.factors)


def test_tucker_product_checks_modes():
    with pytest.raises(ValueError):
        tucker_product(torch.zeros(2, 2), [torch.zeros(3, 2)])


@pytest.mark.parametrize("field,value", [("r", 0), ("kernel_r", -1), ("ranks", [4]), ("ranks", [4, 0]),
                                         ("scale", 0.0), ("dropout", 1.0)])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.FloraConfig(target_modules=["x"], **{field: value})
