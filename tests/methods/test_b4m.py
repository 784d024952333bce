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
