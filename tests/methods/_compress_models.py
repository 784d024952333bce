"""Tiny models from configs for the compression tests (no downloads)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def token_batches(n: int = 4, batch: int = 4, seq: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (batch, seq), generator=generator) for _ in range(n)]


def tiny_bert(layers: int = 2, seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def padded_batches(n: int = 4, batch: int = 4, seq: int = 16, seed: int = 1) -> list[dict]:
    """Dict batches with a real attention mask (trailing padding of random length), as a tokenizer makes them."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (batch, seq), generator=generator)
        lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=generator)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out
