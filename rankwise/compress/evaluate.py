"""Quality and speed measurements for compressed models: perplexity, embedding similarity, CPU latency.

Text is split once into a calibration part (the start) and a held-out part (the end), so the
quality numbers are never measured on calibration tokens.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from rankwise.compress._common import run_model


def token_chunks(tokenizer, text: str, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Tokenise `text` and cut it into `[n, seq_len]` rows (the tail that does not fill a row is dropped)."""
    ids = tokenizer(text[: max_tokens * 8] if max_tokens else text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor(ids, dtype=torch.long)
    if max_tokens:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


def split_calibration_eval(chunks: torch.Tensor, n_calibration: int, n_eval: int,
                           batch_size: int = 8) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """First `n_calibration` rows for calibration, last `n_eval` rows held out, both batched."""
    if n_calibration + n_eval > chunks.shape[0]:
        raise ValueError(f"text has {chunks.shape[0]} chunks, need {n_calibration} + {n_eval}: use more text or a "
                         "shorter --seq-len")
    calibration = chunks[:n_calibration]
    held_out = chunks[chunks.shape[0] - n_eval:]
    return list(calibration.split(batch_size)), list(held_out.split(batch_size))


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over all predicted tokens of `batches`."""
    model.eval()
    total, count = 0.0, 0
    for ids in batches:
        logits = run_model(model, ids).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(total / max(count, 1))


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers builds them for MiniLM: masked mean of the last layer."""
    model.eval()
    out = []
    for batch in batches:
        hidden = run_model(model, batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(out)


def embedding_cosine(reference: torch.Tensor, compressed: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows (1.0 = the compressed model embeds like the original)."""
    return float(nn.functional.cosine_similarity(reference, compressed, dim=-1).mean())


@torch.no_grad()
def cpu_latency_ms(model: nn.Module, batch: Any, repeats: int = 5) -> float:
    """Median wall time of one forward pass (after one warm-up), in milliseconds."""
    model.eval()
    run_model(model, batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_model(model, batch)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
