"""DiffoRA (arXiv 2502.08905): the reconstructed spec's checks (methods-adapters-b.md B2 §3, docs/specs/diffora.md)."""
from __future__ import annotations

import math

import pytest
import torch
from train_helpers import batcher, ce_loss, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.core.layer import AdaptedLayer
from rankwise.train.diffora import DiffoRA
from rankwise.train.loop import TrainConfig, train
from toy_models import MLP

TARGETS = ["lin0", "lin1", "head"]


def model_and_data(init=True):
    torch.manual_seed(0)
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(r=2, lora_alpha=2, target_modules=TARGETS, init_lora_weights=init))
    x, y = task(48)
    return model, x, y


def test_search_model_is_the_base_at_init_whatever_the_gates():
    model, x, y = model_and_data()
    proc = DiffoRA(model, [(x, y)], ce_loss)
    with torch.no_grad():
        proc.gamma.copy_(torch.tensor([3.0, -2.0, 0.5]))
        with model.disable_adapter():
            base = model(x)
        torch.testing.assert_close(model(x), base)


def test_saturated_gates_give_lora_or_base():
    model, x, y = model_and_data(init=False)
    lora = model(x).detach()
    with model.disable_adapter():
        base = model(x).detach()
    proc = DiffoRA(model, [(x, y)], ce_loss)
    with torch.no_grad():
        proc.gamma.fill_(40.0)
        torch.testing.assert_close(model(x), lora)
        proc.gamma.fill_(-40.0)
        torch.testing.assert_close(model(x), base)


def test_gates_move_only_on_held_out_batches_and_discretise(tmp_path):
    model, x, y = model_and_data()
    proc = DiffoRA(model, [(x[40:], y[40:])], ce_loss, ratio=0.5, search_steps=6, gate_lr=0.05, average_last=3)
    model(x[:8]).sum().backward()
    assert proc.gamma.grad is None  # a weight step never reaches the gates
    model.zero_grad()
    seen = {}

    class Watch:
        def on_step_end(self, state):
            if state.step == 5:
                seen["before"] = model(x).detach()
                seen["gates"] = proc.gates()
            if state.step == 6:
                seen["params"] = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
                seen["state"] = {id(p) for p in state.optimizer.state}

    train(model, batcher(x[:40], y[:40], 4), ce_loss, TrainConfig(epochs=2, lr=1e-2), callbacks=[proc, Watch()], progress=False)
    assert len(set(seen["gates"].values())) == 3 and seen["gates"] != {m: 0.5 for m in TARGETS}
    kept = proc.kept
    assert len(kept) == math.ceil(0.5 * 3) == 2
    adapted = [m for m, _ in model.adapted_layers()]
    assert adapted == kept and not any(isinstance(m, AdaptedLayer) for n, m in model.model.named_modules() if n not in kept)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = {"lin0": (16, 32), "lin1": (32, 24), "head": (24, 4)}
    assert trainable == sum(2 * sum(shapes[m]) for m in kept)
    current = {id(p) for p in model.parameters()}
    assert seen["params"] <= current and seen["state"] <= current
    model.save_adapter(tmp_path)
    torch.manual_seed(0)
    reloaded = rankwise.load_adapter(MLP(), tmp_path)
    torch.testing.assert_close(reloaded(x), model(x))


def test_fold_preserves_kept_modules_output():
    model, x, y = model_and_data(init=False)
    proc = DiffoRA(model, [(x, y)], ce_loss, ratio=0.6, average_last=1)
    with torch.no_grad():
        proc.gamma.copy_(torch.tensor([1.0, -30.0, 0.3]))  # lin1's gate is ~0: dropping it changes ~nothing
        proc.gate_history = [torch.sigmoid(proc.gamma.detach())]
        before = model(x)
        assert proc.discretise() == ["lin0", "head"]
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_bad_settings():
    model, x, y = model_and_data()
    with pytest.raises(ConfigError, match="ratio"):
        DiffoRA(model, [(x, y)], ce_loss, ratio=0)
    with pytest.raises(ConfigError, match="search_steps"):
        DiffoRA(model, [(x, y)], ce_loss, search_steps=0)
    with pytest.raises(ConfigError, match="val_batches"):
        DiffoRA(model, [], ce_loss)
    with pytest.raises(ConfigError, match="LoRA"):
        DiffoRA(MLP(), [(x, y)], ce_loss)
