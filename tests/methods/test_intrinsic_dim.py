"""Spec checks for intrinsic dimension (arXiv 1804.08838), methods-theory.md section 6(a, b)."""
import pytest
import torch
from torch import nn

from rankwise import ConfigError
from rankwise.analysis.intrinsic_dim import (
    DenseProjection,
    FastfoodProjection,
    SubspaceModel,
    intrinsic_dimension_sweep,
)
from rankwise.linalg import fwht


def implied_matrix(projection, d):
    return torch.stack([projection(column) for column in torch.eye(d)], dim=1)  # (D, d)


def test_fwht_equals_the_hadamard_matrix():
    from scipy.linalg import hadamard

    x = torch.randn(3, 16, dtype=torch.float64)
    assert torch.allclose(fwht(x), x @ torch.tensor(hadamard(16), dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(torch.randn(12))


def test_fastfood_columns_are_nearly_orthonormal():
    P = implied_matrix(FastfoodProjection(1000, 50, seed=0), 50)
    norms = P.norm(dim=0)
    assert ((norms - 1).abs() < 0.05).all()  # spec: 1 +- 0.6 % at this size
    gram = P.T @ P
    assert (gram - torch.diag(gram.diag())).abs().max() <= 0.15  # spec: <= 0.12


def test_dense_columns_have_unit_norm():
    P = DenseProjection(500, 20, seed=1).P
    assert torch.allclose(P.norm(dim=0), torch.ones(20), atol=1e-6)
    assert not torch.allclose(P.norm(dim=1), P.norm(dim=1)[0].expand(500), atol=1e-3)  # rows are not normalised


def test_subspace_with_identity_projection_equals_direct_training():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    direct = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    direct.load_state_dict(net.state_dict())
    D = sum(p.numel() for p in net.parameters())
    sub = SubspaceModel(net, D, "dense")
    sub.projection.P = torch.eye(D)
    x, y = torch.randn(16, 4), torch.randint(2, (16,))
    for model in (sub, direct):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(5):
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    trained = torch.cat([p.reshape(-1) for p in direct.parameters()])
    assert torch.allclose(sub.theta0 + sub.theta_d, trained, atol=1e-6)
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["theta_d"]


def test_projection_is_fixed_during_training():
    torch.manual_seed(0)
    sub = SubspaceModel(nn.Linear(8, 4), 5, "fastfood", seed=3)
    first = sub.full_parameters()["weight"].clone()
    assert torch.equal(first, sub.full_parameters()["weight"])  # same P every call (theta_d = 0)
    with torch.no_grad():
        sub.theta_d.add_(1.0)
    moved = sub.full_parameters()["weight"] - first
    with torch.no_grad():
        sub.theta_d.add_(1.0)
    assert torch.allclose(sub.full_parameters()["weight"] - first, 2 * moved, atol=1e-6)  # linear in theta_d


def test_bad_config():
    with pytest.raises(ConfigError, match="d="):
        SubspaceModel(nn.Linear(2, 2), 7)
    with pytest.raises(ConfigError, match="projection"):
        SubspaceModel(nn.Linear(2, 2), 2, "sparse")
    with pytest.raises(ConfigError, match="dims"):
        intrinsic_dimension_sweep([])


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_digits_sweep_is_monotone_with_d_int90_in_the_spec_range(projection):
    result = intrinsic_dimension_sweep([20, 160, 320], projection=projection, seeds=(0,), baseline=0.974)
    accuracy = [result["accuracy"][d] for d in (20, 160, 320)]
    assert accuracy == sorted(accuracy)
    assert result["d_int90"] == 320  # spec: d_int90 in (160, 320] for FC 64-100-100-10 (D = 17,610)
    assert result["D"] == 17610
