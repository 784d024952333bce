"""SNELL: sparse tuning with a kernelised low-rank update and competition-based sparsification
(Shen et al., NeurIPS 2024, arXiv 2411.01800 "Expanding Sparse Tuning for Low Memory Usage").

    In  (H x in x q/H), Out (H x out x q/H)   trainable (H = 2 heads), c = (+0.1, -0.1) frozen
    K[i, o] = sum_h c_h ||In[h, i] - Out[h, o]||_2          (in x out, generically full rank)
    K_s     = K * |K|.detach() * 1[|K| > quantile(|K|, s)]  (competition: survivors reweighted by magnitude)

    x ──┬── W (frozen) ─────────────────────┐
        └── dropout ── @ K_s (in x out) ────┴─(+)── y          delta_weight = K_s^T
    conv layers: "in" is the flattened kernel fan-in (in/groups * kh * kw); K_s^T is reshaped to the kernel and
    applied as one extra convolution with the base's stride/padding/groups.

Only the factors (q (in + out) numbers) are stored; K, |K| and the mask are rebuilt every step, and with
`checkpoint=True` (the reference's choice) they are recomputed in backward instead of kept for it.
The update is not zero at init (the heads' distance matrices differ); `zero_init=True` subtracts the kernel of
the initial factors (kept as frozen buffers) for users who need an unchanged output at init.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.registry import register
from rankwise.linalg import competition_sparsify, distance_kernel

HEADS = 2


class SnellAdapter(Adapter):
    def __init__(self, config: "SnellConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        per_head = config.low_rank_dim // HEADS
        self.kind = layer.kind
        self.weight_shape = tuple(layer.weight_matrix().shape)  # conv: (out, in/g, k...), in_features = (in/g) * prod(k)
        self.lora_In = nn.Parameter(torch.empty(HEADS, layer.in_features, per_head))
        self.lora_Out = nn.Parameter(torch.empty(HEADS, layer.out_features, per_head))
        nn.init.kaiming_uniform_(self.lora_In, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_Out, a=math.sqrt(5))
        self.register_buffer("coefficients", 0.1 * torch.tensor([(-1.0) ** h for h in range(HEADS)]), persistent=False)
        if config.zero_init:
            self.register_buffer("initial_In", self.lora_In.detach().clone())
            self.register_buffer("initial_Out", self.lora_Out.detach().clone())
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @property
    def sparsity(self) -> float:
        return float(self.config.sparsity)

    def kernel(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """The (in x out) kernel matrix of two factor tensors (before sparsification)."""
        return distance_kernel(left, right, self.coefficients)

    def sparsify(self, matrix: torch.Tensor) -> torch.Tensor:
        """The competition inside the layer (SNELLA widens it to sparsity 0)."""
        return competition_sparsify(matrix, self.sparsity, self.config.competition == "magnitude")

    def sparse_kernel(self) -> torch.Tensor:
        """K_s (in x out): the sparsified update in input-major layout."""
        update = self.sparsify(self.kernel(self.lora_In, self.lora_Out))
        if self.config.zero_init:
            with torch.no_grad():  # only the constant is computed without a graph: the difference must keep it
                initial = self.sparsify(self.initial_kernel())
            update = update - initial
        return update

    def initial_kernel(self) -> torch.Tensor:
        """The kernel of the parameters at init (what `zero_init` subtracts)."""
        return self.kernel(self.initial_In, self.initial_Out)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.sparse_kernel().T.reshape(self.weight_shape)

    def _branch(self, x: torch.Tensor, layer) -> torch.Tensor:
        if self.kind == "conv":  # the kernel-sized update folded into one extra convolution
            return layer.conv(self.dropout(x), self.delta_weight(None))
        return self.dropout(x) @ self.sparse_kernel()

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if self.config.checkpoint and torch.is_grad_enabled() and self.lora_In.requires_grad:
            return base_out + checkpoint(self._branch, x, layer, use_reentrant=False)
        return base_out + self._branch(x, layer)


@register("snell", adapter=SnellAdapter, family="sparse (kernelised low-rank)", paper="2411.01800")
@dataclasses.dataclass
class SnellConfig(AdapterConfig):
    """SNELL. Not in PEFT: files are `RANKWISE_SNELL` (the two factor tensors per layer).

    low_rank_dim: q, the total factor width over the 2 heads (reference 8 / 16 / 32); an even integer >= 2.
    sparsity: s in [0, 1), the share of kernel entries zeroed every step (`init_thres`, set per task in the
        reference: e.g. 0.3 CUB, 0.5 pets, 0.9 CIFAR-100; 0 gives plain kernelised LoRA).
    competition: "magnitude" (the reference code: survivors x their detached |K|) or "mask" (plain 0/1 mask).
    zero_init: subtract the initial kernel so the adapted model starts exactly at the base (not the reference).
    checkpoint: recompute K in backward instead of saving it (the reference's memory choice).
    dropout: dropout on the adapter input, in [0, 1).
    """

    low_rank_dim: int = 32
    sparsity: float = 0.5
    competition: str = "magnitude"
    zero_init: bool = False
    checkpoint: bool = True
    dropout: float = 0.0

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv")
    init_property: ClassVar[str] = "none"  # the reference kernel is non-zero at init (zero_init=True makes it zero)
    rank_field: ClassVar[str | None] = "low_rank_dim"

    def validate(self) -> None:
        super().validate()
        q = self.low_rank_dim
        self._check(isinstance(q, int) and not isinstance(q, bool) and q >= HEADS and q % HEADS == 0,
                    "low_rank_dim", f"an even integer >= {HEADS} (split over {HEADS} heads)")
        self._check(isinstance(self.sparsity, (int, float)) and 0 <= self.sparsity < 1, "sparsity", "a number in [0, 1)")
        self._check(self.competition in ("magnitude", "mask"), "competition", "'magnitude' or 'mask'")
        for field in ("zero_init", "checkpoint"):
            self._check(isinstance(getattr(self, field), bool), field, "True or False")
        self._check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
