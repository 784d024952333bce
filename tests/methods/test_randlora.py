"""RandLoRA numeric checks (spec methods-adapters-a.md section 1), fused path, PEFT `randlora` files both ways."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.randlora import FusedRandLoraLinear, ScaleBasis
from peft_interop import ATOL, fresh_bert, peft_to_rankwise, rankwise_to_peft

TARGETS = ["query", "value", "dense"]  # 32x32, 48x32 and 32x48 layers: slicing and both orientations


def single(out_f, in_f, **kwargs):
    torch.manual_seed(0)
    config = rankwise.RandLoraConfig(target_modules=["0"], **{"randlora_alpha": 16, **kwargs})
    return rankwise.adapt(nn.Sequential(nn.Linear(in_f, out_f)), config)


def randomise(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))


def test_zero_delta_at_init():
    model = single(96, 64, r=8)
    assert torch.count_nonzero(model.delta_weights()["0"]) == 0


@pytest.mark.parametrize("out_f,in_f,r", [(96, 64, 8), (64, 96, 8), (96, 64, 7), (100, 60, 16)])
def test_full_rank_when_bases_cover_the_small_side(out_f, in_f, r):
    model = single(out_f, in_f, r=r)
    randomise(model)
    assert torch.linalg.matrix_rank(model.delta_weights()["0"].double()) == min(out_f, in_f)


@pytest.mark.parametrize("r,count", [(8, 8 * 8 + 8 * 64), (7, 7 * 10 + 10 * 64)])
def test_trainable_count(r, count):
    assert single(96, 64, r=r).trainable_summary()["trainable"] == count  # 576 and 710 per the spec


def test_same_key_same_bases_other_key_other_output():
    first, second, other = single(48, 32, r=4), single(48, 32, r=4), single(48, 32, r=4, projection_prng_key=1)
    assert torch.equal(first.shared["default"].randlora_B, second.shared["default"].randlora_B)
    for model in (first, other):
        randomise(model)
    x = torch.randn(3, 32)
    assert not torch.allclose(first(x), other(x))


def test_custom_functions_pass_gradcheck():
    gen = torch.Generator().manual_seed(0)
    basis_a = torch.randn(3, 1, 5, generator=gen, dtype=torch.float64)
    lam = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    gam = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ScaleBasis.apply, (basis_a, lam, gam))
    for out_f, in_f in ((7, 5), (5, 7)):  # in is the small side / out is
        small, big = min(out_f, in_f), max(out_f, in_f)
        n_bases = -(-small // 3)
        a = torch.randn(3, 1, small, generator=gen, dtype=torch.float64)
        b = torch.randn(big, n_bases * 3, generator=gen, dtype=torch.float64)
        lam = torch.randn(3, n_bases, generator=gen, dtype=torch.float64, requires_grad=True)
        gam = torch.randn(n_bases, small, generator=gen, dtype=torch.float64, requires_grad=True)
        x = torch.randn(2, 4, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
        w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
        bias = torch.randn(out_f, generator=gen, dtype=torch.float64)
        fn = lambda x, lam, gam: FusedRandLoraLinear.apply(x, w, bias, lam, gam, a, b, 0.7, in_f == small)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, lam, gam))


@pytest.mark.parametrize("out_f,in_f", [(48, 32), (32, 48)])
def test_fused_path_equals_factored_path(out_f, in_f):
    model = single(out_f, in_f, r=4)
    randomise(model)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(4, 64, in_f, requires_grad=True)  # 256 tokens: the fused path is taken
    fused = adapter.fused_forward(x, layer)
    assert fused is not None
    fused.pow(2).sum().backward()
    grads_fused = [t.grad.clone() for t in (x, adapter.randlora_lambda, adapter.randlora_gamma)]
    for t in (x, adapter.randlora_lambda, adapter.randlora_gamma):
        t.grad = None
    factored = adapter(x, layer.base_layer(x), layer)
    factored.pow(2).sum().backward()
    torch.testing.assert_close(fused, factored, atol=1e-4, rtol=1e-4)
    for got, ref in zip(grads_fused, (x.grad, adapter.randlora_lambda.grad, adapter.randlora_gamma.grad)):
        assert (got - ref).norm() <= 1e-5 * ref.norm()  # float32 round-off of two summation orders
    assert adapter.fused_forward(x[:, :2], layer) is None, "few tokens: the skinny path is cheaper"


def test_fused_path_saves_the_narrower_activation():
    """On a layer whose input is the larger side, backward keeps x B_hat (rN wide), not x (in wide)."""
    out_f, in_f, r = 16, 96, 4  # rN = 16 < in = 96
    model = single(out_f, in_f, r=r)
    randomise(model)
    layer = model.model[0]
    adapter = layer.adapters["default"]
    x = torch.randn(8, 64, in_f, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = adapter.fused_forward(x, layer)
    token_sized = [t for t in saved if t.dim() >= 2 and t.shape[0] == 8 * 64]
    assert token_sized and all(t.shape[-1] == r * adapter.n_bases for t in token_sized), [t.shape for t in saved]
    out.sum().backward()  # and the gradient still flows
    assert adapter.randlora_gamma.grad is not None and x.grad is not None


def test_bases_match_peft_bit_for_bit():
    import warnings

    from peft import RandLoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh_bert(), RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=3))
    buffers = dict(peft_model.named_buffers())
    ours = rankwise.adapt(fresh_bert(), rankwise.RandLoraConfig(r=4, target_modules=TARGETS, projection_prng_key=3))
    prefix = "base_model.model.encoder.layer.0.attention.self.query."
    for key in ("randlora_A", "randlora_B"):
        assert torch.equal(getattr(ours.shared["default"], key), buffers[prefix + key + ".default"])


@pytest.mark.parametrize("save_projection", [False, True])
def test_rankwise_file_loads_in_peft(save_projection, tmp_path):
    config = rankwise.RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS, save_projection=save_projection)
    expected, got = rankwise_to_peft(config, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "RANDLORA" and saved["save_projection"] is save_projection
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"save_projection": False}, {"sparse": True}])
def test_peft_file_loads_in_rankwise(kwargs, tmp_path):
    from peft import RandLoraConfig

    expected, got = peft_to_rankwise(RandLoraConfig(r=4, randlora_alpha=8, target_modules=TARGETS, **kwargs), tmp_path)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_file_without_projection_holds_only_scalings(tmp_path):
    model = rankwise.adapt(fresh_bert(), rankwise.RandLoraConfig(r=4, target_modules=["query", "value"]))
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[-1] for k in state} == {"randlora_lambda", "randlora_gamma"}
    assert sum(t.numel() for t in state.values()) == model.trainable_summary()["trainable"]


@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "r"), ({"randlora_alpha": 0}, "randlora_alpha"), ({"randlora_dropout": 1}, "randlora_dropout"),
    ({"projection_prng_key": -1}, "projection_prng_key"), ({"sparse": True, "very_sparse": True}, "very_sparse"),
    ({"save_projection": "yes"}, "save_projection"),
])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.RandLoraConfig(target_modules=["0"], **kwargs)


def test_rank_larger_than_layer():
    base = nn.Sequential(nn.Linear(16, 12))
    with pytest.raises(rankwise.ConfigError, match="at most 12"):
        rankwise.adapt(base, rankwise.RandLoraConfig(target_modules=["0"], r=13))
    assert isinstance(base[0], nn.Linear)


def test_defaults_follow_peft():
    """PEFT's RandLoraConfig defaults, except the two documented deviations (save_projection, alpha = 20 x r)."""
    from peft import RandLoraConfig

    ours, theirs = rankwise.RandLoraConfig(target_modules=["x"]), RandLoraConfig(target_modules=["x"])
    for field in ("r", "randlora_alpha", "randlora_dropout", "projection_prng_key", "sparse", "very_sparse",
                  "init_weights", "fan_in_fan_out"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.to_dict()["bias"] == theirs.bias == "none"
    assert theirs.save_projection is True and ours.save_projection is False  # rankwise regenerates the bases
    assert rankwise.RandLoraConfig(target_modules=["x"], r=8).randlora_alpha == 160  # PEFT keeps 640


def test_trainable_count_of_the_spec_example():
    """Spec: 768 x 768 at the default r = 32 -> N = 24 bases, 32*24 + 24*768 = 19 200 trainable numbers."""
    model = single(768, 768)
    assert model.model[0].adapters["default"].n_bases == 24
    assert model.trainable_summary()["trainable"] == 19_200


@pytest.mark.parametrize("out_f,in_f", [(48, 32), (32, 48)])
def test_merge_matches_forward_and_unmerge_restores_the_weight(out_f, in_f):
    """Spec check 6: merged forward == unmerged forward (1e-5), unmerge gives W back within 1e-6."""
    model = single(out_f, in_f, r=4).eval()
    adapter = model.model[0].adapters["default"]
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: delta of the size of W
        adapter.randlora_lambda.copy_(torch.randn(adapter.randlora_lambda.shape, generator=gen) * 0.01)
        adapter.randlora_gamma.add_(torch.randn(adapter.randlora_gamma.shape, generator=gen) * 0.01)
    weight = model.model[0].weight_matrix().detach().clone()
    assert model.delta_weights()["0"].abs().max() > 0.1 * weight.abs().max()
    x = torch.randn(6, in_f)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.model[0].weight_matrix(), weight + model.delta_weights()["0"], atol=1e-6, rtol=0)
        model.unmerge_adapter()
    torch.testing.assert_close(model.model[0].weight_matrix().detach(), weight, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs", [{"sparse": True}, {"very_sparse": True}], ids=["sparse", "very_sparse"])
def test_sparse_bases_match_peft_bit_for_bit(kwargs):
    """The ternary bases (P(+-1) = 1/6 each, or 1/(2 sqrt(m_max))) are PEFT's, so save_projection=False files agree.

    Targets of largest (out, in) = (48, 32): m_max = 32 differs from M_max = 48."""
    import warnings

    from peft import RandLoraConfig, get_peft_model

    targets = ["query", "intermediate.dense"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh_bert(), RandLoraConfig(r=4, target_modules=targets, projection_prng_key=3, **kwargs))
    buffers = dict(peft_model.named_buffers())
    ours = rankwise.adapt(fresh_bert(), rankwise.RandLoraConfig(r=4, target_modules=targets, projection_prng_key=3, **kwargs))
    prefix = "base_model.model.encoder.layer.0.attention.self.query."
    for key in ("randlora_A", "randlora_B"):
        mine = getattr(ours.shared["default"], key)
        assert torch.equal(mine, buffers[prefix + key + ".default"]), key
        low, zero, high = torch.unique(mine).tolist()  # ternary, scaled to unit std
        assert zero == 0 and low == -high
    nonzero = float((ours.shared["default"].randlora_B != 0).float().mean())  # 48 x 8 x 4 draws
    assert abs(nonzero - (1 / 3 if "sparse" in kwargs else 1 / 32**0.5)) < 0.05, nonzero
