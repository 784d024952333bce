"""Every registered adapter is usable from `rankwise finetune --method NAME` (tiny local model, one epoch)."""
from __future__ import annotations

import json

import pytest

import rankwise
from rankwise.cli import app

from test_cli import runner, sentiment_csv, tiny_model_dir  # noqa: F401  (fixtures)

# Papers' default ranks are sized for big models: the 32-wide toy gets rank 4 wherever a method has a rank.
# DePT adapts the input embeddings and its prompt must fit in the toy's 32 positions.
EXTRA = {"dept": ["--targets", "word_embeddings", "--option", "num_virtual_tokens=4"]}


def _rank_args(method: str) -> list[str]:
    return ["--rank", "4"] if rankwise.get_method(method).config_cls.rank_field else []


@pytest.mark.parametrize("method", [m.name for m in rankwise.list_methods()])
def test_every_method_finetunes_from_the_cli(method, tiny_model_dir, sentiment_csv, tmp_path):  # noqa: F811
    out = tmp_path / method
    result = runner.invoke(app, [
        "finetune", "--method", method, "--targets", "query,value", *EXTRA.get(method, []), *_rank_args(method), "--epochs", "1",
        "--batch-size", "16", "--train-size", "64", "--test-size", "32", "--data", str(sentiment_csv),
        "--model", str(tiny_model_dir), "--output", str(out),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and 0.0 <= metrics["after"]["accuracy"] <= 1.0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0 and saved


def test_dept_prompt_longer_than_the_positions_is_a_clear_error(tiny_model_dir, sentiment_csv, tmp_path):  # noqa: F811
    result = runner.invoke(app, [
        "finetune", "--method", "dept", "--targets", "word_embeddings", "--option", "num_virtual_tokens=40", "--epochs", "1",
        "--train-size", "16", "--test-size", "8", "--data", str(sentiment_csv), "--model", str(tiny_model_dir),
        "--output", str(tmp_path / "dept"),
    ])
    assert result.exit_code == 2 and "max_position_embeddings=32" in " ".join(result.output.split())
