"""A tiny LLaMA-architecture causal LM written to a directory, with its own offline tokenizer.

`write_tiny_llama(path)` writes a `LlamaForCausalLM` built from a config (GQA: 4 query heads over 2 key/value
heads, RoPE, tied input/output embeddings, hidden 32, 2 layers) and a byte-level BPE tokenizer trained here on a
few sentences, wrapped in `PreTrainedTokenizerFast` with a chat template. Nothing is downloaded, so
`rankwise.data.models.load_base(path, task="causal-lm")` and `AutoModelForCausalLM.from_pretrained(path)` work in
CI. The pytest fixtures `tiny_llama_dir` (with a chat template) and `tiny_llama_dir_no_template` live in
tests/conftest.py.

    input_ids (B, T) -> embed (B, T, 32) -> 2 x [attn q:32->32, k,v:32->16, o:32->32 ; mlp gate,up:32->64, down:64->32]
                     -> norm -> lm_head (tied to embed) -> logits (B, T, V)
"""
from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# Rendered text: "<|user|>\n{content}<|end|>\n<|assistant|>\n{content}<|end|>\n" (system turns likewise).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TRAINING_SENTENCES = [
    "Classify the sentiment of this tweet as negative, neutral or positive.",
    "positive negative neutral",
    "I love this so much, what a great day!",
    "This is terrible, I hate waiting in line.",
    "The meeting is at noon on Tuesday.",
    "What is the capital of France? Paris is the capital of France.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "Translate to French: good morning -> bonjour",
    "one two three four five six seven eight nine ten",
]


def build_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer (no unknown tokens: every string round-trips) with LLaMA-like special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(TRAINING_SENTENCES * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=SPECIAL_TOKENS[4:])
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_tiny_llama(path: str | Path, chat_template: bool = True, seed: int = 0) -> Path:
    """Write the tiny LLaMA + tokenizer to `path` (created) and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0,
        # Tied embeddings at the default std 0.02 cap every logit near 0.6 (|h| = sqrt(32) after the norm), so
        # no adapter could fit anything; a larger init gives the tiny model a reachable low loss.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
