"""Peers used as references by the benches and the equality tests (never by the library)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def galore_torch_adamw():
    """`galore_torch.adamw.AdamW` from the `galore-torch` package, or None if it is not installed.

    The package's `__init__` imports its 8-bit optimizer, which needs bitsandbytes (not installed:
    galore-torch is installed with --no-deps). We import only the `adamw` submodule by registering
    an empty package object for `galore_torch` first.
    """
    if "galore_torch" not in sys.modules:
        spec = importlib.util.find_spec("galore_torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        package = types.ModuleType("galore_torch")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["galore_torch"] = package
    return importlib.import_module("galore_torch.adamw").AdamW
