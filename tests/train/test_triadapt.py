"""TriAdaptLoRA (arXiv 2501.08008): the spec's checks (methods-adapters-b.md B2 §2)."""
from __future__ import annotations

import pytest
import torch
from train_helpers import batcher, ce_loss, lora_mlp, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.loop import TrainConfig, train
from rankwise.train.triadapt import TriAdaptLoRA, core
from toy_models import MLP


def test_core_assembly_and_zero_update_at_init():
    model = lora_mlp(r=3)
    proc = TriAdaptLoRA(model, reference_rank=4)
    a = proc.adapters["lin0"]
    C, L, U = core(a), a.tri_lower, a.tri_upper
    for i in range(3):
        for j in range(3):
            expected = L[i, j] if j < i else U[i, j] if i < j else L[i, i] + U[i, i]
            assert C[i, j] == expected
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())


@pytest.mark.parametrize("scaling,factor", [("current_rank", 2 / 3), ("fixed", 1.0)])
def test_function_preserving_growth_only_rescales(scaling, factor):
    model = lora_mlp(r=2, lora_alpha=4)
    proc = TriAdaptLoRA(model, reference_rank=4, function_preserving=True, scaling=scaling)
    with torch.no_grad():
        for a in proc.adapters.values():
            a.lora_B.normal_()
    x = torch.randn(4, 16)
    lora_out = lambda: model.model.lin0(x) - model.model.lin0.base_layer(x)  # noqa: E731
    before = lora_out().detach()
    proc.grow_layer("lin0", 1)
    torch.testing.assert_close(lora_out(), before * factor)


def test_parameter_count_after_growth():
    model = lora_mlp(r=1)
    proc = TriAdaptLoRA(model, reference_rank=4)
    proc.grow_layer("lin0", 2)
    proc.grow_layer("lin1", 1)
    expected = 3 * (16 + 32) + 3 * 4 + 2 * (32 + 24) + 2 * 3
    assert proc.trainable_count() == expected
    assert proc.adapters["lin0"].tri_lower.shape == (3, 3)


def test_schedule_and_score_semantics():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(r=1, target_modules=["lin0", "lin1", "head"]))
    proc = TriAdaptLoRA(model, target_total_rank=40, init_warmup=0)
    proc.budget = proc.total_rank() + 100  # 100 left, as in the spec's example
    assert proc.layers_to_grow(25, 100) == 3  # int(100 * 0.25) = 25, capped at the 3 layers
    proc.rank_growth = "nonlinear"
    assert proc.layers_to_grow(25, 100) == 3  # int(100 ** 0.25) = 3
    assert proc.layers_to_grow(0, 100) == 1  # k >= 1 always
    proc.rank_growth = "linear"
    proc.budget = proc.total_rank() + 8
    assert proc.layers_to_grow(25, 100) == 2
    proc.scores()
    assert all(s == 0 for s in proc.scores().values())  # a difference: nothing changed since the last call


def test_budget_never_exceeded_and_saved_ranks_reload(tmp_path):
    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    proc = TriAdaptLoRA(model, reference_rank=4, incre_interval=2, orth_reg_weight=0.1)
    totals = []

    class Watch:
        def on_step_end(self, state):
            totals.append(proc.total_rank())

    before = ce_loss(model, (x, y)).item()
    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=3, lr=1e-2), callbacks=[proc, Watch()], progress=False)
    assert max(totals) <= 8 and totals[-1] == 8 and ce_loss(model, (x, y)).item() < before
    out = model(x).detach()
    proc.finalize()
    torch.testing.assert_close(model(x), out)
    model.save_adapter(tmp_path)
    torch.manual_seed(0)
    reloaded = rankwise.load_adapter(MLP(), tmp_path)
    torch.testing.assert_close(reloaded(x), out)
    assert {m: layer.adapters["default"].r for m, layer in reloaded.adapted_layers()} == proc.ranks()


def test_bad_settings():
    with pytest.raises(ConfigError, match="rank_growth"):
        TriAdaptLoRA(lora_mlp(r=1), rank_growth="cubic")
    with pytest.raises(ConfigError, match="reference_rank"):
        TriAdaptLoRA(lora_mlp(r=1), reference_rank=-1)
    with pytest.raises(ConfigError, match="orth_reg_weight"):
        TriAdaptLoRA(lora_mlp(r=1), orth_reg_weight=-0.5)
    with pytest.raises(ConfigError, match="LoRA"):
        TriAdaptLoRA(MLP())
