"""Shared by the tiny-LLaMA procedure tests (tests/train/test_procedures_llama.py, tests/test_llm_methods.py):
how each training procedure is set up on a LLaMA."""
from __future__ import annotations

import rankwise

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora(r: int, **kw):
    return rankwise.LoraConfig(**{"r": r, "lora_alpha": r, "lora_dropout": 0.0, "target_modules": PROJECTIONS, **kw})


# name: (adapter config or None for a dense procedure, procedure options, learning rate)
PROCEDURE_CASES = {
    "allora": (lambda: lora(4), {}, 1e-2),
    "ggpo": (lambda: lora(4), {}, 1e-2),
    "increlora": (lambda: lora(1), {"target_rank": 2, "init_warmup": 1, "incre_interval": 1}, 1e-2),
    "triadapt": (lambda: lora(1), {"reference_rank": 2, "incre_interval": 1}, 1e-2),
    "diffora": (lambda: lora(4), {"search_steps": 2, "ratio": 0.5}, 1e-2),
    # PiSSA init (Maestro's SVD start): the shrunk adapter must reload onto the original base exactly.
    "maestro": (lambda: lora(4, init_lora_weights="pissa"), {"shrink_every": 2, "threshold": 0.5}, 1e-2),
    "trp": (None, {"nuclear_weight": 1e-3}, 3e-3),
}
