"""Rank-changing procedures resume exactly: stopped + resumed == uninterrupted (same seed)."""
from __future__ import annotations

import pytest
import torch
from train_helpers import batcher, ce_loss, lora_mlp, task, trainable

from rankwise.train.diffora import DiffoRA
from rankwise.train.increlora import IncreLoRA
from rankwise.train.loop import TrainConfig, train
from rankwise.train.maestro import Maestro
from rankwise.train.triadapt import TriAdaptLoRA

X, Y = task(48)
BUILD = {
    "increlora": (1, lambda m: IncreLoRA(m, target_rank=3, init_warmup=1, incre_interval=2, top_h=1)),
    "triadapt": (1, lambda m: TriAdaptLoRA(m, reference_rank=4, incre_interval=2)),
    "maestro": (6, lambda m: Maestro(m, threshold=0.6, shrink_every=3, gp_lambda=1e-3)),
    "diffora": (4, lambda m: DiffoRA(m, [(X[40:], Y[40:])], ce_loss, search_steps=5, gate_lr=0.05)),
}


@pytest.mark.parametrize("name", list(BUILD))
def test_stopped_and_resumed_equals_uninterrupted(name, tmp_path):
    r, build = BUILD[name]
    results = []
    for stop, resume, out in ((None, False, "full"), (7, False, "cut"), (None, True, "cut")):
        model = lora_mlp(seed=5, r=r, lora_alpha=4, init_lora_weights="pissa" if name == "maestro" else True)
        proc = build(model)
        config = TrainConfig(epochs=3, lr=1e-2, checkpoint_every=2, schedule="cosine")
        train(model, batcher(X[:40], Y[:40], 4), ce_loss, config, callbacks=[proc], progress=False,
              output_dir=tmp_path / out, stop_after=stop, resume_from="latest" if resume else None)
        results.append((trainable(model), getattr(proc, "ranks", lambda: proc.kept)()))
    (full, full_ranks), (cut, cut_ranks), (resumed, resumed_ranks) = results
    assert resumed_ranks == full_ranks
    assert set(resumed) == set(full)
    for key, tensor in full.items():
        assert torch.equal(tensor, resumed[key]), key
