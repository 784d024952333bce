"""SVFit: train only the top-r singular values of the frozen weight
(Sun, Wei, Wu, Shi, He, Ma, Xie, Yang; arXiv 2409.05926, 2024).

    W = U diag(sigma) V^T  (thin SVD, float32, once at wrap time)

    x ──┬──────────────── W (frozen, out x in) ───────────────────────┐
        └── V_r^T (r x in) ── * (s - sigma_r) ── U_r (out x r) ────────┴─(+)── y

    W' = W_e + U_r diag(s) V_r^T  with  W_e = W - U_r diag(sigma_r) V_r^T,  i.e.
    delta_weight = U_r diag(s - sigma_r) V_r^T        s in R^r trainable, initialised to sigma_r

The update is exactly zero at init and has rank <= r. W is kept as is (no residual copy W_e): the
update runs as a skinny delta path, the cost of a rank-r LoRA, or, when r is near min(out, in) and tokens are
many, as one matmul with W + delta formed once per step (`linalg.FusedCoreLinear`). r is either given or chosen per layer
as the smallest r whose top singular values hold `energy` (default 99 %) of sum(sigma^2) — the paper's
"over 99 % of the matrix's information" read as an energy criterion (no official code exists).
Files hold s and sigma_r only: U_r and V_r are recomputed from W's SVD when the adapter is wrapped for
loading. The delta, a sum of (s_i - sigma_i) u_i v_i^T, does not change when an SVD returns a pair as
(-u_i, -v_i), so the reload is exact up to float error (singular vectors of nearly repeated singular
values are ill-conditioned: only there can another SVD backend rotate them). sigma_r fingerprints W: a
file whose sigma_r is more than 1e-4 sigma_1 off the recomputed one was trained on other weights and is
refused (CheckpointError); otherwise the file's sigma_r is loaded, so s - sigma_r is exactly the trained
difference. A file whose r differs from the one the energy rule picks now is followed (re-sliced).
Conv kernels are factorised as out x (in * kernel), embeddings as dim x num_embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import CheckpointError
from rankwise.core.registry import register
from rankwise.linalg import diag_sandwich, energy_rank, flat_rank_limit, fused_core_forward, truncated_svd

SIGMA_TOLERANCE = 1e-4  # largest max|sigma_file - sigma| / sigma_1 of a file trained on this base weight


def spectrum(layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of the layer's weight as a matrix, float32."""
    flat = layer.weight_matrix().detach().float().flatten(1)
    return truncated_svd(flat, min(flat.shape))


class SvfitAdapter(Adapter):
    def __init__(self, config: "SvfitConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        U, S, Vh = spectrum(layer)
        r = config.r if config.r is not None else energy_rank(S, config.energy)
        self.svfit_s = nn.Parameter(S[:r].clone())
        self.keep_top(U, S, Vh, r)

    def keep_top(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int) -> None:
        self.r = r
        self.register_buffer("svfit_sigma", S[:r].clone())  # saved: the base weight's fingerprint
        self.register_buffer("svfit_U", U[:, :r].contiguous(), persistent=False)
        self.register_buffer("svfit_V", Vh[:r].contiguous(), persistent=False)  # V_r^T: r x in

    def prepare_load(self, state: dict[str, torch.Tensor], layer) -> None:
        saved = state.get("svfit_sigma")
        if saved is None or saved.dim() != 1:
            return  # the generic key and shape checks name what is wrong
        r = saved.numel()
        factors, sigma = None, self.svfit_sigma.detach()
        if r != self.r:
            # r=None picks r by energy, and another SVD backend can round that boundary differently: follow the file.
            factors = spectrum(layer)
            if not 1 <= r <= factors[1].numel():
                return  # more values than the layer has: the shape check reports it
            sigma = factors[1][:r]
        sigma, saved_sigma = sigma.float().cpu(), saved.float().cpu()
        drift = float((saved_sigma - sigma).abs().max() / sigma[0].clamp_min(torch.finfo(torch.float32).tiny))
        # A file or an adapter cast to half precision cannot hold sigma closer than its own rounding.
        tolerance = max(SIGMA_TOLERANCE, *(torch.finfo(t.dtype).eps for t in (saved, self.svfit_sigma) if t.is_floating_point()))
        if not drift <= tolerance:
            raise CheckpointError(
                f"svfit_sigma of {self.module_name!r}: the adapter was trained on different base weights (its saved "
                f"singular values differ from this layer's by {drift:.2g} x sigma_1, tolerance {tolerance:.0e}). "
                "Load it onto the base model it was trained with."
            )
        if factors is not None:
            like, trained = self.svfit_U, self.svfit_s
            self.keep_top(*(t.to(like) for t in factors), r)
            self.svfit_s = nn.Parameter(self.svfit_sigma.to(trained).clone(), requires_grad=trained.requires_grad)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        delta = (self.svfit_U * (self.svfit_s - self.svfit_sigma)) @ self.svfit_V
        return delta.view(base_weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if layer.kind != "linear":
            return super().forward(x, base_out, layer)
        return base_out + diag_sandwich(x, self.svfit_V, self.svfit_s - self.svfit_sigma, self.svfit_U)

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        return fused_core_forward(x, layer, self.svfit_U, self.svfit_s - self.svfit_sigma, self.svfit_V)


@register("svfit", adapter=SvfitAdapter, family="SVD re-factorisation", paper="2409.05926", peft_type=None)
@dataclasses.dataclass
class SvfitConfig(AdapterConfig):
    """SVFit (not in PEFT: files carry `peft_type = "RANKWISE_SVFIT"`).

    r: number of top singular values trained per layer (>= 1, at most min(out, in)); None (default) picks
        per layer the smallest r holding `energy` of the spectrum's energy.
    energy: fraction in (0, 1] of sum(sigma^2) the top-r values must hold when r is None (default 0.99).
    """

    r: int | None = None
    energy: float = 0.99

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    init_property: ClassVar[str] = "zero"

    def validate(self) -> None:
        super().validate()
        self._check_int("r", allow_none=True)
        self._check(isinstance(self.energy, (int, float)) and 0 < self.energy <= 1, "energy", "a number in (0, 1]")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        if self.r is not None:
            limit = flat_rank_limit(tuple(base_layer.weight.shape), kind)
            self._check_layer_limit(module_name, base_layer, "r", self.r, limit, "the number of singular values is")
