"""`--mode encoder`: LoRA inside a (tiny, built-from-config) BERT encoder, trained by federated clients."""
from __future__ import annotations

import pytest
import torch

from rankwise.core.errors import RankwiseError
from rankwise.data.text import TextClassificationData
from rankwise.federated.base import DELTA_SUFFIX
from rankwise.federated.encoder_task import EncoderSpec, build_encoder_model, cached_tokens, load_tokens, token_batches
from rankwise.federated.simulation import FederatedRun, client_round, global_accuracy, holdout_data, initial_state
from rankwise.federated.task import load_model_state, model_state
from tests.toy_models import tiny_bert

WORDS = {0: ["good", "great", "happy", "fine"], 1: ["bad", "awful", "sad", "poor"], 2: ["table", "chair", "door", "wall"]}
FILLER = ["the", "a", "is", "it", "was", "very", "and", "so"]


def synthetic_texts(n, seed):
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(0, 3, (1,), generator=g))
        words = [FILLER[int(i)] for i in torch.randint(0, len(FILLER), (6,), generator=g)]
        for _ in range(2):
            words.insert(int(torch.randint(0, len(words), (1,), generator=g)), WORDS[label][int(torch.randint(0, 4, (1,), generator=g))])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) from a config, with a word-level WordPiece tokenizer over the synthetic vocabulary."""
    from transformers import BertTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *[w for ws in WORDS.values() for w in ws]]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    torch.manual_seed(0)
    tiny_bert().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokens(encoder_dir, tmp_path_factory):
    (train_x, train_y), (test_x, test_y) = synthetic_texts(240, 0), synthetic_texts(90, 1)
    data = TextClassificationData(train_x, train_y, test_x, test_y, ["pos", "neg", "obj"], "synthetic")
    path = cached_tokens(data, encoder_dir, max_length=16, cache_dir=tmp_path_factory.mktemp("cache"))
    assert cached_tokens(data, encoder_dir, max_length=16, cache_dir=path.parent) == path  # cached
    return path


def spec_for(encoder_dir, **kw):
    return EncoderSpec(model=str(encoder_dir), num_classes=3, rank=4, lr=5e-3, batch_size=16, **kw)


def test_lora_sits_on_query_and_value_and_the_model_is_the_same_in_every_process(encoder_dir, tokens):
    model = build_encoder_model(spec_for(encoder_dir))
    names = [name for name, _ in model.adapted_layers()]
    assert len(names) == 4 and all(n.endswith(("attention.self.query", "attention.self.value")) for n in names), names
    assert [name for name, _ in model.saved_modules()] == ["classifier"]
    again = build_encoder_model(spec_for(encoder_dir))
    for key, tensor in model_state(model).items():
        assert torch.equal(tensor, model_state(again)[key]), key
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)  # the encoder's own weights stay frozen
    batch = token_batches({k[6:]: v for k, v in load_tokens(tokens).items() if k.startswith("train_")}, 8)[0]
    assert batch["input_ids"].shape[1] <= 16 and batch["attention_mask"].sum(1).min() >= 3
    with pytest.raises(RankwiseError, match="matched no layer"):
        build_encoder_model(spec_for(encoder_dir, targets=["fc1"]))


def test_stacking_folds_the_update_into_the_encoders_query_weights(encoder_dir):
    """FLoRA on encoder layers: base_delta lands in the pretrained weight, and the model computes with it."""
    spec = spec_for(encoder_dir)
    run_state = model_state(build_encoder_model(spec), with_delta=True)
    layer = "bert.encoder.layer.1.attention.self.query"
    g = torch.Generator().manual_seed(3)
    run_state[layer + DELTA_SUFFIX] = 0.5 * torch.randn(run_state[layer + DELTA_SUFFIX].shape, generator=g)
    model = build_encoder_model(spec)
    load_model_state(model, run_state)
    reference = build_encoder_model(spec)
    load_model_state(reference, {k: v for k, v in run_state.items() if not k.endswith(DELTA_SUFFIX)})
    pretrained = dict(reference.adapted_layers())[layer].base_layer.weight
    assert torch.allclose(dict(model.adapted_layers())[layer].base_layer.weight, pretrained + run_state[layer + DELTA_SUFFIX])
    # the same as a plain transformers BERT whose query weight was edited by hand (B = 0: the LoRA adds nothing)
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    plain = AutoModelForSequenceClassification.from_pretrained(encoder_dir, num_labels=3).eval()
    plain.classifier.load_state_dict(dict(reference.saved_modules())["classifier"].modules_to_save["default"].state_dict())
    with torch.no_grad():
        plain.bert.encoder.layer[1].attention.self.query.weight += run_state[layer + DELTA_SUFFIX]
        ids = torch.tensor([[2, 7, 15, 9, 3]])
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedit", "lora-fair", "ffa-lora", "stacking"])
def test_every_strategy_trains_the_encoder_through_the_round_logic(strategy, encoder_dir, tokens):
    encoder = EncoderSpec(model=str(encoder_dir), num_classes=3, rank=4, lr=2e-2, batch_size=16, local_epochs=3)
    run = FederatedRun(features=str(tokens), strategy=strategy, clients=2, rounds=3, alpha=None, encoder=encoder,
                       client_ranks=[2, 4] if strategy in ("fedit", "lora-fair") else None)
    assert run.mode == "encoder" and "head" not in run.fingerprint()
    server = run.make_strategy()
    state = initial_state(run)
    test = holdout_data(run)
    before = global_accuracy(run, state, test)
    for server_round in (1, 2, 3):
        replies = [client_round(run, k, server_round, state, server.trains_A) for k in range(2)]
        state = server.aggregate_states(state, [u for u, _ in replies], [m["num-examples"] for _, m in replies], server_round)
    after = global_accuracy(run, state, test)
    layer = "bert.encoder.layer.0.attention.self.value"
    assert float(state[layer + ".lora_B"].norm()) > 0 or float(state[layer + DELTA_SUFFIX].norm()) > 0  # the encoder was adapted
    assert after["loss"] < before["loss"] - 0.05 and after["accuracy"] > before["accuracy"], (before, after)


@pytest.mark.slow
def test_cli_default_mode_is_encoder_and_runs_on_flower(encoder_dir, tmp_path):
    """`rankwise federate --model <dir> --data <csv>`: LoRA inside the encoder, two strategies, mixed ranks, Flower+Ray."""
    import json

    from typer.testing import CliRunner

    from rankwise.cli import app

    texts, labels = synthetic_texts(200, 2)
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{['pos', 'neg', 'obj'][y]}\n" for t, y in zip(texts, labels)), encoding="utf-8")
    out = tmp_path / "run"
    args = ["federate", "--model", str(encoder_dir), "--data", str(csv), "--train-size", "150", "--test-size", "50", "--iid",
            "--strategy", "fedit,lora-fair", "--clients", "2", "--rounds", "2", "--client-ranks", "2,4", "--lr", "0.02",
            "--local-epochs", "2", "--batch-size", "16", "--max-length", "16", "--output", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    for name in ("fedit", "lora-fair"):
        run = results["strategies"][name]
        assert run["settings"]["encoder"]["targets"] == ["query", "value"] and "head" not in run["settings"]
        assert [h["answered"] for h in run["history"][1:]] == [2, 2]
        assert run["history"][-1]["loss"] < run["history"][0]["loss"]
    assert "server_cosine" in results["strategies"]["lora-fair"]["history"][1]
    bad = CliRunner().invoke(app, ["federate", "--features", str(csv), "--output", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--mode head" in " ".join(bad.output.split())


def test_client_data_files_fail_clearly_when_absent_or_of_the_other_mode(tmp_path, features):
    from rankwise.core.errors import CheckpointError, ConfigError
    from rankwise.federated.encoder_task import load_tokens
    from rankwise.federated.task import load_features

    with pytest.raises(ConfigError, match="token file .* does not exist"):
        load_tokens(tmp_path / "none.safetensors")
    with pytest.raises(ConfigError, match="feature file .* does not exist"):
        load_features(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks \['train_ids'.*--mode head"):
        load_tokens(features)
