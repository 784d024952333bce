"""SLTrain: sparse plus low-rank pretraining (Han et al., NeurIPS 2024, arXiv 2406.02214).

Each linear weight is `W = B (s A) + S`, with a fixed random sparse support::

    x (.., in) --F.linear(x, W, b)--> y (.., out)
    W (out x in) = B (out x r) @ (s * A) (r x in)  +  scatter(values (nnz), index (nnz))
    nnz = int(delta * out * in); index = sorted uniform draw, a buffer never changed or trained

The custom autograd function saves only `(x, B, A, s, values, index)`: W is rebuilt in backward,
so the activation memory of the layer equals a dense linear's (x only), and neither W nor `x Aᵀ`
is kept. (The spec saves `sA`, an r x in activation; saving A and the 0-d s instead removes it.) Stored parameters: `r (in + out) + nnz (+ out bias)`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import check_field
from rankwise.linalg import amp_backward, amp_forward, seeded_generator, to_dtype
from rankwise.pretrain.replace import DECODER_TARGETS, replace_linears


def sparse_plus_low_rank(B: torch.Tensor, sA: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The dense weight `B @ sA + scatter(values at flat row-major index)`."""
    weight = B @ sA
    weight.view(-1).index_add_(0, index, values)
    return weight


class _SparsePlusLowRankLinear(torch.autograd.Function):
    # Under autocast the token-sized products run in its dtype; the weight is formed, and the weight-sized gradients
    # are reduced, in the parameters' dtype (see linalg.amp_dtype).
    @staticmethod
    def forward(ctx, x, B, A, scale, values, index, bias):
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        with amp_forward(ctx, x) as (x, amp):
            weight = sparse_plus_low_rank(B, A * scale, values, index)
            # only x is an activation; B, A, values, index are the layer's own tensors and scale is 0-d
            ctx.save_for_backward(x, B, A, scale, values, index)
            ctx.has_bias = bias is not None
            return F.linear(x, to_dtype(weight, amp), to_dtype(bias, amp))

    @staticmethod
    def backward(ctx, grad_out):
        x, B, A, scale, values, index = ctx.saved_tensors
        with amp_backward(grad_out, x) as grad_out:
            weight = sparse_plus_low_rank(B, A * scale, values, index)
            grad_x = (grad_out @ to_dtype(weight, ctx.amp)).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
            # transient dense out x in: the backward's peak
            grad_w = (grad_2d.T @ x.reshape(-1, x.shape[-1])).to(B.dtype)
            grad_B = grad_w @ (A * scale).T if ctx.needs_input_grad[1] else None
            grad_sA = B.T @ grad_w if ctx.needs_input_grad[2] or ctx.needs_input_grad[3] else None
            grad_A = grad_sA * scale if ctx.needs_input_grad[2] else None
            grad_scale = (grad_sA * A).sum().reshape(scale.shape) if ctx.needs_input_grad[3] else None
            grad_values = grad_w.view(-1)[index] if ctx.needs_input_grad[4] else None
            grad_bias = grad_2d.sum(0).to(ctx.dtypes[1]) if ctx.has_bias and ctx.needs_input_grad[6] else None
        return grad_x, grad_B, grad_A, grad_scale, grad_values, None, grad_bias


class SLTrainLinear(nn.Module):
    """A linear layer with weight `B (s A) + S`, S sparse on a fixed random support (SLTrain).

    Init as the reference code: `A` kaiming-uniform (a=sqrt 5), `B = 0` (so W = S at step 0),
    sparse values and bias U(-1/sqrt(in), 1/sqrt(in)) and U(-1/sqrt(out), 1/sqrt(out)).
    `s = lora_alpha / rank`, or `tanh(theta)` with trainable theta (init 1) if `trainable_scaling`.
    """

    def __init__(self, in_features: int, out_features: int, rank: int = 128, delta: float = 0.03,
                 lora_alpha: float = 32.0, bias: bool = True, trainable_scaling: bool = False, seed: int = 0):
        super().__init__()
        check_field(isinstance(rank, int) and 1 <= rank <= min(in_features, out_features), "SLTrainConfig", "rank",
                    rank, f"an int in [1, {min(in_features, out_features)}]")
        check_field(0.0 <= delta < 1.0, "SLTrainConfig", "delta", delta, "a float in [0, 1)")
        check_field(lora_alpha > 0, "SLTrainConfig", "lora_alpha", lora_alpha, "a float > 0")
        self.in_features, self.out_features, self.rank, self.delta = in_features, out_features, rank, delta
        generator = seeded_generator(seed)
        nnz = int(delta * out_features * in_features)
        self.register_buffer("sparse_index",
                             torch.randperm(out_features * in_features, generator=generator)[:nnz].sort().values)
        bound_in, bound_out = 1.0 / math.sqrt(in_features), 1.0 / math.sqrt(out_features)
        self.lora_A = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound_in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        self.sparse_values = nn.Parameter((torch.rand(nnz, generator=generator) * 2 - 1) * bound_in)
        self.bias = nn.Parameter((torch.rand(out_features, generator=generator) * 2 - 1) * bound_out) if bias else None
        self.scaling_theta = nn.Parameter(torch.ones(1)) if trainable_scaling else None
        self.fixed_scaling = lora_alpha / rank
        self.register_buffer("fixed_scale", torch.tensor(self.fixed_scaling), persistent=False)

    def scale(self) -> torch.Tensor:
        """s as a 0-d tensor: tanh(theta) (trainable) or lora_alpha / rank."""
        if self.scaling_theta is not None:
            return torch.tanh(self.scaling_theta[0])
        return self.fixed_scale

    def scaled_A(self) -> torch.Tensor:
        return self.lora_A * self.scale()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SparsePlusLowRankLinear.apply(x, self.lora_B, self.lora_A, self.scale(), self.sparse_values,
                                              self.sparse_index, self.bias)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The effective weight `B s A + S` (out x in), for merging, analysis and tests."""
        return sparse_plus_low_rank(self.lora_B, self.scaled_A(), self.sparse_values, self.sparse_index)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"delta={self.delta}, nnz={self.sparse_index.numel()}, bias={self.bias is not None}")


def sltrain_model(model: nn.Module, rank: int = 128, delta: float = 0.03, lora_alpha: float = 32.0,
                  trainable_scaling: bool = False, targets=DECODER_TARGETS, seed: int = 0) -> list[str]:
    """Replace the attention/MLP linears of `model` by freshly initialised SLTrain layers (for pretraining).

    Each layer draws its support from `seed + layer number`. Returns the replaced module names.
    """
    counter = iter(range(10**9))

    def build(name: str, linear: nn.Linear) -> SLTrainLinear:
        return SLTrainLinear(linear.in_features, linear.out_features, min(rank, linear.in_features, linear.out_features),
                             delta, lora_alpha, linear.bias is not None, trainable_scaling, seed + next(counter))

    return replace_linears(model, build, targets)

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "sltrain", "paper": "2406.02214", "runs": "rankwise pretrain --method sltrain; rankwise.pretrain.sltrain_model",
     "summary": "sparse plus low-rank pretraining layers"},
)
