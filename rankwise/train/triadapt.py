"""TriAdaptLoRA: a growing B C A update whose core C is stored as lower + upper triangles, ranked by the
growth of its normalised Frobenius norm, grown on a linear (or exponential) threshold schedule
(Liang, Wang & Zeng, 2025, arXiv 2501.08008). Spec: methods-adapters-b.md part B2 §2 (from the first author's
PEFT fork, YaoLiang2023/DiverValue-Bench); choices in docs/specs/triadapt.md.

    dW = s B C A,   C = tril(L) + triu(U)  (R x R; the diagonal is held twice)      s = alpha / R
    growth by a ranks: A gains a rows, B a columns, L a rows, U a columns; old entries are kept
    score  = ||C||_F / R  -  (the same at the previous allocation)                  (no gradients needed)
    when:    step > init_warmup and step % incre_interval == 0 and budget left
    how many layers: k = int(left * p) ("linear") or int(left ** p) ("nonlinear"), p = progress after warm-up,
             1 <= k <= #layers; every layer scoring >= the k-th best grows by incre_rank_num (clipped to the budget)
    loss  += orth_reg_weight * mean ||A A^T - I||_F, ||B^T B - I||_F

Init (the fork's "final" variant): A, L, U ~ N(0, 0.02^2), B = 0 (dW = 0); new blocks A, B, L, U ~ N(0, 0.02^2),
or new core entries 0 with `function_preserving=True` (then growth only rescales dW by R_old / R_new, or not at
all with scaling="fixed"). `finalize()` folds C into B (B <- B C): a plain LoRA file with `rank_pattern`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.train.lora_tools import (RankAllocator, record_ranks, replace_parameter, resize_lora, restore_forward,
                                       set_forward, take_and_pad)

INIT_STD = 0.02


def core(adapter) -> torch.Tensor:
    """C = tril(L) + triu(U), the R x R core of one layer."""
    return torch.tril(adapter.tri_lower) + torch.triu(adapter.tri_upper)


def _forward(self, x, base_out, layer):
    hidden = F.linear(F.linear(self.dropout(x), self.lora_A), core(self))
    return base_out + F.linear(hidden, self.lora_B) * self.scaling


class TriAdaptLoRA(RankAllocator):
    procedure = "TriAdaptLoRA"
    field_names = {"target_rank": "reference_rank", "reg_orth_coef": "orth_reg_weight"}

    def __init__(self, model, reference_rank: float = 8, target_total_rank: int | None = None, init_warmup: int = 0,
                 incre_interval: int = 1, rank_growth: str = "linear", incre_rank_num: int | None = None,
                 orth_reg_weight: float = 0.5, function_preserving: bool = False, scaling: str = "current_rank",
                 adapter_name: str | None = None):
        if rank_growth not in ("linear", "nonlinear"):
            raise ConfigError(f"TriAdaptLoRA rank_growth={rank_growth!r} is invalid: expected 'linear' or 'nonlinear'")
        if incre_rank_num is not None and not (isinstance(incre_rank_num, int) and incre_rank_num >= 1):
            raise ConfigError(f"TriAdaptLoRA incre_rank_num={incre_rank_num!r} is invalid: expected None or an integer >= 1")
        if scaling not in ("current_rank", "fixed"):
            raise ConfigError(f"TriAdaptLoRA scaling={scaling!r} is invalid: expected 'current_rank' or 'fixed'")
        super().__init__(model, reference_rank, target_total_rank, init_warmup, incre_interval, orth_reg_weight, adapter_name)
        self.rank_growth, self.function_preserving, self.scaling = rank_growth, function_preserving, scaling
        self.incre_rank_num = incre_rank_num or max(1, int(reference_rank) // 2)
        self.alpha = {m: a.scaling * a.r for m, a in self.adapters.items()}
        with torch.no_grad():
            for adapter in self.adapters.values():
                r = adapter.r
                nn.init.normal_(adapter.lora_A, std=INIT_STD)
                nn.init.zeros_(adapter.lora_B)
                adapter.tri_lower = nn.Parameter(torch.tril(torch.randn(r, r) * INIT_STD).to(adapter.lora_A))
                adapter.tri_upper = nn.Parameter(torch.triu(torch.randn(r, r) * INIT_STD).to(adapter.lora_A))
                set_forward(adapter, _forward)
        self.previous_norm = {m: self.normalised_norm(m) for m in self.adapters}

    def normalised_norm(self, module: str) -> float:
        adapter = self.adapters[module]
        return float(torch.linalg.matrix_norm(core(adapter).detach())) / adapter.r

    def scores(self) -> dict[str, float]:
        """How much each layer's ||C||_F / R grew since the last call (which it resets)."""
        out = {}
        for m in self.adapters:
            now = self.normalised_norm(m)
            out[m], self.previous_norm[m] = now - self.previous_norm[m], now
        return out

    def layers_to_grow(self, step: int, total_steps: int) -> int:
        left = self.budget_left()
        progress = min(1.0, max(0.0, (step - self.init_warmup) / max(1, total_steps - self.init_warmup)))
        k = int(left * progress) if self.rank_growth == "linear" else int(math.exp(progress * math.log(max(left, 1))))
        return min(max(k, 1), len(self.adapters))

    def allocate(self, state) -> None:
        scores = self.scores()
        k = self.layers_to_grow(state.step, state.total_steps)
        candidates = sorted((m for m in self.adapters if self.adapters[m].r < self.max_rank[m]), key=lambda m: -scores[m])
        if not candidates:
            return
        threshold = scores[candidates[min(k, len(candidates)) - 1]]
        for m in candidates:
            if scores[m] < threshold or self.budget_left() <= 0:
                break
            self.grow_layer(m, min(self.incre_rank_num, self.budget_left(), self.max_rank[m] - self.adapters[m].r), state.optimizer)
        for m in self.adapters:  # a grown layer's norm is now divided by its new rank
            self.previous_norm[m] = self.normalised_norm(m)

    @torch.no_grad()
    def grow_layer(self, module: str, add: int, optimizer=None) -> None:
        adapter = self.adapters[module]
        r, new_r = adapter.r, adapter.r + add
        dtype = adapter.lora_A.dtype
        scaling = self.alpha[module] / new_r if self.scaling == "current_rank" else adapter.scaling
        resize_lora(adapter, grow=add, optimizer=optimizer, scaling=scaling,
                    new_A=torch.randn(add, adapter.lora_A.shape[1], dtype=dtype) * INIT_STD,
                    new_B=torch.randn(adapter.lora_B.shape[0], add, dtype=dtype) * INIT_STD)
        std = 0.0 if self.function_preserving else INIT_STD
        for attr, mask in (("tri_lower", torch.tril), ("tri_upper", torch.triu)):
            old = getattr(adapter, attr).detach()
            grown = take_and_pad(take_and_pad(old, 0, None, add), 1, None, add)
            fresh = mask(torch.randn(new_r, new_r, dtype=dtype) * std)
            new_entries = torch.ones(new_r, new_r, dtype=torch.bool)
            new_entries[:r, :r] = False
            grown = torch.where(new_entries, fresh, grown)

            def reshape(key, t):
                fill = float(t.mean()) if key == "exp_avg_sq" and t.numel() else 0.0
                return take_and_pad(take_and_pad(t, 0, None, add, fill), 1, None, add, fill)

            replace_parameter(adapter, attr, grown, optimizer, reshape)

    def extra_state(self) -> dict:
        return {"previous_norm": self.previous_norm}

    def load_extra_state(self, saved: dict) -> None:
        self.previous_norm = dict(saved["previous_norm"])

    def trainable_count(self) -> int:
        """Trainable numbers as the triangular storage holds them: sum of R (in + out) + R (R + 1)."""
        return sum(a.r * (a.lora_A.shape[1] + a.lora_B.shape[0]) + a.r * (a.r + 1) for a in self.adapters.values())

    @torch.no_grad()
    def finalize(self) -> None:
        """Fold C into B (B <- B C) and drop the core: the adapter becomes a plain LoRA, saved with its ranks."""
        for adapter in self.adapters.values():
            replace_parameter(adapter, "lora_B", adapter.lora_B @ core(adapter))
            del adapter.tri_lower, adapter.tri_upper
            restore_forward(adapter)
        record_ranks(self.model, self.adapters, self.adapter_name)
