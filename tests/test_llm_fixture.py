"""The tiny LLaMA fixture other LLM tests build on: a real LLaMA (GQA, tied embeddings) that loads offline."""
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_llama_dir_loads_offline(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: every string round-trips


def test_tiny_llama_dir_no_template(tiny_llama_dir_no_template):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir_no_template)
    assert not tokenizer.chat_template
