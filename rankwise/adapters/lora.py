"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv 2106.09685), with rsLoRA scaling
(Kalajdzievski, 2023, arXiv 2312.03732) and PiSSA initialisation (Meng et al., 2024, arXiv 2404.02948).

    x ──┬──────────── W (frozen, out x in) ─────────────┐
        └─ dropout ── A (r x in) ── B (out x r) ── * s ──┴─(+)── y        s = alpha / r  (alpha / sqrt(r) with rsLoRA)

    delta_weight = s * B @ A            (conv: B[:, :, 0, 0] @ A.flatten(1), reshaped to the kernel;
                                          embedding: s * B @ A with A: r x num_embeddings, B: dim x r)

Files are PEFT's: `lora_A.weight` / `lora_B.weight` (`lora_embedding_A` / `lora_embedding_B`),
`peft_type = "LORA"`, PEFT field names (`r`, `lora_alpha`, ...), so PEFT and rankwise read each other's files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig, resolve_pattern
from rankwise.core.errors import ConfigError
from rankwise.core.registry import register
from rankwise.linalg import amp_backward, amp_forward, fusable_dtypes, to_dtype, truncated_svd

INIT_CHOICES = (True, False, "gaussian", "pissa")


class FusedLoraLinear(torch.autograd.Function):
    """y = x (W + s B A)^T + b as ONE big matmul forward and ONE big matmul backward.

    The frozen floor already pays x W^T forward and g W backward; folding s B A (out x r x in flops,
    tiny next to N x out x in) into W keeps the big matmuls at the floor's count, and only thin
    N x r products are added for the adapter gradients. Saves x, nothing else of size N.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        # Under autocast the products run in its dtype and W + s B A is summed in the adapter's (see linalg.amp_dtype).
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        with amp_forward(ctx, x) as (x, amp):
            ctx.save_for_backward(x, weight, lora_A, lora_B)
            total = to_dtype(torch.addmm(weight.to(lora_A.dtype), lora_B, lora_A, alpha=scaling), amp)
            return F.linear(x, total, to_dtype(bias, amp))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s, amp = ctx.scaling, ctx.amp
        grad_x = grad_w = grad_b = grad_A = grad_B = None
        with amp_backward(grad_out, x) as g:
            g = g.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
            A, B = to_dtype(lora_A, amp), to_dtype(lora_B, amp)
            if ctx.needs_input_grad[0]:
                total = to_dtype(torch.addmm(weight.to(lora_A.dtype), lora_B, lora_A, alpha=s), amp)
                grad_x = (g @ total).view(x.shape).to(ctx.dtypes[0])
            if ctx.needs_input_grad[1]:
                grad_w = (g.T @ x2).to(ctx.dtypes[1])
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = g.sum(0).to(ctx.dtypes[2])
            if ctx.needs_input_grad[3]:
                grad_A = torch.mm((g @ B).T, x2).mul_(s).to(lora_A.dtype)
            if ctx.needs_input_grad[4]:
                # (xA^T)^T g, transposed back: the thin operand on the left runs 2-3x faster in MKL than g^T (xA^T)
                # (1.99 -> 0.74 ms on a 2048 x 1536 gradient, 1 thread): ~2 % of a MiniLM LoRA step.
                grad_B = torch.mm((x2 @ A.T).T, g).T.mul_(s).to(lora_B.dtype)
        return grad_x, grad_w, grad_b, grad_A, grad_B, None


class LoraAdapter(Adapter):
    def __init__(self, config: "LoraConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        self.kind = layer.kind
        r = int(resolve_pattern(config.rank_pattern, module_name, config.r))
        alpha = float(resolve_pattern(config.alpha_pattern, module_name, config.lora_alpha))
        self.r = r
        self.scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        # PiSSA: how many principal components the base residual lost. It stays fixed when a rank-changing
        # procedure later resizes A and B, and is saved (`pissa_rank_pattern`) so a reload rebuilds that residual.
        self.pissa_rank = int(resolve_pattern(config.pissa_rank_pattern, module_name, r)) if config.init_lora_weights == "pissa" else None
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        shape = layer.weight_shape  # shape only: no dequantized copy of a quantized base
        if layer.kind == "conv":
            self.lora_A = nn.Parameter(torch.empty(r, *shape[1:]))
            self.lora_B = nn.Parameter(torch.empty(shape[0], r, *([1] * (len(shape) - 2))))
        else:  # linear and embedding: A is r x in, B is out x r in canonical layout
            self.lora_A = nn.Parameter(torch.empty(r, shape[1]))
            self.lora_B = nn.Parameter(torch.empty(shape[0], r))
        self.reset_parameters(config.init_lora_weights, layer)

    @torch.no_grad()
    def reset_parameters(self, init, layer) -> None:
        if init == "pissa":
            self._pissa_init(layer)
        elif self.kind == "embedding":  # PEFT's embedding init: A = 0, B ~ N(0, 1)
            nn.init.zeros_(self.lora_A) if init is not False else nn.init.normal_(self.lora_A)
            nn.init.normal_(self.lora_B)
        else:
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:  # a random, non-identity adapter (tests, debugging)
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    @torch.no_grad()
    def _pissa_init(self, layer) -> None:
        # The principal r-dim subspace becomes the adapter; the base keeps the residual, so the output is unchanged.
        # Reloading an adapter whose rank a procedure changed after the split (pissa_rank != r): the residual still
        # drops all pissa_rank components; A and B hold the first min(r, pissa_rank) (the file overwrites them).
        weight = layer.weight_matrix()
        U, S, Vh = truncated_svd(weight.float().flatten(1), self.pissa_rank)
        root = (S / self.scaling).sqrt()
        k = min(self.r, self.pissa_rank)
        A, B = torch.zeros_like(self.lora_A.flatten(1)), torch.zeros_like(self.lora_B.flatten(1))
        A[:k], B[:, :k] = root[:k, None] * Vh[:k], U[:, :k] * root[:k]
        self.lora_A.copy_(A.view_as(self.lora_A))
        self.lora_B.copy_(B.view_as(self.lora_B))
        residual = weight.float() - ((U * S) @ Vh).view_as(weight)
        layer.set_weight_matrix(residual)  # re-quantizes the residual on a quantized base

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        delta = self.lora_B.flatten(1) @ self.lora_A.flatten(1) * self.scaling
        return delta.view(base_weight.shape) if self.kind == "conv" else delta

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        """Base layer and adapter in one autograd node (see `FusedLoraLinear`), when nothing forbids it."""
        weight = layer.weight_matrix()
        dropout_active = self.training and not isinstance(self.dropout, nn.Identity)
        if self.kind != "linear" or dropout_active or not fusable_dtypes(x, weight, self.lora_A, self.lora_B):
            return None
        return FusedLoraLinear.apply(x, weight, layer.base_layer.bias, self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if self.kind == "linear":
            # One fused multiply-add for the up-projection: out = base_out + s * (x A^T) B^T.
            hidden = F.linear(self.dropout(x), self.lora_A)
            flat = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), hidden.reshape(-1, self.r), self.lora_B.T, alpha=self.scaling)
            return flat.view(base_out.shape)
        if self.kind == "embedding":
            hidden = layer.apply_weight(x, self.lora_A)  # rows of A^T: (..., r)
            return base_out + F.linear(hidden, self.lora_B) * self.scaling
        hidden = layer.conv(self.dropout(x), self.lora_A)  # the base's stride/padding, r output channels
        up = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[self.lora_B.dim()]
        return base_out + up(hidden, self.lora_B) * self.scaling

    def save_key(self, local_key: str) -> str:
        if self.kind == "embedding":
            return {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}[local_key]
        return f"{local_key}.weight"


@register("lora", adapter=LoraAdapter, family="low-rank", paper="2106.09685", peft_type="LORA")
@dataclasses.dataclass
class LoraConfig(AdapterConfig):
    """LoRA. Field names and defaults follow PEFT's `LoraConfig`.

    r: rank of the update (>= 1, at most min(out, in) of each adapted layer).
    lora_alpha: scale numerator (> 0); the update is multiplied by lora_alpha / r.
    lora_dropout: dropout on the adapter input, in [0, 1).
    use_rslora: scale by lora_alpha / sqrt(r) instead (rank-stabilised LoRA).
    init_lora_weights: True (A Kaiming, B = 0: starts as the base), "gaussian" (A ~ N(0, 1/r), B = 0),
        "pissa" (principal singular subspace of W moved into A, B; the base keeps the residual),
        False (random A and B: a non-zero update, for tests).
    rank_pattern / alpha_pattern: per-module overrides, {module-name regex: value} (PEFT semantics).
    pissa_rank_pattern: with "pissa", the number of components each layer's base residual lost where it differs
        from the layer's rank ({module regex: rank}); written by rank-changing procedures (IncreLoRA, TriAdaptLoRA,
        Maestro) so the file reloads onto the original base exactly. Not a PEFT field; omitted from files when empty.
    fan_in_fan_out: kept for PEFT files only; rankwise reads the weight layout from the layer type (GPT-2 Conv1D).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    fan_in_fan_out: bool = False
    pissa_rank_pattern: dict = dataclasses.field(default_factory=dict)

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    peft_neutral_fields: ClassVar[dict] = {
        "bias": "none", "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False, "target_parameters": None, "layer_replication": None,
        "trainable_token_indices": None, "megatron_config": None, "megatron_core": "megatron.core",
        "loftq_config": {}, "eva_config": None, "corda_config": None, "lora_ga_config": None,
        "velora_config": None, "alora_invocation_tokens": None, "use_qalora": False, "qalora_group_size": 16,
        "monteclora_config": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
        "ensure_weight_tying": False,
    }

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "r", "an integer >= 1")
        self._check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", "a number > 0")
        self._check(isinstance(self.lora_dropout, (int, float)) and 0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)")
        self._check(isinstance(self.use_rslora, bool), "use_rslora", "True or False")
        self._check(any(self.init_lora_weights is c or self.init_lora_weights == c and isinstance(c, str) for c in INIT_CHOICES),
                    "init_lora_weights", "True, False, 'gaussian' or 'pissa'")
        for field in ("rank_pattern", "alpha_pattern", "pissa_rank_pattern"):
            value = getattr(self, field)
            self._check(isinstance(value, dict) and all(isinstance(v, (int, float)) and v > 0 for v in value.values()),
                        field, "a dict {module regex: positive number}")

    def to_dict(self) -> dict:
        data = super().to_dict()
        if not data.get("pissa_rank_pattern"):  # rankwise-only and rarely set: keep ordinary LoRA files PEFT's
            data.pop("pissa_rank_pattern", None)
        return data

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        weight_shape = tuple(base_layer.weight.shape)
        r = resolve_pattern(self.rank_pattern, module_name, self.r)
        if kind == "conv":
            limit = min(weight_shape[0], math.prod(weight_shape[1:]))
            if base_layer.groups != 1:
                raise ConfigError(f"LoRA on grouped convolution {module_name!r} is not supported; exclude it")
        else:
            limit = min(weight_shape[0], weight_shape[1])
        if r > limit:
            raise ConfigError(
                f"LoraConfig.r={r} is too large for {module_name!r} (weight {tuple(weight_shape)}): "
                f"the rank can be at most {limit}. Lower r, or exclude this module."
            )
