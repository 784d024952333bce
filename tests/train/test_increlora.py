"""IncreLoRA (arXiv 2308.12043): budget, growth, scores, optimizer, saved ranks (methods-adapters-b.md B2 §1)."""
from __future__ import annotations

import math

import pytest
import torch
from train_helpers import batcher, ce_loss, lora_mlp, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.increlora import IncreLoRA
from rankwise.train.loop import TrainConfig, train
from toy_models import MLP


def test_budget_never_exceeded_and_reached(tmp_path):
    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    proc = IncreLoRA(model, target_total_rank=9, init_warmup=2, incre_interval=2, top_h=2, incre_rank_num=2)
    totals = []

    class Watch:
        def on_step_end(self, state):
            totals.append(proc.total_rank())
            for m, a in proc.adapters.items():  # optimizer holds exactly the current tensors, with matching state
                for p in (a.lora_A, a.lora_B):
                    assert any(p is q for g in state.optimizer.param_groups for q in g["params"])
                    assert state.optimizer.state[p]["exp_avg"].shape == p.shape

    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=3, lr=1e-2), callbacks=[proc, Watch()], progress=False)
    assert max(totals) <= 9 and totals[-1] == 9
    assert sum(proc.ranks().values()) == 9 and proc.rank_history[0] == {"step": 0, "lin0": 1, "lin1": 1}
    table = proc.report(tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 0 and table.row_count == 3


def test_chooses_layers_at_or_above_the_top_h_importance():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(r=1, target_modules=["lin0", "lin1", "head"]))
    proc = IncreLoRA(model, target_total_rank=10, top_h=2, incre_rank_num=3)
    proc.ipt = {"lin0": 1.0, "lin1": 3.0, "head": 2.0}
    proc.unc = {"lin0": 1.0, "lin1": 1.0, "head": 1.0}
    assert proc.choose() == {"lin1": 3, "head": 3}
    proc.ipt["lin0"] = 2.0  # a tie with the 2nd largest joins (module order breaks it); the budget (7 left) clips the last
    assert proc.choose() == {"lin1": 3, "lin0": 3, "head": 1}


@pytest.mark.parametrize("mode", ["current_rank", "fixed"])
def test_growth_rescales_update_by_old_over_new_rank_or_not_at_all(mode):
    model = lora_mlp(r=2, lora_alpha=4, init_lora_weights=False)
    proc = IncreLoRA(model, target_total_rank=8, scaling=mode, top_h=1)
    before = model.delta_weights()
    proc.grow({"lin0": 2})
    after = model.delta_weights()
    factor = 2 / 4 if mode == "current_rank" else 1.0
    torch.testing.assert_close(after["lin0"], before["lin0"] * factor)
    torch.testing.assert_close(after["lin1"], before["lin1"])


def test_score_is_sum_abs_delta_times_its_gradient():
    model = lora_mlp(r=2, init_lora_weights=False)
    proc = IncreLoRA(model, target_total_rank=8)
    x = torch.randn(5, 16)
    model(x).pow(2).sum().backward()
    adapter = proc.adapters["lin1"]
    delta = (adapter.lora_B @ adapter.lora_A * adapter.scaling).detach().requires_grad_()
    layer = model.model.lin1
    h = torch.relu(model.model.lin0(x))
    out = model.model.head(torch.relu(layer.base_layer(h) + h @ delta.T))
    (grad,) = torch.autograd.grad(out.pow(2).sum(), delta)
    expected = float((delta.detach() * grad).abs().sum() / math.sqrt(delta.numel()))
    assert proc.score["lin1"] == pytest.approx(expected, rel=1e-5)


def test_saved_adapter_records_ranks_and_reloads_exactly(tmp_path):
    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    proc = IncreLoRA(model, target_rank=3, init_warmup=1, incre_interval=1, top_h=1)
    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=2, lr=1e-2), callbacks=[proc], progress=False)
    ranks = proc.ranks()
    assert sum(ranks.values()) == 6
    model.save_adapter(tmp_path)
    torch.manual_seed(0)
    reloaded = rankwise.load_adapter(MLP(), tmp_path)
    assert {m: a.r for m, layer in reloaded.adapted_layers() for a in [layer.adapters["default"]]} == ranks
    torch.testing.assert_close(reloaded(x), model(x))


def test_bad_settings():
    with pytest.raises(ConfigError, match="target_rank"):
        IncreLoRA(lora_mlp(r=1), target_rank=-2)
    with pytest.raises(ConfigError, match="below the adapters' initial total rank"):
        IncreLoRA(lora_mlp(r=4), target_rank=2)
    with pytest.raises(ConfigError, match="exceeds"):
        IncreLoRA(lora_mlp(r=1), target_total_rank=1000)
    with pytest.raises(ConfigError, match="incre_interval"):
        IncreLoRA(lora_mlp(r=1), incre_interval=0)
    with pytest.raises(ConfigError, match="LoRA"):
        IncreLoRA(MLP())
