"""LoRA-GGPO (arXiv 2502.14538 v1): the spec's checks (methods-adapters-b.md B3 §2)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from train_helpers import batcher, ce_loss, lora_mlp, task, trainable

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.ggpo import GGPO, typical_row_norm
from rankwise.train.loop import TrainConfig, train


class One(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def one_layer(n_in=12, n_out=6, dtype=torch.float32, r=3):
    torch.manual_seed(0)
    model = rankwise.adapt(One(n_in, n_out), rankwise.LoraConfig(r=r, lora_alpha=6, target_modules=["lin"], init_lora_weights=False))
    return model.to(dtype)


def backward_once(model, proc, x):
    model(x).pow(2).sum().backward()
    proc.after_backward(None)


def test_no_perturbation_before_first_update_nor_in_eval_nor_at_zero_coefficients():
    model = one_layer()
    x = torch.randn(4, 12)
    plain = model(x).detach()
    proc = GGPO(model, sigma=0.5, beta=0.5)
    torch.testing.assert_close(model(x), plain)  # first step: norms not set yet
    backward_once(model, proc, x)
    assert not torch.allclose(model(x), plain)
    model.eval()
    torch.testing.assert_close(model(x), plain)
    zero = one_layer()
    proc0 = GGPO(zero, sigma=0.0, beta=0.0)
    backward_once(zero, proc0, x)
    zero.train()
    torch.testing.assert_close(zero(x), plain)


def test_norms_match_dense_reference():
    model = one_layer()
    proc = GGPO(model)
    x = torch.randn(4, 12)
    backward_once(model, proc, x)
    a = model.model.lin.adapters["default"]
    s, A, B = a.scaling, a.lora_A, a.lora_B
    G = s * (B @ A.grad + B.grad @ A)
    torch.testing.assert_close(proc.grad_norms["lin"], G.norm(dim=1))
    m0 = typical_row_norm(model.model.lin.weight_matrix())
    torch.testing.assert_close(m0, float(model.model.lin.weight_matrix().norm(dim=1).mean()))
    torch.testing.assert_close(proc.weight_norms["lin"], (m0**2 + (s * B @ A).norm(dim=1) ** 2).sqrt())


def test_perturbation_std_per_row():
    torch.manual_seed(0)
    model = one_layer(n_in=4096, n_out=8, r=2)
    proc = GGPO(model, sigma=0.03, beta=0.01)
    backward_once(model, proc, torch.randn(2, 4096))
    eye = torch.eye(4096)
    with torch.no_grad():
        lora_out = model(eye)
        noise_rows = (lora_out - model(eye)).T  # difference of two independent draws: std * sqrt(2)
    expected = proc.perturbation_scale("lin") * math.sqrt(2)
    assert torch.all((noise_rows.std(dim=1) / expected - 1).abs() < 0.03)


def test_gradients_are_lora_gradients_at_the_perturbed_point():
    model = one_layer(dtype=torch.float64)
    proc = GGPO(model, sigma=0.3, beta=0.3)
    x = torch.randn(5, 12, dtype=torch.float64)
    backward_once(model, proc, x)
    model.zero_grad()
    torch.manual_seed(7)
    model(x).pow(2).sum().backward()
    a = model.model.lin.adapters["default"]
    torch.manual_seed(7)
    E = torch.randn(6, 12, dtype=torch.float64) * proc.perturbation_scale("lin")[:, None]
    A, B = a.lora_A.detach().clone().requires_grad_(), a.lora_B.detach().clone().requires_grad_()
    W0, bias = model.model.lin.base_layer.weight, model.model.lin.base_layer.bias
    y = x @ (W0 + a.scaling * B @ A + E).T + bias
    gA, gB = torch.autograd.grad(y.pow(2).sum(), (A, B))
    torch.testing.assert_close(a.lora_A.grad, gA, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.lora_B.grad, gB, rtol=1e-10, atol=1e-10)


def test_trains_and_resumes_exactly(tmp_path):
    x, y = task(32)
    results = []
    for stop, resume, out in ((None, False, "full"), (5, False, "cut"), (None, True, "cut")):
        model = lora_mlp(seed=4)
        proc = GGPO(model, sigma=0.05, beta=0.05)
        config = TrainConfig(epochs=3, lr=1e-2, checkpoint_every=2)
        train(model, batcher(x, y), ce_loss, config, callbacks=[proc], progress=False, output_dir=tmp_path / out,
              stop_after=stop, resume_from="latest" if resume else None)
        results.append(trainable(model))
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[2][name]), name


def test_bad_settings():
    with pytest.raises(ConfigError, match="sigma"):
        GGPO(lora_mlp(), sigma=-1)
    with pytest.raises(ConfigError, match="norm_dim"):
        GGPO(lora_mlp(), norm_dim="rows")
    with pytest.raises(ConfigError, match="LoRA"):
        GGPO(One(3, 3))
