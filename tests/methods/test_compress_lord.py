"""Spec checks for the SVD baseline and LoRD (methods-compress-pretrain.md section 6)."""
import pytest
import torch
from torch import nn

from _compress_models import tiny_llama, token_batches
from rankwise.compress import LowRankLinear, compress
from rankwise.compress._common import rank_for_ratio
from rankwise.compress.lord import LordConfig, global_ranks, lord_factors
from rankwise.core.errors import ConfigError, TargetError


def test_two_linear_replacement_reproduces_truncated_weight():
    W, b = torch.randn(24, 40), torch.randn(24)
    layer = LowRankLinear.from_factors(*lord_factors(W, 7), up_bias=b)
    U, S, Vh = torch.linalg.svd(W)
    W_r = U[:, :7] @ torch.diag(S[:7]) @ Vh[:7]
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), x @ W_r.T + b, rtol=1e-5, atol=1e-5)
    # Eckart-Young: the discarded energy is exactly the tail of the spectrum
    err = torch.linalg.matrix_norm(W - layer.weight) ** 2
    torch.testing.assert_close(err, (S[7:] ** 2).sum(), rtol=1e-4, atol=1e-5)
    # LoRD's split: down = Vh_r (orthonormal rows), up = U_r S_r
    torch.testing.assert_close(layer.down.weight @ layer.down.weight.T, torch.eye(7), atol=1e-5, rtol=0)


def test_parameter_count_and_dense_fallback():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model, report = compress(model, "lord", ratio=0.5, target_modules=[r"^\d$"])
    r = rank_for_ratio(64, 32, 0.5)
    assert isinstance(model[0], LowRankLinear) and model[0].rank == r
    assert sum(p.numel() for p in model[0].parameters()) == r * (64 + 32) + 32
    # the tiny last layer cannot shrink at this ratio and must stay dense, with a note
    r_last = rank_for_ratio(32, 8, 0.5)
    assert r_last * 40 < 32 * 8 or isinstance(model[2], nn.Linear)
    full = nn.Sequential(nn.Linear(16, 16))
    full, report = compress(full, "lord", ratio=1.0, target_modules=["0"])
    assert isinstance(full[0], nn.Linear) and report.notes and report.layers["0"]["kept_dense"]


def test_planted_rank_is_recovered_exactly():
    torch.manual_seed(3)
    W = torch.randn(48, 6) @ torch.randn(6, 40)
    x = torch.randn(20, 40)
    exact = LowRankLinear.from_factors(*lord_factors(W, 6))
    short = LowRankLinear.from_factors(*lord_factors(W, 5))
    assert (exact(x) - x @ W.T).abs().max() < 1e-4
    assert (short(x) - x @ W.T).abs().max() > 1e-2


def test_global_allocation_fits_budget_and_favours_hard_layers():
    torch.manual_seed(0)
    easy = torch.randn(32, 3) @ torch.randn(3, 32)  # rank 3: nearly free to compress
    hard = torch.randn(32, 32)
    spectra = {"easy": torch.linalg.svdvals(easy), "hard": torch.linalg.svdvals(hard)}
    shapes = {"easy": (32, 32), "hard": (32, 32)}
    ranks = global_ranks(spectra, shapes, 0.5)
    assert sum(r * 64 for r in ranks.values()) <= 0.5 * 2 * 32 * 32
    assert ranks["hard"] > ranks["easy"] and ranks["easy"] >= 3


@pytest.mark.parametrize("method", ["svd", "lord"])
def test_tiny_llama_ratio_and_outputs(method):
    model = tiny_llama()
    ids = token_batches(1)[0]
    reference = model(ids).logits
    model, report = compress(model, method, ratio=0.5)
    assert 0.4 < report.compressed_ratio <= 0.5
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in report.layers)
    assert "lm_head" not in " ".join(report.layers) and "embed" not in " ".join(report.layers)
    assert torch.isfinite(model(ids).logits).all() and not torch.allclose(model(ids).logits, reference)


def test_lord_global_allocation_on_model():
    model, report = compress(tiny_llama(), "lord", ratio=0.6, allocation="global")
    assert report.compressed_ratio <= 0.6 + 1e-9
    assert len({info["rank"] for info in report.layers.values()}) > 1


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, "half"])
def test_bad_ratio_raises_config_error(ratio):
    with pytest.raises(ConfigError, match="ratio"):
        LordConfig(ratio=ratio)


def test_bad_allocation_and_no_layers():
    with pytest.raises(ConfigError, match="allocation"):
        LordConfig(allocation="random")
    with pytest.raises(TargetError, match="no compressible"):
        compress(nn.Sequential(nn.ReLU()), "svd", ratio=0.5)
    with pytest.raises(TargetError, match="no compressible"):
        compress(tiny_llama(), "lord", ratio=0.5, target_modules=["does_not_exist"])


def test_lora_on_top_of_lord_factors():
    import rankwise

    model, _ = compress(tiny_llama(), "lord", ratio=0.5)
    ids = torch.randint(0, 64, (2, 8))
    compressed_out = model(ids).logits.detach()
    adapted = rankwise.adapt(model, rankwise.LoraConfig(r=2, target_modules=["down", "up"]))
    names = [n for n, _ in adapted.adapted_layers()]
    assert names and all(n.endswith((".down", ".up")) for n in names)
    torch.testing.assert_close(adapted(ids).logits, compressed_out)  # LoRA starts as the identity
    loss = adapted(ids, labels=ids).loss
    loss.backward()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
