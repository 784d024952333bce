"""LoRA files interoperate with Hugging Face PEFT (0.21) both ways, with equal outputs."""
from __future__ import annotations

import copy

import pytest
import torch

import rankwise

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

from toy_models import tiny_bert, tiny_gpt2  # noqa: E402


def _seq_cls_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    return BertForSequenceClassification(cfg)


CASES = {
    # name: (builder, rankwise/peft LoRA kwargs, how to read the output)
    "bert-qv": (tiny_bert, dict(target_modules=["query", "value"], r=4, lora_alpha=16), "last_hidden_state"),
    "bert-all-linear-rslora": (tiny_bert, dict(target_modules="all-linear", r=4, lora_alpha=8, use_rslora=True), "last_hidden_state"),
    "bert-embedding+ranks": (tiny_bert, dict(target_modules=["word_embeddings", "query", "dense"], r=4, lora_alpha=8,
                                              rank_pattern={"query": 2}, alpha_pattern={"dense": 3}), "last_hidden_state"),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], r=4, lora_alpha=8), "last_hidden_state"),
    "bert-seqcls-head": (_seq_cls_bert, dict(target_modules=["query", "value"], r=4, lora_alpha=8, modules_to_save=["classifier"]), "logits"),
}


def _inputs():
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))


def _run(model, field):
    with torch.no_grad():
        return getattr(model(input_ids=_inputs()), field)


def _randomise(params):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.mark.parametrize("case", list(CASES))
def test_rankwise_file_loads_in_peft(case, tmp_path):
    build, kwargs, field = CASES[case]
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LoraConfig(**kwargs)).eval()
    _randomise([p for n, p in model.named_parameters() if p.requires_grad])
    expected = _run(model, field)
    model.save_adapter(tmp_path)
    loaded = peft.PeftModel.from_pretrained(pristine, tmp_path).eval()
    torch.testing.assert_close(_run(loaded, field), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_rankwise(case, tmp_path):
    build, kwargs, field = CASES[case]
    torch.manual_seed(0)
    base = build().eval()
    pristine = copy.deepcopy(base)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(**kwargs)).eval()
    _randomise([p for n, p in peft_model.named_parameters() if p.requires_grad])
    expected = _run(peft_model, field)
    peft_model.save_pretrained(tmp_path)
    loaded = rankwise.load_adapter(pristine, tmp_path).eval()
    torch.testing.assert_close(_run(loaded, field), expected, atol=1e-5, rtol=1e-5)


def test_peft_option_rankwise_lacks_is_refused(tmp_path):
    base = tiny_bert().eval()
    peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(target_modules=["query"], r=4, use_dora=True)).save_pretrained(tmp_path)
    with pytest.raises(rankwise.ConfigError, match="use_dora"):
        rankwise.load_adapter(base, tmp_path)
