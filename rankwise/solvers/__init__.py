"""Low-rank solvers: functions over tensors that return a `SolverResult` (see docs/solvers.md)."""
from rankwise.solvers.completion import altmin_completion
from rankwise.solvers.result import SolverResult
from rankwise.solvers.sensing import balance_factors, matrix_sensing
from rankwise.solvers.streaming_eig import streaming_top_eigenvector
from rankwise.solvers.subgm import subgm

__all__ = ["SolverResult", "altmin_completion", "balance_factors", "matrix_sensing", "streaming_top_eigenvector", "subgm"]
