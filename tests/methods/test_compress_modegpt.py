"""Spec checks for MoDeGPT (methods-compress-pretrain.md section 9)."""
import tempfile

import pytest
import torch
from torch import nn

from _compress_models import padded_batches, tiny_bert, tiny_llama, token_batches
from rankwise.compress import compress, load_compressed, save_compressed
from rankwise.compress.modegpt import (GatherInputLinear, ModeGPTConfig, ScatterOutputLinear, allocate_sparsity,
                                       cr_head_dims, nystrom_columns, value_output_svd)
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
    assert isinstance(model.model.layers[0].self_attn.o_proj, GatherInputLinear)


def test_shapes_ratio_and_round_trip():
    model = tiny_llama(layers=3)
    model, report = compress(model, "modegpt", token_batches(), ratio=0.5, allocation="uniform")
    layer = model.model.layers[0]
    assert layer.mlp.gate_proj.out_features == 32 and layer.mlp.down_proj.in_features == 32
    assert isinstance(layer.self_attn.q_proj, ScatterOutputLinear)
    assert layer.self_attn.q_proj.weight.shape[0] == 4 * 4 and layer.self_attn.k_proj.weight.shape[0] == 2 * 4
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
    assert layer.attention.self.query.weight.shape[0] == 4 * 4 and layer.attention.self.value.weight.shape[0] == 4 * 4
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
