"""DiffoRA: a learned Differential Adaptation Matrix decides which modules keep a LoRA adapter
(Jiang, Wang & Yuan, 2025, arXiv 2502.08905). No reference code exists; the spec (methods-adapters-b.md
part B2 §3, low confidence) is a reconstruction, and docs/specs/diffora.md records what is implemented here.

    search (the first `search_steps` optimizer steps):
        y_m = W_m x + g(Gamma_m) * s B_m A_m x          g = sigmoid, Gamma = 0 at start (every gate 0.5)
        each step, before the weight step: one Adam step on Gamma from the loss on a held-out batch
        (first-order DARTS); the weight step sees the gates as constants, so Gamma moves only on held-out data
    discretise (at step `search_steps`): keep the ceil(ratio * M) modules with the largest gate, averaged
        over the last `average_last` search steps; kept modules inherit A, B with the gate folded in
        (B <- g B: the switch is function-preserving for them); dropped modules lose their adapter, their
        parameters and their optimizer state
    then: plain LoRA training of the kept modules; the saved config lists them in `target_modules`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch

from rankwise.adapters.lora import LoraAdapter
from rankwise.core.errors import ConfigError
from rankwise.train.lora_tools import lora_adapters, restore_forward, set_forward


class DiffoRA:
    def __init__(self, model, val_batches: list[Any], loss_fn: Callable, ratio: float = 0.5, search_steps: int = 100,
                 gate_lr: float = 1e-3, average_last: int = 10, adapter_name: str | None = None):
        if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise ConfigError(f"DiffoRA ratio={ratio!r} is invalid: expected a number in (0, 1] (share of modules kept)")
        if not (isinstance(search_steps, int) and search_steps >= 1):
            raise ConfigError(f"DiffoRA search_steps={search_steps!r} is invalid: expected an integer >= 1")
        if not (isinstance(gate_lr, (int, float)) and gate_lr > 0):
            raise ConfigError(f"DiffoRA gate_lr={gate_lr!r} is invalid: expected a number > 0")
        if not (isinstance(average_last, int) and average_last >= 1):
            raise ConfigError(f"DiffoRA average_last={average_last!r} is invalid: expected an integer >= 1")
        if not val_batches:
            raise ConfigError("DiffoRA needs val_batches: held-out batches carved from the training data (not the test set)")
        self.adapters = lora_adapters(model, "DiffoRA", adapter_name)
        self.model, self.adapter_name = model, adapter_name or model.active_adapters[0]
        self.val_batches, self.loss_fn = list(val_batches), loss_fn
        self.ratio, self.search_steps, self.average_last = ratio, search_steps, average_last
        self.modules = list(self.adapters)
        self.gamma = torch.nn.Parameter(torch.zeros(len(self.modules)))
        self.gate_optimizer = torch.optim.Adam([self.gamma], lr=gate_lr)
        self.gate_history: list[torch.Tensor] = []
        self.kept: list[str] | None = None
        self._gates_trainable = False
        for i, adapter in enumerate(self.adapters.values()):
            set_forward(adapter, self._gated_forward(i))

    def _gated_forward(self, index: int):
        procedure = self

        def forward(self, x, base_out, layer):
            gamma = procedure.gamma if procedure._gates_trainable else procedure.gamma.detach()
            lora = LoraAdapter.forward(self, x, torch.zeros_like(base_out), layer)
            return base_out + torch.sigmoid(gamma[index]).to(lora.dtype) * lora

        return forward

    def gates(self) -> dict[str, float]:
        return dict(zip(self.modules, torch.sigmoid(self.gamma.detach()).tolist()))

    def on_step_start(self, state) -> None:
        if self.kept is not None:
            return
        batch = self.val_batches[state.step % len(self.val_batches)]
        self._gates_trainable = True
        try:
            loss = self.loss_fn(state.model, batch)
            (grad,) = torch.autograd.grad(loss, [self.gamma])
        finally:
            self._gates_trainable = False
        self.gamma.grad = grad
        self.gate_optimizer.step()
        self.gate_optimizer.zero_grad(set_to_none=True)
        self.gate_history = (self.gate_history + [torch.sigmoid(self.gamma.detach()).clone()])[-self.average_last:]

    def on_step_end(self, state) -> None:
        if self.kept is None and state.step >= self.search_steps:
            self.discretise(state.optimizer)

    @torch.no_grad()
    def discretise(self, optimizer=None, kept: list[str] | None = None) -> list[str]:
        """Keep the top ceil(ratio * M) modules by averaged gate (or the given `kept`), fold the gate into B,
        drop the rest."""
        from rankwise.core.model import _set_submodule

        if kept is None:
            average = torch.stack(self.gate_history).mean(0) if self.gate_history else torch.sigmoid(self.gamma.detach())
            keep = max(1, math.ceil(self.ratio * len(self.modules)))
            order = sorted(range(len(self.modules)), key=lambda i: -float(average[i]))
            kept = [self.modules[i] for i in order[:keep]]
        self.kept = sorted(kept, key=self.modules.index)
        gates = torch.sigmoid(self.gamma.detach())
        layers = dict(self.model.adapted_layers())
        for i, module in enumerate(self.modules):
            adapter = self.adapters[module]
            restore_forward(adapter)
            if module in self.kept:
                adapter.lora_B.mul_(gates[i].to(adapter.lora_B.dtype))
                continue
            dropped = {id(p) for p in adapter.parameters()}
            if optimizer is not None:
                for group in optimizer.param_groups:
                    for p in [p for p in group["params"] if id(p) in dropped]:
                        optimizer.state.pop(p, None)
                    group["params"] = [p for p in group["params"] if id(p) not in dropped]
            layer = layers[module]
            del layer.adapters[self.adapter_name]
            layer.active_adapters = [n for n in layer.active_adapters if n != self.adapter_name]
            if not layer.adapters:
                _set_submodule(self.model.model, module, layer.base_layer)
        self.adapters = {m: self.adapters[m] for m in self.kept}
        config = self.model.configs[self.adapter_name]
        self.model.configs[self.adapter_name] = dataclasses.replace(config, target_modules=list(self.kept))
        return self.kept

    def state_dict(self) -> dict:
        gate_state = self.gate_optimizer.state.get(self.gamma, {})
        out = {"gamma": self.gamma.detach().clone(), "kept": self.kept,
               **{f"gate_{k}": v for k, v in gate_state.items()}}
        if self.gate_history:
            out["gate_history"] = torch.stack(self.gate_history)
        return out

    @torch.no_grad()
    def load_state_dict(self, saved: dict, train_state) -> None:
        self.gamma.copy_(saved["gamma"])
        self.gate_optimizer.state[self.gamma] = {k[5:]: v.clone() for k, v in saved.items() if k.startswith("gate_") and k != "gate_history"}
        self.gate_history = list(saved["gate_history"]) if "gate_history" in saved else []
        if saved["kept"] is not None and self.kept is None:  # the B values are overwritten by the checkpoint's
            self.discretise(train_state.optimizer, kept=saved["kept"])

    def report(self):
        from rich.table import Table

        table = Table(title=f"DiffoRA gates (kept {len(self.kept or [])} of {len(self.modules)})")
        for column in ("module", "gate", "kept"):
            table.add_column(column)
        for module, gate in self.gates().items():
            table.add_row(module, f"{gate:.4f}", "yes" if self.kept and module in self.kept else "no")
        return table
