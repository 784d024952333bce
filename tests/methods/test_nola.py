"""NOLA numeric checks (spec methods-adapters-a.md section 2)."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rankwise
from rankwise.linalg import derive_seed, random_basis
from toy_models import MLP

ROOT = Path(__file__).resolve().parents[2]


def adapted(**kwargs):
    torch.manual_seed(0)
    base = MLP()
    config = rankwise.NolaConfig(target_modules=["lin0", "lin1"], **{"r": 4, "num_bases_a": 16, "num_bases_b": 24, **kwargs})
    return rankwise.adapt(base, config)


def test_zero_init_and_first_step_moves_only_beta():
    model = adapted()
    assert all(torch.count_nonzero(d) == 0 for d in model.delta_weights().values())
    model(torch.randn(8, 16)).pow(2).mean().backward()
    layer = model.model.lin1.adapters["default"]
    assert torch.count_nonzero(layer.nola_alpha.grad) == 0, "B = 0 at init, so A's coefficients get no gradient"
    assert torch.count_nonzero(layer.nola_beta.grad) > 0


def test_trainable_count_is_k_plus_l_whatever_the_shape():
    for r in (1, 4, 8):
        model = adapted(r=r)
        per_layer = [sum(p.numel() for p in layer.adapters["default"].parameters()) for _, layer in model.adapted_layers()]
        assert per_layer == [16 + 24, 16 + 24]
        assert model.trainable_summary()["trainable"] == 2 * 40


def test_delta_equals_reference_formula_and_rank_at_most_r():
    model = adapted(r=3, nola_alpha=5.0)
    gen = torch.Generator().manual_seed(1)
    adapter = model.model.lin0.adapters["default"]
    with torch.no_grad():
        adapter.nola_alpha.copy_(torch.randn(16, generator=gen))
        adapter.nola_beta.copy_(torch.randn(24, generator=gen))
    out_f, in_f, r, k, l = 32, 16, 3, 16, 24
    seed = derive_seed(0, "nola-layer", "lin0")  # each layer's own seed, from the config's seed and its name
    a0 = random_basis(derive_seed(seed, "nola-A0", r, in_f), (r, in_f), "uniform") / math.sqrt(in_f)
    bases_a = random_basis(derive_seed(seed, "nola-A", k, r, in_f), (k, r, in_f), "uniform")
    bases_b = random_basis(derive_seed(seed, "nola-B", l, out_f, r), (l, out_f, r), "uniform")
    a = a0 + sum(adapter.nola_alpha[i] * bases_a[i] for i in range(k)) / math.sqrt(k)
    b = sum(adapter.nola_beta[j] * bases_b[j] for j in range(l)) / math.sqrt(l)
    expected = (5.0 / 3) * b @ a
    delta = model.delta_weights()["lin0"]
    torch.testing.assert_close(delta, expected.detach(), atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(delta) == 3
    x = torch.randn(5, 16)
    base_out = model.model.lin0.base_layer(x)
    torch.testing.assert_close(model.model.lin0(x), base_out + x @ expected.detach().T, atol=1e-5, rtol=1e-5)


def twin_layers(**kwargs):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    config = rankwise.NolaConfig(target_modules=["0", "2"], **{"r": 4, "num_bases_a": 16, "num_bases_b": 24, **kwargs})
    return base, rankwise.adapt(copy.deepcopy(base), config)


def test_equal_shape_layers_get_their_own_bases():
    """The official code draws new bases for every layer: two layers of one shape must not search one subspace."""
    _, model = twin_layers()
    first, second = model.model[0].adapters["default"], model.model[2].adapters["default"]
    for name in ("offset_a", "bases_a", "bases_b"):
        assert not torch.equal(getattr(first, name), getattr(second, name)), name
    # the same layer and seed always regenerate the same bases (a second adapter on it, or a rebuilt model)
    model.add_adapter("second", rankwise.NolaConfig(target_modules=["0"], r=4, num_bases_a=16, num_bases_b=24))
    assert torch.equal(model.model[0].adapters["second"].bases_a, first.bases_a)
    other_seed = rankwise.NolaConfig(target_modules=["0"], r=4, num_bases_a=16, num_bases_b=24, seed=7)
    model.add_adapter("third", other_seed)
    assert not torch.equal(model.model[0].adapters["third"].bases_a, first.bases_a)


def test_legacy_shared_scheme_shares_one_basis_tensor():
    _, model = twin_layers(per_layer_bases=False)
    first, second = model.model[0].adapters["default"], model.model[2].adapters["default"]
    assert first.bases_a.data_ptr() == second.bases_a.data_ptr()


def test_old_file_without_the_field_loads_with_its_old_outputs(tmp_path):
    """A file written before `per_layer_bases` existed used the shared (seed, shape) bases: it must keep its outputs."""
    import json

    base, model = twin_layers()
    model.save_adapter(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    assert data["per_layer_bases"] is True  # new files record the scheme
    del data["per_layer_bases"]
    config_path.write_text(json.dumps(data))  # what the previous version wrote
    from safetensors.torch import load_file

    coefficients = load_file(str(tmp_path / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(3)
    coefficients = {k: torch.randn(v.shape, generator=gen) for k, v in coefficients.items()}
    from safetensors.torch import save_file

    save_file(coefficients, str(tmp_path / "adapter_model.safetensors"))
    loaded = rankwise.load_adapter(copy.deepcopy(base), tmp_path)
    assert loaded.configs["default"].per_layer_bases is False
    # the old scheme, written out: bases keyed by (seed, shape) only, identical for the two layers
    r, k, l, n = 4, 16, 24, 16
    a0 = random_basis(derive_seed(0, "nola-A0", r, n), (r, n), "uniform") / math.sqrt(n)
    bases_a = random_basis(derive_seed(0, "nola-A", k, r, n), (k, r, n), "uniform")
    bases_b = random_basis(derive_seed(0, "nola-B", l, n, r), (l, n, r), "uniform")
    x = torch.randn(5, 16)
    h = x
    for index in ("0", "2"):
        alpha = next(v for key, v in coefficients.items() if f".{index}." in f".{key}" and key.endswith("nola_alpha"))
        beta = next(v for key, v in coefficients.items() if f".{index}." in f".{key}" and key.endswith("nola_beta"))
        a = a0 + torch.tensordot(alpha, bases_a, dims=1) / math.sqrt(k)
        b = torch.tensordot(beta, bases_b, dims=1) / math.sqrt(l)
        h = base[int(index)](h) + (2.0 / r) * h @ (b @ a).T
        if index == "0":
            h = torch.relu(h)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), h, atol=1e-5, rtol=1e-5)


def test_file_holds_coefficients_only(tmp_path):
    model = adapted()
    model.save_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(k.rsplit(".", 1)[-1] for k in state) == ["nola_alpha", "nola_alpha", "nola_beta", "nola_beta"]
    tensor_bytes = sum(t.numel() * t.element_size() for t in state.values())
    assert tensor_bytes == 2 * (16 + 24) * 4
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < tensor_bytes + 1024, f"{size} bytes: more than coefficients and a small header"
    config = (tmp_path / "adapter_config.json").read_text()
    assert '"seed": 0' in config


def test_bases_regenerate_identically_in_another_process():
    code = (
        "import torch, rankwise\n"
        "from toy_models import MLP\n"
        "torch.manual_seed(12345)\n"  # the global RNG must not matter
        "m = rankwise.adapt(MLP(), rankwise.NolaConfig(target_modules=['lin0', 'lin1'], r=4, num_bases_a=16, num_bases_b=24))\n"
        "a = m.model.lin1.adapters['default']\n"
        "print(repr([float(t.double().sum()) for t in (a.offset_a, a.bases_a, a.bases_b)]))\n"
        "print(repr(a.bases_a.flatten()[:5].tolist()))\n"
    )
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True)
    adapter = adapted().model.lin1.adapters["default"]
    here = repr([float(t.double().sum()) for t in (adapter.offset_a, adapter.bases_a, adapter.bases_b)])
    first = repr(adapter.bases_a.flatten()[:5].tolist())
    assert result.stdout.splitlines() == [here, first]


@pytest.mark.parametrize("kwargs,field", [
    ({"r": 0}, "r"), ({"num_bases_a": 0}, "num_bases_a"), ({"num_bases_b": -3}, "num_bases_b"),
    ({"nola_alpha": 0}, "nola_alpha"), ({"nola_dropout": 1.0}, "nola_dropout"), ({"seed": -1}, "seed"),
    ({"r": 2.5}, "r"),
])
def test_bad_hyper_parameters(kwargs, field):
    with pytest.raises(rankwise.ConfigError, match=field):
        rankwise.NolaConfig(target_modules=["lin0"], **kwargs)


def test_rank_larger_than_layer_is_refused_and_model_untouched():
    base = MLP()
    with pytest.raises(rankwise.ConfigError, match="at most 16"):
        rankwise.adapt(base, rankwise.NolaConfig(target_modules=["lin0"], r=17))
    assert isinstance(base.lin0, torch.nn.Linear)


def test_defaults_follow_the_official_gpt2_scripts():
    config = rankwise.NolaConfig(target_modules=["x"])
    assert (config.r, config.num_bases_a, config.num_bases_b, config.nola_alpha, config.nola_dropout) == (8, 256, 256, 2.0, 0.0)


def test_a_file_of_coefficients_reproduces_the_outputs(tmp_path):
    """Spec check 3: alpha, beta and the seed in the file rebuild the adapter to 1e-6, whatever the global RNG."""
    base = MLP()
    fresh = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.NolaConfig(target_modules=["lin0", "lin1"], r=4, num_bases_a=16, num_bases_b=24, seed=5))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(6, 16)
    with torch.no_grad():
        expected = model(x)
    model.save_adapter(tmp_path)
    torch.manual_seed(4321)
    loaded = rankwise.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, atol=1e-6, rtol=0)
