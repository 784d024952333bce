"""Standalone layers that are not adapters (see docs/solvers.md)."""
from rankwise.layers.s4d import S4D, S4DClassifier, S4DKernel

__all__ = ["S4D", "S4DClassifier", "S4DKernel"]
