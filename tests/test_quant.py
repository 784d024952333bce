"""Quantized frozen base (rankwise.quant, torchao int8 / int4 weight-only): adapters train over it, gradients
match a dequantized fp32 reference, merges are exact (dense) or refused when re-quantization would lose the
update, adapter files hold only adapter tensors, and every registered method works over an int8 base."""
from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from torch import nn

import rankwise
import rankwise.quant as quant
from rankwise.core.errors import AdapterStateError, ConfigError, MergeError, RankwiseError
from rankwise.core.layer import AdaptedLayer
from rankwise.quant import QuantizedLinear, is_quantized, quantize_base

pytest.importorskip("torchao", reason="the quantized-base tests need the `quant` extra (torchao), installed by `test`")

from test_matrix import INPUT_SIDE_METHODS, SMALL_KWARGS, perturb  # noqa: E402

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(64, 128)
        self.lin1 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def token_batch(seed=0):
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every quantized linear replaced by an nn.Linear holding its dequantized weight."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, QuantizedLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                dense.weight.copy_(module.weight.dequantize())
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, dense)
    return ref


# ---- quantize_base --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme,max_rel_err", [("int8", 0.02), ("int4", 0.25)])
def test_quantize_mlp_reports_layers_and_bytes(scheme, max_rel_err):
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    report = quantize_base(model, scheme, skip=("head",), group_size=32)
    assert report.layers == ["lin0", "lin1"] and report.skipped == {"head": "in skip"}
    assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in report.layers)
    assert isinstance(model.lin0, nn.Linear) and is_quantized(model.lin0.weight) and not is_quantized(model.head.weight)
    # int8 storage + per-row (int8) or per-group (int4, unpacked) scales: well under half the fp32 bytes
    assert report.weight_bytes_after < 0.4 * report.weight_bytes_before
    assert report.model_bytes_after < report.model_bytes_before
    assert json.loads(json.dumps(report.to_dict()))["scheme"] == scheme
    x = torch.randn(8, 64)
    with torch.no_grad():
        y, y_ref = model(x), reference(x)
    rel = float((y - y_ref).norm() / y_ref.norm())
    assert 0 < rel < max_rel_err


def test_quantize_llama_skips_tied_head_and_keeps_embeddings_dense():
    model = tiny_llama()
    report = quantize_base(model, "int8")
    assert len(report.layers) == 2 * len(LLAMA_LINEARS)
    assert "lm_head" in report.skipped
    assert not is_quantized(model.model.embed_tokens.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tie intact


def test_int4_skips_layers_whose_width_does_not_fit_the_group():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    report = quantize_base(model, "int4", skip=(), group_size=64)
    assert report.layers == ["0"] and "group_size=64" in report.skipped["1"]


def test_unknown_scheme_and_bad_group_size_raise_config_error_and_leave_model_unchanged():
    model = MLP()
    with pytest.raises(ConfigError, match="scheme='nf4'.*int8, int4"):
        quantize_base(model, "nf4")
    with pytest.raises(ConfigError, match="group_size"):
        quantize_base(model, "int4", group_size=0)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_missing_backend_raises_rankwise_error_naming_pip(monkeypatch):
    real_import = importlib.import_module

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(quant.importlib, "import_module", no_torchao)
    model = MLP()
    with pytest.raises(RankwiseError, match=r"pip install \"rankwise\[quant\]\"") as info:
        quantize_base(model, "int8")
    assert isinstance(info.value, quant.QuantBackendError)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_quantize_after_adapt_is_refused():
    model = rankwise.adapt(MLP(), rankwise.LoraConfig(r=4, target_modules=["lin0"]))
    with pytest.raises(ConfigError, match="before rankwise.adapt"):
        quantize_base(model.model, "int8")


# ---- training over the quantized base -------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_lora_trains_over_quantized_llama(scheme):
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_base(model, scheme)
    frozen = {n: m.weight.qdata.clone() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS))
    adapted.train()
    ids = token_batch()
    opt = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    after = {n: m.weight.qdata for n, m in adapted.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert frozen.keys() == {n.replace(".base_layer", "") for n in after}
    for name, qdata in after.items():
        assert torch.equal(qdata, frozen[name.replace(".base_layer", "")]), f"{name}: the frozen base changed"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gradients_match_dequantized_fp32_reference(scheme):
    torch.manual_seed(0)
    model = MLP()
    quantize_base(model, scheme, skip=("head",), group_size=32)
    reference = dequantized_copy(model)
    config = rankwise.LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"], init_lora_weights=False)
    adapted = rankwise.adapt(model, config)
    ref_adapted = rankwise.adapt(reference, copy.deepcopy(config))
    ref_params = dict(ref_adapted.named_parameters())
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if p.requires_grad:
                ref_params[name].copy_(p)
    x = torch.randn(6, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    adapted(x).square().sum().backward()
    ref_adapted(x_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_params[name].grad, rtol=1e-4, atol=1e-5)


def test_backward_keeps_no_dense_copy_of_the_quantized_weight():
    # torchao's CPU linear alone would save the dequantized weight for backward (the memory of an fp32 base)
    model = MLP()
    quantize_base(model, "int8", skip=("head",))
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=4, target_modules=["lin0", "lin1"]))
    weight_shapes = {(128, 64), (64, 128)}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = adapted(torch.randn(5, 64, requires_grad=True))
    assert saved and not weight_shapes & set(saved), saved
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_quantized_base_trains(dtype):
    model = tiny_llama().to(dtype)
    quantize_base(model, "int8")
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=4, target_modules=LLAMA_LINEARS))
    ids = token_batch()
    loss = adapted(input_ids=ids, labels=ids).loss
    loss.backward()
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora_b)


# ---- merge ----------------------------------------------------------------------------------------------------
def _adapted_llama(scheme="int8", scale=0.5):
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_base(model, scheme)
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_LINEARS))
    perturb(adapted, scale=scale)
    return adapted


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_merge_and_unload_is_dense_and_equals_the_adapted_model(scheme):
    adapted = _adapted_llama(scheme)
    ids = token_batch(1)
    y_adapted = _logits(adapted, ids)
    with adapted.disable_adapter():
        y_base = _logits(adapted, ids)
    assert (y_adapted - y_base).abs().max() > 1e-2
    merged = adapted.merge_and_unload()
    assert not any(isinstance(m, (AdaptedLayer, QuantizedLinear)) for m in merged.modules())
    y_merged = _logits(merged, ids)
    torch.testing.assert_close(y_merged, y_adapted, atol=1e-4, rtol=1e-4)
    assert (y_merged - y_base).abs().max() > 1e-2  # the update really is in the weights (PEFT #2586)


def test_merge_adapter_then_unmerge_restores_the_quantized_weight_exactly():
    adapted = _adapted_llama()
    ids = token_batch(2)
    layer = adapted.model.model.layers[0].self_attn.q_proj
    qdata = layer.base_layer.weight.qdata.clone()
    y_adapted = _logits(adapted, ids)
    adapted.merge_adapter()
    assert not layer.is_quantized and layer.merged_adapters == ["default"]
    assert "quantized_base" not in dict(layer.named_children())
    torch.testing.assert_close(_logits(adapted, ids), y_adapted, atol=1e-4, rtol=1e-4)
    adapted.unmerge_adapter()
    assert layer.is_quantized and torch.equal(layer.base_layer.weight.qdata, qdata)
    torch.testing.assert_close(_logits(adapted, ids), y_adapted, atol=1e-5, rtol=1e-5)


def test_merge_and_requantize_reports_the_error_and_stays_quantized():
    adapted = _adapted_llama(scale=2.0)
    ids = token_batch(3)
    y_adapted = _logits(adapted, ids)
    with adapted.disable_adapter():
        y_base = _logits(adapted, ids)
    merged, report = rankwise.merge_and_requantize(adapted, requantize=True)
    assert report.requantized and len(report.merge_error) == 2 * len(LLAMA_LINEARS)
    assert sum(isinstance(m, QuantizedLinear) for m in merged.modules()) == 2 * len(LLAMA_LINEARS)
    # the re-quantization error is small next to what the adapter changes, and the merge is not a no-op
    for name, err in report.merge_error.items():
        assert 0 < err < 0.5 * report.update_size[name], name
    y_merged = _logits(merged, ids)
    assert (y_merged - y_adapted).abs().max() < 0.5 * (y_adapted - y_base).abs().max()


def test_requantize_refuses_a_merge_that_would_lose_the_update():
    adapted = _adapted_llama()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.mul_(1e-6)  # an update far below the int8 step
    ids = token_batch(4)
    y_adapted = _logits(adapted, ids)
    with pytest.raises(MergeError, match="below the quantization step"):
        rankwise.merge_and_requantize(adapted, requantize=True)
    # nothing changed: still adapted, same outputs; the dense merge keeps the update
    assert any(isinstance(m, AdaptedLayer) for m in adapted.modules())
    torch.testing.assert_close(_logits(adapted, ids), y_adapted, atol=0, rtol=0)
    merged, report = rankwise.merge_and_requantize(adapted)
    assert not report.requantized and report.max_merge_error < 1e-5
    torch.testing.assert_close(_logits(merged, ids), y_adapted, atol=1e-5, rtol=1e-5)


# ---- files ----------------------------------------------------------------------------------------------------
def test_save_and_load_adapter_over_a_quantized_base(tmp_path):
    from safetensors.torch import load_file

    adapted = _adapted_llama()
    ids = token_batch(5)
    y = _logits(adapted, ids)
    adapted.save_adapter(tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors), sorted(tensors)[:5]
    assert sum(t.numel() for t in tensors.values()) == adapted.trainable_summary()["trainable"]
    torch.manual_seed(0)
    fresh = tiny_llama()
    quantize_base(fresh, "int8")
    loaded = rankwise.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(loaded, ids), y, atol=1e-5, rtol=1e-5)


# ---- every registered method over an int8 base ----------------------------------------------------------------
def _method_config(info):
    if info.name in INPUT_SIDE_METHODS:  # DePT: a soft prompt and a table on the (dense) input embeddings
        return info.config_cls(target_modules=["embed_tokens"], num_virtual_tokens=3, r=2, max_length=16)
    targets = ["q_proj", "k_proj", "down_proj"]
    return info.config_cls(target_modules=targets, **SMALL_KWARGS.get(info.name, {}))


@pytest.mark.parametrize("info", [pytest.param(i, id=i.name) for i in rankwise.list_methods()])
def test_every_method_trains_and_merges_over_an_int8_base(info):
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_base(model, "int8")
    dense_reference = dequantized_copy(model)
    adapted = rankwise.adapt(model, _method_config(info))
    ids = token_batch(6)
    with torch.no_grad():
        before = adapted(input_ids=ids).logits
    if info.config_cls.init_property in ("zero", "identity"):
        torch.testing.assert_close(before, dense_reference(input_ids=ids).logits, atol=2e-3, rtol=2e-3)
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(2):
        adapted(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    adapted.eval()
    y_adapted = _logits(adapted, ids)
    assert (y_adapted - before.float()).abs().max() > 0, "training over the int8 base changed nothing"
    assert all(m.weight.qdata.dtype == torch.int8 for m in adapted.modules() if isinstance(m, QuantizedLinear))
    if getattr(info.config_cls, "unmergeable_reason", None):
        with pytest.raises(AdapterStateError, match="cannot be merged"):
            adapted.merge_and_unload()
        return
    merged = adapted.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), y_adapted, atol=1e-4, rtol=1e-4)


def test_pissa_init_over_a_quantized_base_requantizes_the_residual():
    torch.manual_seed(0)
    model = tiny_llama()
    quantize_base(model, "int8")
    ids = token_batch(7)
    y_base = _logits(model, ids)
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=4, target_modules=LLAMA_LINEARS, init_lora_weights="pissa"))
    layer = adapted.model.model.layers[0].mlp.up_proj
    assert layer.is_quantized
    # base (quantized residual) + principal adapter reproduces the quantized base within the int8 error
    torch.testing.assert_close(_logits(adapted, ids), y_base, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_dequantized_scratch_equals_torchao_dequantize(scheme):
    weight = quant.quantize_weight(torch.randn(48, 128), scheme, group_size=32)
    expected = weight.dequantize()
    got = quant.dequantized_scratch(weight)
    assert torch.equal(got, expected)
    other = quant.quantize_weight(torch.randn(48, 128), scheme, group_size=32)
    assert quant.dequantized_scratch(other) is got  # one buffer per shape, reused
    assert torch.equal(got, other.dequantize())
