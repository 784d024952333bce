"""Mixed precision: every adapter method trains under CPU bf16 autocast and on a bf16 base, and every fused
autograd Function gives gradients in its inputs' dtypes under autocast, close to the fp32 numbers.

Tolerances are bf16's: products run with 8 mantissa bits, so gradients are compared by relative norm (5 %).
"""
from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from rankwise.adapters.lora import FusedLoraLinear
from rankwise.adapters.randlora import FusedRandLoraLinear, ScaleBasis
from rankwise.adapters.sara import SparsePattern, _SparseDeltaLinear
from rankwise.linalg import FusedCoreLinear
from rankwise.pretrain.sltrain import _SparsePlusLowRankLinear
from rankwise.train.allora import AlloraFunction

from test_matrix import SMALL_KWARGS, perturb

BF16 = torch.bfloat16
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, GQA-narrow (32 -> 16) and wide-input (64 -> 32) layers
# Fit the tiny llama beyond the matrix's toy layers (DePT prepends prompt tokens: keep them within 32 positions).
LLAMA_KWARGS = {"dept": {"num_virtual_tokens": 4, "r": 4, "max_length": 16}}
# Methods whose update goes through a data-dependent selection (SNELL's top-k competition over a kernelised
# matrix): bf16 rounding moves a few entries across the threshold, so their gradients are compared more loosely.
SELECTION_TOL = {"snell": 0.25, "snella": 0.25}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def method_config(info, **extra):
    targets = TARGETS if "linear" in info.config_cls.supported_layers else ["embed_tokens"]  # DePT: the embedding
    kwargs = {**SMALL_KWARGS.get(info.name, {}), **LLAMA_KWARGS.get(info.name, {}), **extra}
    return info.config_cls(target_modules=targets, **kwargs)


METHODS = [pytest.param(info, id=info.name) for info in rankwise.list_methods()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def adapter_grads(model, ids, autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("info", METHODS)
def test_method_trains_under_bf16_autocast(info):
    model = rankwise.adapt(tiny_llama(), method_config(info))
    perturb(model)  # a non-zero update: every adapter tensor gets a gradient
    model.train()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))  # 32 tokens: fused paths pay
    reference = {n: g.clone() for n, g in adapter_grads(model, ids, autocast=False).items()}
    grads = adapter_grads(model, ids, autocast=True)
    params = dict(model.named_parameters())
    assert grads and set(grads) == set(reference)
    for name, grad in grads.items():
        assert grad is not None, name
        assert grad.dtype == params[name].dtype, (name, grad.dtype)
        assert torch.isfinite(grad).all(), name
        # A scalar's gradient is one sum over a whole layer (SNELLA's alpha: softmax rows sum to 1, so its terms cancel
        # to ~1e-3 of their size): bf16 rounding of the terms dominates it. Dtype and finiteness are still checked.
        if reference[name].norm() > 1e-6 and reference[name].numel() > 1:
            tol = SELECTION_TOL.get(info.name, 0.05)
            assert rel_err(grad, reference[name]) < tol, (name, rel_err(grad, reference[name]))


@pytest.mark.parametrize("info", METHODS)
def test_method_trains_on_a_bf16_base(info):
    model = rankwise.adapt(tiny_llama().to(BF16), method_config(info))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    for autocast in (False, True):
        loss = None
        with torch.autocast("cpu", dtype=BF16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        for name, p in trainable.items():
            assert p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()), name
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(before[n], p.detach()) for n, p in trainable.items())


# ---- each fused Function directly ------------------------------------------------------------------------------

def _run(fn, tensors: dict[str, torch.Tensor], trainable: list[str], autocast: bool, grad_seed: int = 7):
    leaves = {k: (v.detach().clone().requires_grad_(k in trainable) if isinstance(v, torch.Tensor) and v.is_floating_point()
                  else v) for k, v in tensors.items()}
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        out = fn(**leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(g)
    return out, {k: leaves[k].grad for k in trainable}


def _check_function(fn, tensors, trainable):
    ref_out, ref_grads = _run(fn, tensors, trainable, autocast=False)
    out, grads = _run(fn, tensors, trainable, autocast=True)
    assert out.dtype == BF16  # the products ran in the autocast dtype
    assert rel_err(out, ref_out) < 0.05
    for k in trainable:
        assert grads[k].dtype == tensors[k].dtype, (k, grads[k].dtype)  # fp32 masters, fp32 gradients
        assert rel_err(grads[k], ref_grads[k]) < 0.05, (k, rel_err(grads[k], ref_grads[k]))


def _rand(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_fused_lora_linear_under_autocast():
    t = {"x": _rand(3, 5, 16), "weight": _rand(24, 16, seed=1), "bias": _rand(24, seed=2),
         "lora_A": _rand(4, 16, seed=3), "lora_B": _rand(24, 4, seed=4)}
    _check_function(lambda **k: FusedLoraLinear.apply(k["x"], k["weight"], k["bias"], k["lora_A"], k["lora_B"], 0.5),
                    t, ["x", "lora_A", "lora_B", "bias"])


@pytest.mark.parametrize("in_small", [True, False])
def test_fused_randlora_linear_under_autocast(in_small):
    small, big, r, n = 16, 24, 4, 4
    out_f, in_f = (big, small) if in_small else (small, big)
    t = {"x": _rand(2, 6, in_f), "weight": _rand(out_f, in_f, seed=1), "bias": _rand(out_f, seed=2),
         "lam": _rand(r, n, seed=3), "gam": _rand(n, small, seed=4), "basis_a": _rand(r, 1, small, seed=5),
         "basis_b": _rand(big, r * n, seed=6)}
    _check_function(lambda **k: FusedRandLoraLinear.apply(k["x"], k["weight"], k["bias"], k["lam"], k["gam"],
                                                          k["basis_a"], k["basis_b"], 0.5, in_small),
                    t, ["x", "lam", "gam", "bias"])


def test_scale_basis_under_autocast():
    t = {"basis_a": _rand(4, 1, 16), "lam": _rand(4, 3, seed=1), "gam": _rand(3, 16, seed=2), "w": _rand(24, 12, seed=3)}
    # S enters a matmul, as in RandLoRA's skinny path: under autocast its gradient arrives from a bf16 product
    _check_function(lambda **k: k["w"] @ ScaleBasis.apply(k["basis_a"], k["lam"], k["gam"]).flatten(0, 1),
                    t, ["lam", "gam"])


@pytest.mark.parametrize("core_shape", [(4,), (4, 4)], ids=["diagonal", "matrix"])
def test_fused_core_linear_under_autocast(core_shape):
    t = {"x": _rand(3, 5, 16), "weight": _rand(24, 16, seed=1), "bias": _rand(24, seed=2),
         "left": _rand(24, 4, seed=3), "core": _rand(*core_shape, seed=4), "right": _rand(4, 16, seed=5)}
    _check_function(lambda **k: FusedCoreLinear.apply(k["x"], k["weight"], k["bias"], k["left"], k["core"], k["right"]),
                    t, ["x", "core", "bias"])


def test_sparse_delta_linear_under_autocast():
    out_f, in_f = 12, 16
    indices = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(0))[:40].sort().values
    pattern = SparsePattern(indices, out_f, in_f)
    t = {"x": _rand(3, 4, in_f), "values": _rand(40, seed=1), "origin": torch.zeros(40)}
    _check_function(lambda **k: _SparseDeltaLinear.apply(k["x"], k["values"], k["origin"], pattern, None, None).to(BF16),
                    t, ["x", "values"])


def test_allora_function_under_autocast():
    t = {"x": _rand(3, 5, 16), "A": _rand(4, 16, seed=1, scale=0.3), "B": _rand(24, 4, seed=2, scale=0.3)}
    _check_function(lambda **k: AlloraFunction.apply(k["x"], k["A"], k["B"], 2.0, 1), t, ["x", "A", "B"])


def test_sltrain_function_under_autocast():
    out_f, in_f, r = 24, 16, 4
    index = torch.randperm(out_f * in_f, generator=torch.Generator().manual_seed(0))[:30].sort().values
    t = {"x": _rand(3, 5, in_f), "B": _rand(out_f, r, seed=1), "A": _rand(r, in_f, seed=2), "scale": torch.tensor(0.5),
         "values": _rand(30, seed=3), "bias": _rand(out_f, seed=4)}
    _check_function(lambda **k: _SparsePlusLowRankLinear.apply(k["x"], k["B"], k["A"], k["scale"], k["values"], index,
                                                               k["bias"]),
                    t, ["x", "B", "A", "scale", "values", "bias"])


def test_autocast_keeps_the_fused_lora_path():
    """Under autocast the fused Function still runs (one autograd node per layer), on an fp32 or a bf16 base."""
    for base in (tiny_llama(), tiny_llama().to(BF16)):
        model = rankwise.adapt(base, rankwise.LoraConfig(r=4, target_modules=TARGETS))
        ids = torch.randint(0, 64, (2, 16))
        with torch.autocast("cpu", dtype=BF16):
            out = model.model.model.layers[0].self_attn.q_proj(model.model.model.embed_tokens(ids))
        assert type(out.grad_fn).__name__ == "FusedLoraLinearBackward"
        assert out.dtype == BF16
        copy.deepcopy(model)  # the adapted model stays copyable after autocast use
