"""A tiny classification task for the training-loop and procedure tests (no downloads)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import rankwise
from toy_models import MLP


def task(n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return x, y


def batcher(x, y, batch_size: int = 8):
    """`batches(epoch)`: the same shuffled list for the same epoch (a seed derived from the epoch)."""

    def batches(epoch: int):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch))
        return [(x[perm[i:i + batch_size]], y[perm[i:i + batch_size]]) for i in range(0, len(x), batch_size)]

    return batches


def ce_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def lora_mlp(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = rankwise.LoraConfig(**{"r": 4, "lora_alpha": 4, "target_modules": ["lin0", "lin1"], **kwargs})
    return rankwise.adapt(MLP(), config)


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
