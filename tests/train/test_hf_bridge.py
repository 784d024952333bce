"""The same rankwise callback, run by the rankwise loop and by transformers.Trainer, gives the same model."""
from __future__ import annotations

import torch
from torch.utils.data import SequentialSampler
from train_helpers import ce_loss, lora_mlp, task, trainable
from transformers import Trainer, TrainingArguments

from rankwise.train.hf import TrainerBridge, bridge_scheduler
from rankwise.train.loop import TrainConfig, train


class ShrinkAndDecay:
    """A toy procedure touching every hook: a gradient term after backward, a weight change at step end."""

    def __init__(self):
        self.calls = {"on_step_start": 0, "after_backward": 0, "on_step_end": 0}

    def on_step_start(self, state):
        self.calls["on_step_start"] += 1

    def after_backward(self, state):
        self.calls["after_backward"] += 1
        for name, p in state.model.named_parameters():
            if "lora_B" in name and p.grad is not None:
                p.grad.add_(p.detach(), alpha=0.1)

    def on_step_end(self, state):
        self.calls["on_step_end"] += 1
        if state.step % 2 == 0:
            with torch.no_grad():
                for name, p in state.model.named_parameters():
                    if "lora_A" in name:
                        p.mul_(0.9)


class WithLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, labels):
        return {"loss": ce_loss(self.model, (x, labels))}


class SequentialTrainer(Trainer):
    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def run_rankwise(x, y, callback, bs=8, epochs=2, build=lambda: lora_mlp(seed=3)):
    model = build()
    callback = callback(model) if callable(callback) else callback
    batches = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
    config = TrainConfig(epochs=epochs, lr=1e-2, schedule="linear", warmup_ratio=0.25, max_grad_norm=1.0)
    train(model, lambda epoch: batches, ce_loss, config, callbacks=[callback], progress=False)
    return model


def run_trainer(x, y, callback, tmp_path, bs=8, epochs=2, build=lambda: lora_mlp(seed=3)):
    model = build()
    callback = callback(model) if callable(callback) else callback
    steps = epochs * len(x) // bs
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=bs, num_train_epochs=epochs,
                             learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    trainer = SequentialTrainer(model=WithLoss(model), args=args, callbacks=[TrainerBridge(callback)],
                                train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(x))],
                                optimizers=(optimizer, bridge_scheduler(optimizer, "linear", steps, int(0.25 * steps))))
    trainer.train()
    return model


def test_same_callback_same_result_in_loop_and_trainer(tmp_path):
    x, y = task(32)
    ours_cb, hf_cb = ShrinkAndDecay(), ShrinkAndDecay()
    ours = run_rankwise(x, y, ours_cb)
    theirs = run_trainer(x, y, hf_cb, tmp_path)
    assert ours_cb.calls == hf_cb.calls == {"on_step_start": 8, "after_backward": 8, "on_step_end": 8}
    baseline = run_rankwise(x, y, object())
    theirs_params = dict(theirs.named_parameters())
    for name, tensor in trainable(ours).items():
        torch.testing.assert_close(tensor, theirs_params[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(t, dict(baseline.named_parameters())[n]) for n, t in trainable(ours).items())



def test_rank_growing_procedure_runs_the_same_in_the_trainer(tmp_path):
    """IncreLoRA resizes tensors inside the Trainer's own optimizer, through the bridge, as in our loop."""
    from rankwise.train.increlora import IncreLoRA

    x, y = task(32)
    procs = []

    def increlora(model):
        procs.append(IncreLoRA(model, target_total_rank=6, init_warmup=1, incre_interval=2, top_h=1, seed=0))
        return procs[-1]

    build = lambda: lora_mlp(seed=3, r=1, lora_alpha=4)  # noqa: E731
    ours = run_rankwise(x, y, increlora, build=build)
    theirs = run_trainer(x, y, increlora, tmp_path, build=build)
    assert procs[0].ranks() == procs[1].ranks() and procs[0].total_rank() == 6
    theirs_params = dict(theirs.named_parameters())
    for name, tensor in trainable(ours).items():
        torch.testing.assert_close(tensor, theirs_params[name], rtol=1e-5, atol=1e-6)


def test_bridge_maps_evaluation_and_trainer_state():
    from transformers import TrainerState

    seen = {}

    class OnEval:
        def on_eval(self, state, metrics):
            seen.update(step=state.step, total=state.total_steps, epoch=state.epoch, metrics=metrics, model=state.model)

    model = lora_mlp()
    TrainerBridge(OnEval()).on_evaluate(None, TrainerState(global_step=3, max_steps=10, epoch=1.5), None,
                                        metrics={"eval_loss": 0.5}, model=model)
    assert seen == {"step": 3, "total": 10, "epoch": 1, "metrics": {"eval_loss": 0.5}, "model": model}


def test_method_callbacks_reach_the_trainer_through_method_bridges(tmp_path):
    """SaRA's own callback (nuclear norm + re-selection) runs inside transformers.Trainer as in our loop."""
    import rankwise
    from rankwise.train.hf import method_bridges
    from rankwise.train.loop import method_callbacks
    from toy_models import MLP

    def sara_mlp():
        torch.manual_seed(3)
        return rankwise.adapt(MLP(), rankwise.SaraConfig(fraction=0.2, lambda_rank=0.05, nuclear_min_size=8,
                                                         target_modules=["lin0", "lin1"]))

    x, y = task(32)
    ours = run_rankwise(x, y, object(), build=sara_mlp)  # train() adds SaRA's callback by itself
    model = sara_mlp()
    bridges = method_bridges(model)
    assert [type(b.callback).__name__ for b in bridges] == [type(cb).__name__ for cb in method_callbacks(model)] == ["SaraTraining"]
    steps = 2 * len(x) // 8
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, weight_decay=0.0, max_grad_norm=1.0, report_to=[], use_cpu=True,
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    trainer = SequentialTrainer(model=WithLoss(model), args=args, callbacks=bridges,
                                train_dataset=[{"x": x[i], "labels": y[i]} for i in range(len(x))],
                                optimizers=(optimizer, bridge_scheduler(optimizer, "linear", steps, int(0.25 * steps))))
    trainer.train()
    assert bridges[0].callback.reselected_at == 4  # half of the 8 steps, as in the loop
    assert model.configs["default"].selected_counts == ours.configs["default"].selected_counts != {}
    theirs = dict(model.named_parameters())
    for name, tensor in trainable(ours).items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-6)
