"""The spec's least-squares toy for low-rank optimizers (GaLore §3(a), DCT §5(a)):
min_W 1/2 mean ||X Wᵀ - Y||², W 128x64, X 512x64 Gaussian, Y = X W*ᵀ, W0 = 0, lr 1e-2."""
import torch
from torch import nn


def relative_loss(optimizer_class, group: dict, steps: int = 3000) -> float:
    """Loss after `steps` optimizer steps divided by the loss at W0 = 0."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 64, generator=g)
    Y = X @ torch.randn(128, 64, generator=g).T
    W = nn.Parameter(torch.zeros(128, 64))
    opt = optimizer_class([{"params": [W], **group}], lr=1e-2)

    def loss():
        return 0.5 * ((X @ W.T - Y) ** 2).sum(1).mean()

    initial = float(loss().detach())
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return float(loss().detach()) / initial
