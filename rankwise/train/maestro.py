"""Maestro: trainable low-rank layers with ordered dropout and progressive shrinking (Horváth, Laskaridis,
Rajput & Wang, ICML 2024, arXiv 2308.14929). Spec: methods-adapters-b.md part B2 §4 (official code
SamuelHorvath/Maestro-LoD); what differs here: docs/specs/maestro.md.

Applied to LoRA's update (the spec's adaptation for adapters on a frozen W): dW = s U V^T with U = B
(out x r, column i = component i) and V^T = A (r x in). With `init_lora_weights="pissa"` the components
start as W's principal singular triplets, as Maestro's SVD init does for the dense layer.

    ordered dropout ("per_layer" sampler): each step, one (layer, width j) pair from a reshuffled cycle over
        all pairs; that layer runs with its first j components, every other layer at full width
    loss += gp_lambda * sum_layers sum_i ( ||A[i:]||_F + ||B[:, i:]||_F )      hierarchical group lasso on tails
    every `shrink_every` steps after `init_warmup`: importance_i = ||A[i:]||_F * ||B[:, i:]||_F (non-increasing
        in i), keep the prefix with importance >= threshold (at least `min_rank`), physically slice A, B and
        their Adam moments; the scaling is kept, so the kept prefix's update is unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rankwise.core.errors import ConfigError
from rankwise.train.lora_tools import (lora_adapters, plot_ranks, rank_table, record_ranks, resize_lora,
                                       restore_forward, set_forward)

EPS = 1e-12  # inside the tail-norm square roots: a zero tail would have an infinite (NaN) gradient


def tail_norms(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||A[i:]||_F, ||B[:, i:]||_F) for every component i, differentiable and finite at zero."""
    tail_a = torch.flip(torch.cumsum(torch.flip(A.pow(2).sum(1), [0]), 0), [0])
    tail_b = torch.flip(torch.cumsum(torch.flip(B.pow(2).sum(0), [0]), 0), [0])
    return (tail_a + EPS).sqrt(), (tail_b + EPS).sqrt()


def importance(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    tail_a, tail_b = tail_norms(A.detach(), B.detach())
    return tail_a * tail_b


class Maestro:
    def __init__(self, model, gp_lambda: float = 1e-6, threshold: float = 1e-5, shrink_every: int = 100,
                 init_warmup: int = 0, min_rank: int = 1, ordered_dropout: bool = True, adapter_name: str | None = None):
        checks = [
            (isinstance(gp_lambda, (int, float)) and gp_lambda >= 0, "gp_lambda", "a number >= 0 (1e-6 in the scripts)"),
            (isinstance(threshold, (int, float)) and threshold >= 0, "threshold", "a number >= 0 (1e-5 in the code)"),
            (isinstance(shrink_every, int) and shrink_every >= 1, "shrink_every", "an integer >= 1 (optimizer steps)"),
            (isinstance(init_warmup, int) and init_warmup >= 0, "init_warmup", "an integer >= 0"),
            (isinstance(min_rank, int) and min_rank >= 1, "min_rank", "an integer >= 1 (a LoRA layer keeps one component)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"Maestro {name}={locals()[name]!r} is invalid: expected {allowed}")
        self.adapters = lora_adapters(model, "Maestro", adapter_name)
        self.model, self.adapter_name = model, adapter_name or model.active_adapters[0]
        self.gp_lambda, self.threshold, self.shrink_every = gp_lambda, threshold, shrink_every
        self.init_warmup, self.min_rank, self.ordered_dropout = init_warmup, min_rank, ordered_dropout
        self.cycle: list[tuple[str, int]] = []
        self.width: dict[str, int] = {}  # this step's truncated layer and width
        self.rank_history = [{"step": 0, **self.ranks()}]
        for module, adapter in self.adapters.items():
            set_forward(adapter, self._truncated_forward(module))

    def _truncated_forward(self, module: str):
        procedure = self

        def forward(self, x, base_out, layer):
            j = procedure.width.get(module) if self.training else None
            if j is None:
                return type(self).forward(self, x, base_out, layer)
            hidden = F.linear(self.dropout(x), self.lora_A[:j])
            return base_out + F.linear(hidden, self.lora_B[:, :j]) * self.scaling

        return forward

    def ranks(self) -> dict[str, int]:
        return {m: int(a.r) for m, a in self.adapters.items()}

    def next_pair(self) -> tuple[str, int]:
        """The next (layer, width) of a reshuffled full cycle over every layer's widths 1..r."""
        if not self.cycle:
            pairs = [(m, j) for m, a in self.adapters.items() for j in range(1, a.r + 1)]
            self.cycle = [pairs[i] for i in torch.randperm(len(pairs)).tolist()]
        return self.cycle.pop()

    def group_lasso(self) -> torch.Tensor:
        terms = [sum(t.sum() for t in tail_norms(a.lora_A, a.lora_B)) for a in self.adapters.values()]
        return self.gp_lambda * torch.stack(terms).sum()

    def on_step_start(self, state) -> None:
        self.width = dict([self.next_pair()]) if self.ordered_dropout else {}
        if self.gp_lambda > 0:
            self.group_lasso().backward()

    def on_step_end(self, state) -> None:
        self.width = {}
        if state.step > self.init_warmup and state.step % self.shrink_every == 0:
            self.shrink(state.optimizer)
            self.rank_history.append({"step": state.step, **self.ranks()})

    @torch.no_grad()
    def shrink(self, optimizer=None) -> dict[str, int]:
        """Keep each layer's prefix of components with importance >= threshold; returns the new ranks."""
        for adapter in self.adapters.values():
            keep = max(self.min_rank, int((importance(adapter.lora_A, adapter.lora_B) >= self.threshold).sum()))
            if keep < adapter.r:
                resize_lora(adapter, keep=torch.arange(keep), optimizer=optimizer)
        self.cycle = []  # the sampler is rebuilt over the new widths
        record_ranks(self.model, self.adapters, self.adapter_name)
        return self.ranks()

    def state_dict(self) -> dict:
        return {"ranks": self.ranks(), "cycle": self.cycle, "rank_history": self.rank_history}

    def load_state_dict(self, saved: dict, train_state) -> None:
        for m, r in saved["ranks"].items():
            if r < self.adapters[m].r:  # shrink to the checkpoint's rank; the values come from the checkpoint
                resize_lora(self.adapters[m], keep=torch.arange(r), optimizer=train_state.optimizer)
        self.cycle = [tuple(pair) for pair in saved["cycle"]]
        self.rank_history = saved["rank_history"]
        record_ranks(self.model, self.adapters, self.adapter_name)

    def remove(self) -> None:
        for adapter in self.adapters.values():
            restore_forward(adapter)

    def report(self, png: str | Path | None = None):
        if png is not None:
            plot_ranks(self.rank_history, png, "Maestro: rank over training")
        return rank_table(self.ranks(), "Maestro: ranks discovered per layer")
