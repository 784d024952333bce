"""The federated-LoRA baselines LoRA-FAIR (arXiv 2411.14961) is compared with.

- FedIT (Zhang et al., arXiv 2305.05644): average A and B separately. Biased: B_bar A_bar != sum p_k B_k A_k.
- FFA-LoRA (Sun et al., arXiv 2403.12313): A random, shared and frozen; only B is trained and averaged.
  Exact, since sum p_k B_k A = B_bar A; half the uplink and half the trainable parameters.
- Stacking / FLoRA (Wang et al., arXiv 2409.05976): concatenate the clients' ranks,
  B_st = [B_1 .. B_K], A_st = [p_1 A_1; ..; p_K A_K], so B_st A_st = sum p_k B_k A_k exactly; the product is
  folded into the frozen weight (`<layer>.base_delta`) and every client restarts from a fresh LoRA (A random, B = 0).
"""
from __future__ import annotations

import math
import zlib

import torch

from rankwise.core.errors import ConfigError
from rankwise.federated.base import A_SUFFIX, B_SUFFIX, DELTA_SUFFIX, LoraStrategy
from rankwise.linalg import seeded_generator, stack_low_rank


class FedItStrategy(LoraStrategy):
    """FedIT (arXiv 2305.05644): FedAvg of A and of B."""

    name = "fedit"

    def aggregate_layer(self, layer, As, Bs, weights, global_state, server_round):
        return {
            layer + A_SUFFIX: sum(w * A.float() for A, w in zip(As, weights)),
            layer + B_SUFFIX: sum(w * B.float() for B, w in zip(Bs, weights)),
        }


class FfaLoraStrategy(LoraStrategy):
    """FFA-LoRA (arXiv 2403.12313): A frozen at its shared random init, B averaged."""

    name = "ffa-lora"
    trains_A = False
    keeps_pair = False

    def aggregate_layer(self, layer, As, Bs, weights, global_state, server_round):
        return {
            layer + A_SUFFIX: global_state[layer + A_SUFFIX],
            layer + B_SUFFIX: sum(w * B.float() for B, w in zip(Bs, weights)),
        }


class StackingStrategy(LoraStrategy):
    """FLoRA stacking (arXiv 2409.05976): exact aggregation by concatenating ranks, merged, then a fresh LoRA."""

    name = "stacking"
    keeps_pair = False

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.last_stack: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fresh_A(self, layer: str, shape, server_round: int) -> torch.Tensor:
        """LoRA's default A init (Kaiming-uniform, a = sqrt 5: U(-1/sqrt(in), 1/sqrt(in))), the same on every client."""
        generator = seeded_generator(self.seed * 1_000_003 + server_round * 7919 + zlib.crc32(layer.encode()))
        bound = 1.0 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=generator) * 2 - 1) * bound

    def aggregate_layer(self, layer, As, Bs, weights, global_state, server_round):
        B_st, A_st = stack_low_rank(Bs, As, weights)
        self.last_stack[layer] = (B_st, A_st)
        A_old = global_state[layer + A_SUFFIX]
        return {
            layer + DELTA_SUFFIX: global_state[layer + DELTA_SUFFIX] + self.scaling * (B_st @ A_st),
            layer + A_SUFFIX: self.fresh_A(layer, tuple(A_old.shape), server_round),
            layer + B_SUFFIX: torch.zeros_like(global_state[layer + B_SUFFIX]),
        }


def strategy_class(name: str) -> type[LoraStrategy]:
    """The strategy class registered under `name` ("lora-fair", "fedit", "ffa-lora", "stacking")."""
    from rankwise.federated.lora_fair import LoraFairStrategy

    table = {cls.name: cls for cls in (LoraFairStrategy, FedItStrategy, FfaLoraStrategy, StackingStrategy)}
    if name not in table:
        raise ConfigError(f"unknown federated strategy {name!r}: choose one of {sorted(table)}")
    return table[name]

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "fedit", "paper": "2305.05644", "runs": "rankwise federate --strategy fedit",
     "summary": "average A and B separately"},
    {"name": "ffa-lora", "paper": "2403.12313", "runs": "rankwise federate --strategy ffa-lora",
     "summary": "A frozen and shared, only B trained and averaged"},
    {"name": "stacking", "paper": "2409.05976", "runs": "rankwise federate --strategy stacking",
     "summary": "FLoRA: stack the clients' ranks, fold the exact product into W"},
)
