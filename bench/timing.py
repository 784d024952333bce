"""Timing and output helpers for the optimizer/pretraining benches, on top of bench/common.py.

These benches want a plain median per contender and the machine facts inside every JSON; the measuring
and writing are common.py's."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import common
from common import RESULTS, machine

__all__ = ["RESULTS", "interleaved_medians", "machine", "write_json"]


def interleaved_medians(calls: dict[str, Callable[[], None]], rounds: int = 10, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call, contenders run round-robin so machine noise hits all of them alike."""
    return {name: row["median_s"] for name, row in common.interleaved_medians(calls, warmup=warmup, rounds=rounds).items()}


def write_json(name: str, payload: dict) -> Path:
    return common.write_json(name, {"machine": machine(), **payload})
