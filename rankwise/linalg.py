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


# ---- low-rank aggregation (federated adapters: FedIT / FLoRA stacking / LoRA-FAIR) -------------------


def _check_factor_lists(Bs, As, weights) -> None:
    if not (len(Bs) == len(As) == len(weights)) or not Bs:
        raise ValueError(f"need equally many B factors, A factors and weights (>= 1), got {len(Bs)}, {len(As)}, {len(weights)}")


def mean_of_products(Bs, As, weights) -> torch.Tensor:
    """`sum_k w_k B_k A_k` in float32 (`B_k: out x r_k`, `A_k: r_k x in`, ranks may differ): the exact average update."""
    _check_factor_lists(Bs, As, weights)
    return sum(float(w) * (B.float() @ A.float()) for B, A, w in zip(Bs, As, weights))


def stack_low_rank(Bs, As, weights) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ranks so that `B_st @ A_st == sum_k w_k B_k A_k` exactly (FLoRA, arXiv 2409.05976).

    `B_st = [B_1, ..., B_K]` (out x sum r_k), `A_st = [w_1 A_1; ...; w_K A_K]` (sum r_k x in).
    """
    _check_factor_lists(Bs, As, weights)
    B_st = torch.cat([B.float() for B in Bs], dim=1)
    A_st = torch.cat([float(w) * A.float() for A, w in zip(As, weights)], dim=0)
    return B_st, A_st


def ridge_right_solve(target_At: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """`X = argmin_X ||T - X A||_F^2 + lam ||X||_F^2` given only `T A^T` (`A: r x in`, result `out x r`).

    The normal equations give `X (A A^T + lam I) = T A^T`: one r x r solve, `T` (out x in) is never needed.
    With `lam = 0` and a rank-deficient `A` a pseudo-inverse is used (the least-squares minimiser of least norm).
    """
    A = A.double()
    gram = A @ A.T
    rhs = target_At.double()
    if lam > 0:
        gram = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
        return torch.linalg.solve(gram, rhs.T).T.float()  # gram is symmetric: X^T = gram^{-1} (T A^T)^T
    return (rhs @ torch.linalg.pinv(gram, hermitian=True)).float()
