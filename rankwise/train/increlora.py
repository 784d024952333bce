"""IncreLoRA: ranks grow module by module, by importance, under a total budget
(Zhang, Li, Chen, Jiang, Wang & Qian, 2023, arXiv 2308.12043). Spec: methods-adapters-b.md part B2 §1
(from the official code, FeiyuZhang98/IncreLoRA); what this file does differently: docs/specs/increlora.md.

Start every LoRA layer at a tiny rank (LoraConfig(r=1)); then, every `incre_interval` optimizer steps
after `init_warmup`, the `top_h` most important layers gain `incre_rank_num` ranks each, until the total
rank reaches the budget (never beyond it):

    score   = sum |dW * dL/d(dW)| / sqrt(out * in)        dW = s B A, formed explicitly while allocating
    I <- b1 I + (1 - b1) score;  U <- b2 U + (1 - b2) |score - I|;   importance = I * U
    growth: A gains Kaiming rows (from a private generator with `seed`), B gains zero columns (the update is unchanged but for the scaling);
            scaling = alpha / r_new ("current_rank", the paper's alpha/ranknum) or unchanged ("fixed")
    loss  += reg_orth_coef * mean over layers and factors of ||A A^T - I||_F, ||B^T B - I||_F

Shapes change in `on_step_end`, between optimizer steps; the optimizer keeps each tensor's Adam moments
for the old components. The config's `rank_pattern`/`alpha_pattern` always hold the current ranks, so
`model.save_adapter()` writes a LoRA file that reloads exactly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankwise.core.errors import ConfigError
from rankwise.linalg import seeded_generator
from rankwise.train.lora_tools import RankAllocator, resize_lora, restore_forward, set_forward


class IncreLoRA(RankAllocator):
    procedure = "IncreLoRA"

    def __init__(self, model, target_rank: float = 2, target_total_rank: int | None = None, init_warmup: int = 100,
                 incre_interval: int = 100, top_h: int = 3, incre_rank_num: int = 1, beta1: float = 0.85,
                 beta2: float = 0.85, reg_orth_coef: float = 0.1, scaling: str = "current_rank", seed: int | None = None,
                 adapter_name: str | None = None):
        checks = [
            (isinstance(top_h, int) and top_h >= 1, "top_h", "an integer >= 1"),
            (isinstance(incre_rank_num, int) and incre_rank_num >= 1, "incre_rank_num", "an integer >= 1"),
            (0 <= beta1 < 1, "beta1", "a number in [0, 1)"),
            (0 <= beta2 < 1, "beta2", "a number in [0, 1)"),
            (scaling in ("current_rank", "fixed"), "scaling", "'current_rank' (alpha / r) or 'fixed'"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"IncreLoRA {name}={locals()[name]!r} is invalid: expected {allowed}")
        super().__init__(model, target_rank, target_total_rank, init_warmup, incre_interval, reg_orth_coef, adapter_name)
        self.top_h, self.incre_rank_num, self.beta1, self.beta2, self.scaling = top_h, incre_rank_num, beta1, beta2, scaling
        self.alpha = {m: a.scaling * a.r for m, a in self.adapters.items()}  # alpha such that scaling = alpha / r
        # New components come from a private generator when seeded: then growth does not depend on (or disturb)
        # the loop's RNG stream, and runs in our loop and in transformers.Trainer grow the same components.
        self.generator = None if seed is None else seeded_generator(seed)
        self.score = {m: 0.0 for m in self.adapters}
        self.ipt = {m: 0.0 for m in self.adapters}
        self.unc = {m: 0.0 for m in self.adapters}
        for module, adapter in self.adapters.items():
            set_forward(adapter, self._scoring_forward(module))

    # ---- importance -----------------------------------------------------------------------------
    def _scoring_forward(self, module: str):
        procedure = self

        def forward(self, x, base_out, layer):
            delta = (self.lora_B @ self.lora_A) * self.scaling
            if delta.requires_grad:
                weight = delta.detach()
                delta.register_hook(lambda grad: procedure._store_score(module, weight, grad))
            return base_out + F.linear(self.dropout(x), delta)

        return forward

    def _store_score(self, module: str, delta: torch.Tensor, grad: torch.Tensor) -> None:
        # The hook fires once per micro-batch; like the reference code, the last micro-batch's score counts.
        if getattr(self, "_data_parallel", None) is not None:
            # this rank's gradient only: keep the signed product, averaged over the ranks in after_backward
            self._pending[module] = delta * grad
            return
        self.score[module] = float((delta * grad).abs().sum() / math.sqrt(delta.numel()))

    def on_step_start(self, state) -> None:
        self._data_parallel = getattr(state, "data_parallel", None)
        self._pending: dict[str, torch.Tensor] = {}

    def importance(self) -> dict[str, float]:
        return {m: self.ipt[m] * self.unc[m] for m in self.adapters}

    def after_backward(self, state) -> None:
        pending = getattr(self, "_pending", {})
        if pending:  # data-parallel: the score of the global gradient, the same on every rank
            state.data_parallel.average_([pending[m] for m in sorted(pending)])
            for m, product in pending.items():
                self.score[m] = float(product.abs().sum() / math.sqrt(product.numel()))
            pending.clear()
        if self.budget_left() <= 0:
            return
        for m, score in self.score.items():
            self.ipt[m] = self.beta1 * self.ipt[m] + (1 - self.beta1) * score
            self.unc[m] = self.beta2 * self.unc[m] + (1 - self.beta2) * abs(score - self.ipt[m])

    # ---- growth ---------------------------------------------------------------------------------
    def choose(self) -> dict[str, int]:
        """Layers to grow now and by how much: every layer whose importance reaches the top_h-th largest
        (ties included), most important first, each by incre_rank_num, clipped to the budget and to min(out, in)."""
        importance = self.importance()
        candidates = [m for m in self.adapters if self.adapters[m].r < self.max_rank[m]]
        if not candidates:
            return {}
        ranked = sorted(candidates, key=lambda m: -importance[m])
        threshold = importance[ranked[min(self.top_h, len(ranked)) - 1]]
        left, plan = self.budget_left(), {}
        for m in ranked:
            if importance[m] < threshold or left <= 0:
                break
            add = min(self.incre_rank_num, left, self.max_rank[m] - self.adapters[m].r)
            plan[m], left = add, left - add
        return plan

    def grow_layer(self, module: str, add: int, optimizer=None) -> None:
        adapter = self.adapters[module]
        scaling = self.alpha[module] / (adapter.r + add) if self.scaling == "current_rank" else adapter.scaling
        resize_lora(adapter, grow=add, optimizer=optimizer, scaling=scaling, generator=self.generator)

    def grow(self, plan: dict[str, int], optimizer=None) -> None:
        for m, add in plan.items():
            self.grow_layer(m, add, optimizer)

    def allocate(self, state) -> None:
        self.grow(self.choose(), state.optimizer)
        self._fast_forward_when_done()

    def _fast_forward_when_done(self) -> None:
        if self.budget_left() <= 0:  # allocation is over: back to LoRA's fast factored forward
            for adapter in self.adapters.values():
                restore_forward(adapter)

    def extra_state(self) -> dict:
        extra = {"ipt": self.ipt, "unc": self.unc, "score": self.score}
        if self.generator is not None:
            extra["generator_state"] = self.generator.get_state()
        return extra

    def load_extra_state(self, saved: dict) -> None:
        self.ipt, self.unc, self.score = dict(saved["ipt"]), dict(saved["unc"]), dict(saved["score"])
        if self.generator is not None and "generator_state" in saved:
            self.generator.set_state(saved["generator_state"])
        self._fast_forward_when_done()
