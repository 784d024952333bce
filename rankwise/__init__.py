"""rankwise: low-rank deep learning behind one API.

    import rankwise
    model = rankwise.adapt(base, rankwise.LoraConfig(r=8, target_modules=["query", "value"]))
    model.save_adapter("out/")
    model = rankwise.load_adapter(base, "out/")

Every registered method's config class is exported here (`LoraConfig`, ...).
"""
__version__ = "0.1.0"

from rankwise.core.adapter import Adapter  # noqa: E402,F401
from rankwise.core.config import AdapterConfig  # noqa: E402,F401
from rankwise.core.errors import (  # noqa: E402,F401
    AdapterStateError,
    CheckpointError,
    ConfigError,
    MergeError,
    RankwiseError,
    ShapeError,
    TargetError,
)
from rankwise.core.io import load_adapter  # noqa: E402,F401
from rankwise.core.model import AdaptedModel, adapt  # noqa: E402,F401
from rankwise.core.registry import get_method, list_methods, load_builtin_methods, register  # noqa: E402,F401
from rankwise.quant import QuantReport, merge_and_requantize, quantize_base  # noqa: E402,F401

load_builtin_methods()
globals().update({info.config_cls.__name__: info.config_cls for info in list_methods()})
