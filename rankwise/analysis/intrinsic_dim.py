"""Intrinsic dimension of an objective: train only in a random d-dimensional subspace.

Li, Farkhoor, Liu & Yosinski, "Measuring the intrinsic dimension of objective landscapes",
ICLR 2018, arXiv 1804.08838 (reference code: uber-research/intrinsic-dimension).

    theta (D) = theta_0 (D, frozen random init) + P (D x d, frozen) @ theta_d (d, trained, starts at 0)

P is *dense* (N(0,1) entries, every column scaled to unit norm; O(D d) memory), *sparse* (the
reference code's `SparseRandomProjection` variant: per parameter tensor of D_l entries, each entry of P
is +-1 with probability 1/sqrt(D_l) and 0 otherwise, then every column scaled to unit norm across all
tensors; stored as a sparse matrix, d * sum_l sqrt(D_l) non-zeros expected), or *Fastfood* (O(D) memory,
O(D log D) time)::

    LL = 2^ceil(log2 D);  x = H (G * Pi(H (B * pad(theta_d, LL))));  keep the first D entries;
    divide by sqrt(LL * sum G^2) * sqrt(D / LL)       (columns have norm ~1)

with H the unnormalised Walsh-Hadamard transform, B random signs, Pi a permutation, G Gaussian.
d_int90 is the smallest d in a grid whose mean accuracy reaches 90 % of the directly trained
network's ("individual" baseline) or of a fixed global value.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rankwise.core.errors import ConfigError
from rankwise.linalg import fwht, seeded_generator

PROJECTIONS = ("dense", "sparse", "fastfood")


class DenseProjection(nn.Module):
    """theta_d (d) -> P theta_d (D), P Gaussian with unit-norm columns (a frozen buffer)."""

    def __init__(self, D: int, d: int, seed: int = 0):
        super().__init__()
        P = torch.randn(D, d, generator=seeded_generator(seed))
        self.register_buffer("P", P / torch.linalg.norm(P, dim=0, keepdim=True), persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return self.P @ theta


class SparseProjection(nn.Module):
    """theta_d (d) -> P theta_d (D), P sparse with unit-norm columns (the paper's sparse variant).

    P is split into row blocks, one per parameter tensor (`layer_sizes`, summing to D). In a block of
    D_l rows each entry is non-zero with probability density_l = 1/sqrt(D_l) (sklearn's "auto" density,
    which the reference code uses per layer), with a random sign; each column is then scaled to unit
    norm over all blocks. Only the non-zeros are stored (a COO matrix), so memory is
    ~ sum_l density_l * D_l * d = d * sum_l sqrt(D_l) values, against D * d for dense::

        P (D x d)  =  [ block for tensor 1 (D_1 x d, density 1/sqrt(D_1)) ]
                      [ block for tensor 2 (D_2 x d, density 1/sqrt(D_2)) ]   columns: unit norm
                      [ ...                                               ]
    """

    def __init__(self, D: int, d: int, seed: int = 0, layer_sizes: list[int] | None = None):
        super().__init__()
        layer_sizes = [D] if layer_sizes is None else list(layer_sizes)
        if sum(layer_sizes) != D or any(size < 1 for size in layer_sizes):
            raise ConfigError(f"layer_sizes={layer_sizes} is invalid: expected positive sizes summing to D={D}.")
        generator = seeded_generator(seed)
        rows, cols = [], []
        offset = 0
        for size in layer_sizes:
            density = 1.0 / math.sqrt(size)
            # draw the (size x d) mask a few columns at a time: the transient stays ~1M entries whatever D d is
            width = max(1, (1 << 20) // size)
            for first in range(0, d, width):
                block_rows, block_cols = (torch.rand(size, min(width, d - first), generator=generator) < density).nonzero(as_tuple=True)
                rows.append(offset + block_rows)
                cols.append(first + block_cols)
            offset += size
        row_index = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
        col_index = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        empty = torch.ones(d, dtype=torch.bool)
        empty[col_index] = False
        if bool(empty.any()):  # a column with no entry at all would be a dead direction: give it one
            lonely = empty.nonzero().flatten()
            row_index = torch.cat([row_index, torch.randint(D, (len(lonely),), generator=generator)])
            col_index = torch.cat([col_index, lonely])
        signs = torch.randint(2, (row_index.numel(),), generator=generator).float() * 2 - 1
        per_column = torch.bincount(col_index, minlength=d).float()
        values = signs / per_column[col_index].sqrt()  # +-1/sqrt(nnz of the column): unit-norm columns
        P = torch.sparse_coo_tensor(torch.stack([row_index, col_index]), values, (D, d), check_invariants=True).coalesce()
        self.register_buffer("P", P, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.sparse.mm(self.P, theta.unsqueeze(1)).squeeze(1)


class FastfoodProjection(nn.Module):
    """theta_d (d) -> (D): the Fastfood transform H G Pi H B, in O(D) memory."""

    def __init__(self, D: int, d: int, seed: int = 0):
        super().__init__()
        self.D, self.d = D, d
        self.LL = 1 << max(math.ceil(math.log2(max(D, d))), 0)
        generator = seeded_generator(seed)
        self.register_buffer("signs", torch.randint(2, (self.LL,), generator=generator).float() * 2 - 1, persistent=False)
        self.register_buffer("permutation", torch.randperm(self.LL, generator=generator), persistent=False)
        gaussian = torch.randn(self.LL, generator=generator)
        self.register_buffer("gaussian", gaussian, persistent=False)
        self.scale = 1.0 / (math.sqrt(self.LL * float((gaussian**2).sum())) * math.sqrt(D / self.LL))

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        padded = F.pad(theta, (0, self.LL - self.d))
        mixed = fwht(self.signs * padded)
        return fwht(self.gaussian * mixed[self.permutation])[: self.D] * self.scale


class SubspaceModel(nn.Module):
    """Wraps `model` so that its only trainable parameter is `theta_d` (d values, zero at start)."""

    def __init__(self, model: nn.Module, d: int, projection: str = "dense", seed: int = 0):
        super().__init__()
        if projection not in PROJECTIONS:
            raise ConfigError(f"projection={projection!r} is invalid: expected one of {PROJECTIONS}.")
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        theta0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
        D = theta0.numel()
        if not 1 <= d <= D:
            raise ConfigError(f"d={d} is invalid: expected 1 <= d <= D={D} (the model's parameter count).")
        self.module = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.register_buffer("theta0", theta0, persistent=False)
        if projection == "sparse":
            self.projection = SparseProjection(D, d, seed, layer_sizes=[math.prod(s) for s in self.shapes])
        else:
            self.projection = (DenseProjection if projection == "dense" else FastfoodProjection)(D, d, seed)
        self.theta_d = nn.Parameter(torch.zeros(d))

    def full_parameters(self) -> dict[str, torch.Tensor]:
        flat = self.theta0 + self.projection(self.theta_d)
        chunks = flat.split([math.prod(s) for s in self.shapes])
        return {name: chunk.reshape(shape) for name, chunk, shape in zip(self.names, chunks, self.shapes)}

    def forward(self, *args, **kwargs):
        return functional_call(self.module, self.full_parameters(), args, kwargs)


def digits_task(seed: int = 0, n_train: int = 1200):
    """sklearn digits (8x8 -> 64 features in [0, 1]), 1200 train / 597 test, split by `seed`."""
    from rankwise.data.digits import load_digit_images

    images, y = load_digit_images()
    x = images.flatten(1)
    order = torch.randperm(len(y), generator=seeded_generator(seed))
    return x[order[:n_train]], y[order[:n_train]], x[order[n_train:]], y[order[n_train:]]


def fc_network(sizes=(64, 100, 100, 10), seed: int = 0) -> nn.Sequential:
    """The spec's FC net (D = 17,610 for 64-100-100-10): he-normal weights, zero biases."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        linear = nn.Linear(fan_in, fan_out)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def train_classifier(model: nn.Module, data, *, steps: int = 300, lr: float = 1e-2) -> float:
    """Full-batch Adam on cross-entropy; returns test accuracy."""
    x_train, y_train, x_test, y_test = data
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x_train), y_train)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((model(x_test).argmax(-1) == y_test).float().mean())


def intrinsic_dimension_sweep(
    dims: list[int], *, projection: str = "dense", seeds: tuple[int, ...] = (0, 1, 2), steps: int = 300,
    lr: float = 1e-2, baseline: float | None = None, threshold: float = 0.9,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Sweep d on sklearn digits with the FC 64-100-100-10 net; returns accuracies and d_int90.

    `baseline=None` trains the network directly (mean over seeds, the "individual" baseline).
    `d_int90` is the smallest d whose mean accuracy >= threshold * baseline (None if none does).
    """
    if not dims or any(d < 1 for d in dims):
        raise ConfigError(f"dims={dims} is invalid: expected a non-empty list of positive integers.")
    if projection not in PROJECTIONS:
        raise ConfigError(f"projection={projection!r} is invalid: expected one of {PROJECTIONS}.")
    dims = sorted(dims)
    if baseline is None:
        direct = [train_classifier(fc_network(seed=s), digits_task(s), steps=steps, lr=lr) for s in seeds]
        baseline = sum(direct) / len(direct)
        if progress:
            progress(f"direct training: {baseline:.3f}")
    accuracy: dict[int, float] = {}
    for d in dims:
        runs = [
            train_classifier(SubspaceModel(fc_network(seed=s), d, projection, seed=s), digits_task(s), steps=steps, lr=lr)
            for s in seeds
        ]
        accuracy[d] = sum(runs) / len(runs)
        if progress:
            progress(f"{projection} d={d}: {accuracy[d]:.3f}")
    d_int90 = next((d for d in dims if accuracy[d] >= threshold * baseline), None)
    return {
        "projection": projection, "D": sum(p.numel() for p in fc_network().parameters()), "baseline": baseline,
        "threshold": threshold * baseline, "accuracy": accuracy, "d_int90": d_int90, "seeds": list(seeds), "steps": steps,
    }

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "intrinsic-dim", "paper": "1804.08838", "runs": "rankwise intrinsic-dim; rankwise.analysis.intrinsic_dim.intrinsic_dimension_sweep",
     "summary": "intrinsic dimension: train in a random d-dimensional subspace"},
)
