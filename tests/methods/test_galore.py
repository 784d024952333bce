"""GaLore (arXiv 2403.03507): equality with galore-torch, the spec's state-shape rule and least-squares check."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rankwise.core.errors import ConfigError, TargetError
from rankwise.optim.galore import GaLoreAdamW, galore_param_groups, optimizer_state_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from references import galore_torch_adamw  # noqa: E402
from least_squares_toy import relative_loss  # noqa: E402


class Block(nn.Module):
    """Module names contain 'attn'/'mlp' like a LLaMA block; tall, wide and square weights."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 24)
        self.attn = nn.Linear(24, 24)
        self.mlp = nn.ModuleDict({"up": nn.Linear(24, 40), "down": nn.Linear(40, 24, bias=False)})
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 50)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(h)
        h = h + self.mlp["down"](torch.relu(self.mlp["up"](h)))
        return self.head(self.norm(h))


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 50, (8, 6), generator=g)
    return nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, 1).flatten())


def _train(model, optimizer, steps, per_layer=False):
    hooks = optimizer.attach_to_backward() if per_layer else None
    for step in range(steps):
        _loss(model, step).backward()
        optimizer.step()
        optimizer.zero_grad()
    if hooks:
        hooks.remove()
    return model


# Tolerance: our AdamW folds `scale` into the step size instead of multiplying the back-projected
# m x n update, so results differ by fp32 rounding only: atol 2e-6 on weights of size ~0.2 after 12 steps.
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_same_updates_as_galore_torch(proj_type):
    Reference = galore_torch_adamw()
    if Reference is None:
        pytest.skip("galore-torch is not installed (pip install --no-deps galore-torch)")
    ours = Block()
    theirs = copy.deepcopy(ours)
    config = dict(rank=4, update_proj_gap=5, scale=0.25, proj_type=proj_type)
    opt_ours = GaLoreAdamW(galore_param_groups(ours, **config), lr=1e-2, weight_decay=0.1)
    opt_theirs = Reference(galore_param_groups(theirs, **config), lr=1e-2, weight_decay=0.1,
                           no_deprecation_warning=True)
    for step in range(12):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            _loss(model, step).backward()
            opt.step()
            opt.zero_grad()
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=f"{name} differs at step {step}")
    assert not torch.equal(ours.attn.weight, Block().attn.weight)


def test_per_layer_hooks_equal_global_step():
    base = Block()
    global_model, hook_model = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(rank=4, update_proj_gap=3)
    _train(global_model, GaLoreAdamW(galore_param_groups(global_model, **config), lr=1e-2), 7)
    opt = GaLoreAdamW(galore_param_groups(hook_model, **config), lr=1e-2)
    _train(hook_model, opt, 7, per_layer=True)
    for a, b in zip(global_model.parameters(), hook_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in hook_model.parameters())  # hooks freed every gradient


@pytest.mark.parametrize("shape,moment_shape,projector_shape", [
    ((256, 256), (256, 32), (32, 256)),   # square: right projection
    ((512, 128), (512, 32), (32, 128)),   # m >= n: project the short (input) side
    ((128, 512), (32, 512), (128, 32)),   # m < n: left projection
])
def test_state_shape_rule(shape, moment_shape, projector_shape):
    weight = nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([{"params": [weight], "rank": 32}], lr=1e-3)
    weight.grad = torch.randn(shape)
    opt.step()
    state = opt.state[weight]
    assert state["exp_avg"].shape == moment_shape and state["exp_avg_sq"].shape == moment_shape
    assert state["projector"].shape == projector_shape
    m, n = shape
    assert optimizer_state_bytes(opt) == 4 * (2 * max(m, n) * 32 + min(m, n) * 32)


def test_least_squares_reaches_optimum_and_frozen_projector_does_not():
    # Spec problem (W* 128x64, X 512x64 Gaussian, r=8, lr 1e-2), with GaLore's own eps (1e-6 outside the
    # sqrt) and 3000 steps as in the spec's second run. On this instance Adam reaches 1.6e-10 and GaLore
    # T=50 reaches 7.8e-7 (1e-3 after 2000 steps, where the spec's numpy instance reported 6e-9).
    group = {"rank": 8, "scale": 1.0}
    assert relative_loss(GaLoreAdamW, {**group, "update_proj_gap": 50}) <= 1e-6
    # the toy that never refreshes P stays in one 8-dimensional subspace
    assert relative_loss(GaLoreAdamW, {**group, "update_proj_gap": 10**9}) > 0.5


def test_bad_groups_raise_config_errors():
    model = Block()
    with pytest.raises(ConfigError, match="rank"):
        GaLoreAdamW([{"params": [model.attn.weight], "rank": 0}])
    with pytest.raises(ConfigError, match="proj_type"):
        GaLoreAdamW([{"params": [model.attn.weight], "rank": 2, "proj_type": "diagonal"}])
    with pytest.raises(ConfigError, match="2-D"):
        GaLoreAdamW([{"params": [model.attn.bias], "rank": 2}])
    with pytest.raises(TargetError):
        galore_param_groups(model, targets=("nothing",))


# -- per-layer mode with gradient accumulation and clipping (issue 20, item 9) --------------------------------
def _accumulated(model, optimizer, steps, k, per_layer=False, clip=None, **hook_options):
    """`steps` optimizer steps of k micro-batches each (loss / k), the usual accumulation loop."""
    hooks = optimizer.attach_to_backward(accumulation_steps=k, max_grad_norm=clip, **hook_options) if per_layer else None
    for step in range(steps):
        for micro in range(k):
            (_loss(model, step * k + micro) / k).backward()
        if clip is not None and not per_layer:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
    if hooks:
        hooks.remove()
    return model


@pytest.mark.parametrize("k", [2, 3])
def test_per_layer_accumulation_equals_normal_step_on_the_effective_batch(k):
    base = Block()
    normal, layered = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(rank=4, update_proj_gap=2)
    _accumulated(normal, GaLoreAdamW(galore_param_groups(normal, **config), lr=1e-2), 6, k)
    opt = GaLoreAdamW(galore_param_groups(layered, **config), lr=1e-2)
    _accumulated(layered, opt, 6, k, per_layer=True)
    for (name, a), b in zip(normal.named_parameters(), layered.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # one Adam step and one projector tick per accumulated step: 6, not 6 k
    assert {opt.state[p]["step"] for p in layered.parameters()} == {6}


def test_per_layer_accumulation_without_telling_the_hooks_is_refused():
    model = Block()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-2)
    opt.attach_to_backward()  # accumulation_steps=1, but the loop accumulates two micro-batches
    _loss(model, 0).backward()
    with pytest.raises(ConfigError, match="accumulation_steps"):
        _loss(model, 1).backward()


def test_per_layer_step_after_part_of_the_micro_batches_is_refused():
    model = Block()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-2)
    opt.attach_to_backward(accumulation_steps=3)
    _loss(model, 0).backward()
    _loss(model, 1).backward()
    with pytest.raises(ConfigError, match="2 of accumulation_steps=3"):
        opt.step()


@pytest.mark.parametrize("k", [1, 2])
def test_per_layer_clipping_equals_clip_grad_norm_then_step(k):
    base = Block()
    normal, layered = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(rank=4, update_proj_gap=2)
    clip = 0.05  # well below the gradient norm (~1): every step is clipped
    _accumulated(normal, GaLoreAdamW(galore_param_groups(normal, **config), lr=1e-2, weight_decay=0.1), 5, k, clip=clip)
    opt = GaLoreAdamW(galore_param_groups(layered, **config), lr=1e-2, weight_decay=0.1)
    _accumulated(layered, opt, 5, k, per_layer=True, clip=clip)
    for (name, a), b in zip(normal.named_parameters(), layered.parameters()):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)
    # and the clip mattered: without it the weights end elsewhere
    free = copy.deepcopy(base)
    _accumulated(free, GaLoreAdamW(galore_param_groups(free, **config), lr=1e-2, weight_decay=0.1), 5, k)
    assert (free.attn.weight - layered.attn.weight).abs().max() > 1e-4


def test_per_layer_bad_options_and_clipping_needs_step():
    model = Block()
    opt = GaLoreAdamW(galore_param_groups(model, rank=4), lr=1e-2)
    with pytest.raises(ConfigError, match="accumulation_steps"):
        opt.attach_to_backward(accumulation_steps=0)
    with pytest.raises(ConfigError, match="max_grad_norm"):
        opt.attach_to_backward(max_grad_norm=float("inf"))
    hooks = opt.attach_to_backward(max_grad_norm=1.0)
    with pytest.raises(ConfigError, match="already"):
        opt.attach_to_backward()
    _loss(model, 0).backward()
    with pytest.raises(ConfigError, match="step"):
        opt.zero_grad()  # the clipped updates are applied in step(): skipping it would drop them
    hooks.remove()
