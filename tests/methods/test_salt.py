"""SALT numeric checks (spec methods-adapters-a.md section 4)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from toy_models import MLP


def layer_with(sigma, out_f=10, in_f=8, **kwargs):
    gen = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(out_f, len(sigma), generator=gen))
    V, _ = torch.linalg.qr(torch.randn(in_f, len(sigma), generator=gen))
    base = nn.Sequential(nn.Linear(in_f, out_f))
    with torch.no_grad():
        base[0].weight.copy_(U @ torch.diag(torch.tensor(sigma)) @ V.T)
    return rankwise.adapt(base, rankwise.SaltConfig(target_modules=["0"], **kwargs))


def test_zero_delta_at_init_and_parameter_count():
    base = MLP()
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.SaltConfig(target_modules=["lin0", "lin1"], r_lora=4, ratio=0.25))
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), reference(x), atol=1e-6, rtol=0)
    # lin0: k = 16, t = 4; lin1: k = 24, t = 6  -> 2t + 2 r_lora (k - t) each
    assert model.trainable_summary()["trainable"] == (8 + 2 * 4 * 12) + (12 + 2 * 4 * 18)


def test_shift_moves_only_the_top_singular_values():
    sigma = [9.0, 6.0, 4.0, 2.0, 1.0, 0.5]
    model = layer_with(sigma, t=2, r_lora=2)
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.salt_X.zero_()
        adapter.salt_shift.copy_(torch.tensor([1.5, 0.5]))
    merged = model.model[0].weight_matrix() + model.delta_weights()["0"]
    got = torch.linalg.svdvals(merged)[:6]
    torch.testing.assert_close(got, torch.tensor([10.5, 6.5, 4.0, 2.0, 1.0, 0.5]), atol=1e-4, rtol=0)


def test_relu_removes_a_direction_instead_of_flipping_it():
    sigma = [9.0, 6.0, 4.0, 2.0]
    model = layer_with(sigma, t=1, r_lora=1)
    adapter = model.model[0].adapters["default"]
    with torch.no_grad():
        adapter.salt_scale.fill_(-1.0)  # a * sigma_1 = -9 -> ReLU -> 0
    merged = model.model[0].weight_matrix() + model.delta_weights()["0"]
    torch.testing.assert_close(torch.linalg.svdvals(merged)[:4], torch.tensor([6.0, 4.0, 2.0, 0.0]), atol=1e-4, rtol=0)
    top_right = adapter.Vh[0]
    assert (merged @ top_right).norm() < 1e-4


def test_merge_reconstructs_the_reference_weight():
    model = rankwise.adapt(MLP(), rankwise.SaltConfig(target_modules=["lin1"], r_lora=3, t=5))
    adapter = model.model.lin1.adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    U, sigma, Vh = adapter.U, adapter.sigma, adapter.Vh
    top = torch.diag(adapter.salt_scale * sigma[:5] + adapter.salt_shift)
    residual = torch.diag(sigma[5:]) + adapter.salt_X @ adapter.salt_Y
    reference = (U @ torch.relu(torch.block_diag(top, residual)) @ Vh).detach()
    x = torch.randn(4, 16)
    before = model(x).detach()
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged.lin1.weight, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=1e-5)


def test_fast_mode_is_the_formula_without_relu():
    base = MLP()
    model = rankwise.adapt(base, rankwise.SaltConfig(target_modules=["lin1"], r_lora=3, t=5, mode="fast"))
    adapter = model.model.lin1.adapters["default"]
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    U, sigma, Vh = adapter.U, adapter.sigma, adapter.Vh
    core = torch.block_diag(torch.diag((adapter.salt_scale - 1) * sigma[:5] + adapter.salt_shift), adapter.salt_X @ adapter.salt_Y)
    delta = (U @ core @ Vh).detach()
    torch.testing.assert_close(model.delta_weights()["lin1"], delta, atol=1e-5, rtol=1e-5)
    x = torch.randn(4, 32)
    layer = model.model.lin1
    torch.testing.assert_close(layer(x).detach(), layer.base_layer(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_file_holds_only_the_trainables(tmp_path):
    model = rankwise.adapt(MLP(), rankwise.SaltConfig(target_modules=["lin0"], r_lora=2, t=3))
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in state} == {"salt_scale", "salt_shift", "salt_X", "salt_Y"}


@pytest.mark.parametrize("kwargs,field", [
    ({"r_lora": 0}, "r_lora"), ({"ratio": 0}, "ratio"), ({"ratio": 1}, "ratio"), ({"t": 0}, "t"), ({"mode": "exact"}, "mode"),
])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.SaltConfig(target_modules=["lin0"], **kwargs)


@pytest.mark.parametrize("kwargs,message", [({"r_lora": 15, "t": 2}, "at most 14"), ({"t": 16, "r_lora": 1}, "must be below 16")])
def test_layer_limits(kwargs, message):
    base = MLP()
    with pytest.raises(rankwise.ConfigError, match=message):
        rankwise.adapt(base, rankwise.SaltConfig(target_modules=["lin0"], **kwargs))
    assert isinstance(base.lin0, nn.Linear)


def test_defaults_follow_the_official_sam2_config():
    config = rankwise.SaltConfig(target_modules=["x"])
    assert (config.ratio, config.r_lora, config.t, config.mode) == (0.1, 256, None, "faithful")


def test_parameter_count_of_the_spec_example():
    """Spec: a 768 x 2304 qkv layer at the defaults has k = 768, t = 76, r_lora = 256 -> 152 + 2*256*692."""
    model = rankwise.adapt(nn.Sequential(nn.Linear(768, 2304)), rankwise.SaltConfig(target_modules=["0"]))
    assert model.model[0].adapters["default"].t == 76
    assert model.trainable_summary()["trainable"] == 354_456


def test_x_starts_at_the_official_kaiming_relu_scale():
    """The official code calls kaiming_uniform_(X, a=sqrt(20), mode="fan_in", nonlinearity="relu"): torch ignores `a`
    for "relu", so X ~ U(+-sqrt(6 / r_lora)); with the default leaky_relu the bound would be sqrt(21) times smaller."""
    model = rankwise.adapt(MLP(), rankwise.SaltConfig(target_modules=["lin1"], r_lora=4, t=4))
    x_init = model.model.lin1.adapters["default"].salt_X.detach()  # (24 - 4) x 4 = 80 draws
    bound = (6 / 4) ** 0.5
    assert x_init.abs().max() <= bound
    assert x_init.abs().max() > 0.5 * bound, f"max |X| = {float(x_init.abs().max()):.3f}, official bound {bound:.3f}"


@pytest.mark.parametrize("mode", ["faithful", "fast"])
def test_reload_does_not_depend_on_the_svd_sign_convention(mode, tmp_path, monkeypatch):
    """X Y mixes residual singular directions, so loading must not depend on which signs the SVD backend picks
    (MKL, OpenBLAS and cuSOLVER differ): a reload whose SVD returns some pairs as (-u_i, -v_i) gives the same outputs."""
    from rankwise.adapters import salt

    base = MLP()
    fresh = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.SaltConfig(target_modules=["lin0", "lin1"], r_lora=3, t=2, mode=mode))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    x = torch.randn(5, 16)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path)

    svd = salt.truncated_svd

    def other_backend(weight, rank):
        U, S, Vh = svd(weight, rank)
        flip = torch.tensor([1.0, -1.0] * rank)[:rank]  # pairs 1, 3, 5, ... come back as (-u_i, -v_i)
        return U * flip, S, Vh * flip[:, None]

    monkeypatch.setattr(salt, "truncated_svd", other_backend)
    loaded = rankwise.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
