"""Composition interference: Break-for-Make splice vs adding two independently trained LoRAs.

Two toy "concepts" on one frozen MLP: a content task and a style task (each a fixed random change of the base's
output on its own input distribution). Each method trains one adapter per task, then composes them
(B4M: `compose` = content's A with style's B; LoRA: both adapters active, i.e. their updates added).
Interference on task t = ||f_composed(x_t) - f_t(x_t)|| / ||f_t(x_t) - f_base(x_t)||: how much adding the
other adapter moves what adapter t alone does (0 = no interference). Task losses are reported too, before and
after a short joint fine-tune of the composed adapter on both tasks (B4M's stage 2; the same for the LoRA pair).

    PYTHONPATH=. python bench/b4m_interference.py      -> bench/results/b4m_interference.json
"""
from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rankwise  # noqa: E402
from rankwise.adapters.b4m import compose  # noqa: E402

from bench.common import machine, write_json  # noqa: E402

WIDTH, RANK, STEPS, STAGE2_STEPS, LR = 64, 8, 300, 100, 3e-3


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH))


def make_task(seed: int, base: nn.Module):
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randn(WIDTH, generator=gen)  # the task's own input distribution
    change = torch.randn(WIDTH, WIDTH, generator=gen) / WIDTH**0.5 * 0.5

    def batch(n=64):
        x = torch.randn(n, WIDTH, generator=gen) + shift
        with torch.no_grad():
            y = base(x) + torch.tanh(x @ change.T)
        return x, y
    return batch


def train(model, batch) -> None:
    opt = torch.optim.AdamW(model.parameter_groups(LR))
    for _ in range(STEPS):
        x, y = batch()
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def train_joint(model, batches, steps: int) -> None:
    """Stage 2 ("make"): fine-tune the composed adapter on both tasks' losses together."""
    opt = torch.optim.AdamW(model.parameter_groups(LR))
    for _ in range(steps):
        opt.zero_grad()
        sum(nn.functional.mse_loss(model(x), y) for x, y in (b() for b in batches)).backward()
        opt.step()


def measure(f_alone, f_composed, f_base, batch) -> dict:
    x, y = batch(512)
    with torch.no_grad():
        alone, composed, base = f_alone(x), f_composed(x), f_base(x)
    return {"interference": float((composed - alone).norm() / (alone - base).norm()),
            "loss_alone": float(nn.functional.mse_loss(alone, y)),
            "loss_composed": float(nn.functional.mse_loss(composed, y)),
            "loss_base": float(nn.functional.mse_loss(base, y))}


def main() -> None:
    torch.set_num_threads(1)
    base = base_model().eval()
    tasks = {"content": make_task(1, base), "style": make_task(2, base)}
    targets = ["0", "2"]
    results = {}

    # Break-for-Make: two stage-1 runs sharing frozen blocks (same seed), spliced by compose.
    adapters = {}
    with tempfile.TemporaryDirectory() as tmp:
        for role, batch in tasks.items():
            model = rankwise.adapt(copy.deepcopy(base), rankwise.B4mConfig(r=RANK, role=role, target_modules=targets))
            train(model, batch)
            model.save_adapter(Path(tmp) / role)
            adapters[role] = model
        compose(Path(tmp) / "content", Path(tmp) / "style", Path(tmp) / "fused")
        fused = rankwise.load_adapter(copy.deepcopy(base), Path(tmp) / "fused", is_trainable=True)
    results["b4m"] = {role: measure(adapters[role], fused, base, batch) for role, batch in tasks.items()}
    train_joint(fused, list(tasks.values()), STAGE2_STEPS)
    results["b4m_after_stage2"] = {role: measure(adapters[role], fused, base, batch) for role, batch in tasks.items()}

    # LoRA: two independent adapters on the same model, both active (their updates add up).
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(r=RANK, target_modules=targets), adapter_name="content")
    model.add_adapter("style", rankwise.LoraConfig(r=RANK, target_modules=targets))
    for role, batch in tasks.items():
        model.set_adapter(role)
        train(model, batch)
    lora, alone_models = {}, {}
    for role, batch in tasks.items():
        model.set_adapter(role)
        alone_models[role] = copy.deepcopy(model)
        model.set_adapter(["content", "style"])
        lora[role] = measure(alone_models[role], model, base, batch)
    results["lora_sum"] = lora
    model.set_adapter(["content", "style"])
    train_joint(model, list(tasks.values()), STAGE2_STEPS)  # the same joint fine-tune for the peer
    results["lora_sum_after_joint"] = {role: measure(alone_models[role], model, base, batch) for role, batch in tasks.items()}
    for method, rows in results.items():
        print(method, {r: {k: round(v, 4) for k, v in row.items()} for r, row in rows.items()})
    path = write_json("b4m_interference", {"machine": machine(), "setup": {"width": WIDTH, "rank": RANK, "steps": STEPS, "joint_steps": STAGE2_STEPS, "lr": LR,
                                                     "optimizer": "AdamW", "b4m_partner_lr_scale": 0.1},
                                           "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
