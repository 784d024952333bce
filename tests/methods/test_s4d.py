"""Spec checks for S4D (arXiv 2206.11893), methods-theory.md section 5(a)."""
import math

import pytest
import torch

from rankwise import ConfigError, ShapeError
from rankwise.layers.s4d import S4D, S4DClassifier, s4d_init_A


def double_layer(init, discretization, H=4, N=64):
    torch.manual_seed(0)
    layer = S4D(H, N, init=init, discretization=discretization).double()
    with torch.no_grad():  # random C and dt, as in the spec's check
        layer.kernel.C.copy_(torch.randn_like(layer.kernel.C))
        layer.kernel.log_dt.uniform_(math.log(1e-3), math.log(1e-1))
    return layer.requires_grad_(False)


@pytest.mark.parametrize("init", ["lin", "inv"])
@pytest.mark.parametrize("discretization", ["zoh", "bilinear"])
def test_fft_convolution_equals_the_recurrence(init, discretization):
    layer = double_layer(init, discretization)
    u = torch.randn(2, 4, 512, dtype=torch.float64)
    conv, scan = layer.ssm(u), layer.ssm_recurrent(u)
    assert float((conv - scan).abs().max() / scan.abs().max()) < 1e-12
    assert torch.allclose(layer(u), layer.forward_recurrent(u), atol=1e-10)


def test_toy_kernels_the_spec_rejects_differ_from_the_recurrence():
    layer = double_layer("lin", "zoh")
    u = torch.randn(1, 4, 256, dtype=torch.float64)
    scan = layer.ssm_recurrent(u)
    K = layer.kernel(256)
    Ab, Bb = layer.kernel.discrete()
    dt = torch.exp(layer.kernel.log_dt)[:, None]
    vandermonde = Ab[:, :, None] ** torch.arange(256)
    C = torch.view_as_complex(layer.kernel.C)
    without_two_re = torch.einsum("hn,hnl->hl", C * Bb, vandermonde).real
    euler_b = 2 * torch.einsum("hn,hnl->hl", C * dt, vandermonde).real
    D_u = layer.D[:, None] * u

    def causal(kernel):
        L = u.shape[-1]
        return torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(kernel, n=2 * L), n=2 * L)[..., :L] + D_u

    circular = torch.fft.irfft(torch.fft.rfft(u) * torch.fft.rfft(K), n=256) + D_u
    assert torch.allclose(causal(K), scan, atol=1e-10)
    for toy in (causal(without_two_re), causal(euler_b), circular):
        assert float((toy - scan).abs().max() / scan.abs().max()) > 1e-3


def test_initialisations_match_the_reference_formulas():
    N = 64
    n = torch.arange(N // 2, dtype=torch.float64)
    lin, inv = s4d_init_A(N, "lin"), s4d_init_A(N, "inv")
    assert torch.allclose(lin, torch.complex(torch.full_like(n, -0.5), math.pi * n))
    assert torch.allclose(inv.imag, 1 / math.pi * N * (N / (1 + 2 * n) - 1))
    assert torch.allclose(s4d_init_A(N, "real").real, -(n + 1))
    assert (s4d_init_A(N, "rand", torch.Generator().manual_seed(0)).imag > 0).all()


def test_parameter_count_of_the_minimal_layer():
    assert sum(p.numel() for p in S4D(64, 64).parameters()) == 2 * 64 * 64 + 2 * 64**2 + 4 * 64 == 16640


def test_classifier_trains_and_groups_ssm_parameters():
    model = S4DClassifier(1, 3, d_model=8, d_state=8, n_layers=2)
    groups = model.param_groups(lr=0.01)
    assert groups[1]["lr"] == 1e-3 and groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 6
    x = torch.randn(32, 32, 1)
    y = (x[:, :4, 0].sum(1) > 0).long() + (x[:, -4:, 0].sum(1) > 0).long()  # depends on both ends
    optimizer = torch.optim.AdamW(groups)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_bad_config_and_shapes():
    with pytest.raises(ConfigError, match="d_state"):
        S4D(4, 7)
    with pytest.raises(ConfigError, match="init"):
        S4D(4, 8, init="legs2")
    with pytest.raises(ConfigError, match="discretization"):
        S4D(4, 8, discretization="euler")
    with pytest.raises(ShapeError, match="H=4"):
        S4D(4, 8)(torch.randn(2, 5, 10))


@pytest.mark.slow
def test_permuted_digits_demo_learns_the_long_range_task():
    from rankwise.layers.s4d_demo import run_sequence_demo

    result = run_sequence_demo(init="lin", epochs=15, seed=0)
    assert result["test_accuracy"] > 0.85  # 10 classes: chance is 0.1


def test_digits_without_scikit_learn_name_the_install(monkeypatch):
    import sys

    from rankwise.core.errors import CheckpointError
    from rankwise.layers.s4d_demo import permuted_digits

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import of it now raises ImportError
    with pytest.raises(CheckpointError, match="pip install scikit-learn"):
        permuted_digits()
