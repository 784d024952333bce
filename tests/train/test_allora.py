"""ALLoRA (arXiv 2410.09692): the spec's checks (methods-adapters-b.md B3 §1)."""
from __future__ import annotations

import pytest
import torch
from train_helpers import batcher, ce_loss, lora_mlp, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.allora import ALLoRA, AlloraFunction, row_scale
from rankwise.train.loop import TrainConfig, train
from toy_models import MLP


def test_scale_is_eta_at_init():
    model = lora_mlp()
    scales = ALLoRA(model, eta=2.0).row_scales()
    for s in scales.values():
        assert torch.equal(s, torch.full_like(s, 2.0))


@pytest.mark.parametrize("power", [1, 2])
def test_gradients_match_reference(power):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 7, 5, dtype=torch.float64)
    (AlloraFunction.apply(x, A, B, 1.5, power) * upstream).sum().backward()
    # Reference: plain autograd for the input gradient; loss with the row-scaled, detached output gradient for A, B.
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    y = (x2 @ A2.T) @ B2.T
    (gx,) = torch.autograd.grad((y * upstream).sum(), x2, retain_graph=True)
    s = row_scale(A2, B2, 1.5, power)
    gA, gB = torch.autograd.grad((y * upstream * s).sum(), (A2, B2))
    torch.testing.assert_close(x.grad, gx, rtol=0, atol=1e-12)
    torch.testing.assert_close(A.grad, gA, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(B.grad, gB, rtol=1e-12, atol=1e-12)


def test_scale_decreases_with_row_norm_and_is_at_most_eta():
    A = torch.randn(3, 6)
    B = torch.randn(4, 3) * torch.tensor([0.0, 0.1, 1.0, 10.0])[:, None]
    for power in (1, 2):
        s = row_scale(A, B, 3.0, power)
        assert torch.all(s <= 3.0) and torch.all(s[1:] < s[:-1])
    norms = (B @ A).norm(dim=1)
    torch.testing.assert_close(row_scale(A, B, 3.0, 1), (norms + 1 / 9).rsqrt())


def test_forward_is_plain_lora_without_dropout_in_train_and_eval():
    model = lora_mlp(init_lora_weights=False)
    x = torch.randn(5, 16)
    expected = model(x).detach()
    ALLoRA(model)
    model.train()
    torch.testing.assert_close(model(x), expected)
    model.eval()
    torch.testing.assert_close(model(x), expected)


def test_trains_and_saves_plain_lora(tmp_path):
    x, y = task(32)
    model = lora_mlp()
    proc = ALLoRA(model, eta=2.0)
    before = ce_loss(model, (x, y)).item()
    train(model, batcher(x, y), ce_loss, TrainConfig(epochs=5, lr=1e-2), progress=False)
    assert ce_loss(model, (x, y)).item() < before
    assert all(s.min() < 2.0 for s in proc.row_scales().values())  # rows grew, so their scale fell
    model.save_adapter(tmp_path)
    torch.manual_seed(0)  # the same base weights lora_mlp() drew
    reloaded = rankwise.load_adapter(MLP(), tmp_path)
    torch.testing.assert_close(reloaded(x), model(x))


def test_bad_settings():
    with pytest.raises(ConfigError, match="eta"):
        ALLoRA(lora_mlp(), eta=0)
    with pytest.raises(ConfigError, match="norm_power"):
        ALLoRA(lora_mlp(), norm_power=3)
    with pytest.raises(ConfigError, match="scaling"):
        ALLoRA(lora_mlp(lora_alpha=16))
    with pytest.raises(ConfigError, match="dropout"):
        ALLoRA(lora_mlp(lora_dropout=0.1))
    with pytest.raises(ConfigError, match="plain MLP"):
        ALLoRA(MLP())


def test_default_exponent_is_the_papers_inverse_norm():
    """The paper: a coefficient inversely proportional to the l2 norm, s = (||(BA)_i||^2 + 1/eta^2)^(-1/2).
    Before, the default was p=1, whose s decays only like ||.||^(-1/2)."""
    model = lora_mlp()
    proc = ALLoRA(model, eta=2.0)
    assert proc.norm_power == 2
    A = torch.randn(3, 6)
    B = torch.randn(4, 3) * torch.tensor([0.5, 1.0, 10.0, 100.0])[:, None]
    norms = (B @ A).norm(dim=1)
    s = row_scale(A, B, 2.0, proc.norm_power)
    torch.testing.assert_close(s, (norms**2 + 0.25).rsqrt())
    assert abs(float(s[-1] * norms[-1]) - 1) < 1e-4  # ~ 1 / norm for a row that moved far


def test_exponent_is_recorded_and_an_old_checkpoint_resumes_only_with_p1(tmp_path):
    from rankwise.core.errors import CheckpointError
    from rankwise.train.procedures import finish_procedure

    x, y = task(32)
    model = lora_mlp()
    proc = ALLoRA(model)
    assert finish_procedure(proc)["settings"] == {"eta": 2.0, "norm_power": 2}
    config = TrainConfig(epochs=2, lr=1e-2, checkpoint_every=2)
    train(model, batcher(x, y), ce_loss, config, callbacks=[proc], progress=False, output_dir=tmp_path / "run", stop_after=2)
    # the same run resumes; a different exponent is refused, naming the fix
    m2 = lora_mlp()
    train(m2, batcher(x, y), ce_loss, config, callbacks=[ALLoRA(m2)], progress=False, output_dir=tmp_path / "run",
          resume_from="latest")
    m3 = lora_mlp()
    with pytest.raises(CheckpointError, match="norm_power=2"):
        train(m3, batcher(x, y), ce_loss, config, callbacks=[ALLoRA(m3, norm_power=1)], progress=False,
              output_dir=tmp_path / "run", resume_from="latest")
    # a checkpoint from before the exponent was recorded (no callback state) trained with p=1
    legacy = ALLoRA(lora_mlp(), norm_power=1)
    legacy.load_state_dict({}, None)
    with pytest.raises(CheckpointError, match="norm_power=1"):
        ALLoRA(lora_mlp()).load_state_dict({}, None)
