"""Tied input/output embeddings (LLaMA's `tie_word_embeddings`): an adapter on `embed_tokens` changes the input
side only, so merging it must not leak into the `lm_head` that shares the tensor."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import rankwise
from test_matrix import perturb
from toy_models import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def adapted():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    model = rankwise.adapt(base, rankwise.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj", "v_proj"]))
    perturb(model, scale=0.5)
    return model


def test_merge_unties_the_head_and_unmerge_ties_it_again(adapted):
    ids = torch.randint(0, 64, (2, 9))
    inner = adapted.model
    shared = inner.lm_head.weight
    assert shared is inner.model.embed_tokens.base_layer.weight
    original = shared.detach().clone()
    before = _logits(adapted, ids)
    with pytest.warns(UserWarning, match="embed_tokens.*tied"):
        adapted.merge_adapter()
    assert inner.lm_head.weight is not inner.model.embed_tokens.base_layer.weight
    torch.testing.assert_close(inner.lm_head.weight.detach(), original, atol=0, rtol=0)  # the head keeps the unmerged weight
    assert inner.config.tie_word_embeddings is False
    torch.testing.assert_close(_logits(adapted, ids), before, atol=1e-5, rtol=1e-5)
    adapted.unmerge_adapter()
    assert inner.lm_head.weight is inner.model.embed_tokens.base_layer.weight
    assert inner.config.tie_word_embeddings is True
    torch.testing.assert_close(_logits(adapted, ids), before, atol=1e-5, rtol=1e-5)


def test_merged_model_saves_and_reloads_untied_with_equal_logits(adapted, tmp_path):
    from transformers import LlamaForCausalLM

    ids = torch.randint(0, 64, (2, 9))
    before = _logits(adapted, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = adapted.merge_and_unload()
    torch.testing.assert_close(_logits(merged, ids), before, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(_logits(reloaded, ids), before, atol=1e-5, rtol=1e-5)


def test_adapting_both_tied_layers_merges_each_update_once():
    torch.manual_seed(0)
    base = tiny_llama().eval()
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.LoraConfig(r=4, target_modules=["embed_tokens", "lm_head"]))
    perturb(model, scale=0.5)
    ids = torch.randint(0, 64, (2, 9))
    before = _logits(model, ids)
    assert not torch.allclose(before, _logits(reference, ids), atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter()
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model, ids), _logits(reference, ids), atol=1e-5, rtol=1e-5)
