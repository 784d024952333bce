"""`rankwise bench arena --quick`: the head-only baseline and every registered method (and PEFT's twin) get a
complete row; failures are recorded, not fatal; finished contenders are not re-run."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import rankwise
from rankwise.arena import (COLUMNS, HEAD_ONLY, QUICK, ArenaSpec, build_task, contenders, markdown_table, measure_costs,
                            result_path, train_and_select)
from rankwise.cli import app
from rankwise.core import registry

from test_convert import DenseAdapter

runner = CliRunner()
WORDS = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    rng = random.Random(0)
    lines = ["text,label"]
    for _ in range(200):
        label = rng.choice(["pos", "neg"])
        lines.append(f"the food was {rng.choice(WORDS[label])} today,{label}")
    path = tmp_path_factory.mktemp("arena-data") / "tiny.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _complete(row: dict) -> bool:
    merge = row.get("merge_ms") is not None or "merge_error" in row or row["implementation"] == "baseline"  # nothing to merge
    return all(row.get(c) is not None for c in COLUMNS if c not in ("merge_ms", "latency_merged_ms")) and merge


def test_quick_arena_table_is_complete(tiny_csv, tmp_path):
    result = runner.invoke(app, ["bench", "arena", "--quick", "--data", str(tiny_csv), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "arena.json").read_text())
    rows = {r["contender"]: r for r in payload["results"]}
    expected = contenders(ArenaSpec())
    assert sorted(rows) == sorted(expected)
    assert payload["results"][0]["contender"] == HEAD_ONLY  # the baseline leads the table
    assert "lora" in rows and "peft-lora" in rows  # PEFT's twin where PEFT has the method
    failed = {name: r["error"] for name, r in rows.items() if "error" in r}
    assert not failed, f"contenders failed in the arena: {failed}"
    for name, row in rows.items():
        assert _complete(row), (name, row)
        assert 0 <= row["accuracy"] <= 1 and row["trainable"] > 0 and row["step_x_floor"] > 0 and row["train_memory_mb"] > 0
    # Same rank, same targets: rankwise and PEFT LoRA train the same number of parameters.
    assert rows["lora"]["trainable"] == rows["peft-lora"]["trainable"]
    for png in ("accuracy_vs_params.png", "accuracy_vs_step_time.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert markdown_table(payload["results"]).count("\n") == len(expected) + 1
    # The baseline's file holds exactly the head tensors every adapter file holds.
    head_file = load_file(str(tmp_path / "adapters" / HEAD_ONLY / "adapter_model.safetensors"))
    lora_file = load_file(str(tmp_path / "adapters" / "lora" / "adapter_model.safetensors"))
    assert set(head_file) == {k for k in lora_file if ".classifier." in k}
    assert sum(t.numel() for t in head_file.values()) == rows[HEAD_ONLY]["trainable"]
    assert rows[HEAD_ONLY]["merge_ms"] is None and rows[HEAD_ONLY]["latency_merged_ms"] is None


@dataclasses.dataclass
class BrokenConfig(rankwise.AdapterConfig):
    rank_field = None


class BrokenAdapter(DenseAdapter):
    def forward(self, x, base_out, layer):
        raise RuntimeError("broken on purpose")


def test_failures_are_recorded_and_finished_contenders_resume(tiny_csv, tmp_path):
    registry.register("broken-test", adapter=BrokenAdapter, family="test", paper="none")(BrokenConfig)
    try:
        args = ["bench", "arena", "--quick", "--data", str(tiny_csv), "--output", str(tmp_path),
                "--methods", "lora,broken-test", "--no-peft"]
        first = runner.invoke(app, args)
        assert first.exit_code == 0, first.output
        rows = {r["contender"]: r for r in json.loads((tmp_path / "arena.json").read_text())["results"]}
        assert "broken on purpose" in rows["broken-test"]["error"] and _complete(rows["lora"])
        stamp = result_path(tmp_path, "lora").stat().st_mtime_ns
        second = runner.invoke(app, args)
        assert second.exit_code == 0, second.output
        assert "resuming: 1 finished" in second.output
        assert result_path(tmp_path, "lora").stat().st_mtime_ns == stamp  # not re-run
    finally:
        registry._REGISTRY.pop("broken-test", None)


def test_bad_arena_options_are_clear_errors(tmp_path):
    result = runner.invoke(app, ["bench", "arena", "--quick", "--methods", "nosuch", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "unknown method 'nosuch'" in result.output


def test_head_baseline_trains_only_the_head(tiny_csv, tmp_path):
    assert contenders(ArenaSpec())[0] == HEAD_ONLY
    assert HEAD_ONLY not in contenders(ArenaSpec(methods=["lora"]))  # a subset without `head` leaves it out
    spec = ArenaSpec(**QUICK, data_path=str(tiny_csv), methods=[HEAD_ONLY])
    assert contenders(spec) == [HEAD_ONLY]
    task = build_task(spec)
    head = {n: p.numel() for n, p in task.base.named_parameters() if n.split(".")[0] in task.head}
    assert head
    model, _ = train_and_select(HEAD_ONLY, task, spec, on_step=lambda: None)
    pristine = dict(task.base.named_parameters())
    changed = {n for n, p in model.model.named_parameters() if not torch.equal(p, pristine[n])}
    assert changed == set(head)  # the head moved, the encoder did not
    costs = measure_costs(model, task, spec, tmp_path / HEAD_ONLY)
    assert costs["trainable"] == sum(head.values())
    assert costs["merge_ms"] is None and costs["latency_unmerged_ms"] > 0 and costs["step_x_floor"] > 0


def test_randlora_trains_at_the_grid_rate_with_pefts_scale(tiny_csv):
    from rankwise.arena import build_contender
    from rankwise.arena.measure import _param_groups

    spec = ArenaSpec(**QUICK, data_path=str(tiny_csv))
    task = build_task(spec)
    for name in ("randlora", "peft-randlora"):
        model, _, config = build_contender(name, task, spec)
        assert config.randlora_alpha == 20 * spec.rank  # the scale stays PEFT's 20 whatever the rank
        groups = _param_groups(model, 1e-2)
        assert {g.get("lr", 1e-2) for g in groups} == {1e-2}  # one rate for adapter and head alike
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_device_flag(tiny_csv, tmp_path):
    """--device cuda without CUDA: exit 2 with the clear message; --device cpu runs (and keeps CPU result keys)."""
    args = ["bench", "arena", "--quick", "--data", str(tiny_csv), "--methods", "lora", "--no-peft"]
    if not torch.cuda.is_available():
        result = runner.invoke(app, [*args, "--output", str(tmp_path / "gpu"), "--device", "cuda"])
        assert result.exit_code == 2 and "CUDA is not available" in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "gpu").exists()
    result = runner.invoke(app, [*args, "--output", str(tmp_path / "cpu"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    record = json.loads(result_path(tmp_path / "cpu", "lora").read_text())
    assert "error" not in record and "device" not in record["spec"]
