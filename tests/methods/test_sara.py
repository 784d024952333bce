"""SaRA spec checks (docs: /work/shared/specs/methods-adapters-a.md section 8)."""
import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.sara import nuclear_norm_penalty, reselect
from rankwise.core.errors import ConfigError

TAU = 0.02


def _model(**kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 80), nn.Tanh(), nn.Linear(80, 72))
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.SaraConfig(threshold=TAU, target_modules=["0", "2"], **kw))
    return model, reference


def _effective(model, name):
    layer = dict(model.adapted_layers())[name]
    return layer.weight_matrix() + layer.adapters["default"].delta_weight(None)


def test_init_output_is_bit_exact():
    model, reference = _model()
    x = torch.randn(5, 24)
    assert torch.equal(model(x), reference(x))


def test_trainable_count_and_only_selected_entries_change():
    model, reference = _model()
    expected = sum(int((m.weight.abs() < TAU).sum()) for m in (reference[0], reference[2]))
    assert model.trainable_summary()["trainable"] == expected > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(8, 24)).pow(2).sum().backward()
    opt.step()
    for name, ref in (("0", reference[0]), ("2", reference[2])):
        changed = _effective(model, name) != ref.weight
        assert changed.any()
        assert not (changed & (ref.weight.abs() >= TAU)).any(), "an entry outside the small-|w| set moved"


def test_values_gradient_equals_dense_gradient_at_indices():
    model, reference = _model()
    x = torch.randn(6, 24)
    model(x).pow(2).sum().backward()
    ref = copy.deepcopy(reference)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(x).pow(2).sum().backward()
    for name, dense in (("0", ref[0].weight.grad), ("2", ref[2].weight.grad)):
        adapter = dict(model.adapted_layers())[name].adapters["default"]
        torch.testing.assert_close(adapter.values.grad, dense.flatten()[adapter.indices], atol=1e-5, rtol=1e-5)


def test_no_dense_gradient_kept_and_optimizer_state_is_sparse():
    model, _ = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(torch.randn(4, 24)).pow(2).sum()
    loss.backward()
    opt.step()
    base_ptrs = {layer.weight.data_ptr() for _, layer in model.adapted_layers()}  # the frozen base's own weights
    extra = [t.numel() for t in saved if t.data_ptr() not in base_ptrs]
    assert max(extra) < 24 * 80, "the forward saved a weight-sized tensor (dense delta) for backward"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == p.numel()
    assert sum(p.numel() for p in params) < 0.2 * (24 * 80 + 80 * 72)


def test_progressive_reselection():
    model, _ = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 24)).pow(2).sum().backward()
        opt.step()
    before = {n: _effective(model, n).detach().clone() for n in ("0", "2")}
    counts = reselect(model, opt)
    assert len(opt.state) == 0, "optimizer state must be reset"
    new_params = [p for g in opt.param_groups for p in g["params"]]
    for name in ("0", "2"):
        adapter = dict(model.adapted_layers())[name].adapters["default"]
        expected = torch.nonzero(before[name].flatten().abs() < TAU).flatten()
        assert torch.equal(adapter.indices, expected) and counts[name] == expected.numel()
        torch.testing.assert_close(_effective(model, name), before[name])  # re-selection itself changes nothing
        assert any(p is adapter.values for p in new_params)
        assert model.configs["default"].selected_counts[name][0] == expected.numel()


def test_reselected_adapter_saves_and_reloads(tmp_path):
    model, reference = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 24)).pow(2).sum().backward()
        opt.step()
    reselect(model, opt)
    x = torch.randn(3, 24)
    out = model(x)
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(x), out)


def test_nuclear_norm_penalty():
    model, _ = _model(lambda_rank=0.1, nuclear_min_size=30)  # only layer "2" (80 x 72 -> 72 > 30; 80 x 24 -> 24)
    adapter = dict(model.adapted_layers())["2"].adapters["default"]
    masked = torch.zeros(72 * 80).index_put((adapter.indices,), adapter.values.detach()).view(72, 80)
    expected = 0.1 * torch.linalg.svdvals(masked).sum()
    penalty = nuclear_norm_penalty(model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert adapter.values.grad is not None and adapter.values.grad.abs().sum() > 0


def test_fraction_selects_exactly_that_share():
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(20, 30)), rankwise.SaraConfig(fraction=0.15, target_modules=["0"]))
    assert model.trainable_summary()["trainable"] == 90


@pytest.mark.parametrize("field,value", [("threshold", 0), ("fraction", 1.5), ("fraction", 0), ("lambda_rank", -1),
                                         ("nuclear_min_size", -2), ("selected_counts", {"a": [1]})])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.SaraConfig(target_modules=["x"], **{field: value})
