"""LoRAM: train small, infer large (Zhang et al., ICLR 2025, arXiv 2502.13533).

    original W0 --prune--> small Wp --LoRA training (B_p A_p)--> recover (zero-fill) --> W0 + s B A

1. Structured pruning of the original (the paper uses LLM-Pruner indices): per Llama block, drop the
   MLP neurons (rows of gate/up, columns of down) and whole KV heads (rows of k/v, and the
   `n_heads / n_kv` query heads of each dropped KV head: rows of q, columns of o) with the smallest
   calibration importance. The first/last blocks are kept whole. Two scores:
   - `importance="activation"`: `E[a_i^2] * ||W_out[:, i]||^2`, the energy the structure writes out;
   - `importance="gradient"`: LLM-Pruner's element-wise first-order Taylor score (Ma, Fang, Wang,
     arXiv 2305.11627): `sum over the structure's weights of |w * dL/dw|`, dL/dw the gradient of the
     causal-LM loss summed over the calibration batches (what the loss would move by zeroing them).
1b. Alignment (`align_steps` > 0): full-parameter continued pre-training of the *pruned* model on
   the calibration text (causal-LM loss, AdamW at `align_lr`, the LM head frozen as in the paper),
   so it behaves more like the original before LoRA trains on it.
2. LoRA (rankwise.adapt, r=8, alpha=16 on q,k,v,o,gate,up,down) is trained on the *pruned* model
   with the causal-LM loss on the training/calibration batches: memory and compute of the small model.
   `quantize="int8"|"int4"` first quantizes the pruned frozen base (QLoRAM, via `rankwise.quantize_base`).
3. Recovery (`lora_recover_type='zeroA'`): B gets zero rows at pruned output indices, A gets zero
   columns at pruned input indices, so the update lives only on the kept weights.
4. The recovered adapter is merged into the original full-precision model: `W0 + (alpha/r) B_rec A_rec`
   (never into the aligned or quantized pruned weights).

    original --prune--> pruned --align (1b)--> aligned --quantize?--> base --LoRA--> B', A'
       |                                                                              | zero-fill
       +---------------------------------- W0 + s B A <-------------------------------+

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

from rankwise.compress._common import (CompressConfig, CompressionReport, causal_lm_loss, check_calibration,
                                       count_parameters, collect_moments, find_blocks, get_module,
                                       mean_causal_lm_loss, track, train_in_place)
from rankwise.core.errors import ConfigError, TargetError, check_field

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


IMPORTANCE = ("activation", "gradient")
QUANTIZE = (None, "int8", "int4")


@dataclass
class LoramConfig(CompressConfig):
    """LoRAM's fields (the shared ones: `CompressConfig`; `ratio` is the kept fraction of neurons/KV heads).

    r: LoRA rank trained on the pruned model.
    lora_alpha: LoRA scale numerator (the update is `lora_alpha / r * B A`).
    lora_target_modules: the layer names LoRA adapts.
    prune_attention: also prune whole KV heads (with their query heads), not only MLP neurons.
    keep_first / keep_last: blocks at the start / end of the model left unpruned.
    steps: LoRA training steps on the pruned model.
    lr: LoRA learning rate (AdamW).
    seed: seeds the LoRA initialisation and training.
    importance: "activation" (output energy) or "gradient" (first-order Taylor `|w * dL/dw|`, LLM-Pruner).
    align_steps: full-parameter continued pre-training steps of the pruned model before LoRA (the
        paper's step 1b; 0 = no alignment).
    align_lr: AdamW learning rate of the alignment (the paper's 5e-5 suits long runs; raise it for a few steps).
    quantize: None, "int8" or "int4": quantize the pruned model's frozen base before LoRA (QLoRAM).
    quantize_group_size: int4 group size (layers whose input width it does not divide stay dense).
    """

    r: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    prune_attention: bool = True
    keep_first: int = 1
    keep_last: int = 1
    steps: int = 30
    lr: float = 1e-3
    seed: int = 0
    importance: str = "activation"
    align_steps: int = 0
    align_lr: float = 5e-5
    quantize: str | None = None
    quantize_group_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "LoramConfig"
        check_field(isinstance(self.r, int) and self.r >= 1, name, "r", self.r, "an int >= 1")
        check_field(self.lora_alpha > 0, name, "lora_alpha", self.lora_alpha, "a positive number")
        check_field(isinstance(self.steps, int) and self.steps >= 0, name, "steps", self.steps, "an int >= 0")
        check_field(self.lr > 0, name, "lr", self.lr, "a positive learning rate")
        check_field(self.keep_first >= 0 and self.keep_last >= 0, name, "keep_first/keep_last",
                    (self.keep_first, self.keep_last), "non-negative block counts")
        check_field(self.importance in IMPORTANCE, name, "importance", self.importance, f"one of {list(IMPORTANCE)}")
        check_field(isinstance(self.align_steps, int) and self.align_steps >= 0, name, "align_steps",
                    self.align_steps, "an int >= 0 (0 = no alignment)")
        check_field(self.align_lr > 0, name, "align_lr", self.align_lr, "a positive learning rate")
        check_field(self.quantize in QUANTIZE, name, "quantize", self.quantize, "None, 'int8' or 'int4'")
        check_field(isinstance(self.quantize_group_size, int) and self.quantize_group_size >= 1, name,
                    "quantize_group_size", self.quantize_group_size, "a positive int, e.g. 64")
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


def _head_layout(attn: nn.Module) -> tuple[int, int, int]:
    """`(head_dim, n_kv_heads, query heads per KV head)` of a Llama attention module."""
    hd = attn.head_dim
    return hd, attn.k_proj.out_features // hd, attn.q_proj.out_features // attn.k_proj.out_features


def activation_scores(model: nn.Module, blocks: nn.ModuleList, batches: list, indices: list[int]) -> dict:
    """`{block: (neuron scores, KV-head scores)}`: `E[a_i^2] * ||W_out[:, i]||^2`, the energy each
    MLP neuron (input i of down_proj) or KV head (its query heads' columns of o_proj) writes out."""
    watched = {}
    for i in indices:
        watched[f"{i}.mlp"] = blocks[i].mlp.down_proj
        watched[f"{i}.attn"] = blocks[i].self_attn.o_proj
    stats = collect_moments(model, watched, batches, side="input")
    scores = {}
    for i in indices:
        mlp, attn = blocks[i].mlp, blocks[i].self_attn
        neurons = stats[f"{i}.mlp"].correlation().diagonal() * mlp.down_proj.weight.detach().double().pow(2).sum(0)
        hd, n_kv, group = _head_layout(attn)
        power = stats[f"{i}.attn"].correlation().diagonal() * attn.o_proj.weight.detach().double().pow(2).sum(0)
        scores[i] = (neurons, power.view(n_kv, group * hd).sum(1))
    return scores


def gradient_scores(model: nn.Module, blocks: nn.ModuleList, batches: list, indices: list[int]) -> dict:
    """`{block: (neuron scores, KV-head scores)}` by LLM-Pruner's element-wise first-order Taylor score
    (arXiv 2305.11627): `|w * dL/dw|` with L the causal-LM loss summed over `batches`, summed over the
    weights of each structure (a neuron: its gate/up rows and down column; a KV head: its k/v rows,
    its query heads' q rows and o columns)."""
    weights: dict[tuple[int, str], torch.Tensor] = {}
    for i in indices:
        mlp, attn = blocks[i].mlp, blocks[i].self_attn
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if getattr(mlp, proj, None) is not None:
                weights[(i, proj)] = getattr(mlp, proj).weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            weights[(i, proj)] = getattr(attn, proj).weight
    keys = list(weights)
    flags = [weights[k].requires_grad for k in keys]
    grads = {k: torch.zeros_like(weights[k]) for k in keys}
    try:
        for k in keys:
            weights[k].requires_grad_(True)
        for batch in track(batches, "loram: gradient importance"):
            loss = causal_lm_loss(model, batch)
            for k, g in zip(keys, torch.autograd.grad(loss, [weights[k] for k in keys])):
                grads[k] += g
    finally:
        for k, flag in zip(keys, flags):
            weights[k].requires_grad_(flag)
    taylor = {k: (weights[k].detach() * grads[k]).abs().double() for k in keys}
    scores = {}
    for i in indices:
        attn = blocks[i].self_attn
        neurons = taylor[(i, "down_proj")].sum(0)
        for proj in ("gate_proj", "up_proj"):
            if (i, proj) in taylor:
                neurons = neurons + taylor[(i, proj)].sum(1)
        hd, n_kv, group = _head_layout(attn)
        kv = (taylor[(i, "k_proj")].sum(1) + taylor[(i, "v_proj")].sum(1)).view(n_kv, hd).sum(1)
        q_heads = taylor[(i, "q_proj")].sum(1) + taylor[(i, "o_proj")].sum(0)
        scores[i] = (neurons, kv + q_heads.view(n_kv, group * hd).sum(1))
    return scores


def prune_llama(model: nn.Module, batches: list, ratio: float, prune_attention: bool = True,
                keep_first: int = 1, keep_last: int = 1,
                importance: str = "activation") -> tuple[nn.Module, dict[str, dict[str, torch.Tensor]]]:
    """A structurally pruned copy of a Llama-style model and `{layer name: {"rows"|"cols": kept indices}}`."""
    found = find_blocks(model)
    if found is None or not all(hasattr(b, "mlp") and hasattr(b, "self_attn") for b in found[1]):
        raise TargetError(f"LoRAM's structured pruning supports Llama-style blocks; {type(model).__name__} has none")
    if importance not in IMPORTANCE:
        raise ConfigError(f"importance={importance!r} is not one of {list(IMPORTANCE)}")
    prefix, blocks = found
    indices = [i for i in range(len(blocks)) if keep_first <= i < len(blocks) - keep_last]
    score_fn = gradient_scores if importance == "gradient" else activation_scores
    scores = score_fn(model, blocks, batches, indices)
    pruned = copy.deepcopy(model)
    index: dict[str, dict[str, torch.Tensor]] = {}
    for i in indices:
        name = f"{prefix}.{i}"
        neuron_scores, kv_scores = scores[i]
        mlp = get_module(pruned, f"{name}.mlp")
        keep = _top(neuron_scores, max(1, round(ratio * len(neuron_scores))))
        for proj in ("gate_proj", "up_proj"):
            if getattr(mlp, proj, None) is not None:
                setattr(mlp, proj, _select(getattr(mlp, proj), rows=keep))
                index[f"{name}.mlp.{proj}"] = {"rows": keep}
        mlp.down_proj = _select(mlp.down_proj, cols=keep)
        index[f"{name}.mlp.down_proj"] = {"cols": keep}
        if not prune_attention:
            continue
        attn = get_module(pruned, f"{name}.self_attn")
        hd, n_kv, group = _head_layout(attn)
        kv_rows, q_rows = kv_head_rows(_top(kv_scores, max(1, round(ratio * n_kv))), hd, group)
        attn.q_proj, attn.o_proj = _select(attn.q_proj, rows=q_rows), _select(attn.o_proj, cols=q_rows)
        attn.k_proj, attn.v_proj = _select(attn.k_proj, rows=kv_rows), _select(attn.v_proj, rows=kv_rows)
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            index[f"{name}.self_attn.{proj}"] = {"rows": rows}
        index[f"{name}.self_attn.o_proj"] = {"cols": q_rows}
    return pruned, index


# ----------------------------------------------------------------------------------- alignment
def align_pruned(pruned: nn.Module, batches: list, steps: int, lr: float, seed: int = 0) -> dict:
    """The paper's step 1b: full-parameter causal-LM training of the pruned model, LM head frozen.

    Trains `pruned` in place for `steps` AdamW steps cycling over `batches`; returns the mean loss
    over `batches` before and after, and the per-step history.
    """
    head = pruned.get_output_embeddings() if hasattr(pruned, "get_output_embeddings") else None
    frozen = {id(p) for p in head.parameters()} if head is not None else set()  # tied embeddings freeze too
    params = [p for p in pruned.parameters() if id(p) not in frozen and p.is_floating_point()]
    before = mean_causal_lm_loss(pruned, batches)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = train_in_place(pruned, params, batches, lambda batch: causal_lm_loss(pruned, batch), steps, optimizer,
                             seed, "loram: aligning the pruned model")
    return {"steps": steps, "lr": lr, "loss_before": before, "loss_after": mean_causal_lm_loss(pruned, batches),
            "history": history}


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
        loss = causal_lm_loss(adapted, ids)
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
    """Prune (1), align (1b, `align_steps`), optionally quantize the pruned base, train LoRA small (2),
    recover (3) and merge into `model` (4; returned merged, original shapes)."""
    batches = check_calibration(model, calibration)
    if config.quantize is not None:  # fail before pruning when torchao is missing
        from rankwise.quant import torchao_config

        torchao_config(config.quantize, config.quantize_group_size)
    start = time.perf_counter()
    report = CompressionReport(method="loram", ratio=float(config.ratio), params_before=count_parameters(model))
    pruned, index = prune_llama(model, batches, config.ratio, config.prune_attention, config.keep_first,
                                config.keep_last, config.importance)
    pruned_params = count_parameters(pruned)
    report.extra["importance"] = config.importance
    if config.align_steps:
        report.extra["align"] = align_pruned(pruned, batches, config.align_steps, config.align_lr, config.seed)
    if config.quantize is not None:
        from rankwise.quant import quantize_base

        quant = quantize_base(pruned, config.quantize, group_size=config.quantize_group_size)
        report.extra["quantize"] = {"scheme": quant.scheme, "layers": len(quant.layers), "skipped": quant.skipped,
                                    "weight_bytes_before": quant.weight_bytes_before,
                                    "weight_bytes_after": quant.weight_bytes_after}
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
        "training_storage_ratio": storage_ratio(report.params_before, pruned_params,
                                                pruned_bits={None: 16, "int8": 8, "int4": 4}[config.quantize]),
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
