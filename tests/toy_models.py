"""Tiny models for the generic test matrix: every kind of layer rankwise wraps, built from configs (no download)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 32)
        self.lin1 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 3 * 3, 16)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(h.flatten(1))


class EmbeddingModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)

    def forward(self, ids):
        return self.lin(self.emb(ids)).mean(1)


def tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Model(cfg)


def tiny_llama():
    """LLaMA architecture at toy size: grouped-query attention (k/v project 32 -> 16, non-square), RoPE, SwiGLU,
    RMSNorm and an lm_head tied to the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight, "the toy LLaMA must tie its embeddings"
    return model


def _logits(model, inputs, **kwargs):
    return model(input_ids=inputs, **kwargs).logits


def _hidden(model, inputs, **kwargs):
    return model(input_ids=inputs, **kwargs).last_hidden_state


def _plain(model, inputs, **kwargs):
    return model(inputs, **kwargs)


@dataclass
class ToyCase:
    name: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[], torch.Tensor]
    targets_by_kind: dict[str, list[str]]
    run: Callable = _plain

    def targets_for(self, supported: tuple[str, ...]) -> list[str]:
        return [t for kind in supported for t in self.targets_by_kind.get(kind, [])]


TOY_CASES = [
    ToyCase("mlp", MLP, lambda: torch.randn(6, 16), {"linear": ["lin0", "lin1"]}),
    ToyCase("conv", ConvNet, lambda: torch.randn(4, 3, 8, 8), {"conv": ["conv1", "conv2"], "linear": ["fc"]}),
    ToyCase("embedding", EmbeddingModel, lambda: torch.randint(0, 50, (4, 7)), {"embedding": ["emb"], "linear": ["lin"]}),
    ToyCase("bert", tiny_bert, lambda: torch.randint(0, 64, (3, 10)), {"linear": ["query", "value", "dense"]}, _hidden),
    ToyCase("gpt2", tiny_gpt2, lambda: torch.randint(0, 64, (3, 10)), {"linear": ["c_attn", "c_proj"]}, _hidden),
    # Every linear projection (GQA's k_proj/v_proj are 32 -> 16) and the tied input embedding; the output is the
    # logits, so a change that leaks from embed_tokens into the tied lm_head shows.
    ToyCase("llama", tiny_llama, lambda: torch.randint(0, 64, (3, 10)),
            {"linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "embedding": ["embed_tokens"]}, _logits),
]
