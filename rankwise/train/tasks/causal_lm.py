"""The causal-LM (instruction-tuning) task: conversations -> next-token loss on the assistant replies only.

Evaluation (before and after training): held-out loss and perplexity (token-weighted over the reply tokens),
exact-match accuracy of greedy replies to held-out prompts, and a few sample generations.
"""
from __future__ import annotations

import math
import random
from typing import Any

import torch
from torch import nn

from rankwise.data.instructions import InstructionData, collate, encode, pack
from rankwise.train.tasks import model_device, to_device

# LLaMA / Mistral / Qwen / SmolLM2 projection names: every linear layer of a decoder block.
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class CausalLMTask:
    name = "causal-lm"
    eval_in_loop_is_full = False  # the loop evaluates loss/perplexity only; generations run before and after

    def __init__(self, data: InstructionData, eval_generations: int = 64, max_new_tokens: int = 32, samples: int = 3):
        self.data = data
        self.eval_generations, self.max_new_tokens, self.samples = eval_generations, max_new_tokens, samples

    def num_labels(self) -> None:
        return None

    def default_targets(self, model) -> list[str] | str:
        leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        found = [t for t in LLAMA_TARGETS if t in leaves]
        return found if found else "all-linear"

    def head_modules(self, model) -> list[str]:
        return []  # the LM head is tied to the embeddings in most small LMs: never trained as a copy

    def prepare(self, tokenizer, spec) -> None:
        self.spec, self.tokenizer = spec, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
        self.encoded = encode(tokenizer, self.data.train, spec.max_length)
        self.test_encoded = encode(tokenizer, self.data.test, spec.max_length)
        if spec.packing:
            self.train_ids, self.train_labels = pack(self.encoded, spec.max_length)
        else:
            self.train_ids, self.train_labels = self.encoded.input_ids, self.encoded.labels
        order = sorted(range(len(self.test_encoded.input_ids)), key=lambda i: len(self.test_encoded.input_ids[i]))
        self.test_batches = [collate([self.test_encoded.input_ids[j] for j in order[k:k + 16]],
                                     [self.test_encoded.labels[j] for j in order[k:k + 16]], self.pad_id)
                             for k in range(0, len(order), 16)]
        held_out = self.data.test[: self.eval_generations]
        self.gen_prompts = [c[:-1] for c in held_out]  # everything up to the last (assistant) turn
        self.gen_references = [c[-1]["content"] for c in held_out]
        longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in self.gen_references)
        self.gen_tokens = min(self.max_new_tokens, longest + 4)

    def train_batches(self, epoch: int):
        order = list(range(len(self.train_ids)))
        random.Random(self.spec.train.seed + epoch).shuffle(order)
        size = self.spec.batch_size
        return [collate([self.train_ids[j] for j in order[k:k + size]], [self.train_labels[j] for j in order[k:k + size]],
                        self.pad_id) for k in range(0, len(order), size)]

    def split_validation(self):
        cut = max(1, len(self.train_ids) // 10)
        val = [collate(self.train_ids[-cut:][k:k + self.spec.batch_size], self.train_labels[-cut:][k:k + self.spec.batch_size],
                       self.pad_id) for k in range(0, cut, self.spec.batch_size)]
        self.train_ids, self.train_labels = self.train_ids[:-cut], self.train_labels[:-cut]
        return val

    def loss(self, model, batch):
        return model(**batch).loss

    @torch.no_grad()
    def held_out_loss(self, model, data_parallel=None) -> dict[str, float]:
        model.eval()
        device = model_device(model)
        batches = self.test_batches
        if data_parallel is not None:
            batches = batches[data_parallel.rank :: data_parallel.world_size]
        total, tokens = 0.0, 0
        for batch in batches:
            batch = to_device(batch, device)
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
        if data_parallel is not None:
            total, tokens = data_parallel.all_reduce_sums([total, tokens])
        loss = total / max(tokens, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    def evaluate(self, model, data_parallel=None, full: bool = True) -> dict[str, Any]:
        from rankwise.generation import exact_match, generate_replies

        metrics: dict[str, Any] = self.held_out_loss(model, data_parallel)
        if not full:
            return metrics
        replies = generate_replies(model, self.tokenizer, self.gen_prompts, max_new_tokens=self.gen_tokens,
                                   max_prompt_tokens=self.spec.max_length)
        hits = [exact_match(p, r) for p, r in zip(replies, self.gen_references)]
        metrics["exact_match"] = sum(hits) / max(len(hits), 1)
        metrics["samples"] = [{"prompt": p[-1]["content"], "reference": r, "generated": g}
                              for p, r, g in list(zip(self.gen_prompts, self.gen_references, replies))[: self.samples]]
        return metrics

    def summary(self) -> str:
        return self.data.summary()

    def extra_metrics(self) -> dict[str, Any]:
        enc = self.encoded
        return {
            "chat_template": "fallback (the tokenizer has none)" if enc.used_fallback else "tokenizer",
            "truncated_train_examples": enc.truncated, "dropped_train_examples": enc.dropped,
            "truncated_test_examples": self.test_encoded.truncated,
            "train_rows": len(self.train_ids), "packing": bool(self.spec.packing),
            "exact_match_prompts": len(self.gen_prompts),
        }
