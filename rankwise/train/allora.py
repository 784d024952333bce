"""ALLoRA: adaptive learning rate for LoRA, without dropout or scaling factor (Huang & Balestriero, 2024,
arXiv 2410.09692). Spec: /work/shared/specs/methods-adapters-b.md part B3 §1; choices in docs/specs/allora.md.

    forward:   y = x W0^T + (x A^T) B^T                    no dropout, no alpha/r
    backward:  delta~ = delta * s   (row i of the output gradient times s_i)
               dA = (delta~ B)^T X,  dB = delta~^T (X A^T),  dX = delta B A   (input gradient NOT scaled)
               s_i = 1 / sqrt(||(B A)_i||^p + 1/eta^2)     p = norm_power (1: third-party codes; 2: "inversely
                                                            proportional to the norm" of the abstract)

At init B = 0, so s = eta: eta replaces the alpha/r scale. As a row of the update grows, its learning
rate shrinks. The norms come from the r x r Gram matrix, ||(BA)_i||^2 = b_i^T (A A^T) b_i, never from
the out x in product.

Layer part and callback live here (DESIGN.md): `ALLoRA(model)` installs the backward on every LoRA layer
of the adapter; training then runs with any loop (it needs no hook). The saved adapter is a plain LoRA file
(scaling 1), readable by PEFT.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.linalg import amp_dtype, autocast_off, factored_row_norms, to_dtype
from rankwise.train.lora_tools import lora_adapters, restore_forward, set_forward


def row_scale(A: torch.Tensor, B: torch.Tensor, eta: float, norm_power: int = 1) -> torch.Tensor:
    """s_i = 1 / sqrt(||(B A)_i||^p + 1/eta^2) for every output row i, in float32 (float64 if given)."""
    norm = factored_row_norms(B, A)
    return (norm**norm_power + 1.0 / eta**2).rsqrt()


class AlloraFunction(torch.autograd.Function):
    """(x A^T) B^T whose A/B gradients see the row-scaled output gradient; the input gradient is unscaled."""

    @staticmethod
    def forward(ctx, x, A, B, eta: float, norm_power: int):
        # Under autocast the products run in its dtype, gradients come back in A's and B's (see linalg.amp_dtype).
        amp = amp_dtype(x)
        ctx.amp, ctx.x_dtype, ctx.eta, ctx.norm_power = amp, x.dtype, eta, norm_power
        with autocast_off(x):
            x = to_dtype(x, amp)
            ctx.save_for_backward(x, A, B)
            return F.linear(F.linear(x, to_dtype(A, amp)), to_dtype(B, amp))

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B = ctx.saved_tensors
        grad_x = grad_A = grad_B = None
        with autocast_off(x):
            grad_out = to_dtype(grad_out, x.dtype)
            a, b = to_dtype(A, ctx.amp), to_dtype(B, ctx.amp)
            if ctx.needs_input_grad[0]:
                grad_x = ((grad_out @ b) @ a).to(ctx.x_dtype)
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                scale = row_scale(A, B, ctx.eta, ctx.norm_power)  # from the fp32 masters
                scaled = (grad_out * scale.to(grad_out.dtype)).reshape(-1, B.shape[0])
                flat_x = x.reshape(-1, A.shape[1])
                grad_A = ((scaled @ b).T @ flat_x).to(A.dtype)
                grad_B = (scaled.T @ (flat_x @ a.T)).to(B.dtype)
        return grad_x, grad_A, grad_B, None, None


class ALLoRA:
    """Install ALLoRA on the LoRA adapter `adapter_name` of `model` (default: the active one).

    The adapter must have no dropout and scaling 1 (`LoraConfig(lora_alpha=r, lora_dropout=0)`; the
    defaults r=8, lora_alpha=8 qualify). eta > 0 is the initial effective scale (default 2, the third-party
    default); norm_power 1 or 2 (see the module docstring).
    """

    def __init__(self, model, eta: float = 2.0, norm_power: int = 1, adapter_name: str | None = None):
        if not (isinstance(eta, (int, float)) and eta > 0):
            raise ConfigError(f"ALLoRA eta={eta!r} is invalid: expected a number > 0 (the initial scale, e.g. 2)")
        if norm_power not in (1, 2):
            raise ConfigError(f"ALLoRA norm_power={norm_power!r} is invalid: expected 1 or 2")
        self.eta, self.norm_power = float(eta), norm_power
        self.adapters = lora_adapters(model, "ALLoRA", adapter_name)
        for module, adapter in self.adapters.items():
            if adapter.scaling != 1.0 or not isinstance(adapter.dropout, nn.Identity):
                raise ConfigError(
                    f"ALLoRA removes LoRA's scaling and dropout, but {module!r} has scaling {adapter.scaling:g} and "
                    f"dropout {adapter.dropout}: use LoraConfig(lora_alpha=r, lora_dropout=0.0, use_rslora=False)")
        eta_, power = self.eta, self.norm_power

        def forward(self, x, base_out, layer):
            return base_out + AlloraFunction.apply(x, self.lora_A, self.lora_B, eta_, power)

        for adapter in self.adapters.values():
            set_forward(adapter, forward)

    def row_scales(self) -> dict[str, torch.Tensor]:
        """Each layer's current per-row learning-rate factor s (length out)."""
        return {m: row_scale(a.lora_A, a.lora_B, self.eta, self.norm_power) for m, a in self.adapters.items()}

    def remove(self) -> None:
        """Back to plain LoRA training (the weights are kept)."""
        for adapter in self.adapters.values():
            restore_forward(adapter)
