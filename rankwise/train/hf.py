"""`TrainerBridge`: run a rankwise training `Callback` inside `transformers.Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TrainerBridge(rankwise.train.allora.ALLoRA(model))])

Hook mapping (the rankwise loop calls its hooks in the same order as the Trainer):

    rankwise          transformers.TrainerCallback
    on_step_start     on_step_begin
    after_backward    on_pre_optimizer_step   (after gradient clipping, before optimizer.step)
    on_step_end       on_step_end             (after optimizer.step, scheduler.step, zero_grad)
    on_eval           on_evaluate

A method that brings its own callbacks (SaRA, SNELLA: `rankwise.train.loop.method_callbacks`) needs them here
too, since the Trainer does not know about rankwise methods: add `*method_bridges(model)` to the Trainer's
callbacks.

The callback sees the same `TrainState` fields it sees in the rankwise loop (model, optimizer,
scheduler, step, epoch, total_steps). Parameter groups it adds through `rankwise.train.loop.add_param_group`
reach the Trainer's optimizer and schedule, provided the Trainer's schedule is a `LambdaLR` built by
`bridge_scheduler` (the stock transformers schedules are `LambdaLR`s over closures that cannot be extended).
"""
from __future__ import annotations

from transformers import TrainerCallback

from rankwise.train.loop import LRFactor, TrainState


class TrainerBridge(TrainerCallback):
    def __init__(self, callback):
        self.callback = callback
        self.state: TrainState | None = None

    def _sync(self, hf_state, kwargs) -> TrainState:
        model = kwargs.get("model")
        if self.state is None:
            self.state = TrainState(model, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))
        s = self.state
        s.optimizer = kwargs.get("optimizer") or s.optimizer
        s.scheduler = kwargs.get("lr_scheduler") or s.scheduler
        s.step, s.total_steps = hf_state.global_step, hf_state.max_steps
        s.epoch = int(hf_state.epoch or 0)
        if hf_state.log_history and "loss" in hf_state.log_history[-1]:
            s.loss = hf_state.log_history[-1]["loss"]
        return s

    def _hook(self, name, hf_state, kwargs, *extra):
        fn = getattr(self.callback, name, None)
        if fn is not None:
            fn(self._sync(hf_state, kwargs), *extra)

    def on_step_begin(self, args, state, control, **kwargs):
        self._hook("on_step_start", state, kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._hook("after_backward", state, kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        self._hook("on_step_end", state, kwargs)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._hook("on_eval", state, kwargs, dict(metrics or {}))


def method_bridges(model) -> list[TrainerBridge]:
    """One `TrainerBridge` per callback the model's methods bring (SaRA's nuclear norm and re-selection, SNELLA's
    allocation): `Trainer(..., callbacks=[*method_bridges(model)])` trains those methods as `rankwise finetune` does."""
    from rankwise.train.loop import method_callbacks

    return [TrainerBridge(cb) for cb in method_callbacks(model)]


def bridge_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0):
    """A `LambdaLR` with rankwise's `LRFactor` (transformers' formulas), which procedures can extend with new groups.

    Pass it to the Trainer as `optimizers=(optimizer, bridge_scheduler(optimizer, "linear", max_steps))`.
    """
    import torch

    factors = [LRFactor(schedule, total_steps, warmup_steps) for _ in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
