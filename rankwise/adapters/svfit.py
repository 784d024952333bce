"""SVFit: train only the top-r singular values of the frozen weight
(Sun, Wei, Wu, Shi, He, Ma, Xie, Yang; arXiv 2409.05926, 2024).

    W = U diag(sigma) V^T  (thin SVD, float32, once at wrap time)

    x ──┬──────────────── W (frozen, out x in) ───────────────────────┐
        └── V_r^T (r x in) ── * (s - sigma_r) ── U_r (out x r) ────────┴─(+)── y

    W' = W_e + U_r diag(s) V_r^T  with  W_e = W - U_r diag(sigma_r) V_r^T,  i.e.
    delta_weight = U_r diag(s - sigma_r) V_r^T        s in R^r trainable, initialised to sigma_r

The update is exactly zero at init and has rank <= r. W is kept as is (no residual copy W_e): the
update runs as a skinny delta path, the cost of a rank-r LoRA. r is either given or chosen per layer
as the smallest r whose top singular values hold `energy` (default 99 %) of sum(sigma^2) — the paper's
"over 99 % of the matrix's information" read as an energy criterion (no official code exists).
U_r, sigma_r, V_r are saved with the adapter, so a reload is exact whatever the SVD backend.
Conv kernels are factorised as out x (in * kernel), embeddings as dim x num_embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.registry import register
from rankwise.linalg import diag_sandwich, energy_rank, flat_rank_limit, truncated_svd


class SvfitAdapter(Adapter):
    def __init__(self, config: "SvfitConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        weight = layer.weight_matrix().detach()
        flat = weight.float().flatten(1)
        U, S, Vh = truncated_svd(flat, min(flat.shape))
        r = config.r if config.r is not None else energy_rank(S, config.energy)
        self.r = r
        self.svfit_s = nn.Parameter(S[:r].clone())
        self.register_buffer("svfit_sigma", S[:r].clone())
        self.register_buffer("svfit_U", U[:, :r].contiguous())
        self.register_buffer("svfit_V", Vh[:r].contiguous())  # V_r^T: r x in

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        delta = (self.svfit_U * (self.svfit_s - self.svfit_sigma)) @ self.svfit_V
        return delta.view(base_weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if layer.kind != "linear":
            return super().forward(x, base_out, layer)
        return base_out + diag_sandwich(x, self.svfit_V, self.svfit_s - self.svfit_sigma, self.svfit_U)


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
