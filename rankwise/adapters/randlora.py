"""RandLoRA: full-rank updates from shared frozen random low-rank bases with trainable diagonal scalings
(Albert, Zhang, Ramasinghe, Avraham, Hengel; ICLR 2025, arXiv 2502.00987).

    m = min(out, in), M = max(out, in), N = ceil(m / r) bases, s = randlora_alpha / r

    shared, frozen, regenerated from projection_prng_key:   A (r x 1 x m_max)    B (M_max x N_max x r)
    per layer, trainable:                                   lambda (r x N)       gamma (N x m)

    A_hat = (lambda[:, :, None] * A[:, :, :m] * gamma[None]).flatten(0, 1)     (rN x m, row k*N + j)
    B_hat = B[:M, :N, :].flatten(1)                                              (M x Nr, column j*r + k)
    delta_weight = s * B_hat @ A_hat            (out x in if in is the small side, else its transpose)

    x ──┬─────────────── W (frozen) ──────────────────────────┐
        └── A_hat^T (m -> rN) ── B_hat^T (rN -> M) ── * s ─────┴─(+)── y      factored path (few tokens)
    x ───── (W + s B_hat A_hat) in one matmul ──────────────────────── y      fused path (many tokens)

Trainable count per layer is r*N + N*m; rank(delta) reaches m when N*r >= m. The two flattenings pair
B-column j*r+k with A-row j*r+k, which is not base (j, k)'s own lambda/gamma: harmless (B is iid) and
kept on purpose, because PEFT does the same and files must give the same outputs.

Speed: PEFT runs two token-sized matmuls forward and three backward per layer. When the tokens outnumber
M*m/(m+M), rankwise instead forms dW = s B_hat A_hat once per step (M*m*rN flops, token-independent) and
runs one matmul x (W + dW)^T in place of the base call (`fused_forward`); a custom autograd Function saves
x (or, when the input is the larger side, the narrower x B_hat), lambda and gamma, never dW or A_hat, so
the step costs the frozen floor plus one token-sized product for the trainable side's gradient and small
M x m x rN products. That token-sized product (the size of full fine-tuning's weight gradient on square
layers) cannot be avoided with exact gradients, because rN >= m: the update is full rank by design.
RandLoRA therefore saves parameters, optimizer state and file size, not compute.

Bases are drawn as PEFT draws them (Kaiming-uniform in bf16 from one CPU generator: A, then N_max slices
of B; each divided by its std), so `save_projection=False` files reproduce PEFT's bases bit for bit.
Unlike PEFT, `save_projection` defaults to False: the bases are regenerated, never saved (set True to
write them per layer, as PEFT's default files have them; such files load either way).
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import PEFT_COMMON_NEUTRAL, AdapterConfig
from rankwise.core.registry import register
from rankwise.linalg import (amp_backward, amp_forward, autocast_off, fusable_dtypes, kaiming_sequence, ternary_sequence,
                             to_dtype)

BASIS_KEYS = ("randlora_A", "randlora_B")


class ScaleBasis(torch.autograd.Function):
    """S[k, j, v] = lambda[k, j] * A[k, 0, v] * gamma[j, v], saving only the three inputs (never S)."""

    @staticmethod
    def forward(ctx, basis_a, lam, gam):
        ctx.save_for_backward(basis_a, lam, gam)
        return lam[:, :, None] * basis_a * gam[None]

    @staticmethod
    def backward(ctx, grad):
        basis_a, lam, gam = ctx.saved_tensors
        with autocast_off(grad):  # elementwise products: in the gradient's dtype, returned in the parameters'
            grad_lam, grad_gam = scale_basis_grads(grad, basis_a, lam, gam)
        return None, grad_lam.to(lam.dtype), grad_gam.to(gam.dtype)


def scale_basis_grads(grad, basis_a, lam, gam):
    """Gradients of lambda and gamma from the gradient of S (r x N x m)."""
    weighted = grad * basis_a.to(grad.dtype)  # (r, N, m): the only temporary, the size of S
    return torch.einsum("kjv,jv->kj", weighted, gam.to(grad.dtype)), torch.einsum("kjv,kj->jv", weighted, lam.to(grad.dtype))


def _scaled_basis(basis_a, lam, gam):
    return (lam[:, :, None] * basis_a * gam[None]).flatten(0, 1)  # A_hat: rN x m


def _dense_delta(basis_a, basis_b, lam, gam, scaling, in_small):
    delta = basis_b @ _scaled_basis(basis_a, lam, gam) * scaling  # (M, m)
    return delta if in_small else delta.T


def _total_weight(weight, basis_a, basis_b, lam, gam, scaling, in_small):
    """W + s B_hat A_hat (or + its transpose) in one addmm: no separate dW, scale or add."""
    a_hat = _scaled_basis(basis_a, lam, gam)
    if in_small:
        return torch.addmm(weight, basis_b, a_hat, alpha=scaling)
    return torch.addmm(weight, a_hat.T, basis_b.T, alpha=scaling)


class FusedRandLoraLinear(torch.autograd.Function):
    """y = x (W + dW)^T + b with dW = s B_hat A_hat, as one matmul that replaces the base call.

    The trainable side's gradient needs one token-sized product; which one depends on the side x is on:

        in is the small side (x meets A_hat):  save x,                 grad A_hat = s B_hat^T (g^T x)
        in is the large side (x meets B_hat):  save h = x B_hat (rN),   grad A_hat = s h^T g

    On the large-input layers (an FFN's down projection) h is rN wide instead of in wide, so the saved
    activation shrinks by in / rN (4x on MiniLM's FFN output at PEFT's r=32) for about the same flops: h costs
    T x in x rN in forward, and the backward product T x rN x out replaces T x in x out + rN x in x out.
    W + dW (M x m) is saved only when it is no larger than A_hat (rN x m), the weight-sized tensor the factored
    path saves anyway, i.e. on square layers; elsewhere it is recomputed in backward (one M x rN x m product,
    ~3 % of a MiniLM step) so that the saved tensors never outgrow PEFT's, whatever the token count.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lam, gam, basis_a, basis_b, scaling, in_small):
        # Under autocast the products run in its dtype and W + dW is summed in lambda's (see linalg.amp_dtype).
        dtype = lam.dtype
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype)
        with amp_forward(ctx, x) as (x, amp):
            basis_a, basis_b = basis_a.to(dtype), basis_b.to(dtype)
            total = to_dtype(_total_weight(weight.to(dtype), basis_a, basis_b, lam, gam, scaling, in_small), amp)
            keep = total if basis_b.shape[0] <= basis_b.shape[1] else None
            flat_x = x.reshape(-1, x.shape[-1])
            # What the trainable side's gradient reads: x itself, or its (narrower) projection on the frozen B_hat.
            activation = flat_x if in_small else flat_x @ to_dtype(basis_b, amp)
            ctx.save_for_backward(activation, weight, lam, gam, basis_a, basis_b, keep)
            ctx.scaling, ctx.in_small, ctx.has_bias, ctx.x_shape = scaling, in_small, bias is not None, x.shape
            return F.linear(x, total, to_dtype(bias, amp))

    @staticmethod
    def backward(ctx, grad_out):
        activation, weight, lam, gam, basis_a, basis_b, total = ctx.saved_tensors
        scaling, in_small, amp = ctx.scaling, ctx.in_small, ctx.amp
        grad_x = grad_bias = grad_lam = grad_gam = None
        with amp_backward(grad_out, activation) as flat_grad:
            flat_grad = flat_grad.reshape(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[0]:
                if total is None:
                    total = to_dtype(_total_weight(weight.to(lam.dtype), basis_a, basis_b, lam, gam, scaling, in_small), amp)
                grad_x = (flat_grad @ total).view(ctx.x_shape).to(ctx.dtypes[0])
            if ctx.needs_input_grad[2] and ctx.has_bias:
                grad_bias = flat_grad.sum(0).to(ctx.dtypes[1])
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
                if in_small:  # the gradient of B_hat A_hat (M x m) first, then A_hat's (rN x m)
                    grad_a_hat = to_dtype(basis_b, amp).T @ (flat_grad.T @ activation)
                else:
                    grad_a_hat = activation.T @ flat_grad
                # weight-sized from here on: in lambda's dtype (fp32 masters keep fp32 gradients)
                grad_a_hat = grad_a_hat.to(lam.dtype).mul_(scaling).view(lam.shape[0], lam.shape[1], -1)
                grad_lam, grad_gam = scale_basis_grads(grad_a_hat, basis_a, lam, gam)
        return grad_x, None, grad_bias, grad_lam, grad_gam, None, None, None, None


class RandLoraBases(nn.Module):
    """The pair of frozen random bases one RandLoRA adapter shares across all its layers."""

    def __init__(self, config: "RandLoraConfig", largest: tuple[int, int]):
        super().__init__()
        big, small = max(largest), min(largest)
        r, n_bases = config.r, math.ceil(small / config.r)
        seed = config.projection_prng_key
        if config.sparse or config.very_sparse:
            sparsity = math.sqrt(small) if config.very_sparse else 3
            basis_a, basis_b = ternary_sequence(seed, [(r, 1, small), (big, n_bases, r)], sparsity)
        else:  # PEFT's draws: bf16, A first, then one (big, 1, r) slice per base
            draws = kaiming_sequence(seed, [(r, 1, small)] + [(big, 1, r)] * n_bases, dtype=torch.bfloat16)
            basis_a, basis_b = draws[0], torch.cat(draws[1:], dim=1)
        # Divide in the draw dtype, as PEFT does, then compute in float32. Saved only with save_projection
        # (PEFT's layout: once as `base_model.randlora_A/B`, and again in every layer, see RandLoraAdapter).
        persistent = config.save_projection
        self.register_buffer("randlora_A", (basis_a / basis_a.std()).float(), persistent=persistent)
        self.register_buffer("randlora_B", (basis_b / basis_b.std()).float(), persistent=persistent)

    @staticmethod
    def file_key(key: str) -> str:
        return "base_model." + key


class RandLoraAdapter(Adapter):
    def __init__(self, config: "RandLoraConfig", layer, module_name: str, shared: RandLoraBases = None):
        super().__init__(config, layer, module_name, shared)
        out_f, in_f, r = layer.out_features, layer.in_features, config.r
        self.small, self.big = min(out_f, in_f), max(out_f, in_f)
        self.in_small = in_f == self.small
        self.r, self.n_bases = r, math.ceil(self.small / r)
        self.scaling = config.randlora_alpha / r
        self.dropout = nn.Dropout(config.randlora_dropout) if config.randlora_dropout > 0 else nn.Identity()
        self.randlora_lambda = nn.Parameter(torch.zeros(r, self.n_bases))
        self.randlora_gamma = nn.Parameter(torch.full((self.n_bases, self.small), 1.0 / self.small))
        if config.init_weights is False:  # PEFT's non-identity init (tests, debugging)
            with torch.no_grad():
                self.randlora_lambda.normal_()
                self.randlora_gamma.fill_(1.0 / self.big)
        if config.save_projection:  # PEFT's file layout: every layer carries the full shared bases
            self.register_state_dict_post_hook(_add_bases)
            self.register_load_state_dict_pre_hook(_take_bases)

    @classmethod
    def build_shared(cls, config: "RandLoraConfig", layers) -> RandLoraBases:
        # One pair for all layers, sized for the largest targeted (out, in), as PEFT sizes it.
        largest = (max(layer.out_features for layer in layers.values()), max(layer.in_features for layer in layers.values()))
        return RandLoraBases(config, largest)

    def bases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's slices: A (r x 1 x m) and B_hat (M x Nr)."""
        return self.shared.randlora_A[:, :, : self.small], self.shared.randlora_B[: self.big, : self.n_bases].flatten(1)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        basis_a, basis_b = self.bases()
        return _dense_delta(basis_a, basis_b, self.randlora_lambda, self.randlora_gamma, self.scaling, self.in_small)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        basis_a, basis_b = self.bases()
        a_hat = ScaleBasis.apply(basis_a, self.randlora_lambda, self.randlora_gamma).flatten(0, 1)  # rN x m
        first, second = (a_hat, basis_b) if self.in_small else (basis_b.T, a_hat.T)
        hidden = F.linear(self.dropout(x), first)
        flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), second.T, alpha=self.scaling)
        return flat.view(base_out.shape)

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        tokens = x.numel() // max(x.shape[-1], 1)
        weight = layer.weight_matrix()
        lam = self.randlora_lambda
        if (self.training and not isinstance(self.dropout, nn.Identity)) or not fusable_dtypes(x, weight, lam):
            return None
        if weight.requires_grad:  # the Function gives no gradient to W: leave a trainable base to autograd
            return None
        if tokens * (self.small + self.big) <= self.small * self.big:  # forming dW costs more than the skinny path
            return None
        basis_a, basis_b = self.bases()
        return FusedRandLoraLinear.apply(x, weight, layer.base_layer.bias, self.randlora_lambda, self.randlora_gamma,
                                         basis_a, basis_b, self.scaling, self.in_small)


def _add_bases(module, state_dict, prefix, local_metadata):
    for key in BASIS_KEYS:
        state_dict[prefix + key] = getattr(module.shared, key).detach()


def _take_bases(module, state_dict, prefix, *args, **kwargs):
    for key in BASIS_KEYS:
        if prefix + key in state_dict:
            with torch.no_grad():
                getattr(module.shared, key).copy_(state_dict.pop(prefix + key))


@register("randlora", adapter=RandLoraAdapter, family="random basis", paper="2502.00987", peft_type="RANDLORA")
@dataclasses.dataclass
class RandLoraConfig(AdapterConfig):
    """RandLoRA. Field names and defaults follow PEFT's `RandLoraConfig` (except `save_projection`).

    r: rank of each random base (>= 1, at most min(out, in)); smaller r means more bases, ceil(m / r),
        and more trainable parameters (r*N + N*m per layer).
    randlora_alpha: scale numerator (> 0); the update is multiplied by randlora_alpha / r. None (default) means
        20 x r, the ratio of PEFT's defaults (640 at r=32), so changing r keeps the scale at 20; PEFT's fixed 640
        at r=8 is a scale of 80, at which neither PEFT's nor rankwise's RandLoRA trained on MiniLM (arena).
        Saved files always hold the number.
    randlora_dropout: dropout on the adapter input, in [0, 1) (training then takes the two-matmul path).
    projection_prng_key: seed of the shared bases (integer >= 0).
    save_projection: write the bases into the file (PEFT's default True); rankwise's default False regenerates them.
    sparse / very_sparse: ternary bases with P(+-1) = 1/6 / 1/(2 sqrt(m)) (PEFT's proof-of-concept variants).
    init_weights: True (lambda = 0, gamma = 1/m: zero update), False (lambda ~ N(0, 1): non-zero, for tests).
    fan_in_fan_out: accepted for PEFT files; rankwise detects GPT-2 Conv1D layers itself.
    """

    r: int = 32
    randlora_alpha: float | None = None
    randlora_dropout: float = 0.0
    projection_prng_key: int = 0
    save_projection: bool = False
    sparse: bool = False
    very_sparse: bool = False
    init_weights: bool = True
    fan_in_fan_out: bool = False

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    init_property: ClassVar[str] = "zero"
    peft_neutral_fields: ClassVar[dict] = PEFT_COMMON_NEUTRAL

    def __post_init__(self) -> None:
        if self.randlora_alpha is None and isinstance(self.r, int) and not isinstance(self.r, bool):
            self.randlora_alpha = 20 * self.r
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        self._check_int("r")
        self._check(isinstance(self.randlora_alpha, (int, float)) and self.randlora_alpha > 0, "randlora_alpha", "a number > 0")
        self._check(isinstance(self.randlora_dropout, (int, float)) and 0 <= self.randlora_dropout < 1, "randlora_dropout", "a number in [0, 1)")
        self._check_int("projection_prng_key", minimum=0)
        for field in ("save_projection", "sparse", "very_sparse", "init_weights", "fan_in_fan_out"):
            self._check(isinstance(getattr(self, field), bool), field, "True or False")
        self._check(not (self.sparse and self.very_sparse), "very_sparse", "False when sparse=True (pick one)")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        self._check_layer_limit(module_name, base_layer, "r", self.r, min(base_layer.weight.shape), "a base's rank can be")
