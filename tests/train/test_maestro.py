"""Maestro (arXiv 2308.14929) on LoRA's update: the spec's checks (methods-adapters-b.md B2 §4)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from train_helpers import batcher, ce_loss, lora_mlp, task

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.train.loop import TrainConfig, TrainState, train
from rankwise.train.maestro import Maestro, importance, tail_norms
from toy_models import MLP


def test_truncation_at_svd_init_is_the_best_rank_k_approximation():
    model = lora_mlp(r=6, lora_alpha=6, init_lora_weights="pissa")
    proc = Maestro(model)
    a = proc.adapters["lin1"]
    full = (a.lora_B @ a.lora_A * a.scaling).detach()
    S = torch.linalg.svdvals(full)
    for k in (1, 3, 5):
        truncated = (a.lora_B[:, :k] @ a.lora_A[:k] * a.scaling).detach()
        torch.testing.assert_close(torch.linalg.matrix_norm(full - truncated), (S[k:6] ** 2).sum().sqrt(), rtol=1e-4, atol=1e-5)


def test_forward_uses_the_first_j_components_of_one_layer_only():
    model = lora_mlp(r=4, init_lora_weights=False)
    proc = Maestro(model)
    x = torch.randn(3, 16)
    full = model(x).detach()
    proc.width = {"lin1": 2}
    a = proc.adapters["lin1"]
    layer = model.model.lin1
    h = torch.relu(model.model.lin0(x))
    expected_lin1 = layer.base_layer(h) + h @ (a.lora_B[:, :2] @ a.lora_A[:2]).T * a.scaling
    torch.testing.assert_close(layer(h), expected_lin1)
    a0 = proc.adapters["lin0"]  # the other layer runs at full width
    torch.testing.assert_close(model.model.lin0(x), model.model.lin0.base_layer(x) + x @ (a0.lora_B @ a0.lora_A).T * a0.scaling)
    model.eval()
    torch.testing.assert_close(model(x), full)  # no ordered dropout in eval


def test_sampler_cycle_visits_every_pair_once():
    model = lora_mlp(r=3)
    proc = Maestro(model)
    pairs = [proc.next_pair() for _ in range(6)]
    assert Counter(pairs) == Counter([(m, j) for m in ("lin0", "lin1") for j in (1, 2, 3)])
    proc.on_step_start(TrainState(model, None, None))
    assert proc.pair is not None and proc.width == {}  # full pass: the model's call runs at full width
    assert Maestro(lora_mlp(r=3), full_pass=False).next_pair() is not None


def test_importance_is_prefix_monotone_and_shrink_keeps_that_prefix():
    model = lora_mlp(r=6, init_lora_weights=False)
    proc = Maestro(model, threshold=0.5)
    with torch.no_grad():
        a = proc.adapters["lin0"]
        a.lora_A[3:].mul_(1e-3)
        a.lora_B[:, 3:].mul_(1e-3)
    imp = importance(a.lora_A, a.lora_B)
    assert torch.all(imp[1:] <= imp[:-1])
    expected = int((imp >= 0.5).sum())
    ranks = proc.shrink()
    assert ranks["lin0"] == expected and a.lora_A.shape == (expected, 16)
    assert sum(p.numel() for p in a.parameters()) == (16 + 32) * expected


def test_group_lasso_gradient_is_finite_with_zero_tails():
    model = lora_mlp(r=4)  # B = 0: every B tail is exactly zero
    proc = Maestro(model, gp_lambda=1.0)
    proc.group_lasso().backward()
    assert all(torch.isfinite(p.grad).all() for a in proc.adapters.values() for p in (a.lora_A, a.lora_B))
    ta, tb = tail_norms(torch.zeros(3, 2), torch.zeros(2, 3))
    assert torch.isfinite(ta).all() and torch.isfinite(tb).all()


def test_training_shrinks_and_saved_ranks_reload(tmp_path):
    x, y = task(32)
    model = lora_mlp(r=8, lora_alpha=8, init_lora_weights="pissa")
    proc = Maestro(model, gp_lambda=1e-3, threshold=2.0, shrink_every=4)
    shapes = []

    class Watch:
        def on_step_end(self, state):
            for a in proc.adapters.values():
                shapes.append(state.optimizer.state[a.lora_A]["exp_avg"].shape == a.lora_A.shape)

    train(model, batcher(x, y, 4), ce_loss, TrainConfig(epochs=2, lr=1e-2), callbacks=[proc, Watch()], progress=False)
    ranks = proc.ranks()
    assert all(shapes) and min(ranks.values()) >= 1 and sum(ranks.values()) < 16
    assert proc.report(tmp_path / "maestro.png").row_count == 3 and (tmp_path / "maestro.png").exists()
    model.eval()
    out = model(x).detach()
    model.save_adapter(tmp_path)
    torch.manual_seed(0)
    base = MLP()
    reloaded = rankwise.load_adapter(base, tmp_path)
    # PiSSA moved W's principal part into the adapter; the trained base residual is what lora_mlp's model holds.
    reloaded.model.load_state_dict({k: v for k, v in model.model.state_dict().items() if "lora" not in k}, strict=False)
    torch.testing.assert_close(reloaded(x), out)
    assert {m: l.adapters["default"].r for m, l in reloaded.adapted_layers()} == ranks


def test_bad_settings():
    with pytest.raises(ConfigError, match="gp_lambda"):
        Maestro(lora_mlp(), gp_lambda=-1)
    with pytest.raises(ConfigError, match="shrink_every"):
        Maestro(lora_mlp(), shrink_every=0)
    with pytest.raises(ConfigError, match="min_rank"):
        Maestro(lora_mlp(), min_rank=0)
    with pytest.raises(ConfigError, match="LoRA"):
        Maestro(MLP())


@pytest.mark.parametrize("change", ["shrink", "grow"])
def test_pissa_adapter_whose_rank_changed_reloads_onto_the_original_base(change, tmp_path):
    # PiSSA moves W's top-r components into A, B and leaves the residual in the base. After a procedure resizes
    # the adapter, the residual still lacks those r components: the saved config must say so (pissa_rank_pattern),
    # or a reload would split off the new rank's components and give another model.
    import copy

    from rankwise.train.lora_tools import lora_adapters, record_ranks, resize_lora

    torch.manual_seed(0)
    base = MLP()
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LoraConfig(r=4, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights="pissa"))
    adapters = lora_adapters(model, "test")
    for adapter in adapters.values():
        if change == "shrink":
            resize_lora(adapter, keep=torch.tensor([0, 1]))
        else:
            resize_lora(adapter, grow=2, new_B=torch.randn(adapter.lora_B.shape[0], 2) * 0.1)
    record_ranks(model, adapters)
    x = torch.randn(5, 16)
    expected = model(x).detach()
    model.save_adapter(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["pissa_rank_pattern"].values()) == {4} and set(saved["rank_pattern"].values()) == {2 if change == "shrink" else 6}
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)


def test_plain_lora_files_carry_no_pissa_rank_pattern(tmp_path):

    rankwise.adapt(MLP(), rankwise.LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="pissa")).save_adapter(tmp_path)
    assert "pissa_rank_pattern" not in json.loads((tmp_path / "adapter_config.json").read_text())


def test_full_pass_self_distillation_is_the_default_loss():
    """loss = CE(f(x), y) + CE(f_sampled(x), softmax(f(x)).detach()) (the authors' CIFAR/MNIST script); before,
    only the sampled network's task loss was trained."""
    import copy

    from rankwise.train.lora_tools import lora_adapters

    x, y = task(16)
    model = lora_mlp(r=4, init_lora_weights="pissa")
    reference = copy.deepcopy(model)
    proc = Maestro(model, gp_lambda=0.0)
    assert proc.full_pass
    proc.on_step_start(TrainState(model, None, None, config=TrainConfig()))
    module, j = proc.pair
    ce_loss(model, (x, y)).backward()
    # reference by hand: full network, then the same network with `module` truncated to j components
    full = reference(x)
    adapter = lora_adapters(reference, "ref")[module]
    layer = reference.model.get_submodule(module)
    saved = adapter.lora_A, adapter.lora_B

    def truncated(mod, inputs, out):
        h = inputs[0]
        return layer.base_layer(h) + h @ (saved[1][:, :j] @ saved[0][:j]).T * adapter.scaling

    handle = layer.register_forward_hook(truncated)
    sampled = reference(x)
    handle.remove()
    total = F.cross_entropy(full, y) + F.cross_entropy(sampled, full.detach().softmax(-1))
    total.backward()
    for name, a in proc.adapters.items():
        ref = lora_adapters(reference, "ref")[name]
        torch.testing.assert_close(a.lora_A.grad, ref.lora_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad, ref.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_no_full_pass_trains_the_sampled_network_only_and_old_checkpoints_say_so():
    from rankwise.core.errors import CheckpointError

    x, y = task(8)
    model = lora_mlp(r=4, init_lora_weights="pissa")
    proc = Maestro(model, gp_lambda=0.0, full_pass=False)
    proc.on_step_start(TrainState(model, None, None))
    assert proc.width == dict([proc.pair])  # the model's own call is the sampled network
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    ce_loss(model, (x, y)).backward()
    assert len(calls) == 1  # no second (sampled) pass
    legacy = {"ranks": proc.ranks(), "cycle": [], "rank_history": []}  # a checkpoint from before full_pass existed
    proc.load_state_dict(legacy, TrainState(model, None, None))
    with pytest.raises(CheckpointError, match="full_pass=false"):
        Maestro(lora_mlp(r=4), full_pass=True).load_state_dict(legacy, TrainState(model, None, None))
