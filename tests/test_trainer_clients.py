"""Real clients: an unmodified `transformers.Trainer` (and trl's `SFTTrainer`) trains a rankwise model as it trains
a `PeftModel`: dataset columns and labels found, `evaluate` with `compute_metrics`, checkpoints and `save_model`
holding the adapter files only, `resume_from_checkpoint`, `load_best_model_at_end`, gradient checkpointing, bf16.

Tiny models from configs (a BERT classifier, a LLaMA with GQA and tied embeddings); no wrapper is written here.
"""
from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch

import rankwise

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.utils.generic import find_labels  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}
VOCAB = 64


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def lora_llama(base_seed: int = 0, adapter_seed: int = 1):
    base = tiny_llama(base_seed)
    torch.manual_seed(adapter_seed)
    return rankwise.adapt(base, rankwise.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))


def counting_dataset(n: int = 64, length: int = 12):
    """Sequences s, s+1, s+2, ... (mod VOCAB): next-token prediction a LoRA learns in a few steps."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(0))
    ids = (starts + torch.arange(length)) % VOCAB
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["unused"] * n})


def args(tmp_path, **overrides) -> TrainingArguments:
    """Default TrainingArguments but for the few settings a CPU unit test needs."""
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], per_device_train_batch_size=8,
                  per_device_eval_batch_size=8, max_steps=20, learning_rate=3e-2, logging_steps=1, save_strategy="no")
    return TrainingArguments(**{**kwargs, **overrides})


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "adapters." in n}


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_the_model_shows_the_wrapped_forward_signature():
    model = lora_llama()
    params = inspect.signature(model.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "adapter_names"} <= set(params)
    assert find_labels(type(model)) == ["labels"]  # what Trainer reads from the class
    assert model.get_base_model() is model.base_model.model  # PEFT's two spellings of the wrapped model
    assert isinstance(model, rankwise.AdaptedModel)


def test_trainer_trains_and_evaluates_a_classifier(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2)
    model = rankwise.adapt(BertForSequenceClassification(cfg),
                           rankwise.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    ids = torch.randint(1, VOCAB, (96, 10), generator=torch.Generator().manual_seed(0))
    labels = (ids[:, 0] < VOCAB // 2).long()  # the first token decides
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "label": labels.tolist(), "sentence": ["unused"] * 96})

    def accuracy(prediction):
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = Trainer(model=model, args=args(tmp_path, max_steps=40, learning_rate=2e-2), train_dataset=data,
                      eval_dataset=data, compute_metrics=accuracy)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(after)
    assert after["eval_loss"] < before["eval_loss"] - 0.02
    assert after["eval_accuracy"] > before["eval_accuracy"]
    losses = logged_losses(trainer)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_save_model_writes_the_adapter_only_and_it_reloads(tmp_path):
    model = lora_llama()
    data = counting_dataset()
    trainer = Trainer(model=model, args=args(tmp_path), train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < first - 0.1
    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert ADAPTER_FILES <= files and files - ADAPTER_FILES <= {"training_args.bin"}, files  # no base weights

    model.eval()
    reloaded = rankwise.load_adapter(tiny_llama(), tmp_path / "final").eval()
    ids = torch.tensor(data["input_ids"][:4])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoints_hold_the_adapter_and_resume(tmp_path):
    data = counting_dataset()
    straight = lora_llama()
    Trainer(model=straight, args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=data).train()
    checkpoint = tmp_path / "out" / "checkpoint-3"
    files = set(os.listdir(checkpoint))
    assert ADAPTER_FILES <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files  # no base weights

    resumed = lora_llama(adapter_seed=2)  # another init: only the checkpoint can make it match
    assert not all(torch.equal(a, b) for a, b in zip(adapter_tensors(resumed).values(), adapter_tensors(straight).values()))
    Trainer(model=resumed, args=args(tmp_path, output_dir=str(tmp_path / "again"), max_steps=6), train_dataset=data
            ).train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(adapter_tensors(resumed).items(), adapter_tensors(straight).values()):
        torch.testing.assert_close(a, b, msg=name)


def test_load_best_model_at_end_loads_the_best_adapter(tmp_path):
    data = counting_dataset()
    model = lora_llama()
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2,
                                             save_strategy="steps", save_steps=2, load_best_model_at_end=True),
                      train_dataset=data, eval_dataset=data)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    expected = rankwise.load_adapter(tiny_llama(), best)
    for (name, a), b in zip(adapter_tensors(model).items(), adapter_tensors(expected).values()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing(tmp_path, reentrant):
    # Reentrant checkpointing gives no gradient to a block whose inputs do not require grad (the embeddings are
    # frozen): the Trainer's enable_input_require_grads on the wrapped model is what lets the adapters train.
    model = lora_llama()
    before = adapter_tensors(model)
    trainer = Trainer(model=model, args=args(tmp_path, max_steps=3, gradient_checkpointing=True,
                                             gradient_checkpointing_kwargs={"use_reentrant": reentrant}),
                      train_dataset=counting_dataset())
    trainer.train()
    assert all(layer.gradient_checkpointing for layer in model.model.model.layers)
    after = adapter_tensors(model)
    moved = [n for n in before if "lora_B" in n and not torch.equal(before[n], after[n])]
    assert len(moved) == sum("lora_B" in n for n in before)  # every layer's adapter trained


def test_bf16_mixed_precision_trains(tmp_path):
    model = lora_llama()
    data = counting_dataset()
    trainer = Trainer(model=model, args=args(tmp_path, bf16=True), train_dataset=data, eval_dataset=data)
    first = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < first - 0.1
    assert all(p.dtype == torch.float32 for p in adapter_tensors(model).values())


# ---- trl ---------------------------------------------------------------------------------------------------------

def tiny_chat_tokenizer():
    """A word-level tokenizer with pad/eos tokens and a chat template, built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<user>", "<assistant>"] + "the cat dog sat on a mat red blue one two".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' ' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
    )
    return tokenizer


def test_trl_sft_trainer_trains_a_rankwise_model(tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = rankwise.adapt(LlamaForCausalLM(cfg), rankwise.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    chats = [[{"role": "user", "content": "the cat sat"}, {"role": "assistant", "content": "on a mat"}],
             [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "red blue"}]]
    data = datasets.Dataset.from_list([{"messages": c} for c in chats * 8])
    config = trl.SFTConfig(output_dir=str(tmp_path / "sft"), use_cpu=True, report_to=[], max_steps=8, learning_rate=1e-2,
                           per_device_train_batch_size=4, logging_steps=1, max_length=32, save_steps=4)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    trainer.train()  # SFTConfig's default bf16 runs the fused LoRA path under autocast
    losses = logged_losses(trainer)
    assert losses[-1] < losses[0]
    files = set(os.listdir(tmp_path / "sft" / "checkpoint-4"))
    assert ADAPTER_FILES <= files
    assert not any(f.startswith(("model", "pytorch_model")) for f in files), files
