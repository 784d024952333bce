"""Post-training compressors: `compress(model, config, calibration) -> (model, report)`, one file per method.

`METHODS` maps the CLI name to `(config class, compress function)`; `load_compressed` reloads a
saved compressed model.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable

from rankwise.compress._common import CompressConfig, CompressionReport, LowRankLinear
from rankwise.compress.serialize import load_compressed, save_compressed

# name -> module holding `<Name>Config` and `compress`; imported lazily so one broken method never hides the others
_METHOD_MODULES = {
    "svd": ("rankwise.compress.svd", "SVDConfig"),
    "svd-llm": ("rankwise.compress.svd_llm", "SVDLLMConfig"),
    "asvd": ("rankwise.compress.asvd", "ASVDConfig"),
    "lord": ("rankwise.compress.lord", "LordConfig"),
    "modegpt": ("rankwise.compress.modegpt", "ModeGPTConfig"),
    "afm": ("rankwise.compress.afm", "AFMConfig"),
    "pela": ("rankwise.compress.pela", "PelaConfig"),
    "loram": ("rankwise.compress.loram", "LoramConfig"),
}


def available_methods() -> list[str]:
    return [name for name, (module, _) in _METHOD_MODULES.items() if importlib.util.find_spec(module) is not None]


def get_method(name: str) -> tuple[type[CompressConfig], Callable]:
    """`(config class, compress function)` of a method; `ConfigError` lists the choices for an unknown name."""
    from rankwise.core.errors import ConfigError

    if name not in _METHOD_MODULES or name not in available_methods():
        raise ConfigError(f"unknown compression method {name!r}: choose one of {', '.join(available_methods())}")
    module_name, config_name = _METHOD_MODULES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), module.compress


def compress(model, method: str, calibration=None, **options):
    """`rankwise.compress.compress(model, "modegpt", calibration, ratio=0.7)`: build the config and run it."""
    config_cls, run = get_method(method)
    return run(model, config_cls(**options), calibration)


__all__ = ["CompressConfig", "CompressionReport", "LowRankLinear", "available_methods", "compress", "get_method",
           "load_compressed", "save_compressed"]
