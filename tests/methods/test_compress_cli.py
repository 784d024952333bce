"""`rankwise compress` end to end on a tiny model directory (no downloads)."""
import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from _compress_models import tiny_llama
from rankwise.cli import app
from rankwise.compress import load_compressed

runner = CliRunner()


@pytest.fixture()
def model_dir(tmp_path):
    path = tmp_path / "tiny"
    tiny_llama().save_pretrained(str(path))
    return path


@pytest.fixture()
def calibration(tmp_path):
    path = tmp_path / "cal.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))}, str(path))
    return path


@pytest.mark.parametrize("method", ["svd", "modegpt"])
def test_compress_writes_loadable_model_and_report(model_dir, calibration, tmp_path, method):
    out = tmp_path / f"out-{method}"
    result = runner.invoke(app, ["compress", str(model_dir), "--method", method, "--ratio", "0.5",
                                 "--calibration", str(calibration), "--out", str(out), "--samples", "16",
                                 "--eval-samples", "8"])
    assert result.exit_code == 0, result.output
    assert {"rankwise_model.safetensors", "config.json", "compression.json", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["compressed_ratio"] <= 0.5 + 1e-9 and report["file_size_bytes"] > 0
    assert report["quality"]["before"]["perplexity"] > 0 and report["quality"]["after"]["perplexity"] > 0
    assert report["latency_ms"]["before"] > 0 and report["params_after"] < report["params_before"]
    structure = json.loads((out / "compression.json").read_text())
    kinds = {spec["kind"] for spec in structure["modules"].values()}
    assert ("low_rank" in kinds) if method == "svd" else ("modegpt_rope_attention" in kinds)
    model = load_compressed(out)
    ids = torch.randint(0, 64, (2, 8))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "ratio"),
    (["--ratio", "0"], "ratio"),
    (["--method", "nope"], "unknown compression method"),
])
def test_bad_arguments_write_nothing(model_dir, calibration, tmp_path, args, message):
    out = tmp_path / "out"
    base = ["compress", str(model_dir), "--method", "svd", "--calibration", str(calibration), "--out", str(out)]
    result = runner.invoke(app, base + args)
    assert result.exit_code == 2 and message in result.output
    assert not out.exists()


def test_wrong_calibration_shape_writes_nothing(model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"input_ids": torch.randint(0, 64, (64,))}, str(bad))
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(model_dir), "--method", "afm", "--calibration", str(bad),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "input_ids has shape (64,)" in result.output
    assert not out.exists()
    floats = tmp_path / "floats.safetensors"
    save_file({"input_ids": torch.randn(8, 16)}, str(floats))
    result = runner.invoke(app, ["compress", str(model_dir), "--method", "afm", "--calibration", str(floats),
                                 "--out", str(out)])
    assert result.exit_code == 2 and "dtype" in result.output and not out.exists()


def test_encoder_model_with_text_calibration(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "the a of and to in is was it that he she they we you god earth light day night water land".split()
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    model_dir = tmp_path / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(model_dir))
    BertTokenizer(str(vocab)).save_pretrained(str(model_dir))
    generator = torch.Generator().manual_seed(0)
    sentences = [" ".join(words[int(i)] for i in torch.randint(0, len(words), (8,), generator=generator))
                 for _ in range(60)]
    text = tmp_path / "text.txt"
    text.write_text(". ".join(sentences) + ".")
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(model_dir), "--method", "afm", "--ratio", "0.6", "--calibration",
                                 str(text), "--out", str(out), "--samples", "32", "--eval-samples", "16"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    cosine = report["quality"]["after"]["embedding_cosine_to_original"]
    assert report["quality"]["before"]["embedding_cosine_to_original"] == pytest.approx(1.0, abs=1e-5)
    assert 0.5 < cosine < 1.0
    assert len(report["layers"]) == 12  # q, k, v, attention out, intermediate, output per layer
    reloaded = load_compressed(out)
    ids = torch.randint(5, len(words) + 5, (2, 6))
    assert torch.isfinite(reloaded(ids).last_hidden_state).all()


def test_device_flag(model_dir, calibration, tmp_path):
    """--device cuda without CUDA: exit 2, a clear message, nothing written; --device cpu compresses."""
    base = ["compress", str(model_dir), "--method", "svd", "--ratio", "0.5", "--calibration", str(calibration),
            "--samples", "8", "--eval-samples", "4"]
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*base, "--out", str(tmp_path / "gpu"), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gpu").exists()
    result = runner.invoke(app, [*base, "--out", str(tmp_path / "cpu"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert load_compressed(tmp_path / "cpu") is not None
