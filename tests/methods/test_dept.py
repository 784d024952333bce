"""DePT spec checks (docs: /work/shared/specs/methods-adapters-b.md part B1 section 2)."""
import copy
import math

import pytest
import torch

import rankwise
from rankwise.adapters.dept import count_trainable, dept_rank_for_budget
from rankwise.core.errors import AdapterStateError, ConfigError, ShapeError, TargetError
from toy_models import tiny_bert, tiny_gpt2


def _bert(**kw):
    torch.manual_seed(0)
    base = tiny_bert().eval()
    reference = copy.deepcopy(base)
    cfg = dict(num_virtual_tokens=4, r=3, max_length=16, target_modules=["word_embeddings"])
    return rankwise.adapt(base, rankwise.DeptConfig(**{**cfg, **kw})), reference


def _perturb(model):
    with torch.no_grad():
        adapter = dict(model.adapted_layers())["embeddings.word_embeddings"].adapters["default"]
        adapter.lora_embedding_B.normal_()
    return adapter


def test_no_prompt_and_zero_b_is_the_base_model():
    model, reference = _bert(num_virtual_tokens=0)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)


def test_parameter_count_and_budget_split():
    model, _ = _bert()
    assert model.trainable_summary()["trainable"] == count_trainable(model.configs["default"], 32) == 4 * 32 + 16 * 3 + 3 * 32
    for m, r in ((80, 15), (60, 30), (40, 45)):  # T5-Base, l = 100, s = 256: all 76,800 parameters
        assert dept_rank_for_budget(100, m, 256, 768) == r
        assert m * 768 + 256 * r + r * 768 == 76_800
    assert dept_rank_for_budget(100, 60, 512, 768) == 24
    with pytest.raises(ConfigError):
        dept_rank_for_budget(100, 61, 256, 768)


def test_scale_is_alpha_over_sqrt_r():
    model, _ = _bert(r=30, max_length=32)
    adapter = dict(model.adapted_layers())["embeddings.word_embeddings"].adapters["default"]
    assert adapter.scaling == pytest.approx(8 / math.sqrt(30)) == pytest.approx(1.46059, abs=1e-5)


def test_update_is_position_wise_not_token_wise():
    model, _ = _bert()
    adapter = _perturb(model)
    layer = dict(model.adapted_layers())["embeddings.word_embeddings"]
    ids = torch.tensor([[5, 7, 5, 9], [9, 9, 2, 5]])
    added = layer(ids) - layer.base_layer(ids)
    table = adapter.position_table(4)
    torch.testing.assert_close(added[0], table)
    torch.testing.assert_close(added[1], table)  # same position, different sequences: same addition
    assert not torch.allclose(added[0, 0], added[0, 2])  # same token (5) at two positions: different additions


def test_backbone_sees_prompt_plus_input_and_mask_is_extended():
    model, _ = _bert()
    seen = {}
    layer0 = model.model.encoder.layer[0]
    handle = layer0.register_forward_pre_hook(lambda mod, args: seen.update(shape=args[0].shape))
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
    handle.remove()
    assert seen["shape"] == (2, 4 + 10, 32) and out.shape == (2, 14, 32)
    # padded positions are masked: changing them does not change the real tokens' outputs
    ids2 = ids.clone()
    ids2[1, 6:] = 3
    out2 = model(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out2[1, :10], out[1, :10], atol=1e-5, rtol=1e-5)


def test_two_learning_rates():
    model, _ = _bert(embedding_lr_scale=0.01)
    adapter = dict(model.adapted_layers())["embeddings.word_embeddings"].adapters["default"]
    groups = model.parameter_groups(lr=0.3)
    assert sorted(g["lr"] for g in groups) == pytest.approx([0.003, 0.3])
    small = next(g for g in groups if g["lr"] == pytest.approx(0.003))
    assert {id(p) for p in small["params"]} == {id(adapter.lora_embedding_A), id(adapter.lora_embedding_B)}
    big = next(g for g in groups if g["lr"] == pytest.approx(0.3))
    assert [p.shape for p in big["params"]] == [torch.Size([4, 32])]
    opt = torch.optim.AdamW(groups)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids).last_hidden_state.pow(2).mean().backward()
    opt.step()


def test_merge_raises_and_disable_gives_base(tmp_path):
    model, reference = _bert()
    _perturb(model)
    ids = torch.randint(0, 64, (2, 8))
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)
    with pytest.raises(AdapterStateError, match="prompt"):
        model.merge_and_unload()
    with pytest.raises(AdapterStateError, match="separate calls"):
        model(input_ids=ids, adapter_names=["default", "__base__"])
    before = model(input_ids=ids).last_hidden_state
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, before)
    with pytest.raises(ShapeError, match="max_length"):
        model(input_ids=torch.randint(0, 64, (1, 20)))


def test_causal_lm_labels_are_shifted_past_the_prompt():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    model = rankwise.adapt(lm, rankwise.DeptConfig(num_virtual_tokens=3, r=2, max_length=12, target_modules=["wte"]))
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 11, 64) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.shared["default"].prompt_embeddings.grad.abs().sum() > 0


def test_bad_targets_and_config():
    with pytest.raises(TargetError):
        rankwise.adapt(tiny_gpt2(), rankwise.DeptConfig(target_modules=["wte", "wpe"], max_length=16, r=2))
    with pytest.raises(ConfigError, match="prompt_init_ids"):
        _bert(prompt_init_ids=[1000])
    for field, value in (("num_virtual_tokens", -1), ("r", 0), ("max_length", 0), ("lora_alpha", 0),
                         ("embedding_lr_scale", 0), ("prompt_init", "text"), ("prompt_init_ids", [])):
        with pytest.raises(ConfigError, match=field):
            rankwise.DeptConfig(target_modules=["x"], **{field: value})


# ---- on a LLaMA-architecture decoder (RoPE positions, causal mask, GQA, tied embeddings) ----------------------

def _llama(**kw):
    from toy_models import tiny_llama

    torch.manual_seed(0)
    base = tiny_llama().eval()
    reference = copy.deepcopy(base)
    cfg = dict(num_virtual_tokens=3, r=2, max_length=20, target_modules=["embed_tokens"])
    model = rankwise.adapt(base, rankwise.DeptConfig(**{**cfg, **kw}))
    adapter = dict(model.adapted_layers())["model.embed_tokens"].adapters["default"]
    with torch.no_grad():
        adapter.lora_embedding_B.normal_()
    return model, reference


def _greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_llama_trains_with_the_prompt_and_right_padding_is_masked():
    model, reference = _llama()
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 3 + 8, 64) and torch.isfinite(out.loss)
    assert not torch.allclose(out.logits[:, 3:], reference(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    out.loss.backward()
    assert model.shared["default"].prompt_embeddings.grad.abs().sum() > 0
    # causal mask + padding: what follows a token (padding included) does not change its logits
    ids2 = ids.clone()
    ids2[1, 5:] = 7
    with torch.no_grad():
        out2 = model(input_ids=ids2, attention_mask=mask).logits
    torch.testing.assert_close(out2[1, : 3 + 5], out.logits[1, : 3 + 5].detach(), atol=1e-5, rtol=1e-5)


def test_llama_generate_keeps_the_prompt_and_the_position_table_under_the_kv_cache():
    model, reference = _llama()
    ids = torch.randint(3, 64, (2, 6))
    generated = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    # every cached step must give what a full forward of the whole sequence gives (prompt + table row per position)
    torch.testing.assert_close(generated, _greedy_without_cache(model, ids, 6), atol=0, rtol=0)
    with model.disable_adapter():
        plain = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(plain, reference.generate(input_ids=ids, max_new_tokens=6, do_sample=False), atol=0, rtol=0)


def test_llama_left_padded_batch_generates_what_each_prompt_generates_alone():
    model, _ = _llama()
    long_ids, short_ids = torch.randint(3, 64, (1, 7)), torch.randint(3, 64, (1, 4))
    batch = torch.cat([long_ids, torch.cat([torch.zeros(1, 3, dtype=torch.long), short_ids], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    together = model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=5, do_sample=False)
    alone = model.generate(input_ids=short_ids, max_new_tokens=5, do_sample=False)
    torch.testing.assert_close(together[1, 3:], alone[0], atol=0, rtol=0)
    torch.testing.assert_close(together[0], model.generate(input_ids=long_ids, max_new_tokens=5, do_sample=False)[0])
