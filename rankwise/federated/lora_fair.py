"""LoRA-FAIR: server-side residual correction for federated LoRA (Bian, Wang, Zhang, Xu; arXiv 2411.14961, ICCV 2025).

One round, per adapted layer, over the clients k that answered (p_k = n_k / sum n_j):

    A_bar = sum p_k A_k        B_bar = sum p_k B_k        dW = sum p_k B_k A_k   (the ideal average update)
    dB*   = argmin_dB || dW - (B_bar + dB) A_bar ||_F^2 + lam ||dB||_F^2         (ridge form; see docs/specs/lora_fair.md)
          = R A_bar^T (A_bar A_bar^T + lam I)^-1,  R = dW - B_bar A_bar
    broadcast (A_bar, B_bar + dB*): the clients start the next round from it (the "initialisation refinement").

`R A_bar^T = sum p_k B_k (A_k A_bar^T) - B_bar (A_bar A_bar^T)` needs only r x r products: dW is never formed.
With identical clients R = 0, so dB* = 0 and LoRA-FAIR is FedIT; as lam -> inf it also tends to FedIT.
"""
from __future__ import annotations

import torch

from rankwise.core.errors import ConfigError
from rankwise.federated.base import A_SUFFIX, B_SUFFIX, LoraStrategy
from rankwise.linalg import ridge_right_solve


def residual_correction(As, Bs, weights, lam: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(A_bar, B_bar, dB)` of LoRA-FAIR for one layer; the corrected up-projection is `B_bar + dB`."""
    A_bar = sum(w * A.float() for A, w in zip(As, weights))
    B_bar = sum(w * B.float() for B, w in zip(Bs, weights))
    residual_At = sum(w * (B.double() @ (A.double() @ A_bar.double().T)) for A, B, w in zip(As, Bs, weights))
    residual_At = residual_At - B_bar.double() @ (A_bar.double() @ A_bar.double().T)
    return A_bar, B_bar, ridge_right_solve(residual_At, A_bar, lam)


class LoraFairStrategy(LoraStrategy):
    """LoRA-FAIR (arXiv 2411.14961): FedIT's averages plus a ridge residual correction of B on the server."""

    name = "lora-fair"

    def __init__(self, lam: float = 0.01, **kwargs):
        if not lam >= 0:
            raise ConfigError(f"lora-fair lam={lam!r} is invalid: expected a number >= 0 (the paper uses 0.01)")
        super().__init__(**kwargs)
        self.lam = float(lam)

    def aggregate_states(self, global_state, client_states, weights, server_round: int = 1):
        self._fedit_errors: list[float] = []
        return super().aggregate_states(global_state, client_states, weights, server_round)

    def aggregate_layer(self, layer, As, Bs, weights, global_state, server_round):
        A_bar, B_bar, correction = residual_correction(As, Bs, weights, self.lam)
        self.last_correction_norm = float(correction.norm())
        # FedIT's error on the very same uploads: the paper's claim is that the correction shrinks it
        self._fedit_errors.append(self.product_error(layer, As, Bs, weights, global_state, {layer + A_SUFFIX: A_bar, layer + B_SUFFIX: B_bar}))
        return {layer + A_SUFFIX: A_bar, layer + B_SUFFIX: B_bar + correction}

    def extra_log(self) -> dict[str, float]:
        errors = getattr(self, "_fedit_errors", [])
        return {"fedit_product_error": sum(errors) / len(errors)} if errors else {}

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "lora-fair", "paper": "2411.14961", "runs": "rankwise federate --strategy lora-fair",
     "summary": "server-side residual correction of averaged LoRA factors"},
)
