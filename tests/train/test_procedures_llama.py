"""Every training procedure on a LLaMA-architecture decoder (GQA, RoPE, tied embeddings) with a causal-LM loss,
through `rankwise.train.loop.train`: the loss goes down, the procedure's own invariant holds, the result saves."""
from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from rankwise.train.loop import TrainConfig, train
from rankwise.train.procedures import PROCEDURES, build_procedure, dense_trainable, finish_procedure, save_dense_low_rank
from llama_cases import PROCEDURE_CASES as CASES
from llama_cases import PROJECTIONS
from toy_models import tiny_llama


def lm_batches(n_batches: int = 4, batch_size: int = 4, length: int = 12, seed: int = 0):
    """Sequences that repeat a short random motif (learnable in a few steps), right-padded, pads masked in labels."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        motif = torch.randint(3, 64, (batch_size, 3), generator=g)
        ids = motif.repeat(1, length // 3)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # one padded row per batch
        ids = ids.masked_fill(mask == 0, 0)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return batches


def lm_loss(model, batch):
    return model(**batch).loss


def mean_loss(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        return sum(float(lm_loss(model, b)) for b in batches) / len(batches)


def test_every_procedure_has_a_llama_case():
    assert set(CASES) == set(PROCEDURES)


@pytest.mark.parametrize("name", list(CASES))
def test_procedure_trains_a_tiny_llama_with_a_causal_lm_loss(name, tmp_path):
    make_config, options, lr = CASES[name]
    torch.manual_seed(0)
    base = tiny_llama()
    reference = copy.deepcopy(base)
    data = lm_batches()
    val = lm_batches(n_batches=1, seed=1)
    if make_config is None:
        model = dense_trainable(base, PROJECTIONS, head=[])
    else:
        model = rankwise.adapt(base, make_config())
    proc = build_procedure(name, model, val_batches=val, loss_fn=lm_loss, **options)
    n_layers = len(list(model.adapted_layers())) if make_config is not None else 0
    before = mean_loss(model, data)
    model.train()
    start_ranks = proc.ranks() if hasattr(proc, "ranks") else None
    groups = None if make_config is None else model.parameter_groups(lr)
    state = train(model, lambda epoch: data, lm_loss, TrainConfig(epochs=3, lr=lr, warmup_ratio=0.0), callbacks=[proc],
                  param_groups=groups, progress=False)
    assert state.step == 12
    summary = finish_procedure(proc, tmp_path)
    after = mean_loss(model, data)
    assert torch.isfinite(torch.tensor(after)) and after < before, (before, after)

    if name in ("increlora", "triadapt"):  # ranks grow under the budget
        assert sum(summary["ranks"].values()) > sum(start_ranks.values()), summary["ranks"]
    if name == "maestro":  # progressive shrinking
        assert sum(summary["ranks"].values()) < sum(start_ranks.values()), summary["ranks"]
    if name == "diffora":  # the learned gates keep only a share of the modules
        assert 0 < len(summary["kept_modules"]) < n_layers

    ids = data[0]["input_ids"]
    model.eval()  # GGPO's perturbation and Maestro's ordered dropout act in training mode only
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if make_config is None:  # TRP: the trained dense weights split into low-rank factors, saved
        low_rank = save_dense_low_rank(model, proc, tmp_path / "low_rank")
        assert low_rank and (tmp_path / "low_rank").is_dir()
        assert base.lm_head.weight is base.model.embed_tokens.weight, "dense training must keep the embeddings tied"
        return
    model.save_adapter(tmp_path / "adapter")
    loaded = rankwise.load_adapter(reference, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["galore", "dct"])
def test_low_rank_optimizers_step_a_tiny_llama(optimizer):
    from rankwise.optim import DCTAdamW, GaLoreAdamW

    torch.manual_seed(0)
    model = tiny_llama()
    matrices = [p for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if p.dim() != 2 or "embed_tokens" in n]
    cls = GaLoreAdamW if optimizer == "galore" else DCTAdamW
    opt = cls([{"params": matrices, "rank": 4, "update_proj_gap": 2}, {"params": rest}], lr=1e-2)
    data = lm_batches()
    before = mean_loss(model, data)
    k_before = model.model.layers[0].self_attn.k_proj.weight.detach().clone()
    for step in range(8):
        opt.zero_grad()
        lm_loss(model, data[step % 4]).backward()
        opt.step()
    assert not torch.equal(model.model.layers[0].self_attn.k_proj.weight, k_before)  # the non-square GQA projection moves
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert mean_loss(model, data) < before
