"""SNELLA spec checks (docs: /work/shared/specs/methods-adapters-a.md section 10)."""
import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.snella import SnellaAllocator, allocate_budget, cubic_budget
from rankwise.core.errors import ConfigError


def _model(**kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 12))
    reference = copy.deepcopy(base)
    cfg = {"low_rank_dim": 4, "target_modules": ["0", "2", "4"], **kw}
    return rankwise.adapt(base, rankwise.SnellaConfig(**cfg)), reference


def _adapters(model):
    return [layer.adapters["default"] for _, layer in model.adapted_layers()]


def test_mixed_kernel_matches_loop_and_scalars_get_gradients():
    model, _ = _model()
    a = _adapters(model)[2]
    with torch.no_grad():
        a.alpha.fill_(0.7)
        a.gamma.fill_(0.5)
        a.beta.fill_(0.01)
    K = a.kernel(a.lora_In, a.lora_Out)
    D = torch.zeros(16, 12)
    for i in range(16):
        for o in range(12):
            D[i, o] = 0.1 * torch.linalg.norm(a.lora_In[0, i] - a.lora_Out[0, o]) - 0.1 * torch.linalg.norm(a.lora_In[1, i] - a.lora_Out[1, o])
    expected = D + 0.7 * torch.softmax(D / 0.5, dim=1) + 0.01
    torch.testing.assert_close(K, expected, atol=1e-6, rtol=1e-5)
    model(torch.randn(5, 24)).pow(2).sum().backward()
    for p in (a.alpha, a.gamma, a.beta):
        assert p.grad is not None and p.grad.abs() > 0


def test_allocator_proportional_and_capped():
    assert allocate_budget([0.5, 0.3, 0.2], [10_000] * 3, 1000) == [500, 300, 200]
    capped = allocate_budget([0.5, 0.3, 0.2], [300, 10_000, 10_000], 1000)
    assert capped[0] == 300 and sum(capped) == 1000 and capped[1] / capped[2] == pytest.approx(1.5, rel=0.02)
    crumbs = allocate_budget([1.0, 1.0, 1.0], [5, 5, 5], 7)
    assert sum(crumbs) == 7 and max(crumbs) <= 5
    assert allocate_budget([0.2, 0.8], [3, 4], 100) == [3, 4]  # more budget than room: everything, no more


def test_cubic_schedule_endpoints_and_monotone():
    values = [cubic_budget(t, 20, 1000, 300, init_warmup=2, final_warmup=3) for t in range(21)]
    assert values[0] == values[2] == 1000
    assert values[17] == values[20] == 300
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_allocation_sets_observed_sparsity_and_reloads(tmp_path):
    model, reference = _model(sparsity=0.0, target_ratio=0.6)
    allocator = SnellaAllocator(model, total_epochs=4)
    x = torch.randn(8, 24)
    for epoch in range(4):
        for _ in range(2):
            model.zero_grad()
            model(x).pow(2).sum().backward()
            allocator.update_importance()
        sparsities = allocator.allocate(epoch)
        for adapter, s in zip(_adapters(model), sparsities):
            numel = adapter.lora_In.shape[1] * adapter.lora_Out.shape[1]
            share = torch.count_nonzero(adapter.delta_weight(None)).item() / numel
            assert abs(share - (1 - s)) <= 1 / numel + 1e-9
    total = sum(allocator.caps)
    kept = sum((1 - s) * c for s, c in zip(sparsities, allocator.caps))
    assert kept == pytest.approx(int(allocator.budget(3)), abs=1e-6)  # the scheduled budget is spent exactly
    assert allocator.budget(4) == pytest.approx(0.4 * total) and allocator.budget(0) == pytest.approx(total)
    assert len(set(round(s, 3) for s in sparsities)) > 1  # layers got different sparsities by importance
    out = model(x)
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(x), out)


def test_importance_recursions_two_steps():
    model, _ = _model(beta1=0.5, beta2=0.25)
    allocator = SnellaAllocator(model, total_epochs=1)
    a = _adapters(model)[0]
    ema = torch.zeros_like(a.lora_In)
    unc = torch.zeros_like(a.lora_In)
    for step in range(2):
        model.zero_grad()
        model(torch.randn(4, 24)).pow(2).sum().backward()
        allocator.update_importance()
        ipt = (a.lora_In * a.lora_In.grad).abs()
        ema = 0.5 * ema + 0.5 * ipt
        unc = 0.25 * unc + 0.75 * (ipt - ema).abs()
        with torch.no_grad():
            a.lora_In.add_(0.01)
    torch.testing.assert_close(allocator.ema[id(a.lora_In)], ema)
    torch.testing.assert_close(allocator.uncertainty[id(a.lora_In)], unc)


@pytest.mark.parametrize("field,value", [("target_ratio", 1.0), ("beta1", 1.0), ("beta2", -0.5), ("init_warmup", -1),
                                         ("final_warmup", 1.5), ("low_rank_dim", 5)])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.SnellaConfig(target_modules=["x"], **{field: value})


def test_zero_init_subtracts_the_kernel_at_initial_scalars():
    model, reference = _model(zero_init=True, sparsity=0.0, dense_competition=False)  # plain kernel at s = 0
    x = torch.randn(4, 24)
    torch.testing.assert_close(model(x), reference(x))
    a = _adapters(model)[0]
    with torch.no_grad():
        a.beta.fill_(0.05)  # a moved beta is a real change, not cancelled by the subtracted initial kernel
    torch.testing.assert_close(a.delta_weight(None), torch.full((20, 24), 0.05), atol=1e-6, rtol=0)


# ---- the bi-level competition runs whenever train() trains SNELLA ----

def _batches(n=20):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 24, generator=gen), torch.randn(8, 12, generator=gen)) for _ in range(n)]


def _config(**kw):
    from rankwise.train.loop import TrainConfig

    return TrainConfig(epochs=1, lr=1e-2, schedule="constant", warmup_ratio=0.0, **kw)


def _loss(m, b):
    return (m(b[0]) - b[1]).pow(2).mean()


def test_defaults_start_dense_and_end_at_the_reference_target():
    config = rankwise.SnellaConfig(target_modules=["x"])
    assert (config.sparsity, config.target_ratio, config.beta1, config.beta2, config.allocation_rounds) == (0.0, 0.3, 0.85, 0.85, 100)


def test_training_runs_the_allocator_to_the_target_budget(tmp_path):
    from rankwise.train.loop import train

    model, reference = _model()
    batches = _batches(20)
    state = train(model, lambda e: batches, _loss, _config(), progress=False)
    adapters = _adapters(model)
    sparsities = [a.sparsity for a in adapters]
    caps = [a.lora_In.shape[1] * a.lora_Out.shape[1] for a in adapters]
    assert max(sparsities) > 0, "SNELLA trained dense: the allocator did not run"
    assert len({round(s, 4) for s in sparsities}) > 1, "the layers compete for the budget: their sparsities differ"
    kept = sum((1 - s) * c for s, c in zip(sparsities, caps)) / sum(caps)
    # the last allocation (round 95 of 100 in 20 steps) is within (0.05)^3 of the target's 70 % non-zeros
    assert kept == pytest.approx(0.7, abs=2e-3)
    for adapter, s, cap in zip(adapters, sparsities, caps):
        share = torch.count_nonzero(adapter.delta_weight(None)).item() / cap
        assert abs(share - (1 - s)) <= 1 / cap + 1e-9
    assert state.step == 20
    x = torch.randn(4, 24)
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(x), model(x))  # the allocated sparsities are in the file


def test_training_allocation_resumes_identically(tmp_path):
    from rankwise.train.loop import train

    batches = _batches(10)
    straight, _ = _model()
    train(straight, lambda e: batches, _loss, _config(), progress=False)
    first, _ = _model()
    config = _config(checkpoint_every=4)
    train(first, lambda e: batches, _loss, config, progress=False, output_dir=tmp_path, stop_after=5)
    resumed, _ = _model()
    train(resumed, lambda e: batches, _loss, config, progress=False, output_dir=tmp_path, resume_from="latest")
    for a, b in zip(_adapters(straight), _adapters(resumed)):
        assert a.sparsity == b.sparsity
        torch.testing.assert_close(a.lora_In, b.lora_In)


def test_competition_runs_at_sparsity_zero_as_the_reference():
    """The reference's SNELLA.sparsify is applied at init_thres = 0 too: K * |K| above the smallest |K|."""
    model, _ = _model()
    a = _adapters(model)[1]
    K = a.kernel(a.lora_In, a.lora_Out)
    magnitude = K.detach().abs()
    expected = K * magnitude * (magnitude > magnitude.min())
    torch.testing.assert_close(a.sparse_kernel(), expected)
    plain, _ = _model(dense_competition=False)
    b = _adapters(plain)[1]
    torch.testing.assert_close(b.sparse_kernel(), b.kernel(b.lora_In, b.lora_Out))


def test_old_file_without_dense_competition_keeps_its_outputs(tmp_path):
    import json

    old, reference = _model(dense_competition=False)  # what the previous version computed at sparsity 0
    x = torch.randn(4, 24)
    expected = old(x)
    old.save_adapter(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    for key in ("dense_competition", "allocation_rounds"):
        del data[key]  # fields the previous version did not write
    path.write_text(json.dumps(data))
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    assert loaded.configs["default"].dense_competition is False
    torch.testing.assert_close(loaded(x), expected)


@pytest.mark.slow
def test_cli_finetune_trains_snella_with_the_allocator(tmp_path):
    """`rankwise finetune --method snella` runs the bi-level allocation: the saved layers have sparsities > 0."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from rankwise.cli import app
    from text_task import write_sentiment_csv, write_tiny_classifier

    model_dir, data = write_tiny_classifier(tmp_path / "model"), write_sentiment_csv(tmp_path / "data.csv")
    result = CliRunner().invoke(app, ["finetune", "--data", str(data), "--model", str(model_dir), "--train-size", "64",
                                      "--test-size", "16", "--batch-size", "16", "--max-steps", "6", "--method", "snella",
                                      "--rank", "4", "--targets", "query,value", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    sparsities = [float(v) for k, v in tensors.items() if k.endswith("layer_sparsity")]
    assert sparsities and max(sparsities) > 0, "SNELLA trained dense through rankwise finetune"
