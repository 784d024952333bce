"""LoLDU numeric checks (spec methods-adapters-a.md section 3)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.linalg import ldu_factors
from toy_models import MLP


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_ldu_reconstructs_the_weight(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    lower, pivots, upper = ldu_factors(W, min(shape))
    torch.testing.assert_close(lower @ torch.diag(pivots) @ upper, W, atol=1e-5 * W.norm(), rtol=0)
    assert torch.allclose(torch.diagonal(upper), torch.ones(min(shape)))
    assert torch.equal(torch.triu(upper), upper)


@pytest.mark.parametrize("r", [1, 8, None])
def test_zero_delta_at_init_and_r_trainable(r):
    base = MLP()
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LolduConfig(target_modules=["lin0", "lin1"], r=r))
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())
    expected = 2 * r if r else 16 + 24
    assert model.trainable_summary()["trainable"] == expected
    x = torch.randn(4, 16)
    torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


def test_rank_of_update_and_dense_permutation_reference():
    model = rankwise.adapt(MLP(), rankwise.LolduConfig(target_modules=["lin1"], r=8, loldu_alpha=2.0))
    adapter = model.model.lin1.adapters["default"]
    with torch.no_grad():
        adapter.loldu_z.add_(torch.randn(8))
    delta = model.delta_weights()["lin1"]
    assert torch.linalg.matrix_rank(delta) == 8
    # The reference form: dense P from torch.linalg.lu, L_r, D_r, U_r = (D^-1 U)[:r].
    W = model.model.lin1.weight_matrix().detach()
    P, L, U = torch.linalg.lu(W)
    D = torch.diagonal(U)
    ref = (2.0 / 8) * P @ L[:, :8] @ torch.diag(adapter.loldu_z.detach() - D[:8]) @ (U / D[:, None])[:8]
    torch.testing.assert_close(delta, ref, atol=1e-5, rtol=1e-4)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model.model.lin1(x).detach(), model.model.lin1.base_layer(x) + x @ ref.T, atol=1e-5, rtol=1e-4)


def test_file_holds_only_z(tmp_path):
    model = rankwise.adapt(MLP(), rankwise.LolduConfig(target_modules=["lin0", "lin1"]))
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in state} == {"loldu_z"}
    assert sum(t.numel() for t in state.values()) == 16 + 24


def test_zero_weight_layer_is_refused_clearly():
    base = MLP()
    with torch.no_grad():
        base.lin0.weight.zero_()
    with pytest.raises(rankwise.TargetError, match="lin0.*rank-deficient"):
        rankwise.adapt(base, rankwise.LolduConfig(target_modules=["lin0", "lin1"]))
    assert isinstance(base.lin0, nn.Linear) and isinstance(base.lin1, nn.Linear)


def test_embedding_with_a_zero_padding_row_is_factorised_through_its_transpose(tmp_path):
    # dim x num_embeddings with column padding_idx zero: row-pivoted LU of W meets a zero pivot at once, the
    # transpose does not; the split must still be exact and the update exactly zero at init.
    base = nn.Sequential(nn.Embedding(40, 16, padding_idx=0))
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LolduConfig(target_modules=["0"], loldu_alpha=4.0))
    adapter = model.model[0].adapters["default"]
    W = model.model[0].weight_matrix()
    torch.testing.assert_close(adapter.lower @ torch.diag(adapter.pivots) @ adapter.upper, W, atol=1e-5 * W.norm(), rtol=0)
    ids = torch.randint(0, 40, (3, 7))
    torch.testing.assert_close(model(ids), reference(ids), atol=1e-6, rtol=0)
    with torch.no_grad():
        adapter.loldu_z.mul_(1.5)
    changed = model(ids).detach()
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(ids), changed, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,field", [({"r": 0}, "r"), ({"r": "full"}, "r"), ({"loldu_alpha": 0}, "loldu_alpha")])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.LolduConfig(target_modules=["lin0"], **kwargs)


def test_rank_larger_than_layer():
    with pytest.raises(rankwise.ConfigError, match="LDU factors is at most 16"):
        rankwise.adapt(MLP(), rankwise.LolduConfig(target_modules=["lin0"], r=17))


def test_defaults_follow_the_official_config():
    """Official default_loldu_config: every factor trained (r = min(out, in), 768 on ViT-B), alpha 1 -> s = 1/r."""
    config = rankwise.LolduConfig(target_modules=["lin0"])
    assert (config.r, config.loldu_alpha) == (None, 1.0)
    adapter = rankwise.adapt(MLP(), config).model.lin0.adapters["default"]
    assert adapter.r == 16 and adapter.scaling == 1 / 16
