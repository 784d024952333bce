"""The generic matrix: every registered adapter method x every toy model whose layers it supports.

A method joins by registering; `SMALL_KWARGS` may give it hyper-parameters that fit the tiny layers.
"""
from __future__ import annotations

import copy

import pytest
import torch

import rankwise
from rankwise.core.errors import ConfigError

from toy_models import TOY_CASES

# Hyper-parameters that fit the toy layers (smallest dimension 16).
SMALL_KWARGS: dict[str, dict] = {
    "lora": {"r": 4, "lora_alpha": 8},
}

CASES = [
    pytest.param(info, case, id=f"{info.name}-{case.name}")
    for info in rankwise.list_methods()
    for case in TOY_CASES
    if case.targets_for(info.config_cls.supported_layers)
]


def make_config(info, case, **extra):
    kwargs = {**SMALL_KWARGS.get(info.name, {}), **extra}
    return info.config_cls(target_modules=case.targets_for(info.config_cls.supported_layers), **kwargs)


def perturb(model: rankwise.AdaptedModel, adapter_name: str = "default", scale: float = 0.1) -> None:
    """Make an adapter non-trivial: add noise to all its trainable tensors (like PEFT's init_weights=False)."""
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        params = [p for _, layer in model.adapted_layers() if adapter_name in layer.adapters
                  for p in layer.adapters[adapter_name].parameters()]
        if adapter_name in model.shared:
            params += list(model.shared[adapter_name].parameters())
        for p in {id(p): p for p in params}.values():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen) * scale * (p.abs().mean() + 1e-2))


def setup(info, case, dtype=torch.float32):
    torch.manual_seed(0)
    base = case.build().to(dtype).eval()
    reference = copy.deepcopy(base)
    inputs = case.make_inputs()
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    model = rankwise.adapt(base, make_config(info, case))
    model.eval()
    return model, reference, inputs


def out(case, model, inputs):
    with torch.no_grad():
        return case.run(model, inputs).float()


@pytest.mark.parametrize("info,case", CASES)
def test_default_init_matches_declared_property(info, case):
    model, reference, inputs = setup(info, case)
    expected = out(case, reference, inputs)
    got = out(case, model, inputs)
    prop = info.config_cls.init_property
    assert prop in ("zero", "identity", "none")
    if prop == "zero":
        for name, delta in model.delta_weights().items():
            assert torch.count_nonzero(delta) == 0, f"{name}: declared zero init but delta_weight is non-zero"
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    elif prop == "identity":
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("info,case", CASES)
def test_merge_unmerge_and_unload_agree(info, case):
    model, reference, inputs = setup(info, case)
    perturb(model)
    base_out = out(case, reference, inputs)
    adapted = out(case, model, inputs)
    assert not torch.allclose(adapted, base_out, atol=1e-5), "a perturbed adapter must change the output"
    model.merge_adapter()
    torch.testing.assert_close(out(case, model, inputs), adapted, atol=1e-4, rtol=1e-4)
    model.unmerge_adapter()
    torch.testing.assert_close(out(case, model, inputs), adapted, atol=1e-4, rtol=1e-4)
    model.merge_adapter(safe_merge=True)
    model.unmerge_adapter()
    merged = model.merge_and_unload()
    assert not any(isinstance(m, rankwise.core.layer.AdaptedLayer) for m in merged.modules())
    torch.testing.assert_close(out(case, merged, inputs), adapted, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("info,case", CASES)
def test_save_load_round_trip(info, case, tmp_path):
    model, reference, inputs = setup(info, case)
    perturb(model)
    before = out(case, model, inputs)
    model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    torch.manual_seed(99)  # a different seed must not matter: everything is in the file or regenerated from its seed
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(out(case, loaded, inputs), before, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters()), "loaded adapters are frozen unless is_trainable"


@pytest.mark.parametrize("info,case", CASES)
def test_disable_gives_base(info, case):
    model, reference, inputs = setup(info, case)
    perturb(model)
    adapted = out(case, model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(out(case, model, inputs), out(case, reference, inputs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out(case, model, inputs), adapted)


@pytest.mark.parametrize("info,case", CASES)
def test_only_adapter_parameters_train(info, case):
    model, _, inputs = setup(info, case)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, "an adapter must have trainable parameters"
    assert all(".adapters." in n or n.startswith("shared.") for n in trainable), sorted(trainable)[:5]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        case.run(model, inputs).float().pow(2).mean().backward()
        optimizer.step()
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed, "3 SGD steps changed nothing"
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:5]}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("info,case", CASES)
def test_half_precision_base(info, case, dtype):
    model, _, inputs = setup(info, case, dtype=dtype)
    perturb(model)
    adapted = out(case, model, inputs)
    assert torch.isfinite(adapted).all()
    model.merge_adapter(safe_merge=True)
    merged = out(case, model, inputs)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(merged, adapted, atol=tol, rtol=tol)
    model.unmerge_adapter()


@pytest.mark.parametrize("info,case", CASES)
def test_multiple_adapters_and_per_sample_routing(info, case):
    model, reference, inputs = setup(info, case)
    perturb(model, "default")
    model.add_adapter("other", make_config(info, case))
    perturb(model, "other", scale=0.2)
    alone = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        alone[name] = out(case, model, inputs)
    alone["__base__"] = out(case, reference, inputs)
    names = [["default", "other", "__base__"][i % 3] for i in range(inputs.shape[0])]
    with torch.no_grad():
        mixed = case.run(model, inputs, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i].float(), alone[name][i], atol=1e-5, rtol=1e-5)
    with pytest.raises(rankwise.AdapterStateError):
        case.run(model, inputs, adapter_names=["nope"] * inputs.shape[0])
    model.delete_adapter("other")
    assert "other" not in model.configs


@pytest.mark.parametrize("info", rankwise.list_methods(), ids=lambda i: i.name)
def test_bad_config_raises_config_error(info):
    with pytest.raises(ConfigError, match="target_modules"):
        info.config_cls(target_modules=5)
    if info.config_cls.rank_field:
        with pytest.raises(ConfigError, match=info.config_cls.rank_field):
            info.config_cls(target_modules=["x"], **{info.config_cls.rank_field: 0})
    data = info.config_cls(target_modules=["x"]).to_dict()
    assert type(rankwise.AdapterConfig.from_dict(data)) is info.config_cls
    with pytest.raises(ConfigError, match="from_the_future"):
        rankwise.AdapterConfig.from_dict({**data, "from_the_future": 1})
