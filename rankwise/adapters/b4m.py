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

Training, as the paper's two stages (reachable from `rankwise finetune --method b4m`, see `B4mConfig`):

* Stage 1 ("break"), role content (style is the mirror image): the concept loss l_1 on the concept's data trains
  A_t at lr; the multi-correspondence projection learning (MCP) loss l_2 = (1/K) sum_k l(partner data k) of K
  auxiliary partner data sets (of the other kind) trains the partner block B_t at partner_lr_scale * lr, so the
  concept block is not tied to one partner (the paper's Sec. "multi-correspondence projection learning"; the
  reference runs K = 3 style sets with the content, lr 1e-4 / 1e-5). `PartnerLosses` adds grad l_2 to the partner
  block only: d l_1 / d B_t stays in it too, as in the reference, where l_1's gradient on B is not zeroed.
* Stage 2 ("make"), role joint, from the composed adapter (`init_from`): l_1 + l_2 (both concepts' data) on every
  trainable block, with the Riemannian-preconditioned AdamW (`rankwise.optim.RiemannianAdamW`, Zhang & Pilanci
  arXiv 2402.02347: grad_A <- (B^T B + delta I)^-1 grad_A, grad_B <- grad_B (A A^T + delta I)^-1 on the full
  factors A = [A_f | A_t], B = [B_f ; B_t]; the abstract's "Riemannian precondition to adaptively balance content
  and style learning"). The reference's `AdamWr` stepped after the plain AdamWs had zeroed the gradients (see
  docs/methods/b4m.md); here one optimizer preconditions then steps, as the paper describes.
"""
from __future__ import annotations

import dataclasses
import json
import math
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
OPTIMIZERS = ("auto", "adamw", "riemannian")


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

    def factor_pair(self):
        """The trainable blocks as a `LoraFactorPair` whose Gram matrices use the full factors (frozen blocks included)."""
        from rankwise.optim.riemannian import LoraFactorPair

        return LoraFactorPair(self.A_train, self.B_train, self.factors)

    def partner_block(self) -> list[nn.Parameter]:
        """What the MCP partner losses train: B_t for a content adapter, A_t for a style one, both when joint."""
        return {"content": [self.B_train], "style": [self.A_train],
                "joint": [self.A_train, self.B_train]}[self.config.role]

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
    optimizer: "auto" (the paper's: Riemannian-preconditioned AdamW for role "joint", AdamW in stage 1),
        "adamw" or "riemannian"; used by `rankwise.train.loop.train` and `rankwise finetune`.
    precondition_delta: the ridge delta of the Riemannian preconditioner (the reference's `optimizer_reg`, 0).
    partner_data: training files of the partner concepts (same format as `--data`: classification CSV/JSONL with
        text,label columns and the main data's labels, or causal-lm instructions). Stage 1: the auxiliary
        partners of the MCP loss (the reference uses 3); stage 2: the other concept's data. Empty: no partner loss.
    init_from: stage 2: start from this adapter directory (the output of `rankwise compose`) instead of the
        initialisation. Read by `rankwise finetune` only; loading a saved adapter never reads it.
    Old files without the last four keys load with these defaults (`optimizer="auto"` only affects training).
    """

    r: int = 64
    role: str = "content"
    partner_lr_scale: float = 0.1
    orthogonal_prior: bool = True
    basis_height: int | None = None
    seed: int = 0
    optimizer: str = "auto"
    precondition_delta: float = 0.0
    partner_data: list[str] | None = None
    init_from: str | None = None

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
        self._check(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        self._check(isinstance(self.precondition_delta, (int, float)) and not isinstance(self.precondition_delta, bool)
                    and math.isfinite(self.precondition_delta) and 0 <= self.precondition_delta <= 1e6,
                    "precondition_delta", "a finite number in [0, 1e6]")
        self._check(self.partner_data is None or (isinstance(self.partner_data, (list, tuple)) and all(
            isinstance(p, str) and p for p in self.partner_data)), "partner_data", "None or a list of file paths")
        self._check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from), "init_from",
                    "None or an adapter directory")

    @property
    def resolved_optimizer(self) -> str:
        return ("riemannian" if self.role == "joint" else "adamw") if self.optimizer == "auto" else self.optimizer

    def make_optimizer(self, model, param_groups, lr: float, weight_decay: float):
        """The training loop's optimizer for this adapter: `RiemannianAdamW` over every B4M pair, or None (AdamW)."""
        if self.resolved_optimizer != "riemannian":
            return None
        from rankwise.optim.riemannian import RiemannianAdamW

        pairs = [adapter.factor_pair() for adapter in _b4m_adapters(model, self)]
        return RiemannianAdamW(param_groups, pairs, lr=lr, weight_decay=weight_decay, delta=self.precondition_delta)

    def prepare_finetune(self, model, task, tokenizer, spec, loss_fn, data_parallel=None) -> list:
        """Called by `rankwise finetune` once the model is adapted: load `init_from`, return the partner-loss callback."""
        if self.init_from is not None:
            load_stage2_start(model, self)
        if not self.partner_data:
            return []
        if data_parallel is not None:
            raise ConfigError("B4mConfig.partner_data: the partner losses are not data-parallel yet; run with --nproc 1")
        partners = [partner_task(task, path, tokenizer, spec) for path in self.partner_data]
        return [PartnerLosses(model, [t.train_batches for t in partners], loss_fn, config=self)]

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
    config = dataclasses.replace(style_cfg, role="joint", partner_data=None, init_from=None).to_dict()  # training-only
    config["inference_mode"] = True
    with atomic_directory(output_dir) as stage:  # config and weights swap in together
        atomic_write(stage / WEIGHTS_NAME, lambda tmp: save_file(fused, tmp, metadata={"format": "pt"}))
        atomic_write_text(stage / CONFIG_NAME, json.dumps(config, indent=2))
    layers = sum(key.endswith(".A_train") for key in fused)
    return {"layers": layers, "output": str(output_dir), "rank": style_cfg.r}


# -- training: the partner losses (stage 1 MCP, stage 2's second concept) and the stage-2 start ----------------------
def _b4m_adapters(model, config: "B4mConfig | None" = None) -> list[B4mAdapter]:
    found = []
    for _, layer in model.adapted_layers():
        for adapter in layer.adapters.values():
            if isinstance(adapter, B4mAdapter) and (config is None or adapter.config is config):
                found.append(adapter)
    return found


class PartnerLosses:
    """Loop callback: after the concept loss's backward, add the gradient of the partner loss
    l_2 = (1/K) sum_k loss_fn(model, batch of partner k) to the partner block (`B4mAdapter.partner_block`).

    partner_batches: K functions `epoch -> list of batches` (like `train(batches=...)`); optimizer step t takes batch
        t mod n of pass t // n of each partner, so a resumed run sees the same partner batches (one partner batch
        per optimizer step, also with gradient accumulation).
    The partner gradient is clipped to the loop's `max_grad_norm` over the partner block (the reference clips
    before each of its two optimizer steps). `history[-1]["partner_loss"]` records l_2.
    """

    supports_resume = True

    def __init__(self, model, partner_batches, loss_fn, config: "B4mConfig | None" = None):
        self.model, self.partner_batches, self.loss_fn = model, list(partner_batches), loss_fn
        if not self.partner_batches:
            raise ConfigError("PartnerLosses: no partner data sets given")
        adapters = _b4m_adapters(model, config)
        if not adapters:
            raise ConfigError("PartnerLosses: the model has no Break-for-Make (b4m) adapter")
        self.targets = [p for adapter in adapters for p in adapter.partner_block() if p.requires_grad]
        self._cache: dict = {}
        self.last_loss = float("nan")

    def _batch(self, k: int, step: int):
        first = self._cache.get((k, 0))
        if first is None:
            first = self._cache[(k, 0)] = self.partner_batches[k](0)
        if not first:
            raise ConfigError(f"B4M partner data set {k} has no training batches")
        epoch, index = divmod(step, len(first))
        if (k, epoch) not in self._cache:
            self._cache = {key: v for key, v in self._cache.items() if key[1] == 0}  # keep memory bounded
            self._cache[(k, epoch)] = self.partner_batches[k](epoch)
        return self._cache[(k, epoch)][index]

    def after_backward(self, state) -> None:
        losses = [self.loss_fn(self.model, self._batch(k, state.step)) for k in range(len(self.partner_batches))]
        partner_loss = sum(losses) / len(losses)
        value = float(partner_loss.detach())
        if not math.isfinite(value):
            from rankwise.core.errors import TrainingError

            raise TrainingError(f"the B4M partner loss became {value} at optimizer step {state.step + 1}; lower the learning rate")
        grads = torch.autograd.grad(partner_loss, self.targets, allow_unused=True)
        with torch.no_grad():
            for p, g in zip(self.targets, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        max_norm = getattr(state.config, "max_grad_norm", None)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in self.targets if p.grad is not None], max_norm)
        self.last_loss = value

    def on_step_end(self, state) -> None:
        if state.history:
            state.history[-1]["partner_loss"] = self.last_loss


def load_stage2_start(model, config: "B4mConfig") -> None:
    """Copy the composed adapter in `config.init_from` into the model's B4M adapter (same rank, targets, seed, basis)."""
    from rankwise.core.io import read_config

    directory = Path(config.init_from)
    saved = read_config(directory)
    if not isinstance(saved, B4mConfig):
        raise CheckpointError(f"B4mConfig.init_from={str(directory)!r} holds a {saved.method_name!r} adapter, not a "
                              "Break-for-Make one: pass the output of `rankwise compose`")
    for field in ("r", "seed", "orthogonal_prior", "basis_height"):
        if getattr(saved, field) != getattr(config, field):
            raise CheckpointError(f"B4mConfig.init_from={str(directory)!r} was saved with {field}={getattr(saved, field)!r}, "
                                  f"this run has {field}={getattr(config, field)!r}: use the same value")
    names = [name for name, cfg in model.configs.items() if cfg is config]
    model.load_adapter(directory, names[0] if names else "default", is_trainable=True)


def partner_task(task, path: str, tokenizer, spec):
    """A task of the same kind as `task` over the partner data file `path`, prepared like it (same tokenizer, lengths)."""
    from rankwise.train.tasks.classification import ClassificationTask

    if isinstance(task, ClassificationTask):
        from rankwise.data.text import load_text_classification

        data = load_text_classification(path, train_size=10**9, test_size=1, seed=spec.train.seed)
        index = {name: i for i, name in enumerate(task.data.label_names)}
        unknown = sorted(set(data.label_names) - set(index))
        if unknown:
            raise ConfigError(f"B4mConfig.partner_data: {path} has labels {unknown[:5]} that the training data "
                              f"({task.data.label_names[:5]}) does not: the model has one head for both")
        remap = [index[name] for name in data.label_names]
        data = dataclasses.replace(data, train_labels=[remap[i] for i in data.train_labels],
                                   test_labels=[remap[i] for i in data.test_labels], label_names=list(task.data.label_names))
        partner = ClassificationTask(data)
    else:
        from rankwise.data.instructions import load_instructions
        from rankwise.train.tasks.causal_lm import CausalLMTask

        if not isinstance(task, CausalLMTask):
            raise ConfigError(f"B4mConfig.partner_data: the {getattr(task, 'name', type(task).__name__)} task has no "
                              "partner loader; partner data needs the classification or causal-lm task")
        partner = CausalLMTask(load_instructions(path, train_size=10**9, test_size=1, seed=spec.train.seed))
    partner.prepare(tokenizer, spec)
    return partner
