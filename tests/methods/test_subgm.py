"""Spec checks for SubGM (arXiv 2202.08788): methods-theory.md section 1(a)."""
import pytest
import torch

from rankwise import ConfigError, ShapeError
from rankwise.linalg import relative_error
from rankwise.solvers.subgm import subgm


def robust_problem(seed, d=20, m=3000, p=0.2):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, 3, generator=g, dtype=torch.float64))
    X = Q @ torch.diag(torch.tensor([1, 0.75, 0.5], dtype=torch.float64)) @ Q.T
    G = torch.randn(m, d, d, generator=g, dtype=torch.float64)
    A = (G + G.transpose(1, 2)) / 2
    outliers = (torch.rand(m, generator=g) < p) * 10 * torch.randn(m, generator=g, dtype=torch.float64)
    return A, (A * X).sum((1, 2)) + outliers, X


@pytest.fixture(scope="module")
def problem():
    return robust_problem(0)


def test_recovers_with_outliers_and_full_over_parameterisation(problem):
    A, y, X = problem
    result = subgm(A, y, rank=20, target=X)  # r' = d: the rank is not known at all
    assert relative_error(result.solution, X) < 1e-8
    assert result.history["rel_err"][-1] == pytest.approx(relative_error(result.solution, X), rel=1e-3, abs=1e-12)
    assert result.iterations == 3000 and len(result.history["loss"]) == 3000


def test_small_init_and_decaying_steps_are_what_make_it_work(problem):
    """Same data as above, where the defaults reach < 1e-8; the spec's toys stall (3e-3 and 1e-2)."""
    A, y, X = problem
    large_init = relative_error(subgm(A, y, rank=20, init_scale=1.0, normalize=False, iterations=1500).solution, X)
    constant_step = relative_error(
        subgm(A, y, rank=20, step=0.01, decay=1 - 1e-12, normalize=False, iterations=1500).solution, X
    )
    assert large_init > 1e-4 and constant_step > 1e-4


def test_l2_gradient_descent_is_not_robust(problem):
    """The toy the spec rejects: the same factorisation fitted with the l2 loss is ruined by outliers."""
    A, y, X = problem
    m, d = A.shape[0], A.shape[1]
    U = 1e-3 * torch.randn(d, 20, dtype=torch.float64)
    for _ in range(500):
        residual = (A * (U @ U.T)).sum((1, 2)) - y
        S = torch.einsum("m,mij->ij", residual, A) / m
        U = U - 0.01 * (S + S.T) @ U
    assert relative_error(U @ U.T, X) > 0.1


def test_scale_invariance_of_the_normalised_default():
    A, y, X = robust_problem(1, m=2000, p=0.1)
    scaled = subgm(A, 25.0 * y, rank=5, iterations=2000)
    assert relative_error(scaled.solution, 25.0 * X) < 1e-6


def test_bad_inputs():
    A, y, _ = robust_problem(0, d=4, m=50)
    with pytest.raises(ShapeError, match="square"):
        subgm(torch.randn(50, 4, 3), y, rank=2)
    with pytest.raises(ConfigError, match="rank"):
        subgm(A, y, rank=5)
    with pytest.raises(ShapeError, match="empty"):
        subgm(A[:0], y[:0], rank=2)
    bad = y.clone()
    bad[3] = float("nan")
    with pytest.raises(ShapeError, match="NaN"):
        subgm(A, bad, rank=2)
    with pytest.raises(ShapeError, match="length"):
        subgm(A, y[:10], rank=2)
    with pytest.raises(ConfigError, match="decay"):
        subgm(A, y, rank=2, decay=1.5)
