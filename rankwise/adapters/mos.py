"""MoS, Mixture of Shards: LoRA whose rank vectors are assembled from shard pools shared by all layers
(Wang et al., ICLR 2025, arXiv 2410.00938; mechanics from the authors' `modules/Tied_LoRA.py`).

    one pool pair per module type (e.g. every `query`), owned once by the model:
        P_A: (R_eq*L*l) x (in/l)      P_B: (R_eq*L*l) x (out/l)       L = layers of that type, l = shards per vector
        rows [0, S) shared by all layers, rows [S, P) private: layer i owns p*l of them  (S = (R_eq - p)*L*l)

    layer i:  idx_A, idx_B = (random subset of the shared rows (r-p)*l) ++ (its private rows p*l)   [frozen, saved]
              A_i (r x in)  = P_A[idx_A] regrouped: rank vector j = concat of shards j*l .. j*l+l-1
              B_i (out x r) = (P_B[idx_B] regrouped)^T
    x ── W ──────────────────────────────┐
    └─ dropout ── A_i^T ── B_i^T ── * s ─┴─(+)── y          s = alpha / r (the active rank)

The four differentiation tricks: subset selection (random shared subset per layer), pair dissociation (A and B
indices drawn independently), vector sharding (a rank vector is l shards), shard privatisation (p private vectors).
Trainable parameters: R_eq * L * sum(in + out) per module type: a LoRA of rank R_eq, whatever r is.
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
from rankwise.linalg import seeded_generator


def pool_key(module_name: str, layer) -> str:
    """Pools are shared by layers of one module type: same leaf name and same shape."""
    leaf = module_name.rsplit(".", 1)[-1]
    return f"{leaf}_{layer.in_features}x{layer.out_features}"


def mos_parameter_count(equivalent_rank: int, shapes: dict[str, tuple[int, int, int]]) -> int:
    """Trainable count of MoS: sum over module types of R_eq * L * (in + out); `shapes[type] = (L, in, out)`."""
    return sum(equivalent_rank * n_layers * (d_in + d_out) for n_layers, d_in, d_out in shapes.values())


class MosPools(nn.Module):
    """The shard pools of one adapter, keyed by module type; plus each layer's frozen routing indices."""

    def __init__(self, config: "MosConfig", layers: dict):
        super().__init__()
        r, r_eq, p, l = config.r, config.equivalent_rank, config.private_rank, config.shards_per_vector
        groups: dict[str, list[str]] = {}
        for name, layer in layers.items():
            groups.setdefault(pool_key(name, layer), []).append(name)
        self.pool_A = nn.ParameterDict()
        self.pool_B = nn.ParameterDict()
        self.slot: dict[str, tuple[str, int]] = {}  # module name -> (pool key, block index)
        for key, names in groups.items():
            n_layers = len(names)
            first = layers[names[0]]
            d_in, d_out = first.in_features, first.out_features
            if r - p > (r_eq - p) * n_layers:
                raise ConfigError(
                    f"MosConfig.r={r} is too large for the {n_layers} layer(s) of type {key!r}: each layer draws "
                    f"r - private_rank = {r - p} shared vectors from a shared pool of (equivalent_rank - private_rank) * "
                    f"layers = {(r_eq - p) * n_layers}. Lower r, raise equivalent_rank, or target more layers."
                )
            rows = r_eq * n_layers * l
            pool_a = torch.empty(rows, d_in // l)
            bound = 1.0 / math.sqrt(d_in)  # Kaiming-uniform(a=sqrt(5)) with the full row length as fan-in
            pool_a.uniform_(-bound, bound, generator=seeded_generator(config.seed))
            self.pool_A[key] = nn.Parameter(pool_a)
            self.pool_B[key] = nn.Parameter(torch.zeros(rows, d_out // l))
            for block, name in enumerate(names):
                self.slot[name] = (key, block)

    def routing(self, config: "MosConfig", module_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed shard indices (A, B) of one layer: seeded by (seed, module name), independent for A and B."""
        key, block = self.slot[module_name]
        r, r_eq, p, l = config.r, config.equivalent_rank, config.private_rank, config.shards_per_vector
        n_rows = self.pool_A[key].shape[0]
        shared_rows = n_rows - p * (n_rows // (r_eq * l)) * l  # S = (R_eq - p) * L * l
        private = shared_rows + torch.arange(block * p * l, (block + 1) * p * l)
        generator = seeded_generator(config.seed * 1_000_003 + _stable_hash(module_name))
        indices = []
        for _ in range(2):  # pair dissociation: A and B draw their shared subsets independently
            shared = torch.randperm(shared_rows, generator=generator)[: (r - p) * l]
            indices.append(torch.cat([shared, private]))
        return indices[0], indices[1]


def _stable_hash(text: str) -> int:
    value = 0
    for ch in text.encode():
        value = (value * 131 + ch) % 2_147_483_647
    return value


class MosAdapter(Adapter):
    def __init__(self, config: "MosConfig", layer, module_name: str, shared: MosPools = None):
        super().__init__(config, layer, module_name, shared)
        self.r = config.r
        self.l = config.shards_per_vector
        self.scaling = config.lora_alpha / config.r
        self.pool_key = shared.slot[module_name][0]
        self.in_features, self.out_features = layer.in_features, layer.out_features
        idx_a, idx_b = shared.routing(config, module_name)
        self.register_buffer("index_A", idx_a)  # saved: the routing is part of the adapter
        self.register_buffer("index_B", idx_b)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    @classmethod
    def build_shared(cls, config: "MosConfig", layers: dict) -> MosPools:
        return MosPools(config, layers)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.shared.pool_A[self.pool_key].dtype

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's LoRA factors (A: r x in, B: out x r), gathered from the shared pools."""
        a = self.shared.pool_A[self.pool_key][self.index_A].reshape(self.r, self.in_features)
        b = self.shared.pool_B[self.pool_key][self.index_B].reshape(self.r, self.out_features).T
        return a, b

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return b @ a * self.scaling

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        a, b = self.factors()
        return base_out + F.linear(F.linear(self.dropout(x), a), b) * self.scaling


@register("mos", adapter=MosAdapter, family="shared pool", paper="2410.00938")
@dataclasses.dataclass
class MosConfig(AdapterConfig):
    """MoS. Not in PEFT: files are `RANKWISE_MOS` (pools once + per-layer indices); `export_lora` gives plain LoRA.

    r: active rank of every layer (`lora_r`), >= 1.
    equivalent_rank: the pools hold as many parameters as a LoRA of this rank (`valid_param_lora_r`), >= 1.
    private_rank: rank vectors private to each layer (`valid_param_private_r`), 0 <= p <= equivalent_rank, p <= r;
        p == equivalent_rank requires r == equivalent_rank (pure private = plain LoRA).
    shards_per_vector: shards a rank vector is cut into (`num_chunk_per_vec`); must divide every in and out size.
    lora_alpha: scale numerator; the update is multiplied by lora_alpha / r.
    lora_dropout: dropout on the adapter input, in [0, 1).
    seed: seeds the pool init and the routing indices (indices are also saved with the adapter).
    Defaults follow the reference debug configuration (r=16, R_eq=4, p=2, l=4) except r=8.
    """

    r: int = 8
    equivalent_rank: int = 4
    private_rank: int = 2
    shards_per_vector: int = 4
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    seed: int = 0

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)

    def validate(self) -> None:
        super().validate()
        for field in ("r", "equivalent_rank", "shards_per_vector"):
            value = getattr(self, field)
            self._check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, field, "an integer >= 1")
        p = self.private_rank
        self._check(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= min(self.equivalent_rank, self.r),
                    "private_rank", f"an integer in [0, min(equivalent_rank, r)] = [0, {min(self.equivalent_rank, self.r)}]")
        if p == self.equivalent_rank:
            self._check(self.r == self.equivalent_rank, "r",
                        f"equal to equivalent_rank={self.equivalent_rank} when private_rank == equivalent_rank (pure private)")
        self._check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", "a number > 0")
        self._check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)")
        self._check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed", "an integer >= 0")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        shape = base_layer.weight.shape
        for size in shape[:2]:  # in and out, whichever layout (Linear or GPT-2 Conv1D)
            if size % self.shards_per_vector:
                raise ConfigError(
                    f"MosConfig.shards_per_vector={self.shards_per_vector} does not divide the size {size} of "
                    f"{module_name!r} (weight {tuple(shape)}): pick a divisor of every in/out size, or exclude it."
                )


def export_lora(model, adapter_name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each MoS layer as plain LoRA factors {module: (A, B)} with delta_weight = (lora_alpha / r) * B @ A."""
    with torch.no_grad():
        return {name: tuple(t.clone() for t in layer.adapters[adapter_name].factors())
                for name, layer in model.adapted_layers() if isinstance(layer.adapters[adapter_name], MosAdapter)}
