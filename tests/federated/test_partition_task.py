"""Client splits, the federated head and the cached encoder features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.federated.partition import dirichlet_partition, iid_partition, partition
from rankwise.federated.simulation import FederatedRun, client_round, initial_state
from rankwise.federated.task import HeadSpec, build_model, load_model_state, model_state, save_features


def test_iid_split_is_a_balanced_partition():
    parts = iid_partition(103, 4, seed=1)
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert {len(p) for p in parts} <= {25, 26}
    assert parts == iid_partition(103, 4, seed=1) != iid_partition(103, 4, seed=2)


def test_dirichlet_split_covers_everything_and_skews_labels_more_for_small_alpha():
    labels = np.repeat(np.arange(4), 250)

    def mean_label_skew(alpha):
        parts = dirichlet_partition(labels, 8, alpha, seed=0)
        assert sorted(i for p in parts for i in p) == list(range(1000))
        # total-variation distance between each client's label histogram and the global one
        return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=4) / len(p) - 0.25).sum() for p in parts])

    assert mean_label_skew(0.1) > mean_label_skew(0.5) > mean_label_skew(100.0)
    assert mean_label_skew(100.0) < 0.1
    assert partition(labels, 3, None) == iid_partition(1000, 3)
    with pytest.raises(ConfigError, match="alpha"):
        dirichlet_partition(labels, 3, 0.0)
    with pytest.raises(ConfigError, match="clients"):
        iid_partition(2, 3)


def test_model_state_round_trip_and_frozen_A():
    spec = HeadSpec(in_features=8, hidden=8, num_classes=2, rank=2)
    model = build_model(spec)
    state = {k: torch.randn_like(v) for k, v in model_state(model).items()}
    fresh = build_model(spec)
    load_model_state(fresh, state)
    for k, v in model_state(fresh).items():
        assert torch.equal(v, state[k])
    ffa = build_model(spec, frozen_A=True)
    assert "fc1.lora_A" not in model_state(ffa, with_A=False)
    assert not ffa.model.fc1.adapters["default"].lora_A.requires_grad
    with pytest.raises(CheckpointError, match="fc1.lora_B"):
        load_model_state(fresh, {k: v for k, v in state.items() if k != "fc1.lora_B"})
    state["fc2.lora_A"] = torch.zeros(3, 8)
    with pytest.raises(CheckpointError, match="shape"):
        load_model_state(fresh, state)


def test_client_round_trains_from_the_broadcast_and_ffa_keeps_A_frozen(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (60,), generator=g)
    x = torch.randn(60, 8, generator=g) + y[:, None]
    path = save_features(tmp_path / "f.safetensors", {"train_x": x, "train_y": y, "test_x": x, "test_y": y})
    run = FederatedRun(features=str(path), strategy="ffa-lora", clients=2, alpha=None, head=HeadSpec(in_features=8, hidden=8, num_classes=2, rank=2))
    start = initial_state(run)
    upload, metrics = client_round(run, 0, 1, start, train_A=False)
    assert metrics["num-examples"] == 30 and "fc1.lora_A" not in upload
    assert torch.count_nonzero(upload["fc1.lora_B"]) > 0  # B trained away from its zero init
    again, _ = client_round(run, 0, 1, start, train_A=False)
    assert all(torch.equal(again[k], upload[k]) for k in upload)  # deterministic per (seed, round, client)
    with pytest.raises(ConfigError, match="unknown federated strategy"):
        FederatedRun(features=str(path), strategy="fedavg")


def test_cached_features_encode_once_with_a_local_encoder(tmp_path):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from rankwise.data.text import TextClassificationData
    from rankwise.federated.task import cached_features, load_features

    words = ["[PAD]", "[UNK]", "good", "bad", "movie"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(tmp_path / "enc")
    BertModel(BertConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                         max_position_embeddings=16)).save_pretrained(tmp_path / "enc")
    data = TextClassificationData(["good movie", "bad", "bad movie bad"], [1, 0, 0], ["good"], [1], ["neg", "pos"], "toy")
    path = cached_features(data, tmp_path / "enc", max_length=8, cache_dir=tmp_path / "cache")
    tensors = load_features(path)
    assert tensors["train_x"].shape == (3, 16) and tensors["test_x"].shape == (1, 16)
    assert tensors["train_y"].tolist() == [1, 0, 0]
    # padding must not change a text's feature: "bad" alone equals "bad" encoded inside a padded batch
    single = load_features(cached_features(TextClassificationData(["bad"], [0], ["good"], [1], ["neg", "pos"], "toy1"),
                                           tmp_path / "enc", max_length=8, cache_dir=tmp_path / "cache"))
    torch.testing.assert_close(single["train_x"][0], tensors["train_x"][1], rtol=1e-4, atol=1e-5)
    assert cached_features(data, tmp_path / "enc", max_length=8, cache_dir=tmp_path / "cache") == path  # cache hit
