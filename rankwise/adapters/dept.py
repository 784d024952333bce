"""DePT, Decomposed Prompt Tuning: a shorter soft prompt plus a low-rank, position-wise update of the input
embeddings, trained with two learning rates (Shi & Lipani, ICLR 2024, arXiv 2309.05173).

    input_ids (b x n, n <= s) ── Embedding (frozen) ──(+)── E + s_c * (A B)[:n]  (row i added at position i)
                                                      │            A: s x r,  B: r x d,  s_c = lora_alpha / sqrt(r)
                     prompt P (m x d, trainable) ─────┴─ concat ── [P ; E'] (b x (m+n) x d) ── backbone
    attention_mask ── [1 ... 1 (m) ; mask]

Two pieces, two homes (DESIGN.md "input-side methods"):
- `DeptAdapter` sits on the `nn.Embedding` and adds the position-wise table (a per-layer adapter; the update
  depends on the position, not the token, so it is not a change of the embedding weight and cannot be merged);
- `DeptPrompt` is the model-level module (`model.shared[name]`): its `prepare_inputs` runs the embedding,
  prepends P, extends `attention_mask` / `token_type_ids` (and `labels` of causal LMs with -100), and hands
  `inputs_embeds` to the backbone, as PEFT does for prompt tuning. The backbone sees m + n positions.
Learning rates: the prompt trains at the optimizer's lr, A and B at `embedding_lr_scale` x lr
(`model.parameter_groups(lr)`). `merge_and_unload` raises: the prompt cannot be folded into any weight.
`model.generate` (decoder LMs) goes through `DeptPrompt.generate`: the prompt is prepended once, and each
cached decoding step adds the table row of the new token's own position.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import AdapterStateError, ConfigError, ShapeError, TargetError
from rankwise.core.registry import register
from rankwise.linalg import seeded_generator


def dept_rank_for_budget(prompt_tuning_length: int, num_virtual_tokens: int, max_length: int, dim: int) -> int:
    """The rank r that gives DePT the budget of vanilla prompt tuning with l tokens: r = (l - m) d / (s + d)."""
    numerator = (prompt_tuning_length - num_virtual_tokens) * dim
    if numerator <= 0 or numerator % (max_length + dim):
        raise ConfigError(
            f"no integer rank gives DePT(m={num_virtual_tokens}, s={max_length}, d={dim}) the budget of "
            f"prompt tuning with {prompt_tuning_length} tokens: (l - m) d / (s + d) = {numerator / (max_length + dim):.3f}"
        )
    return numerator // (max_length + dim)


class DeptPrompt(nn.Module):
    """The soft prompt (m x d) and the input rewrite that prepends it."""

    def __init__(self, config: "DeptConfig", layers: dict):
        super().__init__()
        if len(layers) != 1:
            raise TargetError(f"DePT adapts exactly one input embedding, but target_modules matched {sorted(layers)}")
        (name, layer), = layers.items()
        self.embedding_name = name
        table = layer.base_layer.weight.detach()
        m = config.num_virtual_tokens
        prompt = torch.empty(m, table.shape[1])
        if config.prompt_init == "random":
            prompt.normal_(generator=seeded_generator(config.seed))
        else:  # rows of the frozen vocabulary: given token ids (e.g. a tokenised instruction) or a seeded sample
            ids = config.prompt_init_ids or torch.randint(table.shape[0], (m,), generator=seeded_generator(config.seed)).tolist()
            if max(ids, default=0) >= table.shape[0]:
                raise ConfigError(f"DeptConfig.prompt_init_ids has id {max(ids)} >= vocabulary size {table.shape[0]}")
            ids = (list(ids) * (m // max(len(ids), 1) + 1))[:m]  # repeated/truncated to m tokens, as the reference
            prompt.copy_(table[torch.tensor(ids, dtype=torch.long)].float())
        self.prompt_embeddings = nn.Parameter(prompt)

    def save_key(self, key: str) -> str:
        return key  # DePT's own key: base_model.model.prompt_embeddings

    def prepare_inputs(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ShapeError("DePT: pass the model inputs as keywords (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        input_ids = kwargs.pop("input_ids", None)
        get_embeddings = getattr(model, "get_input_embeddings", None)
        if input_ids is None or not callable(get_embeddings):
            raise TargetError("DePT needs a transformers-style model called with input_ids (it exposes "
                              "get_input_embeddings() and accepts inputs_embeds)")
        if kwargs.get("position_ids") is not None:
            raise ShapeError("DePT prepends prompt positions; do not pass position_ids (the model derives them)")
        m = self.prompt_embeddings.shape[0]
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and m + input_ids.shape[-1] > limit:
            raise ShapeError(f"DePT: {m} prompt tokens + {input_ids.shape[-1]} input tokens exceed the model's "
                             f"max_position_embeddings={limit}: lower num_virtual_tokens or truncate the inputs "
                             f"to {limit - m} tokens")
        embeds = get_embeddings()(input_ids)  # the adapted embedding adds the position-wise low-rank table
        batch = embeds.shape[0]
        prompt = self.prompt_embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if kwargs.get("attention_mask") is not None:
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, m), mask], dim=1)
        if kwargs.get("token_type_ids") is not None:
            types = kwargs["token_type_ids"]
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, m), types], dim=1)
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        if kwargs.get("labels") is not None and not encoder_decoder and kwargs["labels"].dim() == 2:
            labels = kwargs["labels"]  # causal LM: the prompt positions predict nothing
            kwargs["labels"] = torch.cat([labels.new_full((batch, m), -100), labels], dim=1)
        return (), kwargs

    def generate(self, model: nn.Module, adapter: "DeptAdapter", args: tuple, kwargs: dict):
        """`model.generate` with the prompt prepended and the position-wise table following the real positions.

        The first step embeds [P ; E'] as in training; each later (cached) step embeds one new token, which gets
        the table row of its own position (not row 0 of a length-1 input). Positions count real tokens only
        (`attention_mask.cumsum - 1`), so a left-padded batch gets the rows each sample would get alone; positions
        past max_length get no row (the table is zero there). Returns the input ids followed by the new tokens,
        as a plain `generate` does.
        """
        kwargs = dict(kwargs)
        if args:
            if "input_ids" in kwargs or len(args) > 1:
                raise ShapeError("DePT: pass generate inputs as keywords (input_ids=..., attention_mask=...)")
            kwargs["input_ids"] = args[0]
        if kwargs.get("inputs_embeds") is not None:
            raise ShapeError("DePT: generate from input_ids (the prompt is prepended to their embeddings), not inputs_embeds")
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            raise TargetError("DePT: generate needs input_ids")
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = torch.ones_like(input_ids)
        adapter.generation_positions = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        adapter.generation_started = False
        try:
            _, prepared = self.prepare_inputs(model, (), kwargs)
            out = model.generate(**prepared)
        finally:
            adapter.generation_positions, adapter.generation_started = None, False
        if isinstance(out, torch.Tensor):
            return torch.cat([input_ids, out], dim=1)
        out.sequences = torch.cat([input_ids, out.sequences], dim=1)
        return out


class DeptAdapter(Adapter):
    def __init__(self, config: "DeptConfig", layer, module_name: str, shared: DeptPrompt = None):
        super().__init__(config, layer, module_name, shared)
        dim = layer.base_layer.weight.shape[1]
        self.r = config.r
        self.scaling = config.lora_alpha / math.sqrt(config.r)  # alpha / sqrt(r), as the reference
        self.lora_embedding_A = nn.Parameter(torch.empty(config.max_length, config.r))
        self.lora_embedding_B = nn.Parameter(torch.zeros(config.r, dim))
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5))
        # Set only while DeptPrompt.generate runs: (b, n) positions of the first call, then (b, 1) per new token.
        self.generation_positions: torch.Tensor | None = None
        self.generation_started = False

    def position_table(self, length: int | None = None) -> torch.Tensor:
        """The additive (length x d) table: row i is added to the embedding at position i."""
        length = self.config.max_length if length is None else length
        return self.lora_embedding_A[:length] @ self.lora_embedding_B * self.scaling

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        raise AdapterStateError(
            "DePT's update is position-wise (a max_length x dim table added by position), not a change of the "
            "embedding weight, so it has no delta_weight and cannot be merged; use adapter.position_table()"
        )

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if self.generation_positions is not None:
            return base_out + self._rows_at_generation_positions(x)
        length = x.shape[-1]
        if length > self.config.max_length:
            raise ShapeError(f"DePT: input length {length} exceeds max_length={self.config.max_length} of the "
                             "position-wise table; truncate inputs or adapt with a larger max_length")
        return base_out + self.position_table(length)

    def _rows_at_generation_positions(self, x: torch.Tensor) -> torch.Tensor:
        positions = self.generation_positions
        if self.generation_started:  # a cached decoding step: the new tokens follow each sample's last position
            positions = positions[:, -1:] + torch.arange(1, x.shape[-1] + 1, device=x.device)
        self.generation_positions, self.generation_started = positions, True
        table = self.position_table()
        padded = torch.cat([table, table.new_zeros(1, table.shape[1])])  # row s: the zero row past max_length
        return padded[positions.clamp(max=self.config.max_length)]

    def parameter_groups(self) -> list[dict]:
        return [{"params": [self.lora_embedding_A, self.lora_embedding_B], "lr_scale": self.config.embedding_lr_scale}]

    @classmethod
    def build_shared(cls, config: "DeptConfig", layers: dict) -> DeptPrompt:
        return DeptPrompt(config, layers)


@register("dept", adapter=DeptAdapter, family="prompt + low-rank", paper="2309.05173")
@dataclasses.dataclass
class DeptConfig(AdapterConfig):
    """DePT. Not in upstream PEFT (the authors' fork calls it PROMPT_TUNING_LORA): files are `RANKWISE_DEPT`.

    target_modules: the input embedding (e.g. ["word_embeddings"], ["embed_tokens"], ["wte"]); exactly one.
    num_virtual_tokens: prompt length m >= 0 (README default 40; 60 also "should be fine").
    r: rank of the position-wise update, >= 1 (m=40, s=256, d=768: r=45 matches 100-token prompt tuning;
        see `dept_rank_for_budget`).
    max_length: s, the longest input (the table has one row per position); inputs may be shorter.
    lora_alpha: scale numerator; the table is multiplied by lora_alpha / sqrt(r) (reference 8).
    embedding_lr_scale: learning rate of A, B relative to the prompt's (reference grids: prompt 3e-1,
        low-rank 1e-4 .. 5e-3), in (0, 1e3].
    prompt_init: "vocab" (rows of the frozen embedding table: `prompt_init_ids`, or a seeded sample of tokens;
        the reference embeds an instruction text) or "random" (N(0, 1), the reference's RANDOM).
    prompt_init_ids: token ids to initialise the prompt from (repeated / truncated to m), e.g. a tokenised text.
    seed: seeds the prompt init.
    """

    num_virtual_tokens: int = 40
    r: int = 45
    max_length: int = 256
    lora_alpha: float = 8
    embedding_lr_scale: float = 0.01
    prompt_init: str = "vocab"
    prompt_init_ids: list[int] | None = None
    seed: int = 0

    supported_layers: ClassVar[tuple[str, ...]] = ("embedding",)
    init_property: ClassVar[str] = "none"  # the prompt is always prepended (as in prompt tuning); B = 0
    unmergeable_reason: ClassVar[str] = (
        "DePT prepends a trained soft prompt and adds a position-wise table to the input embeddings; neither is a "
        "change of any weight. Keep the AdaptedModel for inference (or save_adapter and load_adapter)."
    )

    def validate(self) -> None:
        super().validate()
        for field, low in (("num_virtual_tokens", 0), ("r", 1), ("max_length", 1), ("seed", 0)):
            value = getattr(self, field)
            self._check(isinstance(value, int) and not isinstance(value, bool) and value >= low, field, f"an integer >= {low}")
        self._check(isinstance(self.lora_alpha, (int, float)) and self.lora_alpha > 0, "lora_alpha", "a number > 0")
        self._check(isinstance(self.embedding_lr_scale, (int, float)) and 0 < self.embedding_lr_scale <= 1e3,
                    "embedding_lr_scale", "a number in (0, 1000]")
        self._check(self.prompt_init in ("vocab", "random"), "prompt_init", "'vocab' or 'random'")
        self._check(self.prompt_init_ids is None or (isinstance(self.prompt_init_ids, list) and self.prompt_init_ids
                                                     and all(isinstance(i, int) and i >= 0 for i in self.prompt_init_ids)),
                    "prompt_init_ids", "None or a non-empty list of token ids >= 0")


def count_trainable(config: DeptConfig, dim: int) -> int:
    """m d + s r + r d."""
    return config.num_virtual_tokens * dim + config.max_length * config.r + config.r * dim

