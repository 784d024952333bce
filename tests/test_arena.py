"""`rankwise bench arena --quick`: every registered method (and PEFT's twin) gets a complete row; failures are
recorded, not fatal; finished contenders are not re-run."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
from typer.testing import CliRunner

import rankwise
from rankwise.arena import COLUMNS, ArenaSpec, contenders, markdown_table, result_path
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
    return all(row.get(c) is not None for c in COLUMNS if c not in ("merge_ms", "latency_merged_ms")) and (
        row.get("merge_ms") is not None or "merge_error" in row)


def test_quick_arena_table_is_complete(tiny_csv, tmp_path):
    result = runner.invoke(app, ["bench", "arena", "--quick", "--data", str(tiny_csv), "--output", str(tmp_path)])
    assert result.exit_code == 0, result.output
    payload = json.loads((tmp_path / "arena.json").read_text())
    rows = {r["contender"]: r for r in payload["results"]}
    expected = contenders(ArenaSpec())
    assert sorted(rows) == sorted(expected)
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


def test_adapter_lr_scale_leaves_the_head_at_the_grid_rate(tiny_csv):
    from rankwise.arena import QUICK, _param_groups, build_contender, build_task

    spec = ArenaSpec(**QUICK, data_path=str(tiny_csv))
    task = build_task(spec)
    for name in ("randlora", "peft-randlora"):
        model, _, config = build_contender(name, task, spec)
        assert config.randlora_alpha == 20 * spec.rank  # the scale stays PEFT's 20 whatever the rank
        groups = _param_groups(model, 1e-2, task.head, 0.1)
        names = {id(p): n for n, p in model.named_parameters()}
        by_lr = {g["lr"]: [names[id(p)] for p in g["params"]] for g in groups}
        assert sorted(by_lr) == [pytest.approx(1e-3), 1e-2]
        assert all("classifier" in n for n in by_lr[1e-2]) and len(by_lr[1e-2]) == 2
        assert not any("classifier" in n for g, ns in by_lr.items() if g != 1e-2 for n in ns)
        assert sum(map(len, by_lr.values())) == sum(p.requires_grad for p in model.parameters())
