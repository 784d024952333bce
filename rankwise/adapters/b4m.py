"""Break-for-Make (B4M): content and style trained in disjoint halves of one LoRA's factors, then spliced
(Xu et al., arXiv 2403.19456; ACM TOG 2025 "B4M"). Partly learnable projections (PLP):

    A = [ A_f | A_t ]  (r x in)        A_f: r x h_in  frozen      A_t: r x (in - h_in)   trainable  <- content
    B = [ B_f ; B_t ]  (out x r)       B_f: h_out x r frozen      B_t: (out - h_out) x r trainable  <- style
    x ── W ──────────────────┐
    └── A^T ── B^T ──────────┴─(+)── y         delta_weight = B A  (scale 1, as the reference)
        = [[B_f A_f, B_f A_t], [B_t A_f, B_t A_t]]      (block rows: output halves; block columns: input halves)

Orthogonal prior: A_f = Q[S1]^T and B_f = Q[S2] from disjoint row sets of one orthonormal basis Q (height x r),
a deterministic function of (seed, module name), so two independently trained adapters share their frozen blocks.
The update is therefore not zero at init (top block row B_f A). Without the prior, B_f = 0 and the update starts at 0.

Composition (`compose`, `rankwise compose`): A = [A_f | A_t(content)], B = B(style): content's input-side block and
style's output-side block meet in one adapter; it splices factors, so it works on adapter files, never merged weights.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.core.registry import register
from rankwise.linalg import seeded_generator

ROLES = ("content", "style", "joint")


def _name_seed(seed: int, module_name: str) -> int:
    value = seed
    for ch in module_name.encode():
        value = (value * 1_000_003 + ch) % (2**62)
    return value


class B4mAdapter(Adapter):
    def __init__(self, config: "B4mConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        d_in, d_out, r = layer.in_features, layer.out_features, config.r
        h_in, h_out = d_in // 2, d_out // 2
        generator = seeded_generator(_name_seed(config.seed, module_name))
        a = torch.randn(r, d_in, generator=generator) / r  # N(0, 1/r^2), the reference's default
        b_frozen = torch.zeros(h_out, r)
        if config.orthogonal_prior:
            height = config.basis_height or max(d_in, d_out)
            q = torch.linalg.qr(torch.randn(height, r, generator=generator)).Q  # orthonormal columns
            rows = torch.randperm(height, generator=generator)
            s1, s2 = rows[:h_in], rows[h_in:h_in + h_out]  # disjoint row sets
            a[:, :h_in] = q[s1].T
            b_frozen = q[s2].clone()
        self.register_buffer("A_frozen", a[:, :h_in].contiguous())
        self.register_buffer("B_frozen", b_frozen)
        self.A_train = nn.Parameter(a[:, h_in:].contiguous())
        self.B_train = nn.Parameter(torch.zeros(d_out - h_out, r))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A: r x in, B: out x r) with delta_weight = B @ A."""
        return torch.cat([self.A_frozen, self.A_train], 1), torch.cat([self.B_frozen, self.B_train], 0)

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        a, b = self.factors()
        return b @ a

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        a, b = self.factors()
        return base_out + F.linear(F.linear(x, a), b)

    def parameter_groups(self) -> list[dict]:
        # Stage 1: the adapter's own concept trains at lr, the partner block at partner_lr_scale * lr.
        scale = self.config.partner_lr_scale
        a_scale, b_scale = {"content": (1.0, scale), "style": (scale, 1.0), "joint": (1.0, 1.0)}[self.config.role]
        return [{"params": [self.A_train], "lr_scale": a_scale}, {"params": [self.B_train], "lr_scale": b_scale}]


@register("b4m", adapter=B4mAdapter, family="composable low-rank", paper="2403.19456")
@dataclasses.dataclass
class B4mConfig(AdapterConfig):
    """Break-for-Make (PLP adapter). Not in PEFT: files are `RANKWISE_B4M`; frozen blocks are saved too.

    r: rank, >= 1 (reference 64 on SDXL).
    role: "content" (A_t is the concept, B_t the partner), "style" (the reverse) or "joint" (stage 2 / composed).
    partner_lr_scale: learning-rate multiplier of the partner block in stage 1 (reference 1e-5 / 1e-4 = 0.1).
    orthogonal_prior: frozen blocks from disjoint rows of one orthonormal basis (non-zero update at init);
        False: B_f = 0 (zero update at init; B_f stays 0).
    basis_height: rows of that basis (None: max(in, out) of the layer; the SDXL reference hard-codes 1280).
    seed: with the module name, fixes the frozen blocks: content and style runs must use the same seed.
    """

    r: int = 64
    role: str = "content"
    partner_lr_scale: float = 0.1
    orthogonal_prior: bool = True
    basis_height: int | None = None
    seed: int = 0

    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    init_property: ClassVar[str] = "none"  # the orthogonal prior makes the top block row non-zero at init

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r >= 1, "r", "an integer >= 1")
        self._check(self.role in ROLES, "role", f"one of {ROLES}")
        self._check(isinstance(self.partner_lr_scale, (int, float)) and 0 <= self.partner_lr_scale <= 1e3,
                    "partner_lr_scale", "a number in [0, 1000]")
        self._check(isinstance(self.orthogonal_prior, bool), "orthogonal_prior", "True or False")
        self._check(self.basis_height is None or (isinstance(self.basis_height, int) and self.basis_height >= 1),
                    "basis_height", "None or an integer >= 1")
        self._check(isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0, "seed", "an integer >= 0")

    def check_layer(self, module_name: str, base_layer: nn.Module, kind: str) -> None:
        d_a, d_b = base_layer.weight.shape[:2]
        if self.orthogonal_prior:
            height = self.basis_height or max(d_a, d_b)
            if height < self.r or height < d_a // 2 + d_b // 2:
                raise ConfigError(
                    f"B4mConfig: the orthogonal basis of {module_name!r} (weight {tuple(base_layer.weight.shape)}) needs "
                    f"basis_height >= max(r, in//2 + out//2) = {max(self.r, d_a // 2 + d_b // 2)}, got {height}. "
                    "Lower r, raise basis_height, or set orthogonal_prior=False."
                )


def compose(content_dir, style_dir, output_dir) -> dict:
    """Splice a content and a style B4M adapter into a new adapter directory: A = [A_f | A_t(content)], B = B(style).

    Both must come from the same model, targets, rank, seed and basis (identical frozen blocks); anything else
    raises `CheckpointError` naming the key, and nothing is written. Returns a small report.
    """
    from rankwise.core.io import (CONFIG_NAME, WEIGHTS_NAME, atomic_directory, atomic_write, atomic_write_text, read_config,
                                  read_weights)
    from safetensors.torch import save_file

    configs = {role: read_config(d) for role, d in (("content", content_dir), ("style", style_dir))}
    for role, cfg in configs.items():
        if not isinstance(cfg, B4mConfig):
            raise CheckpointError(f"the {role} adapter in {content_dir if role == 'content' else style_dir} is "
                                  f"{cfg.method_name!r}, not a Break-for-Make (b4m) adapter")
    content_cfg, style_cfg = configs["content"], configs["style"]
    for field in ("r", "seed", "orthogonal_prior", "basis_height", "target_modules", "exclude_modules"):
        if getattr(content_cfg, field) != getattr(style_cfg, field):
            raise CheckpointError(f"content and style adapters differ in {field} ({getattr(content_cfg, field)!r} vs "
                                  f"{getattr(style_cfg, field)!r}): they do not share frozen blocks, so they cannot compose")
    content, style = read_weights(content_dir), read_weights(style_dir)
    if set(content) != set(style):
        missing = sorted(set(content) ^ set(style))
        raise CheckpointError(f"content and style adapters cover different layers (e.g. {missing[:3]})")
    fused = {}
    for key, tensor in style.items():
        if key.endswith((".A_frozen", ".B_frozen")):
            if content[key].shape != tensor.shape or not torch.equal(content[key], tensor):
                raise CheckpointError(f"frozen block {key} differs between content and style adapters "
                                      "(trained with another seed or basis?): composition needs identical frozen blocks")
        fused[key] = content[key] if key.endswith(".A_train") else tensor
    output_dir = Path(output_dir)
    config = dataclasses.replace(style_cfg, role="joint").to_dict()
    config["inference_mode"] = True
    with atomic_directory(output_dir) as stage:  # config and weights swap in together
        atomic_write(stage / WEIGHTS_NAME, lambda tmp: save_file(fused, tmp, metadata={"format": "pt"}))
        atomic_write_text(stage / CONFIG_NAME, json.dumps(config, indent=2))
    layers = sum(key.endswith(".A_train") for key in fused)
    return {"layers": layers, "output": str(output_dir), "rank": style_cfg.r}
