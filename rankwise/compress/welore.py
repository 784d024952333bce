"""WeLore: data-free, non-uniform low-rank compression of weights that became low-rank
(Jaiswal et al., arXiv 2407.11239, "From GaLore to WeLore").

Training with low-rank gradients (GaLore) leaves many weight matrices with heavy-tailed spectra.
WeLore finds them with one global threshold on the min-max normalised singular values::

    s = svdvals(W);  s_hat = (s - min s) / (max s - min s)       (per matrix; flat: nothing pruned)
    k_prune(W) = #{i : s_hat_i < tau};  kept rank k = min(m, n) - k_prune
    tau: bisected so that sum k_prune / sum min(m, n) = target_reduction (one tau for the whole model)
    LRC   (k_prune / min(m, n) > min_ratio): W -> up (out x k) @ down (k x in) = U_k sqrt(S_k) . sqrt(S_k) V_kᵀ, trainable
    N-LRC (otherwise): W kept dense, frozen

Embeddings, lm_head, norms and biases are frozen too: fine-tuning touches only the LRC factors
(trainable parameters = sum over LRC of k (m + n)). `uniform_compress` is the baseline that cuts
every matrix by the same ratio. `min_ratio` is 0.4999 for fine-tuning in the paper's code (below
~50 % reduction a square factorisation saves nothing) and 0.0 for compression only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from rankwise.core.errors import ConfigError, check_field
from rankwise.linalg import split_low_rank
from rankwise.pretrain.replace import DECODER_TARGETS, matching_linears


@dataclass
class WeLoreConfig:
    target_reduction: float = 0.5        # global effective rank reduction sum k_prune / sum min(m, n)
    threshold: float | None = None       # tau; None: bisected on target_reduction
    min_ratio: float = 0.4999            # a matrix is an LRC if its own reduction exceeds this
    target_modules: tuple[str, ...] = DECODER_TARGETS

    def __post_init__(self):
        check_field(0.0 <= self.target_reduction < 1.0, "WeLoreConfig", "target_reduction", self.target_reduction,
                    "a float in [0, 1)")
        check_field(self.threshold is None or 0.0 <= self.threshold <= 1.0, "WeLoreConfig", "threshold",
                    self.threshold, "a float in [0, 1] or None")
        check_field(0.0 <= self.min_ratio < 1.0, "WeLoreConfig", "min_ratio", self.min_ratio, "a float in [0, 1)")


class LowRankLinear(nn.Module):
    """`y = up(down(x))`: a linear layer stored as two factors (`up.weight @ down.weight` ~= W)."""

    def __init__(self, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.down = nn.Linear(down.shape[1], down.shape[0], bias=False)
        self.up = nn.Linear(up.shape[1], up.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.down.weight.copy_(down)
            self.up.weight.copy_(up)
            if bias is not None:
                self.up.bias.copy_(bias)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def normalized_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    """`(s - min) / (max - min)`; a flat spectrum maps to ones (no low-rank structure: nothing is pruned).

    "Flat" means a spread below 1e-4 of the largest value: fp32 SVD noise must not decide the ranking.
    """
    low, high = singular_values.min(), singular_values.max()
    if high - low <= 1e-4 * high:
        return torch.ones_like(singular_values)
    return (singular_values - low) / (high - low)


def prune_counts(spectra: dict[str, torch.Tensor], threshold: float) -> dict[str, int]:
    return {name: int((normalized_spectrum(s) < threshold).sum()) for name, s in spectra.items()}


def global_reduction(spectra: dict[str, torch.Tensor], threshold: float) -> float:
    counts = prune_counts(spectra, threshold)
    return sum(counts.values()) / sum(s.numel() for s in spectra.values())


def find_threshold(spectra: dict[str, torch.Tensor], target_reduction: float, iterations: int = 60) -> float:
    """Smallest tau whose global reduction reaches `target_reduction` (the reduction grows with tau)."""
    low, high = 0.0, 1.0 + 1e-6
    for _ in range(iterations):
        middle = (low + high) / 2
        if global_reduction(spectra, middle) >= target_reduction:
            high = middle
        else:
            low = middle
    return high


def weight_spectra(model: nn.Module, targets: Iterable[str] = DECODER_TARGETS) -> dict[str, torch.Tensor]:
    """Singular values (fp32) of every targeted linear weight; the dominant cost, computed once."""
    return {name: torch.linalg.svdvals(module.weight.detach().float()) for name, module in matching_linears(model, targets)}


def _replace(model: nn.Module, name: str, rank: int) -> LowRankLinear:
    linear = model.get_submodule(name)
    up, down = split_low_rank(linear.weight.detach(), rank)
    bias = linear.bias.detach() if linear.bias is not None else None
    layer = LowRankLinear(up.to(linear.weight.dtype), down.to(linear.weight.dtype), bias)
    if layer.up.bias is not None:
        layer.up.bias.requires_grad_(False)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return layer


def welore_compress(model: nn.Module, config: WeLoreConfig,
                    spectra: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict]:
    """Compress `model` in place (see the module docstring); returns `(model, report)`.

    The report holds tau, the achieved global reduction, per-layer `{shape, kept_rank, k_prune, lrc}`,
    parameter counts before/after and the trainable-parameter count.
    """
    spectra = spectra if spectra is not None else weight_spectra(model, config.target_modules)
    threshold = config.threshold if config.threshold is not None else find_threshold(spectra, config.target_reduction)
    counts = prune_counts(spectra, threshold)
    params_before = sum(p.numel() for p in model.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, k_prune in counts.items():
        shape = tuple(model.get_submodule(name).weight.shape)
        full = min(shape)
        kept = max(1, full - k_prune)
        lrc = k_prune / full > config.min_ratio
        if lrc:
            layer = _replace(model, name, kept)
            layer.up.weight.requires_grad_(True)
            layer.down.weight.requires_grad_(True)
        layers[name] = {"shape": list(shape), "kept_rank": kept, "k_prune": k_prune, "lrc": lrc}
    report = {
        "threshold": threshold,
        "global_reduction": sum(counts.values()) / sum(s.numel() for s in spectra.values()),
        "layers": layers,
        "lrc_layers": sum(v["lrc"] for v in layers.values()),
        "params_before": params_before,
        "params_after": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    return model, report


def uniform_compress(model: nn.Module, reduction: float, targets: Iterable[str] = DECODER_TARGETS) -> nn.Module:
    """Baseline: every targeted matrix keeps the same fraction `1 - reduction` of its rank."""
    for name, module in matching_linears(model, targets):
        full = min(module.weight.shape)
        _replace(model, name, max(1, round((1.0 - reduction) * full)))
    return model


def fine_tune(model: nn.Module, loss_at_step: Callable[[nn.Module, int], torch.Tensor], steps: int,
              lr: float = 1e-4) -> list[float]:
    """AdamW on the trainable parameters only (after `welore_compress`, the LRC factors); returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("fine_tune: the model has no trainable parameters (no layer became an LRC); lower "
                          "WeLoreConfig.min_ratio or raise target_reduction")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        loss = loss_at_step(model, step)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "welore", "paper": "2407.11239", "runs": "rankwise welore; rankwise.compress.welore.welore_compress",
     "summary": "data-free non-uniform compression of layers that became low-rank"},
)
