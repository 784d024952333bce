"""LOST: Low-rank and Sparse pre-Training (Li et al., 2025, arXiv 2508.02668).

At initialisation a standard dense weight W0 (out x in) is split by SVD into a low-rank part and
its complement, and the complement keeps only its `k = ceil(rho * in)` strongest input channels::

    W0 = U S Vh;  B = U_r sqrt(S_r) (out x r),  A = sqrt(S_r) Vh_r (r x in)
    W_comp = W0 - B A                      (orthogonal to the top-r singular subspace)
    I = top-k columns of W_comp by L2 norm  ("SVD_l2^rem"), fixed after init
    W_s = W_comp[:, I] (out x k)
    y = gamma * act(x Aᵀ) Bᵀ + (1 - gamma) * x[..., I] W_sᵀ + b

Both parts are trained; the support I never changes (structured column sparsity: a gather and a
dense GEMM, no dense W is ever formed). Parameters: `r (in + out) + out k (+ out bias)`.

Confidence (see the spec, section 2): the official code was not available. The SVD split, the
column rule and the gather forward come from the ICLR-2026 reviews; the sqrt(S) split of the
factors, the values of W_s taken from W_comp, the SiLU placement (CoLA-style) and the defaults
gamma=0.5, rho=0.05 are *inferred*. `activation="none"` gives the purely linear variant; `gamma=1`
is the "SVD init only" ablation (no sparse part).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import check_field
from rankwise.linalg import seeded_generator, truncated_svd
from rankwise.pretrain.replace import DECODER_TARGETS, replace_linears

ACTIVATIONS = {"silu": F.silu, "none": lambda t: t}


def lost_split(weight: torch.Tensor, rank: int, keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(B, A, columns, W_s)`: the rank-r sqrt(S) factors of W0 and the top-`keep` columns of the complement."""
    U, S, Vh = truncated_svd(weight, rank)
    root = S.sqrt()
    B, A = U * root, root[:, None] * Vh
    complement = weight.to(B.dtype) - B @ A
    columns = torch.topk(complement.norm(dim=0), keep).indices.sort().values
    return B, A, columns, complement[:, columns]


class LOSTLinear(nn.Module):
    """`y = gamma act(x Aᵀ) Bᵀ + (1 - gamma) x[:, I] W_sᵀ + b`, initialised from an SVD of a dense init."""

    def __init__(self, in_features: int, out_features: int, rank: int = 128, sparsity: float = 0.05,
                 gamma: float = 0.5, activation: str = "silu", bias: bool = True,
                 init_weight: torch.Tensor | None = None, seed: int = 0):
        super().__init__()
        check_field(isinstance(rank, int) and 1 <= rank <= min(in_features, out_features), "LOSTConfig", "rank", rank,
                    f"an int in [1, {min(in_features, out_features)}]")
        check_field(0.0 < sparsity <= 1.0, "LOSTConfig", "sparsity", sparsity, "a float in (0, 1] (rho)")
        check_field(0.0 < gamma <= 1.0, "LOSTConfig", "gamma", gamma, "a float in (0, 1]")
        check_field(activation in ACTIVATIONS, "LOSTConfig", "activation", activation, f"one of {list(ACTIVATIONS)}")
        self.in_features, self.out_features, self.rank, self.gamma = in_features, out_features, rank, gamma
        self.activation = activation
        if init_weight is None:
            # nn.Linear's default init, drawn from a seeded generator
            bound = 1.0 / math.sqrt(in_features)
            init_weight = (torch.rand(out_features, in_features, generator=seeded_generator(seed)) * 2 - 1) * bound
        # gamma = 1 is the "SVD-init low-rank only" ablation arm: no sparse part at all
        keep = math.ceil(sparsity * in_features) if gamma < 1.0 else 0
        B, A, columns, sparse = lost_split(init_weight, rank, keep)
        self.lora_B, self.lora_A = nn.Parameter(B.contiguous()), nn.Parameter(A.contiguous())
        self.register_buffer("columns", columns)
        self.sparse_weight = nn.Parameter(sparse.contiguous())
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(ACTIVATIONS[self.activation](F.linear(x, self.lora_A)), self.lora_B)
        if self.columns.numel():
            y = self.gamma * y + (1.0 - self.gamma) * F.linear(x.index_select(-1, self.columns), self.sparse_weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"columns={self.columns.numel()}, gamma={self.gamma}, activation={self.activation}")


def lost_model(model: nn.Module, rank: int = 128, sparsity: float = 0.05, gamma: float = 0.5,
               activation: str = "silu", targets=DECODER_TARGETS) -> list[str]:
    """Replace the attention/MLP linears of `model` by LOST layers split from their current weights."""
    def build(name: str, linear: nn.Linear) -> LOSTLinear:
        layer = LOSTLinear(linear.in_features, linear.out_features,
                           min(rank, linear.in_features, linear.out_features), sparsity, gamma, activation,
                           linear.bias is not None, init_weight=linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    return replace_linears(model, build, targets)

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "lost", "paper": "2508.02668", "runs": "rankwise pretrain --method lost; rankwise.pretrain.lost_model",
     "summary": "low-rank and sparse pretraining (SVD-initialised, channel-wise sparse)"},
)
