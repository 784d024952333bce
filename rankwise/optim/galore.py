"""GaLore: Gradient Low-Rank Projection (Zhao et al., ICML 2024, arXiv 2403.03507).

A drop-in `torch.optim.Optimizer`: AdamW whose moments live in a rank-r projection of each
2-D gradient, so a weight `W` (m x n, m >= n) keeps `2 m r` moment floats instead of `2 m n`::

    G (m x n) --P^T--> R = G P^T (m x r) --Adam--> N (m x r) --P--> dW = scale * N P (m x n)
                 P = top-r right singular vectors of G, refreshed every `update_proj_gap` steps

(for m < n the left singular vectors are used: `R = P^T G`, `dW = scale * P N`). The moments are
kept across projector refreshes, as in the paper's code.

Usage mirrors `galore-torch` exactly::

    groups = galore_param_groups(model, rank=128, update_proj_gap=200, scale=0.25)
    opt = GaLoreAdamW(groups, lr=1e-2)
    handle = opt.attach_to_backward()   # optional: update each layer inside backward (per-layer mode)

Groups without a `rank` key are plain AdamW. `LowRankAdamW` is the shared machinery (Adam in a
projected space, per-layer updates in post-accumulate-grad hooks, state accounting); the DCT
optimizer in `dct.py` subclasses it with an SVD-free projector.
"""
from __future__ import annotations

import functools
import math
from typing import Iterable

import torch
from torch import nn

from rankwise.core.errors import ConfigError, TargetError, check_field
from rankwise.linalg import truncated_svd

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")


class LowRankAdamW(torch.optim.Optimizer):
    """AdamW with an optional low-rank projection per param group (the group has a `rank` key).

    Subclasses define `group_defaults` (projection hyper-parameters filled into every group with a
    rank), `_check_group`, `_project(state, grad, group)` and `_add_projected_back(p, state, update, alpha)`.
    Two class flags select the Adam variant: `decay_after_update` (GaLore/HF AdamW applies the
    decoupled decay to the already-updated weight; torch AdamW and DCT-AdamW decay first) and
    `eps_bias_corrected` (DCT-AdamW uses `eps * sqrt(1 - beta2^t)`, i.e. eps on the corrected v).
    """

    group_defaults: dict = {}
    decay_after_update = True
    eps_bias_corrected = False
    name = "LowRankAdamW"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        check_field(lr >= 0.0, self.name, "lr", lr, "a float >= 0")
        check_field(len(betas) == 2 and all(0.0 <= b < 1.0 for b in betas), self.name, "betas", betas,
                    "two floats in [0, 1)")
        check_field(eps >= 0.0, self.name, "eps", eps, "a float >= 0")
        check_field(weight_decay >= 0.0, self.name, "weight_decay", weight_decay, "a float >= 0")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "correct_bias": correct_bias}
        super().__init__(params, defaults)

    # -- param groups -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if "rank" in param_group:
            for key, value in self.group_defaults.items():
                param_group.setdefault(key, value)
            rank = param_group["rank"]
            check_field(isinstance(rank, int) and rank >= 1, self.name, "rank", rank, "an int >= 1")
            self._check_group(param_group)
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            for p in params:
                if p.dim() != 2:
                    raise ConfigError(
                        f"{self.name}: a param group with rank={rank} holds a {p.dim()}-D tensor of shape "
                        f"{tuple(p.shape)}; only 2-D weights can be projected. Put biases, norms and embeddings in "
                        "a group without 'rank' (galore_param_groups(model, ...) does this for you).")
            param_group["params"] = params
        super().add_param_group(param_group)

    def _check_group(self, group: dict) -> None:  # pragma: no cover - overridden
        pass

    # -- the update -----------------------------------------------------------------------------
    def _project(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        raise NotImplementedError

    def _add_projected_back(self, p: torch.Tensor, state: dict, update: torch.Tensor, alpha: float) -> None:
        """`p += alpha * back_projection(update)`, fused (addmm_) so no m x n temporary is allocated."""
        raise NotImplementedError

    def _scale(self, group: dict) -> float:
        return 1.0

    def _is_projected(self, p: torch.Tensor, group: dict) -> bool:
        return "rank" in group

    def _projection_is_scale_free(self, group: dict) -> bool:
        """True when projecting `c G` gives `c` times the projection of `G` with the same projector (c > 0).

        Per-layer clipping (`attach_to_backward(max_grad_norm=...)`) then projects inside backward and scales
        the small projected gradient once the global norm is known; otherwise the full gradient is kept."""
        return True

    def _adam_input(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> torch.Tensor:
        """The tensor Adam's moments see: the projected gradient (refreshing the projector when due) or `grad`."""
        if grad.is_sparse:
            raise RuntimeError(f"{self.name} does not support sparse gradients")
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        if self._is_projected(p, group):
            return self._project(state, grad, group)  # uses state["step"] before the increment
        return grad

    @torch.no_grad()
    def _update_parameter(self, p: torch.Tensor, group: dict) -> None:
        self._adam_update(p, group, self._adam_input(p, group, p.grad))

    @torch.no_grad()
    def _adam_update(self, p: torch.Tensor, group: dict, grad: torch.Tensor) -> None:
        state = self.state[p]
        projected = self._is_projected(p, group)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        state["step"] += 1
        if wd > 0.0 and not self.decay_after_update:
            p.mul_(1.0 - lr * wd)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        bias_correction1 = 1.0 - beta1 ** state["step"] if group["correct_bias"] else 1.0
        bias_correction2 = 1.0 - beta2 ** state["step"] if group["correct_bias"] else 1.0
        eps = group["eps"] * math.sqrt(bias_correction2) if self.eps_bias_corrected else group["eps"]
        step_size = lr * math.sqrt(bias_correction2) / bias_correction1
        normalized = exp_avg / exp_avg_sq.sqrt().add_(eps)
        if projected:
            # scale folded into the step size and back-projection fused into the add: galore-torch
            # allocates and rescales two m x n temporaries here
            self._add_projected_back(p, state, normalized, -step_size * self._scale(group))
        else:
            p.add_(normalized, alpha=-step_size)
        if wd > 0.0 and self.decay_after_update:
            p.add_(p, alpha=-lr * wd)

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every parameter that has a gradient.

        In per-layer mode (`attach_to_backward`) the hooked parameters were already updated inside backward
        (or, with `max_grad_norm`, are updated here from their clipped, projected gradients); `step()` closes the
        accumulated step and refuses one that is incomplete."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hooks = getattr(self, "_backward_hooks", None)
        if hooks is not None:
            hooks.finish_step("step()")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and (hooks is None or p not in hooks.hooked):
                    self._update_parameter(p, group)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        hooks = getattr(self, "_backward_hooks", None)
        if hooks is not None:
            hooks.finish_step("zero_grad()")
        super().zero_grad(set_to_none=set_to_none)

    # -- per-layer mode -------------------------------------------------------------------------
    def attach_to_backward(self, accumulation_steps: int = 1, max_grad_norm: float | None = None) -> "BackwardHooks":
        """Update each parameter inside backward, as soon as its gradient is accumulated, then free it.

        Full-size gradients are then never all alive at once (GaLore's per-layer mode). Call `step()` (or
        `zero_grad()`) once per optimizer step, as usual: it marks where one step ends.

        accumulation_steps: micro-batches per optimizer step. Each parameter's gradient accumulates in `.grad`
            over that many backward passes; the update (and the projector's clock) runs once, on the last one.
            A gradient arriving for a parameter already updated in this step, or `step()` after a part of the
            micro-batches, raises `ConfigError`: a per-layer run never silently takes a different number of steps.
        max_grad_norm: clip the global gradient norm, as `torch.nn.utils.clip_grad_norm_` would before a normal
            `step()` (which cannot work here: it would find no gradients). The hooks add up the squared norms and
            keep only the projected gradient of a projected weight (the projection commutes with the scaling);
            `step()` then scales and applies every update. Regular parameters keep their full gradient until then.
            `step()` is required with it.
        Not compatible with DDP.
        """
        check_field(isinstance(accumulation_steps, int) and not isinstance(accumulation_steps, bool)
                    and accumulation_steps >= 1, self.name, "accumulation_steps", accumulation_steps, "an int >= 1")
        check_field(max_grad_norm is None or (isinstance(max_grad_norm, (int, float)) and not isinstance(max_grad_norm, bool)
                    and math.isfinite(max_grad_norm) and max_grad_norm > 0), self.name, "max_grad_norm", max_grad_norm,
                    "None or a finite number > 0")
        if getattr(self, "_backward_hooks", None) is not None:
            raise ConfigError(f"{self.name}: attach_to_backward() was already called; remove() its hooks first")
        hooks = BackwardHooks(self, accumulation_steps, max_grad_norm)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    hooks.hooked.add(p)
                    hooks.handles.append(p.register_post_accumulate_grad_hook(functools.partial(hooks.on_gradient, group)))
        self._backward_hooks = hooks
        return hooks


class BackwardHooks:
    """The per-layer mode of a `LowRankAdamW` (`attach_to_backward`); `remove()` returns it to normal stepping.

    Per optimizer step: each hooked parameter receives `accumulation_steps` gradients; on the last one it is
    updated (or, with clipping, its Adam input is stashed) and its gradient freed. `finish_step` (called by the
    optimizer's `step()`/`zero_grad()`) checks that the step was complete and, with clipping, applies the updates.
    """

    def __init__(self, optimizer: LowRankAdamW, accumulation_steps: int, max_grad_norm: float | None):
        self.optimizer, self.accumulation_steps, self.max_grad_norm = optimizer, accumulation_steps, max_grad_norm
        self.handles: list = []
        self.hooked: set = set()             # parameters updated by the hooks (tensor hash is by identity)
        self.micro_batches: dict = {}        # parameter -> gradients received in the current step
        self.updated: set = set()            # parameters whose update for the current step is done or stashed
        self.pending: list = []              # with clipping: (parameter, group, Adam input) to apply in step()
        self.squared_norm = 0.0

    def on_gradient(self, group: dict, p: torch.Tensor) -> None:
        opt = self.optimizer
        if p in self.updated:
            raise ConfigError(
                f"{opt.name} per-layer mode: a parameter of shape {tuple(p.shape)} received another gradient after its "
                f"update for this step (accumulation_steps={self.accumulation_steps}). Call optimizer.step() (or zero_grad()) "
                "once per optimizer step; to accumulate gradients over N micro-batches pass "
                "attach_to_backward(accumulation_steps=N).")
        count = self.micro_batches.get(p, 0) + 1
        if count < self.accumulation_steps:
            self.micro_batches[p] = count    # the gradient keeps accumulating in p.grad
            return
        self.micro_batches.pop(p, None)
        self.updated.add(p)
        with torch.no_grad():
            if self.max_grad_norm is None:
                opt._update_parameter(p, group)
                p.grad = None
                return
            self.squared_norm += float(p.grad.double().pow(2).sum())
            if opt._is_projected(p, group) and opt._projection_is_scale_free(group):
                self.pending.append((p, group, opt._adam_input(p, group, p.grad)))
                p.grad = None
            else:                              # kept whole until the norm is known
                self.pending.append((p, group, None))

    def finish_step(self, caller: str) -> None:
        opt = self.optimizer
        partial = {tuple(p.shape): n for p, n in self.micro_batches.items()}
        if partial:
            raise ConfigError(
                f"{opt.name} per-layer mode: {caller} after {min(partial.values())} of accumulation_steps="
                f"{self.accumulation_steps} micro-batches (parameter shapes {sorted(partial)[:3]}): an optimizer step "
                "needs all its micro-batches; match accumulation_steps to the training loop.")
        if self.pending:
            if caller != "step()":
                raise ConfigError(f"{opt.name} per-layer mode with max_grad_norm: call optimizer.step() before "
                                  f"{caller}; the clipped updates are applied in step()")
            # torch.nn.utils.clip_grad_norm_'s coefficient
            total = math.sqrt(self.squared_norm)
            coefficient = min(1.0, self.max_grad_norm / (total + 1e-6))
            with torch.no_grad():
                for p, group, adam_input in self.pending:
                    if adam_input is None:
                        adam_input = opt._adam_input(p, group, p.grad.mul_(coefficient))
                        opt._adam_update(p, group, adam_input)
                        p.grad = None
                    else:
                        opt._adam_update(p, group, adam_input.mul_(coefficient))
            self.last_total_norm = total
        self.pending, self.updated, self.squared_norm = [], set(), 0.0

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if getattr(self.optimizer, "_backward_hooks", None) is self:
            self.optimizer._backward_hooks = None


class GaLoreAdamW(LowRankAdamW):
    """GaLore's AdamW (arXiv 2403.03507): same updates as `galore_torch.GaLoreAdamW`.

    Per group with a `rank`: `update_proj_gap` (T, default 200), `scale` (alpha, default 0.25) and
    `proj_type` ('std' projects the shorter side; 'reverse_std', 'left', 'right', 'full' as in the paper's code).
    The projector is recomputed from the current raw gradient at steps 0, T, 2T, ... by an fp32 SVD.
    """

    group_defaults = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}
    name = "GaLoreAdamW"

    def _check_group(self, group: dict) -> None:
        gap, scale, proj_type = group["update_proj_gap"], group["scale"], group["proj_type"]
        check_field(isinstance(gap, int) and gap >= 1, self.name, "update_proj_gap", gap, "an int >= 1")
        check_field(isinstance(scale, (int, float)) and scale > 0, self.name, "scale", scale, "a float > 0")
        check_field(proj_type in PROJ_TYPES, self.name, "proj_type", proj_type, f"one of {PROJ_TYPES}")

    def _scale(self, group: dict) -> float:
        return float(group["scale"])

    @staticmethod
    def _side(proj_type: str, shape: torch.Size) -> str:
        tall = shape[0] >= shape[1]
        if proj_type == "std":
            return "right" if tall else "left"
        if proj_type == "reverse_std":
            return "left" if tall else "right"
        return proj_type

    def _project(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if "projector" not in state or state["step"] % group["update_proj_gap"] == 0:
            side = self._side(group["proj_type"], grad.shape)
            U, _, Vh = truncated_svd(grad, group["rank"])
            if side == "right":
                projector = Vh.to(grad.dtype)
            elif side == "left":
                projector = U.to(grad.dtype)
            else:
                projector = (U.to(grad.dtype), Vh.to(grad.dtype))
            state["projector"], state["side"] = projector, side
        projector, side = state["projector"], state["side"]
        if side == "right":
            return grad @ projector.T
        if side == "left":
            return projector.T @ grad
        return projector[0].T @ grad @ projector[1].T

    def _add_projected_back(self, p: torch.Tensor, state: dict, update: torch.Tensor, alpha: float) -> None:
        projector, side = state["projector"], state["side"]
        if side == "right":
            p.addmm_(update, projector, alpha=alpha)
        elif side == "left":
            p.addmm_(projector, update, alpha=alpha)
        else:
            p.addmm_(projector[0] @ update, projector[1], alpha=alpha)


def low_rank_param_groups(model: nn.Module, targets: Iterable[str] = ("attn", "mlp"), **projection) -> list[dict]:
    """Split a model's trainable parameters into `[{'params': regular}, {'params': projected, **projection}]`.

    Projected: the `.weight` of every `nn.Linear` whose module name contains one of `targets`
    (GaLore's rule: 'attn' or 'mlp'); everything else (embeddings, lm_head, norms, biases) is regular.
    """
    targets = tuple(targets)
    projected_ids, projected = set(), []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(t in name for t in targets) and module.weight.requires_grad:
            projected.append(module.weight)
            projected_ids.add(id(module.weight))
    if not projected:
        raise TargetError(f"no nn.Linear module name contains any of {targets}; pass targets=... naming the "
                          "attention/MLP modules of this model")
    regular = [p for p in model.parameters() if p.requires_grad and id(p) not in projected_ids]
    groups = [{"params": projected, **projection}]
    return ([{"params": regular}] if regular else []) + groups


def galore_param_groups(model: nn.Module, rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
                        proj_type: str = "std", targets: Iterable[str] = ("attn", "mlp")) -> list[dict]:
    """The param groups GaLore's pretraining script builds (see `low_rank_param_groups`)."""
    return low_rank_param_groups(model, targets, rank=rank, update_proj_gap=update_proj_gap, scale=scale,
                                 proj_type=proj_type)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of tensors held in the optimizer state (of `params` only, if given); shared tensors count once."""
    wanted = None if params is None else {id(p) for p in params}
    seen, total = set(), 0

    def visit(value):
        nonlocal total
        if isinstance(value, torch.Tensor):
            key = (value.data_ptr(), value.numel(), value.dtype)
            if key not in seen:
                seen.add(key)
                total += value.numel() * value.element_size()
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for p, state in optimizer.state.items():
        if wanted is None or id(p) in wanted:
            for value in state.values():
                visit(value)
    for value in getattr(optimizer, "shared_state", {}).values():  # e.g. DCT bases shared by all layers
        visit(value)
    return total

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "galore", "paper": "2403.03507", "runs": "rankwise pretrain --method galore; rankwise.optim.GaLoreAdamW",
     "summary": "GaLore: gradient low-rank projection (AdamW on projected gradients)"},
)
