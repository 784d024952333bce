"""sklearn's 8x8 handwritten digits (1,797 images, shipped inside the scikit-learn wheel: no download).

The real data behind `rankwise s4d-demo` and `rankwise intrinsic-dim`; scikit-learn is optional, so a
missing install gets the command that fixes it instead of a bare ImportError.
"""
from __future__ import annotations

import torch

from rankwise.core.errors import CheckpointError


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """(images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CheckpointError("the digits data ships with scikit-learn, which is not installed: "
                              "run `pip install scikit-learn` (or `pip install \"rankwise[test]\"`)") from None
    digits = load_digits()
    return torch.tensor(digits.images, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
