"""Procedures by name, and `finetune_classifier` with each procedure on a tiny BERT classifier (no download)."""
from __future__ import annotations

import json
import random

import pytest
import torch
from train_helpers import lora_mlp

from rankwise.core.errors import ConfigError
from rankwise.train.loop import TrainConfig
from rankwise.train.procedures import PROCEDURES, build_procedure, get_procedure

WORDS = ["good", "bad", "great", "awful", "fine", "meh", "love", "hate", "ok", "the", "a", "movie"]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                     max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(path)
    return path


def tiny_data():
    from rankwise.data.text import TextClassificationData

    rng = random.Random(0)
    texts, labels = [], []
    for _ in range(96):
        label = rng.randrange(2)
        words = [rng.choice(WORDS[0::2] if label else WORDS[1::2]) for _ in range(4)] + ["the", "movie"]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return TextClassificationData(texts[:64], labels[:64], texts[64:], labels[64:], ["neg", "pos"], "synthetic")


def test_registry_and_option_errors():
    assert set(PROCEDURES) == {"allora", "ggpo", "increlora", "triadapt", "diffora", "maestro", "trp"}
    assert get_procedure("LoRA-GGPO").name == "ggpo" and get_procedure("TriAdaptLoRA").name == "triadapt"
    with pytest.raises(ConfigError, match="unknown procedure"):
        get_procedure("adalora")
    with pytest.raises(ConfigError, match="no option"):
        build_procedure("ggpo", lora_mlp(), sigmaa=0.1)


CASES = {
    "allora": ({"rank": 4, "method_options": {"lora_alpha": 4}}, {}),
    "ggpo": ({}, {}),
    "increlora": ({"rank": 1}, {"target_rank": 2, "init_warmup": 1, "incre_interval": 1}),
    "triadapt": ({"rank": 1}, {"reference_rank": 2, "incre_interval": 1}),
    "diffora": ({}, {"search_steps": 2, "ratio": 0.5}),
    "maestro": ({"method_options": {"init_lora_weights": "pissa"}}, {"shrink_every": 2, "threshold": 0.5}),
    "trp": ({}, {"nuclear_weight": 1e-3}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_finetune_with_each_procedure(name, tiny_classifier, tmp_path):
    from rankwise.train.finetune import FinetuneSpec, finetune_classifier

    spec_kwargs, options = CASES[name]
    spec = FinetuneSpec(targets=["query", "value", "dense"], max_length=16, batch_size=16, procedure=name, procedure_options=options,
                        train=TrainConfig(epochs=2, lr=5e-3), **{"rank": 4, **spec_kwargs})
    metrics = finetune_classifier(tiny_data(), spec, tmp_path, model_path=tiny_classifier, progress=False)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["procedure"]["procedure"] and metrics["after"]["accuracy"] >= 0
    if name in ("increlora", "triadapt", "maestro"):
        assert (tmp_path / "ranks.png").stat().st_size > 0 and saved["procedure"]["ranks"]
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        assert {k.replace("\\", "") for k in config["rank_pattern"]} == set(saved["procedure"]["ranks"])
    if name == "trp":
        assert (tmp_path / "low_rank" / "low_rank.json").exists()
    else:
        assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_cli_finetune_procedure_prints_rank_table_and_saves_plot(tiny_classifier, tmp_path):
    from typer.testing import CliRunner

    from rankwise.cli import app

    data = tiny_data()
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{data.label_names[y]}\n" for t, y in zip(data.train_texts, data.train_labels)))
    out = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_classifier), "--data", str(csv), "--rank", "1", "--targets", "query,value",
            "--epochs", "1", "--train-size", "48", "--test-size", "12", "--max-length", "16", "--batch-size", "8",
            "--output", str(out), "--procedure", "increlora", "-p", "target_rank=2", "-p", "init_warmup=1", "-p", "incre_interval=1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "IncreLoRA: final ranks" in result.output and (out / "ranks.png").exists()
    bad = CliRunner().invoke(app, args[:-8] + ["--overwrite", "--procedure", "increlora", "-p", "target_rank=-1"])
    assert bad.exit_code == 2 and "target_rank=-1 is invalid" in bad.output
