"""`AdapterConfig`: the base of every method's config dataclass.

A config validates every field in `__post_init__` (raising `ConfigError` that names the field,
the bad value and the allowed range) and round-trips through `adapter_config.json`.

Where PEFT has the method, the JSON is PEFT's: `peft_type` plus PEFT's field names, so PEFT reads
the file. PEFT options rankwise does not implement are accepted on load only at their neutral
value (`peft_neutral_fields`); any other value is an error, never silently dropped.
Methods PEFT lacks are written with `peft_type = "RANKWISE_<NAME>"` so PEFT refuses them cleanly.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import warnings
from typing import Any, ClassVar

from rankwise.core.errors import ConfigError, check_field
from rankwise.core.errors import short_repr as _short

# Keys every PEFT config carries that say nothing about the adapter's maths.
PEFT_BOOKKEEPING_KEYS = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
RANKWISE_KEYS = frozenset({"rankwise_method", "rankwise_version"})
# PEFT options most tuners share whose "off" values rankwise supports (bias training, layer-index targeting).
PEFT_COMMON_NEUTRAL = {"bias": "none", "layers_to_transform": None, "layers_pattern": None}
# PEFT options a user may pass to any config in Python: accepted at their "off" value, refused otherwise
# (each with the reason and what to do instead), never silently dropped.
PEFT_UNIMPLEMENTED = {
    "bias": ("none", "training biases is not implemented; list the module in modules_to_save to train it whole"),
    "layers_to_transform": (None, "select layers with a target_modules regex instead, e.g. r'.*\\.layers\\.(0|1)\\.(q_proj|v_proj)'"),
    "layers_pattern": (None, "select layers with a target_modules regex instead"),
    "use_dora": (False, "DoRA is not implemented in rankwise"),
}
# Largest value a size field (rank, count of bases, dimension) may take: anything above cannot be allocated
# for any real layer, and refusing it here keeps the error ahead of the allocator (and of the memory).
MAX_SIZE = 1 << 20
# Integer fields that are not sizes (seeds, PRNG keys, step counts): only the bool and finiteness rules apply.
_NOT_SIZE = re.compile(r"(seed|prng|key|step|warmup|period|interval|every)")


def _annotation_types(annotation: Any) -> set[str]:
    return set(re.findall(r"[A-Za-z_]+", annotation if isinstance(annotation, str) else repr(annotation)))


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    return False


def check_numeric_fields(config: Any, max_size: int | None = MAX_SIZE) -> None:
    """The checks every config shares, run before its own `validate()` (so before any memory is touched):

    - no non-finite float anywhere (inf/nan in a field, a list or a pattern dict);
    - no bool where the field's annotation says a number (`r=True` is 1 in Python, not a rank);
    - no integer size (a field annotated `int` whose name is not a seed/step/period) above `max_size`.
    Raises `ConfigError` naming the field. Works on any dataclass (`max_size=None` skips the size rule, for
    configs whose integers are token budgets rather than tensor sizes).
    """
    name = type(config).__name__
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        types = _annotation_types(field.type)
        if _non_finite(value):
            raise ConfigError(f"{name}.{field.name}={_short(value)} is invalid: expected a finite number (no inf or nan).")
        numeric = types & {"int", "float"}
        if isinstance(value, bool) and numeric and "bool" not in types:
            raise ConfigError(f"{name}.{field.name}={value!r} is invalid: expected a number, not a boolean.")
        if (max_size is not None and isinstance(value, int) and not isinstance(value, bool) and "int" in types and "bool" not in types
                and not _NOT_SIZE.search(field.name) and value > max_size):
            raise ConfigError(
                f"{name}.{field.name}={value} is invalid: expected at most {max_size:,} "
                "(a size this large cannot be allocated for any layer)."
            )


class _ConfigMeta(type):
    """Turns a constructor call with an unknown or unimplemented keyword into a `ConfigError` naming it.

    The dataclass `__init__` would raise a bare `TypeError`; PEFT users pass PEFT's options (`bias`,
    `use_dora`, ...) out of habit, so each gets an answer: accepted at its neutral value, else refused with why.
    """

    def __call__(cls, *args, **kwargs):
        if dataclasses.is_dataclass(cls):
            known = {f.name for f in dataclasses.fields(cls) if f.init}
            for key in [k for k in kwargs if k not in known]:
                value = kwargs.pop(key)
                neutral_fields = {**{k: v for k, (v, _) in PEFT_UNIMPLEMENTED.items()}, **cls.peft_neutral_fields}
                if key in neutral_fields:
                    if not _is_neutral(value, neutral_fields[key]):
                        reason = PEFT_UNIMPLEMENTED.get(key, (None, "rankwise does not implement this PEFT option"))[1]
                        raise ConfigError(
                            f"{cls.__name__}: PEFT option {key}={_short(value)} is not supported ({reason}); "
                            f"leave it at {neutral_fields[key]!r}."
                        )
                elif key in PEFT_BOOKKEEPING_KEYS or key in RANKWISE_KEYS:
                    continue  # file bookkeeping (inference_mode, peft_type, ...): says nothing about the maths
                else:
                    close = difflib.get_close_matches(key, sorted(known | set(neutral_fields)), n=3)
                    hint = f" Did you mean {', '.join(close)}?" if close else ""
                    raise ConfigError(
                        f"{cls.__name__} has no field {key!r}.{hint} Its fields: {', '.join(sorted(known))}."
                    )
        return super().__call__(*args, **kwargs)


def matches_module(name: str, pattern: list[str] | str) -> bool:
    """PEFT's matching rule: a list entry matches a full name or a `.`-suffix; a string is a full regex."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == key or name.endswith("." + key) for key in pattern)


def resolve_pattern(pattern: dict[str, Any], module_name: str, default: Any) -> Any:
    """Per-module override (PEFT `rank_pattern` semantics): the first key matching the name's end wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@dataclasses.dataclass
class AdapterConfig(metaclass=_ConfigMeta):
    """Fields shared by every adapter method.

    target_modules: module names (exact or `.`-suffix), one regex string (full match), or "all-linear".
        None uses the default for known transformers architectures.
    exclude_modules: same forms; matching modules are never adapted.
    modules_to_save: modules (e.g. a fresh classifier head) trained in full and saved with the adapter.
    task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...): metadata saved in the file, as in PEFT.
    """

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    # PEFT's meaning: metadata naming the model head (e.g. "CAUSAL_LM", "SEQ_CLS"), saved in the file; the
    # adapter's maths does not depend on it.
    task_type: str | None = None

    # Set by @register.
    method_name: ClassVar[str] = ""
    peft_type: ClassVar[str | None] = None
    # Which base layer kinds the method can adapt: "linear" (nn.Linear, GPT-2 Conv1D), "conv", "embedding".
    supported_layers: ClassVar[tuple[str, ...]] = ("linear",)
    # What the freshly initialised adapter does (checked by the generic test matrix):
    #   "zero": delta_weight is exactly zero; "identity": output equals the base up to float error
    #   (re-factorisations of W); "none": neither (the config docstring says why).
    init_property: ClassVar[str] = "zero"
    # Name of the field the CLI's `--rank` sets (None: the method has no rank).
    rank_field: ClassVar[str | None] = "r"
    # PEFT-only options with the value meaning "feature off"; written to the JSON so PEFT sees a full config.
    peft_neutral_fields: ClassVar[dict[str, Any]] = {}
    # Values assumed for fields a file lacks because it was written before the field existed, where the new
    # default would change what the old file computes (e.g. NOLA's per-layer bases): {field: old behaviour}.
    legacy_file_defaults: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        check_numeric_fields(self)
        self.validate()

    # ---- validation ---------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; subclasses extend this (call `super().validate()` first)."""
        name = type(self).__name__
        for field in ("target_modules", "exclude_modules"):
            value = getattr(self, field)
            ok = value is None or isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            )
            check_field(ok, name, field, value, "None, a regex string, 'all-linear' or a list of module names")
            if isinstance(value, str) and value != "all-linear":
                try:
                    re.compile(value)
                except re.error as err:
                    raise ConfigError(f"{name}.{field}={_short(value)} is not a valid regular expression: {err}") from None
        ok = self.modules_to_save is None or (
            isinstance(self.modules_to_save, list) and all(isinstance(v, str) and v for v in self.modules_to_save)
        )
        check_field(ok, name, "modules_to_save", self.modules_to_save, "None or a list of module names")
        check_field(self.task_type is None or isinstance(self.task_type, str), name, "task_type", self.task_type,
                    "None or a PEFT task type string such as 'CAUSAL_LM' or 'SEQ_CLS'")

    def _check(self, condition: bool, field: str, allowed: str) -> None:
        check_field(condition, type(self).__name__, field, getattr(self, field), allowed)

    def _check_int(self, field: str, minimum: int = 1, allow_none: bool = False) -> None:
        """The field is an integer >= minimum (bools rejected), or None when `allow_none`."""
        value = getattr(self, field)
        ok = (allow_none and value is None) or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum)
        self._check(ok, field, f"{'None or ' if allow_none else ''}an integer >= {minimum}")

    def _check_layer_limit(self, module_name: str, base_layer, field: str, value: int, limit: int, what: str) -> None:
        """Per-layer check: `value` (of `field`) must not exceed `limit`; the error names the layer and the fix."""
        if value > limit:
            raise ConfigError(
                f"{type(self).__name__}.{field}={value} is too large for {module_name!r} "
                f"(weight {tuple(base_layer.weight.shape)}): {what} at most {limit}. Lower {field}, or exclude this module."
            )

    def training_callbacks(self, model, adapter_name: str) -> list[Any]:
        """Hook: the training callbacks (`rankwise.train.loop.Callback`) that are part of this method.

        A method whose paper trains with more than the loss (SaRA's nuclear norm and re-selection, SNELLA's
        sparsity allocation) returns them here; `rankwise.train.loop.train` collects them from every active
        adapter of the model it trains (`method_callbacks`), so `rankwise finetune`, the loop and the Trainer
        bridge all run them. Most methods bring none.
        """
        return []

    def check_layer(self, module_name: str, base_layer, kind: str) -> None:
        """Hook: raise `ConfigError` if the config cannot adapt this layer (e.g. rank larger than the layer).

        `base_layer` is the unwrapped module (its `weight` is in native layout), `kind` its adapter kind.
        """

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        fields = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.peft_type:
            return {"peft_type": self.peft_type, **self.peft_neutral_fields, **fields}
        from rankwise import __version__

        return {
            "peft_type": f"RANKWISE_{self.method_name.upper().replace('-', '_')}",
            "rankwise_method": self.method_name,
            "rankwise_version": __version__,
            **fields,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = True) -> "AdapterConfig":
        """Build a config from its JSON dict. The dict may name its method; `cls` may be the base class.

        Unknown keys (a file from a newer version) raise `ConfigError` naming them, unless
        `strict=False`, which drops them with a warning.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a JSON object, got {type(data).__name__}")
        target = cls
        if cls is AdapterConfig or not cls.method_name:
            target = method_of(data).config_cls
        known = {f.name for f in dataclasses.fields(target)}
        kwargs, unknown, unsupported = {}, [], []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in PEFT_BOOKKEEPING_KEYS or key in RANKWISE_KEYS:
                continue
            elif key in target.peft_neutral_fields:
                if not _is_neutral(value, target.peft_neutral_fields[key]):
                    unsupported.append(f"{key}={_short(value)}")
            else:
                unknown.append(key)
        if unsupported:
            raise ConfigError(
                f"{target.__name__}: the file uses PEFT options rankwise does not implement: {', '.join(unsupported)}. "
                "Re-save the adapter without them (or merge it in PEFT first)."
            )
        if unknown:
            message = (
                f"{target.__name__}: unknown config key(s) {_short(sorted(unknown))} (written by a newer version?). "
                "Upgrade rankwise, or load with strict=False to drop them."
            )
            if strict:
                raise ConfigError(message)
            warnings.warn(message + " Dropped.", stacklevel=2)
        for key, value in target.legacy_file_defaults.items():
            kwargs.setdefault(key, value)  # a file older than the field: keep the behaviour it was trained with
        return target(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


def method_of(data: dict[str, Any]):
    """The registered method a config dict belongs to (by `rankwise_method`, else PEFT's `peft_type`)."""
    from rankwise.core.registry import get_method, list_methods, method_for_peft_type

    if "rankwise_method" in data:
        return get_method(str(data["rankwise_method"]))
    peft_type = data.get("peft_type")
    if peft_type is None:
        raise ConfigError("adapter config has neither 'rankwise_method' nor 'peft_type': not an adapter config")
    info = method_for_peft_type(str(peft_type))
    if info is None:
        peft_known = sorted(m.peft_type for m in list_methods() if m.peft_type)
        raise ConfigError(f"peft_type={peft_type!r} is not supported by rankwise (PEFT types it reads: {peft_known})")
    return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def _is_neutral(value: Any, neutral: Any) -> bool:
    empty = (None, False, {}, [], "")
    return value == neutral or (value in empty and neutral in empty)
