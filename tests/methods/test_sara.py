"""SaRA spec checks (docs: /work/shared/specs/methods-adapters-a.md section 8)."""
import copy

import pytest
import torch
from torch import nn

import rankwise
from rankwise.adapters.sara import nuclear_norm_penalty, reselect
from rankwise.core.errors import ConfigError

TAU = 0.02


def _model(**kw):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 80), nn.Tanh(), nn.Linear(80, 72))
    reference = copy.deepcopy(base)
    model = rankwise.adapt(base, rankwise.SaraConfig(threshold=TAU, target_modules=["0", "2"], **kw))
    return model, reference


def _effective(model, name):
    layer = dict(model.adapted_layers())[name]
    return layer.weight_matrix() + layer.adapters["default"].delta_weight(None)


def test_init_output_is_bit_exact():
    model, reference = _model()
    x = torch.randn(5, 24)
    assert torch.equal(model(x), reference(x))


def test_trainable_count_and_only_selected_entries_change():
    model, reference = _model()
    expected = sum(int((m.weight.abs() < TAU).sum()) for m in (reference[0], reference[2]))
    assert model.trainable_summary()["trainable"] == expected > 0
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(8, 24)).pow(2).sum().backward()
    opt.step()
    for name, ref in (("0", reference[0]), ("2", reference[2])):
        changed = _effective(model, name) != ref.weight
        assert changed.any()
        assert not (changed & (ref.weight.abs() >= TAU)).any(), "an entry outside the small-|w| set moved"


def test_values_gradient_equals_dense_gradient_at_indices():
    model, reference = _model()
    x = torch.randn(6, 24)
    model(x).pow(2).sum().backward()
    ref = copy.deepcopy(reference)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(x).pow(2).sum().backward()
    for name, dense in (("0", ref[0].weight.grad), ("2", ref[2].weight.grad)):
        adapter = dict(model.adapted_layers())[name].adapters["default"]
        torch.testing.assert_close(adapter.values.grad, dense.flatten()[adapter.indices], atol=1e-5, rtol=1e-5)


def test_no_dense_gradient_kept_and_optimizer_state_is_sparse():
    model, _ = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(torch.randn(4, 24)).pow(2).sum()
    loss.backward()
    opt.step()
    base_ptrs = {layer.weight.data_ptr() for _, layer in model.adapted_layers()}  # the frozen base's own weights
    extra = [t.numel() for t in saved if t.data_ptr() not in base_ptrs]
    assert max(extra) < 24 * 80, "the forward saved a weight-sized tensor (dense delta) for backward"
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == p.numel()
    assert sum(p.numel() for p in params) < 0.2 * (24 * 80 + 80 * 72)


def test_progressive_reselection():
    model, _ = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 24)).pow(2).sum().backward()
        opt.step()
    before = {n: _effective(model, n).detach().clone() for n in ("0", "2")}
    counts = reselect(model, opt)
    assert len(opt.state) == 0, "optimizer state must be reset"
    new_params = [p for g in opt.param_groups for p in g["params"]]
    for name in ("0", "2"):
        adapter = dict(model.adapted_layers())[name].adapters["default"]
        expected = torch.nonzero(before[name].flatten().abs() < TAU).flatten()
        assert torch.equal(adapter.indices, expected) and counts[name] == expected.numel()
        torch.testing.assert_close(_effective(model, name), before[name])  # re-selection itself changes nothing
        assert any(p is adapter.values for p in new_params)
        assert model.configs["default"].selected_counts[name][0] == expected.numel()


def test_reselected_adapter_saves_and_reloads(tmp_path):
    model, reference = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 24)).pow(2).sum().backward()
        opt.step()
    reselect(model, opt)
    x = torch.randn(3, 24)
    out = model(x)
    model.save_adapter(tmp_path)
    loaded = rankwise.load_adapter(copy.deepcopy(reference), tmp_path)
    torch.testing.assert_close(loaded(x), out)


def test_nuclear_norm_penalty():
    model, _ = _model(lambda_rank=0.1, nuclear_min_size=30)  # only layer "2" (80 x 72 -> 72 > 30; 80 x 24 -> 24)
    adapter = dict(model.adapted_layers())["2"].adapters["default"]
    masked = torch.zeros(72 * 80).index_put((adapter.indices,), adapter.values.detach()).view(72, 80)
    expected = 0.1 * torch.linalg.svdvals(masked).sum()
    penalty = nuclear_norm_penalty(model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(penalty, expected)
    penalty.backward()
    assert adapter.values.grad is not None and adapter.values.grad.abs().sum() > 0


def test_fraction_selects_exactly_that_share():
    torch.manual_seed(0)
    model = rankwise.adapt(nn.Sequential(nn.Linear(20, 30)), rankwise.SaraConfig(fraction=0.15, target_modules=["0"]))
    assert model.trainable_summary()["trainable"] == 90


@pytest.mark.parametrize("field,value", [("threshold", 0), ("fraction", 1.5), ("fraction", 0), ("lambda_rank", -1),
                                         ("nuclear_min_size", -2), ("selected_counts", {"a": [1]}),
                                         ("progressive_ratio", 1.0), ("progressive_ratio", -0.1), ("progressive_step", 0)])
def test_bad_config(field, value):
    with pytest.raises(ConfigError, match=field):
        rankwise.SaraConfig(target_modules=["x"], **{field: value})


# ---- SaRA's training: the nuclear norm and the progressive re-selection run whenever train() trains SaRA ----

def _train(model, steps=10, lr=0.01, max_grad_norm=None, **kw):
    from rankwise.train.loop import TrainConfig, train

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 24, generator=gen), torch.randn(8, 72, generator=gen)) for _ in range(steps)]
    loss = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    config = TrainConfig(epochs=1, lr=lr, schedule="constant", warmup_ratio=0.0, max_grad_norm=max_grad_norm, **kw)
    return train(model, lambda epoch: batches, loss, config, progress=False)


def test_train_reselects_at_the_scheduled_step(monkeypatch):
    import rankwise.adapters.sara as sara

    calls = []
    real = sara.reselect

    def spy(model, optimizer=None, adapter_name="default"):
        values_before = {a.module_name: a.values.detach().clone() for a in sara._sara_adapters(model, adapter_name)}
        counts = real(model, optimizer, adapter_name)
        calls.append((optimizer, values_before))
        return counts

    monkeypatch.setattr(sara, "reselect", spy)
    model, _ = _model()
    assert model.configs["default"].progressive_ratio == 0.5  # the reference: 2500 of 5005 steps
    history = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        history.append(len(calls))
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    _train(model, steps=10)
    assert len(calls) == 1, "SaRA's progressive re-selection must run once in a training run"
    assert history.index(1) == 5, "re-selection happens before the 6th update (after half the 10 steps)"
    assert calls[0][0] is not None, "re-selection swaps the optimizer's parameters and resets its state"
    counts = model.configs["default"].selected_counts
    assert set(counts) == {"0", "2"}  # recorded in the config, so the file reloads the new supports
    model2, _ = _model(progressive_step=3)
    calls.clear()
    history.clear()
    _train(model2, steps=10)
    assert len(calls) == 1 and history.index(1) == 3


def test_reselection_step_leaves_the_new_values_unchanged():
    """The reference's progressive step: new support {|w_current| < tau}, and no update of it on that step."""
    from rankwise.train.loop import TrainConfig, train

    model, _ = _model(progressive_step=2, lambda_rank=0.0)
    before, after = {}, {}

    class Watch:  # a caller's callback: its after_backward runs before SaRA's (method callbacks come last)
        def after_backward(self, state):
            if state.step == 2:
                before.update({n: _effective(model, n).detach().clone() for n in ("0", "2")})

        def on_step_end(self, state):
            if state.step == 3:  # the step whose after_backward re-selected
                after.update({n: _effective(model, n).detach().clone() for n in ("0", "2")})

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 24, generator=gen), torch.randn(8, 72, generator=gen)) for _ in range(4)]
    loss = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    config = TrainConfig(lr=0.05, schedule="constant", warmup_ratio=0.0, max_grad_norm=None)
    train(model, lambda e: batches, loss, config, callbacks=[Watch()], progress=False)
    for n in ("0", "2"):
        adapter = dict(model.adapted_layers())[n].adapters["default"]
        torch.testing.assert_close(after[n], before[n])  # no update on the re-selection step
        assert torch.equal(adapter.indices, torch.nonzero(before[n].flatten().abs() < TAU).flatten())
        assert not torch.equal(_effective(model, n), after[n])  # the next step trains the new support


def test_nuclear_norm_term_enters_the_gradient():
    """The gradients the optimizer sees differ from a lambda_rank=0 run by exactly d(lambda ||P' (.) M||_*)/d values."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    def grads_seen(lam):
        model, _ = _model(lambda_rank=lam, nuclear_min_size=30, progressive_ratio=0.0)  # only layer "2" is eligible
        seen = []

        def hook(optimizer, args, kwargs):
            seen.append({a.module_name: a.values.grad.clone() for a in
                         [dict(model.adapted_layers())[n].adapters["default"] for n in ("0", "2")]})

        handle = register_optimizer_step_pre_hook(hook)
        try:
            _train(model, steps=1)
        finally:
            handle.remove()
        return model, seen[0]

    _, without = grads_seen(0.0)
    model, with_penalty = grads_seen(0.5)
    torch.testing.assert_close(with_penalty["0"], without["0"])  # layer "0" is too small to be penalised
    difference = with_penalty["2"] - without["2"]
    assert difference.abs().max() > 1e-4, "the nuclear-norm penalty must change the gradient"
    fresh, _ = _model(lambda_rank=0.5, nuclear_min_size=30)
    adapter = dict(fresh.adapted_layers())["2"].adapters["default"]
    (expected,) = torch.autograd.grad(nuclear_norm_penalty(fresh), adapter.values)
    torch.testing.assert_close(difference, expected, atol=1e-5, rtol=1e-4)


def test_training_resumes_across_the_reselection(tmp_path):
    model, _ = _model(lambda_rank=0.05, nuclear_min_size=10)
    _train(model, steps=8)
    straight = {n: _effective(model, n).detach() for n in ("0", "2")}
    interrupted, _ = _model(lambda_rank=0.05, nuclear_min_size=10)
    from rankwise.train.loop import TrainConfig, train

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 24, generator=gen), torch.randn(8, 72, generator=gen)) for _ in range(8)]
    loss = lambda m, b: (m(b[0]) - b[1]).pow(2).mean()  # noqa: E731
    config = TrainConfig(epochs=1, lr=0.01, schedule="constant", warmup_ratio=0.0, max_grad_norm=None, checkpoint_every=6)
    train(interrupted, lambda e: batches, loss, config, progress=False, output_dir=tmp_path, stop_after=7)
    resumed, _ = _model(lambda_rank=0.05, nuclear_min_size=10)
    train(resumed, lambda e: batches, loss, config, progress=False, output_dir=tmp_path, resume_from="latest")
    for n in ("0", "2"):
        torch.testing.assert_close(_effective(resumed, n).detach(), straight[n])
    assert resumed.configs["default"].selected_counts == model.configs["default"].selected_counts


def test_method_callbacks_are_collected_only_for_trainable_sara(tmp_path):
    from rankwise.adapters.sara import SaraTraining
    from rankwise.train.loop import method_callbacks

    model, reference = _model()
    assert [type(cb) for cb in method_callbacks(model)] == [SaraTraining]
    assert method_callbacks(reference) == []
    model.save_adapter(tmp_path)
    frozen = rankwise.load_adapter(copy.deepcopy(reference), tmp_path, is_trainable=False)
    assert method_callbacks(frozen) == []


@pytest.mark.slow
def test_cli_finetune_trains_sara_with_reselection(tmp_path):
    """`rankwise finetune --method sara` is the paper's SaRA: the saved config records the re-selected supports."""
    import json

    from typer.testing import CliRunner

    from rankwise.cli import app
    from text_task import write_sentiment_csv, write_tiny_classifier

    model_dir, data = write_tiny_classifier(tmp_path / "model"), write_sentiment_csv(tmp_path / "data.csv")
    result = CliRunner().invoke(app, ["finetune", "--data", str(data), "--model", str(model_dir), "--train-size", "64",
                                      "--test-size", "16", "--batch-size", "16", "--max-steps", "6", "--method", "sara",
                                      "--targets", "query,value", "--option", "fraction=0.2",
                                      "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["selected_counts"], "the progressive re-selection did not run in rankwise finetune"
    assert all(n > 0 for n, _ in saved["selected_counts"].values())
