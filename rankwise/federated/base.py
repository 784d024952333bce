"""The common part of every federated-LoRA server strategy: a Flower `FedAvg` whose aggregation is factor-aware.

State dicts exchanged with clients use three kinds of keys:

    <layer>.lora_A      r x in     the LoRA down-projection of one adapted layer
    <layer>.lora_B      out x r    the LoRA up-projection
    <layer>.base_delta  out x in   an update already folded into the frozen weight (stacking only; never uploaded)
    anything else                  other trainable tensors (e.g. the classifier head): plain FedAvg

A strategy subclass implements only `aggregate_layer` (what to do with one layer's client factors);
the p_k-weighted plumbing, the dropping of failed clients and the FedAvg of the rest live here once.

Heterogeneous client ranks (r_k <= R = the global rank): a client receives the first r_k components of the
global pair and uploads an r_k pair; here it is padded back to R before any strategy sees it:

    A_k (r_k x in)  ->  [A_k; A_global[r_k:]]      the rows it was sent and did not hold, unchanged
    B_k (out x r_k) ->  [B_k, 0]                   zero columns

so B_k,pad A_k,pad = B_k A_k exactly (the ideal update sum p_k B_k A_k is exact), and the trailing rows of A_bar are
not shrunk towards zero by the clients that lack them. With `truncation_basis=True`, strategies that keep a trained
(A, B) pair (FedIT, LoRA-FAIR) re-factor each new global pair into SVD order (`linalg.svd_ordered_factors`, same
product): the first r_k components a client slices are then the best rank-r_k approximation of the global update,
which plain slicing of an arbitrary pair is not.
"""
from __future__ import annotations

import re
from logging import INFO
from typing import ClassVar, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from rankwise.core.errors import ConfigError, ShapeError
from rankwise.linalg import svd_ordered_factors

A_SUFFIX, B_SUFFIX, DELTA_SUFFIX = ".lora_A", ".lora_B", ".base_delta"


def lora_layers(state: dict[str, torch.Tensor]) -> list[str]:
    """Layer names that carry a LoRA pair in `state` (sorted, so every process iterates alike)."""
    return sorted(k[: -len(B_SUFFIX)] for k in state if k.endswith(B_SUFFIX))


def is_factor_key(key: str) -> bool:
    return key.endswith((A_SUFFIX, B_SUFFIX, DELTA_SUFFIX))


def pad_to_rank(A: torch.Tensor | None, B: torch.Tensor, A_global: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """A client's (A_k, B_k) of rank r_k <= R padded to the global rank R (see the module docstring)."""
    r, R = B.shape[1], A_global.shape[0]
    if r > R or (A is not None and A.shape[0] != r):
        raise ShapeError(f"client LoRA pair of rank {r} (A has {None if A is None else A.shape[0]} rows) does not fit "
                         f"the global rank {R}: a client's rank must be <= the global rank")
    if r == R:
        return A, B
    B = torch.cat([B.float(), B.new_zeros(B.shape[0], R - r).float()], dim=1)
    if A is not None:
        A = torch.cat([A.float(), A_global[r:].float()], dim=0)
    return A, B


def normalise_weights(weights: Iterable[float]) -> list[float]:
    weights = [float(w) for w in weights]
    total = sum(weights)
    if not weights or total <= 0 or any(w < 0 for w in weights):
        raise ConfigError(f"client weights (num-examples) must be >= 0 with a positive sum, got {weights}")
    return [w / total for w in weights]


def short_reason(reason: str) -> str:
    """The client's own exception message out of Flower's wrapped Ray traceback."""
    found = re.findall(r"Message: (.*)", reason)
    # Flower wraps the message in the repr of its exception: drop the repr's closing quote and bracket
    return (found[-1].rstrip("'\">").strip() if found else reason.strip().splitlines()[-1] if reason.strip() else "error")[:200]


class LoraStrategy(FedAvg):
    """FedAvg on everything that is not a LoRA factor; `aggregate_layer` decides what happens to the factors.

    `scaling` is the LoRA scale s = alpha / r (needed only where a product is folded into the weight).
    Clients that crash or miss the round's timeout send no reply (or an error reply): they are dropped from
    that round and the p_k are renormalised over the clients that answered.
    """

    name: ClassVar[str] = "base"
    trains_A: ClassVar[bool] = True   # False: A stays frozen on clients and is not uploaded (FFA-LoRA)
    keeps_pair: ClassVar[bool] = True  # False: A is frozen (FFA) or restarts fresh (stacking): no SVD re-factoring

    def __init__(self, scaling: float = 1.0, truncation_basis: bool = False, **fedavg_kwargs):
        fedavg_kwargs.setdefault("fraction_evaluate", 0.0)  # accuracy is measured centrally on the server
        super().__init__(**fedavg_kwargs)
        self.scaling = float(scaling)
        self.truncation_basis = bool(truncation_basis)
        self.global_state: dict[str, torch.Tensor] = {}
        self.round_log: dict[int, dict] = {}

    def extra_log(self) -> dict[str, float]:
        """Strategy-specific numbers of the last aggregation, added to the round's history row."""
        return {}

    # ---- the maths: pure functions of tensors ---------------------------------------------------
    def aggregate_layer(self, layer: str, As, Bs, weights, global_state, server_round) -> dict[str, torch.Tensor]:
        """Return this layer's new global tensors (`<layer>.lora_A`, `.lora_B`, maybe `.base_delta`)."""
        raise NotImplementedError

    def aggregate_states(self, global_state, client_states, weights, server_round: int = 1) -> dict[str, torch.Tensor]:
        """New global state from the clients' uploads; `weights` are num-examples (normalised here)."""
        p = normalise_weights(weights)
        if len(client_states) != len(p):
            raise ShapeError(f"{len(client_states)} client states but {len(p)} weights")
        new_state: dict[str, torch.Tensor] = {}
        errors = []
        for layer in lora_layers(global_state):
            A_global = global_state[layer + A_SUFFIX]
            pairs = [pad_to_rank(s.get(layer + A_SUFFIX, A_global) if self.trains_A else None, s[layer + B_SUFFIX], A_global)
                     for s in client_states]
            As = [A for A, _ in pairs] if self.trains_A else None
            Bs = [B for _, B in pairs]
            new_state.update(self.aggregate_layer(layer, As, Bs, p, global_state, server_round))
            errors.append(self.product_error(layer, As, Bs, p, global_state, new_state))
            if self.truncation_basis and self.keeps_pair:
                B_new, A_new = svd_ordered_factors(new_state[layer + B_SUFFIX], new_state[layer + A_SUFFIX])
                new_state[layer + B_SUFFIX], new_state[layer + A_SUFFIX] = B_new, A_new
        self.last_product_error = sum(errors) / len(errors) if errors else 0.0
        for key in global_state:
            if not is_factor_key(key):
                new_state[key] = sum(w * s[key].float() for s, w in zip(client_states, p))
            elif key not in new_state:  # e.g. an unchanged base_delta
                new_state[key] = global_state[key]
        return new_state

    @torch.no_grad()
    def product_error(self, layer, As, Bs, weights, global_state, new_state) -> float:
        """||what the new global model applies - sum p_k B_k A_k||_F / ||sum p_k B_k A_k||_F for one layer.

        What the new global applies is `B A` of the broadcast factors plus whatever was folded into the frozen
        weight this round (stacking), in units of B A (the LoRA scale divided out). Zero for an exact aggregation.
        """
        A_old = global_state[layer + A_SUFFIX].double()
        target = sum(w * (B.double() @ (A.double() if As is not None else A_old)) for A, B, w in
                     zip(As if As is not None else [None] * len(Bs), Bs, weights))
        applied = new_state[layer + B_SUFFIX].double() @ new_state[layer + A_SUFFIX].double()
        if layer + DELTA_SUFFIX in new_state:
            applied = applied + (new_state[layer + DELTA_SUFFIX].double() - global_state[layer + DELTA_SUFFIX].double()) / self.scaling
        return float(torch.linalg.matrix_norm(applied - target) / torch.linalg.matrix_norm(target).clamp_min(1e-30))

    # ---- Flower plumbing ------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid) -> Iterable[Message]:
        self.global_state = arrays.to_torch_state_dict()
        config["train-A"] = self.trains_A
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, failed = self._check_and_log_replies(replies, is_train=True)
        self.round_log[server_round] = {
            "answered": len(valid),
            "failed": [short_reason(m.error.reason) for m in failed],
        }
        if not valid:
            log(INFO, "round %s: no client answered; the global model is unchanged", server_round)
            return None, None
        contents = [m.content for m in valid]
        states = [next(iter(c.array_records.values())).to_torch_state_dict() for c in contents]
        weights = [next(iter(c.metric_records.values()))[self.weighted_by_key] for c in contents]
        new_state = self.aggregate_states(self.global_state, states, weights, server_round)
        self.round_log[server_round]["product_error"] = self.last_product_error
        self.round_log[server_round].update(self.extra_log())
        return ArrayRecord({k: v.contiguous() for k, v in new_state.items()}), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
