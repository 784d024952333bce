"""Atomic Feature Mimicking (AFM): low-rank compression by the output-feature covariance
(Yu, Fu, Ding, Zhou, Wu; "Unified Low-rank Compression Framework for Click-through Rate Prediction",
KDD 2024, arXiv 2405.18146).

Weights can be full-rank while the features they produce are not. AFM runs the model over the
calibration data, accumulates (float64) the mean `mu` and covariance of each layer's *outputs*, and
keeps the top-k principal directions `U_k`:

    y = W x + b   ->   down: (U_kᵀ W, U_kᵀ b)   up: (U_k, (I - U_k U_kᵀ) mu)
    so  y_hat = mu + U_k U_kᵀ (y - mu)        (the PCA reconstruction of the output)

Its output error is the sum of the discarded covariance eigenvalues, the least any rank-k linear
map of y can achieve. Embedding tables (per field, frequency-weighted by the lookups) become a
k-wide table `(E - mu) U_k` and a decompressing linear `(U_k, mu)`. The "+Act" variant
(`activation="relu"`) puts an activation between the factors; it is no longer exact, and the paper
then fine-tunes the compressed model on the task loss, which is where its AUC gain over the
uncompressed model comes from. That stage runs here after the mimicking (`finetune_steps`; one
pass over the calibration batches by default for +Act, none for plain AFM):

    calibration --AFM (statistics, factors)--> compressed --Adam on the task loss--> fine-tuned

The task loss: BCE-with-logits for one logit per row and float 0/1 labels (a CTR model),
cross-entropy for class logits and integer labels, the model's own `.loss` for a transformers
model given a dict batch with `labels`, and the causal-LM loss for a causal LM given plain token
ids. Labelled calibration is a list of `(inputs, labels)` pairs or of dicts with a `labels` key.

Transformer blocks are calibrated in order, each on the outputs of the already-compressed blocks;
a model without repeated blocks (a CTR model) is calibrated in one pass.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress._common import (ACTIVATIONS, CompressConfig, CompressionReport, LowRankLinear, ReportBuilder,
                                       blockwise, causal_lm_loss, check_calibration, collect_moments, find_blocks,
                                       get_module, is_causal_lm, moment_hooks, run_block, run_model,
                                       saves_parameters, select_linears, set_module, token_masks, train_in_place)
from rankwise.compress.serialize import register_module_kind
from rankwise.core.errors import ConfigError, ShapeError, TargetError, check_field
from rankwise.linalg import SecondMoments, top_eigenvectors


@dataclass
class AFMConfig(CompressConfig):
    """AFM's fields (the shared ones: `CompressConfig`).

    embedding_rank: also compress the targeted `nn.Embedding` tables to this width (None = leave embeddings).
    activation: the "+Act" variant: this activation between the two factors (None = exact PCA factors).
    finetune_steps: optimizer steps of task-loss fine-tuning after the mimicking, cycling over the
        calibration batches (0 = none). None = the paper's choice: one pass over the calibration batches
        (one epoch of the training data) when `activation` is set, none otherwise.
    finetune_lr: Adam learning rate of the fine-tuning.
    finetune_trainable: "all" (the paper: the whole compressed model trains) or "factors" (only the
        layers AFM replaced; everything else frozen).
    seed: seeds the fine-tuning (dropout), so a run is repeatable.
    """

    embedding_rank: int | None = None
    activation: str | None = None
    finetune_steps: int | None = None
    finetune_lr: float = 1e-3
    finetune_trainable: str = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.embedding_rank is None or (isinstance(self.embedding_rank, int) and self.embedding_rank >= 1),
                    "AFMConfig", "embedding_rank", self.embedding_rank, "None or a positive int")
        check_field(self.activation is None or self.activation in ACTIVATIONS, "AFMConfig", "activation",
                    self.activation, f"None or one of {sorted(ACTIVATIONS)}")
        check_field(self.finetune_steps is None or (isinstance(self.finetune_steps, int) and self.finetune_steps >= 0),
                    "AFMConfig", "finetune_steps", self.finetune_steps,
                    "None (one pass for +Act) or an int >= 0 (0 = no fine-tuning)")
        check_field(isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0, "AFMConfig", "finetune_lr",
                    self.finetune_lr, "a positive learning rate, e.g. 1e-3")
        check_field(self.finetune_trainable in FINETUNE_TRAINABLE, "AFMConfig", "finetune_trainable",
                    self.finetune_trainable, f"one of {list(FINETUNE_TRAINABLE)}")

    def resolved_finetune_steps(self, n_batches: int) -> int:
        if self.finetune_steps is not None:
            return self.finetune_steps
        return n_batches if self.activation else 0


FINETUNE_TRAINABLE = ("all", "factors")


class LowRankEmbedding(nn.Module):
    """`e = up(table[i])`: a k-wide embedding table and the linear `(U_k, mu)` that restores width d."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank = int(num_embeddings), int(embedding_dim), int(rank)
        self.table = nn.Embedding(self.num_embeddings, self.rank)
        self.up = nn.Linear(self.rank, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.up(self.table(ids))

    def spec(self) -> dict:
        return {"num": self.num_embeddings, "dim": self.embedding_dim, "rank": self.rank}

    @classmethod
    def from_spec(cls, spec: dict) -> "LowRankEmbedding":
        return cls(spec["num"], spec["dim"], spec["rank"])


register_module_kind("low_rank_embedding", LowRankEmbedding, LowRankEmbedding.spec, LowRankEmbedding.from_spec)


def embedding_shrinks(table: nn.Embedding, rank: int) -> bool:
    """A k-wide table plus its decompressor (k*d + d) must be smaller than the n x d table."""
    n, d = table.num_embeddings, table.embedding_dim
    return rank < d and n * rank + rank * d + d < n * d


def afm_factors(stats: SecondMoments, weight: torch.Tensor, bias: torch.Tensor | None, rank: int):
    """`(up, down, up_bias, down_bias)` of the AFM layer from output statistics (math in the module doc)."""
    mu = stats.mean()
    _, U = top_eigenvectors(stats.covariance(), rank)
    W = weight.detach().double()
    b = bias.detach().double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    down, down_bias = U.T @ W, U.T @ b
    up_bias = mu - U @ (U.T @ mu)
    return U, down, up_bias, down_bias


def afm_rank(in_features: int, out_features: int, ratio: float) -> int:
    """Rank whose factors *and* the two biases AFM adds (k + out) fit in `ratio * in * out` parameters."""
    return max(1, math.floor((ratio * in_features * out_features - out_features) / (in_features + out_features + 1)))


def afm_linear(linear: nn.Linear, stats: SecondMoments, rank: int, activation: str | None = None) -> LowRankLinear:
    up, down, up_bias, down_bias = afm_factors(stats, linear.weight, linear.bias, rank)
    dtype = linear.weight.dtype
    return LowRankLinear.from_factors(up.to(dtype), down.to(dtype), up_bias.to(dtype), down_bias.to(dtype),
                                      activation).to(dtype)


def afm_embedding(embedding: nn.Embedding, stats: SecondMoments, rank: int) -> LowRankEmbedding:
    """Frequency-weighted PCA of the looked-up rows: table `(E - mu) U_k`, decompressor `(U_k, mu)`."""
    mu = stats.mean()
    _, U = top_eigenvectors(stats.covariance(), rank)
    dtype = embedding.weight.dtype
    new = LowRankEmbedding(embedding.num_embeddings, embedding.embedding_dim, rank).to(dtype)
    with torch.no_grad():
        new.table.weight.copy_(((embedding.weight.double() - mu) @ U).to(dtype))
        new.up.weight.copy_(U.to(dtype))
        new.up.bias.copy_(mu.to(dtype))
    return new.to(dtype)


def _replace(model: nn.Module, names: list[str], stats: dict[str, SecondMoments], config: AFMConfig,
             report: CompressionReport) -> None:
    for name in names:
        module = get_module(model, name)
        if name not in stats:
            report.notes.append(f"{name} saw no calibration data and was left unchanged")
            continue
        if isinstance(module, nn.Embedding):
            set_module(model, name, afm_embedding(module, stats[name], config.embedding_rank))
            report.layers[name] = {"rank": config.embedding_rank, "shape": list(module.weight.shape)}
            continue
        rank = afm_rank(module.in_features, module.out_features, config.ratio)
        if not saves_parameters(module.in_features, module.out_features, rank):
            report.layers[name] = {"kept_dense": True, "shape": [module.out_features, module.in_features]}
            continue
        set_module(model, name, afm_linear(module, stats[name], rank, config.activation))
        report.layers[name] = {"rank": rank, "shape": [module.out_features, module.in_features]}


# ------------------------------------------------------------------------------- fine-tuning stage
def split_labels(calibration) -> tuple[list, list | None]:
    """`(input batches, labels per batch or None)`: a batch is inputs alone, an `(inputs, labels)` pair,
    or a dict with a `labels` key (its other keys are the inputs). All batches labelled, or none."""
    if calibration is None or isinstance(calibration, torch.Tensor):
        return calibration, None
    batches = [calibration] if isinstance(calibration, dict) else list(calibration)
    labelled = [isinstance(b, (tuple, list)) and len(b) == 2 or (isinstance(b, dict) and "labels" in b)
                for b in batches]
    if not any(labelled):
        return batches, None
    if not all(labelled):
        raise ShapeError("calibration mixes labelled and unlabelled batches: give every batch as an (inputs, labels) "
                         "pair (or a dict with 'labels'), or none")
    inputs, labels = [], []
    for b in batches:
        if isinstance(b, dict):
            inputs.append({k: v for k, v in b.items() if k != "labels"})
            labels.append(b["labels"])
        else:
            inputs.append(b[0])
            labels.append(b[1])
    return inputs, labels


def task_loss(model: nn.Module, inputs, labels: torch.Tensor | None) -> torch.Tensor:
    """The loss the fine-tuning minimises (rules in the module docstring)."""
    if labels is None:
        return causal_lm_loss(model, inputs)
    if isinstance(inputs, dict):
        try:
            out = run_model(model, {**inputs, "labels": labels})
        except TypeError as exc:
            raise ConfigError(f"AFM fine-tuning: {type(model).__name__} takes no `labels` ({exc}): use a model with a "
                              "task head, or pass (inputs, labels) pairs") from exc
        if getattr(out, "loss", None) is not None:
            return out.loss
    else:
        out = run_model(model, inputs)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(f"AFM fine-tuning: {type(model).__name__} returned a {type(logits).__name__}, not logits: "
                          "fine-tune a model with a task head (its logits), or set finetune_steps=0")
    if labels.is_floating_point() and logits.squeeze(-1).shape == labels.shape:
        return nn.functional.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.to(logits.dtype))
    if not labels.is_floating_point() and logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                                           ignore_index=-100)
    raise ShapeError(f"AFM fine-tuning: logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                     f"({labels.dtype}) match no task loss: float 0/1 labels shaped like one logit per row (BCE) or "
                     "integer class labels with class logits on the last axis (cross-entropy)")


def mean_task_loss(model: nn.Module, batches: list, labels: list | None) -> float:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(task_loss(model, b, None if labels is None else y))
                      for b, y in zip(batches, labels or [None] * len(batches))]
    finally:
        model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def finetune(model: nn.Module, batches: list, labels: list | None, steps: int, config: AFMConfig,
             factor_names: list[str]) -> dict:
    """Adam on the task loss for `steps` steps cycling over `batches`; returns what the report shows."""
    if config.finetune_trainable == "factors":
        trainable = [p for n in factor_names for p in get_module(model, n).parameters()]
    else:
        trainable = list(model.parameters())
    before = mean_task_loss(model, batches, labels)
    optimizer = torch.optim.Adam([p for p in trainable if p.is_floating_point()], lr=config.finetune_lr)
    pairs = list(zip(batches, labels or [None] * len(batches)))
    history = train_in_place(model, trainable, pairs, lambda pair: task_loss(model, *pair), steps, optimizer,
                             config.seed, "afm: fine-tuning")
    return {"steps": steps, "lr": config.finetune_lr, "trainable": config.finetune_trainable,
            "trainable_params": sum(p.numel() for p in trainable), "loss_before": before,
            "loss_after": mean_task_loss(model, batches, labels), "history": history,
            "loss": "causal-lm" if labels is None else "task labels"}


def compress(model: nn.Module, config: AFMConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Replace the targeted linears (and embeddings if `embedding_rank`) in place by AFM factors, then
    fine-tune on the task loss when `config.finetune_steps` (resolved) is > 0."""
    inputs, labels = split_labels(calibration)
    batches = check_calibration(model, inputs)
    steps = config.resolved_finetune_steps(len(batches))
    if steps and labels is None and not is_causal_lm(model):
        raise ConfigError(f"AFM fine-tuning (finetune_steps={steps}) needs the task's labels: pass calibration as "
                          "(inputs, labels) pairs or dicts with 'labels' (a causal LM trains on its own tokens), or set "
                          "finetune_steps=0")
    if steps:  # one forward of the task loss on the untouched model: a bad loss setup fails before any change
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                task_loss(model, batches[0], labels[0] if labels is not None else None)
        finally:
            model.train(was_training)
    model, report = mimic(model, config, batches)
    if steps:
        factor_names = [n for n, info in report.layers.items() if "rank" in info]
        start = time.perf_counter()
        report.extra["finetune"] = finetune(model, batches, labels, steps, config, factor_names)
        report.seconds += time.perf_counter() - start
    return model, report


def mimic(model: nn.Module, config: AFMConfig, batches: list) -> tuple[nn.Module, CompressionReport]:
    """The feature-mimicking stage: statistics of each target's outputs, then its factors."""
    types = (nn.Linear,) if config.embedding_rank is None else (nn.Linear, nn.Embedding)
    names = [n for n in select_linears(model, config, types)
             if not isinstance(get_module(model, n), nn.Embedding)
             or embedding_shrinks(get_module(model, n), config.embedding_rank)]
    if not names:
        raise TargetError(f"AFM: no targeted layer would shrink (embedding_rank={config.embedding_rank} is too large "
                          "for the matched tables): lower embedding_rank or target more layers")
    builder = ReportBuilder("afm", model, config, names)
    found = find_blocks(model)
    # block-by-block only when every target sits strictly inside a block (a ModuleList of tables is not "blocks")
    depth = found[0].count(".") + 2 if found is not None and found[0] else 1
    in_blocks = found is not None and all(n.startswith(found[0] + ".") and n.count(".") >= depth for n in names)
    if not in_blocks:
        stats = collect_moments(model, {n: get_module(model, n) for n in names}, batches, side="output")
        _replace(model, names, stats, config, builder.report)
        return model, builder.finish()
    masks = token_masks(batches)
    for index, block, inputs in blockwise(model, batches, "afm: blocks"):
        block_names = [n for n in names if n.startswith(f"{found[0]}.{index}.")]
        stats, remove = moment_hooks({n: get_module(model, n) for n in block_names}, side="output", masks=masks)
        try:
            run_block(block, inputs)
        finally:
            remove()
        _replace(model, block_names, stats, config, builder.report)
    return model, builder.finish()

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "afm", "paper": "2405.18146", "runs": "rankwise compress --method afm; rankwise.compress.compress(model, 'afm', calibration)",
     "summary": "atomic feature mimicking: low-rank by output-feature covariance"},
)
