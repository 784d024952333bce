"""Who competes and on what: the spec, the task, the contender list and how each contender's model is built."""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from rankwise.core.io import PREFIX, WEIGHTS_NAME, atomic_write


@dataclass
class ArenaSpec:
    steps: int = 150                    # optimizer steps per run (equal for every contender)
    batch_size: int = 16
    rank: int = 8                       # each method's rank field; other hyper-parameters keep the config's defaults
    targets: list[str] = field(default_factory=lambda: ["query", "key", "value", "dense"])
    lrs: tuple[float, ...] = (5e-4, 2e-3, 8e-3)
    max_length: int = 64
    eval_size: int = 400                # validation and test examples (each)
    methods: Optional[list[str]] = None  # default: the head-only baseline and every registered method
    peft: bool = True                   # also run PEFT's implementation where PEFT has the method
    timing_rounds: int = 8
    seed: int = 0
    quick: bool = False                 # tiny BERT built from a config (byte tokens), for CI
    model_path: Optional[str] = None
    data_path: Optional[str] = None
    device: str = "cpu"                 # auto | cpu | cuda: where every contender trains and is timed


QUICK = dict(steps=3, batch_size=8, lrs=(1e-3, 1e-2), eval_size=24, timing_rounds=2, quick=True, max_length=32)


def spec_key(spec: ArenaSpec) -> dict[str, Any]:
    """What a stored result must match to be reused (not the contender list: adding a method resumes)."""
    key = asdict(spec)
    key.pop("methods")
    key.pop("peft")
    key["lrs"] = list(spec.lrs)
    if key["device"] == "cpu":  # results stored before the field existed were CPU runs: they still match
        key.pop("device")
    return key


@dataclass
class Task:
    base: nn.Module                     # pristine classifier every contender copies (same head init for all)
    head: list[str]
    train: list[dict]
    val: list[dict]
    test: list[dict]
    description: str


# The baseline every adapter row is read against: the same budget spent on the classifier head alone.
HEAD_ONLY = "head"


def contenders(spec: ArenaSpec) -> list[str]:
    """Contender names: the head-only baseline first, then each method's registry name, and `peft-<name>`
    where PEFT has the method. `spec.methods` may name the baseline (`head`) as well as methods."""
    import rankwise

    names = [HEAD_ONLY] if spec.methods is None or HEAD_ONLY in spec.methods else []
    infos = (rankwise.list_methods() if spec.methods is None
             else [rankwise.get_method(m) for m in spec.methods if m != HEAD_ONLY])
    for info in infos:
        names.append(info.name)
        if spec.peft and peft_type(info) is not None:
            names.append(f"peft-{info.name}")
    return names


def implementation(name: str) -> str:
    return "baseline" if name == HEAD_ONLY else "peft" if name.startswith("peft-") else "rankwise"


# PEFT renamed or absorbed some methods: Bone lives on in PEFT as MiSS (same tensors and maths; PEFT deleted
# `BoneConfig` in #3051), so PEFT's twin of rankwise's Bone is PEFT's MissConfig with the same options.
PEFT_SUCCESSORS = {"BONE": "MISS"}


def peft_type(info) -> Optional[str]:
    """PEFT's PeftType for a registered method, or None when the installed PEFT lacks it (or is absent)."""
    if not info.peft_type:
        return None
    try:
        from peft import PeftType
    except ImportError:
        return None
    known = {t.value for t in PeftType}
    for candidate in (info.peft_type, PEFT_SUCCESSORS.get(info.peft_type)):
        if candidate in known:
            return candidate
    return None


def peft_config(config, peft_type: str):
    """PEFT's config object equal to a rankwise config: same fields, PEFT's class for `peft_type`.

    Fields PEFT's class lacks are dropped only when they hold their "off" value (None / the neutral value);
    anything else would silently change the method, so it is an error.
    """
    import inspect

    from peft import PEFT_TYPE_TO_CONFIG_MAPPING

    from rankwise.core.errors import ConfigError

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
    accepted = set(inspect.signature(cls).parameters)
    data = {k: v for k, v in config.to_dict().items() if k not in ("peft_type", "task_type")}
    lost = {k: v for k, v in data.items() if k not in accepted and v is not None}
    if lost:
        raise ConfigError(f"PEFT's {cls.__name__} has no field(s) {sorted(lost)} (values {lost}); "
                          "the PEFT twin would not be the same method. Leave them unset for the arena.")
    return cls(**{k: v for k, v in data.items() if k in accepted})


# ---- the task -------------------------------------------------------------------------------------

def _byte_ids(texts: list[str], max_length: int) -> list[list[int]]:
    return [[b + 1 for b in text.encode("utf-8")[:max_length]] or [1] for text in texts]  # 0 is padding


def tiny_classifier(num_labels: int) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def build_task(spec: ArenaSpec) -> Task:
    from rankwise.data.models import load_classifier, resolve_device
    from rankwise.data.text import load_text_classification
    from rankwise.train.finetune import HEAD_NAMES, _batches, _encode
    from rankwise.train.tasks import to_device

    device = resolve_device(spec.device)
    data = load_text_classification(spec.data_path, spec.steps * spec.batch_size, 2 * spec.eval_size, spec.seed)
    torch.manual_seed(spec.seed)
    if spec.quick and spec.model_path is None:
        base, pad_id = tiny_classifier(len(data.label_names)), 0
        encode = lambda texts: _byte_ids(texts, spec.max_length)  # noqa: E731
        model_name = "tiny BERT (config, byte tokens)"
    else:
        base, tokenizer = load_classifier(spec.model_path, len(data.label_names), device=spec.device)
        pad_id = tokenizer.pad_token_id or 0
        encode = lambda texts: _encode(tokenizer, texts, spec.max_length)  # noqa: E731
        model_name = Path(spec.model_path).name if spec.model_path else "all-MiniLM-L6-v2 (embedded)"
    half = len(data.test_texts) // 2
    test_ids = encode(data.test_texts)
    on_device = lambda batches: [to_device(b, device) for b in batches]  # noqa: E731
    return Task(
        base=base.to(device).eval(),
        head=[name for name, _ in base.named_children() if name in HEAD_NAMES],
        train=on_device(_batches(encode(data.train_texts), data.train_labels, spec.batch_size, pad_id, seed=spec.seed)),
        val=on_device(_batches(test_ids[:half], data.test_labels[:half], 64, pad_id)),
        test=on_device(_batches(test_ids[half:], data.test_labels[half:], 64, pad_id)),
        description=f"{model_name} on {data.source}: {len(data.train_texts)} train, {half} val, {len(test_ids) - half} test",
    )


# ---- building a contender ----------------------------------------------------------------------------

class HeadOnly(nn.Module):
    """The baseline: the base classifier with only its head trainable (a linear probe on the frozen encoder).

    The head starts from the same initialisation as every adapter's `modules_to_save` copy of it. There is
    no adapter, so nothing to merge.
    """

    def __init__(self, base: nn.Module, head: list[str]):
        from rankwise.core.errors import ConfigError

        super().__init__()
        if not head:
            raise ConfigError("the base model has no classifier head (classifier/score): no head-only baseline")
        self.model = base
        for name, param in base.named_parameters():
            param.requires_grad_(name.split(".", 1)[0] in head)

    def forward(self, **batch):
        return self.model(**batch)

    def save_pretrained(self, directory) -> None:
        # The head tensors under the keys every adapter file stores them (PEFT's layout), so file sizes compare
        # like for like; no adapter_config.json, as there is no adapter to describe.
        state = {PREFIX + name: p.detach().contiguous() for name, p in self.model.named_parameters() if p.requires_grad}
        atomic_write(Path(directory) / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def method_setup(info, base: nn.Module, spec: ArenaSpec) -> tuple[list[str], dict[str, Any]]:
    """(target_modules, config options) of a method in the arena.

    Every method gets `spec.rank` in its rank field and `spec.targets`, except where that setting is not the
    method (each exception follows the method's spec and is recorded in the result's `config`):
      dept  - adapts the input embedding, not linear layers; the position table covers `max_length` rows and the
              prompt keeps the reference's prompt/length ratio (40 of 256 -> max_length / 6.4); A, B train at
              0.1 x lr (the reference's 0.01 with its 3e-1 prompt rate would leave them frozen at our rates).
      mos   - the shared pool must hold r - private_rank vectors per layer: equivalent_rank is the default (4,
              half LoRA's budget) or, on shallow models, the smallest value that lets every layer draw them.
      bone  - run as Bone's weight-guided "Bat" variant; Bone's default is MiSS's shard sharing, run as `miss`.
      randlora - its default randlora_alpha (20 x rank, PEFT's ratio) keeps the scale at 20.
    """
    from rankwise.core.config import matches_module

    targets = list(spec.targets)
    options: dict[str, Any] = {}
    if info.config_cls.rank_field:
        options[info.config_cls.rank_field] = spec.rank
    if info.name == "dept":
        targets = [_module_name(base, base.get_input_embeddings()).rsplit(".", 1)[-1]]
        options.update(max_length=spec.max_length, num_virtual_tokens=max(1, round(spec.max_length * 40 / 256)),
                       embedding_lr_scale=0.1)
    elif info.name == "mos":
        from rankwise.adapters.mos import pool_key

        defaults = info.config_cls()
        groups: dict[str, int] = {}
        for name, module in base.named_modules():
            if isinstance(module, nn.Linear) and matches_module(name, targets):
                key = pool_key(name, module)
                groups[key] = groups.get(key, 0) + 1
        depth = min(groups.values(), default=1)
        r, p = spec.rank, min(defaults.private_rank, spec.rank)
        needed = p + -(-(r - p) // depth)  # r - p <= (R_eq - p) * depth
        options.update(private_rank=p, equivalent_rank=max(min(defaults.equivalent_rank, r), needed))
        if options["equivalent_rank"] == p and r != p:  # pure private needs r == R_eq
            options["equivalent_rank"] += 1
    elif info.name == "bone":
        options.update(init_weights="bat")
    return targets, options


def build_contender(name: str, task: Task, spec: ArenaSpec):
    """(model, info, config) for contender `name` on a fresh copy of the base; info and config are None for
    the head-only baseline, which is no adapter method."""
    import rankwise

    if name == HEAD_ONLY:
        return HeadOnly(copy.deepcopy(task.base), task.head), None, None
    is_peft = name.startswith("peft-")
    info = rankwise.get_method(name[len("peft-"):] if is_peft else name)
    targets, options = method_setup(info, task.base, spec)
    config = info.config_cls(target_modules=targets, modules_to_save=task.head, **options)
    base = copy.deepcopy(task.base)
    if is_peft:
        import peft

        twin = peft_type(info)
        if twin is None:
            from rankwise.core.errors import ConfigError

            raise ConfigError(f"the installed PEFT has no {info.peft_type} (nor a successor): drop {name!r} or use --no-peft")
        return peft.get_peft_model(base, peft_config(config, twin)), info, config
    return rankwise.adapt(base, config), info, config
