"""`Adapter`: one adapter on one base layer.

Protocol (what a method file implements):

- `__init__(config, layer, module_name, shared)`: create parameters. `layer` is the `AdaptedLayer`
  (use `layer.kind`, `layer.weight_matrix()`, `layer.in_features`/`out_features`); `shared` is the
  object the method's `build_shared` returned for this adapter name (or None).
- `delta_weight(base_weight)`: the exact dense update in the layer's canonical layout (see
  `AdaptedLayer.weight_matrix`); reference semantics for merge, tests and analysis.
- `forward(x, base_out, layer)`: the fast path, returns the adapted output. The default adds
  `layer.apply_weight(x, delta_weight)`; override it when a factored product is cheaper.

Optional hooks: `build_shared` (tensors shared across layers, owned once by the model),
`fused_forward` (replace the base call when one adapter is active and a fused product is cheaper),
`save_key` (file key of a state entry, PEFT's spelling where PEFT has the method),
`prepare_load` (see a file's entries before they are checked and copied in: refuse or resize),
`merged_weight`/`unmerged_weight` (for updates that are not additive),
`parameter_groups` (learning-rate multipliers).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from rankwise.core.layer import AdaptedLayer


class Adapter(nn.Module):
    def __init__(self, config, layer: "AdaptedLayer", module_name: str, shared: Any = None):
        super().__init__()
        self.config = config
        self.module_name = module_name
        # Not registered as a submodule: shared tensors are owned once by the model, never copied per layer.
        self.__dict__["shared"] = shared

    @classmethod
    def build_shared(cls, config, layers: dict[str, "AdaptedLayer"]) -> nn.Module | None:
        """Tensors shared by all layers of one adapter (e.g. a MoS shard pool). Default: none."""
        return None

    @property
    def compute_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor:
        delta = self.delta_weight(layer.weight_matrix())
        return base_out + layer.apply_weight(x, delta)

    def fused_forward(self, x: torch.Tensor, layer: "AdaptedLayer") -> torch.Tensor | None:
        """Optional: the whole adapted output (base included) in one fused computation, or None.

        Called instead of the base layer + `forward` when this is the only active, unmerged adapter.
        Return None (the default) whenever the fused path is not cheaper or does not apply (dtype, dropout...).
        `x` is the layer input as given (not cast).
        """
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The canonical weight with this adapter merged in (additive by default)."""
        return weight + self.delta_weight(weight).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Inverse of `merged_weight` on a weight this adapter was merged into."""
        return weight - self.delta_weight(weight).to(weight.dtype)

    def save_key(self, local_key: str) -> str:
        """File key of a state entry (relative to the layer's module path)."""
        return local_key

    def prepare_load(self, state: dict[str, torch.Tensor], layer: "AdaptedLayer") -> None:
        """Optional: see the tensors about to be loaded into this adapter, before their keys and shapes are checked.

        `state` maps this adapter's own state keys (as in `state_dict()`) to the file's tensors; keys the file lacks
        are absent. Raise `CheckpointError` if they cannot belong to this layer, or resize the adapter to fit them
        (a rank chosen at wrap time). Called by `load_adapter` and by torch's `load_state_dict`. Default: nothing.
        """

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups with `lr_scale` multipliers; default: one group, scale 1."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr_scale": 1.0}]
