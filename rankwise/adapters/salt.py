"""SALT: scale and shift the top singular values, LoRA inside the residual singular subspace
(Elsayed, Hashmi, Elseiagy, Wang, Yaqub, Almakky; BMVC 2025, arXiv 2503.16055).

    W = U diag(sigma) V^T  (thin SVD, float32, k = min(out, in)), split at t top values:

                  ┌ diag(a * sigma_top + b)          0                 ┐   a, b in R^t       (init 1, 0)
    core S'  =    │                                                     │
                  └        0                 diag(sigma_res) + X Y     ┘   X: (k-t) x r_lora (Kaiming), Y: r_lora x (k-t) (0)

    W' = U ReLU(S') V^T       (ReLU on the whole k x k core: singular values stay >= 0)
    delta_weight = U (ReLU(S') - diag(sigma)) V^T       -- exactly zero at init (Y = 0, a = 1, b = 0)

    x ──┬───────── W (frozen) ───────────────────────────────┐
        └── V^T ── (ReLU(S') - diag sigma) ── U ─────────────┴─(+)── y      ("faithful", the official SAM2 code)

mode="fast" drops the ReLU (a documented deviation; equal unless a value is driven negative or XY has
negative entries) and runs two skinny paths: the top block as a scaled diagonal and the residual block as
a rank-r_lora LoRA with factors (U_res X, Y V_res^T). The faithful mode forms delta_weight each step (cost
independent of the tokens) and, when it is the only adapter, runs x (W + dW)^T in place of the base call
(`linalg.FusedCoreLinear`, saving only x).
t = max(1, floor(k * ratio)) unless given (official: ratio 0.1, r_lora 256). The SVD factors are recomputed
from W when a file is loaded: files hold only a, b, X, Y. Because X Y mixes singular directions, each pair
(u_i, v_i) gets a fixed sign (largest |u_i| entry positive), so a reload does not depend on the SVD backend.
The official auxiliary regulariser is off by default there (reg_multiplier 0) and is not implemented.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import ConfigError
from rankwise.core.registry import register
from rankwise.linalg import canonical_svd_signs, diag_sandwich, flat_rank_limit, fused_core_forward, truncated_svd

MODES = ("faithful", "fast")


def top_count(config: "SaltConfig", k: int) -> int:
    return config.t if config.t is not None else max(1, math.floor(k * config.ratio))


class SaltAdapter(Adapter):
    def __init__(self, config: "SaltConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        flat = layer.weight_matrix().detach().float().flatten(1)
        k = min(flat.shape)
        U, S, Vh = truncated_svd(flat, k)
        # X and Y mix residual singular directions, so a pair's sign matters: fix it by convention, or a file
        # loaded where the SVD backend picks other signs (another LAPACK build, GPU vs CPU) gives other outputs.
        U, Vh = canonical_svd_signs(U, Vh)
        t, r = top_count(config, k), config.r_lora
        self.t, self.mode = t, config.mode
        self.register_buffer("U", U.contiguous(), persistent=False)
        self.register_buffer("sigma", S.contiguous(), persistent=False)
        self.register_buffer("Vh", Vh.contiguous(), persistent=False)
        self.salt_scale = nn.Parameter(torch.ones(t))
        self.salt_shift = nn.Parameter(torch.zeros(t))
        self.salt_X = nn.Parameter(torch.empty(k - t, r))
        self.salt_Y = nn.Parameter(torch.zeros(r, k - t))
        # The official SAM2 call; with nonlinearity="relu" torch ignores `a`: U(+-sqrt(6 / r_lora)).
        nn.init.kaiming_uniform_(self.salt_X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")

    def core_delta(self) -> torch.Tensor:
        """ReLU(S') - diag(sigma), k x k (without the ReLU in fast mode)."""
        t, sigma = self.t, self.sigma
        top = self.salt_scale * sigma[:t] + self.salt_shift
        residual = torch.diag(sigma[t:]) + self.salt_X @ self.salt_Y
        core = torch.block_diag(torch.diag(top), residual)
        if self.mode == "faithful":
            core = torch.relu(core)
        return core - torch.diag(sigma)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return (self.U @ self.core_delta() @ self.Vh).view(base_weight.shape)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if layer.kind != "linear" or self.mode == "faithful":
            return super().forward(x, base_out, layer)
        t = self.t
        top = diag_sandwich(x, self.Vh[:t], (self.salt_scale - 1) * self.sigma[:t] + self.salt_shift, self.U[:, :t])
        down = self.salt_Y @ self.Vh[t:]  # r_lora x in
        up = self.U[:, t:] @ self.salt_X  # out x r_lora
        return base_out + top + F.linear(F.linear(x, down), up)

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        if self.mode != "faithful":
            return None
        # One matmul with W + U core V^T instead of the base call plus a second token-sized matmul; saves only x
        # (autograd through F.linear(x, W + dW) would also keep W + dW and U core, weight-sized, per layer).
        return fused_core_forward(x, layer, self.U, self.core_delta(), self.Vh)


@register("salt", adapter=SaltAdapter, family="SVD re-factorisation", paper="2503.16055", peft_type=None)
@dataclasses.dataclass
class SaltConfig(AdapterConfig):
    """SALT (not in PEFT: files carry `peft_type = "RANKWISE_SALT"`).

    r_lora: rank of the LoRA inside the residual singular block (>= 1, at most k - t). Official: 256.
    ratio: fraction of the k = min(out, in) singular values that get scale and shift, t = max(1, floor(k * ratio));
        in (0, 1). Official: 0.1.
    t: the number of top singular values directly (overrides ratio; 1 <= t < k).
    mode: "faithful" (ReLU on the whole core, the official semantics) or "fast" (no ReLU, skinny paths).
    Trainable per layer: 2 t + 2 r_lora (k - t).
    """

    r_lora: int = 256
    ratio: float = 0.1
    t: int | None = None
    mode: str = "faithful"

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    init_property: ClassVar[str] = "zero"
    rank_field: ClassVar[str | None] = "r_lora"

    def validate(self) -> None:
        super().validate()
        self._check_int("r_lora")
        self._check(isinstance(self.ratio, (int, float)) and 0 < self.ratio < 1, "ratio", "a number in (0, 1)")
        self._check_int("t", allow_none=True)
        self._check(self.mode in MODES, "mode", " or ".join(repr(m) for m in MODES))

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        k = flat_rank_limit(tuple(base_layer.weight.shape), kind)
        t = top_count(self, k)
        if t >= k:
            raise ConfigError(f"SaltConfig.t={t} must be below {k} = min(out, in) of {module_name!r}: lower t or ratio.")
        if self.r_lora > k - t:
            raise ConfigError(
                f"SaltConfig.r_lora={self.r_lora} is too large for {module_name!r}: its residual singular block has "
                f"{k - t} values (k={k}, t={t}). Lower r_lora (at most {k - t}), or exclude this module."
            )
