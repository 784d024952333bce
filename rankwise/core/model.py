"""`AdaptedModel`: a base model with named adapters injected into its layers.

    model = rankwise.adapt(base, rankwise.LoraConfig(r=8, target_modules=["query", "value"]))
    model(**batch)                                   # base + active adapter(s)
    model(**batch, adapter_names=["a", "__base__"])  # per-sample routing
    with model.disable_adapter(): model(**batch)     # the base alone
    model.save_adapter("out/")                       # adapter_config.json + adapter_model.safetensors
    merged = model.merge_and_unload()                # plain base model with the update folded in
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator

import torch
from torch import nn

from rankwise.core.config import AdapterConfig, matches_module, resolve_pattern  # noqa: F401 (re-export)
from rankwise.core.errors import AdapterStateError, ConfigError, TargetError
from rankwise.core.inject import resolve_targets
from rankwise.core.layer import BASE_MODEL_SENTINEL, AdaptedLayer, layer_kind
from rankwise.core.peft_compat import PeftClientMethods, adapted_class
from rankwise.core.registry import get_method


class ModulesToSave(nn.Module):
    """A module trained in full for each adapter (e.g. a new classification head); the original stays intact."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.active = self.active or name

    def forward(self, *args, **kwargs):
        if self.disabled or self.active not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active](*args, **kwargs)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


class AdaptedModel(PeftClientMethods, nn.Module):
    """The wrapped model plus its adapters; to clients that inspect it, it looks like the model it wraps.

    `AdaptedModel(model, ...)` is an instance of a subclass made once per wrapped class (`AdaptedLlamaForCausalLM`):
    - its `forward` carries the wrapped class's signature plus `adapter_names`: `transformers.Trainer` reads the
      model class's `forward` signature to choose the dataset columns it keeps, the label names and
      `can_return_loss`; a bare `*args, **kwargs` would make it drop every column;
    - when the wrapped model is a transformers model and PEFT is installed, the subclass also derives from
      `peft.PeftModel` (whose `__init__` never runs): `transformers.Trainer`, `trl` and `accelerate` recognise an
      adapter model only by `isinstance(model, PeftModel)`, and then save checkpoints with `save_pretrained`
      (adapter files only), resume and load the best model with `load_adapter`, and inspect `get_base_model()`.
      Every `PeftModel` method those clients call is defined with PEFT's meaning (`rankwise.core.peft_compat`,
      where the subclass is made); no other is relied on.
    Other attributes (`config`, `main_input_name`, `activation_checkpointing_enable`, ...) come from the wrapped model.
    """

    def __new__(cls, model: nn.Module | None = None, *args, **kwargs):
        if cls is AdaptedModel and isinstance(model, nn.Module):
            cls = adapted_class(type(model), AdaptedModel)
        return super().__new__(cls)

    def __reduce_ex__(self, protocol):
        # The per-class subclass is not importable by name; rebuild it from the wrapped class (pickle, deepcopy).
        return _restore_adapted, (type(self.model),), self.__getstate__()

    def __init__(self, model: nn.Module, config: AdapterConfig, adapter_name: str = "default"):
        nn.Module.__init__(self)  # not super(): `PeftModel.__init__` (a client-facing base, see above) must not run
        self.model = model
        self.configs: dict[str, AdapterConfig] = {}
        self.shared = nn.ModuleDict()  # per adapter name: tensors shared across layers (owned once, here)
        self._active: list[str] = []
        self._inputs_disabled = False  # set inside disable_adapter(): input-side adapters step aside too
        # (module, attribute, shared parameter) given a private copy by a merge into a tied weight; see merge_adapter
        self._untied: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._untied_config_flag: bool | None = None
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            self.add_adapter(adapter_name, config)
        except Exception:
            self._unwrap(keep=None)  # leave the caller's model exactly as it was
            raise
        self.set_adapter(adapter_name)

    # ---- delegation ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # nn.Module's lookup by name, not super(): PeftModel.__getattr__ (a client-facing base) must not run.
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(nn.Module.__getattr__(self, "model"), name)

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        args, kwargs = self._prepare_inputs(args, kwargs, adapter_names)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        unknown = set(adapter_names) - set(self.configs) - {BASE_MODEL_SENTINEL}
        if unknown:
            raise AdapterStateError(f"unknown adapter name(s) {sorted(unknown)}; known: {list(self.configs)} and '__base__'")
        layers = [layer for _, layer in self.adapted_layers()]
        try:
            for layer in layers:
                layer.routing = list(adapter_names)
            return self.model(*args, **kwargs)
        finally:
            for layer in layers:
                layer.routing = None

    def _prepare_inputs(self, args: tuple, kwargs: dict, adapter_names: list[str] | None) -> tuple[tuple, dict]:
        """Input-side adapters (DePT's soft prompt) rewrite the model inputs before the base model runs.

        A shared module (`Adapter.build_shared`) that defines `prepare_inputs(model, args, kwargs)` is called for
        each active adapter, unless adapters are disabled.
        """
        if self._inputs_disabled:
            return args, kwargs
        for name in self._active:
            hook = getattr(self.shared[name], "prepare_inputs", None) if name in self.shared else None
            if hook is None:
                continue
            if adapter_names is not None:
                raise AdapterStateError(
                    f"adapter {name!r} ({self.configs[name].method_name}) changes the model inputs, so it cannot be "
                    "routed per sample with adapter_names; run those samples in separate calls"
                )
            args, kwargs = hook(self.model, args, kwargs)
        return args, kwargs

    def generate(self, *args, **kwargs):
        """The wrapped model's `generate`; an active input-side adapter (DePT) that defines
        `generate(model, adapter, args, kwargs)` on its shared module runs it instead, so its prompt is not dropped."""
        if not self._inputs_disabled:
            for name in self._active:
                hook = getattr(self.shared[name], "generate", None) if name in self.shared else None
                if hook is None:
                    continue
                if len([n for n in self._active if n in self.shared and hasattr(self.shared[n], "generate")]) > 1:
                    raise AdapterStateError("only one active input-side adapter can generate at a time; set_adapter one")
                layer = self.model.get_input_embeddings()
                return hook(self.model, layer.adapters[name], args, kwargs)
        return self.model.generate(*args, **kwargs)

    # ---- adapters -----------------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, AdaptedLayer):
                yield name, module

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        for name, module in self.model.named_modules():
            if isinstance(module, ModulesToSave):
                yield name, module

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None:
        """Inject a new adapter (inactive unless it is the first). The model is unchanged if this raises."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == BASE_MODEL_SENTINEL:
            raise ConfigError(f"adapter_name={adapter_name!r} is invalid: use a non-empty name without '.'")
        if adapter_name in self.configs:
            raise AdapterStateError(f"an adapter named {adapter_name!r} already exists; delete it or pick another name")
        info = get_method(config.method_name)
        targets = resolve_targets(self.model, config)
        for name, module in targets.items():
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            config.check_layer(name, base, layer_kind(base))
        wrapped: dict[str, AdaptedLayer] = {}
        newly_wrapped: list[str] = []
        try:
            for name, module in targets.items():
                if not isinstance(module, AdaptedLayer):
                    module = AdaptedLayer(module)
                    _set_submodule(self.model, name, module)
                    newly_wrapped.append(name)
                wrapped[name] = module
            shared = info.adapter_cls.build_shared(config, wrapped)
            if shared is not None:
                self.shared[adapter_name] = shared
            for name, layer in wrapped.items():
                adapter = info.adapter_cls(config, layer, name, shared)
                adapter.to(layer.weight.device)
                layer.adapters[adapter_name] = adapter
            self._add_modules_to_save(adapter_name, config)
        except Exception:
            for layer in wrapped.values():
                if adapter_name in layer.adapters:
                    del layer.adapters[adapter_name]
            for name in newly_wrapped:
                _set_submodule(self.model, name, wrapped[name].base_layer)
            if adapter_name in self.shared:
                del self.shared[adapter_name]
            raise
        self.configs[adapter_name] = config
        self._refresh_trainable()

    def _add_modules_to_save(self, adapter_name: str, config: AdapterConfig) -> None:
        for pattern in config.modules_to_save or []:
            matched = False
            for name, module in list(self.model.named_modules()):
                if not name or not matches_module(name, [pattern]) or isinstance(module, AdaptedLayer):
                    continue
                if not isinstance(module, ModulesToSave):
                    if any(isinstance(m, (ModulesToSave, AdaptedLayer)) for m in module.modules()):
                        continue
                    module = ModulesToSave(module)
                    _set_submodule(self.model, name, module)
                module.add(adapter_name)
                matched = True
            if not matched:
                raise TargetError(f"modules_to_save entry {pattern!r} matched no module")

    def set_adapter(self, adapter_names: str | list[str]) -> None:
        """Make these adapters active (several active adapters add up); only they are trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.configs]
        if unknown:
            raise AdapterStateError(f"unknown adapter(s) {unknown}; known: {list(self.configs)}")
        self._active = names
        for _, layer in self.adapted_layers():
            layer.active_adapters = [n for n in names if n in layer.adapters]
        for _, module in self.saved_modules():
            module.active = next((n for n in names if n in module.modules_to_save), None)
        self._refresh_trainable()

    def _refresh_trainable(self) -> None:
        active = set(self._active)
        for _, layer in self.adapted_layers():
            for name, adapter in layer.adapters.items():
                for p in adapter.parameters():
                    p.requires_grad_(name in active and getattr(p, "_rankwise_trainable", True))
        for name, shared in self.shared.items():
            for p in shared.parameters():
                p.requires_grad_(name in active and getattr(p, "_rankwise_trainable", True))
        for _, module in self.saved_modules():
            for name, copy_ in module.modules_to_save.items():
                for p in copy_.parameters():
                    p.requires_grad_(name in active)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.configs:
            raise AdapterStateError(f"no adapter named {adapter_name!r}; known: {list(self.configs)}")
        if any(adapter_name in layer.merged_adapters for _, layer in self.adapted_layers()):
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() before deleting it")
        for name, layer in list(self.adapted_layers()):
            if adapter_name in layer.adapters:
                del layer.adapters[adapter_name]
                layer.active_adapters = [n for n in layer.active_adapters if n != adapter_name]
            if not layer.adapters:
                _set_submodule(self.model, name, layer.base_layer)
        for name, module in list(self.saved_modules()):
            if adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
            if not module.modules_to_save:
                _set_submodule(self.model, name, module.original_module)
            elif module.active == adapter_name:
                module.active = None
        if adapter_name in self.shared:
            del self.shared[adapter_name]
        del self.configs[adapter_name]
        self._active = [n for n in self._active if n != adapter_name]

    @contextlib.contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged first)."""
        layers = [m for _, m in self.adapted_layers()] + [m for _, m in self.saved_modules()]
        previous = [m.disabled for m in layers]
        previous_inputs = self._inputs_disabled
        try:
            for m in layers:
                m.disabled = True
            self._inputs_disabled = True
            yield
        finally:
            for m, was in zip(layers, previous):
                m.disabled = was
            self._inputs_disabled = previous_inputs

    # ---- merge --------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters into the base weights in place, all or nothing.

        Every layer is checked first (`check_merge`): a non-finite result in any layer raises `MergeError`
        before any weight changes, in every mode. A weight tied to another module (a LLaMA's `embed_tokens` and
        its `lm_head` share one tensor) is untied first: the adapter on the embedding changes only the input side
        in the forward pass, so merging it into the shared tensor would silently change the head too. The other
        module keeps the unmerged weight in a private copy (and `config.tie_word_embeddings` is set to False, so
        a saved merged model reloads with both); `unmerge_adapter` ties them again.
        """
        names = self._active if adapter_names is None else adapter_names
        layers = [layer for _, layer in self.adapted_layers()]
        for layer in layers:
            layer.check_merge(names, safe_merge=safe_merge)
        self._untie_shared_weights(names)
        try:
            for layer in layers:
                layer.merge(names, safe_merge=safe_merge)
        except Exception:
            if not any(layer.merged_adapters for layer in layers):
                self._retie_shared_weights()  # nothing merged: leave the model as it was
            raise

    def unmerge_adapter(self) -> None:
        for _, layer in self.adapted_layers():
            layer.unmerge()
        self._retie_shared_weights()

    def _untie_shared_weights(self, names: list[str]) -> None:
        owners: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in self.model.modules():
            for attr, param in module._parameters.items():
                if param is not None:
                    owners.setdefault(id(param), []).append((module, attr))
        for layer_name, layer in self.adapted_layers():
            if not any(n in layer.adapters and n not in layer.merged_adapters for n in names):
                continue
            weight = layer.base_layer.weight
            others = [(m, a) for m, a in owners.get(id(weight), []) if m is not layer.base_layer]
            for module, attr in others:
                copy_ = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                setattr(module, attr, copy_)
                self._untied.append((module, attr, weight))
                owners[id(copy_)] = [(module, attr)]
            if others:
                owners[id(weight)] = [(layer.base_layer, "weight")]
                config = getattr(self.model, "config", None)
                if getattr(config, "tie_word_embeddings", False):
                    self._untied_config_flag = True
                    config.tie_word_embeddings = False
                warnings.warn(
                    f"the weight of {layer_name!r} is shared with another module (tied embeddings); merging unties "
                    "them so that module keeps the unmerged weight and the outputs stay equal "
                    "(config.tie_word_embeddings is now False); unmerge_adapter() ties them again",
                    stacklevel=3,
                )

    def _retie_shared_weights(self) -> None:
        while self._untied:
            module, attr, shared = self._untied.pop()
            setattr(module, attr, shared)
        if self._untied_config_flag is not None:
            self.model.config.tie_word_embeddings = self._untied_config_flag
            self._untied_config_flag = None

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the active (or given) adapters into the base weights and return the plain base model.

        Safe merge checks every layer before any weight changes.
        """
        names = self._active if adapter_names is None else adapter_names
        for config in (self.configs[n] for n in names):
            reason = getattr(config, "unmergeable_reason", None)
            if reason:
                raise AdapterStateError(f"{config.method_name} cannot be merged: {reason}")
        self.merge_adapter(names, safe_merge=safe_merge)
        return self._unwrap(keep=names[0] if names else None)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the base model as it was."""
        self.unmerge_adapter()
        return self._unwrap(keep=None)

    def _unwrap(self, keep: str | None) -> nn.Module:
        for name, layer in list(self.adapted_layers()):
            _set_submodule(self.model, name, layer.base_layer)
        for name, module in list(self.saved_modules()):
            chosen = module.modules_to_save[keep] if keep in module.modules_to_save else module.original_module
            _set_submodule(self.model, name, chosen)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(name, True))
        self._untied = []  # a merged model keeps its untied copies (the merge is final)
        self._untied_config_flag = None
        return self.model

    # ---- parameters ---------------------------------------------------------------------------
    def parameter_groups(self, lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
        """Optimizer param groups of the trainable parameters, honouring each adapter's `lr_scale`."""
        groups: dict[float, list[torch.nn.Parameter]] = {}
        seen: set[int] = set()
        for _, layer in self.adapted_layers():
            for name in self._active:
                if name in layer.adapters:
                    for group in layer.adapters[name].parameter_groups():
                        params = [p for p in group["params"] if p.requires_grad and id(p) not in seen]
                        seen.update(id(p) for p in params)
                        groups.setdefault(float(group.get("lr_scale", 1.0)), []).extend(params)
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in seen]
        groups.setdefault(1.0, []).extend(rest)
        return [
            {"params": ps, "lr": lr * scale, "weight_decay": weight_decay, "lr_scale": scale}
            for scale, ps in groups.items() if ps
        ]

    def trainable_summary(self) -> dict[str, int | float]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}

    def print_trainable_parameters(self) -> None:
        s = self.trainable_summary()
        print(f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}")

    def delta_weights(self, adapter_name: str = "default") -> dict[str, torch.Tensor]:
        """Each adapted layer's dense update (canonical layout), for analysis and export."""
        with torch.no_grad():
            return {
                name: layer.adapters[adapter_name].delta_weight(layer.weight_matrix().float())
                for name, layer in self.adapted_layers() if adapter_name in layer.adapters
            }

    # ---- files (implemented in core/io.py) ----------------------------------------------------
    def save_adapter(self, directory, adapter_names: list[str] | None = None) -> None:
        from rankwise.core.io import save_adapter

        save_adapter(self, directory, adapter_names)


def _restore_adapted(base_cls: type) -> AdaptedModel:
    return nn.Module.__new__(adapted_class(base_cls, AdaptedModel))


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> AdaptedModel:
    """Inject `config`'s adapter into `model` (in place) and return the wrapper; base weights are frozen."""
    if isinstance(model, AdaptedModel):
        model.add_adapter(adapter_name, config)
        return model
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"adapt() expects an AdapterConfig (e.g. rankwise.LoraConfig), got {type(config).__name__}")
    return AdaptedModel(model, config, adapter_name)
