"""Low-rank optimizers: drop-in `torch.optim.Optimizer`s (GaLore, SVD-free DCT, Riemannian-preconditioned LoRA AdamW)."""
from rankwise.optim.dct import DCTAdamW  # noqa: F401
from rankwise.optim.galore import (  # noqa: F401
    GaLoreAdamW,
    LowRankAdamW,
    galore_param_groups,
    low_rank_param_groups,
    optimizer_state_bytes,
)
from rankwise.optim.riemannian import LoraFactorPair, RiemannianAdamW, precondition_lora_gradients  # noqa: F401
