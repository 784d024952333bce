"""Plain truncated SVD at a target parameter ratio: the data-free baseline every compressor must beat.

Each targeted `W (out x in)` becomes `B A` with `B = U_r sqrt(S_r)`, `A = sqrt(S_r) Vh_r` and
`r = floor(ratio * in * out / (in + out))`, so every layer keeps `ratio` of its parameters. By
Eckart-Young this is the best rank-r fit of the *weights*; it knows nothing about the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rankwise.compress._common import CompressConfig, CompressionReport, low_rank_from_weight, replace_linear_layers
from rankwise.linalg import split_low_rank


@dataclass
class SVDConfig(CompressConfig):
    """Uniform per-layer truncated SVD (no hyper-parameters beyond the shared ones)."""


def compress(model: nn.Module, config: SVDConfig, calibration=None) -> tuple[nn.Module, CompressionReport]:
    """Replace every targeted linear by its balanced rank-r SVD factors (in place). `calibration` is unused."""

    def factorise(_name: str, linear: nn.Linear, rank: int):
        up, down = split_low_rank(linear.weight.detach(), rank)
        return low_rank_from_weight(linear, up, down)

    return replace_linear_layers(model, config, "svd", factorise)

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "svd", "paper": "", "runs": "rankwise compress --method svd; rankwise.compress.compress(model, 'svd')",
     "summary": "plain truncated SVD at a parameter ratio (data-free baseline)"},
)
