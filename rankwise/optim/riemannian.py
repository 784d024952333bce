"""Riemannian-preconditioned AdamW for LoRA factors (Zhang & Pilanci, ICML 2024, arXiv 2402.02347).

A drop-in `torch.optim.AdamW` that, before each step, rescales the gradients of every LoRA pair by the inverse
Gram matrix of the *other* factor (the scaled-gradient / Riemannian metric of the fixed-rank manifold). With
`delta_weight = B A` (B: out x r, A: r x in)::

    grad_A <- (B^T B + delta I_r)^-1 grad_A          (r x r)^-1 (r x in)
    grad_B <- grad_B (A A^T + delta I_r)^-1          (out x r) (r x r)^-1

then AdamW (decoupled decay, bias-corrected moments) on the preconditioned gradients: Zhang & Pilanci's
"scaled AdamW" (their Algorithm 2; their X = B, Y = A^T), which Break-for-Make (arXiv 2403.19456, journal version
"B4M", ACM TOG 2025) uses in its second stage "to adaptively balance content and style learning"; its code
(`AdamWr`) defaults to delta = 0 and uses the identity while a Gram matrix has norm <= 1e-6 (a factor still at
its zero init), as here.

A pair may hold only part of a factor as the trainable tensor (B4M trains the columns `A[:, h:]` and rows
`B[h:, :]`): left-multiplying `grad_A` acts column by column and right-multiplying `grad_B` row by row, so the
preconditioner of the full factors restricted to the trainable block is exact; `full_factors` then returns the
whole (A, B) for the Gram matrices. Zero rows/columns of a gradient stay zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from rankwise.core.errors import ConfigError, check_field

IDENTITY_BELOW = 1e-6  # the reference's threshold on ||Gram|| for "factor not yet trained": no preconditioning


@dataclass
class LoraFactorPair:
    """One LoRA pair: `a` (the trainable part of A, r x k) and `b` (of B, k' x r) as optimised tensors;
    `full_factors()` returns the complete (A: r x in, B: out x r) when `a`/`b` are blocks of them."""

    a: torch.Tensor
    b: torch.Tensor
    full_factors: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full_factors() if self.full_factors is not None else (self.a, self.b)


def _inverse_gram_apply(gram: torch.Tensor, grad: torch.Tensor, delta: float, left: bool) -> torch.Tensor:
    """(gram + delta I)^-1 grad (left) or grad (gram + delta I)^-1 (right), in float32 or better."""
    if float(gram.norm()) <= IDENTITY_BELOW:
        return grad
    work = torch.promote_types(gram.dtype, torch.float32)
    system = gram.to(work) + delta * torch.eye(gram.shape[0], dtype=work, device=gram.device)
    rhs = grad.to(work) if left else grad.to(work).T  # grad M^-1 = (M^-1 grad^T)^T for symmetric M
    solution, info = torch.linalg.solve_ex(system, rhs)
    if int(info) != 0:  # singular Gram matrix (rank-deficient factor, delta = 0): least-norm solution
        solution = torch.linalg.pinv(system) @ rhs
    return (solution if left else solution.T).to(grad.dtype)


@torch.no_grad()
def precondition_lora_gradients(pairs: Iterable[LoraFactorPair], delta: float = 0.0) -> None:
    """Replace each pair's `.grad` by its Riemannian-preconditioned gradient, in place (Grams of the current factors)."""
    updates = []
    for pair in pairs:
        A, B = pair.factors()
        new_a = None if pair.a.grad is None else _inverse_gram_apply(B.T @ B, pair.a.grad, delta, left=True)
        new_b = None if pair.b.grad is None else _inverse_gram_apply(A @ A.T, pair.b.grad, delta, left=False)
        updates.append((pair, new_a, new_b))
    for pair, new_a, new_b in updates:  # every Gram was read before any gradient changed
        if new_a is not None:
            pair.a.grad.copy_(new_a)
        if new_b is not None:
            pair.b.grad.copy_(new_b)


class RiemannianAdamW(torch.optim.AdamW):
    """AdamW on Riemannian-preconditioned LoRA gradients (see the module docstring).

    params: as for `torch.optim.AdamW` (param groups welcome); every `a`/`b` of `pairs` must be among them.
    pairs: the LoRA pairs to precondition; other parameters get plain AdamW.
    delta: the ridge `delta` added to both Gram matrices (Zhang & Pilanci's delta; B4M's `optimizer_reg`, default 0).
    """

    def __init__(self, params, pairs: Iterable[LoraFactorPair], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, delta: float = 0.0):
        check_field(isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta) and delta >= 0,
                    "RiemannianAdamW", "delta", delta, "a finite number >= 0")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self.pairs = list(pairs)
        self.delta = float(delta)
        optimised = {id(p) for g in self.param_groups for p in g["params"]}
        for pair in self.pairs:
            for name, tensor in (("a", pair.a), ("b", pair.b)):
                if id(tensor) not in optimised:
                    raise ConfigError(f"RiemannianAdamW: pair factor {name} of shape {tuple(tensor.shape)} is not among "
                                      "the optimised params; pass the pairs' tensors in params too")
        if not self.pairs:
            raise ConfigError("RiemannianAdamW: no LoRA pairs given (pairs=[]): use torch.optim.AdamW instead")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        precondition_lora_gradients(self.pairs, self.delta)
        super().step()
        return loss


# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "riemannian-adamw", "paper": "2402.02347",
     "runs": "rankwise finetune --method b4m --option role=joint; rankwise.optim.RiemannianAdamW",
     "summary": "Riemannian-preconditioned AdamW for LoRA factor pairs (B4M's stage-2 optimizer)"},
)
