"""Riemannian-preconditioned AdamW (Zhang & Pilanci, arXiv 2402.02347), B4M's stage-2 optimizer (spec B1 section 3,
numeric check 5)."""

import pytest
import torch
from torch import nn

from rankwise.core.errors import ConfigError
from rankwise.optim.riemannian import LoraFactorPair, RiemannianAdamW, precondition_lora_gradients


def _pair(r=3, d_in=7, d_out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = nn.Parameter(torch.randn(r, d_in, generator=g, dtype=torch.float64))
    B = nn.Parameter(torch.randn(d_out, r, generator=g, dtype=torch.float64))
    A.grad = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B.grad = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return A, B


@pytest.mark.parametrize("delta", [0.0, 0.3])
def test_scaled_gradients_match_the_formulas_and_keep_zero_rows_and_columns(delta):
    A, B = _pair()
    A.grad[:, 2] = 0.0   # a frozen column of A
    B.grad[1] = 0.0      # a frozen row of B
    eye = torch.eye(3, dtype=torch.float64)
    expected_a = torch.linalg.inv(B.T @ B + delta * eye) @ A.grad
    expected_b = B.grad @ torch.linalg.inv(A @ A.T + delta * eye)
    precondition_lora_gradients([LoraFactorPair(A, B)], delta)
    torch.testing.assert_close(A.grad, expected_a)
    torch.testing.assert_close(B.grad, expected_b)
    assert torch.count_nonzero(A.grad[:, 2]) == 0 and torch.count_nonzero(B.grad[1]) == 0


def test_zero_factor_leaves_the_other_gradient_alone():
    A, B = _pair()
    with torch.no_grad():
        B.zero_()        # LoRA's B = 0 start: B^T B = 0, the reference uses the identity
    grad_a = A.grad.clone()
    precondition_lora_gradients([LoraFactorPair(A, B)])
    torch.testing.assert_close(A.grad, grad_a)


def test_partial_blocks_use_the_full_factors():
    # B4M trains A[:, h:] and B[h:, :]; the Grams come from the whole factors, frozen blocks included
    A, B = _pair(d_in=8, d_out=6)
    a_train, b_train = nn.Parameter(A.detach()[:, 4:].clone()), nn.Parameter(B.detach()[3:].clone())
    a_train.grad, b_train.grad = A.grad[:, 4:].clone(), B.grad[3:].clone()
    full = lambda: (torch.cat([A.detach()[:, :4], a_train], 1), torch.cat([B.detach()[:3], b_train], 0))  # noqa: E731
    precondition_lora_gradients([LoraFactorPair(a_train, b_train, full)])
    precondition_lora_gradients([LoraFactorPair(A, B)])
    torch.testing.assert_close(a_train.grad, A.grad[:, 4:])   # = the full-factor rule restricted to the block
    torch.testing.assert_close(b_train.grad, B.grad[3:])


class TinyLora(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.base = nn.Linear(6, 4)
        self.A = nn.Parameter(torch.randn(2, 6) * 0.5)
        self.B = nn.Parameter(torch.randn(4, 2) * 0.5)

    def forward(self, x):
        return self.base(x) + x @ self.A.T @ self.B.T


def test_steps_equal_adamw_on_preconditioned_gradients_and_differ_from_plain_adamw():
    ours, reference, plain = TinyLora(), TinyLora(), TinyLora()
    opt = RiemannianAdamW([ours.A, ours.B], [LoraFactorPair(ours.A, ours.B)], lr=1e-2, weight_decay=0.01, delta=1e-3)
    ref_opt = torch.optim.AdamW([reference.A, reference.B], lr=1e-2, weight_decay=0.01)
    plain_opt = torch.optim.AdamW([plain.A, plain.B], lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)
        for model, optimizer in ((ours, opt), (reference, ref_opt), (plain, plain_opt)):
            optimizer.zero_grad()
            (model(x) - y).pow(2).mean().backward()
            if model is reference:  # the rule written out: inverse Grams of the pre-step factors
                with torch.no_grad():
                    eye = 1e-3 * torch.eye(2)
                    ga = torch.linalg.inv(reference.B.T @ reference.B + eye) @ reference.A.grad
                    gb = reference.B.grad @ torch.linalg.inv(reference.A @ reference.A.T + eye)
                    reference.A.grad.copy_(ga)
                    reference.B.grad.copy_(gb)
            optimizer.step()
    torch.testing.assert_close(ours.A, reference.A, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.B, reference.B, atol=1e-6, rtol=1e-5)
    assert (ours.A - plain.A).abs().max() > 1e-4


def test_bad_arguments():
    model = TinyLora()
    with pytest.raises(ConfigError, match="delta"):
        RiemannianAdamW([model.A, model.B], [LoraFactorPair(model.A, model.B)], delta=-1.0)
    with pytest.raises(ConfigError, match="not among"):
        RiemannianAdamW([model.A], [LoraFactorPair(model.A, model.B)])
    with pytest.raises(ConfigError, match="pairs"):
        RiemannianAdamW([model.A], [])
