"""WeLore (arXiv 2407.11239): spec section 4(a) checks."""
import math

import pytest
import torch
from torch import nn

from rankwise.compress.welore import (LowRankLinear, WeLoreConfig, find_threshold, fine_tune, global_reduction,
                                      prune_counts, uniform_compress, weight_spectra, welore_compress)
from rankwise.core.errors import ConfigError

N = 256
SPECTRA = {
    "heavy": [math.exp(-i / 10) for i in range(1, N + 1)],
    "power": [i ** -0.3 for i in range(1, N + 1)],
    "flat": [1.0] * N,
}


def _hand_count(values, tau):
    low, high = min(values), max(values)
    if high == low:
        return 0
    return sum((v - low) / (high - low) < tau for v in values)


def _model_with_spectra():
    g = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.attn = nn.ModuleDict()
    for name, values in SPECTRA.items():
        U, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
        linear = nn.Linear(N, N)
        linear.weight.data = (U * torch.tensor(values, dtype=torch.float64)) @ V.T
        linear.weight.data = linear.weight.data.float()
        model.attn[name] = linear
    model.lm_head = nn.Linear(N, 8)
    return model


def test_selection_matches_hand_count_and_is_non_uniform():
    spectra = weight_spectra(_model_with_spectra())
    counts = prune_counts(spectra, 0.175)
    expected = {f"attn.{name}": _hand_count(values, 0.175) for name, values in SPECTRA.items()}
    assert counts == expected
    assert len(set(counts.values())) == 3  # a uniform-ratio rule would give equal counts
    assert counts["attn.flat"] == 0 and counts["attn.heavy"] > counts["attn.power"]


def test_conversion_lrc_is_svd_truncation_nlrc_untouched_trainable_count():
    model = _model_with_spectra()
    originals = {name: model.attn[name].weight.detach().clone() for name in SPECTRA}
    model, report = welore_compress(model, WeLoreConfig(threshold=0.175, min_ratio=0.4999))
    lrc = {name for name, layer in report["layers"].items() if layer["lrc"]}
    assert lrc == {"attn.heavy", "attn.power"}  # 238 and 217 of 256 pruned; the flat one keeps its rank
    trainable = 0
    for name in ("heavy", "power"):
        layer = model.attn[name]
        assert isinstance(layer, LowRankLinear)
        k = report["layers"][f"attn.{name}"]["kept_rank"]
        U, S, Vh = torch.linalg.svd(originals[name].double())
        truncation = (U[:, :k] * S[:k]) @ Vh[:k]
        torch.testing.assert_close((layer.up.weight @ layer.down.weight).double(), truncation, atol=1e-5, rtol=1e-4)
        trainable += k * (N + N)
    assert torch.equal(model.attn["flat"].weight, originals["flat"])
    assert not model.attn["flat"].weight.requires_grad
    assert report["trainable_params"] == trainable
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable


def test_bisection_hits_target_within_one_rank():
    spectra = weight_spectra(_model_with_spectra())
    total = sum(s.numel() for s in spectra.values())
    for target in (0.2, 0.3, 0.5):
        tau = find_threshold(spectra, target)
        assert abs(global_reduction(spectra, tau) * total - target * total) <= 1


def test_fine_tune_changes_only_lrc_and_uniform_baseline():
    model, report = welore_compress(_model_with_spectra(), WeLoreConfig(threshold=0.175))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = model.attn["heavy"].down.weight.detach().clone()
    x = torch.randn(16, N)

    def loss_at_step(m, step):
        return sum(layer(x).pow(2).mean() for layer in m.attn.values())

    losses = fine_tune(model, loss_at_step, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]
    assert not torch.equal(model.attn["heavy"].down.weight, before)
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name])
    uniform = uniform_compress(_model_with_spectra(), 0.5)
    assert [layer.rank for layer in uniform.attn.values()] == [128, 128, 128]
    with pytest.raises(ConfigError, match="min_ratio"):
        fine_tune(welore_compress(_model_with_spectra(), WeLoreConfig(threshold=0.0))[0], loss_at_step, 1)
