"""LoLDU: train only the diagonal of a pivoted LDU factorisation of the frozen weight
(Shi, Wei, Wu, Ran, Sun, He, Yang; arXiv 2410.13618, 2024).

    W = P L diag(D) U   (partial-pivoting LU in float32, once at wrap time; U unit upper-triangular)

    x ──┬──────────────── W (frozen, out x in) ───────────────────────────┐
        └── U_r (r x in) ── * s (z - D_r) ── (P L)_r (out x r) ────────────┴─(+)── y      s = loldu_alpha / r

    W' = W_res + s P L_r diag(z) U_r  with  W_res = W - s P L_r diag(D_r) U_r,  i.e.
    delta_weight = s (P L)_r diag(z - D_r) U_r            z in R^r trainable, initialised to D_r

The first r factors are taken in pivot order (not by magnitude), as the official code does; the
update is exactly zero at init and has rank <= r. The permutation is folded into L's rows once, so
the run-time path is two skinny matmuls (the reference materialises W' with a dense out x out P every
forward). The factors are recomputed from W when an adapter is loaded (LU with partial pivoting is
deterministic), so files hold only z. A wide weight whose direct split meets a zero column (an
embedding's zero padding row) is factorised through its transpose instead; a weight that is
rank-deficient within its first r pivots either way is refused with a clear error instead of
producing inf/NaN. Conv kernels are factorised as out x (in * kernel), embeddings
as dim x num_embeddings.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import TargetError
from rankwise.core.registry import register
from rankwise.linalg import diag_sandwich, flat_rank_limit, fused_core_forward, ldu_factors


class LolduAdapter(Adapter):
    def __init__(self, config: "LolduConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        flat = layer.weight_matrix().detach().float().flatten(1)
        r = config.r if config.r is not None else min(flat.shape)
        try:
            lower, pivots, upper = ldu_factors(flat, r)
        except ValueError as err:
            # Row pivoting cannot step over a zero column, which a wide weight of full row rank may well have: an
            # embedding's padding row (dim x num_embeddings, row `padding_idx` is zero). The transpose is tall, so
            # its pivots cannot vanish unless W is truly rank-deficient; W = U_t^T diag(D) (P L)_t^T has the same
            # form. Taken only when the direct split fails, so every weight the direct split handles keeps its
            # factors (saved z values stay valid), and reloading repeats the same choice from the same W.
            if flat.shape[0] >= flat.shape[1]:
                raise TargetError(f"LoLDU cannot factorise {module_name!r}: {err}. Exclude this module (exclude_modules).") from None
            try:
                lower_t, pivots, upper_t = ldu_factors(flat.T, r)
            except ValueError:
                raise TargetError(f"LoLDU cannot factorise {module_name!r}: {err}. Exclude this module (exclude_modules).") from None
            lower, upper = upper_t.T, lower_t.T
        self.r = r
        self.scaling = config.loldu_alpha / r
        self.loldu_z = nn.Parameter(pivots.clone())
        self.register_buffer("pivots", pivots, persistent=False)
        self.register_buffer("lower", lower.contiguous(), persistent=False)  # (P L)[:, :r]: out x r
        self.register_buffer("upper", upper.contiguous(), persistent=False)  # (D^-1 U)[:r]: r x in

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        delta = (self.lower * ((self.loldu_z - self.pivots) * self.scaling)) @ self.upper
        return delta.view(base_weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if layer.kind != "linear":
            return super().forward(x, base_out, layer)
        return base_out + diag_sandwich(x, self.upper, (self.loldu_z - self.pivots) * self.scaling, self.lower)

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        return fused_core_forward(x, layer, self.lower, (self.loldu_z - self.pivots) * self.scaling, self.upper)


@register("loldu", adapter=LolduAdapter, family="LU re-factorisation", paper="2410.13618", peft_type=None)
@dataclasses.dataclass
class LolduConfig(AdapterConfig):
    """LoLDU (not in PEFT: files carry `peft_type = "RANKWISE_LOLDU"`).

    r: number of leading LDU factors whose diagonal is trained (>= 1, at most min(out, in)); None (default)
        uses all of them, r = min(out, in), the regime the official default config uses.
    loldu_alpha: scale numerator (> 0); the update is multiplied by loldu_alpha / r (official default 1).
    """

    r: int | None = None
    loldu_alpha: float = 1.0

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    init_property: ClassVar[str] = "zero"

    def validate(self) -> None:
        super().validate()
        self._check_int("r", allow_none=True)
        self._check(isinstance(self.loldu_alpha, (int, float)) and self.loldu_alpha > 0, "loldu_alpha", "a number > 0")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        if self.r is not None:
            limit = flat_rank_limit(tuple(base_layer.weight.shape), kind)
            self._check_layer_limit(module_name, base_layer, "r", self.r, limit, "the number of LDU factors is")
