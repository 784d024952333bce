"""A tiny local text classifier (WordLevel tokenizer + 2-layer BERT) and a two-class CSV it can learn.

Shared by the CLI, distributed and per-method CLI tests; nothing is downloaded."""
from __future__ import annotations

import random
from pathlib import Path

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "very", "food", "service"]


def write_tiny_classifier(path: Path, dropout: float = 0.1, seed: int | None = None) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", *WORDS]
    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    if seed is not None:
        import torch

        torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def write_sentiment_csv(path: Path, rows: int = 400) -> Path:
    """`rows` texts of 5 words: 4 fillers and one sentiment word that decides the label."""
    rng = random.Random(0)
    lines = ["text,label"]
    for _ in range(rows):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(WORDS[:3] if label == "pos" else WORDS[3:6])
        filler = rng.sample(WORDS[6:], 3)
        lines.append(f"{' '.join(filler[:2] + [word] + filler[2:])},{label}")
    path.write_text("\n".join(lines) + "\n")
    return path
