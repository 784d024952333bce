"""Helpers for the PEFT file-interop tests: a rankwise-saved adapter must give PEFT the same outputs, and back."""
from __future__ import annotations

import warnings

import torch

import rankwise
from toy_models import tiny_bert

ATOL = 1e-5


def fresh_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_bert().eval()


def bert_inputs() -> torch.Tensor:
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(5))


def perturb_trainable(model: torch.nn.Module, seed: int = 3, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).last_hidden_state


def rankwise_to_peft(config, tmp_path):
    """Save a trained-looking rankwise adapter, load it with PEFT; return (rankwise output, PEFT output)."""
    from peft import PeftModel

    inputs = bert_inputs()
    model = rankwise.adapt(fresh_bert(), config)
    perturb_trainable(model)
    expected = hidden(model, inputs)
    model.save_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(fresh_bert(), str(tmp_path)).eval()
    return expected, hidden(peft_model, inputs)


def peft_to_rankwise(peft_config, tmp_path):
    """Save a trained-looking PEFT adapter, load it with rankwise; return (PEFT output, rankwise output)."""
    from peft import get_peft_model

    inputs = bert_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(fresh_bert(), peft_config).eval()
        perturb_trainable(peft_model)
        peft_model.save_pretrained(str(tmp_path))
    expected = hidden(peft_model, inputs)
    loaded = rankwise.load_adapter(fresh_bert(), tmp_path)
    return expected, hidden(loaded, inputs)
