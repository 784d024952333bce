"""`AdaptedLayer`: wraps one base layer and its named adapters.

Implemented once for every method: active-adapter selection, enable/disable, merge/unmerge
(safe merge checks finiteness), and per-sample routing.

Canonical weight layout handed to adapters (`weight_matrix()`), "out x in" wherever there is a matrix:

    kind        base layer                 canonical weight       native weight
    linear      nn.Linear                  W            (out, in)  same
    linear      transformers Conv1D        W.T          (out, in)  (in, out)
    conv        nn.Conv1d/2d/3d            W (out, in/g, *k)       same
    embedding   nn.Embedding               W.T  (dim, num_emb)     (num_emb, dim)

A quantized base (`rankwise.quant.QuantizedLinear`, a frozen torchao int8/int4 weight) is wrapped like any
linear: `weight_matrix()` hands adapters the dequantized weight (a transient dense copy), the fused
base-plus-update paths are skipped (they would keep that dense copy alive until backward, i.e. the memory of
an fp32 base), and a merge swaps in a dense `nn.Linear` holding W + dW (unmerge puts the quantized one back).
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import AdapterStateError, MergeError, TargetError
from rankwise.quant import QuantizedLinear, is_quantized, quantize_weight

try:  # GPT-2 style layers store weights as (in, out)
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep core importable without it
    _HFConv1D = None

BASE_MODEL_SENTINEL = "__base__"


def layer_kind(module: nn.Module) -> str | None:
    """The adapter-facing kind of a base layer, or None if rankwise cannot wrap it."""
    if isinstance(module, nn.Linear) or (_HFConv1D is not None and isinstance(module, _HFConv1D)):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return None


def _prepare_adapters(layer: "AdaptedLayer", state_dict: dict, prefix: str, *args, **kwargs) -> None:
    for name, adapter in layer.adapters.items():
        inner = f"{prefix}adapters.{name}."
        adapter.prepare_load({key: state_dict[inner + key] for key in adapter.state_dict() if inner + key in state_dict}, layer)


class AdaptedLayer(nn.Module):
    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TargetError(f"cannot wrap {type(base_layer).__name__}: supported are Linear, Conv1D, Conv1d/2d/3d, Embedding")
        self.base_layer = base_layer
        self.kind = kind
        self.transposed = _HFConv1D is not None and isinstance(base_layer, _HFConv1D)
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.routing: list[str] | None = None  # per-sample adapter names, set by the model for one call
        self.quantized_base: QuantizedLinear | None = None  # the quantized base while a merge replaced it by a dense one
        # torch's load_state_dict runs a module's pre-hooks before it loads the children, so the adapters see
        # their entries (`Adapter.prepare_load`) before torch checks shapes, as with `load_adapter`.
        self.register_load_state_dict_pre_hook(_prepare_adapters)

    # ---- geometry -----------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def in_features(self) -> int:
        shape = self.weight_shape
        return shape[1] if self.kind != "conv" else math.prod(shape[1:])

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the canonical weight (no dequantization)."""
        shape = tuple(self.base_layer.weight.shape)
        return shape[::-1] if self.transposed or self.kind == "embedding" else shape

    @property
    def is_quantized(self) -> bool:
        """True when the base weight is a quantized tensor (see `rankwise.quant`)."""
        return is_quantized(self.base_layer.weight)

    def weight_matrix(self) -> torch.Tensor:
        """The base weight in canonical layout: a view, no copy; for a quantized base a dequantized dense copy."""
        w = self.base_layer.weight
        if is_quantized(w):
            return w.dequantize()  # quantize_base only quantizes nn.Linear: already (out, in)
        if self.transposed or self.kind == "embedding":
            return w.T
        return w

    @torch.no_grad()
    def set_weight_matrix(self, canonical: torch.Tensor) -> None:
        """Overwrite the base weight (canonical layout), re-quantizing with the layer's scheme if it is quantized."""
        base = self.base_layer
        if isinstance(base, QuantizedLinear) and is_quantized(base.weight):
            base.weight = nn.Parameter(
                quantize_weight(canonical.to(base.weight.dtype), base.scheme, base.group_size), requires_grad=False
            )
            return
        base.weight.copy_(self.to_native(canonical).to(base.weight.dtype))

    def to_native(self, canonical: torch.Tensor) -> torch.Tensor:
        if self.transposed or self.kind == "embedding":
            return canonical.T
        return canonical

    def apply_weight(self, x: torch.Tensor, canonical_weight: torch.Tensor) -> torch.Tensor:
        """The base layer's operation with another weight and no bias (x is already in the right dtype)."""
        if self.kind == "linear":
            return F.linear(x, canonical_weight)
        if self.kind == "embedding":
            b = self.base_layer
            return F.embedding(x, canonical_weight.T, b.padding_idx, b.max_norm, b.norm_type, b.scale_grad_by_freq, b.sparse)
        return self.conv(x, canonical_weight)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        """The base conv's operation (stride, padding, dilation) with another kernel."""
        b = self.base_layer
        if b.padding_mode != "zeros":
            raise TargetError(f"conv padding_mode={b.padding_mode!r} is not supported by adapters (use 'zeros')")
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[weight.dim()]
        return conv(x, weight, None, b.stride, b.padding, b.dilation, b.groups if groups is None else groups)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.routing is not None:
            return self._mixed_batch_forward(x, *args, **kwargs)
        pending = [self.adapters[n] for n in self.active_adapters if n not in self.merged_adapters and n in self.adapters]
        if len(pending) == 1 and not args and not kwargs and not self.is_quantized:
            # One adapter may compute base + update in a single autograd node (it returns None to decline).
            out = pending[0].fused_forward(x, self)
            if out is not None:
                return out
        out = self.base_layer(x, *args, **kwargs)
        for adapter in pending:
            out = self._run_adapter(adapter, x, out)
        return out

    def _run_adapter(self, adapter: nn.Module, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # Adapters keep their own (usually fp32) dtype on a half-precision base, as PEFT's autocast does.
        dtype = adapter.compute_dtype
        x_in = x.to(dtype) if x.is_floating_point() else x
        return adapter(x_in, base_out.to(dtype), self).to(base_out.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.routing
        if self.merged_adapters:
            raise AdapterStateError("per-sample adapter_names cannot be used while adapters are merged: unmerge first")
        if len(names) != x.shape[0]:
            raise AdapterStateError(f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} samples")
        out = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(names):
            if name == BASE_MODEL_SENTINEL or name not in self.adapters:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            routed = self._run_adapter(self.adapters[name], x.index_select(0, rows), out.index_select(0, rows))
            out = out.index_copy(0, rows, routed)
        return out

    # ---- merge --------------------------------------------------------------------------------
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = adapter_names if adapter_names is not None else self.active_adapters
        for name in names:
            if name not in self.adapters:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged into {self.adapters[name].module_name}", stacklevel=3)
                continue
            if self.is_quantized:
                self._merge_into_quantized(name, safe_merge)
                continue
            weight = self.base_layer.weight
            with torch.no_grad():
                canonical = self.weight_matrix().float()
                merged = self.to_native(self.adapters[name].merged_weight(canonical))
                # Refused in every mode: NaN/inf written into the base could never be unmerged. Safe merge also
                # checks after the cast to the base dtype (an fp16 base can overflow where fp32 does not).
                self._refuse_non_finite(name, merged.to(weight.dtype) if safe_merge else merged)
                weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    def _refuse_non_finite(self, name: str, merged: torch.Tensor) -> None:
        if not torch.isfinite(merged).all():
            raise MergeError(
                f"merging adapter {name!r} into {self.adapters[name].module_name} gives non-finite weights (the adapter "
                "holds inf/NaN, or the sum overflows the base dtype); no base weight was changed. Re-train the adapter "
                "(lower the learning rate) or load an earlier checkpoint"
            )

    def check_merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Raise `MergeError` if `merge` would write non-finite weights; changes nothing.

        The model runs this on every layer before merging any, so a merge is all or nothing.
        """
        names = adapter_names if adapter_names is not None else self.active_adapters
        weight = self.base_layer.weight
        with torch.no_grad():
            for name in names:
                if name not in self.adapters or name in self.merged_adapters:
                    continue
                merged = self.adapters[name].merged_weight(self.weight_matrix().float())
                self._refuse_non_finite(name, merged.to(weight.dtype) if safe_merge else merged)

    def _merge_into_quantized(self, name: str, safe_merge: bool) -> None:
        # Re-quantizing W + dW could round the update away (PEFT #2586); a dense nn.Linear holds the exact merge.
        quantized = self.base_layer
        with torch.no_grad():
            merged = self.adapters[name].merged_weight(self.weight_matrix().float())
            self._refuse_non_finite(name, merged)
            linear = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None,
                               device=merged.device, dtype=quantized.weight.dtype)
            linear.weight.copy_(merged)
            linear.weight.requires_grad_(False)
            if quantized.bias is not None:
                linear.bias = quantized.bias
        self.__dict__["quantized_base"] = quantized  # kept aside, not a submodule (no second copy in state_dict)
        self.base_layer = linear
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.quantized_base is not None:  # merged into a quantized base: put the untouched quantized layer back
            self.base_layer = self.quantized_base
            self.__dict__["quantized_base"] = None
            self.merged_adapters.clear()
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                canonical = self.weight_matrix().float()
                weight.copy_(self.to_native(self.adapters[name].unmerged_weight(canonical)).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, adapters={list(self.adapters)}, active={self.active_adapters}, merged={self.merged_adapters}"
