"""Spec checks for over-parameterised matrix sensing and its one-step correction (arXiv 2310.01769),
methods-theory.md section 2(a), at n = 30, m = 600 (the spec's n = 50, m = 1500 takes ~10x longer)."""
import pytest
import torch

from rankwise import ConfigError
from rankwise.solvers.sensing import balance_factors, matrix_sensing


def sensing_problem(symmetric, seed=0, n=30, m=600):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, 3, generator=g, dtype=torch.float64))
    M = Q @ torch.diag(torch.tensor([1, 0.75, 0.5], dtype=torch.float64)) @ Q.T
    G = torch.randn(m, n, n, generator=g, dtype=torch.float64)
    A = (G + G.transpose(1, 2)) / 2**0.5 / m**0.5 if symmetric else G / m**0.5
    return A, (A * M).sum((1, 2)), M


def log_slope(values, start, stop, log_x=False):
    """Least-squares slope of log10(values[t]) against t (or log10 t)."""
    t = torch.arange(start, stop, dtype=torch.float64) + 1
    x = t.log10() if log_x else t
    y = torch.tensor(values[start:stop], dtype=torch.float64).log10()
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc**2).sum())


@pytest.fixture(scope="module")
def symmetric_problem():
    return sensing_problem(symmetric=True)


@pytest.fixture(scope="module")
def asymmetric_problem():
    return sensing_problem(symmetric=False)


def test_exact_rank_symmetric_converges_linearly(symmetric_problem):
    A, y, M = symmetric_problem
    result = matrix_sensing(A, y, 3, symmetric=True, init_scale=0.5, iterations=1000, target=M)
    assert result.history["rel_err"][-1] < 1e-12


def test_over_parameterised_symmetric_is_sublinear_one_over_t(symmetric_problem):
    """T1: with k > r the Frobenius error decays like 1/T: err * t is flat, the log-log slope is -1."""
    A, y, M = symmetric_problem
    errors = matrix_sensing(A, y, 4, symmetric=True, init_scale=0.5, iterations=4000, target=M).history["rel_err"]
    products = [errors[t - 1] * t for t in (250, 500, 1000, 2000, 4000)]
    assert max(products) / min(products) < 1.15 / 0.85
    assert -1.15 < log_slope(errors, 250, 4000, log_x=True) < -0.85
    assert errors[-1] > 1e-4  # still far from converged: not linear


def test_one_step_correction_removes_the_alpha_dependence(asymmetric_problem):
    A, y, M = asymmetric_problem
    vanilla, corrected = {}, {}
    for alpha in (0.03, 0.3):
        plain = matrix_sensing(A, y, 5, init_scale=alpha, iterations=2000, target=M).history["rel_err"]
        fixed = matrix_sensing(A, y, 5, init_scale=alpha, iterations=2000, correction_at="auto", target=M)
        vanilla[alpha] = log_slope(plain, 1000, 2000)
        corrected[alpha] = log_slope(fixed.history["rel_err"], 1000, 2000)
        assert fixed.info["corrected_at"] is not None
        assert fixed.history["rel_err"][-1] < 1e-7
    # corrected rates collapse together ...
    assert max(corrected.values()) / min(corrected.values()) < 1.1
    # ... and are much faster than every vanilla rate, which depends on alpha (T4: rate ~ alpha^2)
    assert all(c < 3 * v for c, v in zip(corrected.values(), vanilla.values()))
    assert vanilla[0.3] < 2 * vanilla[0.03]


def test_exact_rank_asymmetric_converges(asymmetric_problem):
    A, y, M = asymmetric_problem
    assert matrix_sensing(A, y, 3, iterations=2000, target=M).history["rel_err"][-1] < 1e-12


def test_symmetric_measurements_cannot_identify_an_asymmetric_fit():
    """The spec's toy: symmetric A_i only see the symmetric part of F G^T; the error stalls."""
    A, y, M = sensing_problem(symmetric=True)
    errors = matrix_sensing(A, y, 5, init_scale=0.1, iterations=1500, correction_at=300, target=M).history["rel_err"]
    assert errors[-1] > 1e-3


def test_balance_factors_keeps_the_product_and_conditions_f():
    g = torch.Generator().manual_seed(3)
    F = torch.randn(20, 4, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([5.0, 1, 0.1, 0.01], dtype=torch.float64))
    G = torch.randn(15, 4, generator=g, dtype=torch.float64)
    F2, G2 = balance_factors(F, G)
    assert torch.allclose(F2 @ G2.T, F @ G.T, atol=1e-10)
    singular = torch.linalg.svdvals(F2)
    assert float(singular.max() / singular.min()) == pytest.approx(1.0, abs=1e-8)


def test_bad_inputs(asymmetric_problem):
    A, y, _ = asymmetric_problem
    with pytest.raises(ConfigError, match="rank"):
        matrix_sensing(A, y, 31)
    with pytest.raises(ConfigError, match="asymmetric"):
        matrix_sensing(sensing_problem(True)[0], y, 3, symmetric=True, correction_at=10)
    with pytest.raises(ConfigError, match="correction_at"):
        matrix_sensing(A, y, 3, correction_at="sometimes")
