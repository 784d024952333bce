"""LoRA-GGPO: gradient-guided random perturbation of LoRA weights, against double descent
(Chang, Guo, Chang & Wu, 2025, arXiv 2502.14538 **v1**; v2 of that id is a different method, LoRA-MGPO).
Spec: methods-adapters-b.md part B3 §2 (formula from kohya-ss/sd-scripts' third-party implementation);
choices in docs/specs/ggpo.md.

Per LoRA layer (W0 out x in, update s B A), one forward/backward per step, like SAM without the second pass:

    after backward (after clipping):  g_i = ||s (B dA + dB A)_i||        first-order change of the update, row i
                                      w_i = sqrt(m0^2 + ||(s B A)_i||^2)  m0 = mean row norm of W0 (<= 1000 rows)
    next training forward:            E = randn(out, in) * ((sigma w_i + beta g_i^2) c)[:, None],  c = 1/sqrt(out|in)
                                      y = x W0^T + s (x A^T) B^T + x E^T      (E carries no gradient)

No perturbation before the first update of the norms, and none in eval mode. The noise is drawn from
torch's global RNG, so a seeded run (and a resumed one) is reproducible.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankwise.adapters.lora import LoraAdapter
from rankwise.core.errors import ConfigError
from rankwise.linalg import factored_row_norms, seeded_generator
from rankwise.train.lora_tools import lora_adapters, restore_forward, set_forward


def typical_row_norm(weight: torch.Tensor, max_rows: int = 1000, seed: int = 0) -> float:
    """Mean L2 norm of up to `max_rows` rows of `weight` (out x in), picked with a seeded permutation."""
    rows = torch.randperm(weight.shape[0], generator=seeded_generator(seed))[:max_rows]
    return float(weight.detach().float()[rows].norm(dim=1).mean())


class GGPO:
    """Install LoRA-GGPO on the LoRA adapter `adapter_name` of `model`; pass the object as a loop callback.

    sigma, beta >= 0: weight- and gradient-norm coefficients (0.03 and 0.01, kohya's examples said to come
    from the paper); norm_dim "out" (kohya: c = 1/sqrt(out)) or "in" (Flat-LoRA style).
    """

    def __init__(self, model, sigma: float = 0.03, beta: float = 0.01, norm_dim: str = "out", adapter_name: str | None = None):
        for name, value in (("sigma", sigma), ("beta", beta)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"GGPO {name}={value!r} is invalid: expected a finite number >= 0 (default {0.03 if name == 'sigma' else 0.01})")
        if norm_dim not in ("out", "in"):
            raise ConfigError(f"GGPO norm_dim={norm_dim!r} is invalid: expected 'out' or 'in'")
        self.sigma, self.beta, self.norm_dim = float(sigma), float(beta), norm_dim
        self.adapters = lora_adapters(model, "LoRA-GGPO", adapter_name)
        layers = dict(model.adapted_layers())
        self.base_norm = {m: typical_row_norm(layers[m].weight_matrix()) for m in self.adapters}
        self.weight_norms: dict[str, torch.Tensor] = {}
        self.grad_norms: dict[str, torch.Tensor] = {}
        for module, adapter in self.adapters.items():
            set_forward(adapter, self._make_forward(module))

    def _make_forward(self, module: str):
        procedure = self

        def forward(self, x, base_out, layer):
            out = LoraAdapter.forward(self, x, base_out, layer)
            scale = procedure.perturbation_scale(module) if self.training else None
            if scale is None:
                return out
            with torch.no_grad():
                noise = torch.randn(scale.shape[0], x.shape[-1], dtype=x.dtype, device=x.device) * scale[:, None].to(x.dtype)
            return out + F.linear(x, noise)

        return forward

    def perturbation_scale(self, module: str) -> torch.Tensor | None:
        """Per-row std of the perturbation, (sigma w_i + beta g_i^2) c; None before the first update."""
        if module not in self.weight_norms:
            return None
        adapter = self.adapters[module]
        dim = adapter.lora_B.shape[0] if self.norm_dim == "out" else adapter.lora_A.shape[1]
        return (self.sigma * self.weight_norms[module] + self.beta * self.grad_norms[module] ** 2) / math.sqrt(dim)

    @torch.no_grad()
    def after_backward(self, state) -> None:
        for module, adapter in self.adapters.items():
            A, B, s = adapter.lora_A, adapter.lora_B, adapter.scaling
            if A.grad is None or B.grad is None:
                continue
            # G = s (B dA + dB A) = s [B, dB] [dA; A]: row norms from the 2r x 2r Gram, never out x in.
            self.grad_norms[module] = s * factored_row_norms(torch.cat([B, B.grad], 1), torch.cat([A.grad, A], 0))
            update = s * factored_row_norms(B, A)
            self.weight_norms[module] = (self.base_norm[module] ** 2 + update**2).sqrt()

    def state_dict(self) -> dict:
        out = {f"w.{m}": t for m, t in self.weight_norms.items()}
        out.update({f"g.{m}": t for m, t in self.grad_norms.items()})
        return out

    def load_state_dict(self, state: dict, train_state=None) -> None:
        self.weight_norms = {k[2:]: v for k, v in state.items() if k.startswith("w.")}
        self.grad_norms = {k[2:]: v for k, v in state.items() if k.startswith("g.")}

    def remove(self) -> None:
        for adapter in self.adapters.values():
            restore_forward(adapter)
