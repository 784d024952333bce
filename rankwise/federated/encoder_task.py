"""What a federated client trains in `--mode encoder` (the default): LoRA inside a pretrained encoder, as in
LoRA-FAIR (arXiv 2411.14961), which adapts the attention query/value projections of a pretrained backbone.

    text ── tokenized once (safetensors: ids, lengths, labels) ── the client's rows
    ids ── BERT encoder (all-MiniLM-L6-v2, frozen; LoRA on every layer's query and value) ── pooler ── classifier (trained)

Nothing is precomputed but the token ids: every local step runs the whole encoder forward and backward, so the
LoRA factors the server aggregates are those of the encoder's attention layers. The classifier head (fresh,
seeded: identical in every process) is trained and FedAvg'd. `--mode head` keeps the cheap cached-feature task
(`rankwise.federated.task`).
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

import rankwise
from rankwise.core.errors import ConfigError
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.federated.task import client_lora_config, freeze_A, load_keyed_tensors
from rankwise.train.loop import TrainConfig, train
from rankwise.train.tasks.classification import evaluate_accuracy

TOKEN_KEYS = ("train_ids", "train_len", "train_y", "test_ids", "test_len", "test_y")


@dataclass
class EncoderSpec:
    """The federated encoder model: which pretrained encoder, LoRA targets and rank, and the client's local training."""

    model: str | None = None      # a local transformers dir; None: the embedded all-MiniLM-L6-v2
    num_classes: int = 3
    rank: int = 8
    lora_alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    lr: float = 1e-3
    local_epochs: int = 1
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_classes", "rank", "local_epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"EncoderSpec.{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        if not self.targets:
            raise ConfigError("EncoderSpec.targets is empty: name the encoder's linear layers to adapt, e.g. ['query', 'value']")
        if self.model is not None:
            self.model = str(self.model)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


_BASES: dict[tuple, torch.nn.Module] = {}  # per process: the pretrained encoder + seeded head, loaded once


def _base(spec: EncoderSpec):
    key = (spec.model, spec.num_classes, spec.seed)
    if key not in _BASES:
        from rankwise.data.models import load_base

        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)  # the fresh classifier head: the same in every process
        try:
            model, _ = load_base(spec.model, "classification", num_labels=spec.num_classes, device="cpu", with_tokenizer=False)
        finally:
            torch.random.set_rng_state(generator_state)
        _BASES[key] = model.eval()
    return _BASES[key]


def build_encoder_model(spec: EncoderSpec, frozen_A: bool = False, rank: int | None = None):
    """The same LoRA-adapted encoder classifier in every process (seeded); arguments as `task.build_model`."""
    base = copy.deepcopy(_base(spec))
    heads = [name for name, _ in base.named_children() if name in ("classifier", "score")]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed + 1)
    try:
        model = rankwise.adapt(base, client_lora_config(spec, rank, target_modules=list(spec.targets), modules_to_save=heads))
    finally:
        torch.random.set_rng_state(generator_state)
    if not list(model.adapted_layers()):
        raise ConfigError(f"EncoderSpec.targets={spec.targets} matched no layer of the encoder: use its linear names, e.g. ['query', 'value']")
    if frozen_A:
        freeze_A(model)
    return model


def token_batches(data: dict[str, torch.Tensor], batch_size: int, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Batches of {input_ids, attention_mask, labels}, each trimmed to its longest row (shuffled when `seed`)."""
    ids, lengths, labels = data["ids"], data["len"], data["y"]
    order = (torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)) if seed is not None
             else torch.argsort(lengths, stable=True))  # evaluation: similar lengths together, little padding
    batches = []
    for idx in order.split(batch_size):
        width = int(lengths[idx].max())
        mask = (torch.arange(width)[None, :] < lengths[idx][:, None]).long()
        batches.append({"input_ids": ids[idx, :width].long(), "attention_mask": mask, "labels": labels[idx].long()})
    return batches


def train_local_encoder(model, data: dict[str, torch.Tensor], spec: EncoderSpec, seed: int) -> float:
    """One client's local training (the project's loop, AdamW constant lr); returns the last step's loss."""
    device = next(p.device for p in model.parameters())
    state = train(
        model,
        batches=lambda epoch: [{k: v.to(device) for k, v in b.items()} for b in token_batches(data, spec.batch_size, seed=seed + epoch)],
        loss_fn=lambda m, batch: m(**batch).loss,
        config=TrainConfig(epochs=spec.local_epochs, lr=spec.lr, schedule="constant", warmup_ratio=0.0, seed=seed),
        param_groups=model.parameter_groups(spec.lr),
        progress=False,
    )
    return float(state.loss)


def evaluate_encoder(model, data: dict[str, torch.Tensor]) -> dict[str, float]:
    return evaluate_accuracy(model, token_batches(data, 128))


def split(tokens: dict[str, torch.Tensor], part: str, idx=None) -> dict[str, torch.Tensor]:
    """{ids, len, y} of the train or test rows (optionally only rows `idx`)."""
    out = {"ids": tokens[f"{part}_ids"], "len": tokens[f"{part}_len"], "y": tokens[f"{part}_y"]}
    return out if idx is None else {k: v[idx] for k, v in out.items()}


# ---- tokenized texts, computed once and cached ----------------------------------------------------------
def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return ids, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def cached_tokens(data, model_path=None, max_length: int = 64, cache_dir: str | Path = "runs/federate/cache") -> Path:
    """Tokenize `data` (a TextClassificationData) with the encoder's tokenizer once; later calls reuse the file."""
    from rankwise.data.models import _model_dir, load_tokenizer

    path_dir = _model_dir(model_path, "classification")
    key = json.dumps({"model": str(path_dir), "data": data.summary(), "max_length": max_length,
                      "first": data.train_texts[:3], "test_first": data.test_texts[:3]}, sort_keys=True)
    path = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return path
    tokenizer = load_tokenizer(path_dir, "classification")
    pad_id = tokenizer.pad_token_id or 0
    tensors = {}
    for part, texts, labels in (("train", data.train_texts, data.train_labels), ("test", data.test_texts, data.test_labels)):
        tensors[f"{part}_ids"], tensors[f"{part}_len"] = _pad(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"], pad_id)
        tensors[f"{part}_y"] = torch.tensor(labels)
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"source": data.summary(), "label_names": data.label_names,
                                                             "model": str(path_dir), "max_length": max_length}, indent=2))
    return path


def load_tokens(path: str | Path) -> dict[str, torch.Tensor]:
    return load_keyed_tensors(path, TOKEN_KEYS, "token file",
                              " (written by cached_tokens); a feature file is for --mode head")
