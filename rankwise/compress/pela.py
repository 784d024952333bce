"""PELA: Parameter-Efficient models with Low-rank Approximation (Guo, Wang, Kankanhalli; CVPR 2024,
arXiv 2310.10700).

1. Every targeted linear becomes balanced SVD factors `W ~= (U_k sqrt S_k)(sqrt S_k Vh_k)` with
   `k = floor(in*out / (cr*(in+out)))`, `cr = 1/ratio` (exactly the plain-SVD baseline's layers).
2. *Intermediate pre-training* recovers the quality: the low-rank student learns from a frozen copy
   of the original (the teacher) on the calibration data with

       L = task_weight * CE  +  kd_alpha * mean_l MSE(F_l^S, F_l^T)  +  kd_beta * MSE(logits)
           + wp_weight * mean_layers (max_ij |(W2 W1 - W_T)_ij| - eps)^2

   where F_l are the outputs of the repeated blocks and the last term (weight perturbation) keeps each
   factor product close to the teacher's weight in the max-abs-entry norm.

Defaults follow the paper's DeiT recipe: every student parameter trains (`trainable="all"`, the
uncompressed ones included) with AdamW weight decay 0.05. `trainable="factors", weight_decay=0.0` is the
cheaper variant (and the behaviour before issue 19). The paper's schedules are epochs over ImageNet/4M
pairs; here `steps` passes over the calibration batches.

Feature distillation needs the model's repeated blocks (found by `find_blocks`). When there are none,
`compress` raises a `ConfigError` by default instead of quietly distilling something else; opt in to
distilling the logits instead with `feature_fallback="logits"` (which warns once, naming it), or set
`kd_alpha=0`.
"""
from __future__ import annotations

import copy
import itertools
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress._common import (CompressConfig, CompressionReport, LowRankLinear, check_calibration,
                                       find_blocks, get_module, run_model, track)
from rankwise.compress.svd import SVDConfig
from rankwise.compress.svd import compress as svd_compress
from rankwise.core.errors import ConfigError, check_field


@dataclass
class PelaConfig(CompressConfig):
    steps: int = 50
    lr: float = 1e-4
    weight_decay: float = 0.05
    kd_alpha: float = 1.0
    kd_beta: float = 0.0
    task_weight: float = 1.0
    wp_weight: float = 1.0
    wp_eps: float = 1e-3
    trainable: str = "all"
    feature_fallback: str = "error"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "PelaConfig"
        check_field(isinstance(self.steps, int) and self.steps >= 0, name, "steps", self.steps, "an int >= 0")
        check_field(self.lr > 0, name, "lr", self.lr, "a positive learning rate")
        for fld in ("kd_alpha", "kd_beta", "task_weight", "wp_weight", "wp_eps", "weight_decay"):
            check_field(getattr(self, fld) >= 0, name, fld, getattr(self, fld), "a non-negative number")
        check_field(self.trainable in ("factors", "all"), name, "trainable", self.trainable, "'factors' or 'all'")
        check_field(self.feature_fallback in ("error", "logits"), name, "feature_fallback", self.feature_fallback,
                    "'error' (no block features: refuse) or 'logits' (distil the logits instead, with a warning)")


def weight_perturbation_loss(pairs: list[tuple[LowRankLinear, torch.Tensor]], eps: float = 1e-3) -> torch.Tensor:
    """`mean over layers of (max_ij |(W2 W1 - W_T)_ij| - eps)^2`; its gradient reaches only the arg-max entry."""
    terms = [((layer.up.weight @ layer.down.weight - target).abs().max() - eps) ** 2 for layer, target in pairs]
    return torch.stack(terms).mean()


def feature_distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over blocks of the MSE between student and teacher block outputs."""
    return torch.stack([nn.functional.mse_loss(s, t) for s, t in zip(student, teacher)]).mean()


class _BlockOutputs:
    """Keeps the outputs of every repeated block during one forward pass."""

    def __init__(self, model: nn.Module):
        found = find_blocks(model)
        self.outputs: list[torch.Tensor] = []
        modules = list(found[1]) if found is not None else []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, _module, _args, output):
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if getattr(output, "logits", None) is not None else output[0]


def pela_losses(student: nn.Module, teacher: nn.Module, batch, config: PelaConfig,
                pairs: list[tuple[LowRankLinear, torch.Tensor]], hooks: tuple[_BlockOutputs, _BlockOutputs]) -> dict:
    """All loss terms for one batch (differentiable w.r.t. the student only)."""
    student_hooks, teacher_hooks = hooks
    with torch.no_grad():
        teacher_logits = _logits(run_model(teacher, batch))
    teacher_feats = [f.detach() for f in teacher_hooks.take()]
    out = run_model(student, batch)
    logits = _logits(out)
    student_feats = student_hooks.take()
    losses = {}
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    if config.task_weight and getattr(out, "logits", None) is not None and ids is not None and ids.dim() == 2:
        losses["task"] = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
    if config.kd_alpha:
        if student_feats:
            losses["features"] = feature_distillation_loss(student_feats, teacher_feats)
        elif config.feature_fallback == "logits":  # asked for explicitly; compress() has warned
            losses["features"] = nn.functional.mse_loss(logits, teacher_logits)
        else:
            raise ConfigError(_NO_BLOCKS)
    if config.kd_beta:
        losses["logits"] = nn.functional.mse_loss(logits, teacher_logits)
    if config.wp_weight and pairs:
        losses["weight_perturbation"] = weight_perturbation_loss(pairs, config.wp_eps)
    weights = {"task": config.task_weight, "features": config.kd_alpha, "logits": config.kd_beta,
               "weight_perturbation": config.wp_weight}
    losses["total"] = sum(weights[k] * v for k, v in losses.items())
    return losses


_NO_BLOCKS = ("PELA feature distillation (kd_alpha > 0) needs the model's repeated blocks, and none were found. "
              "Pass feature_fallback='logits' to distil the logits with MSE instead, or kd_alpha=0 to drop the term.")


def compress(model: nn.Module, config: PelaConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """SVD-factorise the targeted linears in place, then distil from the original for `config.steps` steps."""
    batches = check_calibration(model, calibration, required=config.steps > 0)
    if config.steps and config.kd_alpha and find_blocks(model) is None:
        if config.feature_fallback == "error":
            raise ConfigError(_NO_BLOCKS)
        warnings.warn("PELA: no repeated blocks found, so the kd_alpha feature term distils the logits with MSE "
                      "instead (feature_fallback='logits').", UserWarning, stacklevel=2)
    start = time.perf_counter()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    svd_fields = {k: getattr(config, k) for k in ("ratio", "target_modules", "exclude_modules")}
    model, report = svd_compress(model, SVDConfig(**svd_fields), None)
    report.method = "pela"
    layers = [n for n, info in report.layers.items() if not info.get("kept_dense")]
    pairs = [(get_module(model, n), get_module(teacher, n).weight.detach()) for n in layers]
    factor_params = [p for layer, _ in pairs for p in layer.parameters()]
    if config.trainable == "all":
        params = [p for p in model.parameters()]
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        params = factor_params
    for p in params:
        p.requires_grad_(True)
    history = []
    if config.steps and params:
        torch.manual_seed(config.seed)
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        hooks = (_BlockOutputs(model), _BlockOutputs(teacher))
        model.train()
        try:
            for _step, batch in zip(track(range(config.steps), "pela: distilling"), itertools.cycle(batches)):
                losses = pela_losses(model, teacher, batch, config, pairs, hooks)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                history.append({k: float(v.detach()) for k, v in losses.items()})
        finally:
            for h in hooks:
                h.remove()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    report.extra["history"] = history
    report.seconds = time.perf_counter() - start
    del teacher
    return model, report

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "pela", "paper": "2310.10700", "runs": "rankwise compress --method pela; rankwise.compress.compress(model, 'pela', calibration)",
     "summary": "low-rank approximation + feature distillation"},
)
