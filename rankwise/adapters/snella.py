"""SNELLA: SNELL with a mixed distance/softmax kernel and bi-level sparsity allocation
(Shen et al., arXiv 2510.24037 "Kernelized Sparse Fine-Tuning with Bi-level Parameter Competition for Vision Models").

    D = sum_h c_h ||In[h, i] - Out[h, o]||_2                 (in x out, as SNELL)
    K = D + alpha * softmax(D / gamma, over out) + beta      (alpha = 1, gamma = 1, beta = 0 at init; trainable)
    K_s = K * |K|.detach() * 1[|K| > quantile(|K|, s_l)]     (competition inside a layer, as SNELL; also at s_l = 0,
                                                              as the reference's SNELLA.sparsify: `dense_competition`)

    x ── W ───────────────────────┐
    └── dropout ── @ K_s ─────────┴─(+)── y          delta_weight = K_s^T

Bi-level competition: inside a layer, entries compete by |K| (the quantile threshold); across layers,
`SnellaAllocator` splits a global non-zero budget V(t) (cubic schedule from (1 - sparsity) to (1 - target_ratio)
of all entries) by layer importance: AdaLoRA's EMA of |theta * grad| times its uncertainty, averaged over each
layer's factors. Each layer's sparsity s_l is a saved buffer, so an allocated adapter reloads exactly.

The allocation is part of training SNELLA: `SnellaTraining`, the callback `SnellaConfig.training_callbacks`
brings, runs it in every `rankwise.train.loop.train` / `rankwise finetune` run. The reference allocates at the
start of each of its 100 epochs (`alloc_epoch` = `epochs` = 100) and updates the importance after every step;
here the run is cut into `allocation_rounds` (default 100) rounds of optimizer steps, so a short run follows the
same schedule: dense (`sparsity` = 0, the reference's `init_thres`) at round 0, then a cubic decline of the
budget to (1 - `target_ratio`) = 70 % non-zeros on average, split over the layers by importance.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from rankwise.adapters.snell import SnellAdapter, SnellConfig
from rankwise.core.registry import register
from rankwise.linalg import competition_sparsify, distance_kernel


class SnellaAdapter(SnellAdapter):
    def __init__(self, config: "SnellaConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        self.alpha = nn.Parameter(torch.ones(()))
        self.gamma = nn.Parameter(torch.ones(()))
        self.beta = nn.Parameter(torch.zeros(()))
        self.register_buffer("layer_sparsity", torch.tensor(float(config.sparsity)))

    @property
    def sparsity(self) -> float:
        return float(self.layer_sparsity)

    def kernel(self, left: torch.Tensor, right: torch.Tensor, alpha=None, gamma=None, beta=None) -> torch.Tensor:
        alpha, gamma, beta = (self.alpha if alpha is None else alpha, self.gamma if gamma is None else gamma,
                              self.beta if beta is None else beta)
        distances = distance_kernel(left, right, self.coefficients)
        return distances + alpha * torch.softmax(distances / gamma, dim=1) + beta

    def initial_kernel(self) -> torch.Tensor:
        return self.kernel(self.initial_In, self.initial_Out, alpha=1.0, gamma=1.0, beta=0.0)  # the init values

    def sparsify(self, matrix: torch.Tensor) -> torch.Tensor:
        # The reference's SNELLA.sparsify runs at every sparsity, 0 included: K * |K| above quantile(|K|, s).
        return competition_sparsify(matrix, self.sparsity, self.config.competition == "magnitude",
                                    at_zero=self.config.dense_competition)


def cubic_budget(step: int, total_steps: int, v_init: float, v_target: float,
                 init_warmup: int = 0, final_warmup: int = 0) -> float:
    """AdaLoRA-style cubic schedule: V_init until init_warmup, V_target from total - final_warmup, cubic between."""
    if step <= init_warmup:
        return float(v_init)
    span = total_steps - final_warmup - init_warmup
    if step >= total_steps - final_warmup or span <= 0:
        return float(v_target)
    progress = (step - init_warmup) / span
    return float(v_target + (v_init - v_target) * (1 - progress) ** 3)


def allocate_budget(scores: list[float], caps: list[int], budget: int) -> list[int]:
    """Split `budget` non-zeros over layers in proportion to `scores`, each capped at `caps[l]`.

    What capped layers cannot take is redistributed over the others in proportion to their scores until the
    budget is spent (or every layer is full); integer remainders go to the highest-scoring open layers.
    """
    budget = min(int(budget), sum(caps))
    alloc = [0] * len(scores)
    total = sum(max(s, 0.0) for s in scores)
    weights = [max(s, 0.0) / total if total > 0 else 1.0 / len(scores) for s in scores]
    remaining = budget
    while remaining > 0:
        open_layers = [i for i in range(len(scores)) if alloc[i] < caps[i]]
        if not open_layers:
            break
        mass = sum(weights[i] for i in open_layers)
        share = {i: (weights[i] / mass if mass > 0 else 1.0 / len(open_layers)) for i in open_layers}
        given = 0
        for i in open_layers:
            add = min(math.floor(remaining * share[i]), caps[i] - alloc[i])
            alloc[i] += add
            given += add
        if given == 0:  # only integer crumbs left: one each, best score first
            for i in sorted(open_layers, key=lambda i: -share[i])[:remaining]:
                alloc[i] += 1
                given += 1
        remaining -= given
    return alloc


class SnellaAllocator:
    """The across-layer competition: importance EMAs after each backward, re-allocation of layer sparsities.

        allocator = SnellaAllocator(model, total_epochs=100)
        for epoch in range(100):
            for batch in loader:
                loss.backward(); allocator.update_importance(); optimizer.step(); ...
            allocator.allocate(epoch)
    """

    def __init__(self, model, total_epochs: int, adapter_name: str = "default"):
        self.config = model.configs[adapter_name]
        self.adapters = [layer.adapters[adapter_name] for _, layer in model.adapted_layers()
                         if isinstance(layer.adapters[adapter_name] if adapter_name in layer.adapters else None, SnellaAdapter)]
        self.total_epochs = total_epochs
        self.ema: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}
        self.caps = [a.lora_In.shape[1] * a.lora_Out.shape[1] for a in self.adapters]

    def _factors(self, adapter):
        return (adapter.lora_In, adapter.lora_Out)

    @torch.no_grad()
    def update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for adapter in self.adapters:
            for p in self._factors(adapter):
                if p.grad is None:
                    continue
                importance = torch.nan_to_num((p * p.grad).abs(), nan=0.0)
                key = id(p)
                if key not in self.ema:
                    self.ema[key] = torch.zeros_like(p)
                    self.uncertainty[key] = torch.zeros_like(p)
                self.ema[key].mul_(b1).add_((1 - b1) * importance)
                self.uncertainty[key].mul_(b2).add_((1 - b2) * (importance - self.ema[key]).abs())

    def layer_scores(self) -> list[float]:
        scores = []
        for adapter in self.adapters:
            score = 0.0
            for p in self._factors(adapter):
                if id(p) in self.ema:
                    score += float((self.ema[id(p)] * self.uncertainty[id(p)]).mean())
            scores.append(score)
        return scores

    def budget(self, epoch: int) -> float:
        v_init = sum((1 - self.config.sparsity) * cap for cap in self.caps)
        v_target = sum((1 - self.config.target_ratio) * cap for cap in self.caps)
        return cubic_budget(epoch, self.total_epochs, v_init, v_target, self.config.init_warmup, self.config.final_warmup)

    @torch.no_grad()
    def allocate(self, epoch: int) -> list[float]:
        """Set every layer's sparsity from the budget at `epoch`; returns the new sparsities."""
        alloc = allocate_budget(self.layer_scores(), self.caps, int(self.budget(epoch)))
        sparsities = []
        for adapter, n_keep, cap in zip(self.adapters, alloc, self.caps):
            sparsity = min(max(1.0 - n_keep / cap, 0.0), 1.0 - 1.0 / cap)  # keep at least one entry
            adapter.layer_sparsity.fill_(sparsity)
            sparsities.append(sparsity)
        return sparsities


class SnellaTraining:
    """SNELLA's bi-level competition during training, as a `rankwise.train.loop.Callback`:

        after each backward            importance EMAs from |theta * grad| of every layer's factors
        entering allocation round k    (k = floor(step * rounds / total_steps), k > init_warmup)
                                       every layer's sparsity <- the allocator's split of the budget V(k)

    The importance is read before the optimizer step (the reference reads it after, with the updated factors;
    the gradients are the same). Layer sparsities and the EMAs are saved in checkpoints, so a resumed run
    continues identically.
    """

    def __init__(self, model, adapter_name: str = "default"):
        self.model, self.adapter_name = model, adapter_name
        self.config = model.configs[adapter_name]
        self.method_key = ("snella", adapter_name)
        self.allocator = SnellaAllocator(model, total_epochs=self.config.allocation_rounds, adapter_name=adapter_name)
        self.round = 0  # the allocation round the sparsities were last set for
        self.history: list[dict] = []

    def round_at(self, step: int, total_steps: int) -> int:
        return min(self.config.allocation_rounds - 1, step * self.config.allocation_rounds // max(total_steps, 1))

    def on_step_start(self, state) -> None:
        current = self.round_at(state.step, state.total_steps)
        if current > self.round:
            self.round = current
            if current > self.config.init_warmup:  # the reference keeps the initial sparsity during the warm-up
                sparsities = self.allocator.allocate(current)
                self.history.append({"step": state.step, "round": current, "mean_sparsity": sum(sparsities) / len(sparsities)})

    def after_backward(self, state) -> None:
        self.allocator.update_importance()

    def _factors(self):
        for adapter in self.allocator.adapters:
            yield adapter, ("In", adapter.lora_In), ("Out", adapter.lora_Out)

    def state_dict(self) -> dict:
        out = {"round": self.round}
        for adapter, *factors in self._factors():
            out[f"layer.{adapter.module_name}.sparsity"] = adapter.layer_sparsity.detach().clone()
            for tag, p in factors:
                if id(p) in self.allocator.ema:
                    out[f"layer.{adapter.module_name}.{tag}.ema"] = self.allocator.ema[id(p)]
                    out[f"layer.{adapter.module_name}.{tag}.uncertainty"] = self.allocator.uncertainty[id(p)]
        return out

    def load_state_dict(self, data: dict, state) -> None:
        self.round = int(data["round"])
        for adapter, *factors in self._factors():
            prefix = f"layer.{adapter.module_name}."
            adapter.layer_sparsity.copy_(data[prefix + "sparsity"])
            for tag, p in factors:
                if prefix + f"{tag}.ema" in data:
                    self.allocator.ema[id(p)] = data[prefix + f"{tag}.ema"].to(p.device)
                    self.allocator.uncertainty[id(p)] = data[prefix + f"{tag}.uncertainty"].to(p.device)


@register("snella", adapter=SnellaAdapter, family="sparse (kernelised low-rank)", paper="2510.24037")
@dataclasses.dataclass
class SnellaConfig(SnellConfig):
    """SNELLA. Not in PEFT: files are `RANKWISE_SNELLA` (factors, alpha/gamma/beta, each layer's sparsity).

    Fields of `SnellConfig`, with `sparsity` the starting sparsity of every layer (reference `init_thres` = 0),
    plus:
    target_ratio: average sparsity the budget schedule ends at (reference 0.3: 70 % non-zeros), in [0, 1).
    beta1, beta2: EMA factors of importance and uncertainty (reference 0.85), in [0, 1).
    init_warmup, final_warmup: allocation rounds at the start / end with a constant budget (reference 0 epochs), >= 0.
    dense_competition: True (the reference's SNELLA): the magnitude competition runs at sparsity 0 too (K * |K|
        above the smallest |K|); False: at sparsity 0 the kernel is used as is (files written before this field
        existed, which load as False and keep their outputs).
    allocation_rounds: how many times the budget is re-allocated over a training run (>= 1; the reference
        allocates at each of its 100 epochs: 100). Training through `rankwise.train.loop.train` runs the
        allocator (`SnellaTraining`); it changes how SNELLA trains, not what a saved file computes (each
        layer's sparsity is in the file).
    """

    sparsity: float = 0.0
    target_ratio: float = 0.3
    beta1: float = 0.85
    beta2: float = 0.85
    init_warmup: int = 0
    final_warmup: int = 0
    allocation_rounds: int = 100
    dense_competition: bool = True

    init_property: ClassVar[str] = "none"  # distance kernel + alpha * softmax: non-zero at init
    legacy_file_defaults: ClassVar[dict] = {"dense_competition": False}

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.target_ratio, (int, float)) and 0 <= self.target_ratio < 1, "target_ratio", "a number in [0, 1)")
        for field in ("beta1", "beta2"):
            value = getattr(self, field)
            self._check(isinstance(value, (int, float)) and 0 <= value < 1, field, "a number in [0, 1)")
        for field in ("init_warmup", "final_warmup"):
            value = getattr(self, field)
            self._check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, field, "an integer >= 0")
        self._check_int("allocation_rounds", minimum=1)
        self._check(isinstance(self.dense_competition, bool), "dense_competition", "True or False")

    def training_callbacks(self, model, adapter_name: str) -> list:
        adapters = [layer.adapters[adapter_name] for _, layer in model.adapted_layers() if adapter_name in layer.adapters]
        trainable = any(a.lora_In.requires_grad for a in adapters if isinstance(a, SnellaAdapter))
        return [SnellaTraining(model, adapter_name)] if trainable else []
