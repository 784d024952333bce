"""Swap selected `nn.Linear` layers of a model for another layer type (the pretraining/compression selector).

Every LLaMA-style method of the spec selects linears by a substring of the module name ('attn',
'mlp', 'attention'); embeddings and the LM head are never touched.
"""
from __future__ import annotations

from typing import Callable, Iterable

from torch import nn

from rankwise.core.errors import TargetError

DECODER_TARGETS = ("attn", "mlp", "attention")


def matching_linears(model: nn.Module, targets: Iterable[str] = DECODER_TARGETS,
                     exclude: Iterable[str] = ("lm_head", "embed")) -> list[tuple[str, nn.Linear]]:
    """`(name, module)` of every nn.Linear whose name contains a target and no excluded substring."""
    targets, exclude = tuple(targets), tuple(exclude)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and any(t in name for t in targets)
             and not any(e in name for e in exclude)]
    if not found:
        raise TargetError(f"no nn.Linear module name contains any of {targets}; pass targets naming the "
                          "attention/MLP modules of this model")
    return found


def replace_linears(model: nn.Module, factory: Callable[[str, nn.Linear], nn.Module],
                    targets: Iterable[str] = DECODER_TARGETS) -> list[str]:
    """Replace each matching linear by `factory(name, linear)` in place; returns the replaced names."""
    names = []
    for name, linear in matching_linears(model, targets):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, factory(name, linear))
        names.append(name)
    return names
