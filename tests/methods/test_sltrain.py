"""SLTrain (arXiv 2406.02214): spec section 1(a) property tests."""
import pytest
import torch
import torch.nn.functional as F

from rankwise.core.errors import ConfigError
from rankwise.pretrain.sltrain import SLTrainLinear, sltrain_model


def _dense_reference(layer):
    B = layer.lora_B.detach().clone().requires_grad_()
    A = layer.lora_A.detach().clone().requires_grad_()
    values = layer.sparse_values.detach().clone().requires_grad_()
    theta = layer.scaling_theta.detach().clone().requires_grad_() if layer.scaling_theta is not None else None
    scale = torch.tanh(theta) if theta is not None else layer.fixed_scaling
    W = B @ (scale * A) + torch.zeros(layer.out_features * layer.in_features).scatter(
        0, layer.sparse_index, values).view(layer.out_features, layer.in_features)
    W.retain_grad()
    return W, B, A, values, theta


@pytest.mark.parametrize("trainable_scaling", [False, True])
def test_forward_and_gradients_match_dense_reference(trainable_scaling):
    layer = SLTrainLinear(24, 40, rank=4, delta=0.1, lora_alpha=8, trainable_scaling=trainable_scaling)
    torch.nn.init.normal_(layer.lora_B)  # B = 0 at init would hide errors in dA
    x = torch.randn(3, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    W, B, A, values, theta = _dense_reference(layer)
    bias = layer.bias.detach().clone().requires_grad_()
    y, y_ref = layer(x), F.linear(x_ref, W, bias)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_ref * upstream).sum().backward()
    for ours, ref in ((x.grad, x_ref.grad), (layer.lora_B.grad, B.grad), (layer.lora_A.grad, A.grad),
                      (layer.sparse_values.grad, values.grad), (layer.bias.grad, bias.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.sparse_values.grad, W.grad.view(-1)[layer.sparse_index], rtol=1e-5, atol=1e-6)
    if trainable_scaling:
        torch.testing.assert_close(layer.scaling_theta.grad, theta.grad, rtol=1e-5, atol=1e-6)


def _saved_numel(fn, exclude=None):
    total = 0
    owned = {id(t) for t in [*exclude.parameters(), *exclude.buffers()]} if exclude is not None else set()

    def pack(tensor):
        nonlocal total
        if id(tensor) not in owned:
            total += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_saved_tensor_budget_is_a_dense_layers():
    # the only activation saved is x: everything else is the layer's own parameters/buffers
    layer = SLTrainLinear(1024, 1024, rank=32, delta=0.03)
    x = torch.randn(4, 1024, requires_grad=True)
    ours = _saved_numel(lambda: layer(x))
    nnz = int(0.03 * 1024 * 1024)
    assert ours == 4 * 1024 + 2 * 32 * 1024 + 2 * nnz + 1  # x, B, A, values, index and the 0-d s: ~0.13 M
    assert ours < 1024 * 1024
    assert _saved_numel(lambda: layer(x), exclude=layer) == x.numel()  # activations: exactly a dense layer's
    naive = _saved_numel(lambda: F.linear(x, layer.dense_weight().requires_grad_(), layer.bias))
    assert naive >= 1024 * 1024  # the naive dense path saves W: the budget check can fail


def test_parameter_count():
    layer = SLTrainLinear(96, 160, rank=8, delta=0.03)
    assert sum(p.numel() for p in layer.parameters()) == 8 * (96 + 160) + int(0.03 * 96 * 160) + 160


def test_support_fixed_and_weight_exactly_low_rank_off_support_after_training():
    layer = SLTrainLinear(32, 48, rank=4, delta=0.05)
    index = layer.sparse_index.clone()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(10):
        layer(torch.randn(8, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.sparse_index, index)
    residual = (layer.dense_weight() - layer.lora_B @ layer.scaled_A()).view(-1)
    off_support = torch.ones_like(residual, dtype=torch.bool)
    off_support[index] = False
    assert torch.count_nonzero(residual[off_support]) == 0
    assert torch.count_nonzero(layer.lora_B) > 0  # B moved away from 0


def test_effective_weight_is_full_rank_at_init():
    layer = SLTrainLinear(256, 256, rank=8, delta=0.03)
    assert torch.linalg.matrix_rank(layer.dense_weight()) > 8


def test_trainable_scaling_gets_a_gradient_and_model_conversion():
    layer = SLTrainLinear(16, 16, rank=2, delta=0.1, trainable_scaling=True)
    torch.nn.init.normal_(layer.lora_B)
    layer(torch.randn(4, 16)).sum().backward()
    assert layer.scaling_theta.grad is not None and layer.scaling_theta.grad.abs() > 0
    model = torch.nn.ModuleDict({"attn": torch.nn.Linear(8, 8), "lm_head": torch.nn.Linear(8, 4)})
    assert sltrain_model(model, rank=2, delta=0.1) == ["attn"]
    assert isinstance(model["attn"], SLTrainLinear) and isinstance(model["lm_head"], torch.nn.Linear)
    with pytest.raises(ConfigError, match="delta"):
        SLTrainLinear(8, 8, rank=2, delta=1.5)
