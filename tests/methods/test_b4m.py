"""Break-for-Make spec checks (docs: /work/shared/specs/methods-adapters-b.md part B1 section 3)."""
import copy

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import rankwise
from rankwise.adapters.b4m import compose
from rankwise.core.errors import CheckpointError, ConfigError


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 12))


def _adapt(base=None, **kw):
    return rankwise.adapt(base or _base(), rankwise.B4mConfig(**{"r": 4, "target_modules": ["0", "2"], **kw}))


def _adapter(model, name="0"):
    return dict(model.adapted_layers())[name].adapters["default"]


def _train(model, steps=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameter_groups(lr=0.05, weight_decay=0.01))
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 16, generator=gen)).pow(2).mean().backward()
        opt.step()


def test_partition_frozen_blocks_never_move():
    model = _adapt()
    frozen = {n: (a.A_frozen.clone(), a.B_frozen.clone()) for n, a in
              ((n, layer.adapters["default"]) for n, layer in model.adapted_layers())}
    _train(model)
    for name, (a_f, b_f) in frozen.items():
        a, b = _adapter(model, name).factors()
        assert torch.equal(a[:, : a_f.shape[1]], a_f) and torch.equal(b[: b_f.shape[0]], b_f)


def test_orthogonal_prior_init():
    model = _adapt(r=4, basis_height=64)
    a = _adapter(model, "0")
    gram = a.A_frozen @ a.A_frozen.T
    assert gram.diagonal().sum() == pytest.approx(4 * 8 / 64 * 1.0, rel=0.6)  # ~ (h_in / height) I on average
    stacked = torch.cat([a.A_frozen.T, a.B_frozen])  # rows of one orthonormal basis: no row used twice
    assert torch.linalg.matrix_rank(stacked) == 4
    delta = a.delta_weight(None)
    assert torch.count_nonzero(delta[8:]) == 0 and torch.count_nonzero(delta[:8]) > 0  # bottom block row zero
    plain = _adapt(orthogonal_prior=False)
    assert torch.count_nonzero(_adapter(plain, "0").delta_weight(None)) == 0


def test_frozen_blocks_depend_only_on_seed_and_name():
    a, b = _adapter(_adapt(seed=1)), _adapter(_adapt(seed=1))
    assert torch.equal(a.A_frozen, b.A_frozen) and torch.equal(a.B_frozen, b.B_frozen)
    torch.manual_seed(123)  # the global RNG does not matter
    c = _adapter(_adapt(seed=1))
    assert torch.equal(a.B_frozen, c.B_frozen)
    assert not torch.equal(a.B_frozen, _adapter(_adapt(seed=2)).B_frozen)


def test_trainable_count():
    model = _adapt()
    # layer "0": 16 -> 16, layer "2": 16 -> 12; r * ((in - in//2) + (out - out//2))
    assert model.trainable_summary()["trainable"] == 4 * (8 + 8) + 4 * (8 + 6)


def test_learning_rates_follow_the_role():
    for role, (a_lr, b_lr) in (("content", (1.0, 0.1)), ("style", (0.1, 1.0)), ("joint", (1.0, 1.0))):
        model = _adapt(role=role)
        lr_of = {id(p): g["lr"] for g in model.parameter_groups(lr=1.0) for p in g["params"]}
        assert {lr_of[id(_adapter(model, n).A_train)] for n in ("0", "2")} == {a_lr}
        assert {lr_of[id(_adapter(model, n).B_train)] for n in ("0", "2")} == {b_lr}


def _trained_dirs(tmp_path):
    content, style = _adapt(role="content"), _adapt(role="style")
    _train(content, seed=1)
    _train(style, seed=2)
    content.save_adapter(tmp_path / "content")
    style.save_adapter(tmp_path / "style")
    return content, style


def test_compose_block_formula_and_interference(tmp_path):
    content, style = _trained_dirs(tmp_path)
    report = compose(tmp_path / "content", tmp_path / "style", tmp_path / "fused")
    assert report["layers"] == 2
    fused = rankwise.load_adapter(_base(), tmp_path / "fused")
    assert fused.configs["default"].role == "joint"
    for name in ("0", "2"):
        c, s, f = _adapter(content, name), _adapter(style, name), _adapter(fused, name)
        h_in, h_out = c.A_frozen.shape[1], c.B_frozen.shape[0]
        b_f, a_f = s.B_frozen, s.A_frozen
        expected = torch.cat([torch.cat([b_f @ a_f, b_f @ c.A_train], 1),
                              torch.cat([s.B_train @ a_f, s.B_train @ c.A_train], 1)], 0)
        torch.testing.assert_close(f.delta_weight(None), expected)
        # interference: content's input-side columns see the style only through B_t^s; the style's output-side
        # rows see the content only through A_t^c. The frozen block row of the update is content's, exactly.
        torch.testing.assert_close(f.delta_weight(None)[:h_out], c.delta_weight(None)[:h_out])
        torch.testing.assert_close(f.delta_weight(None)[:, :h_in], s.delta_weight(None)[:, :h_in])


def test_compose_with_identical_content_gives_the_style_adapter(tmp_path):
    style = _adapt(role="style")
    _train(style)
    style.save_adapter(tmp_path / "style")
    compose(tmp_path / "style", tmp_path / "style", tmp_path / "same")
    x = torch.randn(3, 16)
    torch.testing.assert_close(rankwise.load_adapter(_base(), tmp_path / "same")(x), style(x))


def test_compose_refuses_mismatched_adapters(tmp_path):
    _trained_dirs(tmp_path)
    other = _adapt(seed=5)
    other.save_adapter(tmp_path / "other")
    with pytest.raises(CheckpointError, match="seed"):
        compose(tmp_path / "content", tmp_path / "other", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    rankwise.adapt(_base(), rankwise.LoraConfig(r=2, target_modules=["0"])).save_adapter(tmp_path / "lora")
    with pytest.raises(CheckpointError, match="not a Break-for-Make"):
        compose(tmp_path / "lora", tmp_path / "style", tmp_path / "bad")


def test_cli_compose(tmp_path):
    import typer

    from rankwise.adapters.commands import register

    _trained_dirs(tmp_path)
    app = typer.Typer()  # a multi-command app, as the full CLI is (one command alone would drop its name)
    app.command("noop")(lambda: None)
    register(app)
    runner = CliRunner()
    result = runner.invoke(app, ["compose", str(tmp_path / "content"), str(tmp_path / "style"), "-o", str(tmp_path / "cli")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "adapter_model.safetensors").is_file()
    result = runner.invoke(app, ["compose", str(tmp_path / "content"), str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "error" in result.output


def test_bad_config():
    for field, value in (("r", 0), ("role", "both"), ("partner_lr_scale", -1), ("orthogonal_prior", 1),
                         ("basis_height", 0), ("seed", -3)):
        with pytest.raises(ConfigError, match=field):
            rankwise.B4mConfig(target_modules=["x"], **{field: value})
    with pytest.raises(ConfigError, match="basis_height"):
        _adapt(r=4, basis_height=10)


# -- training as the paper's two stages (issue 20, item 4) --------------------------------------------------------
from rankwise.adapters.b4m import PartnerLosses, load_stage2_start  # noqa: E402
from rankwise.optim.riemannian import RiemannianAdamW  # noqa: E402
from rankwise.train.loop import TrainConfig, train  # noqa: E402


def _batches(seed, n=4):
    gen = torch.Generator().manual_seed(seed)
    data = [(torch.randn(8, 16, generator=gen), torch.randn(8, 12, generator=gen)) for _ in range(n)]
    return lambda epoch: data


def _mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def _loop(model, steps=3, callbacks=(), **config):
    config = {"lr": 1e-2, "max_steps": steps, "warmup_ratio": 0.0, "max_grad_norm": None, **config}
    return train(model, _batches(0), _mse, TrainConfig(**config), callbacks=callbacks,
                 param_groups=model.parameter_groups(config["lr"]), progress=False)


@pytest.mark.parametrize("role,optimizer,expected", [
    ("joint", "auto", RiemannianAdamW), ("content", "auto", torch.optim.AdamW), ("style", "auto", torch.optim.AdamW),
    ("joint", "adamw", torch.optim.AdamW), ("content", "riemannian", RiemannianAdamW)])
def test_stage_two_trains_with_the_riemannian_optimizer(role, optimizer, expected):
    state = _loop(_adapt(role=role, optimizer=optimizer), steps=1)
    assert type(state.optimizer) is expected


def test_stage_two_riemannian_step_uses_the_full_factor_grams():
    model = _adapt(role="joint", precondition_delta=1e-4)
    reference = copy.deepcopy(model)
    _loop(model, steps=1)
    # the same step by hand: gradients of the trainable blocks, preconditioned with the full factors' Grams
    loss = _mse(reference, _batches(0)(0)[0])
    loss.backward()
    with torch.no_grad():
        for name in ("0", "2"):
            adapter = _adapter(reference, name)
            a, b = adapter.factors()
            eye = 1e-4 * torch.eye(4)
            adapter.A_train.grad = torch.linalg.inv(b.T @ b + eye) @ adapter.A_train.grad if torch.linalg.norm(b.T @ b) > 1e-6 \
                else adapter.A_train.grad
            adapter.B_train.grad = adapter.B_train.grad @ torch.linalg.inv(a @ a.T + eye)
    opt = torch.optim.AdamW(reference.parameter_groups(1e-2))
    opt.step()
    for name in ("0", "2"):
        ours, theirs = _adapter(model, name), _adapter(reference, name)
        torch.testing.assert_close(ours.A_train, theirs.A_train, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.B_train, theirs.B_train, atol=1e-6, rtol=1e-5)


class _GradProbe:
    def after_backward(self, state):
        self.grads = {n: p.grad.clone() for n, p in state.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("role", ["content", "style", "joint"])
def test_partner_losses_train_only_the_partner_block(role):
    model = _adapt(role=role)
    reference = copy.deepcopy(model)
    partners = [_batches(10), _batches(11), _batches(12)]  # the reference's three auxiliary partner sets
    probe = _GradProbe()
    state = _loop(model, steps=1, callbacks=[PartnerLosses(model, partners, _mse), probe])
    concept = _mse(reference, _batches(0)(0)[0])
    partner = sum(_mse(reference, p(0)[0]) for p in partners) / 3
    names = [n for n, p in reference.named_parameters() if p.requires_grad]
    params = [p for p in reference.parameters() if p.requires_grad]
    g_concept = dict(zip(names, torch.autograd.grad(concept, params)))
    g_partner = dict(zip(names, torch.autograd.grad(partner, params)))
    partner_block = {"content": "B_train", "style": "A_train", "joint": "_train"}[role]
    for name in names:
        expected = g_concept[name] + (g_partner[name] if name.endswith(partner_block) else 0)
        torch.testing.assert_close(probe.grads[name], expected, msg=name)
    assert state.history[-1]["partner_loss"] == pytest.approx(float(partner.detach()))


def test_partner_losses_are_clipped_and_need_a_b4m_model():
    model = _adapt(role="content")
    probe = _GradProbe()
    _loop(model, steps=1, max_grad_norm=1e-3, callbacks=[PartnerLosses(model, [_batches(3)], _mse), probe])
    partner = [g for n, g in probe.grads.items() if n.endswith("B_train")]
    assert float(torch.linalg.vector_norm(torch.stack([g.norm() for g in partner]))) <= 1e-3 * 1.001
    lora = rankwise.adapt(_base(), rankwise.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match="b4m"):
        PartnerLosses(lora, [_batches(3)], _mse)


def test_stage_two_starts_from_the_composed_adapter(tmp_path):
    _trained_dirs(tmp_path)
    compose(tmp_path / "content", tmp_path / "style", tmp_path / "fused")
    model = _adapt(role="joint", init_from=str(tmp_path / "fused"))
    load_stage2_start(model, model.configs["default"])
    fused = rankwise.load_adapter(_base(), tmp_path / "fused")
    for name in ("0", "2"):
        torch.testing.assert_close(_adapter(model, name).delta_weight(None), _adapter(fused, name).delta_weight(None))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.endswith("_train"))
    wrong = _adapt(role="joint", r=4, seed=9, init_from=str(tmp_path / "fused"))
    with pytest.raises(CheckpointError, match="seed"):
        load_stage2_start(wrong, wrong.configs["default"])


def test_new_fields_validate_and_old_files_load(tmp_path):
    for field, value in (("optimizer", "sgd"), ("precondition_delta", -1.0), ("precondition_delta", float("nan")),
                         ("partner_data", "a.csv"), ("init_from", "")):
        with pytest.raises(ConfigError, match=field):
            rankwise.B4mConfig(target_modules=["x"], **{field: value})
    model = _adapt(role="style")
    model.save_adapter(tmp_path / "old")
    import json

    path = tmp_path / "old" / "adapter_config.json"
    raw = json.loads(path.read_text())
    for key in ("optimizer", "precondition_delta", "partner_data", "init_from"):
        raw.pop(key)  # a file written before these fields existed
    path.write_text(json.dumps(raw))
    loaded = rankwise.load_adapter(_base(), tmp_path / "old")
    assert loaded.configs["default"].optimizer == "auto"
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.slow
def test_both_stages_through_rankwise_finetune(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from text_task import write_sentiment_csv, write_tiny_classifier

    from rankwise.cli import app

    model_dir = write_tiny_classifier(tmp_path / "tiny")
    concept, other = write_sentiment_csv(tmp_path / "concept.csv", rows=96), tmp_path / "partner.csv"
    lines = concept.read_text().splitlines()
    other.write_text("\n".join([lines[0]] + lines[:0:-1]) + "\n")  # the same task, another order of rows
    runner = CliRunner()
    common = ["--method", "b4m", "--rank", "4", "--targets", "query,value", "--max-steps", "3", "--batch-size", "16",
              "--train-size", "64", "--test-size", "16", "--model", str(model_dir), "--data", str(concept)]

    def finetune(out, *options):
        args = ["finetune", *common, "--output", str(tmp_path / out)]
        for option in options:
            args += ["--option", option]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / out / "metrics.json").read_text())

    partners = f'partner_data=["{other}", "{concept}"]'
    for role in ("content", "style"):
        metrics = finetune(role, f"role={role}", partners)
        assert all("partner_loss" in h for h in metrics["history"] if "loss" in h and "eval_loss" not in h)
    result = runner.invoke(app, ["compose", str(tmp_path / "content" / "adapter"), str(tmp_path / "style" / "adapter"),
                                 "-o", str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    start = f"init_from={tmp_path / 'fused'}"
    finetune("joint", "role=joint", start, f'partner_data=["{other}"]')
    finetune("joint-adamw", "role=joint", start, f'partner_data=["{other}"]', "optimizer=adamw")
    from safetensors.torch import load_file

    riemannian = load_file(tmp_path / "joint" / "adapter" / "adapter_model.safetensors")
    adamw = load_file(tmp_path / "joint-adamw" / "adapter" / "adapter_model.safetensors")
    fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert max(float((riemannian[k] - adamw[k]).abs().max()) for k in riemannian if k.endswith("_train")) > 1e-6
    # stage 2 starts from the composition: at a negligible lr the style's trained B_t is still there
    runner_args = ["role=joint", start]
    common[common.index("--max-steps") + 1] = "1"
    common += ["--lr", "1e-9"]
    still = finetune("joint-still", *runner_args)
    still_weights = load_file(tmp_path / "joint-still" / "adapter" / "adapter_model.safetensors")
    style_b = [k for k in fused if k.endswith("B_train")]
    assert style_b and all(float(fused[k].abs().max()) > 1e-4 for k in style_b)  # trained in stage 1 (init is 0)
    assert all(torch.allclose(still_weights[k], fused[k], atol=1e-6) for k in fused)
    assert still["optimizer_steps"] == 1
    saved = json.loads((tmp_path / "joint" / "adapter" / "adapter_config.json").read_text())
    assert saved["role"] == "joint" and saved["optimizer"] == "auto"
