"""One catalog of every method rankwise implements, built from the code (no second, hand-typed list).

    adapters     the registry (`@register`)                    runs: rankwise finetune --method NAME
    procedures   `rankwise.train.procedures.PROCEDURES`         runs: rankwise finetune --procedure NAME
    the rest     a module-level `CATALOG` tuple in each method file of optim/, pretrain/, compress/,
                 federated/, solvers/, analysis/, layers/ ({"name", "paper", "runs", "summary"})

`rankwise methods [--family NAME] [--json]` prints it; `tests/test_catalog.py` checks every method file appears.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import asdict, dataclass

from rankwise.core.errors import ConfigError

# package -> family name shown in the catalog (order = display order)
PACKAGE_FAMILIES = {
    "rankwise.optim": "optimizer",
    "rankwise.pretrain": "pretraining",
    "rankwise.compress": "compressor",
    "rankwise.federated": "federated",
    "rankwise.solvers": "solver",
    "rankwise.analysis": "analysis",
    "rankwise.layers": "layer",
}
FAMILIES = ("adapter", "procedure", *PACKAGE_FAMILIES.values())


@dataclass(frozen=True)
class CatalogEntry:
    family: str    # one of FAMILIES
    name: str      # what the command or API calls it
    paper: str     # arXiv id ("" for a baseline without a paper)
    runs: str      # the command and/or Python API that runs it
    summary: str   # one line; for adapters the registry's kind (e.g. "random basis")
    module: str    # the file that implements it

    def to_dict(self) -> dict:
        return asdict(self)


def method_modules(package: str) -> list[str]:
    """Every public module of `package` (not `_private`, not the CLI `commands`)."""
    pkg = importlib.import_module(package)
    return [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
            if not m.name.startswith("_") and m.name != "commands" and not m.ispkg]


def catalog() -> list[CatalogEntry]:
    import rankwise
    from rankwise.train.procedures import PROCEDURES

    entries = [
        CatalogEntry("adapter", info.name, info.paper,
                     f"rankwise finetune --method {info.name}; rankwise.{info.config_cls.__name__}",
                     info.family + (" (PEFT-compatible files)" if info.peft_type else ""), info.config_cls.__module__)
        for info in rankwise.list_methods()
    ]
    if any(e.name == "b4m" for e in entries):  # Break-for-Make's second stage is its own command
        entries = [e if e.name != "b4m" else CatalogEntry(**{**e.to_dict(), "runs": e.runs + "; rankwise compose"})
                   for e in entries]
    entries += [
        CatalogEntry("procedure", p.name, p.paper,
                     f"rankwise finetune --procedure {p.name}; build_procedure({p.name!r}, model) (rankwise.train.procedures)",
                     p.summary, p.cls_path.partition(":")[0])
        for p in PROCEDURES.values()
    ]
    for package, family in PACKAGE_FAMILIES.items():
        for module_name in method_modules(package):
            module = importlib.import_module(module_name)
            for item in getattr(module, "CATALOG", ()):
                entries.append(CatalogEntry(family, item["name"], item["paper"], item["runs"], item["summary"], module_name))
    return entries


def resolve_family(name: str) -> str:
    """'optimizers', 'Optimizer', 'opt' -> 'optimizer'; `ConfigError` listing the families otherwise."""
    key = name.strip().lower().rstrip("s")
    matches = [f for f in FAMILIES if f == key or f.startswith(key)] if key else []
    if len(matches) != 1:
        raise ConfigError(f"unknown method family {name!r}: choose one of {', '.join(FAMILIES)}")
    return matches[0]
