"""IncreLoRA (arXiv 2308.12043): budget, growth, scores, optimizer, saved ranks (methods-adapters-b.md B2 §1)."""
from __future__ import annotations

import math

import pytest
import torch
from train_helpers import batcher, ce_loss, lora_mlp, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.increlora import IncreLoRA
from rankwise.train.loop import TrainConfig, TrainState, train
from rankwise.train.procedures import finish_procedure
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
    before = {m: proc.delta_weight(m) for m in proc.adapters}
    proc.grow({"lin0": 2})
    after = {m: proc.delta_weight(m) for m in proc.adapters}
    factor = 2 / 4 if mode == "current_rank" else 1.0
    # the switched-on components were reserves at E = 1e-5: they add ~1e-5 * 0.02^2 * scale (the spec's 0.500002)
    torch.testing.assert_close(after["lin0"], before["lin0"] * factor, rtol=0, atol=1e-7)
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
    out = model(x).detach()
    finish_procedure(proc)  # folds E into B, drops the reserves: plain LoRA of the grown ranks
    torch.testing.assert_close(model(x), out, rtol=1e-5, atol=1e-6)
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


def test_update_is_b_diag_e_a_with_e_zero_at_init_and_trainable():
    """The paper's SVD-like form: dW = B diag(E) A * alpha / ranknum, E = 0 and A, B ~ N(0, 0.02^2) at init."""
    x, y = task(8)
    model = lora_mlp(r=1, lora_alpha=4)
    before = model(x).detach()
    proc = IncreLoRA(model, target_total_rank=6, seed=0)
    torch.testing.assert_close(model(x), before)  # E = 0: the update is zero, the model unchanged
    for m, a in proc.adapters.items():
        assert proc.E[m].tolist() == [0.0] and a.lora_B.abs().sum() > 0  # B is not zero, so E has a gradient
    ce_loss(model, (x, y)).backward()
    assert all(proc.E[m].grad.abs().sum() > 0 for m in proc.adapters)
    with torch.no_grad():
        for E in proc.E.values():
            E.fill_(0.7)
    a = proc.adapters["lin0"]
    torch.testing.assert_close(proc.delta_weight("lin0"), (a.lora_B * 0.7) @ a.lora_A * a.scaling)
    h = model.model.lin0(x)
    torch.testing.assert_close(h, model.model.lin0.base_layer(x) + x @ proc.delta_weight("lin0").T)
    assert any(n.startswith("increlora_E.") for n, _ in model.named_parameters())  # trains as a model parameter


def test_reserve_components_train_ahead_with_frozen_e_and_switch_on_trained():
    """Advance learning: a reserve per layer (A, B trainable, E = 1e-5 frozen); growth switches on the trained reserve."""
    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    proc = IncreLoRA(model, target_total_rank=4, init_warmup=2, incre_interval=3, top_h=1, seed=0)
    seen = {}

    class Watch:
        def on_step_end(self, state):
            a = proc.adapters["lin0"]
            if state.step == 1:
                assert a.r == 2 and proc.ranks() == {"lin0": 1, "lin1": 1}  # one active + one reserve
                seen["reserve_A"] = a.lora_A[1].detach().clone()
                assert proc.E["lin0"][1].item() == pytest.approx(1e-5)

    class Before:  # runs before IncreLoRA's on_step_end, so it sees the reserve as trained right before the switch
        def on_step_end(self, state):
            if state.step == 3:
                seen["trained_reserves"] = {m: a.lora_A[1].detach().clone() for m, a in proc.adapters.items()}
                seen["frozen_e"] = {m: proc.E[m][1].item() for m in proc.adapters}

    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=1, lr=1e-2, max_steps=4), callbacks=[Before(), proc, Watch()],
          progress=False)
    assert not torch.equal(seen["trained_reserves"]["lin0"], seen["reserve_A"])  # the reserve's A trained
    assert all(v == pytest.approx(1e-5) for v in seen["frozen_e"].values())       # its E did not
    grown = [m for m, r in proc.ranks().items() if r == 2]
    assert len(grown) == 1
    m = grown[0]
    # the switched-on component is the trained reserve (one step further), not a fresh one; a new reserve follows
    assert proc.adapters[m].r == 3
    assert (proc.adapters[m].lora_A[1] - seen["trained_reserves"][m]).abs().max() < 0.05


def test_new_components_restart_their_warm_up():
    """Restart warm-up: a component added at step t gets LR 0 at its first step and its own warm-up after that
    (the code's Multi_LambdaLR); before, new rows trained at once at the running schedule's LR."""
    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    proc = IncreLoRA(model, target_total_rank=4, init_warmup=1, incre_interval=2, top_h=1, seed=0)
    rows = {}

    class After:  # after IncreLoRA's on_step_end
        def on_step_end(self, state):
            if state.step == 2:  # growth happened just now: a fresh reserve was born at step 2
                m = next(m for m, r in proc.ranks().items() if r == 2)
                rows["module"] = m
                rows["new"] = proc.adapters[m].lora_A[2].detach().clone()
                rows["old"] = proc.adapters[m].lora_A[0].detach().clone()
                rows["e"] = proc.E[m][1].item()
                rows["births"] = (list(proc.birth[m]), list(proc.e_birth[m]))
            if state.step == 3:
                m = rows["module"]
                rows["new_after"] = proc.adapters[m].lora_A[2].detach().clone()
                rows["old_after"] = proc.adapters[m].lora_A[0].detach().clone()
                rows["e_after"] = proc.E[m][1].item()

    config = TrainConfig(epochs=1, lr=1e-2, max_steps=6, warmup_steps=3, weight_decay=0.01)
    train(model, batcher(x, y, 4), ce_loss, config, callbacks=[proc, After()], progress=False)
    assert rows["births"] == ([0, 0, 2], [0, 2, 2])  # A/B rows: reserve made at 0 switched on, a new reserve at 2
    assert torch.equal(rows["new_after"], rows["new"])  # LR factor 0 at its first step (weight decay included)
    assert rows["e_after"] == rows["e"]                  # the switched-on E restarts its warm-up too
    assert not torch.equal(rows["old_after"], rows["old"])  # the old component trains on


def test_old_plain_variant_and_pre_change_checkpoints(tmp_path):
    from rankwise.core.errors import CheckpointError

    x, y = task(32)
    model = lora_mlp(r=1, lora_alpha=4)
    plain = IncreLoRA(model, target_total_rank=4, importance_vector=False, advance_learning=False, restart_warmup=False)
    assert plain.E == {} and not any("increlora_E" in n for n, _ in model.named_parameters())
    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=1, lr=1e-2), callbacks=[plain], progress=False)
    legacy = {"ranks": {"lin0": 1, "lin1": 1}, "scaling": {"lin0": 4.0, "lin1": 4.0}, "rank_history": [],
              "ipt": {"lin0": 0.0, "lin1": 0.0}, "unc": {"lin0": 0.0, "lin1": 0.0}, "score": {"lin0": 0.0, "lin1": 0.0}}
    old = IncreLoRA(lora_mlp(r=1, lora_alpha=4), target_total_rank=4, importance_vector=False, advance_learning=False,
                    restart_warmup=False)
    old.load_state_dict(legacy, TrainState(old.model, None, None))  # a checkpoint from before: the plain variant resumes
    with pytest.raises(CheckpointError, match="importance_vector=false"):
        IncreLoRA(lora_mlp(r=1, lora_alpha=4), target_total_rank=4).load_state_dict(legacy, TrainState(None, None, None))
    with pytest.raises(ConfigError, match="advance_learning"):
        IncreLoRA(lora_mlp(r=1), target_total_rank=4, importance_vector=False)


def test_restart_warm_up_needs_a_rankwise_schedule():
    model = lora_mlp(r=1, lora_alpha=4)
    proc = IncreLoRA(model, target_total_rank=4)
    optimizer = torch.optim.AdamW(model.parameter_groups(1e-2), lr=1e-2)
    stock = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # e.g. a transformers schedule
    with pytest.raises(ConfigError, match="bridge_scheduler"):
        proc.on_step_start(TrainState(model, optimizer, stock))
