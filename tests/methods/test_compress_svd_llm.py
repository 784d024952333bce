"""SVD-LLM (truncation-aware whitening) and ASVD (activation-aware scaling) against plain SVD, on numbers that can fail."""
import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from _compress_models import padded_batches, tiny_bert, tiny_llama, token_batches
from rankwise.cli import app
from rankwise.compress import LowRankLinear, compress, load_compressed, save_compressed
from rankwise.compress._common import rank_for_ratio
from rankwise.core.errors import ConfigError

runner = CliRunner()


def anisotropic_inputs(n=600, d=24, seed=0, outliers=()):
    """Rows with a spread of scales along random directions (optionally a few huge channels)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales @ rotation.T
    if outliers:
        X = torch.randn(n, d, generator=g, dtype=torch.float64)
        X[:, list(outliers)] *= 40.0
    return X


def one_linear(seed=1, d_in=24, d_out=20):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out)).double()


def output_error(W_new, W, X):
    return float(((X @ (W - W_new).T) ** 2).sum())


def compressed_weight(method, X, ratio=0.5, seed=1, **options):
    model = one_linear(seed, X.shape[1])
    W = model[0].weight.detach().clone()
    model, report = compress(model, method, [X], ratio=ratio, **options)
    assert isinstance(model[0], LowRankLinear), report
    return model[0].weight.detach(), W, report


def test_svd_llm_output_error_is_the_dropped_whitened_spectrum_and_beats_svd():
    X = anisotropic_inputs()
    W_llm, W, report = compressed_weight("svd-llm", X)
    k = rank_for_ratio(24, 20, 0.5)
    assert report.layers["0"]["rank"] == k and "damping_shift" not in report.layers["0"]
    sigma = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))  # computed here, not by the library
    dropped = float((sigma[k:] ** 2).sum())
    assert output_error(W_llm, W, X) == pytest.approx(dropped, rel=1e-6)
    W_svd, _, _ = compressed_weight("svd", X)
    assert output_error(W_llm, W, X) < 0.5 * output_error(W_svd, W, X)  # anisotropic inputs: strictly (much) less
    # the bias is carried unchanged
    model = one_linear()
    bias = model[0].bias.detach().clone()
    model, _ = compress(model, "svd-llm", [X], ratio=0.5)
    torch.testing.assert_close(model[0].up.bias.detach(), bias)


def test_svd_llm_is_never_worse_than_svd_on_isotropic_inputs():
    X = torch.randn(800, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    W_llm, W, _ = compressed_weight("svd-llm", X, ratio=0.4)
    W_svd, _, _ = compressed_weight("svd", X, ratio=0.4)
    assert output_error(W_llm, W, X) <= output_error(W_svd, W, X) * (1 + 1e-9)


def test_svd_llm_singular_gram_is_damped_and_reported():
    X = anisotropic_inputs()
    X[:, 5] = 0.0  # a dead input channel: XᵀX is singular, a plain Cholesky fails
    assert int(torch.linalg.cholesky_ex(X.T @ X).info) != 0
    W_llm, W, report = compressed_weight("svd-llm", X)
    assert report.layers["0"]["damping_shift"] > 0 and any("diagonal shift" in n for n in report.notes)
    assert torch.isfinite(W_llm).all()
    W_svd, _, _ = compressed_weight("svd", X)
    assert output_error(W_llm, W, X) < output_error(W_svd, W, X)


def test_asvd_alpha_zero_is_plain_svd_and_wins_on_outlier_channels():
    X = anisotropic_inputs(outliers=(2, 11, 17))
    W_zero, W, _ = compressed_weight("asvd", X, alpha=0.0)
    W_svd, _, _ = compressed_weight("svd", X)
    torch.testing.assert_close(W_zero, W_svd, rtol=0, atol=1e-5)
    W_asvd, _, _ = compressed_weight("asvd", X)  # alpha = 0.5, the paper's default
    assert output_error(W_asvd, W, X) < 0.7 * output_error(W_svd, W, X)
    # optimal in its own scaled norm: the loss is the dropped spectrum of W S, S = diag(E|x|^alpha)
    S = X.abs().mean(0).sqrt()
    k = rank_for_ratio(24, 20, 0.5)
    sigma = torch.linalg.svdvals(W * S)
    assert float((((W - W_asvd) * S) ** 2).sum()) == pytest.approx(float((sigma[k:] ** 2).sum()), rel=1e-6)


def test_blocks_are_calibrated_on_the_compressed_earlier_blocks():
    """Layer 1's q_proj error identity holds for the inputs the *compressed* model feeds it (sequential order)."""
    model = tiny_llama().double()
    original = copy.deepcopy(model)
    batches = token_batches(4)
    model, report = compress(model, "svd-llm", batches, ratio=0.5)
    assert report.extra["calibration_order"] == "sequential"
    name = "model.layers.1.self_attn.q_proj"
    rows = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: rows.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        for ids in batches:
            model(ids)
    handle.remove()
    X = torch.cat(rows)
    W = original.get_submodule(name).weight.detach()
    k = report.layers[name]["rank"]
    sigma = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))
    assert output_error(model.get_submodule(name).weight.detach(), W, X) == pytest.approx(
        float((sigma[k:] ** 2).sum()), rel=1e-6)


@pytest.mark.parametrize("method", ["svd-llm", "asvd"])
def test_llama_and_bert_compress_save_reload(method, tmp_path):
    llama, batches = tiny_llama(), token_batches(4)
    llama, report = compress(llama, method, batches, ratio=0.5)
    assert 0.4 < report.compressed_ratio <= 0.5 and len(report.layers) == 14
    assert "lm_head" not in " ".join(report.layers) and "embed" not in " ".join(report.layers)
    save_compressed(llama, tmp_path / "llama", method=method)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "llama").eval()(batches[0]).logits,
                                   llama(batches[0]).logits, atol=1e-5, rtol=1e-5)
    bert, dicts = tiny_bert(), padded_batches()
    bert, report = compress(bert, method, dicts, ratio=0.6)
    assert report.compressed_ratio <= 0.6 and len(report.layers) == 12 and "pooler" not in " ".join(report.layers)
    save_compressed(bert, tmp_path / "bert", method=method)
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "bert").eval()(**dicts[0]).last_hidden_state,
                                   bert(**dicts[0]).last_hidden_state, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, options, field", [
    ("svd-llm", {"damping": -1.0}, "damping"), ("svd-llm", {"damping": 2}, "damping"),
    ("asvd", {"alpha": -0.5}, "alpha"), ("asvd", {"alpha": "half"}, "alpha"), ("asvd", {"ratio": 0}, "ratio"),
])
def test_bad_options_name_the_field(method, options, field):
    with pytest.raises(ConfigError, match=field):
        compress(tiny_llama(), method, token_batches(1), **options)


def test_calibration_is_required():
    from rankwise.core.errors import ShapeError

    with pytest.raises(ShapeError, match="calibration"):
        compress(tiny_llama(), "svd-llm", None, ratio=0.5)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svd-llm", "asvd"])
def test_cli_compress_reports_saves_and_reloads_equal_logits(method, tiny_llama_dir, tmp_path):
    from llm_fixtures import TRAINING_SENTENCES

    from rankwise.compress.commands import build_batches, load_model_and_tokenizer

    text = tmp_path / "text.txt"
    text.write_text(" ".join(TRAINING_SENTENCES * 30), encoding="utf-8")
    out = tmp_path / "out"
    args = ["compress", str(tiny_llama_dir), "--method", method, "--ratio", "0.6", "--calibration", str(text),
            "--samples", "8", "--eval-samples", "4", "--seq-len", "16", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["compressed_ratio"] <= 0.6 and report["params_after"] < report["params_before"]
    assert report["quality"]["after"]["perplexity"] > 0 and report["extra"]["calibration_order"] == "sequential"
    kinds = [spec["kind"] for spec in json.loads((out / "compression.json").read_text())["modules"].values()]
    assert kinds.count("low_rank") == 14  # q, k, v, o, gate, up, down in each of the 2 blocks
    # the same compression in Python, on the batches the CLI built, gives the logits of the reloaded directory
    net, tokenizer, causal = load_model_and_tokenizer(str(tiny_llama_dir), "cpu")
    cal, held_out = build_batches(str(text), tokenizer, causal, 8, 4, 16)
    net, _ = compress(net, method, cal, ratio=0.6)
    reloaded = load_compressed(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(held_out[0]).logits, net(held_out[0]).logits, atol=1e-5, rtol=1e-5)
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--option",
                              "damping=-1" if method == "svd-llm" else "alpha=-1"])
    assert bad.exit_code == 2 and ("damping" if method == "svd-llm" else "alpha") in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "bad").exists()
