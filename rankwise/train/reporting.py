"""`--report-to tensorboard`: a loop callback that writes the training loss, learning rate and evaluations."""
from __future__ import annotations

from pathlib import Path

from rankwise.core.errors import ConfigError


class TensorBoardCallback:
    """Scalars `train/loss`, `train/lr` every optimizer step and `eval/<metric>` at each evaluation, under `log_dir`.

    TensorBoard comes through its maintained package (`pip install tensorboard`), imported only when asked for."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--report-to tensorboard needs the `tensorboard` package: `pip install tensorboard` "
                              "(or use --report-to none)") from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def on_step_end(self, state) -> None:
        record = state.history[-1]
        self.writer.add_scalar("train/loss", record["loss"], record["step"])
        self.writer.add_scalar("train/lr", record["lr"], record["step"])

    def on_eval(self, state, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{key}", value, state.step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
