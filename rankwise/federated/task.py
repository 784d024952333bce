"""What a federated client trains: a LoRA-adapted MLP head on frozen, cached sentence features.

    text ── frozen encoder (all-MiniLM-L6-v2, mean-pooled; computed ONCE, cached as safetensors) ── x (384)
    x ── fc1 (384 x h, frozen, + LoRA) ── GELU ── fc2 (h x h, frozen, + LoRA) ── GELU ── classifier (trained) ── logits

fc1/fc2 are frozen seeded random layers (every client and the server build the same ones); LoRA on them
and the classifier are what the clients train and the server aggregates. The encoder itself is never
adapted here: that keeps 8 clients x 20 rounds x 4 strategies inside minutes on 2 CPU cores.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

import rankwise
from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.federated.base import A_SUFFIX, B_SUFFIX, DELTA_SUFFIX
from rankwise.train.finetune import _batches, _encode, evaluate
from rankwise.train.loop import TrainConfig, train

ADAPTER = "default"


@dataclass
class HeadSpec:
    """The federated model: sizes, LoRA hyper-parameters and the client's local training."""

    in_features: int = 384
    hidden: int = 128
    num_classes: int = 3
    rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 3e-3
    local_epochs: int = 1
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("in_features", "hidden", "num_classes", "rank", "local_epochs", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"HeadSpec.{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        if self.rank > min(self.in_features, self.hidden):
            raise ConfigError(f"HeadSpec.rank={self.rank} exceeds the layer width {min(self.in_features, self.hidden)}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank


class FeatureHead(nn.Module):
    """A 2-hidden-layer MLP classifier over fixed features; returns a transformers-style output (loss, logits)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        hidden = nn.functional.gelu(self.fc2(nn.functional.gelu(self.fc1(features))))
        logits = self.classifier(hidden)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def client_lora_config(spec, rank: int | None, **kwargs):
    """LoRA at `rank` (default: the global `spec.rank`) with the GLOBAL scale `spec.lora_alpha / spec.rank`.

    A client of smaller rank applies the first components of the global update at the same scale, so its
    slice is exactly the truncation of the global model (alpha / r_k would rescale the update per client).
    """
    rank = spec.rank if rank is None else int(rank)
    if not 1 <= rank <= spec.rank:
        raise ConfigError(f"client rank {rank} is invalid: expected 1 <= rank <= the global rank {spec.rank}")
    return rankwise.LoraConfig(r=rank, lora_alpha=spec.lora_alpha * rank / spec.rank, **kwargs)


def freeze_A(model) -> None:
    for _, layer in model.adapted_layers():
        layer.adapters[ADAPTER].lora_A.requires_grad_(False)


def build_model(spec: HeadSpec, frozen_A: bool = False, rank: int | None = None):
    """The same adapted head in every process (seeded); `frozen_A` freezes LoRA's A (FFA-LoRA); `rank` is a
    client's own rank (<= spec.rank) for heterogeneous-rank runs."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        base = FeatureHead(spec.in_features, spec.hidden, spec.num_classes)
        model = rankwise.adapt(base, client_lora_config(spec, rank, target_modules=["fc1", "fc2"], modules_to_save=["classifier"]))
    finally:
        torch.random.set_rng_state(generator_state)
    if frozen_A:
        freeze_A(model)
    return model


def model_state(model, with_A: bool = True, with_delta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors exchanged with the server (see `rankwise.federated.base` for the key scheme)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in model.adapted_layers():
        adapter = layer.adapters[ADAPTER]
        if with_A:
            state[name + A_SUFFIX] = adapter.lora_A.detach().clone()
        state[name + B_SUFFIX] = adapter.lora_B.detach().clone()
        if with_delta:
            state[name + DELTA_SUFFIX] = torch.zeros_like(layer.base_layer.weight)
    for name, module in model.saved_modules():
        for key, tensor in module.modules_to_save[ADAPTER].state_dict().items():
            state[f"{name}.{key}"] = tensor.detach().clone()
    return state


@torch.no_grad()
def load_model_state(model, state: dict[str, torch.Tensor], truncate: bool = False) -> None:
    """Copy a global state into a freshly built model (a base_delta is added to the frozen weight).

    `truncate=True` (a heterogeneous-rank client): a model of smaller LoRA rank r than the state's takes the first r
    rows of each A and the first r columns of each B, the leading components of the global pair. Otherwise every
    shape must match exactly.
    """
    expected = model_state(model, with_delta=any(k.endswith(DELTA_SUFFIX) for k in state))
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"federated state lacks {missing[:5]}; was it written by a different model/strategy?")
    state = dict(state)
    for key, ref in (expected.items() if truncate else ()):
        if key.endswith(A_SUFFIX) and state[key].shape[1:] == ref.shape[1:] and state[key].shape[0] > ref.shape[0]:
            state[key] = state[key][: ref.shape[0]]
        elif key.endswith(B_SUFFIX) and state[key].shape[0] == ref.shape[0] and state[key].shape[1] > ref.shape[1]:
            state[key] = state[key][:, : ref.shape[1]]
    for key, ref in expected.items():
        if tuple(state[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"federated state key {key!r} has shape {tuple(state[key].shape)}, expected {tuple(ref.shape)}")
    for name, layer in model.adapted_layers():
        adapter = layer.adapters[ADAPTER]
        adapter.lora_A.copy_(state[name + A_SUFFIX])
        adapter.lora_B.copy_(state[name + B_SUFFIX])
        if name + DELTA_SUFFIX in state:
            layer.base_layer.weight.add_(state[name + DELTA_SUFFIX].to(layer.base_layer.weight.dtype))
    for name, module in model.saved_modules():
        module.modules_to_save[ADAPTER].load_state_dict({k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")})


def feature_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) if seed is not None else torch.arange(len(y))
    return [{"features": x[idx], "labels": y[idx]} for idx in order.split(batch_size)]


def train_local(model, x: torch.Tensor, y: torch.Tensor, spec: HeadSpec, seed: int) -> float:
    """One client's local training with the project's loop; returns the last step's loss."""
    state = train(
        model,
        batches=lambda epoch: feature_batches(x, y, spec.batch_size, seed=seed + epoch),
        loss_fn=lambda m, batch: m(**batch).loss,
        config=TrainConfig(epochs=spec.local_epochs, lr=spec.lr, schedule="constant", warmup_ratio=0.0, seed=seed),
        param_groups=model.parameter_groups(spec.lr),
        progress=False,
    )
    return float(state.loss)


def evaluate_features(model, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    return evaluate(model, feature_batches(x, y, 512))


# ---- frozen-encoder features, computed once and cached -----------------------------------------------
FEATURE_KEYS = ("train_x", "train_y", "test_x", "test_y")


@torch.no_grad()
def encode_texts(texts: list[str], model_path: str | Path | None, max_length: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden states of a frozen transformers encoder (sentence-transformers' pooling)."""
    from transformers import AutoModel, AutoTokenizer

    from rankwise.data.models import default_model_path

    path = Path(model_path) if model_path is not None else default_model_path()
    encoder = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = _encode(tokenizer, texts, max_length)
    features = torch.empty(len(ids), encoder.config.hidden_size)
    # Batches come length-sorted (little padding); the "labels" carry each text's index to put it back in order.
    for batch in _batches(ids, list(range(len(ids))), batch_size, tokenizer.pad_token_id or 0):
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        features[batch["labels"]] = ((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).float()
    return features


def cached_features(data, model_path=None, max_length: int = 64, cache_dir: str | Path = "runs/federate/cache") -> Path:
    """Encode `data` (a TextClassificationData) once; later calls with the same inputs reuse the file."""
    key = json.dumps({"model": str(model_path), "data": data.summary(), "max_length": max_length,
                      "first": data.train_texts[:3], "test_first": data.test_texts[:3]}, sort_keys=True)
    path = Path(cache_dir) / f"features-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return path
    tensors = {
        "train_x": encode_texts(data.train_texts, model_path, max_length),
        "train_y": torch.tensor(data.train_labels),
        "test_x": encode_texts(data.test_texts, model_path, max_length),
        "test_y": torch.tensor(data.test_labels),
    }
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"label_names": json.dumps(data.label_names)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"source": data.summary(), "label_names": data.label_names}, indent=2))
    return path


def load_keyed_tensors(path: str | Path, keys, what: str, hint: str = "") -> dict[str, torch.Tensor]:
    """A client data file (safetensors): ConfigError when absent, CheckpointError naming the missing `keys`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    tensors = load_file(str(path))
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"{what} {path} lacks {missing}: expected keys {keys}{hint}")
    return tensors


def load_features(path: str | Path) -> dict[str, torch.Tensor]:
    return load_keyed_tensors(path, FEATURE_KEYS, "feature file")


def save_features(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write features you computed yourself (keys train_x, train_y, test_x, test_y) for `rankwise federate --features`."""
    path = Path(path)
    atomic_write(path, lambda tmp: save_file({k: tensors[k].contiguous().clone() for k in FEATURE_KEYS}, tmp))
    return path


def spec_dict(spec: HeadSpec) -> dict:
    return asdict(spec)
