"""Training: a plain loop with callbacks (`loop.py`), checkpoints (`checkpoint.py`), the transformers.Trainer
bridge (`hf.py`) and the training procedures, one file each (allora, ggpo, increlora, triadapt, diffora,
maestro, trp), found by name through `procedures.py`. See docs/training.md."""
from rankwise.train.loop import Callback, TrainConfig, TrainState, add_param_group, train  # noqa: F401
from rankwise.train.procedures import PROCEDURES, build_procedure, finish_procedure  # noqa: F401
