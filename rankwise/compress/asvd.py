"""ASVD: activation-aware singular value decomposition (Yuan et al., arXiv 2312.05821).

A few input channels of LLM linears carry much larger activations than the rest ("outliers"); plain
SVD of `W` treats every input channel alike and loses the columns those channels multiply. ASVD
scales the columns of `W` by the channels' typical magnitude on calibration data before truncating:

    S   = diag(E|x_j|) ** alpha      (mean absolute input of channel j, float64; alpha = 0.5 in the paper)
    W S = U Σ Vᵀ
    W'  = (U_k sqrt(Σ_k)) (sqrt(Σ_k) V_kᵀ S⁻¹)  =  up @ down       (k = svd's rank for `ratio`)

`alpha = 0` is plain SVD (`S = I`). A channel that never fires (`E|x_j| = 0`) is floored at 1e-8 of
the largest channel so `S⁻¹` stays finite (its column is then nearly free to drop, as it should be).

Ranks are uniform (every layer keeps `ratio` of its parameters, as `svd`): the paper's
sensitivity-based rank allocation (perplexity probes per layer and ratio) is not implemented, nor its
absorption of singular values into the quantised factors. Blocks are calibrated in order, each on
the outputs of the already-compressed earlier blocks (see `_common.calibrate_in_order`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress._common import CompressConfig, CompressionReport, scaled_svd_compress
from rankwise.core.errors import check_field
from rankwise.linalg import SecondMoments

DEAD_CHANNEL_FLOOR = 1e-8


@dataclass
class ASVDConfig(CompressConfig):
    """Activation-scaled SVD, the same rank per layer as `svd`.

    ratio: parameters kept in each compressed layer, in (0, 1] (rank exactly as `svd`).
    target_modules: regexes of the layers to compress (None = every linear in the blocks).
    exclude_modules: regexes of layers to leave alone.
    alpha: exponent of the channel scaling `E|x_j| ** alpha`; 0 is plain SVD, the paper uses 0.5.
    """

    alpha: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 4, "ASVDConfig", "alpha", self.alpha,
                    "an exponent in [0, 4] (0 = plain SVD, 0.5 = the paper's default)")


def channel_scale(stats: SecondMoments, alpha: float = 0.5) -> torch.Tensor:
    """`E|x_j| ** alpha` per input channel (1-D), dead channels floored so the inverse is finite."""
    magnitude = stats.mean_abs()
    floor = DEAD_CHANNEL_FLOOR * float(magnitude.max().clamp_min(torch.finfo(magnitude.dtype).tiny))
    return magnitude.clamp_min(floor).pow(alpha)


def compress(model: nn.Module, config: ASVDConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Replace every targeted linear by its activation-scaled rank-r factors (in place; needs calibration)."""
    return scaled_svd_compress(model, config, calibration, "asvd", lambda stats: (channel_scale(stats, config.alpha), {}),
                               outer=False)  # only E|x| is needed

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "asvd", "paper": "2312.05821",
     "runs": "rankwise compress --method asvd; rankwise.compress.compress(model, 'asvd', calibration)",
     "summary": "activation-aware SVD: scale input channels by mean |x|^alpha before truncating"},
)
