"""Atomic Feature Mimicking (AFM): low-rank compression by the output-feature covariance
(Yu, Fu, Ding, Zhou, Wu; "Unified Low-rank Compression Framework for Click-through Rate Prediction",
KDD 2024, arXiv 2405.18146).

Weights can be full-rank while the features they produce are not. AFM runs the model over the
calibration data, accumulates (float64) the mean `mu` and covariance of each layer's *outputs*, and
keeps the top-k principal directions `U_k`:

    y = W x + b   ->   down: (U_kᵀ W, U_kᵀ b)   up: (U_k, (I - U_k U_kᵀ) mu)
    so  y_hat = mu + U_k U_kᵀ (y - mu)        (the PCA reconstruction of the output)

Its output error is the sum of the discarded covariance eigenvalues, the least any rank-k linear
map of y can achieve. Embedding tables (per field, frequency-weighted by the lookups) become a
k-wide table `(E - mu) U_k` and a decompressing linear `(U_k, mu)`. The "+Act" variant
(`activation="relu"`) puts an activation between the factors; it is no longer exact and is meant
to be fine-tuned afterwards, as in the paper.

Transformer blocks are calibrated in order, each on the outputs of the already-compressed blocks;
a model without repeated blocks (a CTR model) is calibrated in one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress._common import (ACTIVATIONS, CompressConfig, CompressionReport, LowRankLinear, ReportBuilder,
                                       blockwise, check_calibration, collect_moments, find_blocks, get_module,
                                       moment_hooks, run_block, saves_parameters, select_linears, set_module,
                                       token_masks)
from rankwise.compress.serialize import register_module_kind
from rankwise.core.errors import TargetError, check_field
from rankwise.linalg import SecondMoments, top_eigenvectors


@dataclass
class AFMConfig(CompressConfig):
    """ratio: parameters kept per linear (rank from it). embedding_rank: also compress the targeted
    `nn.Embedding` tables to this width (None = leave embeddings). activation: "+Act" variant."""

    embedding_rank: int | None = None
    activation: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.embedding_rank is None or (isinstance(self.embedding_rank, int) and self.embedding_rank >= 1),
                    "AFMConfig", "embedding_rank", self.embedding_rank, "None or a positive int")
        check_field(self.activation is None or self.activation in ACTIVATIONS, "AFMConfig", "activation",
                    self.activation, f"None or one of {sorted(ACTIVATIONS)}")


class LowRankEmbedding(nn.Module):
    """`e = up(table[i])`: a k-wide embedding table and the linear `(U_k, mu)` that restores width d."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = int(num_embeddings), int(embedding_dim), int(rank)
        self.table = nn.Embedding(self.num_embeddings, self.rank)
        self.up = nn.Linear(self.rank, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(ids))

    def spec(self) -> dict:
        return {"num": self.num_embeddings, "dim": self.embedding_dim, "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankEmbedding":
        return cls(spec["num"], spec["dim"], spec["rank"])


register_module_kind("low_rank_embedding", LowRankEmbedding, LowRankEmbedding.spec, LowRankEmbedding.from_spec)


def embedding_shrinks(table: nn.Embedding, rank: int) -> bool:
    """A k-wide table plus its decompressor (k*d + d) must be smaller than the n x d table."""
    n, d = table.num_embeddings, table.embedding_dim
    return rank < d and n * rank + rank * d + d < n * d


def afm_factors(stats: SecondMoments, weight: torch.Tensor, bias: torch.Tensor | None, rank: int):
    """`(up, down, up_bias, down_bias)` of the AFM layer from output statistics (math in the module doc)."""
    mu = stats.mean()
    _, U = top_eigenvectors(stats.covariance(), rank)
    W = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    down, down_bias = U.T @ W, U.T @ b
    up_bias = mu - U @ (U.T @ mu)
    return U, down, up_bias, down_bias


def afm_rank(in_features: int, out_features: int, ratio: float) -> int:
    """Rank whose factors *and* the two biases AFM adds (k + out) fit in `ratio * in * out` parameters."""
    return max(1, math.floor((ratio * in_features * out_features - out_features) / (in_features + out_features + 1)))


def afm_linear(linear: nn.Linear, stats: SecondMoments, rank: int, activation: str | None = None) -> LowRankLinear:
    up, down, up_bias, down_bias = afm_factors(stats, linear.weight, linear.bias, rank)
    dtype = linear.weight.dtype
    return LowRankLinear.from_factors(up.to(dtype), down.to(dtype), up_bias.to(dtype), down_bias.to(dtype),
                                      activation).to(dtype)


def afm_embedding(embedding: nn.Embedding, stats: SecondMoments, rank: int) -> LowRankEmbedding:
    """Frequency-weighted PCA of the looked-up rows: table `(E - mu) U_k`, decompressor `(U_k, mu)`."""
    mu = stats.mean()
    _, U = top_eigenvectors(stats.covariance(), rank)
    dtype = embedding.weight.dtype
    new = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank).to(dtype)
    with torch.no_grad():
        new.table.weight.copy_(((embedding.weight.double() - mu) @ U).to(dtype))
        new.up.weight.copy_(U.to(dtype))
        new.up.bias.copy_(mu.to(dtype))
    return new.to(dtype)


def _replace(model: nn.Module, names: list[str], stats: dict[str, SecondMoments], config: AFMConfig,
             report: CompressionReport) -> None:
    for name in names:
        module = get_module(model, name)
        if name not in stats:
            report.notes.append(f"{name} saw no calibration data and was left unchanged")
            continue
        if isinstance(module, nn.Embedding):
            set_module(model, name, afm_embedding(module, stats[name], config.embedding_rank))
            report.layers[name] = {"rank": config.embedding_rank, "shape": list(module.weight.shape)}
            continue
        rank = afm_rank(module.in_features, module.out_features, config.ratio)
        if not saves_parameters(module.in_features, module.out_features, rank):
            report.layers[name] = {"kept_dense": True, "shape": [module.out_features, module.in_features]}
            continue
        set_module(model, name, afm_linear(module, stats[name], rank, config.activation))
        report.layers[name] = {"rank": rank, "shape": [module.out_features, module.in_features]}


def compress(model: nn.Module, config: AFMConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Replace the targeted linears (and embeddings if `embedding_rank`) in place by AFM factors."""
    batches = check_calibration(model, calibration)
    types = (nn.Linear,) if config.embedding_rank is None else (nn.Linear, nn.Embedding)
    names = [n for n in select_linears(model, config, types)
             if not isinstance(get_module(model, n), nn.Embedding)
             or embedding_shrinks(get_module(model, n), config.embedding_rank)]
    if not names:
        raise TargetError(f"AFM: no targeted layer would shrink (embedding_rank={config.embedding_rank} is too large "
                          "for the matched tables): lower embedding_rank or target more layers")
    builder = ReportBuilder("afm", model, config, names)
    found = find_blocks(model)
    # block-by-block only when every target sits strictly inside a block (a ModuleList of tables is not "blocks")
    depth = found[0].count(".") + 2 if found is not None and found[0] else 1
    in_blocks = found is not None and all(n.startswith(found[0] + ".") and n.count(".") >= depth for n in names)
    if not in_blocks:
        stats = collect_moments(model, {n: get_module(model, n) for n in names}, batches, side="output")
        _replace(model, names, stats, config, builder.report)
        return model, builder.finish()
    masks = token_masks(batches)
    for index, block, inputs in blockwise(model, batches, "afm: blocks"):
        block_names = [n for n in names if n.startswith(f"{found[0]}.{index}.")]
        stats, remove = moment_hooks({n: get_module(model, n) for n in block_names}, side="output", masks=masks)
        try:
            run_block(block, inputs)
        finally:
            remove()
        _replace(model, block_names, stats, config, builder.report)
    return model, builder.finish()

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "afm", "paper": "2405.18146", "runs": "rankwise compress --method afm; rankwise.compress.compress(model, 'afm', calibration)",
     "summary": "atomic feature mimicking: low-rank by output-feature covariance"},
)
