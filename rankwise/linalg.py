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


def relative_error(estimate: torch.Tensor, target: torch.Tensor) -> float:
    """||estimate - target||_F / ||target||_F (the error every solver and its tests report)."""
    denominator = torch.linalg.norm(target)
    return float(torch.linalg.norm(estimate - target) / denominator.clamp_min(torch.finfo(denominator.dtype).tiny))


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (length a power of 2).

    Equals `x @ scipy.linalg.hadamard(n)` in O(n log n); differentiable (built from reshapes and adds).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        # pair entries h apart: (a, b) -> (a + b, a - b)
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor, i: int, j: int) -> float:
    """phi(i, j) = ||U1[:, :i]^T U2[:, :j]||_F^2 / min(i, j) in [0, 1] (Hu et al., LoRA, arXiv 2106.09685, sec. 7.2).

    `U1`, `U2` have orthonormal columns ordered by importance (e.g. left singular vectors).
    """
    overlap = U1[:, :i].T.double() @ U2[:, :j].double()
    return float((overlap**2).sum() / min(i, j))


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD `(U, S, Vh)` of the product `B @ A` (B: out x r, A: r x in) without forming it.

    QR of both factors reduces it to an r x r core: O((out + in) r^2) instead of O(out in min(out, in)).
    """
    Q_B, R_B = torch.linalg.qr(B.double())
    Q_A, R_A = torch.linalg.qr(A.double().T)
    U_core, S, Vh_core = torch.linalg.svd(R_B @ R_A.T)
    return Q_B @ U_core, S, Vh_core @ Q_A.T
