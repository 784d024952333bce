"""Physically smaller attention for MoDeGPT (arXiv 2408.09632): queries/keys of `qk_dim`, values of `v_dim` per head.

MoDeGPT keeps `qk_dim < head_dim` dims of every query/key head (CR selection, type II) and rebuilds the
value/output pair at rank `v_dim < head_dim` (SVD, type III). Hugging Face's attention classes derive every
width from one `head_dim`, so these modules replace them inside each block and really compute in the
smaller sizes: the q/k/v/o projections are smaller `nn.Linear`s, the score matmul runs over `qk_dim`, the
value matmul over `v_dim`, and a KV cache stores keys of `qk_dim` and values of `v_dim` per KV head.

    hidden [B, T, d] --q_proj--> [B, H,  T, qk_dim] --RoPE (kept pairs' ORIGINAL frequencies)--+
                     --k_proj--> [B, KV, T, qk_dim] --RoPE------------------> cache ------------+-> softmax(q kᵀ * scaling)
                     --v_proj--> [B, KV, T, v_dim] ---------------------------> cache --------------> @ v
                     [B, T, H * v_dim] --o_proj--> [B, T, d]

RoPE: dims `i` and `i + head_dim/2` of a head rotate together at frequency `inv_freq[i]`. A pruned head keeps
whole pairs, stored as `[i_1..i_m, i_1 + hd/2 .. i_m + hd/2]` (`rope_dims`, one row per KV head), so the
standard `rotate_half` on the `qk_dim`-vector pairs the right dims; the cos/sin the model passes in
(`position_embeddings`, full `head_dim`, any RoPE scaling applied) are gathered at `rope_dims`, so the kept
pairs rotate at their original frequencies (recomputing `inv_freq` for a smaller head_dim would not).
`scaling` stays the original `head_dim ** -0.5`: the kept dims' dot products must be scored as before.

Attention runs through transformers' SDPA function whatever `config._attn_implementation` says (eager and
sdpa masks, bool or additive, both work with it; flash/flex attention masks are not supported and
`output_attentions` returns no weights).
"""
from __future__ import annotations

import torch
from torch import nn

from rankwise.compress.serialize import register_module_kind


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _sdpa(module: nn.Module, query, key, value, attention_mask, kwargs: dict) -> torch.Tensor:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "use_cache", "cache_position")}
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                    dropout=module.attention_dropout if module.training else 0.0,
                                    scaling=module.scaling, **kwargs)
    return out  # [B, T, H, v_dim]


class _PrunedAttentionBase(nn.Module):
    """What both pruned attentions share: the sizes, the spec for `serialize.py`, the cached attention call."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, qk_dim: int, v_dim: int, head_dim: int,
                 scaling: float, layer_idx: int | None, attention_dropout: float, is_causal: bool):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.hidden_size, self.num_heads, self.num_kv_heads = int(hidden_size), int(num_heads), int(num_kv_heads)
        self.qk_dim, self.v_dim, self.head_dim = int(qk_dim), int(v_dim), int(head_dim)
        self.num_key_value_groups = self.num_heads // self.num_kv_heads  # read by transformers' sdpa function
        self.scaling, self.layer_idx = float(scaling), layer_idx
        self.attention_dropout, self.is_causal = float(attention_dropout), bool(is_causal)

    def _sizes_spec(self) -> dict:
        return {"hidden": self.hidden_size, "heads": self.num_heads, "kv_heads": self.num_kv_heads,
                "qk_dim": self.qk_dim, "v_dim": self.v_dim, "head_dim": self.head_dim, "scaling": self.scaling,
                "layer_idx": -1 if self.layer_idx is None else int(self.layer_idx),
                "dropout": self.attention_dropout, "causal": self.is_causal}

    @staticmethod
    def _sizes_from_spec(spec: dict) -> dict:
        return {"hidden_size": spec["hidden"], "num_heads": spec["heads"], "num_kv_heads": spec["kv_heads"],
                "qk_dim": spec["qk_dim"], "v_dim": spec["v_dim"], "head_dim": spec["head_dim"],
                "scaling": spec["scaling"], "layer_idx": None if spec["layer_idx"] < 0 else spec["layer_idx"],
                "attention_dropout": spec["dropout"], "is_causal": spec["causal"]}

    def _attend(self, query, key, value, attention_mask, cache, kwargs) -> torch.Tensor:
        """query [B, H, T, qk], key [B, KV, T, qk], value [B, KV, T, v] -> [B, T, H * v] (after the cache)."""
        if cache is not None:
            cache_layer = getattr(cache, "self_attention_cache", cache)  # BERT decoders pass an EncoderDecoderCache
            key, value = cache_layer.update(key, value, self.layer_idx, kwargs=kwargs)
        out = _sdpa(self, query, key, value, attention_mask, kwargs)
        return out.reshape(*out.shape[:2], -1).contiguous()


class PrunedRopeAttention(_PrunedAttentionBase):
    """Drop-in for a Llama-style attention (`LlamaAttention`, Mistral, Qwen2...) with pruned head dims.

    Children `q_proj` [H*qk, d], `k_proj` [KV*qk, d], `v_proj` [KV*v, d], `o_proj` [d, H*v] keep the
    original names (LoRA can target them). `rope_dims` [KV, qk]: which of the original `head_dim` dims
    each KV head (and its query heads) kept, RoPE pairs together (see the module docstring).
    Called like the original: `forward(hidden_states, position_embeddings, attention_mask, cache, ...)`
    returns `(output, None)`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, qk_dim: int, v_dim: int, head_dim: int,
                 scaling: float, layer_idx: int | None = None, attention_dropout: float = 0.0, is_causal: bool = True,
                 q_bias: bool = False, k_bias: bool = False, v_bias: bool = False, o_bias: bool = False):
        super().__init__(hidden_size, num_heads, num_kv_heads, qk_dim, v_dim, head_dim, scaling, layer_idx,
                         attention_dropout, is_causal)
        if qk_dim % 2 or qk_dim > head_dim:
            raise ValueError(f"qk_dim {qk_dim} must be even (whole RoPE pairs) and at most head_dim {head_dim}")
        self.q_proj = nn.Linear(hidden_size, num_heads * qk_dim, bias=q_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * qk_dim, bias=k_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * v_dim, bias=v_bias)
        self.o_proj = nn.Linear(num_heads * v_dim, hidden_size, bias=o_bias)
        half = head_dim // 2
        pairs = torch.arange(qk_dim // 2)
        self.register_buffer("rope_dims", torch.cat([pairs, pairs + half]).repeat(num_kv_heads, 1))

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, T = hidden_states.shape[:2]
        kv, group = self.num_kv_heads, self.num_key_value_groups
        # queries grouped by their KV head: [B, KV, group, T, qk], the order repeat_kv pairs them in
        query = self.q_proj(hidden_states).view(B, T, kv, group, self.qk_dim).permute(0, 2, 3, 1, 4)
        key = self.k_proj(hidden_states).view(B, T, kv, self.qk_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(B, T, kv, self.v_dim).transpose(1, 2)
        if position_embeddings is None:
            raise ValueError("PrunedRopeAttention needs the model's rotary `position_embeddings` (cos, sin)")
        cos, sin = position_embeddings  # [B, T, head_dim] -> the kept dims of each KV head: [B, KV, T, qk]
        cos = cos[..., self.rope_dims].permute(0, 2, 1, 3).to(query.dtype)
        sin = sin[..., self.rope_dims].permute(0, 2, 1, 3).to(query.dtype)
        key = key * cos + _rotate_half(key) * sin
        query = query * cos[:, :, None] + _rotate_half(query) * sin[:, :, None]
        query = query.reshape(B, self.num_heads, T, self.qk_dim)
        out = self._attend(query, key, value, attention_mask, cache, kwargs)
        return self.o_proj(out), None

    def spec(self) -> dict:
        return {**self._sizes_spec(), **{f"{n}_bias": getattr(self, f"{n}_proj").bias is not None for n in "qkvo"}}

    @classmethod
    def from_spec(cls, spec: dict) -> "PrunedRopeAttention":
        return cls(**cls._sizes_from_spec(spec), **{f"{n}_bias": spec[f"{n}_bias"] for n in "qkvo"})


class PrunedSelfAttention(_PrunedAttentionBase):
    """Drop-in for BERT's `BertSelfAttention` (absolute positions, no RoPE) with pruned head dims.

    Children `query` [H*qk, d], `key` [H*qk, d], `value` [H*v, d] (original names); the output projection
    stays BERT's own `attention.output.dense`, now an `nn.Linear(H*v, d)`. Returns `(context [B, T, H*v], None)`.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, qk_dim: int, v_dim: int, head_dim: int,
                 scaling: float, layer_idx: int | None = None, attention_dropout: float = 0.0, is_causal: bool = False,
                 q_bias: bool = True, k_bias: bool = True, v_bias: bool = True):
        super().__init__(hidden_size, num_heads, num_kv_heads, qk_dim, v_dim, head_dim, scaling, layer_idx,
                         attention_dropout, is_causal)
        self.query = nn.Linear(hidden_size, num_heads * qk_dim, bias=q_bias)
        self.key = nn.Linear(hidden_size, num_kv_heads * qk_dim, bias=k_bias)
        self.value = nn.Linear(hidden_size, num_kv_heads * v_dim, bias=v_bias)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, cache=None,
                past_key_values=None, encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("PrunedSelfAttention is self-attention only (MoDeGPT does not prune cross-attention)")
        cache = cache if cache is not None else past_key_values
        B, T = hidden_states.shape[:2]
        query = self.query(hidden_states).view(B, T, self.num_heads, self.qk_dim).transpose(1, 2)
        key = self.key(hidden_states).view(B, T, self.num_kv_heads, self.qk_dim).transpose(1, 2)
        value = self.value(hidden_states).view(B, T, self.num_kv_heads, self.v_dim).transpose(1, 2)
        return self._attend(query, key, value, attention_mask, cache, kwargs), None

    def spec(self) -> dict:
        return {**self._sizes_spec(), "q_bias": self.query.bias is not None, "k_bias": self.key.bias is not None,
                "v_bias": self.value.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "PrunedSelfAttention":
        return cls(**cls._sizes_from_spec(spec), q_bias=spec["q_bias"], k_bias=spec["k_bias"], v_bias=spec["v_bias"])


register_module_kind("modegpt_rope_attention", PrunedRopeAttention, PrunedRopeAttention.spec, PrunedRopeAttention.from_spec)
register_module_kind("modegpt_self_attention", PrunedSelfAttention, PrunedSelfAttention.spec, PrunedSelfAttention.from_spec)
