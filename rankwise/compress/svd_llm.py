"""SVD-LLM: truncation-aware data whitening (Wang, Zheng, Wan, Zhang; ICLR 2025, arXiv 2403.07378).

Plain SVD truncates the singular values of `W`, which is optimal for the weights but not for the
layer's *outputs*: a small singular value of `W` can carry a large share of `X Wᵀ`. SVD-LLM whitens
the weight by the calibration inputs first, so that truncating singular values of the whitened
weight costs exactly their squares in output error:

    XᵀX = S Sᵀ                      (Cholesky, float64, from the layer's calibration inputs X [n x in])
    W S = U Σ Vᵀ                    (SVD of the whitened weight)
    W'  = (U_k sqrt(Σ_k)) (sqrt(Σ_k) V_kᵀ S⁻¹)  =  up @ down      (k = svd's rank for `ratio`)

    ||X Wᵀ - X W'ᵀ||_F² = ||(W - W') S||_F² = Σ_{i>k} σ_i²(W S)   (the paper's Theorem 3.2)

`XᵀX` is singular when some input channel never fires or there are fewer calibration rows than
features, and can be slightly indefinite in floating point. Then the Cholesky is retried with a
diagonal shift `max(0, -λ_min) + damping * mean(diag XᵀX)` (`linalg.damped_cholesky`); the layer's
report entry records the shift, and the identity above then holds for `XᵀX + shift I`.

Order: blocks are calibrated in order, each on the outputs of the already-compressed earlier blocks
(one extra forward of each block); the layers of one block are fitted from one pass of that block.
Not implemented: the paper's optional "parameter update" stage (sequential LoRA-style fine-tuning of
the factors after truncation); this is SVD-LLM's truncation-aware whitening alone (the paper's
"SVD-LLM (W)" variant).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rankwise.compress._common import CompressConfig, CompressionReport, scaled_svd_compress
from rankwise.core.errors import check_field
from rankwise.linalg import SecondMoments, damped_cholesky


@dataclass
class SVDLLMConfig(CompressConfig):
    """Truncation-aware whitened SVD, the same rank per layer as `svd`.

    ratio: parameters kept in each compressed layer, in (0, 1] (rank exactly as `svd`).
    target_modules: regexes of the layers to compress (None = every linear in the blocks).
    exclude_modules: regexes of layers to leave alone.
    damping: relative diagonal shift used only when `XᵀX` is not positive definite (see the module doc).
    """

    damping: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(isinstance(self.damping, (int, float)) and 0 < self.damping < 1, "SVDLLMConfig", "damping",
                    self.damping, "a small positive fraction of mean(diag XᵀX), e.g. 1e-6")


def whitening(stats: SecondMoments, damping: float = 1e-6):
    """`S` with `S Sᵀ = E[x xᵀ]` (the mean, not the sum: the scale of S does not change W'), and report fields."""
    factor, shift = damped_cholesky(stats.correlation(), damping)
    return factor, ({"damping_shift": shift} if shift > 0 else {})


def compress(model: nn.Module, config: SVDLLMConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Replace every targeted linear by its whitened rank-r factors (in place; needs calibration batches)."""
    model, report = scaled_svd_compress(model, config, calibration, "svd-llm",
                                        lambda stats: whitening(stats, config.damping))
    damped = [n for n, info in report.layers.items() if info.get("damping_shift")]
    if damped:
        report.notes.append(f"{len(damped)} layer(s) had a singular calibration Gram matrix and were whitened with a "
                            "diagonal shift (layers[...]['damping_shift']); more calibration rows avoid it")
    return model, report

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "svd-llm", "paper": "2403.07378",
     "runs": "rankwise compress --method svd-llm; rankwise.compress.compress(model, 'svd-llm', calibration)",
     "summary": "truncation-aware data whitening before SVD (output error = dropped singular values)"},
)
