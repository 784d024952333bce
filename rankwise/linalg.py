"""Shared numerics. Every method that needs one of these calls it from here; none re-implements it.

Conventions: weights are `out x in` (PyTorch Linear layout); factorisations return factors whose
product reproduces the input (`B @ A ~= W`, `B: out x r`, `A: r x in`).
"""
from __future__ import annotations

import functools
import math

import torch


def truncated_svd(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` singular triplets of a 2-D tensor, computed in float32 (or float64 if given).

    Returns `(U[:, :r], S[:r], Vh[:r, :])`.
    """
    if weight.dim() != 2:
        raise ValueError(f"truncated_svd expects a 2-D tensor, got shape {tuple(weight.shape)}")
    work = weight if weight.dtype == torch.float64 else weight.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank, :]


def split_low_rank(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-`rank` approximation as two balanced factors `B = U sqrt(S)`, `A = sqrt(S) Vh`."""
    U, S, Vh = truncated_svd(weight, rank)
    root = S.sqrt()
    return U * root, root[:, None] * Vh


def stable_rank(weight: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2: a smooth, scale-free measure of how many directions carry the energy."""
    S = torch.linalg.svdvals(weight.float())
    return float((S**2).sum() / S[0] ** 2) if S.numel() and S[0] > 0 else 0.0


def effective_rank(weight: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli, 2007)."""
    S = torch.linalg.svdvals(weight.float())
    p = S / S.sum().clamp_min(torch.finfo(S.dtype).tiny)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator whose stream depends only on `seed` (same numbers in every process)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return generator


@functools.lru_cache(maxsize=64)
def _cached_random_basis(seed: int, shape: tuple[int, ...], distribution: str) -> torch.Tensor:
    generator = seeded_generator(seed)
    if distribution == "normal":
        basis = torch.randn(shape, generator=generator)
    elif distribution == "uniform":
        basis = torch.rand(shape, generator=generator) * 2 - 1
    elif distribution == "kaiming_uniform":
        fan_in = shape[-1]
        bound = math.sqrt(6.0 / fan_in) if fan_in else 0.0
        basis = (torch.rand(shape, generator=generator) * 2 - 1) * bound
    else:
        raise ValueError(f"unknown distribution {distribution!r}: use 'normal', 'uniform' or 'kaiming_uniform'")
    basis.requires_grad_(False)
    return basis


def random_basis(seed: int, shape: tuple[int, ...], distribution: str = "normal") -> torch.Tensor:
    """A frozen random tensor regenerated from `(seed, shape)`; one shared copy per key.

    Random-basis methods (NOLA, RandLoRA, ...) never save these: they are rebuilt from the seed.
    The returned tensor is shared: treat it as read-only.
    """
    return _cached_random_basis(int(seed), tuple(int(s) for s in shape), distribution)


@functools.lru_cache(maxsize=32)
def orthonormal_dct(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The n x n orthonormal DCT-II matrix `D` (rows are basis vectors, `D @ D.T = I`)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(dtype)


class SecondMoments:
    """Running `sum x`, `sum x xᵀ` and count over the rows of 2-D batches, accumulated in float64.

    Calibration statistics of compressors (AFM's output covariance, MoDeGPT's input correlations)
    sum millions of fp32 products; float64 keeps the small eigenvalues that decide truncation.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.total = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, rows: torch.Tensor) -> None:
        rows = rows.detach().reshape(-1, rows.shape[-1]).to(torch.float64)
        if rows.shape[-1] != self.dim:
            raise ValueError(f"SecondMoments expects rows of width {self.dim}, got {rows.shape[-1]}")
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += rows.T @ rows

    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    def correlation(self) -> torch.Tensor:
        """`E[x xᵀ]` (uncentred)."""
        return self.outer / max(self.count, 1)

    def covariance(self) -> torch.Tensor:
        """`E[x xᵀ] - μ μᵀ` (centred, population normalisation)."""
        mu = self.mean()
        return self.correlation() - torch.outer(mu, mu)


def top_eigenvectors(symmetric: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`k` eigenpairs of a symmetric matrix, eigenvalues descending: `(values[k], vectors[n, k])`."""
    values, vectors = torch.linalg.eigh(symmetric)
    order = torch.argsort(values, descending=True)[:k]
    return values[order], vectors[:, order]


def psd_sqrt_and_inverse_sqrt(symmetric: torch.Tensor, ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(C^{1/2}, C^{-1/2})` of a positive semi-definite matrix, with `ridge * mean(diag C)` added first.

    The relative ridge keeps `C^{-1/2}` finite when calibration activations are rank-deficient.
    """
    work = symmetric.to(torch.float64)
    if ridge > 0:
        work = work + ridge * work.diagonal().mean() * torch.eye(work.shape[0], dtype=work.dtype)
    values, vectors = torch.linalg.eigh(work)
    values = values.clamp_min(torch.finfo(values.dtype).tiny)
    root = values.sqrt()
    return (vectors * root) @ vectors.T, (vectors / root) @ vectors.T
