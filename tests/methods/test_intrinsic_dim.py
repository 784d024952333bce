"""Spec checks for intrinsic dimension (arXiv 1804.08838), methods-theory.md section 6(a, b)."""
import pytest
import torch
from torch import nn

from rankwise import ConfigError
from rankwise.analysis.intrinsic_dim import (
    DenseProjection,
    FastfoodProjection,
    SparseProjection,
    SubspaceModel,
    fc_network,
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
        SubspaceModel(nn.Linear(2, 2), 2, "lowrank")
    with pytest.raises(ConfigError, match="dims"):
        intrinsic_dimension_sweep([])


def test_sparse_projection_stores_density_times_D_times_d_values():
    """Issue 19 item 11: the paper's sparse projection, density 1/sqrt(D_l) per parameter tensor."""
    d = 200
    sub = SubspaceModel(fc_network(), d, "sparse", seed=0)
    sizes = [p.numel() for p in fc_network().parameters()]
    D = sum(sizes)
    P = sub.projection.P
    assert P.is_sparse and P.shape == (D, d)
    expected = d * sum(size**0.5 for size in sizes)  # sum_l density_l * D_l * d
    assert abs(P._nnz() - expected) < 0.05 * expected
    stored = sum(t.numel() * t.element_size() for t in (P._values(), P._indices()))
    assert stored < 0.1 * D * d * 4  # what is held: ~1.3 % of the dense matrix's entries
    dense = P.to_dense()
    assert torch.allclose(dense.norm(dim=0), torch.ones(d), atol=1e-6)
    first_block = dense[: sizes[0]]  # 64 x 100 weight: density 1/sqrt(6400) = 1/80
    assert abs(float((first_block != 0).float().mean()) - 1 / 80) < 0.002
    column_nnz = (dense != 0).sum(0).float()
    assert torch.allclose(dense.abs().max(0).values, column_nnz.rsqrt())  # +-1/sqrt(nnz): equal magnitudes
    values = dense[dense != 0]
    assert (values > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)  # random signs


def test_sparse_subspace_has_the_same_semantics_as_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = torch.randn(128, 16), torch.randint(4, (128,))
    sub = SubspaceModel(net, 30, "sparse", seed=2)
    assert [n for n, p in sub.named_parameters() if p.requires_grad] == ["theta_d"]
    assert torch.allclose(sub(x), net(x))  # theta_d = 0: the initial network
    P = sub.projection.P.to_dense()
    with torch.no_grad():
        sub.theta_d.normal_()
    flat = torch.cat([t.reshape(-1) for t in sub.full_parameters().values()])
    assert torch.allclose(flat, sub.theta0 + P @ sub.theta_d, atol=1e-6)  # theta = theta_0 + P theta_d
    with torch.no_grad():
        sub.theta_d.zero_()
    assert SubspaceModel(net, 30, "sparse", seed=2).projection.P.to_dense().equal(P)  # fixed by the seed
    optimizer = torch.optim.Adam([sub.theta_d], lr=5e-2)
    losses = []
    for _ in range(40):
        loss = nn.functional.cross_entropy(sub(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_cli_selects_the_sparse_projection(tmp_path):
    from typer.testing import CliRunner

    from rankwise.cli import app

    out = tmp_path / "sweep.json"
    result = CliRunner().invoke(app, ["intrinsic-dim", "--projection", "sparse", "--dims", "10,40", "--seeds", "1",
                                      "--steps", "20", "--output", str(out)])
    assert result.exit_code == 0, result.output
    import json

    sweep = json.loads(out.read_text())
    assert sweep["projection"] == "sparse" and set(sweep["accuracy"]) == {"10", "40"}
    assert CliRunner().invoke(app, ["intrinsic-dim", "--projection", "sparsest", "--dims", "10"]).exit_code == 2


@pytest.mark.slow
@pytest.mark.parametrize("projection", ["dense", "sparse", "fastfood"])
def test_digits_sweep_is_monotone_with_d_int90_in_the_spec_range(projection):
    result = intrinsic_dimension_sweep([20, 160, 320], projection=projection, seeds=(0,), baseline=0.974)
    accuracy = [result["accuracy"][d] for d in (20, 160, 320)]
    assert accuracy == sorted(accuracy)
    assert result["d_int90"] == 320  # spec: d_int90 in (160, 320] for FC 64-100-100-10 (D = 17,610)
    assert result["D"] == 17610
