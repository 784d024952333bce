"""Maestro: trainable low-rank layers with ordered dropout and progressive shrinking (Horváth, Laskaridis,
Rajput & Wang, ICML 2024, arXiv 2308.14929). Spec: methods-adapters-b.md part B2 §4 (official code
SamuelHorvath/Maestro-LoD); what differs here: docs/specs/maestro.md.

Applied to LoRA's update (the spec's adaptation for adapters on a frozen W): dW = s U V^T with U = B
(out x r, column i = component i) and V^T = A (r x in). With `init_lora_weights="pissa"` the components
start as W's principal singular triplets, as Maestro's SVD init does for the dense layer.

    ordered dropout ("per_layer" sampler): each step, one (layer, width j) pair from a reshuffled cycle over
        all pairs; that layer runs with its first j components, every other layer at full width
    full-pass self-distillation (`full_pass=True`, the default, as the authors' CIFAR/MNIST script):
        loss = CE(f(x), y)  +  CE(f_sampled(x), softmax(f(x)).detach())
        the model's own call is the full pass (the task loss the loop computes); a forward hook on the model
        then runs the sampled network on the same inputs and back-propagates the distillation term at once.
        full_pass=False: the loss is the task loss of the sampled network only (the code's `--no-full-pass`)
    loss += gp_lambda * sum_layers sum_i ( ||A[i:]||_F + ||B[:, i:]||_F )      hierarchical group lasso on tails
    every `shrink_every` steps after `init_warmup`: importance_i = ||A[i:]||_F * ||B[:, i:]||_F (non-increasing
        in i), keep the prefix with importance >= threshold (at least `min_rank`), physically slice A, B and
        their Adam moments; the scaling is kept, so the kept prefix's update is unchanged.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rankwise.core.errors import CheckpointError, ConfigError
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


def output_logits(output) -> torch.Tensor | None:
    """The logits of a model call: the tensor itself, `.logits` (transformers outputs), or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def self_distillation_loss(sampled: torch.Tensor, full: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """CE(sampled, softmax(full)) averaged over rows (classes on the last dim); `labels` of a causal LM
    (B x T, -100 = ignored) keep only the positions whose next token is scored, as the LM loss does."""
    classes = full.shape[-1]
    target = full.detach().float().softmax(-1).reshape(-1, classes)
    per_row = F.cross_entropy(sampled.float().reshape(-1, classes), target, reduction="none")
    if labels is not None and full.dim() == 3 and labels.shape == full.shape[:2]:
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        keep = keep.reshape(-1)
        return per_row[keep].sum() / keep.sum().clamp(min=1)
    return per_row.mean()


class Maestro:
    """Maestro on the LoRA adapter `adapter_name` of `model`; a loop callback.

    full_pass=True (default, the authors' CIFAR/MNIST script): task loss on the full network plus the sampled
    network distilled towards the full one's softmax; False: task loss on the sampled network only (the code's
    `--no-full-pass`, and rankwise's only mode before issue 20). The full pass costs a second forward/backward.
    """

    LEGACY_FULL_PASS = False  # what a checkpoint written before `full_pass` was recorded trained with

    def __init__(self, model, gp_lambda: float = 1e-6, threshold: float = 1e-5, shrink_every: int = 100,
                 init_warmup: int = 0, min_rank: int = 1, ordered_dropout: bool = True, full_pass: bool = True,
                 adapter_name: str | None = None):
        checks = [
            (isinstance(gp_lambda, (int, float)) and gp_lambda >= 0, "gp_lambda", "a number >= 0 (1e-6 in the scripts)"),
            (isinstance(threshold, (int, float)) and threshold >= 0, "threshold", "a number >= 0 (1e-5 in the code)"),
            (isinstance(shrink_every, int) and shrink_every >= 1, "shrink_every", "an integer >= 1 (optimizer steps)"),
            (isinstance(init_warmup, int) and init_warmup >= 0, "init_warmup", "an integer >= 0"),
            (isinstance(min_rank, int) and min_rank >= 1, "min_rank", "an integer >= 1 (a LoRA layer keeps one component)"),
            (isinstance(full_pass, bool), "full_pass", "true or false"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"Maestro {name}={locals()[name]!r} is invalid: expected {allowed}")
        self.adapters = lora_adapters(model, "Maestro", adapter_name)
        self.model, self.adapter_name = model, adapter_name or model.active_adapters[0]
        self.gp_lambda, self.threshold, self.shrink_every = gp_lambda, threshold, shrink_every
        self.init_warmup, self.min_rank, self.ordered_dropout = init_warmup, min_rank, ordered_dropout
        self.full_pass = full_pass
        self.cycle: list[tuple[str, int]] = []
        self.width: dict[str, int] = {}  # the truncated layer and width of the forward running now
        self.pair: tuple[str, int] | None = None  # this step's sampled (layer, width)
        self._accum, self._in_sampled_pass = 1, False
        self.rank_history = [{"step": 0, **self.ranks()}]
        for module, adapter in self.adapters.items():
            set_forward(adapter, self._truncated_forward(module))
        self._hook = model.register_forward_hook(self._distill, with_kwargs=True) if full_pass else None

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
        self.pair = self.next_pair() if self.ordered_dropout else None
        # Full pass on: the model's call runs at full width and the hook adds the sampled pass. Off: the call itself
        # is the sampled network.
        self.width = dict([self.pair]) if self.pair is not None and not self.full_pass else {}
        config = getattr(state, "config", None)
        self._accum = config.grad_accum if config is not None else 1
        if self.gp_lambda > 0:
            self.group_lasso().backward()

    def _distill(self, module, args, kwargs, output):
        if self.pair is None or self._in_sampled_pass or not module.training or not torch.is_grad_enabled():
            return None
        full = output_logits(output)
        if full is None:
            raise ConfigError(f"Maestro's full-pass self-distillation needs logits, but the model returned "
                              f"{type(output).__name__}: pass full_pass=False (-p full_pass=false)")
        labels = kwargs.get("labels")
        sampled_kwargs = {k: v for k, v in kwargs.items() if k != "labels"}  # the sampled pass needs no task loss
        self._in_sampled_pass, self.width = True, dict([self.pair])
        try:
            sampled = output_logits(module(*args, **sampled_kwargs))
        finally:
            self._in_sampled_pass, self.width = False, {}
        # The loop divides each micro-batch's loss by grad_accum; the distillation term joins the same gradient.
        (self_distillation_loss(sampled, full, labels) / self._accum).backward()
        return None

    def on_step_end(self, state) -> None:
        self.width, self.pair = {}, None
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

    def settings(self) -> dict:
        return {"full_pass": self.full_pass, "gp_lambda": self.gp_lambda, "threshold": self.threshold}

    def state_dict(self) -> dict:
        return {"ranks": self.ranks(), "cycle": self.cycle, "rank_history": self.rank_history, "full_pass": self.full_pass}

    def load_state_dict(self, saved: dict, train_state) -> None:
        saved_full = saved.get("full_pass", self.LEGACY_FULL_PASS)
        if saved_full != self.full_pass:
            origin = "records" if "full_pass" in saved else "predates the full pass, so it trained with"
            raise CheckpointError(f"this Maestro checkpoint {origin} full_pass={saved_full}, this run has "
                                  f"full_pass={self.full_pass}: resume with -p full_pass={str(saved_full).lower()}, or start a new run")
        for m, r in saved["ranks"].items():
            if r < self.adapters[m].r:  # shrink to the checkpoint's rank; the values come from the checkpoint
                resize_lora(self.adapters[m], keep=torch.arange(r), optimizer=train_state.optimizer)
        self.cycle = [tuple(pair) for pair in saved["cycle"]]
        self.rank_history = saved["rank_history"]
        record_ranks(self.model, self.adapters, self.adapter_name)

    def remove(self) -> None:
        for adapter in self.adapters.values():
            restore_forward(adapter)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def report(self, png: str | Path | None = None):
        if png is not None:
            plot_ranks(self.rank_history, png, "Maestro: rank over training")
        return rank_table(self.ranks(), "Maestro: ranks discovered per layer")
