"""ALLoRA: adaptive learning rate for LoRA, without dropout or scaling factor (Huang & Balestriero, 2024,
arXiv 2410.09692). Spec: /work/shared/specs/methods-adapters-b.md part B3 §1; choices in docs/specs/allora.md.

    forward:   y = x W0^T + (x A^T) B^T                    no dropout, no alpha/r
    backward:  delta~ = delta * s   (row i of the output gradient times s_i)
               dA = (delta~ B)^T X,  dB = delta~^T (X A^T),  dX = delta B A   (input gradient NOT scaled)
               s_i = 1 / sqrt(||(B A)_i||^p + 1/eta^2)     p = norm_power, default 2 (see below)

The exponent. The paper's text (abstract; the definition is in its §4.2, which third-party code (a) of the spec
follows) scales the gradients "with a coefficient inversely proportional to parameters' l2 norm": s_i = (||(BA)_i||_2^2 + 1/eta^2)^(-1/2), which is ~ 1/||(BA)_i|| once the
row has moved (p = 2) and eta at B = 0. The two third-party codes the spec read put the unsquared norm under the
root (p = 1), whose coefficient decays like ||.||^(-1/2): not "inversely proportional". Default p = 2; p = 1 is
kept for runs started before the change (rankwise <= this change used p = 1: a checkpoint that does not record
`norm_power` resumes only with norm_power=1, see `load_state_dict`).

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
from rankwise.linalg import amp_backward, amp_forward, factored_row_norms, to_dtype
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
        ctx.x_dtype, ctx.eta, ctx.norm_power = x.dtype, eta, norm_power
        with amp_forward(ctx, x) as (x, amp):
            ctx.save_for_backward(x, A, B)
            return F.linear(F.linear(x, to_dtype(A, amp)), to_dtype(B, amp))

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B = ctx.saved_tensors
        grad_x = grad_A = grad_B = None
        with amp_backward(grad_out, x) as grad_out:
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
    default); norm_power 2 (the paper's "inversely proportional to the l2 norm", default) or 1 (the third-party
    codes, and rankwise's default before; see the module docstring).
    """

    LEGACY_NORM_POWER = 1  # what a checkpoint written before `norm_power` was recorded trained with

    def __init__(self, model, eta: float = 2.0, norm_power: int = 2, adapter_name: str | None = None):
        if not (isinstance(eta, (int, float)) and eta > 0):
            raise ConfigError(f"ALLoRA eta={eta!r} is invalid: expected a number > 0 (the initial scale, e.g. 2)")
        if isinstance(norm_power, bool) or norm_power not in (1, 2):
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

    def settings(self) -> dict:
        """What the run trained with (written into the run summary and every checkpoint)."""
        return {"eta": self.eta, "norm_power": self.norm_power}

    def state_dict(self) -> dict:
        return self.settings()

    def load_state_dict(self, saved: dict, train_state) -> None:
        from rankwise.core.errors import CheckpointError

        saved_power = saved.get("norm_power", self.LEGACY_NORM_POWER)
        if saved_power != self.norm_power:
            origin = "records" if "norm_power" in saved else "predates the recorded exponent, so it trained with"
            raise CheckpointError(
                f"this ALLoRA checkpoint {origin} norm_power={saved_power}, this run has norm_power={self.norm_power}: "
                f"resume with -p norm_power={saved_power} (ALLoRA(model, norm_power={saved_power})), or start a new run")

    def remove(self) -> None:
        """Back to plain LoRA training (the weights are kept)."""
        for adapter in self.adapters.values():
            restore_forward(adapter)
