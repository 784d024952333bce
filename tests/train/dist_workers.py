"""What the processes of the data-parallel tests run (a module, not the test file: spawned processes import it)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import rankwise
from rankwise.train.loop import TrainConfig, train

VOCAB, SEQ = 30, 10


def tiny_bert(seed: int = 0, rank: int = 4):
    """A 2-layer BERT classifier from a config, dropout off (so 1 and 2 processes can agree), with LoRA."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=SEQ, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(cfg)
    config = rankwise.LoraConfig(r=rank, lora_alpha=8, target_modules=["query", "value", "dense"], modules_to_save=["classifier"])
    return rankwise.adapt(base, config)


def global_batches(n: int = 21, batch_size: int = 8):
    """`batches(epoch)`: the same padded batches on every rank (a seed per epoch); 21 rows make a short last batch."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids[:, 1] % 3

    def batches(epoch: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(100 + epoch))
        return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in order.split(batch_size)]

    return batches


def loss_fn(model, batch):
    return model(**batch).loss


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


CONFIGS = {
    "plain": TrainConfig(epochs=2, lr=1e-2, seed=0),
    "accum2": TrainConfig(epochs=2, lr=1e-2, seed=0, grad_accum=2),
    # a procedure that reads gradients and grows the adapter (new tensors, new optimizer groups) between steps
    "increlora": TrainConfig(epochs=3, lr=1e-2, seed=0),
}


def run(config_name: str, data_parallel=None) -> tuple[dict[str, torch.Tensor], list[float]]:
    callbacks = []
    if config_name == "increlora":
        from rankwise.train.increlora import IncreLoRA

        model = tiny_bert(rank=1)
        callbacks.append(IncreLoRA(model, target_total_rank=20, init_warmup=1, incre_interval=2, top_h=3, incre_rank_num=2, seed=0))
    else:
        model = tiny_bert()
    state = train(model, global_batches(), loss_fn, CONFIGS[config_name], param_groups=model.parameter_groups(CONFIGS[config_name].lr),
                  callbacks=callbacks, progress=False, data_parallel=data_parallel)
    return trainable_state(model), [h["loss"] for h in state.history if "loss" in h]


def data_parallel_worker(out_dir: str) -> None:
    """Each rank trains every config; rank 0 writes the weights and losses, every rank its own weights."""
    import json

    import torch.distributed as dist

    from rankwise.train.distributed import DataParallel

    dp = DataParallel(dist.get_rank(), dist.get_world_size())
    for name in CONFIGS:
        weights, losses = run(name, dp)
        save_file(weights, str(Path(out_dir) / f"{name}-rank{dp.rank}.safetensors"))
        if dp.is_main:
            (Path(out_dir) / f"{name}-losses.json").write_text(json.dumps(losses))


def mismatched_worker() -> None:
    """Ranks holding different trainable tensors (as a rank-local growth decision would leave them) must not reduce."""
    import torch.distributed as dist

    from rankwise.train.distributed import DataParallel

    dp = DataParallel(dist.get_rank(), dist.get_world_size())
    p = torch.nn.Parameter(torch.zeros(3 + dp.rank))
    p.grad = torch.ones_like(p)
    dp.sync_gradients([p], 0.0)
