"""Spec checks for PELA (methods-compress-pretrain.md section 8)."""
import copy

import pytest
import torch
from torch import nn

from _compress_models import tiny_llama, token_batches
from rankwise.compress import LowRankLinear, compress
from rankwise.compress._common import rank_for_ratio
from rankwise.compress.pela import (PelaConfig, _BlockOutputs, feature_distillation_loss, pela_losses,
                                    weight_perturbation_loss)
from rankwise.core.errors import ConfigError


def test_rank_formula():
    k = rank_for_ratio(768, 3072, 1 / 2)
    assert k == 307
    assert 768 * 3072 / (k * (768 + 3072)) >= 2 * 0.99


def test_weight_perturbation_loss_is_max_abs_entry():
    layer = LowRankLinear.from_factors(torch.eye(2), torch.tensor([[0.1, -0.3], [0.0, 0.0]]))
    target = torch.zeros(2, 2)
    loss = weight_perturbation_loss([(layer, target)], eps=1e-3)
    torch.testing.assert_close(loss, torch.tensor((0.3 - 0.001) ** 2))
    loss.backward()
    grad = layer.down.weight.grad  # up is the identity, so d/d(down) is d/d(W2 W1)
    assert grad[0, 1] != 0 and int((grad != 0).sum()) == 1


def test_student_starts_as_svd_and_losses_match_direct_computation():
    base = tiny_llama()
    cal = token_batches(2)
    student, _ = compress(copy.deepcopy(base), "pela", cal, ratio=0.5, steps=0)
    svd, _ = compress(copy.deepcopy(base), "svd", ratio=0.5)
    ids = cal[0]
    torch.testing.assert_close(student(ids).logits, svd(ids).logits)
    config = PelaConfig(ratio=0.5, task_weight=0.0, wp_weight=1.0)
    names = [n for n, m in student.named_modules() if isinstance(m, LowRankLinear)]
    pairs = [(student.get_submodule(n), base.get_submodule(n).weight.detach()) for n in names]
    hooks = (_BlockOutputs(student), _BlockOutputs(base))
    losses = pela_losses(student, base, ids, config, pairs, hooks)
    with torch.no_grad():
        s_blocks, t_blocks = [], []
        handles = [layer.register_forward_hook(lambda m, a, o, store=store: store.append(o))
                   for model, store in ((student, s_blocks), (base, t_blocks)) for layer in model.model.layers]
        student(ids), base(ids)
        for handle in handles:
            handle.remove()
    direct = torch.stack([nn.functional.mse_loss(s, t) for s, t in zip(s_blocks, t_blocks)]).mean()
    torch.testing.assert_close(losses["features"].detach(), direct)
    torch.testing.assert_close(feature_distillation_loss(s_blocks, t_blocks), direct)
    # teacher gets no gradient, student factors do
    losses["total"].backward()
    assert all(p.grad is None for p in base.parameters())
    assert all(layer.down.weight.grad is not None and layer.down.weight.grad.abs().sum() > 0 for layer, _ in pairs)


def test_distillation_recovers_quality_over_svd():
    base = tiny_llama()
    cal = token_batches(4, seq=16)
    held_out = token_batches(2, seed=11)
    reference = [base(ids).logits.detach() for ids in held_out]

    def err(model):
        return sum(float((model(ids).logits - ref).pow(2).mean()) for ids, ref in zip(held_out, reference))

    svd, _ = compress(copy.deepcopy(base), "svd", ratio=0.4)
    pela, report = compress(copy.deepcopy(base), "pela", cal, ratio=0.4, steps=40, lr=3e-3, task_weight=0.0)
    assert report.extra["history"][-1]["features"] < report.extra["history"][0]["features"]
    assert err(pela) < err(svd)


def test_bad_config():
    with pytest.raises(ConfigError, match="steps"):
        PelaConfig(steps=-1)
    with pytest.raises(ConfigError, match="trainable"):
        PelaConfig(trainable="lora")


def _blockless_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))  # no repeated blocks to distil


def test_no_blocks_is_an_error_not_a_silent_switch_to_logits():
    """Issue 19 item 6: kd_alpha used to fall back to a logits MSE without a word when a model had no blocks."""
    cal = [torch.randn(8, 16) for _ in range(2)]
    with pytest.raises(ConfigError, match="feature_fallback='logits'"):
        compress(_blockless_mlp(), "pela", cal, ratio=0.5, steps=2, task_weight=0.0)
    with pytest.warns(UserWarning, match="feature_fallback='logits'"):
        model, report = compress(_blockless_mlp(), "pela", cal, ratio=0.5, steps=2, task_weight=0.0,
                                 feature_fallback="logits")
    assert report.extra["history"][0]["features"] > 0
    _, report = compress(_blockless_mlp(), "pela", cal, ratio=0.5, steps=2, task_weight=0.0, kd_alpha=0.0)
    assert "features" not in report.extra["history"][0]
    with pytest.raises(ConfigError, match="feature_fallback"):
        PelaConfig(feature_fallback="silent")


def test_paper_defaults_train_every_parameter_with_weight_decay_005(monkeypatch):
    """Issue 19 item 6: the paper trains all student parameters (uncompressed ones too) with AdamW wd 0.05."""
    seen = []
    real_adamw = torch.optim.AdamW

    def spying_adamw(params, **kwargs):
        optimizer = real_adamw(params, **kwargs)
        seen.append(optimizer)
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", spying_adamw)
    base = tiny_llama()
    cal = token_batches(2, seq=16)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model, _ = compress(copy.deepcopy(base), "pela", cal, ratio=0.5, steps=3, lr=1e-3)
    (optimizer,) = seen
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in model.parameters()}
    assert not torch.equal(dict(model.named_parameters())["model.norm.weight"], before["model.norm.weight"])
    # the old cheap variant is one explicit option away: only the factors move
    seen.clear()
    cheap, _ = compress(copy.deepcopy(base), "pela", cal, ratio=0.5, steps=3, lr=1e-3, trainable="factors", weight_decay=0.0)
    assert seen[0].param_groups[0]["weight_decay"] == 0.0
    assert torch.equal(dict(cheap.named_parameters())["model.norm.weight"], before["model.norm.weight"])
    assert len({id(p) for g in seen[0].param_groups for p in g["params"]}) < len(list(cheap.parameters()))
