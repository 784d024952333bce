"""SaRA's memory trick, measured: sparse `values` + gather-gradient Function vs the masked-dense baseline.

Variants (same MLP, same batch, AdamW, 5 steps each, each in its own process so peaks do not mix):
  floor        frozen model: forward + input-gradient backward only (the cost floor of any adapter step)
  sara         rankwise SaraConfig(fraction): trainable values only, no dense grad kept, Adam state |M|
  masked_dense the reference's `adamw2` baseline: W trainable, dense .grad masked to M, dense Adam state
  lora         rankwise LoraConfig(r=8), for scale

    PYTHONPATH=. python bench/sara_memory.py            -> bench/results/sara_memory.json
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch
from torch import nn

from bench.common import median_time, peak_rss_mib, reset_peak_rss, rss_mib, machine, write_json

WIDTH, DEPTH, BATCH, FRACTION = 1536, 6, 256, 0.1


def build():
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(WIDTH, WIDTH), nn.GELU())])


def run_variant(variant: str) -> dict:
    import rankwise

    torch.set_num_threads(1)
    model = build()
    x = torch.randn(BATCH, WIDTH, requires_grad=variant == "floor")
    targets = [str(2 * i) for i in range(DEPTH)]
    if variant == "sara":
        model = rankwise.adapt(model, rankwise.SaraConfig(fraction=FRACTION, target_modules=targets))
    elif variant == "lora":
        model = rankwise.adapt(model, rankwise.LoraConfig(r=8, target_modules=targets))
    elif variant == "masked_dense":
        for p in model.parameters():
            p.requires_grad_(False)
        for i in targets:
            w = model[int(i)].weight
            mask = w.abs() <= w.abs().flatten().kthvalue(int(FRACTION * w.numel())).values
            w.requires_grad_(True)
            w.register_hook(lambda g, m=mask: g * m)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step():
        loss = model(x).pow(2).mean()
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            x.grad = None

    step()  # allocate optimizer state before the window
    before = rss_mib()
    reset_peak_rss()
    seconds = median_time(step, repeats=5, warmup=0)
    grads_bytes = sum(p.numel() * 4 for p in params)  # what .grad holds at the end of backward
    state_bytes = sum(t.numel() * t.element_size() for s in (opt.state.values() if opt else [])
                      for t in s.values() if torch.is_tensor(t))
    adapter_tensors = 0  # every tensor the adapters hold: values, indices, original values, CSR caches
    if variant == "sara":
        for _, layer in model.adapted_layers():
            a = layer.adapters["default"]
            caches = [t for pat in a.patterns() if pat is not None
                      for t in (pat.crow, pat.col, pat.t_order, pat.t_crow, pat.t_col)]
            adapter_tensors += sum(t.numel() * t.element_size() for t in [*a.parameters(), *a.buffers(), *caches])
    elif variant == "masked_dense":
        adapter_tensors = sum(p.numel() for p in params)  # the bool masks (1 byte per entry) the hooks hold
    elif variant == "lora":
        adapter_tensors = sum(p.numel() * p.element_size() for p in params)
    return {"variant": variant, "adapter_tensors_mib": adapter_tensors / 2**20, "trainable": sum(p.numel() for p in params), "step_seconds": seconds,
            "peak_rss_over_start_mib": peak_rss_mib() - before, "rss_start_mib": before,
            "grad_mib": grads_bytes / 2**20, "optimizer_state_mib": state_bytes / 2**20}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(sys.argv[2])))
        return
    rows = {}
    for variant in ("floor", "sara", "masked_dense", "lora"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[variant])
    floor = rows["floor"]["step_seconds"]
    for row in rows.values():
        row["time_x_floor"] = row["step_seconds"] / floor
    saving = 1 - rows["sara"]["peak_rss_over_start_mib"] / rows["masked_dense"]["peak_rss_over_start_mib"]
    def persistent(r):  # what training keeps between steps beyond the frozen model: adapter tensors, grads, state
        return r["adapter_tensors_mib"] + r["grad_mib"] + r["optimizer_state_mib"]

    path = write_json("sara_memory", {"machine": machine(),
        "setup": {"width": WIDTH, "depth": DEPTH, "batch": BATCH, "fraction": FRACTION, "optimizer": "AdamW", "threads": 1},
        "rows": rows,
        "sara_vs_masked_dense": {
            "step_peak_saving": saving,
            "kept_between_steps_mib": {"sara": persistent(rows["sara"]), "masked_dense": persistent(rows["masked_dense"])},
            "optimizer_state_ratio": rows["sara"]["optimizer_state_mib"] / rows["masked_dense"]["optimizer_state_mib"],
        },
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    main()
