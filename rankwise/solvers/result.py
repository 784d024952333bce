"""What every solver returns, and the input checks they share.

A solver is a plain function over tensors (DESIGN.md): it validates its inputs with the helpers
below (clear `ShapeError`/`ConfigError` naming the argument) and returns a `SolverResult`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from rankwise.core.errors import ConfigError, ShapeError


@dataclass
class SolverResult:
    """Solution plus how it got there.

    `solution` is the recovered matrix or vector (dense); None when a solver says it would be too
    large to form (completion of big matrices: use `factors`);
    `factors` holds the factors it was built from (e.g. `(U,)`, `(F, G)`, `(U, V)`);
    `history` maps a metric name ("loss", "rel_err", ...) to one float per iteration.
    """

    solution: torch.Tensor | None
    factors: tuple[torch.Tensor, ...] = ()
    history: dict[str, list[float]] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-friendly summary (last value of every history series)."""
        last = {name: values[-1] for name, values in self.history.items() if values}
        return {"iterations": self.iterations, "seconds": round(self.seconds, 4), **last, **self.info}


class Stopwatch:
    """`with Stopwatch() as clock: ...; clock.seconds`."""

    def __enter__(self) -> "Stopwatch":
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def __exit__(self, *exc) -> None:
        self.seconds = self.elapsed()


def require_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        raise ShapeError(f"{name} is empty: pass at least one observation/row.")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise ShapeError(f"{name} has {bad} NaN/inf entries: drop or impute them before solving.")


def require_rank(name: str, rank: int, limit: int, what: str) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{name}={rank!r} is invalid: expected an integer >= 1.")
    if rank > limit:
        raise ConfigError(f"{name}={rank} is larger than {what} ({limit}): use a rank <= {limit}.")


def require_positive(name: str, value: float, upper: float = math.inf, inclusive_upper: bool = True) -> None:
    ok = value > 0 and (value <= upper if inclusive_upper else value < upper)
    if not ok:
        bound = f" and {'<=' if inclusive_upper else '<'} {upper}" if upper != math.inf else ""
        raise ConfigError(f"{name}={value!r} is invalid: expected a number > 0{bound}.")


def measurement_tensor(A: torch.Tensor, y: torch.Tensor, square: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a sensing problem `y_i = <A_i, X>`: `A` is (m, n1, n2), `y` is (m,). Returns float64 copies."""
    if A.dim() != 3:
        raise ShapeError(f"A must be a (m, n1, n2) stack of measurement matrices, got shape {tuple(A.shape)}.")
    if square and A.shape[1] != A.shape[2]:
        raise ShapeError(f"A must hold square measurement matrices for a symmetric/PSD problem, got {tuple(A.shape[1:])}.")
    if y.dim() != 1 or y.shape[0] != A.shape[0]:
        raise ShapeError(f"y must be a vector of length m={A.shape[0]} (one value per A_i), got shape {tuple(y.shape)}.")
    require_finite("A", A)
    require_finite("y", y)
    return A.double(), y.double()
