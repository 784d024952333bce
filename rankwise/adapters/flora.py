"""FLoRA: a Tucker-structured low-rank update for N-dimensional weights (Si et al., ICLR 2025, arXiv 2405.14739).

Not the Flora optimizer (Hao et al. 2024) nor the federated FLoRA: this is the Tucker adapter that keeps a
convolution kernel 4-D instead of flattening it to a matrix.

    x ──┬──────────────── W (frozen)  (out, in/g, kh, kw) ─────────────────────────┐
        └─ dropout ── 1x1: A_in (in x r_in) ── conv k: K (r_out, r_in, kh, kw) ── 1x1: A_out (out x r_out) ── * s ──┴─(+)── y
                                                K = G x_h A_h x_w A_w  (core G: r_in x r_out x r_h x r_w)

    delta_weight (mode order [in, out, k1, k2, ...], then out/in swapped to PyTorch layout):
        dT = s * G x_0 A_in x_1 A_out x_2 A_k1 x_3 A_k2 ...        (n-mode products)
    linear (N = 2):  delta_weight = s * A_out G^T A_in^T  (out x r_out . r_out x r_in . r_in x in)

The core starts at zero (exact zero update); every factor is Kaiming-normal (a = sqrt(3)) as in the reference.
Ranks per mode are min(rank, mode size): a 3-channel stem gets r_in = 3.
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
from rankwise.core.registry import register
from rankwise.linalg import tucker_product


class FloraAdapter(Adapter):
    def __init__(self, config: "FloraConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        self.kind = layer.kind
        weight = layer.weight_matrix()
        out_dim, in_dim, *kernel = weight.shape  # the real kernel shape: in is in_channels / groups
        self.mode_sizes = (in_dim, out_dim, *kernel)
        self.ranks = tuple(min(r, d) for r, d in zip(config.ranks_for(len(self.mode_sizes)), self.mode_sizes))
        self.scaling = float(config.scale)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.core = nn.Parameter(torch.zeros(self.ranks))
        self.factors = nn.ParameterList(nn.Parameter(torch.empty(d, r)) for d, r in zip(self.mode_sizes, self.ranks))
        for factor in self.factors:
            nn.init.kaiming_normal_(factor, a=math.sqrt(3))
        self.groups = getattr(layer.base_layer, "groups", 1) if self.kind == "conv" else 1

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        tensor = tucker_product(self.core, list(self.factors))  # (in, out, k...)
        return tensor.transpose(0, 1) * self.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        x = self.dropout(x)
        a_in, a_out = self.factors[0], self.factors[1]
        if self.kind == "linear":
            # Never builds out x in: ((x A_in) G) A_out^T.
            return base_out + F.linear(F.linear(F.linear(x, a_in.T), self.core.T), a_out) * self.scaling
        if self.groups != 1:  # grouped/depthwise: the kernel is tiny, fold the delta into one extra conv
            return base_out + layer.conv(x, self.delta_weight(None))
        # Tucker-2 path: 1x1 down (in -> r_in), the small core conv (r_in -> r_out, base stride/padding), 1x1 up.
        spatial = tucker_product(self.core, [torch.eye(r, dtype=self.core.dtype, device=self.core.device)
                                             for r in self.ranks[:2]] + list(self.factors[2:]))  # (r_in, r_out, k...)
        down = _pointwise(x, a_in.T)
        mid = layer.conv(down, spatial.transpose(0, 1).contiguous(), groups=1)
        return base_out + _pointwise(mid, a_out) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact LoRA export of a linear FLoRA update: (B, A) with delta_weight = B @ A, scale 1."""
        if self.kind != "linear":
            raise ValueError("only a linear FLoRA update is a plain LoRA; export conv updates as delta_weight")
        return self.scaling * self.factors[1] @ self.core.T, self.factors[0].T


def _pointwise(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution with a (c_out x c_in) matrix, for 1-D, 2-D or 3-D feature maps."""
    return torch.einsum("oc,bc...->bo...", matrix, x)


@register("flora", adapter=FloraAdapter, family="tensor (Tucker)", paper="2405.14739")
@dataclasses.dataclass
class FloraConfig(AdapterConfig):
    """FLoRA (Tucker adapter). No PEFT counterpart: files are written as `RANKWISE_FLORA`.

    r: Tucker rank of the channel modes (in and out), >= 1; capped per layer at the mode's size.
    kernel_r: Tucker rank of each spatial kernel mode (conv only), >= 1; capped at the kernel size.
        The reference ConvNeXt example uses r=16, kernel_r=2.
    ranks: optional explicit ranks for every mode, [r_in, r_out, r_k1, ...]; applies to the layers whose
        weight has that many modes (others use r / kernel_r).
    scale: constant multiplier s of the update (reference layer default 1.0; its ConvNeXt example uses 4.0).
    dropout: dropout on the adapter input, in [0, 1).
    """

    r: int = 8
    kernel_r: int = 2
    ranks: list[int] | None = None
    scale: float = 1.0
    dropout: float = 0.0

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv")

    def validate(self) -> None:
        super().validate()
        self._check(_positive_int(self.r), "r", "an integer >= 1")
        self._check(_positive_int(self.kernel_r), "kernel_r", "an integer >= 1")
        self._check(self.ranks is None or (isinstance(self.ranks, list) and len(self.ranks) >= 2
                                           and all(_positive_int(v) for v in self.ranks)),
                    "ranks", "None or a list of >= 2 integers >= 1, one per weight mode [in, out, k1, ...]")
        self._check(isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale != 0,
                    "scale", "a finite non-zero number")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")

    def ranks_for(self, n_modes: int) -> list[int]:
        if self.ranks is not None and len(self.ranks) == n_modes:
            return list(self.ranks)
        return [self.r, self.r] + [self.kernel_r] * (n_modes - 2)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
