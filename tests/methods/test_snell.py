"""SNELL spec checks (docs: /work/shared/specs/methods-adapters-a.md section 9)."""
import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.linalg import competition_sparsify, distance_kernel


def _adapt(d_in=48, d_out=40, **kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d_in, d_out))
    reference = copy.deepcopy(base)
    cfg = {"low_rank_dim": 4, "sparsity": 0.3, "target_modules": ["0"], **kw}
    return rankwise.adapt(base, rankwise.SnellConfig(**cfg)), reference


def _adapter(model):
    return model.model[0].adapters["default"]


def test_kernel_matches_explicit_loop():
    model, _ = _adapt(d_in=6, d_out=5)
    a = _adapter(model)
    K = a.kernel(a.lora_In, a.lora_Out)
    loop = torch.zeros(6, 5)
    for i in range(6):
        for o in range(5):
            loop[i, o] = sum(c * torch.linalg.norm(a.lora_In[h, i] - a.lora_Out[h, o]) for h, c in enumerate((0.1, -0.1)))
    torch.testing.assert_close(K, loop, atol=1e-6, rtol=1e-6)


def test_distance_kernel_is_full_rank_where_linear_kernel_is_not():
    model, _ = _adapt(sparsity=0.0)
    a = _adapter(model)
    left, right = a.lora_In.detach().double(), a.lora_Out.detach().double()
    K = distance_kernel(left, right, a.coefficients.double())
    linear = torch.einsum("hik,hok->io", left, right)  # the same factors under LoRA's linear kernel
    assert torch.linalg.matrix_rank(K) == 40
    assert torch.linalg.matrix_rank(linear) <= 4


@pytest.mark.parametrize("s", [0.0, 0.3, 0.9])
def test_sparsity_level_every_forward(s):
    model, _ = _adapt(sparsity=s)
    a = _adapter(model)
    for _ in range(2):
        share = torch.count_nonzero(a.delta_weight(None)).item() / (48 * 40)
        assert abs(share - (1 - s)) <= 1 / (48 * 40) + 1e-9
        with torch.no_grad():
            a.lora_In.add_(0.1 * torch.randn_like(a.lora_In))


def test_competition_gradient_matches_closed_form():
    torch.manual_seed(0)
    left = torch.randn(2, 6, 2, dtype=torch.float64, requires_grad=True)
    right = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    coeffs = torch.tensor([0.1, -0.1], dtype=torch.float64)
    # the survivors' gradient is the incoming gradient scaled by their own detached magnitude
    K = distance_kernel(left, right, coeffs)
    upstream = torch.randn(6, 5, dtype=torch.float64)
    (grad_sparse,) = torch.autograd.grad((competition_sparsify(K, 0.3) * upstream).sum(), left)
    K = distance_kernel(left, right, coeffs)
    magnitude = K.detach().abs()
    keep = magnitude > magnitude.flatten().kthvalue(round(0.3 * 30)).values
    (grad_manual,) = torch.autograd.grad((K * (upstream * magnitude * keep)).sum(), left)
    torch.testing.assert_close(grad_sparse, grad_manual)


def test_checkpointing_agrees_and_keeps_no_in_by_out_tensor():
    results = {}
    for ck in (True, False):
        model, _ = _adapt(d_in=64, d_out=48, checkpoint=ck)
        model.train()
        saved = []
        x = torch.randn(3, 64)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = model(x)
        out.pow(2).sum().backward()
        a = _adapter(model)
        base_ptr = model.model[0].weight.data_ptr()
        biggest = max(t.numel() for t in saved if t.data_ptr() != base_ptr)
        results[ck] = (out.detach(), a.lora_In.grad.clone(), biggest)
    torch.testing.assert_close(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1])
    assert results[True][2] < 64 * 48 <= results[False][2]


def test_trainable_count():
    model, _ = _adapt(low_rank_dim=8)
    assert model.trainable_summary()["trainable"] == 8 * (48 + 40)


def test_reference_init_is_nonzero_and_zero_init_is_exact():
    model, reference = _adapt()
    assert torch.count_nonzero(_adapter(model).delta_weight(None)) > 0
    model, reference = _adapt(zero_init=True)
    assert torch.count_nonzero(_adapter(model).delta_weight(None)) == 0
    x = torch.randn(4, 48)
    torch.testing.assert_close(model(x), reference(x))


def test_zero_init_still_trains():
    # the subtracted initial kernel is a constant; the difference must keep the factors' graph
    model, _ = _adapt(zero_init=True)
    model(torch.randn(4, 48)).pow(2).sum().backward()
    adapter = _adapter(model)
    assert adapter.lora_In.grad is not None and adapter.lora_In.grad.abs().sum() > 0
    assert adapter.lora_Out.grad is not None and adapter.lora_Out.grad.abs().sum() > 0


@pytest.mark.parametrize("field,value", [("low_rank_dim", 3), ("low_rank_dim", 0), ("sparsity", 1.0),
                                         ("sparsity", -0.1), ("competition", "top"), ("zero_init", 1), ("dropout", 2)])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.SnellConfig(target_modules=["x"], **{field: value})


def test_conv_kernel_update_including_depthwise():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 12, 1))
    model = rankwise.adapt(base, rankwise.SnellConfig(low_rank_dim=4, sparsity=0.2, target_modules=["0", "1"]))
    depthwise = model.model[0].adapters["default"]
    assert depthwise.lora_In.shape == (2, 9, 2) and depthwise.delta_weight(None).shape == (8, 1, 3, 3)
    x = torch.randn(2, 8, 5, 5)
    expected = nn.functional.conv2d(x, base[0].base_layer.weight + depthwise.delta_weight(None), base[0].base_layer.bias,
                                    padding=1, groups=8)
    torch.testing.assert_close(model.model[0](x), expected, atol=1e-5, rtol=1e-5)
