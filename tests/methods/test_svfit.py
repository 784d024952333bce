"""SVFit numeric checks (spec methods-adapters-a.md section 5); files hold only s and sigma_r."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise
from toy_models import MLP, ConvNet


def with_spectrum(singular_values, out_f=12, in_f=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(singular_values), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(singular_values), generator=gen))
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_(U @ torch.diag(torch.tensor(singular_values)) @ V.T)
    return nn.Sequential(layer)


def test_zero_delta_at_init_and_r_trainable_per_layer():
    model = rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin0", "lin1"], r=5))
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())
    assert model.trainable_summary()["trainable"] == 2 * 5
    assert all(n.endswith("svfit_s") for n, p in model.named_parameters() if p.requires_grad)


def test_energy_rule_picks_smallest_rank():
    model = rankwise.adapt(with_spectrum([10.0, 1.0, 0.1, 0.01]), rankwise.SvfitConfig(target_modules=["0"]))
    assert model.model[0].adapters["default"].r == 1  # 100 / 101.01 = 0.99
    model = rankwise.adapt(with_spectrum([10.0, 1.0, 0.1, 0.01]), rankwise.SvfitConfig(target_modules=["0"], energy=0.9999))
    assert model.model[0].adapters["default"].r == 2


def test_scaled_singular_values_change_only_the_top_r():
    sigma = [8.0, 5.0, 3.0, 1.0, 0.5]
    model = rankwise.adapt(with_spectrum(sigma), rankwise.SvfitConfig(target_modules=["0"], r=2))
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.svfit_s.mul_(2)
    weight = model.model[0].weight_matrix() + model.delta_weights()["0"]
    got = torch.linalg.svdvals(weight)[:5]
    torch.testing.assert_close(got, torch.tensor([16.0, 10.0, 3.0, 1.0, 0.5]), atol=1e-4, rtol=1e-5)
    assert torch.linalg.matrix_rank(model.delta_weights()["0"]) == 2


def test_literal_form_reconstructs_the_weight_and_matches_fast_path():
    model = rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin1"], r=6))
    adapter, layer = model.model.lin1.adapters["default"], model.model.lin1
    W = layer.weight_matrix().detach()
    U, s, V, sigma = adapter.svfit_U, adapter.svfit_s.detach(), adapter.svfit_V, adapter.svfit_sigma
    residual = W - U @ torch.diag(sigma) @ V
    torch.testing.assert_close(residual + U @ torch.diag(s) @ V, W, atol=1e-5 * W.abs().max(), rtol=0)
    with torch.no_grad():
        adapter.svfit_s.add_(torch.randn(6))
    x = torch.randn(7, 32)
    literal = x @ (residual + U @ torch.diag(adapter.svfit_s.detach()) @ V).T + layer.base_layer.bias
    torch.testing.assert_close(layer(x).detach(), literal, atol=1e-5, rtol=1e-5)


def test_conv_kernel_is_factorised_flat():
    model = rankwise.adapt(ConvNet(), rankwise.SvfitConfig(target_modules=["conv2"], r=3))
    adapter = model.model.conv2.adapters["default"]
    assert adapter.svfit_U.shape == (16, 3) and adapter.svfit_V.shape == (3, 16 * 9)
    with torch.no_grad():
        adapter.svfit_s.add_(1.0)
    assert model.delta_weights()["conv2"].shape == (16, 16, 3, 3)


def three_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 8))


def trained(base, config, steps=5):
    """An SVFit model on `base` whose s took a few SGD steps (the update is no longer zero)."""
    model = rankwise.adapt(base, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(3)
    x, target = torch.randn(32, 48, generator=gen), torch.randn(32, 8, generator=gen)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(x) - target).pow(2).mean().backward()
        optimizer.step()
    assert any(torch.count_nonzero(d) for d in model.delta_weights().values())
    return model.eval()


def ranks(model) -> list[int]:
    return [layer.adapters["default"].r for _, layer in model.adapted_layers()]


def test_file_holds_only_s_and_sigma(tmp_path):
    model = rankwise.adapt(three_layers(), rankwise.SvfitConfig(target_modules=["0", "2", "4"]))
    model.save_adapter(tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in state} == {"svfit_s", "svfit_sigma"}
    assert sum(t.numel() for t in state.values()) == 2 * sum(ranks(model))
    # With U_r and V_r the file held out + in + 2 floats per singular value: 36 kB here against a 6.8 kB bound.
    assert (tmp_path / "adapter_model.safetensors").stat().st_size < 8 * sum(ranks(model)) * 4 + 4096


def test_reload_gives_the_trained_outputs(tmp_path):
    base = three_layers()
    fresh_base = copy.deepcopy(base)
    model = trained(base, rankwise.SvfitConfig(target_modules=["0", "2", "4"]))
    x = torch.randn(16, 48)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path)
    torch.manual_seed(99)
    loaded = rankwise.load_adapter(fresh_base, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)


def test_torch_load_state_dict_reloads_too():
    base = three_layers()
    config = rankwise.SvfitConfig(target_modules=["0", "2", "4"])
    fresh = rankwise.adapt(copy.deepcopy(base), config)
    model = trained(base, config)
    x = torch.randn(16, 48)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("energy", [0.5, 0.9999], ids=["fewer", "more"])
def test_file_rank_wins_over_the_energy_rule(energy, tmp_path):
    """A wrap that picks another r than the file (another SVD backend at the energy boundary) follows the file."""
    base = three_layers()
    fresh_base = copy.deepcopy(base)
    model = trained(base, rankwise.SvfitConfig(target_modules=["0", "2", "4"], energy=0.9))
    x = torch.randn(16, 48)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "energy": energy}))
    by_rule = rankwise.adapt(copy.deepcopy(fresh_base), rankwise.SvfitConfig(target_modules=["0", "2", "4"], energy=energy))
    assert ranks(by_rule) != ranks(model), "the edited energy must make the wrap pick other ranks than the file's"
    loaded = rankwise.load_adapter(fresh_base, tmp_path)
    assert ranks(loaded) == ranks(model)
    for name, layer in loaded.adapted_layers():
        adapter = layer.adapters["default"]
        assert adapter.svfit_U.shape[1] == adapter.svfit_V.shape[0] == adapter.r, name
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=0)


def test_file_from_other_base_weights_is_refused(tmp_path):
    base = three_layers()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other[2].weight.add_(torch.randn(other[2].weight.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    trained(base, rankwise.SvfitConfig(target_modules=["0", "2", "4"])).save_adapter(tmp_path)
    with pytest.raises(rankwise.CheckpointError, match=r"'2'.*trained on different base weights"):
        rankwise.load_adapter(other, tmp_path)
    assert not any(isinstance(m, rankwise.core.layer.AdaptedLayer) for m in other.modules()), "a failed load leaves the base as it was"
    wrapped = rankwise.adapt(other, rankwise.SvfitConfig(target_modules=["0", "2", "4"]))
    with pytest.raises(rankwise.CheckpointError, match=r"'2'.*trained on different base weights"):
        wrapped.load_adapter(tmp_path, "loaded")
    assert list(wrapped.configs) == ["default"]


def test_torch_load_state_dict_refuses_other_base_weights():
    base = three_layers()
    config = rankwise.SvfitConfig(target_modules=["0", "2", "4"], r=3)
    state = {k: v for k, v in trained(copy.deepcopy(base), config).state_dict().items() if ".adapters." in k}
    with torch.no_grad():
        base[4].weight.mul_(1.01)
    with pytest.raises(rankwise.CheckpointError, match=r"'4'.*trained on different base weights"):
        rankwise.adapt(base, config).load_state_dict(state, strict=False)


@pytest.mark.parametrize("kwargs,field", [({"r": 0}, "r"), ({"r": 1.5}, "r"), ({"energy": 0}, "energy"), ({"energy": 1.5}, "energy")])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.SvfitConfig(target_modules=["lin0"], **kwargs)


def test_rank_larger_than_layer():
    with pytest.raises(rankwise.ConfigError, match="singular values is at most 16"):
        rankwise.adapt(MLP(), rankwise.SvfitConfig(target_modules=["lin0"], r=17))


def test_defaults_follow_the_spec():
    """r is chosen per layer by the 99 % energy rule unless given."""
    config = rankwise.SvfitConfig(target_modules=["0"])
    assert (config.r, config.energy) == (None, 0.99)
