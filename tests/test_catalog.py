"""Issue 20 item 11: `rankwise methods` lists every method of every family, built from the code."""
from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

from typer.testing import CliRunner

import rankwise
from rankwise.cli import app
from rankwise.core.catalog import FAMILIES, PACKAGE_FAMILIES, catalog, method_modules

runner = CliRunner()
ROOT = Path(rankwise.__file__).parent

# Modules of the method packages that implement no method of their own (infrastructure a reviewer can check).
INFRASTRUCTURE = {
    "rankwise.pretrain.recipe", "rankwise.pretrain.replace", "rankwise.pretrain.welore_run",
    "rankwise.compress.evaluate", "rankwise.compress.serialize", "rankwise.compress.pruned_attention",
    "rankwise.federated.base", "rankwise.federated.partition", "rankwise.federated.report",
    "rankwise.federated.simulation", "rankwise.federated.task", "rankwise.federated.encoder_task",
    "rankwise.federated.deployment",
    "rankwise.solvers.result", "rankwise.layers.s4d_demo",
}
TRAIN_INFRASTRUCTURE = {"checkpoint", "distributed", "finetune", "hf", "loop", "lora_tools", "procedures", "reporting"}


def test_every_method_module_appears_in_the_catalog():
    listed = {entry.module for entry in catalog()}
    for package in PACKAGE_FAMILIES:
        for module in method_modules(package):
            if module in INFRASTRUCTURE:
                assert not getattr(importlib.import_module(module), "CATALOG", ()), f"{module} is listed as infrastructure"
                continue
            assert module in listed, f"{module} implements a method but has no CATALOG entry"
    for path in (ROOT / "adapters").glob("*.py"):
        if path.stem not in ("__init__", "commands"):
            assert f"rankwise.adapters.{path.stem}" in listed, f"adapters/{path.name} registers no method"
    for path in (ROOT / "train").glob("*.py"):
        if path.stem != "__init__" and path.stem not in TRAIN_INFRASTRUCTURE:
            assert f"rankwise.train.{path.stem}" in listed, f"train/{path.name} is not in PROCEDURES"


def test_catalog_entries_are_complete():
    entries = catalog()
    assert {e.family for e in entries} == set(FAMILIES)
    names = [(e.family, e.name) for e in entries]
    assert len(names) == len(set(names))
    for e in entries:
        assert e.runs.startswith("rankwise"), e
        assert e.paper == "" and e.name == "svd" or re.fullmatch(r"\d{4}\.\d{4,5}", e.paper), e
        # the paper id is cited in the file that implements the method
        if e.paper:
            assert e.paper in Path(importlib.import_module(e.module).__file__).read_text(), e


def test_methods_lists_every_family_with_paper_and_command():
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for needle in ("galore", "2403.03507", "lora-fair", "increlora", "s4d", "modegpt", "subgm", "mnn", "sltrain",
                   "rankwise federate --strategy stacking", "rankwise finetune --procedure trp"):
        assert needle in result.output, needle


def test_methods_json_and_family_filter():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    everything = json.loads(result.output)
    assert len(everything) == len(catalog()) and {"family", "name", "paper", "runs"} <= set(everything[0])
    result = runner.invoke(app, ["methods", "--family", "optimizers", "--json"])
    optimizers = json.loads(result.output)
    assert {e["name"] for e in optimizers} == {"galore", "dct-adamw", "riemannian-adamw"} and {e["family"] for e in optimizers} == {"optimizer"}
    assert {e["name"] for e in everything if e["family"] == "adapter"} == {m.name for m in rankwise.list_methods()}


def test_unknown_family_is_a_clear_error():
    result = runner.invoke(app, ["methods", "--family", "nosuch"])
    assert result.exit_code == 2 and "unknown method family" in result.output and "Traceback" not in result.output
