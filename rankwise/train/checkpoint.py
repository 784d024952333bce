"""Training checkpoints without pickles: tensors in safetensors, everything else in JSON.

    checkpoint-<step>/
        tensors.safetensors   model.<param>, optim.<i>.<key>, rng.torch, callback.<j>.<key>
        state.json            step/epoch/position, history, optimizer param groups and scalar state,
                              LR-schedule state, Python RNG, callbacks' scalar state

The directory is written under a temporary name and renamed, so a crash mid-save leaves the previous
checkpoint intact. Loading checks every key and shape before anything changes.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankwise.core.errors import CheckpointError
from rankwise.core.io import atomic_directory

TENSORS = "tensors.safetensors"
STATE = "state.json"
FORMAT = "rankwise-train-checkpoint/1"


class MetricsLog:
    """`metrics.jsonl`: one JSON object per step/evaluation. On resume the file is rewritten from the
    checkpoint's history, so steps logged after the checkpoint (and then replayed) are not duplicated."""

    def __init__(self, output_dir, history: list[dict] | None):
        self.path = None if output_dir is None else Path(output_dir) / "metrics.jsonl"
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in history or []))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _split(prefix: str, values: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Move tensor values into `tensors` under `prefix.<key>`; return the JSON-able rest."""
    rest = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
        else:
            rest[str(key)] = value
    return rest


def _join(prefix: str, scalars: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    out = dict(scalars)
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            out[key[len(prefix) + 1:]] = value
    return out


def save_checkpoint(output_dir: Path, state, callbacks, keep: int) -> Path:
    from rankwise.train.loop import dumps

    tensors: dict[str, torch.Tensor] = {}
    for name, p in state.model.named_parameters():
        if p.requires_grad:
            tensors[f"model.{name}"] = p.detach().cpu().contiguous()
    optim = state.optimizer.state_dict()
    optim_scalars = {str(i): _split(f"optim.{i}", s, tensors) for i, s in optim["state"].items()}
    tensors["rng.torch"] = torch.get_rng_state()
    callback_scalars = []
    for j, cb in enumerate(callbacks):
        sd = cb.state_dict() if hasattr(cb, "state_dict") else {}
        callback_scalars.append(_split(f"callback.{j}", sd, tensors))
    meta = {
        "format": FORMAT, "step": state.step, "epoch": state.epoch, "batch_index": state.batch_index, "loss": state.loss,
        "history": state.history, "optimizer": {"param_groups": optim["param_groups"], "state": optim_scalars},
        "scheduler": state.scheduler.state_dict(), "rng_python": random.getstate(), "callbacks": callback_scalars,
    }
    text = dumps(meta)
    final = output_dir / f"checkpoint-{state.step}"
    shutil.rmtree(output_dir / f".checkpoint-{state.step}.tmp", ignore_errors=True)  # staging name of older versions
    # One atomic step for both files: a crash leaves the previous checkpoint-<step>/ complete (or none).
    with atomic_directory(final, keep_other_entries=False) as stage:
        save_file(tensors, str(stage / TENSORS), metadata={"format": FORMAT})
        (stage / STATE).write_text(text)
    for old in sorted(list_checkpoints(output_dir))[:-keep]:
        shutil.rmtree(output_dir / f"checkpoint-{old}", ignore_errors=True)
    return final


def list_checkpoints(output_dir: Path) -> list[int]:
    if not Path(output_dir).is_dir():
        return []
    steps = []
    for p in Path(output_dir).glob("checkpoint-*"):
        suffix = p.name.split("-", 1)[1]
        if suffix.isdigit() and (p / STATE).is_file():
            steps.append(int(suffix))
    return sorted(steps)


def resolve(resume_from, output_dir) -> Path:
    if str(resume_from) == "latest":
        if output_dir is None:
            raise CheckpointError("resume_from='latest' needs output_dir (the directory holding checkpoint-<step>/)")
        steps = list_checkpoints(Path(output_dir))
        if not steps:
            raise CheckpointError(f"no checkpoint-<step>/ in {output_dir} to resume from")
        return Path(output_dir) / f"checkpoint-{steps[-1]}"
    return Path(resume_from)


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint: it needs {STATE} and {TENSORS}")
    try:
        meta = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} is truncated or corrupted ({err}); resume from an older checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/{STATE} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta, tensors


def load_checkpoint(path: Path, state, callbacks) -> None:
    """Restore callbacks, model, optimizer, schedule and RNG. A corrupted file or a model that does not fit raises
    before the model's values change (a rank-changing callback may already have resized its adapters)."""
    meta, tensors = _read(path)
    for cb in callbacks:
        if getattr(cb, "supports_resume", True) is False:
            raise CheckpointError(f"{type(cb).__name__} changes the model in ways a checkpoint cannot replay; "
                                  "this procedure cannot be resumed: restart the run")
    if len(meta["callbacks"]) != len(callbacks):
        raise CheckpointError(f"{path} was saved with {len(meta['callbacks'])} callbacks, this run has {len(callbacks)}")
    # Callbacks first: a rank-changing procedure resizes the model (and the fresh optimizer's tensors) to the
    # checkpoint's shapes here, so the shape checks below compare like with like.
    for j, cb in enumerate(callbacks):
        if hasattr(cb, "load_state_dict"):
            cb.load_state_dict(_join(f"callback.{j}", meta["callbacks"][j], tensors), state)
    params = {name: p for name, p in state.model.named_parameters() if p.requires_grad}
    saved = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        raise CheckpointError(f"{path} does not fit this model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, p in params.items():
        if saved[name].shape != p.shape:
            raise CheckpointError(f"{path}: shape of {name} is {tuple(saved[name].shape)}, the model has {tuple(p.shape)}")
    optim = meta["optimizer"]
    current = state.optimizer.param_groups
    if [len(g["params"]) for g in optim["param_groups"]] != [len(g["params"]) for g in current]:
        raise CheckpointError(f"{path}: optimizer parameter groups do not match this run's (different model or procedure?)")
    groups = []
    for saved_group, group in zip(optim["param_groups"], current):
        groups.append({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved_group.items()})
    optim_state = {int(i): _join(f"optim.{i}", scalars, tensors) for i, scalars in optim["state"].items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    state.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
    state.scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    version, internal, gauss = meta["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    state.step, state.epoch, state.batch_index = meta["step"], meta["epoch"], meta["batch_index"]
    state.loss, state.history = meta["loss"], meta["history"]
