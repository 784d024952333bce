"""The training procedures by name, for `rankwise finetune --procedure NAME` and other front ends.

    proc = build_procedure("increlora", model, target_rank=4, init_warmup=50)   # options = the class's arguments
    train(model, ..., callbacks=[proc])
    summary = finish_procedure(proc, "runs/x")       # finalize, per-layer rank table + ranks.png where ranks change
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rankwise.core.errors import ConfigError


@dataclass(frozen=True)
class ProcedureInfo:
    name: str
    cls_path: str        # "module:Class"
    paper: str           # arXiv id
    summary: str
    needs: tuple[str, ...] = ()  # extra context the constructor takes: "val_batches", "loss_fn"

    def load(self):
        import importlib

        module, _, cls = self.cls_path.partition(":")
        return getattr(importlib.import_module(module), cls)


PROCEDURES = {p.name: p for p in (
    ProcedureInfo("allora", "rankwise.train.allora:ALLoRA", "2410.09692", "LoRA without dropout/scaling; row learning rate ~ 1/(row norm) (p=2)"),
    ProcedureInfo("ggpo", "rankwise.train.ggpo:GGPO", "2502.14538", "gradient- and weight-norm-guided random weight perturbation (v1)"),
    ProcedureInfo("increlora", "rankwise.train.increlora:IncreLoRA", "2308.12043", "ranks grow by importance under a total budget (E vector, reserves, restart warm-up)"),
    ProcedureInfo("triadapt", "rankwise.train.triadapt:TriAdaptLoRA", "2501.08008", "triangular core B C A grown on a linear threshold schedule"),
    ProcedureInfo("diffora", "rankwise.train.diffora:DiffoRA", "2502.08905", "learned module gates choose which modules keep LoRA",
                  ("val_batches", "loss_fn")),
    ProcedureInfo("maestro", "rankwise.train.maestro:Maestro", "2308.14929", "ordered dropout + full-pass self-distillation + progressive shrinking of LoRA ranks"),
    ProcedureInfo("trp", "rankwise.train.trp:TRP", "2004.14566", "dense training with periodic truncated-SVD projection + nuclear norm (NC/VH/ND)"),
)}


def get_procedure(name: str) -> ProcedureInfo:
    key = name.lower().replace("-", "").replace("_", "")
    aliases = {"loraggpo": "ggpo", "triadaptlora": "triadapt"}
    key = aliases.get(key, key)
    if key not in PROCEDURES:
        raise ConfigError(f"unknown procedure {name!r}; known: {', '.join(PROCEDURES)}")
    return PROCEDURES[key]


def build_procedure(name: str, model, *, val_batches=None, loss_fn=None, **options: Any):
    """Construct procedure `name` on `model`; unknown options raise `ConfigError` listing the known ones."""
    info = get_procedure(name)
    cls = info.load()
    parameters = inspect.signature(cls).parameters
    known = [p for p in parameters if p not in ("model", *info.needs)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"procedure {info.name!r} has no option(s) {unknown}; its options are {known}")
    context = {"val_batches": val_batches, "loss_fn": loss_fn}
    if info.name == "trp" and hasattr(model, "_rankwise_dense_targets") and "target_modules" not in options:
        options["target_modules"] = model._rankwise_dense_targets
    return cls(model, **{k: context[k] for k in info.needs}, **options)


def finish_procedure(procedure, output_dir: str | Path | None = None, console=None) -> dict[str, Any]:
    """End-of-training work: fold procedure-only tensors back into the adapter (`finalize`), print the
    per-layer rank table and save `ranks.png` (rank over training) for rank-changing procedures."""
    if hasattr(procedure, "finalize"):
        procedure.finalize()
    summary: dict[str, Any] = {"procedure": type(procedure).__name__}
    if hasattr(procedure, "report"):
        png = None
        if output_dir is not None and getattr(procedure, "rank_history", None):
            png = Path(output_dir) / "ranks.png"
        table = procedure.report(png) if png is not None else procedure.report()
        if console is not None:
            console.print(table)
        if png is not None:
            summary["ranks_png"] = str(png)
    if hasattr(procedure, "ranks"):
        summary["ranks"] = procedure.ranks()
    if hasattr(procedure, "settings"):  # choices whose default changed (ALLoRA's norm_power): explicit in the run's summary
        summary["settings"] = procedure.settings()
    if getattr(procedure, "kept", None) is not None:
        summary["kept_modules"] = list(procedure.kept)
    return summary


def dense_trainable(model, targets, head: list[str]):
    """For dense procedures (TRP): train the weights of the target Linear layers (and the head) in place;
    everything else stays frozen. `targets` use adapter-style names (suffixes)."""
    from torch import nn

    from rankwise.core.config import matches_module

    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and targets is not None and matches_module(n, targets)]
    if not names:
        raise ConfigError(f"no nn.Linear matches targets {targets!r}: TRP trains those layers' dense weights")
    for name in names:
        model.get_submodule(name).weight.requires_grad_(True)
    for name in head:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model._rankwise_dense_targets = names
    return model


def save_dense_low_rank(model, procedure, directory) -> dict[str, int]:
    """TRP's end: split the trained targets into low-rank factors (in place) and save them (`directory=None`:
    split only, as the non-writing ranks of a data-parallel run do)."""
    from rankwise.train.trp import decompose, save_low_rank

    schemes: dict[str, str] = {}
    ranks = decompose(model, list(procedure.layers), only_if_smaller=True, scheme=procedure.scheme, schemes=schemes)
    if directory is not None:
        save_low_rank(model, ranks, directory, schemes)
    return ranks
