"""TRP (arXiv 1812.02402 / 2004.14566): the spec's checks (methods-adapters-b.md B3 §3)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import accuracy, batcher, ce_loss, task

from rankwise.core.errors import CheckpointError, ConfigError, TargetError
from rankwise.linalg import energy_rank
from rankwise.train.loop import TrainConfig, TrainState, train
from rankwise.train.trp import TRP, decompose, default_targets, load_low_rank, save_low_rank
from toy_models import MLP, ConvNet


def at_step(model, step):
    return TrainState(model, None, None, step=step)


def test_energy_rank_is_the_smallest_rank_reaching_the_threshold():
    S = torch.linalg.svdvals(torch.randn(32, 72, generator=torch.Generator().manual_seed(0)))
    k = energy_rank(S, 0.9)
    energy = torch.cumsum(S**2, 0) / (S**2).sum()
    assert energy[k - 1] >= 0.9 > energy[k - 2]


def test_projection_and_subgradient():
    torch.manual_seed(0)
    model = MLP()
    W = model.lin0.weight.detach().clone()
    proc = TRP(model, energy=0.9, nuclear_weight=1e-2)
    proc.on_step_start(at_step(model, 0))
    S = torch.linalg.svdvals(W)
    k = energy_rank(S, 0.9)
    Wk = model.lin0.weight.detach()
    assert torch.linalg.matrix_rank(Wk) == k == proc.rank_history[0]["lin0"]
    torch.testing.assert_close(torch.linalg.matrix_norm(W - Wk) ** 2, (S[k:] ** 2).sum(), rtol=1e-4, atol=1e-5)
    sub = proc.subgradients["lin0"]
    torch.testing.assert_close(torch.linalg.matrix_norm(sub, 2), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((sub * Wk).sum(), torch.linalg.svdvals(Wk).sum(), rtol=1e-4, atol=1e-4)
    model(torch.randn(3, 16)).sum().backward()
    grad = model.lin0.weight.grad.clone()
    proc.after_backward(None)
    torch.testing.assert_close(model.lin0.weight.grad, grad + 1e-2 * sub)


def test_only_every_period_and_no_projection_mode():
    torch.manual_seed(0)
    model = MLP()
    W = model.lin0.weight.detach().clone()
    proc = TRP(model, period=3, project=False)
    proc.on_step_start(at_step(model, 0))
    assert torch.equal(model.lin0.weight, W) and "lin0" in proc.subgradients
    proc.on_step_start(at_step(model, 1))
    assert proc.subgradients == {}


def test_default_targets_skip_first_conv_and_1x1():
    assert default_targets(ConvNet()) == ["conv2", "fc"]


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_decompose_keeping_all_values_is_exact(case, tmp_path):
    torch.manual_seed(0)
    model, x = (MLP(), torch.randn(5, 16)) if case == "linear" else (ConvNet(), torch.randn(2, 3, 8, 8))
    expected = model(x).detach()
    ranks = decompose(model, value_threshold=0.0)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    save_low_rank(model, ranks, tmp_path)
    torch.manual_seed(1)
    reloaded = load_low_rank(MLP() if case == "linear" else ConvNet(), tmp_path)
    torch.testing.assert_close(reloaded(x), model(x))


def test_trp_training_ends_low_rank_and_decomposes_without_loss(tmp_path):
    x, y = task(64)
    torch.manual_seed(0)
    model = MLP()
    proc = TRP(model, energy=0.9, nuclear_weight=3e-4)
    train(model, batcher(x, y, 16), ce_loss, TrainConfig(epochs=20, lr=1e-2), callbacks=[proc], progress=False)
    proc.on_step_start(at_step(model, 0))  # a last projection, as the final TRP step would leave it
    before = accuracy(model, x, y)
    dense = sum(p.numel() for p in model.parameters())
    ranks = decompose(model, value_threshold=0.05)
    assert accuracy(model, x, y) == pytest.approx(before, abs=1 / 64)
    assert sum(p.numel() for p in model.parameters()) < dense
    assert all(ranks[n] <= proc.rank_history[-1][n] for n in ranks)
    assert proc.report(tmp_path / "trp.png").row_count == len(ranks) + 1


def test_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="energy"):
        TRP(MLP(), energy=1.5)
    with pytest.raises(ConfigError, match="period"):
        TRP(MLP(), period=0)
    with pytest.raises(ConfigError, match="nuclear_weight"):
        TRP(MLP(), nuclear_weight=-1)
    with pytest.raises(TargetError, match="relu"):
        TRP(MLP(), target_modules=["relu"])
    with pytest.raises(TargetError, match="no nn.Linear"):
        TRP(nn.Sequential(nn.ReLU()))
    with pytest.raises(CheckpointError, match="not a TRP"):
        load_low_rank(MLP(), tmp_path)


class SquareConvs(nn.Module):
    """Two 3x3 convs with padding and a stride, then a head: what the VH / ND schemes split."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.wide = nn.Conv2d(6, 5, (3, 5), padding=(1, 2), dilation=(1, 1))
        self.fc = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        h = torch.relu(self.wide(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.fc(h.flatten(1))


def test_vh_view_round_trips():
    W = torch.randn(6, 8, 3, 5)
    from rankwise.train.trp import from_matrix_view, matrix_view

    M = matrix_view(W, "vh")
    assert M.shape == (8 * 3, 6 * 5)
    assert torch.equal(from_matrix_view(M, W, "vh"), W)
    assert torch.equal(M[2 * 3 + 1, 4 * 5 + 3], W[4, 2, 1, 3])  # row (c, h), column (n, w)
    assert matrix_view(W, "nd").shape == (6, 8, 15)


@pytest.mark.parametrize("scheme", ["vh", "nd"])
def test_decompose_conv_schemes_keeping_everything_is_exact(scheme, tmp_path):
    torch.manual_seed(0)
    model, x = SquareConvs(), torch.randn(2, 3, 8, 8)
    expected = model(x).detach()
    schemes = {}
    ranks = decompose(model, ["conv", "wide", "fc"], value_threshold=0.0, energy=None if scheme == "vh" else 1.0,
                      scheme=scheme, schemes=schemes)
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert schemes == {"conv": scheme, "wide": scheme, "fc": "nc"}  # Linear: the one matrix view
    if scheme == "vh":
        assert model.conv[0].kernel_size == (3, 1) and model.conv[1].kernel_size == (1, 3)
        assert ranks["conv"] == min(8 * 3, 6 * 3)
    else:
        assert len(model.conv.paths) == ranks["conv"] == min(8, 9)
        assert model.conv.paths[0][1].groups == 6
    save_low_rank(model, ranks, tmp_path, schemes)
    torch.manual_seed(1)
    reloaded = load_low_rank(SquareConvs(), tmp_path)
    torch.testing.assert_close(reloaded(x), model(x))


@pytest.mark.parametrize("scheme", ["vh", "nd"])
def test_training_projection_uses_the_scheme(scheme):
    from rankwise.train.trp import from_matrix_view, matrix_view

    torch.manual_seed(0)
    model = SquareConvs()
    W = model.conv.weight.detach().clone()
    proc = TRP(model, target_modules=["conv"], energy=0.8, scheme=scheme)
    proc.on_step_start(at_step(model, 0))
    Wk = model.conv.weight.detach()
    M, Mk = matrix_view(W, scheme), matrix_view(Wk, scheme)
    if scheme == "vh":
        k = energy_rank(torch.linalg.svdvals(M), 0.8)
        assert torch.linalg.matrix_rank(Mk) == k == proc.rank_history[0]["conv"]
        assert torch.linalg.matrix_rank(Wk.flatten(1)) > k or k >= 6  # not the NC projection
    else:
        ks = [energy_rank(s, 0.8) for s in torch.linalg.svdvals(M)]
        assert [int(torch.linalg.matrix_rank(m)) for m in Mk] == ks and proc.rank_history[0]["conv"] == max(ks)
    sub = from_matrix_view(matrix_view(proc.subgradients["conv"], scheme), W, scheme)
    assert torch.equal(sub, proc.subgradients["conv"])


def test_trp_finetune_path_saves_the_scheme(tmp_path):
    import json

    from rankwise.train.procedures import save_dense_low_rank

    x = torch.randn(4, 3, 8, 8)
    torch.manual_seed(0)
    model = SquareConvs()
    proc = TRP(model, target_modules=["conv", "wide"], energy=0.5, scheme="vh")
    proc.on_step_start(at_step(model, 0))
    save_dense_low_rank(model, proc, tmp_path)
    info = json.loads((tmp_path / "low_rank.json").read_text())
    assert set(info["schemes"].values()) <= {"vh"} and info["schemes"]
    torch.manual_seed(1)
    torch.testing.assert_close(load_low_rank(SquareConvs(), tmp_path)(x), model(x))
    # a file written before the schemes existed is all "nc"
    del info["schemes"]
    (tmp_path / "low_rank.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError):
        load_low_rank(SquareConvs(), tmp_path)  # its factor shapes are VH's, so the NC reading must refuse them
    with pytest.raises(ConfigError, match="scheme"):
        TRP(SquareConvs(), scheme="xy")


def test_a_low_rank_file_from_before_the_schemes_loads_as_nc(tmp_path):
    import json

    torch.manual_seed(0)
    model, x = ConvNet(), torch.randn(2, 3, 8, 8)
    ranks = decompose(model, value_threshold=0.0)
    save_low_rank(model, ranks, tmp_path)
    info = json.loads((tmp_path / "low_rank.json").read_text())
    assert info["schemes"] == {n: "nc" for n in ranks}
    del info["schemes"]  # what save_low_rank wrote before issue 20
    (tmp_path / "low_rank.json").write_text(json.dumps(info))
    torch.testing.assert_close(load_low_rank(ConvNet(), tmp_path)(x), model(x))
