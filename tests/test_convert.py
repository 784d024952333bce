"""`rankwise convert`: any adapter -> a PEFT LoRA by truncated SVD of each layer's delta_weight.

Every registered method joins the matrix automatically; `dense-test` (a full-rank dense update, registered
only inside these tests) stands for methods whose update is not low-rank.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from typing import ClassVar

import pytest
import torch
from torch import nn

import rankwise
from rankwise.cli import app
from rankwise.convert import REPORT_NAME, convert_adapter, run_model, tail_relative_errors
from rankwise.core import registry
from rankwise.core.adapter import Adapter
from rankwise.core.errors import ConfigError

from test_cli import runner, tiny_model_dir  # noqa: F401 (fixture)
from test_matrix import SMALL_KWARGS, perturb
from toy_models import TOY_CASES

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
CASES = {case.name: case for case in TOY_CASES}


class DenseAdapter(Adapter):
    """A full-rank update: one dense trainable tensor per layer (canonical layout)."""

    def __init__(self, config, layer, module_name, shared=None):
        super().__init__(config, layer, module_name, shared)
        self.delta = nn.Parameter(torch.zeros(layer.weight_matrix().shape))

    def delta_weight(self, base_weight):
        return self.delta


@dataclasses.dataclass
class DenseConfig(rankwise.AdapterConfig):
    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv", "embedding")
    rank_field: ClassVar[str | None] = None


@pytest.fixture
def method(request):
    """A registered method's info; `dense-test` is registered for the test only."""
    if request.param != "dense-test":
        yield rankwise.get_method(request.param)
        return
    registry.register("dense-test", adapter=DenseAdapter, family="test", paper="none")(DenseConfig)
    try:
        yield registry.get_method("dense-test")
    finally:
        registry._REGISTRY.pop("dense-test", None)


METHODS = [info.name for info in rankwise.list_methods()] + ["dense-test"]


def _inputs(case):
    torch.manual_seed(3)
    inputs = case.make_inputs()
    return {"input_ids": inputs} if case.name in ("bert", "gpt2") else inputs


def _saved_adapter(info, case, path, **kwargs):
    """(pristine base, adapted model) with a non-trivial adapter of `info` saved in `path`."""
    torch.manual_seed(0)
    base = case.build().eval()
    targets = case.targets_for(info.config_cls.supported_layers)
    config = info.config_cls(target_modules=targets, **{**SMALL_KWARGS.get(info.name, {}), **kwargs})
    model = rankwise.adapt(copy.deepcopy(base), config).eval()
    perturb(model, scale=0.5)
    model.save_adapter(path)
    return base, model


def _cases_for(info):
    return [CASES[n] for n in ("bert", "conv", "embedding") if CASES[n].targets_for(info.config_cls.supported_layers)]


def test_lora_converted_at_its_rank_is_exact(tmp_path):
    for case in (CASES["bert"], CASES["conv"], CASES["embedding"], CASES["gpt2"]):
        src = tmp_path / case.name
        base, model = _saved_adapter(rankwise.get_method("lora"), case, src, r=4, lora_alpha=8, init_lora_weights=False)
        inputs = _inputs(case)
        report = convert_adapter(base, src, tmp_path / f"{case.name}-lora", rank=4, sample_inputs=inputs)
        assert all(layer.rank == 4 and layer.relative_error < 1e-6 for layer in report.layers), report.layers
        converted = rankwise.load_adapter(copy.deepcopy(base), tmp_path / f"{case.name}-lora")
        for name, delta in model.delta_weights().items():
            torch.testing.assert_close(converted.delta_weights()[name], delta, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(run_model(converted, inputs), run_model(model, inputs), atol=1e-4, rtol=1e-4)
        assert report.output_relative_diff < 1e-5
        assert report.lora_params == report.source_params


@pytest.mark.parametrize("method", METHODS, indirect=True)
def test_conversion_error_is_reported_and_peft_loads_it(method, tmp_path):
    for case in _cases_for(method):
        src, out = tmp_path / case.name, tmp_path / f"{case.name}-lora"
        base, model = _saved_adapter(method, case, src)
        inputs = _inputs(case)
        if getattr(method.config_cls, "unmergeable_reason", None):
            # Not a weight change (DePT's soft prompt): refused with the reason, nothing written.
            with pytest.raises(ConfigError, match="cannot be exported as LoRA"):
                convert_adapter(base, src, out, rank=2, sample_inputs=inputs)
            assert not out.exists()
            continue
        report = convert_adapter(base, src, out, rank=2, sample_inputs=inputs)
        # Per-layer error, recomputed independently from the converted file (rankwise loads it as a LoRA).
        converted = rankwise.load_adapter(copy.deepcopy(base), out)
        deltas = {k: v.detach() for k, v in model.delta_weights().items()}
        approx = converted.delta_weights()
        for layer in report.layers:
            exact = deltas[layer.module]
            true_error = float((approx[layer.module] - exact).norm() / exact.norm()) if exact.norm() > 0 else 0.0
            assert layer.rank == min(2, *exact.flatten(1).shape)
            assert layer.relative_error == pytest.approx(true_error, rel=1e-3, abs=1e-6)
        # PEFT loads the directory and gives the reported output difference.
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        y_peft, y_source = run_model(peft_model, inputs), run_model(model, inputs)
        assert float((y_peft - y_source).abs().max()) == pytest.approx(report.output_max_abs_diff, rel=1e-3, abs=1e-6)
        saved = json.loads((out / REPORT_NAME).read_text())
        assert saved["max_relative_error"] == pytest.approx(report.max_relative_error)
        # At full rank every method converts exactly.
        full = convert_adapter(base, src, tmp_path / f"{case.name}-full", rank=10_000, sample_inputs=inputs)
        assert full.max_relative_error < 1e-5 and full.output_relative_diff < 1e-4


@pytest.mark.parametrize("method", ["dense-test"], indirect=True)
@pytest.mark.parametrize("tol", [0.3, 0.05])
def test_auto_rank_is_the_smallest_within_tolerance(method, tol, tmp_path):
    base, model = _saved_adapter(method, CASES["bert"], tmp_path / "src")
    report = convert_adapter(base, tmp_path / "src", tmp_path / "out", rank="auto", tol=tol)
    deltas = model.delta_weights()
    for layer in report.layers:
        errors = tail_relative_errors(torch.linalg.svdvals(deltas[layer.module].double().flatten(1)))
        assert errors[layer.rank] <= tol < errors[layer.rank - 1], (layer.module, layer.rank)
        assert layer.relative_error <= tol
    assert len({layer.rank for layer in report.layers}) > 1  # layers of different shapes need different ranks
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    ranks = {n.rsplit(".lora_A", 1)[0]: p.shape[0] for n, p in peft_model.named_parameters() if ".lora_A." in n}
    assert sorted(ranks.values()) == sorted(layer.rank for layer in report.layers)


def test_bad_requests_are_clear_errors(tmp_path):
    base, _ = _saved_adapter(rankwise.get_method("lora"), CASES["mlp"], tmp_path / "src")
    with pytest.raises(ConfigError, match="tol"):
        convert_adapter(base, tmp_path / "src", tmp_path / "out", rank="auto")
    with pytest.raises(ConfigError, match="rank=0"):
        convert_adapter(base, tmp_path / "src", tmp_path / "out", rank=0)
    with pytest.raises(rankwise.CheckpointError, match="adapter_config.json"):
        convert_adapter(base, tmp_path / "missing", tmp_path / "out", rank=2)


def test_cli_converts_a_classifier_adapter(tiny_model_dir, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    model = rankwise.adapt(copy.deepcopy(base), rankwise.LoraConfig(
        r=6, target_modules=["query", "value"], modules_to_save=["classifier"], init_lora_weights=False))
    model.save_adapter(tmp_path / "src")
    result = runner.invoke(app, [
        "convert", str(tmp_path / "src"), "--to", "lora", "--rank", "auto", "--tol", "0.2",
        "--model", str(tiny_model_dir), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["max_relative_error"] <= 0.2 and report["output_max_abs_diff"] >= 0
    assert "relative error" in result.output
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out").eval()
    head = dict(peft_model.named_parameters())["base_model.model.classifier.modules_to_save.default.weight"]
    torch.testing.assert_close(head, model.model.classifier.modules_to_save["default"].weight)  # trained head copied
    bad = runner.invoke(app, ["convert", str(tmp_path / "src"), "--to", "onnx"])
    assert bad.exit_code == 2 and "is not an export" in bad.output and "peft" in bad.output


def test_cli_device_flag(tiny_model_dir, tmp_path):  # noqa: F811
    """--device cuda without CUDA: exit 2 with the clear message, nothing written; --device cpu converts."""
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    rankwise.adapt(base, rankwise.LoraConfig(r=4, target_modules=["query", "value"], init_lora_weights=False)
                   ).save_adapter(tmp_path / "src")
    args = ["convert", str(tmp_path / "src"), "--to", "lora", "--model", str(tiny_model_dir)]
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*args, "--output", str(tmp_path / "gpu"), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gpu").exists()
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "cpu"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cpu" / REPORT_NAME).read_text())["output_max_abs_diff"] < 1e-3
