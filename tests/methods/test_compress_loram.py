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
