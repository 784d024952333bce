"""LOST (arXiv 2508.02668): spec section 2(a) property tests."""
import math

import pytest
import torch
import torch.nn.functional as F

from rankwise.core.errors import ConfigError
from rankwise.pretrain.lost import LOSTLinear, lost_split


def test_init_split_reproduces_w0_and_complement_is_orthogonal_to_top_subspace():
    W0 = torch.randn(40, 30, dtype=torch.float64)
    B, A, _, _ = lost_split(W0, rank=6, keep=30)
    complement = W0 - B @ A
    torch.testing.assert_close(B @ A + complement, W0, atol=1e-10, rtol=0)
    U = torch.linalg.svd(W0)[0][:, :6]
    assert (U.T @ complement).norm() < 1e-10


def test_columns_are_the_strongest_of_the_complement_not_of_w0():
    g = torch.Generator().manual_seed(0)
    out, inp = 32, 24
    # top singular direction concentrated on columns 0-3; the remainder is strongest on columns 10-13
    v = torch.zeros(inp, dtype=torch.float64)
    v[:4] = 0.5
    u = torch.randn(out, generator=g, dtype=torch.float64)
    rest = torch.randn(out, inp, generator=g, dtype=torch.float64) * 0.01
    rest[:, 10:14] += torch.randn(out, 4, generator=g, dtype=torch.float64) * 0.5
    W0 = 20 * torch.outer(u / u.norm(), v) + rest
    _, _, columns, sparse = lost_split(W0, rank=1, keep=4)
    assert columns.tolist() == [10, 11, 12, 13]
    assert set(torch.topk(W0.norm(dim=0), 4).indices.tolist()) != set(columns.tolist())  # W0-norm rule fails
    complement = W0 - torch.linalg.svd(W0)[0][:, :1] @ (torch.linalg.svd(W0)[0][:, :1].T @ W0)
    torch.testing.assert_close(sparse, complement[:, columns])


@pytest.mark.parametrize("activation", ["silu", "none"])
def test_forward_is_the_gather_formula_and_sparse_gradient(activation):
    layer = LOSTLinear(20, 12, rank=3, sparsity=0.2, gamma=0.7, activation=activation)
    x = torch.randn(2, 5, 20)
    act = F.silu if activation == "silu" else (lambda t: t)
    expected = (0.7 * act(x @ layer.lora_A.T) @ layer.lora_B.T
                + 0.3 * x[..., layer.columns] @ layer.sparse_weight.T + layer.bias)
    y = layer(x)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    expected_grad = 0.3 * upstream.reshape(-1, 12).T @ x.reshape(-1, 20)[:, layer.columns]
    torch.testing.assert_close(layer.sparse_weight.grad, expected_grad, rtol=1e-5, atol=1e-5)


def test_parameter_count_and_config_checks():
    layer = LOSTLinear(64, 48, rank=8, sparsity=0.05, gamma=0.5)
    k = math.ceil(0.05 * 64)
    assert sum(p.numel() for p in layer.parameters()) == 8 * (64 + 48) + 48 * k + 48
    assert LOSTLinear(64, 48, rank=8, gamma=1.0).columns.numel() == 0  # the SVD-init low-rank-only arm
    with pytest.raises(ConfigError, match="gamma"):
        LOSTLinear(8, 8, rank=2, gamma=0.0)
