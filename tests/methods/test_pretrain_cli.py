"""`rankwise pretrain` / `rankwise welore` end to end on a tiny generated corpus (no apt data needed)."""
import json
import random

import pytest
from typer.testing import CliRunner

from rankwise.cli import app
from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.pretrain.recipe import PretrainConfig, load_run

TINY = ["--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--intermediate-size", "64",
        "--seq-len", "32", "--batch-size", "4", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the king said unto river stone light water and of to in was he they".split()
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(300)))
    return path


def _pretrain(corpus, out, *extra):
    result = CliRunner().invoke(app, ["pretrain", "--corpus", str(corpus), "--out", str(out), *TINY, *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["full", "galore", "dct", "sltrain", "lost"])
def test_every_method_trains_and_writes_its_files(method, corpus, tmp_path):
    metrics = _pretrain(corpus, tmp_path, "--method", method, "--steps", "6", "--eval-every", "3", "--rank", "8")
    # LOST (SiLU in its factors) is no Llama: factors only; the others are transformers dirs (SLTrain merged)
    weights = "pretrain_factors.safetensors" if method == "lost" else "model.safetensors"
    assert (tmp_path / weights).stat().st_size > 0 and (tmp_path / "config.json").is_file()
    assert (tmp_path / "pretrain_factors.safetensors").exists() == (method in ("sltrain", "lost"))
    assert (tmp_path / "val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    assert [point["step"] for point in metrics["val_curve"]] == [3, 6]
    assert metrics["method"] == method and metrics["tokens"] == 6 * 4 * 32
    if method in ("galore", "dct"):  # projected state on attention/MLP weights well below AdamW's 2 x params
        assert metrics["projected_matrices_state_bytes"] < 0.6 * 2 * 4 * metrics["attn_mlp_params"]
    if method in ("sltrain", "lost"):
        assert metrics["attn_mlp_params"] < 20480  # fewer than the dense layers' parameters


def test_full_pretraining_learns_the_corpus(corpus, tmp_path):
    metrics = _pretrain(corpus, tmp_path, "--method", "full", "--steps", "40", "--eval-every", "10")
    curve = [point["val_ppl"] for point in metrics["val_curve"]]
    assert curve[-1] < 0.5 * curve[0]


def test_galore_per_layer_run_and_welore_on_it(corpus, tmp_path):
    run = tmp_path / "run"
    _pretrain(corpus, run, "--method", "galore", "--steps", "6", "--eval-every", "6", "--rank", "8", "--per-layer")
    result = CliRunner().invoke(app, ["welore", str(run), "--finetune-steps", "2", "--sweep", "0.5"])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "welore" / "welore_report.json").read_text())
    assert set(report["sweep"][0]["kept_ranks"]) == {name for name in report["finetune"]["layers"]}
    assert len(report["finetune"]["losses"]) == (2 if report["finetune"]["trainable_params"] else 0)
    assert (run / "welore" / "welore_tradeoff.png").exists()


def test_bad_inputs_give_clear_errors(corpus, tmp_path):
    result = CliRunner().invoke(app, ["pretrain", "--method", "lora", "--corpus", str(corpus), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "method" in result.output
    result = CliRunner().invoke(app, ["pretrain", "--corpus", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    # rich wraps the message at the terminal width, and the tmp path's length varies (xdist: popen-gwN)
    assert result.exit_code == 2 and "existing text file" in " ".join(result.output.split())
    with pytest.raises(ConfigError, match="per_layer"):
        PretrainConfig(method="sltrain", per_layer=True)
    run = tmp_path / "run"
    _pretrain(corpus, run, "--steps", "2", "--eval-every", "2")
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated file
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_run(run)


def test_error_messages_stay_whole_whatever_the_path_length(tmp_path):
    # rich used to hard-wrap at 80 columns, so a phrase of the message split across lines depending on
    # how long the tmp path was (pytest -n 2 adds "popen-gwN/"); brackets in a path were eaten as markup
    for length in range(1, 41):
        missing = tmp_path / ("d" * length) / "missing[1].txt"
        result = CliRunner().invoke(app, ["pretrain", "--corpus", str(missing), "--out", str(tmp_path)],
                                    env={"COLUMNS": "80"})
        assert result.exit_code == 2
        assert f"corpus={str(missing)!r} is neither" in result.output
        assert "nor an existing text file" in result.output


def test_dct_paper_preset_error_feedback_and_per_layer_clipping_from_the_cli(corpus, tmp_path):
    from rankwise.pretrain.recipe import build_model, build_optimizer

    config = PretrainConfig(method="dct", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            dct_preset="paper", dct_error_feedback=True)
    groups = [g for g in build_optimizer(build_model(config), config).param_groups if "rank" in g]
    assert groups and all(g["update_proj_gap"] == 1 and not g["stable_slots"] and g["use_ef"] for g in groups)
    with pytest.raises(ConfigError, match="dct_preset"):
        PretrainConfig(method="dct", dct_preset="fast")
    metrics = _pretrain(corpus, tmp_path / "dct", "--method", "dct", "--dct-preset", "paper", "--dct-error-feedback",
                        "--per-layer", "--steps", "3", "--eval-every", "3")
    assert metrics["final_val_ppl"] > 0


def test_device_flag(corpus, tmp_path):
    """--device cuda without CUDA is a clear exit-2 error before any data is read; --device cpu trains."""
    import torch

    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "gpu"), *TINY,
                                          "--steps", "2", "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gpu").exists()
    metrics = _pretrain(corpus, tmp_path / "cpu", "--steps", "2", "--eval-every", "2", "--device", "cpu")
    assert metrics["tokens"] == 2 * 4 * 32
