"""Spec checks for LoRAM (methods-compress-pretrain.md section 7)."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _compress_models import token_batches
from rankwise.compress import compress
from rankwise.compress._common import count_parameters
from rankwise.compress.loram import LoramConfig, kv_head_rows, prune_llama, recover_factors, storage_ratio
from rankwise.core.errors import ConfigError, TargetError


def gqa_llama(layers=3):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=4, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_gqa_index_mapping():
    # 8 query heads, 2 KV heads, head_dim 4: keeping only KV head 1 keeps query heads 4-7
    kv_rows, q_rows = kv_head_rows(torch.tensor([1]), head_dim=4, group=4)
    assert kv_rows.tolist() == list(range(4, 8))
    assert q_rows.tolist() == list(range(16, 32))


def test_recovery_round_trip_is_exact():
    torch.manual_seed(0)
    W0 = torch.randn(12, 10)
    rows, cols = torch.tensor([0, 3, 4, 9, 11]), torch.tensor([1, 2, 5, 7])
    A, B = torch.randn(3, len(cols)), torch.randn(len(rows), 3)
    A_rec, B_rec = recover_factors(A, B, (12, 10), {"rows": rows, "cols": cols})
    scale = 16 / 3
    full = W0 + scale * B_rec @ A_rec
    torch.testing.assert_close(full[rows][:, cols], W0[rows][:, cols] + scale * B @ A, rtol=0, atol=1e-6)
    delta = B_rec @ A_rec
    pruned_rows = torch.ones(12, dtype=torch.bool)
    pruned_rows[rows] = False
    pruned_cols = torch.ones(10, dtype=torch.bool)
    pruned_cols[cols] = False
    assert delta[pruned_rows].abs().max() == 0 and delta[:, pruned_cols].abs().max() == 0


def test_pruned_mlp_equals_full_with_neurons_zeroed():
    model = gqa_llama()
    cal = token_batches(2)
    pruned, index = prune_llama(model, cal, ratio=0.5, prune_attention=False, keep_first=0, keep_last=0)
    kept = index["model.layers.1.mlp.down_proj"]["cols"]
    assert len(kept) == 32
    mlp_full, mlp_small = model.model.layers[1].mlp, pruned.model.layers[1].mlp
    x = torch.randn(3, 5, 32)
    mask = torch.zeros(64)
    mask[kept] = 1
    hidden = mlp_full.act_fn(mlp_full.gate_proj(x)) * mlp_full.up_proj(x) * mask
    torch.testing.assert_close(mlp_small(x), mlp_full.down_proj(hidden), rtol=1e-5, atol=1e-6)


def test_pruned_attention_shapes_and_forward():
    model = gqa_llama()
    pruned, index = prune_llama(model, token_batches(2), ratio=0.5)
    attn = pruned.model.layers[1].self_attn
    assert attn.k_proj.out_features == 4 and attn.q_proj.out_features == 16 and attn.o_proj.in_features == 16
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 32  # first block kept whole
    assert torch.isfinite(pruned(token_batches(1)[0]).logits).all()
    full_params, small_params = count_parameters(model), count_parameters(pruned)
    assert small_params < full_params
    assert storage_ratio(full_params, small_params, 16, 4) == pytest.approx(4 * full_params / small_params)


def test_end_to_end_recovered_adapter_lowers_loss_on_full_model():
    model = gqa_llama()
    # a learnable, repetitive "language" so a few LoRA steps move the loss
    seq = torch.arange(16).repeat(4, 2) % 64
    cal = [seq, (seq + 1) % 64]

    @torch.no_grad()
    def loss(m):
        logits = m(cal[0]).logits
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), cal[0][:, 1:].reshape(-1)))

    before = loss(model)
    merged, report = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=25, lr=1e-2, r=4)
    assert type(merged) is type(model) and count_parameters(merged) == count_parameters(model)
    assert report.extra["train_loss_last"] < report.extra["train_loss_first"]
    assert loss(merged) < before
    # recovered delta vanishes on pruned MLP neurons of a pruned block
    kept = torch.zeros(64, dtype=torch.bool)
    pruned, index = prune_llama(model, cal, 0.5)
    kept[index["model.layers.1.mlp.up_proj"]["rows"]] = True
    delta = merged.model.layers[1].mlp.up_proj.weight - model.model.layers[1].mlp.up_proj.weight
    assert delta[~kept].abs().max() == 0 and delta[kept].abs().max() > 0


def test_bad_inputs():
    with pytest.raises(ConfigError, match="target_modules"):
        LoramConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="steps"):
        LoramConfig(steps=-2)
    with pytest.raises(TargetError, match="Llama-style"):
        prune_llama(torch.nn.Sequential(torch.nn.Linear(2, 2)), [torch.randn(1, 2)], 0.5)


# ------------------------------------------------------------------- alignment (step 1b)
def pattern_batches(offset=0, n=2):
    """A learnable, repetitive "language": rows of 0..15 counting up, shifted per batch."""
    seq = torch.arange(16).repeat(4, 2) % 64
    return [(seq + offset + i) % 64 for i in range(n)]


def lm_loss(model, batches):
    from rankwise.compress._common import mean_causal_lm_loss

    return mean_causal_lm_loss(model, batches)


def test_alignment_lowers_the_pruned_models_held_out_loss():
    from rankwise.compress.loram import align_pruned

    model = gqa_llama()
    cal, held_out = pattern_batches(0), pattern_batches(7)
    pruned, _ = prune_llama(model, cal, 0.5)
    before = lm_loss(pruned, held_out)
    head = pruned.lm_head.weight.detach().clone()
    info = align_pruned(pruned, cal, steps=20, lr=3e-3)
    assert info["loss_after"] < info["loss_before"] and len(info["history"]) == 20
    assert lm_loss(pruned, held_out) < before - 0.1
    torch.testing.assert_close(pruned.lm_head.weight, head, rtol=0, atol=0)  # the LM head stays frozen
    # through compress: reported, and the merged model is still the original's shape
    merged, report = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=10, lr=1e-2, r=4, align_steps=20,
                              align_lr=3e-3)
    assert report.extra["align"]["loss_after"] < report.extra["align"]["loss_before"]
    assert count_parameters(merged) == count_parameters(model)


def test_no_alignment_is_the_plain_pipeline_exactly():
    from rankwise.compress.loram import recover_adapter, train_lora

    model = gqa_llama()
    cal = pattern_batches(0)
    config = LoramConfig(ratio=0.5, steps=5, lr=1e-2, r=4)
    torch.manual_seed(1)  # the LoRA initialisation draws from the global generator
    merged, report = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=5, lr=1e-2, r=4, align_steps=0)
    assert "align" not in report.extra
    torch.manual_seed(1)
    pruned, index = prune_llama(model, cal, 0.5)
    adapted, _ = train_lora(pruned, cal, config)
    manual = recover_adapter(adapted, copy.deepcopy(model), index, config).merge_and_unload()
    for (name, p), (_, q) in zip(merged.state_dict().items(), manual.state_dict().items()):
        torch.testing.assert_close(p, q, msg=name, rtol=0, atol=0)


# ------------------------------------------------------------------- gradient importance
def dead_neuron_llama(neuron=5, dim=3):
    """A 3-block Llama whose block-1 MLP neuron `neuron` fires hard and writes a large vector into
    residual dimension `dim`, which every later norm multiplies by 0 (and a large `rms_norm_eps`
    keeps the RMS denominator from reading it): big activation energy, ~no effect on the loss."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=4, max_position_embeddings=64,
                         rms_norm_eps=100.0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        mlp = model.model.layers[1].mlp
        mlp.gate_proj.weight[neuron] *= 20
        mlp.up_proj.weight[neuron] *= 20
        mlp.down_proj.weight[:, neuron] = 0
        mlp.down_proj.weight[dim, neuron] = 5.0
        for norm in (model.model.layers[2].input_layernorm, model.model.layers[2].post_attention_layernorm,
                     model.model.norm):
            norm.weight[dim] = 0
    return model


def test_gradient_importance_prunes_a_loud_neuron_the_loss_ignores():
    from rankwise.compress.loram import activation_scores, gradient_scores

    model = dead_neuron_llama()
    cal = token_batches(3)
    blocks = model.model.layers
    act = activation_scores(model, blocks, cal, [1])[1][0]
    grad = gradient_scores(model, blocks, cal, [1])[1][0]
    assert int(act.argmax()) == 5  # the loudest neuron by activation energy
    assert grad[5] < 0.05 * grad.median()  # and nearly irrelevant to the loss
    _, by_act = prune_llama(model, cal, 0.5, importance="activation")
    _, by_grad = prune_llama(model, cal, 0.5, importance="gradient")
    assert 5 in by_act["model.layers.1.mlp.up_proj"]["rows"].tolist()
    assert 5 not in by_grad["model.layers.1.mlp.up_proj"]["rows"].tolist()
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
    merged, report = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=2, r=4, importance="gradient")
    assert report.extra["importance"] == "gradient"


def test_gradient_kv_head_score_sums_its_heads_weights():
    from rankwise.compress.loram import gradient_scores

    model = gqa_llama()
    cal = token_batches(2)
    attn = model.model.layers[1].self_attn
    scores = gradient_scores(model, model.model.layers, cal, [1])[1][1]
    weights = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight]
    loss = sum(__import__("rankwise.compress._common", fromlist=["x"]).causal_lm_loss(model, b) for b in cal)
    grads = torch.autograd.grad(loss, weights)
    t = [(w * g).abs().double() for w, g in zip(weights, grads)]
    # KV head 1 (head_dim 4, 4 query heads each): k/v rows 4..7, q rows 16..31, o columns 16..31
    expected = t[1][4:8].sum() + t[2][4:8].sum() + t[0][16:32].sum() + t[3][:, 16:32].sum()
    torch.testing.assert_close(scores[1], expected, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------- quantized pruned base (QLoRAM)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_pruned_base_trains_and_merges_into_the_full_precision_original(scheme):
    pytest.importorskip("torchao")
    from rankwise.quant import QuantizedLinear

    model = gqa_llama()
    cal = pattern_batches(0)
    merged, report = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=15, lr=1e-2, r=4,
                              quantize=scheme, quantize_group_size=16)
    assert report.extra["quantize"]["layers"] > 0 and report.extra["quantize"]["scheme"] == scheme
    assert report.extra["train_loss_last"] < report.extra["train_loss_first"]  # gradients reached the adapter
    assert not any(isinstance(m, QuantizedLinear) for m in merged.modules())  # merged into the fp original
    assert merged.model.layers[1].mlp.up_proj.weight.dtype == torch.float32
    delta = merged.model.layers[0].self_attn.q_proj.weight - model.model.layers[0].self_attn.q_proj.weight
    assert delta.abs().max() > 0
    # untouched weights (no LoRA on them) are bit-equal to the original: nothing was dequantized back into it
    torch.testing.assert_close(merged.model.layers[1].input_layernorm.weight,
                               model.model.layers[1].input_layernorm.weight, rtol=0, atol=0)
    plain, _ = compress(copy.deepcopy(model), "loram", cal, ratio=0.5, steps=15, lr=1e-2, r=4)
    # the merged update is W0 + s B A on the ORIGINAL weights: its distance to plain LoRAM is the adapter's only
    assert (merged.model.layers[1].mlp.up_proj.weight - plain.model.layers[1].mlp.up_proj.weight).abs().max() < 0.5


def test_bad_new_options():
    with pytest.raises(ConfigError, match="importance"):
        LoramConfig(importance="random")
    with pytest.raises(ConfigError, match="quantize"):
        LoramConfig(quantize="nf4")
    with pytest.raises(ConfigError, match="align_steps"):
        LoramConfig(align_steps=-1)


def test_cli_loram_options(tmp_path):
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from rankwise.cli import app

    model_dir, cal = tmp_path / "tiny", tmp_path / "cal.safetensors"
    gqa_llama().save_pretrained(str(model_dir))
    save_file({"input_ids": torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))}, str(cal))
    base = ["compress", str(model_dir), "--method", "loram", "--ratio", "0.5", "--calibration", str(cal),
            "--samples", "16", "--eval-samples", "8", "--option", "r=4", "--option", "steps=3"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*base, "--out", str(out), "--option", "align_steps=3", "--option", "align_lr=1e-3",
                                      "--option", "importance=gradient", "--option", "quantize=int8"])
    assert result.exit_code == 0, result.output
    extra = json.loads((out / "report.json").read_text())["extra"]
    assert extra["align"]["steps"] == 3 and extra["importance"] == "gradient" and extra["quantize"]["scheme"] == "int8"
    assert "align loss (3 steps)" in result.output
    bad = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "bad"), "--option", "quantize=nf4"])
    assert bad.exit_code == 2 and "quantize" in bad.output and not (tmp_path / "bad").exists()
