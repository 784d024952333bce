"""Spec checks for MoDeGPT (methods-compress-pretrain.md section 9)."""
import tempfile

import pytest
import torch
from torch import nn

from _compress_models import padded_batches, tiny_bert, tiny_llama, token_batches
from rankwise.compress import compress, load_compressed, save_compressed
from rankwise.compress.modegpt import (ModeGPTConfig, allocate_sparsity, cr_head_dims, nystrom_columns,
                                       value_output_svd)
from rankwise.compress.pruned_attention import PrunedRopeAttention, PrunedSelfAttention
from rankwise.core.errors import ConfigError, ShapeError, TargetError


def correlated_inputs(n=2000, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing


def test_value_output_svd_is_optimal_and_beats_weight_svd():
    X = correlated_inputs()
    g = torch.Generator().manual_seed(1)
    w_v = torch.randn(64, 16, generator=g, dtype=torch.float64)
    w_o = torch.randn(16, 64, generator=g, dtype=torch.float64)
    C = X.T @ X
    new_v, (new_o,), S = value_output_svd(C, w_v, [w_o], k=6, ridge=0.0)
    err = torch.linalg.matrix_norm(X @ w_v @ w_o - X @ new_v @ new_o) ** 2
    torch.testing.assert_close(err, (S[6:] ** 2).sum(), rtol=1e-6, atol=0)
    U, s, Vh = torch.linalg.svd(w_v @ w_o)
    weight_svd = U[:, :6] @ torch.diag(s[:6]) @ Vh[:6]
    err_weight = torch.linalg.matrix_norm(X @ w_v @ w_o - X @ weight_svd) ** 2
    truncate_v = torch.linalg.matrix_norm(X @ w_v @ w_o - X @ w_v[:, :6] @ w_o[:6]) ** 2
    assert err < 0.5 * err_weight and err < truncate_v


def test_nystrom_refit_beats_no_refit():
    X = correlated_inputs(d=32)
    g = torch.Generator().manual_seed(2)
    w_u = torch.randn(32, 128, generator=g, dtype=torch.float64)
    w_d = torch.randn(128, 32, generator=g, dtype=torch.float64)
    H = torch.relu(X @ w_u)
    for k in (32, 64):
        kept, refit = nystrom_columns(H.T @ H / len(H), k, ridge=1e-2)
        assert kept.numel() == k
        refit_err = torch.linalg.matrix_norm(H @ w_d - H[:, kept] @ (refit @ w_d)) ** 2
        plain_err = torch.linalg.matrix_norm(H @ w_d - H[:, kept] @ w_d[kept]) ** 2
        assert refit_err < 0.3 * plain_err


def test_cr_keeps_rope_pairs_and_sums_over_query_group():
    q_diag = torch.rand(4, 8)
    k_diag = torch.rand(2, 8)
    kept = cr_head_dims(q_diag, k_diag, group=2, k=4, rope=True)
    for dims in kept:
        assert dims.numel() == 4
        assert set((dims[dims < 4] + 4).tolist()) == set(dims[dims >= 4].tolist())
    # a dim that only one query head of the group uses strongly still wins for the whole group
    q_diag = torch.full((2, 4), 0.1)
    q_diag[1, 2] = 100.0
    k_diag = torch.ones(1, 4)
    assert 2 in cr_head_dims(q_diag, k_diag, group=2, k=1, rope=False)[0].tolist()


def test_allocation_keeps_mean_and_reverses_order():
    scores = torch.tensor([0.30, 0.02, 0.10, 0.05, 0.01])
    phi = allocate_sparsity(scores, 0.4, eps=0.05, max_sparsity=0.8)
    assert abs(float(phi.mean()) - 0.4) < 1e-9 and float(phi.max()) <= 0.8 + 1e-12
    assert torch.equal(torch.argsort(phi), torch.argsort(-scores.double()))


def test_full_ratio_reproduces_model_and_reloads():
    model = tiny_llama()
    ids = token_batches(1)[0]
    reference = model(ids).logits
    model, report = compress(model, "modegpt", token_batches(), ratio=1.0)
    assert (model(ids).logits - reference).abs().max() < 1e-5
    assert isinstance(model.model.layers[0].self_attn, PrunedRopeAttention)


def test_shapes_ratio_and_round_trip():
    model = tiny_llama(layers=3)
    model, report = compress(model, "modegpt", token_batches(), ratio=0.5, allocation="uniform")
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.out_features == 32 and layer.mlp.down_proj.in_features == 32
    attn = layer.self_attn
    assert isinstance(attn, PrunedRopeAttention) and (attn.qk_dim, attn.v_dim) == (4, 4)
    assert attn.q_proj.weight.shape == (4 * 4, 32) and attn.k_proj.weight.shape == (2 * 4, 32)
    assert attn.v_proj.weight.shape == (2 * 4, 32) and attn.o_proj.weight.shape == (32, 4 * 4)
    assert abs(report.compressed_ratio - 0.5) < 1e-9
    ids = token_batches(1, seed=5)[0]
    with tempfile.TemporaryDirectory() as out:
        save_compressed(model, out, method="modegpt")
        again = load_compressed(out)
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_bert_blocks_full_ratio_exact_and_half_ratio_shapes_and_reload():
    model = tiny_bert()
    batch = padded_batches(1, seed=7)[0]
    reference = model(**batch).last_hidden_state
    full, _ = compress(tiny_bert(), "modegpt", padded_batches(), ratio=1.0)
    assert (full(**batch).last_hidden_state - reference).abs().max() < 1e-4
    model, report = compress(model, "modegpt", padded_batches(), ratio=0.5, allocation="uniform")
    layer = model.encoder.layer[0]
    assert layer.intermediate.dense.out_features == 32 and layer.output.dense.in_features == 32
    # no RoPE: an odd number of dims per head may be kept (here 4 of 8)
    assert isinstance(layer.attention.self, PrunedSelfAttention)
    assert layer.attention.self.query.weight.shape[0] == 4 * 4 and layer.attention.self.value.weight.shape[0] == 4 * 4
    assert layer.attention.output.dense.weight.shape == (32, 4 * 4)
    assert abs(report.compressed_ratio - 0.5) < 0.01
    with tempfile.TemporaryDirectory() as out:
        save_compressed(model, out, method="modegpt")
        again = load_compressed(out)
        torch.testing.assert_close(again(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_global_allocation_reported():
    model, report = compress(tiny_llama(layers=3), "modegpt", token_batches(), ratio=0.7)
    phi = torch.tensor(report.extra["layer_sparsity"])
    assert abs(float(phi.mean()) - 0.3) < 1e-6 and len(report.extra["block_influence"]) == 3


def test_bad_inputs():
    with pytest.raises(ShapeError, match="calibration batch 0"):
        compress(tiny_llama(), "modegpt", [torch.randn(4, 16)], ratio=0.5)
    with pytest.raises(ShapeError, match="outside"):
        compress(tiny_llama(), "modegpt", [torch.full((2, 8), 999)], ratio=0.5)
    with pytest.raises(ShapeError, match="needs calibration"):
        compress(tiny_llama(), "modegpt", None, ratio=0.5)
    with pytest.raises(ConfigError, match="target_modules"):
        ModeGPTConfig(target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="modules"):
        ModeGPTConfig(modules=("attention",))
    with pytest.raises(TargetError, match="Llama-style"):
        compress(nn.Sequential(nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])), "modegpt", [torch.randn(2, 4)])


# ------------------------------------------------- physically smaller attention vs the zero-padded dense model
def zero_padded_llama(compressed, config):
    """The dense Llama of `config` that computes what `compressed` does by zero-padding every pruned weight.

    This is the formulation MoDeGPT had before its attention became physically smaller (pruned q/k rows,
    v rows and o columns, MLP channels all zero): an independent oracle for the smaller model's logits.
    """
    from transformers import LlamaForCausalLM

    dense = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in compressed.state_dict().items() if "layers." not in k}
    hd, group = config.head_dim, config.num_attention_heads // config.num_key_value_heads
    for i, layer in enumerate(compressed.model.layers):
        attn, mlp, p = layer.self_attn, layer.mlp, f"model.layers.{i}."
        q = torch.zeros(config.num_attention_heads * hd, config.hidden_size)
        k = torch.zeros(config.num_key_value_heads * hd, config.hidden_size)
        v, o = torch.zeros_like(k), torch.zeros(config.hidden_size, config.num_attention_heads * hd)
        qk, vd = attn.qk_dim, attn.v_dim
        for h in range(config.num_attention_heads):
            q[h * hd + attn.rope_dims[h // group]] = attn.q_proj.weight[h * qk:(h + 1) * qk]
            o[:, h * hd:h * hd + vd] = attn.o_proj.weight[:, h * vd:(h + 1) * vd]
        for j in range(config.num_key_value_heads):
            k[j * hd + attn.rope_dims[j]] = attn.k_proj.weight[j * qk:(j + 1) * qk]
            v[j * hd:j * hd + vd] = attn.v_proj.weight[j * vd:(j + 1) * vd]
        width = mlp.down_proj.in_features
        gate, up = torch.zeros(config.intermediate_size, config.hidden_size), torch.zeros(config.intermediate_size, config.hidden_size)
        down = torch.zeros(config.hidden_size, config.intermediate_size)
        gate[:width], up[:width], down[:, :width] = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                      p + "self_attn.o_proj.weight": o, p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                      p + "mlp.down_proj.weight": down,
                      p + "input_layernorm.weight": layer.input_layernorm.weight,
                      p + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight})
    dense.load_state_dict(state, strict=True)
    return dense


def test_smaller_attention_equals_zero_padded_dense_and_generates_with_a_smaller_cache():
    model = tiny_llama(layers=3)
    config = model.config
    model, report = compress(model, "modegpt", token_batches(), ratio=0.6)  # global allocation: sizes differ per layer
    dims = [(layer.self_attn.qk_dim, layer.self_attn.v_dim, layer.mlp.down_proj.in_features) for layer in model.model.layers]
    assert len(set(dims)) > 1 and all(qk < 8 and v < 8 and width < 64 for qk, v, width in dims)
    # the kept RoPE pairs are not a prefix: the kept frequencies are the original ones of those dims
    assert any(not torch.equal(layer.self_attn.rope_dims[0, : layer.self_attn.qk_dim // 2],
                               torch.arange(layer.self_attn.qk_dim // 2)) for layer in model.model.layers)
    oracle = zero_padded_llama(model, config)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        assert (model(ids).logits - oracle(ids).logits).abs().max() < 1e-5
        # a padded batch goes through the attention mask the same way
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        assert (model(ids, attention_mask=mask).logits - oracle(ids, attention_mask=mask).logits)[mask.bool()].abs().max() < 1e-5
        out = model(ids, use_cache=True)
    for layer, cached in zip(model.model.layers, out.cache.layers):
        assert cached.keys.shape == (4, 2, 16, layer.self_attn.qk_dim)
        assert cached.values.shape == (4, 2, 16, layer.self_attn.v_dim)
    prompt = ids[:2, :6]
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(generated, oracle.generate(prompt, max_new_tokens=8, do_sample=False), rtol=0, atol=0)
    with tempfile.TemporaryDirectory() as out_dir:
        save_compressed(model, out_dir, method="modegpt")
        again = load_compressed(out_dir)
        assert isinstance(again.model.layers[1].self_attn, PrunedRopeAttention)
        torch.testing.assert_close(again(ids).logits, model(ids).logits)
        torch.testing.assert_close(again.generate(prompt, max_new_tokens=8, do_sample=False), generated)


def test_bert_smaller_attention_equals_zero_padded_dense():
    model = tiny_bert()
    dense = tiny_bert()  # same seed: the weights the oracle starts from
    model, _ = compress(model, "modegpt", padded_batches(), ratio=0.5, allocation="uniform")
    hd = 8
    with torch.no_grad():
        for layer, ref in zip(model.encoder.layer, dense.encoder.layer):
            attn = layer.attention.self
            for name in ("query", "key"):
                full, small = getattr(ref.attention.self, name), getattr(attn, name)
                kept = torch.zeros(4, hd, dtype=torch.bool)
                # recover the kept dims from the rows the compressed layer copied
                for h in range(4):
                    for r in range(attn.qk_dim):
                        kept[h, (full.weight[h * hd:(h + 1) * hd] == small.weight[h * attn.qk_dim + r]).all(1)] = True
                padded_w, padded_b = torch.zeros_like(full.weight), torch.zeros_like(full.bias)
                padded_w[kept.flatten()], padded_b[kept.flatten()] = small.weight, small.bias
                full.weight.copy_(padded_w)
                full.bias.copy_(padded_b)
            v, o = ref.attention.self.value, ref.attention.output.dense
            v.weight.zero_(), v.bias.zero_(), o.weight.zero_()
            for h in range(4):
                v.weight[h * hd:h * hd + attn.v_dim] = attn.value.weight[h * attn.v_dim:(h + 1) * attn.v_dim]
                o.weight[:, h * hd:h * hd + attn.v_dim] = layer.attention.output.dense.weight[:, h * attn.v_dim:(h + 1) * attn.v_dim]
            o.bias.copy_(layer.attention.output.dense.bias)
            width = layer.intermediate.dense.out_features
            ref.intermediate.dense.weight.zero_()
            ref.intermediate.dense.bias.fill_(-1e4)  # GELU(-1e4) = 0: the padded channels contribute nothing
            ref.intermediate.dense.weight[:width] = layer.intermediate.dense.weight
            ref.intermediate.dense.bias[:width] = layer.intermediate.dense.bias
            ref.output.dense.weight.zero_()
            ref.output.dense.weight[:, :width] = layer.output.dense.weight
            ref.output.dense.bias.copy_(layer.output.dense.bias)
        batch = padded_batches(1, seed=7)[0]
        real = batch["attention_mask"].bool()
        diff = (model(**batch).last_hidden_state - dense(**batch).last_hidden_state)[real]
    assert diff.abs().max() < 1e-5


# ------------------------------------------------------------------------- sequential statistics in a block
def test_mlp_statistics_come_from_the_block_with_its_attention_compressed():
    """The MLP of block 0 is refit from the inputs its compressed attention produces, not the dense block's."""
    from _compress_models import tiny_llama as build
    from rankwise.compress._common import capture_block_inputs, moment_hooks, run_block

    batches = token_batches()
    full, _ = compress(build(layers=1), "modegpt", batches, ratio=0.5, allocation="uniform")
    attention_only, _ = compress(build(layers=1), "modegpt", batches, ratio=0.5, allocation="uniform", modules=("qk", "vo"))
    torch.testing.assert_close(full.model.layers[0].self_attn.q_proj.weight, attention_only.model.layers[0].self_attn.q_proj.weight)

    def mlp_input_correlation(model):
        block = model.model.layers[0]
        stats, remove = moment_hooks({"mlp": block.mlp.down_proj}, side="input")
        run_block(block, capture_block_inputs(model, block, batches))
        remove()
        return stats["mlp"].correlation()

    dense = build(layers=1)
    expected = {}
    for name, source in (("compressed attention", attention_only), ("dense attention", dense)):
        kept, refit = nystrom_columns(mlp_input_correlation(source), 32, ridge=1e-2)
        expected[name] = (dense.model.layers[0].mlp.gate_proj.weight[kept], dense.model.layers[0].mlp.down_proj.weight.double() @ refit.T)
    mlp = full.model.layers[0].mlp
    torch.testing.assert_close(mlp.gate_proj.weight, expected["compressed attention"][0])
    torch.testing.assert_close(mlp.down_proj.weight.double(), expected["compressed attention"][1], rtol=1e-5, atol=1e-6)
    # and the dense block's statistics would give another MLP: the test can tell the two orders apart
    other = expected["dense attention"]
    assert other[0].shape != mlp.gate_proj.weight.shape or not torch.allclose(mlp.down_proj.weight.double(), other[1], atol=1e-4)


def test_compressing_twice_is_refused():
    model, _ = compress(tiny_llama(), "modegpt", token_batches(), ratio=0.7)
    with pytest.raises(TargetError, match="already compressed"):
        compress(model, "modegpt", token_batches(), ratio=0.7)


def test_biased_qwen2_attention_full_ratio_is_exact():
    """Qwen2 has q/k/v biases: the value bias is folded into o_proj's, the others carried to the smaller module."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()
    ids = token_batches(1)[0]
    reference = model(ids).logits
    model, _ = compress(model, "modegpt", token_batches(), ratio=1.0)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn, PrunedRopeAttention) and attn.v_proj.bias is None and attn.o_proj.bias is not None
    assert (model(ids).logits - reference).abs().max() < 1e-5
