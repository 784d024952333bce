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
