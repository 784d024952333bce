"""The fused core path (linalg.FusedCoreLinear) shared by SVFit, LoLDU (diagonal cores) and SALT (a dense k x k
core): same outputs and gradients as the unfused paths; diagonal cores take it only when it is cheaper."""
import pytest
import torch
from torch import nn

import rankwise
from rankwise.linalg import FusedCoreLinear, fused_core_forward


@pytest.mark.parametrize("core_shape", [(3,), (3, 3)])
def test_fused_core_passes_gradcheck(core_shape):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(4, 5, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    left, right = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(3, 5, generator=gen, dtype=torch.float64)
    core = torch.randn(*core_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: FusedCoreLinear.apply(x, weight, bias, left, c, right), (x, core))


def _adapted(method, **options):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 40))
    config = rankwise.get_method(method).config_cls(target_modules=["0"], **options)
    model = rankwise.adapt(base, config)
    for p in model.parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))  # move off the zero-delta start
    return model


@pytest.mark.parametrize("method,options", [("loldu", {}), ("svfit", {"energy": 1.0})])
def test_fused_equals_skinny_and_is_chosen_by_cost(method, options):
    model = _adapted(method, **options)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    x = torch.randn(8, 32, 48, requires_grad=True)  # 256 tokens, r = 40: fusing is cheaper
    fused = adapter.fused_forward(x, layer)
    assert fused is not None
    fused.pow(2).sum().backward()
    grads_fused = [t.grad.clone() for t in (x, *trainable)]
    for t in (x, *trainable):
        t.grad = None
    skinny = adapter(x, layer.base_layer(x), layer)
    skinny.pow(2).sum().backward()
    torch.testing.assert_close(fused, skinny, atol=1e-4, rtol=1e-4)
    for got, t in zip(grads_fused, (x, *trainable)):
        assert (got - t.grad).norm() <= 1e-5 * t.grad.norm()
    assert adapter.fused_forward(x[:, :1], layer) is None, "8 tokens: forming W + delta costs more than the skinny path"


def test_small_core_trains_on_the_skinny_path_and_infers_fused():
    model = _adapted("loldu", r=2)
    layer = model.model[0]
    x, left, right = torch.randn(8, 32, 48), torch.randn(40, 2), torch.randn(2, 48)
    diag = torch.randn(2, requires_grad=True)
    # training: g^T x (tokens x out x in) would dwarf the skinny products (tokens x 2 x (in + out))
    assert fused_core_forward(x, layer, left, diag, right) is None
    with torch.no_grad():  # inference: forming W + delta (out x 2 x in) is cheaper than two skinny products
        fused = fused_core_forward(x, layer, left, diag, right)
        torch.testing.assert_close(fused, layer.base_layer(x) + (x @ right.T * diag) @ left.T, atol=1e-5, rtol=1e-5)


def test_salt_fused_equals_autograd_through_delta_weight():
    model = _adapted("salt", r_lora=4, t=4)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    trainable = [p for p in adapter.parameters() if p.requires_grad]
    x = torch.randn(4, 16, 48, requires_grad=True)
    fused = adapter.fused_forward(x, layer)
    fused.pow(2).sum().backward()
    grads_fused = [t.grad.clone() for t in (x, *trainable)]
    for t in (x, *trainable):
        t.grad = None
    weight = layer.weight_matrix()
    reference = torch.nn.functional.linear(x, weight + adapter.delta_weight(weight), layer.base_layer.bias)
    reference.pow(2).sum().backward()
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    for got, t in zip(grads_fused, (x, *trainable)):
        assert (got - t.grad).norm() <= 1e-5 * t.grad.norm()
