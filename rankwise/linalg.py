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


def factored_row_norms(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Row norms of the product `B @ A` (out x in) without forming it: ||(BA)_i||^2 = b_i^T (A A^T) b_i.

    Costs O(out r^2 + r^2 in) instead of O(out r in); computed in float32 (float64 if given).
    """
    work = torch.float64 if A.dtype == torch.float64 else torch.float32
    A, B = A.detach().to(work), B.detach().to(work)
    return ((B @ (A @ A.T)) * B).sum(1).clamp_min(0).sqrt()


def orthogonality_residual(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """||A A^T - I||_F + ||B^T B - I||_F for LoRA factors A (r x in) and B (out x r): how far the rows of A
    and the columns of B are from orthonormal (the regulariser of AdaLoRA-style rank allocators)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.T - eye) + torch.linalg.matrix_norm(B.T @ B - eye)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k whose top-k singular values hold at least `energy` (in (0, 1]) of sum sigma^2."""
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    return min(int((cumulative < energy - 1e-12).sum()) + 1, singular_values.numel())
