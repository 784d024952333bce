"""rankwise: low-rank deep learning behind one API."""
from rankwise.core.errors import (  # noqa: F401
    AdapterStateError,
    CheckpointError,
    ConfigError,
    RankwiseError,
    ShapeError,
    TargetError,
)

__version__ = "0.1.0"
