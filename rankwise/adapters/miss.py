"""MiSS (Matrix Shard Sharing) and its predecessor Bone (Block-affine adaptation)
(Jiale Kang, arXiv 2409.15371: v1-v4 "Bone", later versions "MiSS").

Default ("shard sharing", init_weights=True): one trainable shard D (r x out) is added to every
r-wide column block of W, so the input is summed chunk-wise instead of projected:

    x (.., in) ── pad to a multiple of r ── view (.., in/r, r) ── sum over chunks ── x~ (.., r) ── D (r x out) ──┐
    x ─────────────────────────────────────── W (frozen, out x in) ─────────────────────────────────────────────┴─(+)── y

    delta_weight[o, j] = D[j mod r, o]      (D^T tiled across the input dimension; rank <= r; zero at init)

"mini" (MiSS only): D = M repeated out/mini_r times along out, M (r x mini_r) trainable.
"bat" ("weight guide"): W is tiled into r x r blocks W_ij and each block-row i gets its own B_i (r x r):
    W'_ij = W_ij + W_ij B_i + B_i   -- not additive: merge/unmerge are overridden, unmerge uses (I + B_i)^-1.

Bone and MiSS are one file because they are one method: PEFT replaced Bone by MiSS with the same
maths, tensors and shapes (Bone's `bone_block` == MiSS's `miss_block`; PEFT deleted Bone in #3051).
`BoneConfig` is MiSS restricted to Bone's options, spelled as old PEFT files spell it
(`peft_type = "BONE"`, key `bone_block`), so legacy Bone files load too.
Files are PEFT's: `MissConfig` fields, key `<module>.miss_block`, `peft_type = "MISS"`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import PEFT_COMMON_NEUTRAL, AdapterConfig
from rankwise.core.errors import ConfigError
from rankwise.core.layer import AdaptedLayer
from rankwise.core.registry import register


class MissAdapter(Adapter):
    def __init__(self, config: "MissConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        out_f, r = layer.out_features, config.r
        self.r = r
        self.mode = config.init_weights
        self.mini_r = getattr(config, "mini_r", 1)
        dropout = getattr(config, "miss_dropout", 0.0)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if self.mode == "bat":
            shape = (out_f // r, r, r)
        elif self.mode == "mini":
            shape = (r, self.mini_r)
        else:
            shape = (r, out_f)
        self.miss_block = nn.Parameter(torch.zeros(shape))
        if self.mode is False:  # a random, non-zero adapter (tests, debugging), as PEFT does
            nn.init.kaiming_uniform_(self.miss_block, a=math.sqrt(5))

    def shard(self, out_features: int) -> torch.Tensor:
        """The shared shard D (r x out) of the additive modes."""
        if self.mode == "mini":
            return self.miss_block.repeat(1, out_features // self.mini_r)
        return self.miss_block

    def _bat_update(self, weight: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """Blockwise W B_i + B_i (or, reversed, the W that maps to `weight`), in `weight`'s layout."""
        out_f, in_f, r = weight.shape[0], weight.shape[1], self.r
        block = self.miss_block.to(weight.dtype)
        tiles = weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r): tile (i, j)
        if reverse:
            eye = torch.eye(r, dtype=torch.float32, device=weight.device)
            result = (tiles - block) @ torch.linalg.inv(eye + block.float()).to(weight.dtype)
        else:
            result = tiles @ block + block
        return result.permute(1, 2, 0, 3).reshape(out_f, in_f)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat":
            return self._bat_update(base_weight.to(self.miss_block.dtype))
        out_f, in_f = base_weight.shape
        return self.shard(out_f).T.repeat(1, -(-in_f // self.r))[:, :in_f]

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(weight).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "bat":
            return self._bat_update(weight, reverse=True)
        return weight - self.delta_weight(weight).to(weight.dtype)

    def fused_forward(self, x: torch.Tensor, layer) -> torch.Tensor | None:
        weight = layer.weight_matrix()
        if self.mode != "bat" or x.dtype != weight.dtype or x.dtype != self.miss_block.dtype:
            return None
        # Bat materialises W' anyway: one matmul with it replaces the base call (as PEFT does).
        return F.linear(x, weight + self.delta_weight(weight), layer.base_layer.bias)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if self.mode == "bat":
            # The update depends on W itself: materialise it (the method's cost, as in PEFT).
            return base_out + F.linear(x, self.delta_weight(layer.weight_matrix()))
        r = self.r
        x = self.dropout(x)
        if x.shape[-1] % r:
            x = F.pad(x, (0, r - x.shape[-1] % r))
        chunks = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2)
        return base_out + chunks @ self.shard(base_out.shape[-1])


class BoneAdapter(MissAdapter):
    def save_key(self, local_key: str) -> str:
        return "bone_block" if local_key == "miss_block" else local_key


def _check_blocks(config, module_name: str, out_f: int, in_f: int) -> None:
    name = type(config).__name__
    if config.r > in_f:
        raise ConfigError(f"{name}.r={config.r} is too large for {module_name!r} (in_features={in_f}): r must be <= in_features.")
    if config.init_weights == "bat" and (in_f % config.r or out_f % config.r):
        raise ConfigError(
            f"{name}.init_weights='bat' needs r to divide both dimensions of {module_name!r} (out={out_f}, in={in_f}) "
            f"but r={config.r}. Pick r dividing both, or use init_weights=True."
        )
    if config.init_weights == "mini" and out_f % config.mini_r:
        raise ConfigError(
            f"{name}.mini_r={config.mini_r} must divide out_features={out_f} of {module_name!r}. Pick a divisor of {out_f}."
        )


def _layer_dims(base_layer: nn.Module) -> tuple[int, int]:
    layer = AdaptedLayer(base_layer)  # a throw-away view: it knows each layer type's canonical (out, in)
    return layer.out_features, layer.in_features


@register("miss", adapter=MissAdapter, family="block / shard sharing", paper="2409.15371", peft_type="MISS")
@dataclasses.dataclass
class MissConfig(AdapterConfig):
    """MiSS. Field names and defaults follow PEFT's `MissConfig`.

    r: shard width (>= 1, at most in_features; even recommended). Trainable per layer: r * out
        (default and bat), r * mini_r (mini).
    miss_dropout: dropout on the adapter input, in [0, 1) (default and mini modes).
    mini_r: width of the trained shard in "mini" mode (>= 1, divides out_features).
    init_weights: True (shard sharing, zero init), "bat" (weight-guided blocks, r divides out and in),
        "mini" (a tiny shard repeated along out), False (a random non-zero shard, for tests).
    """

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    init_weights: bool | str = True

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    init_property: ClassVar[str] = "zero"
    peft_neutral_fields: ClassVar[dict] = PEFT_COMMON_NEUTRAL
    init_choices: ClassVar[tuple] = (True, False, "bat", "mini")

    def validate(self) -> None:
        super().validate()
        self._check_int("r")
        self._check_int("mini_r")
        self._check(isinstance(self.miss_dropout, (int, float)) and 0 <= self.miss_dropout < 1, "miss_dropout", "a number in [0, 1)")
        self._check(any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in self.init_choices),
                    "init_weights", " or ".join(repr(c) for c in self.init_choices))
        self._check(not (self.init_weights == "bat" and self.miss_dropout > 0), "miss_dropout",
                    "0 with init_weights='bat' (the weight-guided mode has no dropout)")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        _check_blocks(self, module_name, *_layer_dims(base_layer))


@register("bone", adapter=BoneAdapter, family="block / shard sharing", paper="2409.15371", peft_type="BONE")
@dataclasses.dataclass
class BoneConfig(AdapterConfig):
    """Bone, MiSS's predecessor (legacy PEFT `BoneConfig`, removed from PEFT; use `MissConfig` for new work).

    r: block width (>= 1, at most in_features). init_weights: True (shard sharing), "bat" (weight-guided
    blocks, r divides out and in) or False (random, for tests). Files: `peft_type = "BONE"`, key `bone_block`.
    """

    r: int = 64
    init_weights: bool | str = True

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    init_property: ClassVar[str] = "zero"
    peft_neutral_fields: ClassVar[dict] = PEFT_COMMON_NEUTRAL

    def validate(self) -> None:
        super().validate()
        self._check_int("r")
        self._check(any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in (True, False, "bat")),
                    "init_weights", "True, False or 'bat'")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        _check_blocks(self, module_name, *_layer_dims(base_layer))
