"""Data-parallel training (rankwise.train.distributed): 2 processes x batch b == 1 process x batch 2b."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dist_workers import CONFIGS, data_parallel_worker, run
from text_task import write_sentiment_csv, write_tiny_classifier
from rankwise.cli import app
from rankwise.core.errors import ConfigError
from rankwise.train.distributed import DataParallel, DistributedError, check_nproc, launch, shard_rows

# Float reduction order differs (rows split over ranks, gradients summed across ranks), nothing else:
# the adapter after 6 AdamW steps agrees to this absolute tolerance (observed differences are ~1e-7).
ATOL = 1e-5


@contextlib.contextmanager
def one_launch_at_a_time():
    """Serialise multi-process launches across pytest-xdist workers: two gloo groups starting at once on a
    2-core machine sometimes aborted a worker (SIGABRT during set-up) in a clean-clone CI run."""
    with open(os.path.join(tempfile.gettempdir(), "rankwise-test-distributed.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def test_shards_cover_the_batch_and_weights_give_the_global_mean():
    batch = {"x": torch.arange(10).view(5, 2), "y": torch.arange(5), "name": "kept"}
    parts = [shard_rows(batch, r, 2) for r in range(2)]
    assert [n for _, n, _ in parts] == [2, 3] and all(total == 5 for _, _, total in parts)
    assert torch.equal(torch.cat([p["y"] for p, _, _ in parts]), batch["y"]) and parts[1][0]["name"] == "kept"
    # weights n_r * world / N average to 1 over the ranks: mean_r(w_r * mean loss_r) = global mean loss
    weights = [DataParallel(r, 2).shard(batch)[1] for r in range(2)]
    assert weights == [0.8, 1.2]
    x = torch.randn(5)
    assert torch.allclose(sum(w * x[p["y"]].mean() for w, (p, _, _) in zip(weights, parts)) / 2, x.mean())
    # more ranks than rows: the empty rank computes on one row with weight 0
    local, n, total = shard_rows((torch.ones(1, 3), torch.zeros(1)), 0, 2)
    assert n == 0 and total == 1 and local[0].shape == (1, 3)
    assert [DataParallel(r, 2).shard((torch.ones(1, 3), torch.zeros(1)))[1] for r in range(2)] == [0.0, 2.0]
    with pytest.raises(ConfigError, match="different leading sizes"):
        shard_rows({"a": torch.ones(4), "b": torch.ones(3)}, 0, 2)


def test_nproc_is_checked():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ConfigError, match="nproc"):
            check_nproc(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CPU core"):
            check_nproc((os.cpu_count() or 1) + 1)
    assert check_nproc(1) == 1


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    with one_launch_at_a_time():
        launch(data_parallel_worker, 2, args=(str(out),), threads=1)
    return out


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(two_process_run, config_name):
    single, single_losses = run(config_name)
    ranks = [load_file(str(two_process_run / f"{config_name}-rank{r}.safetensors")) for r in range(2)]
    assert set(ranks[0]) == set(single) and any("lora_A" in k for k in single) and any("classifier" in k for k in single)
    assert {k: v.shape for k, v in ranks[0].items()} == {k: v.shape for k, v in single.items()}  # IncreLoRA grew alike
    for key, tensor in single.items():
        # the ranks hold bitwise the same weights (same averaged gradient, same optimizer)
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        torch.testing.assert_close(ranks[0][key], tensor, rtol=0, atol=ATOL, msg=key)
    losses = json.loads((two_process_run / f"{config_name}-losses.json").read_text())
    assert len(losses) == len(single_losses) and losses == pytest.approx(single_losses, abs=1e-5)


def test_equality_is_not_vacuous():
    """Training moves the adapter far more than ATOL, and one process on half the batch lands elsewhere."""
    from dist_workers import tiny_bert, trainable_state

    start = trainable_state(tiny_bert())
    trained, _ = run("plain")
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert moved > 100 * ATOL


def test_a_failing_worker_is_reported():
    with one_launch_at_a_time(), pytest.raises(DistributedError, match="training process .* failed: .*No such file"):
        launch(data_parallel_worker, 2, args=("/nonexistent/dir/for/sure",), threads=1)


def test_ranks_with_different_adapters_refuse_to_reduce():
    from dist_workers import mismatched_worker

    with one_launch_at_a_time(), pytest.raises(DistributedError, match="trainable tensors differ"):
        launch(mismatched_worker, 2, threads=1)


# ---- the CLI ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return write_tiny_classifier(tmp_path_factory.mktemp("tiny-bert-nodropout"), dropout=0.0, seed=0)


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "sentiment.csv")


def _text(result) -> str:
    return " ".join(result.output.split())


def test_cli_rejects_nonsense_nproc(tiny_model_dir, sentiment_csv, tmp_path):
    base = ["finetune", "--data", str(sentiment_csv), "--model", str(tiny_model_dir), "--output", str(tmp_path)]
    result = CliRunner().invoke(app, [*base, "--nproc", "0"])
    assert result.exit_code == 2 and "--nproc=0 is invalid" in _text(result)
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, [*base, "--nproc", str((os.cpu_count() or 1) + 1)])
        assert result.exit_code == 2 and "CPU core" in _text(result)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_cli_nproc_2_matches_nproc_1(tiny_model_dir, sentiment_csv, tmp_path):
    args = ["finetune", "--method", "lora", "--rank", "4", "--targets", "query,value", "--epochs", "6", "--lr", "1e-2",
            "--batch-size", "16", "--train-size", "300", "--test-size", "80", "--data", str(sentiment_csv),
            "--model", str(tiny_model_dir), "--option", "lora_alpha=8", "--threads", "1"]
    one = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "one")])
    with one_launch_at_a_time():
        two = CliRunner().invoke(app, [*args, "--output", str(tmp_path / "two"), "--nproc", "2"])
    assert one.exit_code == 0, one.output
    assert two.exit_code == 0, two.output
    assert "on 2 processes (gloo)" in _text(two) and "fine-tuned (after)" in _text(two)  # rank 0's report, once
    assert _text(two).count("fine-tuned (after)") == 1
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["after"]["accuracy"] == pytest.approx(m1["after"]["accuracy"], abs=1 / 80)
    assert m2["after"]["accuracy"] >= 0.9 > m2["before"]["accuracy"]
    w1, w2 = (load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert set(w1) == set(w2)
    for key in w1:
        torch.testing.assert_close(w2[key], w1[key], rtol=0, atol=ATOL, msg=key)
    assert [p.name for p in (tmp_path / "two").iterdir()] and not list((tmp_path / "two").glob("*rank*"))
