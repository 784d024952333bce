"""NOLA: LoRA factors as linear combinations of seeded random bases
(Koohpayegani, Navaneet, Nooralinejad, Kolouri, Pirsiavash; ICLR 2024, arXiv 2310.02556).

    x ──┬──────────────────── W (frozen, out x in) ─────────────────────┐
        └─ dropout ── A (r x in) ── B (out x r) ── * s ─────────────────┴─(+)── y        s = nola_alpha / r

        A = A0 + sum_i alpha_i A_i / sqrt(k)     A0: r x in, A_i: k x r x in   (frozen, from the seed)
        B =      sum_j beta_j  B_j / sqrt(l)                 B_j: l x out x r  (frozen, from the seed)
        trainable: alpha (k), beta (l)  -- k + l numbers per layer, whatever the layer's shape or r

    delta_weight = s * B @ A   (rank <= r; zero at init because beta = 0)

The bases, and the Kaiming-uniform offset A0 that lets training start (the official code's frozen
`nn.Linear` weight), are regenerated on CPU with `rankwise.linalg.random_basis`, so the adapter file holds
only the coefficients (the seed is in `adapter_config.json`). Bases are U(-1, 1) as in the official code.

Each layer searches its own random subspace, as in the official code (every `NOLALinear` draws its own
seeds): the layer's seed is `derive_seed(seed, "nola-layer", module_name)` (a CRC32, identical in every
process), so two layers of one shape get different bases. Files written before this (`per_layer_bases`
absent from their config) used one set of bases per (seed, shape), shared by equal-shape layers; they
load with that scheme and give their old outputs.
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
from rankwise.linalg import derive_seed, random_basis


class NolaAdapter(Adapter):
    def __init__(self, config: "NolaConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        out_f, in_f, r = layer.out_features, layer.in_features, config.r
        k, l = config.num_bases_a, config.num_bases_b
        self.r = r
        self.scaling = config.nola_alpha / r
        self.dropout = nn.Dropout(config.nola_dropout) if config.nola_dropout > 0 else nn.Identity()
        self.nola_alpha = nn.Parameter(torch.zeros(k))
        self.nola_beta = nn.Parameter(torch.zeros(l))
        # Frozen, regenerated, never saved. Per-layer seeds: each layer its own bases (not cached: each key is used
        # once). The legacy shared scheme keys them by (seed, shape), one cached tensor for equal-shape layers.
        seed, shared_cache = config.layer_seed(module_name), not config.per_layer_bases
        offset = random_basis(derive_seed(seed, "nola-A0", r, in_f), (r, in_f), "uniform", cache=shared_cache)
        self.register_buffer("offset_a", offset, persistent=False)  # scaled below via `offset_scale`
        self.register_buffer("bases_a", random_basis(derive_seed(seed, "nola-A", k, r, in_f), (k, r, in_f), "uniform",
                                                     cache=shared_cache), persistent=False)
        self.register_buffer("bases_b", random_basis(derive_seed(seed, "nola-B", l, out_f, r), (l, out_f, r), "uniform",
                                                     cache=shared_cache), persistent=False)
        self.offset_scale = 1.0 / math.sqrt(in_f)  # Kaiming-uniform(a=sqrt(5)) bound of an r x in weight
        self.coef_scale_a = 1.0 / math.sqrt(k)
        self.coef_scale_b = 1.0 / math.sqrt(l)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current LoRA factors (A: r x in, B: out x r)."""
        dtype = self.nola_alpha.dtype
        a = torch.tensordot(self.nola_alpha * self.coef_scale_a, self.bases_a.to(dtype), dims=1)
        a = a + self.offset_a.to(dtype) * self.offset_scale
        b = torch.tensordot(self.nola_beta * self.coef_scale_b, self.bases_b.to(dtype), dims=1)
        return a, b

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return (b @ a) * self.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        a, b = self.factors()
        hidden = F.linear(self.dropout(x), a)
        flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden.reshape(-1, self.r), b.T, alpha=self.scaling)
        return flat.view(base_out.shape)


@register("nola", adapter=NolaAdapter, family="random basis", paper="2310.02556", peft_type=None)
@dataclasses.dataclass
class NolaConfig(AdapterConfig):
    """NOLA (not in PEFT: files carry `peft_type = "RANKWISE_NOLA"`).

    r: rank of the generated LoRA factors (>= 1, at most min(out, in) of each layer).
    num_bases_a / num_bases_b: number k / l of random bases mixed into A / B (>= 1); the trainable count
        per layer is k + l. Defaults 256 / 256: the official GPT-2 scripts.
    nola_alpha: scale numerator (> 0), the update is multiplied by nola_alpha / r (official GPT-2: 2 with r = 8).
    nola_dropout: dropout on the adapter input, in [0, 1).
    seed: integer >= 0 from which every basis is regenerated (on CPU: identical in every process).
    per_layer_bases: True (the official code): each layer draws its own bases from a seed derived from `seed` and
        its module name. False: one set per (seed, shape), shared by equal-shape layers (files written before
        this field existed; a file without the key loads as False, so it keeps its outputs).
    """

    r: int = 8
    num_bases_a: int = 256
    num_bases_b: int = 256
    nola_alpha: float = 2.0
    nola_dropout: float = 0.0
    seed: int = 0
    per_layer_bases: bool = True

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    init_property: ClassVar[str] = "zero"
    legacy_file_defaults: ClassVar[dict] = {"per_layer_bases": False}

    def validate(self) -> None:
        super().validate()
        for field in ("r", "num_bases_a", "num_bases_b"):
            self._check_int(field)
        self._check(isinstance(self.nola_alpha, (int, float)) and self.nola_alpha > 0, "nola_alpha", "a number > 0")
        self._check(isinstance(self.nola_dropout, (int, float)) and 0 <= self.nola_dropout < 1, "nola_dropout", "a number in [0, 1)")
        self._check_int("seed", minimum=0)
        self._check(isinstance(self.per_layer_bases, bool), "per_layer_bases", "True or False")

    def layer_seed(self, module_name: str) -> int:
        """The seed this layer's bases come from (stable across processes: a CRC32, not Python's `hash`)."""
        return derive_seed(self.seed, "nola-layer", module_name) if self.per_layer_bases else self.seed

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        self._check_layer_limit(module_name, base_layer, "r", self.r, min(base_layer.weight.shape), "the rank can be")
