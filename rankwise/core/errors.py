"""One exception hierarchy for the whole library.

Every message says what was wrong, where, and what to do about it.
"""
from __future__ import annotations


class RankwiseError(Exception):
    """Base class of every error rankwise raises on purpose."""


class ConfigError(RankwiseError, ValueError):
    """A configuration field has a bad value, or a config file has an unknown key."""


class TargetError(RankwiseError, ValueError):
    """`target_modules` matched nothing, or matched a layer type the method cannot adapt."""


class CheckpointError(RankwiseError, OSError):
    """An adapter/checkpoint file is missing, truncated, corrupted or belongs to another model."""


class ShapeError(RankwiseError, ValueError):
    """Tensor shapes do not fit together."""


class AdapterStateError(RankwiseError, RuntimeError):
    """The requested operation is not valid in the adapter's current state (merged, unknown name, ...)."""


def short_repr(value, limit: int = 200) -> str:
    """`repr` cut to `limit` characters: messages that echo user data stay readable (a 5 MB string is not echoed)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def check_field(condition: bool, config_name: str, field: str, value, allowed: str) -> None:
    """Raise `ConfigError` naming the field, its bad value and what is allowed, unless `condition` holds."""
    if not condition:
        raise ConfigError(f"{config_name}.{field}={short_repr(value)} is invalid: expected {allowed}.")


class MergeError(RankwiseError, ValueError):
    """Merging an adapter would put non-finite values into the base weight (raised by safe merge)."""


class TrainingError(RankwiseError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN/inf); nothing is saved from the broken run."""
