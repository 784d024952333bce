"""What makes an `AdaptedModel` look like a `peft.PeftModel` to the clients that only accept one.

`transformers.Trainer`, `trl` and `accelerate` recognise an adapter model by `isinstance(model, PeftModel)` and by
the wrapped class's `forward` signature, then call a handful of PEFT methods::

    AdaptedModel(llama, config)  ->  instance of AdaptedLlamaForCausalLM(AdaptedModel, PeftModel)   (`adapted_class`)
        .forward            the wrapped class's signature + adapter_names   (`forward_signature`)
        .get_base_model()   .base_model   .save_pretrained(dir)   .load_adapter(dir, name)   (`PeftClientMethods`)

`PeftModel.__init__` never runs: every PEFT method those clients call is defined in `PeftClientMethods` with PEFT's
meaning, and nothing else of PEFT is relied on. Without PEFT (or for a model that is not a transformers model) the
subclass only carries the signature.
"""
from __future__ import annotations

import inspect
import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

from rankwise.core.errors import AdapterStateError, ConfigError

if TYPE_CHECKING:
    from rankwise.core.model import AdaptedModel


class PeftClientMethods:
    """The `PeftModel` methods `transformers.Trainer`, `trl` and PEFT callers use, on `AdaptedModel` (a mixin:
    `self` is the AdaptedModel; its `model`, `configs`, `shared`, `adapted_layers` and `save_adapter` are used)."""

    def get_base_model(self) -> nn.Module:
        """The wrapped model, adapters injected (PEFT's spelling; `transformers.Trainer` inspects its `forward`)."""
        return self.model

    @property
    def base_model(self) -> "AdaptedModel":
        # PEFT's layout: `peft_model.base_model.model` is the wrapped model (Trainer's label smoothing and NEFTune
        # reach it that way); here the wrapper plays both PEFT roles.
        return self

    def save_pretrained(
        self,
        save_directory,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        state_dict: dict | None = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's spelling of `save_adapter`, with the arguments `transformers.Trainer` and PEFT callers pass.

        Writes adapter_config.json + adapter_model.safetensors (others adapters in sub-directories), never the base
        weights. `state_dict` (the Trainer passes the full model's under FSDP/DeepSpeed) is not used: the adapter
        tensors are read from the adapters themselves. Other PEFT keywords (`save_embedding_layers`, ...) are
        accepted and ignored, as rankwise never saves base layers.
        """
        if not safe_serialization:
            raise ConfigError("safe_serialization=False: rankwise writes safetensors only (no pickles); drop the argument")
        if not is_main_process:
            return
        self.save_adapter(save_directory, selected_adapters)

    def load_adapter(self, directory, adapter_name: str = "default", strict: bool = True, is_trainable: bool = True,
                     **kwargs: Any) -> None:
        """Load a saved adapter under `adapter_name`; into the existing adapter of that name if there is one.

        Reloading an existing adapter (what the Trainer does to resume or to load the best checkpoint) requires the
        saved config to be the same method and to fit: the weights are checked, then copied in place, so the
        optimizer keeps pointing at the same parameters. `is_trainable=False` freezes the loaded adapter (PEFT's
        inference mode). Other PEFT keywords are accepted and ignored. On any error the model is unchanged.
        """
        from rankwise.core.io import _check_and_load, load_adapter_into, read_config, read_weights

        if adapter_name in self.configs:
            saved = read_config(directory, strict=strict)
            if saved.method_name != self.configs[adapter_name].method_name:
                raise AdapterStateError(
                    f"{directory} holds a {saved.method_name} adapter but adapter {adapter_name!r} is "
                    f"{self.configs[adapter_name].method_name}; load it under another adapter_name"
                )
            _check_and_load(self, adapter_name, read_weights(directory))
        else:
            load_adapter_into(self, directory, adapter_name, strict=strict)
        if not is_trainable:
            for _, layer in self.adapted_layers():
                if adapter_name in layer.adapters:
                    layer.adapters[adapter_name].requires_grad_(False)
            if adapter_name in self.shared:
                self.shared[adapter_name].requires_grad_(False)


_ADAPTED_CLASSES: "weakref.WeakKeyDictionary[type, type]" = weakref.WeakKeyDictionary()


def forward_signature(base_cls: type) -> inspect.Signature | None:
    """The wrapped class's `forward` signature with a keyword-only `adapter_names` (None if it has none)."""
    try:
        signature = inspect.signature(base_cls.forward)
    except (TypeError, ValueError, AttributeError):
        return None
    params = list(signature.parameters.values())
    if "adapter_names" not in signature.parameters:
        extra = inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None)
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, extra)
    try:
        return signature.replace(parameters=params)
    except ValueError:  # an unusual parameter order: fall back to the generic signature
        return None


def client_bases(base_cls: type) -> tuple[type, ...]:
    """`(peft.PeftModel,)` when the wrapped class is a transformers model and PEFT is installed (module docstring)."""
    import importlib.util
    import sys

    transformers = sys.modules.get("transformers")
    pretrained = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    if pretrained is None or not issubclass(base_cls, pretrained) or importlib.util.find_spec("peft") is None:
        return ()
    try:
        from peft import PeftModel
    except Exception:  # a broken PEFT install only costs the Trainer integration, never adapt()
        return ()
    return (PeftModel,)


def adapted_class(base_cls: type, adapted_model: type) -> type:
    """`adapted_model`'s (AdaptedModel's) subclass for one wrapped class: same behaviour, the wrapped class's
    `forward` signature, and `peft.PeftModel` as a further base when `client_bases` gives it."""
    if base_cls in _ADAPTED_CLASSES:
        return _ADAPTED_CLASSES[base_cls]
    namespace: dict[str, Any] = {"__module__": adapted_model.__module__, "__doc__": adapted_model.__doc__}
    signature = forward_signature(base_cls)
    if signature is not None:
        def forward(self, *args, **kwargs):
            return adapted_model.forward(self, *args, **kwargs)

        forward.__signature__ = signature
        forward.__doc__ = getattr(base_cls.forward, "__doc__", None)
        forward.__qualname__ = f"Adapted{base_cls.__name__}.forward"
        namespace["forward"] = forward
    cls = type(f"Adapted{base_cls.__name__}", (adapted_model, *client_bases(base_cls)), namespace)
    _ADAPTED_CLASSES[base_cls] = cls
    return cls
