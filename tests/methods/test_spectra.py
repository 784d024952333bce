"""Spectra, ranks, subspace similarity and `rankwise analyze` on PEFT-layout adapter files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from rankwise import CheckpointError, ShapeError
from rankwise.analysis.spectra import (
    analyze_updates,
    energy_rank,
    read_lora_updates,
    similarity_grid,
    spectrum,
)
from rankwise.linalg import effective_rank, factored_svd, stable_rank


def test_factored_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randn(5, 30, generator=g, dtype=torch.float64)
    U, S, Vh = factored_svd(B, A)
    assert torch.allclose(S, torch.linalg.svdvals(B @ A)[:5], rtol=1e-10)
    assert torch.allclose(U @ torch.diag(S) @ Vh, B @ A, atol=1e-10)


def test_ranks_of_a_known_spectrum():
    Q1, _ = torch.linalg.qr(torch.randn(50, 50, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    S = torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    W = Q1[:, :4] @ torch.diag(S) @ Q2[:, :4].T
    report = spectrum("w", W).report()
    assert report["stable_rank"] == pytest.approx(14 / 9, rel=1e-6)
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert report["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    assert report["numerical_rank"] == 3
    assert energy_rank(S, 0.9) == 2 and energy_rank(S, 0.5) == 1 and energy_rank(torch.zeros(3)) == 0
    factored = spectrum("f", (Q1[:, :4] @ torch.diag(S), Q2[:, :4].T)).report()
    assert factored["stable_rank"] == pytest.approx(stable_rank(W), rel=1e-5)
    assert factored["effective_rank"] == pytest.approx(effective_rank(W[:, :].float()), rel=1e-4)


def test_subspace_similarity_grid():
    g = torch.Generator().manual_seed(1)
    B, A = torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randn(4, 32, generator=g, dtype=torch.float64)
    other = (torch.randn(64, 4, generator=g, dtype=torch.float64), A)
    same = similarity_grid(spectrum("a", (B, A)), spectrum("b", (2 * B, 3 * A)), 4)
    assert torch.allclose(same.diagonal(), torch.ones(4, dtype=torch.float64), atol=1e-9)
    independent = similarity_grid(spectrum("a", (B, A)), spectrum("c", other), 4)
    assert float(independent[3, 3]) < 0.35  # random 4-dim subspaces of R^64 overlap by ~4/64
    with pytest.raises(ShapeError, match="output sizes"):
        similarity_grid(spectrum("a", (B, A)), spectrum("d", torch.randn(10, 5)), 2)


def write_lora_dir(path, r=4, alpha=8, seed=0, layers=("q", "v"), rslora=False):
    g = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    for layer in layers:
        A, B = torch.randn(r, 16, generator=g), torch.randn(24, r, generator=g)
        tensors[f"base_model.model.encoder.{layer}.lora_A.weight"] = A
        tensors[f"base_model.model.encoder.{layer}.lora_B.weight"] = B
        scale = alpha / r**0.5 if rslora else alpha / r
        dense[f"encoder.{layer}"] = scale * B.double() @ A.double()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora}))
    return dense


@pytest.mark.parametrize("rslora", [False, True])
def test_read_lora_updates_applies_the_scaling(tmp_path, rslora):
    dense = write_lora_dir(tmp_path / "a", rslora=rslora)
    updates = read_lora_updates(tmp_path / "a")
    assert set(updates) == set(dense)
    for name, (B, A) in updates.items():
        assert torch.allclose(B @ A, dense[name], atol=1e-5)


def test_reads_files_written_by_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], init_lora_weights=False)
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(tmp_path / "peft")
    updates = read_lora_updates(tmp_path / "peft")
    for name in ("0", "2"):
        layer = wrapped.base_model.model[int(name)]
        B, A = updates[name]
        assert torch.allclose((B @ A).float(), layer.get_delta_weight("default"), atol=1e-5)


def test_analyze_writes_report_and_plots(tmp_path):
    from typer.testing import CliRunner

    from rankwise.cli import app

    write_lora_dir(tmp_path / "a", seed=0)
    write_lora_dir(tmp_path / "b", seed=1)
    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "a"), "--compare", str(tmp_path / "b"), "--rank", "4"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "a" / "analysis"
    report = json.loads((out / "report.json").read_text())
    assert {row["name"] for row in report["layers"]} == {"encoder.q", "encoder.v"}
    assert all(row["numerical_rank"] == 4 for row in report["layers"])
    assert set(report["similarity"]) == {"encoder.q", "encoder.v"}
    for png in ("spectra.png", "similarity.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    self_report = analyze_updates(read_lora_updates(tmp_path / "a"), tmp_path / "self", read_lora_updates(tmp_path / "a"), 4)
    assert all(v == pytest.approx(1.0) for v in self_report["similarity"].values())


def test_bad_adapter_dirs(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        read_lora_updates(tmp_path)
    write_lora_dir(tmp_path / "x")
    weights = tmp_path / "x" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        read_lora_updates(tmp_path / "x")
    write_lora_dir(tmp_path / "y")
    save_file({"base_model.model.q.lora_A.weight": torch.randn(2, 3)}, str(tmp_path / "y" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="lora_B"):
        read_lora_updates(tmp_path / "y")
    from typer.testing import CliRunner

    from rankwise.cli import app

    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "adapter_config.json" in result.output


def test_analyze_with_base_model_uses_load_adapter(tmp_path):
    """`--base`: the adapter is rebuilt with rankwise.load_adapter and every layer's delta_weight is analysed."""
    import rankwise
    from transformers import BertConfig, BertForSequenceClassification

    from rankwise.analysis.spectra import adapter_updates

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    model = rankwise.adapt(BertForSequenceClassification.from_pretrained(tmp_path / "base"),
                           rankwise.LoraConfig(r=2, target_modules=["query", "value"]))
    with torch.no_grad():  # a non-zero update, as after training
        for name, parameter in model.named_parameters():
            if "lora" in name.lower() and parameter.requires_grad:
                parameter.normal_()
    model.save_adapter(tmp_path / "adapter")
    expected = model.delta_weights()
    via_base = adapter_updates(tmp_path / "adapter", base=tmp_path / "base")
    assert set(via_base) == set(expected)
    for name, delta in via_base.items():
        assert torch.allclose(delta, expected[name], atol=1e-6)
    direct = adapter_updates(tmp_path / "adapter")  # LoRA files: read without the base
    for name, (B, A) in direct.items():
        match = next(key for key in expected if key.endswith(name) or name.endswith(key))
        assert torch.allclose((B @ A).float(), expected[match], atol=1e-5)

    from typer.testing import CliRunner

    from rankwise.cli import app

    result = CliRunner().invoke(app, ["analyze", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "adapter" / "analysis" / "report.json").read_text())
    assert len(report["layers"]) == 2 and all(row["numerical_rank"] == 2 for row in report["layers"])
