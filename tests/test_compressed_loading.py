"""Compressed and pretrained outputs load in plain transformers with equal outputs, or not at all (issue 19 #5).

Before format 2, `AutoModelForCausalLM.from_pretrained(<compress output>)` "loaded" with every factored layer
missing and randomly initialised behind a warning; a `rankwise pretrain` run was no transformers directory.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaForCausalLM,
                          logging)

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from _compress_models import tiny_bert, tiny_llama, token_batches  # noqa: E402

from rankwise.compress import available_methods, compress, load_compressed, save_compressed  # noqa: E402
from rankwise.compress.serialize import FORMAT_VERSION  # noqa: E402
from rankwise.core.errors import ConfigError  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "compressed_format1"
POINTER = "rankwise.compress.load_compressed"
AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    yield
    logging.set_verbosity(verbosity)


def _assert_equal_or_refused(directory: Path, reference: torch.Tensor, ids: torch.Tensor, pointer: str) -> str:
    """Plain transformers either reproduces the logits or refuses with the pointer: never random weights."""
    layout = None
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
    except ValueError as error:
        assert pointer in str(error), str(error)
        layout = "refused"
    else:
        with torch.no_grad():
            assert (loaded(ids).logits - reference).abs().max().item() < 1e-5
        layout = "loaded"
    if layout == "refused":
        for auto in AUTO_CLASSES:  # the message the user sees, whichever Auto class they try
            with pytest.raises(ValueError, match="load it with " + pointer.replace(".", r"\.")):
                auto.from_pretrained(str(directory))
        # a concrete class skips the model_type check: it must still fail, not load random weights
        with pytest.raises(OSError, match="model.safetensors"):
            LlamaForCausalLM.from_pretrained(str(directory))
    return layout


@pytest.mark.parametrize("method", available_methods())
def test_every_method_loads_equal_in_transformers_or_is_refused(method, tmp_path):
    model, _ = compress(tiny_llama(), method, token_batches(), ratio=0.5)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
    save_compressed(model, tmp_path / "out", {"ratio": 0.5}, method)
    meta = json.loads((tmp_path / "out" / "compression.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    layout = _assert_equal_or_refused(tmp_path / "out", reference, ids, POINTER)
    assert layout == ("loaded" if meta["layout"] == "transformers" else "refused")
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "out")(ids).logits, reference)

    # --save-dense: a transformers directory with the same outputs, or a ConfigError naming why not
    try:
        save_compressed(model, tmp_path / "dense", {"ratio": 0.5}, method, dense=True)
    except ConfigError as error:
        assert "--save-dense" in str(error)
        assert not (tmp_path / "dense").exists()
    else:
        assert _assert_equal_or_refused(tmp_path / "dense", reference, ids, POINTER) == "loaded"
        with torch.no_grad():
            assert (load_compressed(tmp_path / "dense")(ids).logits - reference).abs().max().item() < 1e-5


def test_svd_dense_mode_is_a_transformers_directory_and_factored_mode_is_smaller(tmp_path):
    model, _ = compress(tiny_llama(), "svd", token_batches(), ratio=0.3)
    factored = save_compressed(model, tmp_path / "factored", method="svd")
    dense = save_compressed(model, tmp_path / "dense", method="svd", dense=True)
    assert factored < dense  # the documented price of --save-dense
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))(ids).logits,
                                   model(ids).logits, atol=1e-5, rtol=0)


def test_encoder_compress_output_is_refused_by_automodel(tmp_path):
    model, _ = compress(tiny_bert(), "svd", token_batches(), ratio=0.5)
    save_compressed(model, tmp_path / "bert", method="svd")
    for auto in AUTO_CLASSES:
        with pytest.raises(ValueError, match=POINTER.replace(".", r"\.")):
            auto.from_pretrained(str(tmp_path / "bert"))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(tmp_path / "bert")(ids).last_hidden_state,
                                   model(ids).last_hidden_state)


def test_format_1_directory_written_by_the_previous_release_still_loads():
    meta = json.loads((FIXTURE / "compression.json").read_text())
    assert meta["format_version"] == 1  # written by the previous save_compressed, kept as a file
    expected = load_file(str(FIXTURE / "expected_logits.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(FIXTURE)(expected["input_ids"]).logits, expected["logits"])


def test_load_base_reads_compress_outputs_for_generate_and_finetune(tmp_path):
    from rankwise.data.models import load_base

    model, _ = compress(tiny_llama(), "svd", token_batches(), ratio=0.5)
    save_compressed(model, tmp_path / "out", method="svd")
    loaded, _ = load_base(tmp_path / "out", task="causal-lm", device="cpu", with_tokenizer=False)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ConfigError, match="load_compressed"):
        load_base(tmp_path / "out", task="classification", num_labels=2, device="cpu", with_tokenizer=False)


@pytest.mark.parametrize("method", ["full", "galore", "sltrain", "lost"])
def test_pretrain_output_loads_equal_in_transformers_or_is_refused(method, tmp_path):
    from rankwise.pretrain.recipe import PretrainConfig, build_model, load_run, save_run

    config = PretrainConfig(method=method, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48,
                            seq_len=16, rank=4)
    model = build_model(config).eval()
    with torch.no_grad():  # trained-looking weights: SLTrain's B starts at zero
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save_run(tmp_path / "run", model, config, {"val_curve": [{"tokens": 1, "val_ppl": 3.0}]})
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    layout = _assert_equal_or_refused(tmp_path / "run", reference, ids, "rankwise.pretrain.load_run")
    assert layout == ("refused" if method == "lost" else "loaded")  # LOST's SiLU factors are no Llama
    reloaded, _ = load_run(tmp_path / "run")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, reference)


def test_rankwise_commands_read_compress_outputs(tmp_path):
    """`rankwise eval mnn` reads a compressed dir through load_compressed; re-compressing one is a clear error."""
    from typer.testing import CliRunner

    from rankwise.analysis.mnn import load_base_model
    from rankwise.cli import app

    model, _ = compress(tiny_llama(), "svd", token_batches(), ratio=0.5)
    save_compressed(model, tmp_path / "out", method="svd")
    from rankwise.data.offline_assets import smollm2_dir
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(smollm2_dir())).save_pretrained(str(tmp_path / "out"))
    base, tokenizer = load_base_model(str(tmp_path / "out"))
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids=ids)[0], model.model(input_ids=ids)[0])
    result = CliRunner().invoke(app, ["compress", str(tmp_path / "out"), "--method", "svd", "--out",
                                      str(tmp_path / "again")])
    assert result.exit_code == 2 and "already a `rankwise compress` output" in " ".join(result.output.split())


@pytest.mark.slow
def test_generate_command_on_a_compress_output_replies_like_the_compressed_model(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig
    from typer.testing import CliRunner

    from rankwise.cli import app
    from rankwise.data.offline_assets import smollm2_dir
    from rankwise.generation import generate_replies

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir()))
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=False)).eval()
    model, _ = compress(llama, "svd", [torch.randint(0, 1000, (2, 16))], ratio=0.3)
    save_compressed(model, tmp_path / "out", method="svd")
    tokenizer.save_pretrained(str(tmp_path / "out"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    expected = generate_replies(model, tokenizer, [[{"role": "user", "content": "In the beginning"}]], max_new_tokens=6)[0]
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "out"), "--prompt", "In the beginning",
                                      "--max-new-tokens", "6", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == expected.strip()
