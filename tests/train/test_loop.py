"""The training loop: schedules, accumulation, checkpoints and exact resume, metrics, errors."""
from __future__ import annotations

import json

import pytest
import torch
from train_helpers import accuracy, batcher, ce_loss, lora_mlp, task, trainable
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.train.loop import LRFactor, TrainConfig, add_param_group, train


@pytest.mark.parametrize("schedule,reference", [("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)])
def test_schedules_match_transformers(schedule, reference):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    ref = reference(opt, num_warmup_steps=3, num_training_steps=20)
    ours = LRFactor(schedule, 20, 3)
    for step in range(22):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12)


def test_grad_accumulation_equals_large_batch():
    x, y = task(32)
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        model = lora_mlp(seed=1)
        train(model, batcher(x, y, bs), ce_loss, TrainConfig(epochs=2, grad_accum=accum, max_grad_norm=None, lr=1e-2), progress=False)
        results.append(trainable(model))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-6)


def _run(tmp, stop_after=None, resume=False, **cfg):
    x, y = task(40)
    model = lora_mlp(seed=2, lora_dropout=0.1)  # dropout draws from the RNG, which the checkpoint must restore
    config = TrainConfig(epochs=3, grad_accum=2, schedule="cosine", warmup_ratio=0.2, checkpoint_every=2, lr=5e-3, **cfg)
    state = train(model, batcher(x, y, 4), ce_loss, config, progress=False, output_dir=tmp, stop_after=stop_after,
                  resume_from="latest" if resume else None)
    return model, state


def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    full, full_state = _run(tmp_path / "full")
    _run(tmp_path / "cut", stop_after=7)  # last checkpoint at step 6: steps 7.. are replayed after resume
    resumed, resumed_state = _run(tmp_path / "cut", resume=True)
    assert resumed_state.step == full_state.step == 15
    for name, tensor in trainable(full).items():
        assert torch.equal(tensor, dict(resumed.named_parameters())[name]), name
    lines = [json.loads(s) for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 16))
    assert [r["loss"] for r in lines] == [r["loss"] for r in full_state.history]
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-14"]


def test_resume_at_epoch_boundary(tmp_path):
    full, _ = _run(tmp_path / "full")
    _run(tmp_path / "cut", stop_after=10)  # step 10 ends epoch 2 (5 steps per epoch)
    resumed, _ = _run(tmp_path / "cut", resume=True)
    for name, tensor in trainable(full).items():
        assert torch.equal(tensor, dict(resumed.named_parameters())[name]), name


def test_evaluation_drawing_random_numbers_does_not_break_resume(tmp_path):
    """An evaluate() that consumes the RNG (dropout left on) runs right after a checkpoint; resume must still be exact."""
    x, y = task(40)

    def noisy_eval(model):
        return {"noise": float(torch.rand(())), "accuracy": accuracy(model, x, y)}

    def run(tmp, **kwargs):
        model = lora_mlp(seed=2, lora_dropout=0.1)
        config = TrainConfig(epochs=3, grad_accum=2, checkpoint_every=2, eval_every=2, lr=5e-3)
        train(model, batcher(x, y, 4), ce_loss, config, evaluate=noisy_eval, progress=False, output_dir=tmp, **kwargs)
        return model

    full = run(tmp_path / "full")
    run(tmp_path / "cut", stop_after=7)
    resumed = run(tmp_path / "cut", resume_from="latest")
    for name, tensor in trainable(full).items():
        assert torch.equal(tensor, dict(resumed.named_parameters())[name]), name


def test_corrupted_checkpoint_is_rejected_and_model_untouched(tmp_path):
    _run(tmp_path, stop_after=2)
    (tmp_path / "checkpoint-2" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupted"):
        _run(tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _run(tmp_path / "empty", resume=True)


def test_checkpoint_of_other_model_is_rejected(tmp_path):
    _run(tmp_path, stop_after=2)
    x, y = task(40)
    other = lora_mlp(r=2, lora_alpha=2)
    before = trainable(other)
    with pytest.raises(CheckpointError, match="shape"):
        train(other, batcher(x, y, 4), ce_loss, TrainConfig(epochs=3, grad_accum=2), progress=False,
              output_dir=tmp_path, resume_from="latest")
    for name, tensor in before.items():
        assert torch.equal(tensor, dict(other.named_parameters())[name])


def test_bad_settings():
    with pytest.raises(ConfigError, match="checkpoint_every"):
        TrainConfig(checkpoint_every=-1)
    x, y = task(8)
    with pytest.raises(ConfigError, match="output_dir"):
        train(lora_mlp(), batcher(x, y), ce_loss, TrainConfig(checkpoint_every=1), progress=False)


def test_added_group_gets_its_own_warmup():
    x, y = task(16)
    seen = {}

    class Grow:
        def on_step_end(self, state):
            if state.step == 2:
                add_param_group(state, [torch.nn.Parameter(torch.zeros(3))])
            if len(state.optimizer.param_groups) > 1:
                seen[state.step] = state.optimizer.param_groups[-1]["lr"]

    train(lora_mlp(), batcher(x, y, 2), ce_loss, TrainConfig(lr=1.0, warmup_ratio=0.25, schedule="linear"),
          callbacks=[Grow()], progress=False)
    # 8 steps, warm-up 2: the new group restarts its warm-up at step 2 and decays to 0 at step 8.
    assert seen[2] == 0.0 and seen[3] == pytest.approx(0.5) and seen[4] == pytest.approx(1.0) and seen[8] == 0.0
