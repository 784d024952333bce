"""LoRAM: train small, infer large (Zhang et al., ICLR 2025, arXiv 2502.13533).

    original W0 --prune--> small Wp --LoRA training (B_p A_p)--> recover (zero-fill) --> W0 + s B A

1. Structured pruning of the original (the paper uses LLM-Pruner indices): per Llama block, drop the
   MLP neurons (rows of gate/up, columns of down) and whole KV heads (rows of k/v, and the
   `n_heads / n_kv` query heads of each dropped KV head: rows of q, columns of o) with the smallest
   calibration importance `E[a_i^2] * ||W_out[:, i]||^2`. The first/last blocks are kept whole.
2. LoRA (rankwise.adapt, r=8, alpha=16 on q,k,v,o,gate,up,down) is trained on the *pruned* model
   with the causal-LM loss on the training/calibration batches: memory and compute of the small model.
3. Recovery (`lora_recover_type='zeroA'`): B gets zero rows at pruned output indices, A gets zero
   columns at pruned input indices, so the update lives only on the kept weights.
4. The recovered adapter is merged into the original full model: `W0 + (alpha/r) B_rec A_rec`.

The paper's step 1b (continued pre-training to align the pruned model) is not done here.
"ratio" is the kept fraction of MLP neurons and KV heads in the pruned blocks; the returned model
has the original size (LoRAM saves training memory, not inference memory).
"""
from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from rankwise.compress._common import (CompressConfig, CompressionReport, check_calibration, count_parameters,
                                       collect_moments, find_blocks, get_module, run_model, track)
from rankwise.core.errors import ConfigError, TargetError, check_field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoramConfig(CompressConfig):
    r: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    prune_attention: bool = True
    keep_first: int = 1
    keep_last: int = 1
    steps: int = 30
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "LoramConfig"
        check_field(isinstance(self.r, int) and self.r >= 1, name, "r", self.r, "an int >= 1")
        check_field(self.lora_alpha > 0, name, "lora_alpha", self.lora_alpha, "a positive number")
        check_field(isinstance(self.steps, int) and self.steps >= 0, name, "steps", self.steps, "an int >= 0")
        check_field(self.lr > 0, name, "lr", self.lr, "a positive learning rate")
        check_field(self.keep_first >= 0 and self.keep_last >= 0, name, "keep_first/keep_last",
                    (self.keep_first, self.keep_last), "non-negative block counts")
        if self.target_modules is not None:
            raise ConfigError("LoramConfig.target_modules is not used: LoRAM prunes every Llama block; set the LoRA "
                              "layers with `lora_target_modules`")


# ------------------------------------------------------------------------------------- pruning
def kv_head_rows(kv_heads: torch.Tensor, head_dim: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of the kept KV heads in k/v, and of their query heads in q (and columns of o).

    Query head `h` reads KV head `h // group`, so KV head `j` owns query heads `j*group ... j*group+group-1`.
    """
    dims = torch.arange(head_dim)
    kv_rows = torch.cat([j * head_dim + dims for j in kv_heads.tolist()])
    q_heads = torch.cat([j * group + torch.arange(group) for j in kv_heads.tolist()])
    q_rows = torch.cat([h * head_dim + dims for h in q_heads.tolist()])
    return kv_rows, q_rows


def _select(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight.detach()
    weight = weight[rows] if rows is not None else weight
    weight = weight[:, cols] if cols is not None else weight
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None).to(weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach()[rows] if rows is not None else linear.bias.detach())
    return new


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.sort(torch.argsort(scores, descending=True)[:keep]).values


def prune_llama(model: nn.Module, batches: list, ratio: float, prune_attention: bool = True,
                keep_first: int = 1, keep_last: int = 1) -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """A structurally pruned copy of a Llama-style model and `{layer name: {"rows"|"cols": kept indices}}`."""
    found = find_blocks(model)
    if found is None or not all(hasattr(b, "mlp") and hasattr(b, "self_attn") for b in found[1]):
        raise TargetError(f"LoRAM's structured pruning supports Llama-style blocks; {type(model).__name__} has none")
    prefix, blocks = found
    watched = {}
    for i, block in enumerate(blocks):
        watched[f"{i}.mlp"] = block.mlp.down_proj
        watched[f"{i}.attn"] = block.self_attn.o_proj
    stats = collect_moments(model, watched, batches, side="input")
    pruned = copy.deepcopy(model)
    index: dict[str, dict[str, torch.Tensor]] = {}
    for i, block in enumerate(found[1]):
        if i < keep_first or i >= len(blocks) - keep_last:
            continue
        name = f"{prefix}.{i}"
        mlp = get_module(pruned, f"{name}.mlp")
        power = stats[f"{i}.mlp"].correlation().diagonal()
        keep = _top(power * mlp.down_proj.weight.detach().double().pow(2).sum(0), max(1, round(ratio * len(power))))
        for proj in ("gate_proj", "up_proj"):
            if getattr(mlp, proj, None) is not None:
                setattr(mlp, proj, _select(getattr(mlp, proj), rows=keep))
                index[f"{name}.mlp.{proj}"] = {"rows": keep}
        mlp.down_proj = _select(mlp.down_proj, cols=keep)
        index[f"{name}.mlp.down_proj"] = {"cols": keep}
        if not prune_attention:
            continue
        attn = get_module(pruned, f"{name}.self_attn")
        hd = attn.head_dim
        n_kv = attn.k_proj.out_features // hd
        group = attn.q_proj.out_features // attn.k_proj.out_features
        power = stats[f"{i}.attn"].correlation().diagonal() * attn.o_proj.weight.detach().double().pow(2).sum(0)
        kv_scores = power.view(n_kv, group * hd).sum(1)
        kv_rows, q_rows = kv_head_rows(_top(kv_scores, max(1, round(ratio * n_kv))), hd, group)
        attn.q_proj, attn.o_proj = _select(attn.q_proj, rows=q_rows), _select(attn.o_proj, cols=q_rows)
        attn.k_proj, attn.v_proj = _select(attn.k_proj, rows=kv_rows), _select(attn.v_proj, rows=kv_rows)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            index[f"{name}.self_attn.{proj}"] = {"rows": rows}
        index[f"{name}.self_attn.o_proj"] = {"cols": q_rows}
    return pruned, index


# ------------------------------------------------------------------------------------ recovery
def recover_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, full_shape: tuple[int, int],
                    kept: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-fill LoRA factors of a pruned layer back to the full layer's shape (`zeroA` recovery)."""
    out_f, in_f = full_shape
    kept = kept or {}
    A = lora_A.new_zeros(lora_A.shape[0], in_f)
    B = lora_B.new_zeros(out_f, lora_B.shape[1])
    cols = kept.get("cols", torch.arange(in_f))
    rows = kept.get("rows", torch.arange(out_f))
    A[:, cols] = lora_A
    B[rows] = lora_B
    return A, B


def _lora_config(config: LoramConfig):
    from rankwise import LoraConfig

    return LoraConfig(r=config.r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_target_modules))


def train_lora(model: nn.Module, batches: list, config: LoramConfig) -> tuple[nn.Module, list[float]]:
    """Adapt `model` with LoRA and train it on the causal-LM loss of `batches`; returns (adapted, losses)."""
    import rankwise

    adapted = rankwise.adapt(model, _lora_config(config))
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    torch.manual_seed(config.seed)
    history = []
    adapted.train()
    for _step, ids in zip(track(range(config.steps), "loram: training LoRA on the pruned model"),
                          itertools.cycle(batches)):
        logits = run_model(adapted, ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    adapted.eval()
    return adapted, history


def recover_adapter(pruned_adapted: nn.Module, original: nn.Module, index: dict[str, dict[str, torch.Tensor]],
                    config: LoramConfig):
    """A LoRA adapter on the *original* model holding the zero-filled factors trained on the pruned model."""
    import rankwise

    full = rankwise.adapt(original, _lora_config(config))
    trained = dict(pruned_adapted.adapted_layers())
    with torch.no_grad():
        for name, layer in full.adapted_layers():
            small = trained[name].adapters["default"]
            big = layer.adapters["default"]
            A, B = recover_factors(small.lora_A, small.lora_B, tuple(layer.weight_matrix().shape), index.get(name))
            big.lora_A.copy_(A)
            big.lora_B.copy_(B)
    return full


def storage_ratio(full_params: int, pruned_params: int, base_bits: int = 16, pruned_bits: int = 16) -> float:
    """How many times smaller the training-time base is: `full * base_bits / (pruned * pruned_bits)`."""
    return full_params * base_bits / (pruned_params * pruned_bits)


def compress(model: nn.Module, config: LoramConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Prune, train LoRA small, recover and merge into `model` (returned merged, original shapes)."""
    batches = check_calibration(model, calibration)
    start = time.perf_counter()
    report = CompressionReport(method="loram", ratio=float(config.ratio), params_before=count_parameters(model))
    pruned, index = prune_llama(model, batches, config.ratio, config.prune_attention, config.keep_first,
                                config.keep_last)
    pruned_params = count_parameters(pruned)
    adapted, history = train_lora(pruned, batches, config)
    full = recover_adapter(adapted, model, index, config)
    merged = full.merge_and_unload()
    full_block = sum(count_parameters(get_module(merged, n)) for n in index)
    report.params_after = count_parameters(merged)
    report.compressed_params_before = full_block
    report.compressed_params_after = full_block  # inference model keeps the original shapes
    report.layers = {n: {k: int(v.numel()) for k, v in kept.items()} for n, kept in index.items()}
    report.extra.update({
        "pruned_model_params": pruned_params,
        "training_storage_ratio": storage_ratio(report.params_before, pruned_params),
        "trainable_lora_params": sum(p.numel() for p in adapted.parameters() if p.requires_grad),
        "train_loss_first": history[0] if history else math.nan,
        "train_loss_last": history[-1] if history else math.nan,
        "history": history,
    })
    report.notes.append("LoRAM keeps the original model size: `ratio` is the kept fraction of MLP neurons and KV heads "
                        "of the pruned model the adapter was trained on")
    report.seconds = time.perf_counter() - start
    return merged, report

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "loram", "paper": "2502.13533", "runs": "rankwise compress --method loram; rankwise.compress.compress(model, 'loram', calibration)",
     "summary": "train a pruned model small, infer large"},
)
