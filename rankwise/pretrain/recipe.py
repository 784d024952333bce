"""Pretrain a small LLaMA-style causal LM from scratch on offline text, with a low-rank method.

    text --bytes--> tokens --(random seq_len windows)--> LlamaForCausalLM (vocab 256)
    method: full (AdamW) | galore (GaLoreAdamW) | dct (DCTAdamW) | sltrain (W = BA + S) | lost (SVD split)
    out/: config.json + model.safetensors (a transformers directory), pretrain_config.json, metrics.json,
          val_ppl.png; SLTrain/LOST also pretrain_factors.safetensors (the factors `load_run` rebuilds)

The schedule is the LLaMA-C4 setup's: linear warmup over `warmup_ratio` of the steps, then cosine
to `min_lr_ratio` of the peak. Validation perplexity is measured on fixed windows of the last
`val_fraction` of the corpus (per byte, since the tokens are bytes).
"""
from __future__ import annotations

import dataclasses
import json
import math
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rankwise.core.errors import CheckpointError, ConfigError, check_field
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.data.offline_text import encode_bytes, load_corpus
from rankwise.optim.dct import PRESETS as DCT_PRESETS
from rankwise.optim.dct import DCTAdamW
from rankwise.optim.galore import GaLoreAdamW, low_rank_param_groups, optimizer_state_bytes

METHODS = ("full", "galore", "dct", "sltrain", "lost")
DEFAULT_LR = {"full": 3e-3, "galore": 1e-2, "dct": 3e-3, "sltrain": 3e-3, "lost": 3e-3}
# the optimizers own their refresh-period defaults; the recipe and the bench's JSON read them from there
DEFAULT_GAP = {"galore": GaLoreAdamW.group_defaults["update_proj_gap"],
               "dct": DCTAdamW.group_defaults["update_proj_gap"]}
DEFAULT_SPARSITY = {"sltrain": 0.03, "lost": 0.05}
PROJECTED_TARGETS = ("attn", "mlp")


@dataclass
class PretrainConfig:
    """Everything a pretraining run depends on; saved next to the model as `pretrain_config.json`."""

    method: str = "full"
    corpus: str = "kjv"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 688
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 500
    lr: float | None = None            # None: the method's default (DEFAULT_LR)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0             # 0: no clipping (per-layer mode clips through attach_to_backward)
    eval_every: int = 50
    eval_batches: int = 8
    val_fraction: float = 0.05
    rank: int | None = None            # None: hidden_size // 4 (GaLore/DCT/SLTrain/LOST)
    update_proj_gap: int | None = None  # None: the optimizer's default (DEFAULT_GAP, 200 for both)
    galore_scale: float = 0.25
    sparsity: float | None = None      # SLTrain delta (0.03) or LOST rho (0.05)
    lora_alpha: float = 32.0           # SLTrain's fixed scale s = lora_alpha / rank
    gamma: float = 0.5                 # LOST's low-rank/sparse mix
    per_layer: bool = False            # GaLore/DCT: update each layer inside backward
    dct_preset: str = "tuned"          # DCT: "tuned" (gap 200, stable slots) or "paper" (gap 1, reference slots)
    dct_error_feedback: bool = False   # DCT: the reference's use_ef
    seed: int = 0

    def __post_init__(self):
        name = "PretrainConfig"
        check_field(self.method in METHODS, name, "method", self.method, f"one of {METHODS}")
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "seq_len", "batch_size", "steps",
                    "eval_every", "eval_batches"):
            value = getattr(self, key)
            check_field(isinstance(value, int) and value >= 1, name, key, value, "an int >= 1")
        check_field(self.hidden_size % self.num_heads == 0, name, "num_heads", self.num_heads,
                    f"a divisor of hidden_size={self.hidden_size}")
        check_field(self.lr is None or self.lr > 0, name, "lr", self.lr, "a float > 0 (or None for the default)")
        check_field(0 <= self.warmup_ratio < 1, name, "warmup_ratio", self.warmup_ratio, "a float in [0, 1)")
        check_field(0 <= self.min_lr_ratio <= 1, name, "min_lr_ratio", self.min_lr_ratio, "a float in [0, 1]")
        check_field(0 < self.val_fraction < 0.5, name, "val_fraction", self.val_fraction, "a float in (0, 0.5)")
        check_field(self.rank is None or (isinstance(self.rank, int) and self.rank >= 1), name, "rank", self.rank,
                    "an int >= 1")
        check_field(self.update_proj_gap is None or self.update_proj_gap >= 1, name, "update_proj_gap",
                    self.update_proj_gap, "an int >= 1")
        check_field(self.sparsity is None or 0 < self.sparsity < 1, name, "sparsity", self.sparsity, "a float in (0, 1)")
        check_field(self.dct_preset in DCT_PRESETS, name, "dct_preset", self.dct_preset, f"one of {tuple(DCT_PRESETS)}")
        check_field(not self.per_layer or self.method in ("galore", "dct"), name, "per_layer", self.per_layer,
                    "False unless method is 'galore' or 'dct'")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def effective_rank(self) -> int:
        return self.rank if self.rank is not None else max(1, self.hidden_size // 4)


# -- model and optimizer ---------------------------------------------------------------------------
def build_model(config: PretrainConfig) -> nn.Module:
    """A LLaMA-style causal LM (transformers' LlamaForCausalLM, random init) with the method's layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    llama = LlamaConfig(vocab_size=256, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                        num_key_value_heads=config.num_heads, max_position_embeddings=config.seq_len,
                        tie_word_embeddings=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(llama)
    rank = config.effective_rank
    if config.method == "sltrain":
        from rankwise.pretrain.sltrain import sltrain_model

        sltrain_model(model, rank=rank, delta=config.sparsity or DEFAULT_SPARSITY["sltrain"],
                      lora_alpha=config.lora_alpha, seed=config.seed)
    elif config.method == "lost":
        from rankwise.pretrain.lost import lost_model

        lost_model(model, rank=rank, sparsity=config.sparsity or DEFAULT_SPARSITY["lost"], gamma=config.gamma)
    return model


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    lr, wd = config.effective_lr, config.weight_decay
    if config.method == "galore":
        groups = low_rank_param_groups(model, PROJECTED_TARGETS, rank=config.effective_rank,
                                       update_proj_gap=config.update_proj_gap or DEFAULT_GAP["galore"],
                                       scale=config.galore_scale, proj_type="std")
        return GaLoreAdamW(groups, lr=lr, weight_decay=wd)
    if config.method == "dct":
        gap = {"update_proj_gap": config.update_proj_gap} if config.update_proj_gap else {}  # else the preset's
        groups = low_rank_param_groups(model, PROJECTED_TARGETS, rank=config.effective_rank,
                                       use_ef=config.dct_error_feedback, **gap)
        return DCTAdamW(groups, lr=lr, weight_decay=wd, preset=config.dct_preset)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=wd)


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    warmup = int(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def projected_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The attention/MLP linear weights: the matrices GaLore/DCT project (state compared on these)."""
    return [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)
            and any(t in n for t in PROJECTED_TARGETS)]


# -- data ------------------------------------------------------------------------------------------
def split_tokens(config: PretrainConfig, text: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = encode_bytes(text if text is not None else load_corpus(config.corpus))
    split = int(len(tokens) * (1 - config.val_fraction))
    train, val = tokens[:split], tokens[split:]
    if len(val) < config.seq_len + 1 or len(train) < config.seq_len + 1:
        raise ConfigError(f"corpus {config.corpus!r} has {len(tokens)} bytes: too short for seq_len={config.seq_len} "
                          f"with val_fraction={config.val_fraction}; use a longer corpus or a smaller --seq-len")
    return train, val


def validation_windows(val: torch.Tensor, config: PretrainConfig) -> torch.Tensor:
    """Fixed, evenly spaced windows (eval_batches * batch_size of them) over the held-out tokens."""
    count = config.eval_batches * config.batch_size
    starts = torch.linspace(0, len(val) - config.seq_len, count).long()
    return torch.stack([val[s:s + config.seq_len] for s in starts])


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = [float(model(input_ids=batch.to(device), labels=batch.to(device)).loss)
              for batch in windows.split(batch_size)]
    model.train(was_training)
    return math.exp(statistics.fmean(losses))


# -- files -----------------------------------------------------------------------------------------
FACTORS = "pretrain_factors.safetensors"  # SLTrain/LOST: the trained factors, what `load_run` rebuilds from
# transformers prints model_type verbatim in its "does not recognize this architecture" error
LOADER_POINTER = ("rankwise-pretrain run with nonlinear factored layers, not loadable by transformers alone: "
                  "load it with rankwise.pretrain.load_run(dir)")


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The state dict of the plain transformers architecture `model` stands for, with every SLTrain/LOST layer
    multiplied back into a dense `W = s B A + S` (an affine probe, exact up to float rounding); None for a
    model without a transformers config, or with a layer that is not linear (LOST's SiLU inside its factors)."""
    from transformers import PreTrainedModel

    from rankwise.linalg import affine_map_of

    if not isinstance(model, PreTrainedModel):
        return None
    with torch.device("meta"):
        fresh = type(model)(model.config)
    expected = fresh.state_dict()
    state = {k: v for k, v in model.state_dict().items() if k in expected}
    for name, module in model.named_modules():
        original = fresh.get_submodule(name) if name else fresh
        if type(module) is type(original) or not isinstance(original, nn.Linear):
            continue
        found = affine_map_of(module, original.in_features)
        if found is None:
            return None
        weight, bias = found
        dtype = next(module.parameters()).dtype
        state[f"{name}.weight"] = weight.to(dtype).cpu()
        if original.bias is not None:
            state[f"{name}.bias"] = bias.to(dtype).cpu()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"merging for transformers left {missing[:3]} without a tensor")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_run(out_dir: Path, model: nn.Module, config: PretrainConfig, metrics: dict) -> None:
    """Write the run as a plain transformers directory (config.json + model.safetensors, dense weights:
    `LlamaForCausalLM.from_pretrained(out)` gives the trained model's outputs) plus the rankwise files.

    SLTrain layers (and linear LOST, activation "none") are merged into dense weights for transformers; their
    factors are kept in `pretrain_factors.safetensors`, which `load_run` rebuilds the factored model from.
    LOST with its SiLU is not a Llama: only the factors are written, and config.json's model_type is
    `LOADER_POINTER`, so `AutoModel*.from_pretrained(out)` fails naming `rankwise.pretrain.load_run`.
    """
    from safetensors.torch import save_file

    from rankwise.core.io import atomic_directory

    from transformers import PreTrainedModel

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    hf_config = None
    if isinstance(model, PreTrainedModel):
        hf_config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
        if merged is None:
            # not expressible as the architecture: transformers must refuse it (pointer in model_type), and no
            # model.safetensors lets a concrete class (LlamaForCausalLM.from_pretrained) load random weights
            hf_config["rankwise_model_type"] = hf_config.get("model_type")
            hf_config["model_type"] = LOADER_POINTER
    # Weights, config and metrics swap in together: a crash leaves the previous run's files complete.
    with atomic_directory(out_dir) as stage:
        if merged is not None or hf_config is None:
            weights = merged if merged is not None else state
            atomic_write(stage / "model.safetensors", lambda tmp: save_file(weights, tmp, metadata={"format": "pt"}))
        if hf_config is not None and (merged is None or set(merged) != set(state)):
            atomic_write(stage / FACTORS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        if hf_config is not None:
            atomic_write_text(stage / "config.json", json.dumps(hf_config, indent=2))
        atomic_write_text(stage / "pretrain_config.json", json.dumps(dataclasses.asdict(config), indent=2))
        atomic_write_text(stage / "metrics.json", json.dumps(metrics, indent=2))
        plot_curves({config.method: metrics}, stage / "val_ppl.png")


def load_run(out_dir: str | Path) -> tuple[nn.Module, PretrainConfig]:
    """Rebuild a model saved by `pretrain` (safetensors only) and its config, factored layers included.

    Runs written before `pretrain_factors.safetensors` existed (factors in `model.safetensors`) load the same."""
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    config_path, weights_path = out_dir / "pretrain_config.json", out_dir / "model.safetensors"
    if (out_dir / FACTORS).is_file():  # SLTrain/LOST: model.safetensors (if any) holds merged dense weights
        weights_path = out_dir / FACTORS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: pass the --out directory of a `rankwise pretrain` run")
    config = PretrainConfig(**json.loads(config_path.read_text()))
    model = build_model(config)
    try:
        state = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupted files
        raise CheckpointError(f"{weights_path} cannot be read ({error}); re-run `rankwise pretrain`") from error
    expected = model.state_dict()
    for key, tensor in state.items():
        if key not in expected or expected[key].shape != tensor.shape:
            raise CheckpointError(f"{weights_path}: tensor {key!r} {tuple(tensor.shape)} does not fit the model "
                                  f"built from {config_path}")
    missing = set(expected) - set(state)
    if missing:
        raise CheckpointError(f"{weights_path} lacks {sorted(missing)[:3]}...: the file is truncated or from another run")
    model.load_state_dict(state)
    return model, config


def plot_curves(runs: dict[str, dict], path: Path, title: str = "validation perplexity") -> None:
    """One validation-perplexity-vs-tokens curve per run (metrics dicts from `pretrain`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, metrics in runs.items():
        curve = metrics["val_curve"]
        ax.plot([p["tokens"] for p in curve], [p["val_ppl"] for p in curve], marker="o", markersize=3, label=label)
    ax.set_xlabel("training tokens (bytes)")
    ax.set_ylabel("validation perplexity (per byte)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


# -- the run ---------------------------------------------------------------------------------------
def pretrain(config: PretrainConfig, out_dir: str | Path | None = None, text: str | None = None,
             show_progress: bool = True, device: str = "auto") -> dict:
    """Train from scratch; returns the metrics dict (also written to `out_dir/metrics.json` if given).

    device: "auto" (CUDA when available), "cpu" or "cuda" (a `ConfigError` when CUDA is absent); the model and
            every batch live there, the saved weights are copied back to the CPU.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from rankwise.data.models import resolve_device

    torch_device = resolve_device(device)  # before any data is read: a bad --device fails at once
    train, val = split_tokens(config, text)
    windows = validation_windows(val, config)
    model = build_model(config).to(torch_device)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(config.steps, config.warmup_ratio, config.min_lr_ratio))
    hooks = (optimizer.attach_to_backward(max_grad_norm=config.grad_clip or None)  # clipped inside step()
             if config.per_layer else None)
    generator = torch.Generator().manual_seed(config.seed)
    tokens_per_step = config.batch_size * config.seq_len
    curve, step_times, train_losses = [], [], []
    start = time.perf_counter()
    with Progress(TextColumn(f"pretrain {config.method}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not show_progress) as progress:
        task = progress.add_task("train", total=config.steps, info="")
        for step in range(1, config.steps + 1):
            starts = torch.randint(0, len(train) - config.seq_len, (config.batch_size,), generator=generator)
            batch = torch.stack([train[s:s + config.seq_len] for s in starts]).to(torch_device)
            tick = time.perf_counter()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            if config.grad_clip > 0 and not config.per_layer:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step_times.append(time.perf_counter() - tick)
            train_losses.append(float(loss.detach()))
            if not math.isfinite(train_losses[-1]):
                raise FloatingPointError(f"{config.method}: training loss became {train_losses[-1]} at step {step}; "
                                         f"lower --lr (now {config.effective_lr})")
            if step % config.eval_every == 0 or step == config.steps:
                curve.append({"step": step, "tokens": step * tokens_per_step,
                              "val_ppl": perplexity(model, windows, config.batch_size)})
            progress.update(task, advance=1, info=f"loss {train_losses[-1]:.3f}" + (
                f" val ppl {curve[-1]['val_ppl']:.2f}" if curve else ""))
    if hooks:
        hooks.remove()
    metrics = run_metrics(model, optimizer, config, curve, step_times, train_losses, time.perf_counter() - start)
    if out_dir is not None:
        save_run(Path(out_dir), model, config, metrics)
    return metrics


def run_metrics(model, optimizer, config, curve, step_times, train_losses, seconds) -> dict:
    matrices = projected_matrices(model)
    layer_params = sum(p.numel() for n, m in model.named_modules() if any(t in n for t in PROJECTED_TARGETS)
                       for p in m.parameters(recurse=False))
    return {
        "method": config.method,
        "corpus": config.corpus,
        "lr": config.effective_lr,
        "rank": config.effective_rank if config.method != "full" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "attn_mlp_params": layer_params,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        # state held for the attention/MLP weights (the matrices GaLore/DCT project; SLTrain/LOST have none)
        "projected_matrices_state_bytes": optimizer_state_bytes(optimizer, matrices) if matrices else 0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "step_time_median_s": statistics.median(step_times),
        "tokens": config.steps * config.batch_size * config.seq_len,
        "final_train_loss": statistics.fmean(train_losses[-10:]),
        "final_val_ppl": curve[-1]["val_ppl"],
        "val_curve": curve,
        "wall_seconds": seconds,
        "threads": torch.get_num_threads(),
    }
