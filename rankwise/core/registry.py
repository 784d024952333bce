"""The method registry: the CLI, the loader and the generic tests discover methods only through it."""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass

from rankwise.core.errors import ConfigError


@dataclass(frozen=True)
class MethodInfo:
    name: str            # registry key, e.g. "lora"
    config_cls: type     # the AdapterConfig subclass
    adapter_cls: type    # the Adapter subclass one config creates per layer
    family: str          # e.g. "low-rank", "random basis", "SVD re-factorisation"
    paper: str           # arXiv id of the paper the method comes from
    peft_type: str | None  # PEFT's PeftType value when PEFT has the method (files interoperate)


_REGISTRY: dict[str, MethodInfo] = {}


def register(name: str, *, adapter: type, family: str, paper: str, peft_type: str | None = None):
    """Class decorator for an `AdapterConfig` subclass: makes the method known to rankwise by `name`."""

    def decorate(config_cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name].config_cls.__qualname__ != config_cls.__qualname__:
            raise ConfigError(f"method name {name!r} is registered twice ({_REGISTRY[name].config_cls} and {config_cls})")
        config_cls.method_name = name
        config_cls.peft_type = peft_type
        _REGISTRY[name] = MethodInfo(name, config_cls, adapter, family, paper, peft_type)
        return config_cls

    return decorate


def get_method(name: str) -> MethodInfo:
    key = name.lower().replace("_", "-")
    for candidate in (name, key, key.replace("-", "")):
        if candidate in _REGISTRY:
            return _REGISTRY[candidate]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(_REGISTRY))}.")


def method_for_peft_type(peft_type: str) -> MethodInfo | None:
    for info in _REGISTRY.values():
        if info.peft_type == peft_type:
            return info
    return None


def list_methods() -> list[MethodInfo]:
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def load_builtin_methods() -> None:
    """Import every module of `rankwise.adapters` so that each registers itself."""
    import rankwise.adapters as package

    for module in pkgutil.iter_modules(package.__path__):
        if not module.name.startswith("_") and module.name != "commands":
            importlib.import_module(f"{package.__name__}.{module.name}")
