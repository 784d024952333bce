"""Weight-only quantization of a frozen base (QLoRA-style: Dettmers et al., 2023, arXiv 2305.14314).

    nn.Linear (fp32 W, out x in)  --quantize_base-->  QuantizedLinear (int8 per-row / int4 per-group W + scales)
                                                          |  forward  y = x dequant(Wq)^T + b
                                                          |  backward dx = g dequant(Wq)  (re-dequantized, transient)
    rankwise.adapt(model, LoraConfig(...))  -->  adapters train on top; the base stays quantized and frozen

The quantized tensors come from torchao (`pip install "rankwise[quant]"`): `Int8WeightOnlyConfig` (per-row int8)
and `IntxWeightOnlyConfig(int4, PerGroup(group_size))` (int4 values stored unpacked in int8: the packed int4
layouts need CUDA or the `mslk` kernels). Measured against optimum-quanto and bitsandbytes on this torch wheel
(see the quantized-base guide): the same int8 error, and torchao is the PyTorch-maintained one whose weights are
plain `nn.Linear` parameters, so every rankwise target pattern still matches.

Why rankwise swaps the module for `QuantizedLinear` (still an `nn.Linear`): torchao's CPU linear runs under
`__torch_function__`, so autograd saves the *dequantized* weight for the input gradient -- a dense fp32 copy
of every layer lives until backward, and training would hold as much as the fp32 base. `QuantizedLinear`
saves only the quantized weight and dequantizes it again in backward, one layer at a time.

Merging (`AdaptedModel.merge_and_unload`) dequantizes, adds the update and leaves a *dense* weight: re-quantizing
W + dW can round a small update away entirely (PEFT issue #2586). `merge_and_requantize` re-quantizes on request
and raises `MergeError` for any layer whose update the re-quantization would erase.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import threading
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.errors import ConfigError, MergeError, RankwiseError

SCHEMES = ("int8", "int4")
INSTALL_HINT = 'pip install "rankwise[quant]"  (or: pip install torchao==0.18.*)'


class QuantBackendError(RankwiseError, ImportError):
    """The weight-only quantization backend (torchao) is not installed or cannot be imported."""


class _ImportNoiseFilter(logging.Filter):
    """Drops two log lines torchao's import emits on a CPU-only torch wheel, nothing else.

    torchao tries to load its CUDA-only extensions (`_C_mxfp8`, `_C_cutlass_90a`) and logs "Failed to load ..."
    for each, and torch logs a deprecation for torchao's enums registered as pytree constants: noise a user can
    neither act on nor avoid (transformers imports torchao by itself when it is installed).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "torchao":
            return not (message.startswith("Failed to load") and "_C_" in message and torch.version.cuda is None)
        return "is an Enum subclass and is now natively supported by torch.compile" not in message


def _install_import_noise_filter() -> None:
    for name in ("torchao", "torch.utils._pytree"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ImportNoiseFilter) for f in logger.filters):
            logger.addFilter(_ImportNoiseFilter())


_install_import_noise_filter()  # at `import rankwise`, so it also covers transformers importing torchao first


def _torchao_quantization():
    """torchao.quantization, imported quietly, or QuantBackendError naming the install command."""
    try:
        return importlib.import_module("torchao.quantization")
    except ImportError as exc:
        raise QuantBackendError(
            f"quantizing the base needs torchao, which is not installed ({exc}); install it with: {INSTALL_HINT}"
        ) from None


def torchao_config(scheme: str, group_size: int = 64):
    """The torchao config object of a rankwise scheme name."""
    if scheme not in SCHEMES:
        raise ConfigError(f"quantization scheme={scheme!r} is unknown: expected one of {', '.join(SCHEMES)}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ConfigError(f"quantization group_size={group_size!r} is invalid: expected a positive int (e.g. 32, 64, 128)")
    tq = _torchao_quantization()
    if scheme == "int8":
        return tq.Int8WeightOnlyConfig()
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=tq.PerGroup(group_size))


# ---- the frozen quantized linear ------------------------------------------------------------------------------
def is_quantized(weight: Any) -> bool:
    """True for a torchao quantized weight (a tensor subclass with `dequantize()` and int storage)."""
    return isinstance(weight, torch.Tensor) and type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "dequantize") and hasattr(weight, "qdata")


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `weight`'s values: dequantized when it is quantized, else `weight` itself."""
    return weight.dequantize() if is_quantized(weight) else weight


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a (possibly quantized) tensor holds: the sum over its inner tensors for a torchao subclass."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n, None) is not None)
    return tensor.numel() * tensor.element_size()


_scratch = threading.local()


def dequantized_scratch(weight: torch.Tensor) -> torch.Tensor:
    """`weight.dequantize()` written into a buffer reused by every weight of the same shape (fp32 weights).

    Valid only until the next call for that shape on this thread: for a matmul that is consumed at once, never
    for a tensor that is kept. Why: a fresh weight-sized tensor per layer per forward and backward fragments
    glibc's heap between the saved activations; on SmolLM2 a 16-token LoRA step grew RSS by 500+ MiB a step.
    Same values as `dequantize()` ((q - zero_point) * scale per block, in fp32), checked in tests/test_quant.py.
    """
    block = getattr(weight, "block_size", None)
    if weight.dtype != torch.float32 or block is None or len(block) != 2 or weight.qdata.dim() != 2:
        return weight.dequantize()
    q = weight.qdata
    rows, cols = q.shape
    bo, bi = block
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (rows, cols, q.device)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(rows, cols, dtype=torch.float32, device=q.device)
    blocks = buf.view(rows // bo, bo, cols // bi, bi)
    buf.copy_(q)
    if weight.zero_point is not None:
        blocks.sub_(weight.zero_point.view(rows // bo, 1, cols // bi, 1))
    blocks.mul_(weight.scale.view(rows // bo, 1, cols // bi, 1))
    return buf


class _FrozenQuantizedLinearFn(torch.autograd.Function):
    """y = x Wq^T + b with Wq frozen; saves only the quantized Wq (by reference), dequantizes it again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the module's parameter: a reference, no copy, and no dense fp32 copy kept alive
        ctx.has_bias = bias is not None
        # Dequantize into a reused buffer and run one dense matmul rather than torchao's CPU kernel: that kernel
        # allocates a weight-sized copy and two output-sized temporaries (scale, bias) per call, which fragment
        # the heap between the saved activations (+700 MiB peak RSS on a SmolLM2 LoRA step, bench/bench_quant.py).
        return F.linear(x, dequantized_scratch(weight), bias)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantized_scratch(ctx.weight).to(grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_b


class QuantizedLinear(nn.Linear):
    """An `nn.Linear` whose frozen weight is a torchao quantized tensor (see the module docstring for why)."""

    scheme: str
    group_size: int

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: torch.Tensor, scheme: str, group_size: int) -> "QuantizedLinear":
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.out_features = linear.in_features, linear.out_features
        module.weight = nn.Parameter(weight, requires_grad=False)
        module.bias = linear.bias
        module.scheme, module.group_size = scheme, group_size
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _FrozenQuantizedLinearFn.apply(x, self.weight, self.bias)
        return F.linear(x, dequantized_scratch(self.weight), self.bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, scheme={self.scheme}{group}"


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int = 64) -> torch.Tensor:
    """A dense (out x in) weight quantized with `scheme`; the result keeps `weight`'s dtype as its compute dtype."""
    tq = _torchao_quantization()
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        holder.weight.copy_(weight)
    tq.quantize_(holder, torchao_config(scheme, group_size))
    return holder.weight.detach()


# ---- quantize a model -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class QuantReport:
    """What `quantize_base` did: which layers, and the weight bytes they held before and after."""

    scheme: str
    backend: str
    group_size: int | None
    layers: list[str]
    skipped: dict[str, str]
    weight_bytes_before: int
    weight_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int

    @property
    def ratio(self) -> float:
        """Model bytes after / before (parameters and buffers)."""
        return self.model_bytes_after / max(self.model_bytes_before, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}

    def summary(self) -> str:
        return (
            f"{self.scheme} ({self.backend}): {len(self.layers)} linear layers quantized, {len(self.skipped)} skipped; "
            f"their weights {self.weight_bytes_before / 2**20:.1f} -> {self.weight_bytes_after / 2**20:.1f} MiB, "
            f"model {self.model_bytes_before / 2**20:.1f} -> {self.model_bytes_after / 2**20:.1f} MiB"
        )


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or name.endswith("." + p) or name.split(".")[-1] == p for p in patterns)


def quantize_base(model: nn.Module, scheme: str = "int8", skip: Iterable[str] = ("lm_head",), group_size: int = 64,
                  compute_dtype: torch.dtype | None = None) -> QuantReport:
    """Quantize the frozen `nn.Linear` layers of `model` in place (weight-only) and report what changed.

        model = AutoModelForCausalLM.from_config(cfg)
        report = rankwise.quantize_base(model, "int8")      # then rankwise.adapt(model, LoraConfig(...))

    `skip`: module names (or last name parts) to leave dense; the LM head by default (often tied to the input
    embeddings, which are not linear layers and stay dense too). A weight shared by several modules, a layer
    already wrapped by an adapter, and (int4) a layer whose input width is not a multiple of `group_size` are
    skipped and listed in the report with the reason. Raises `ConfigError` for an unknown scheme and
    `QuantBackendError` (a `RankwiseError`) naming the pip command when torchao is not installed.

    `compute_dtype`: cast each linear to this dtype just before quantizing it (one layer at a time), e.g. load a
    bf16 checkpoint and quantize with `compute_dtype=torch.float32` so no full fp32 copy ever exists; the layers
    left dense keep their dtype (cast them yourself). Default: each layer's own dtype.
    """
    from rankwise.core.layer import AdaptedLayer

    config = torchao_config(scheme, group_size)  # validates and imports before anything changes
    tq = _torchao_quantization()
    if any(isinstance(m, AdaptedLayer) for m in model.modules()):
        raise ConfigError("quantize_base() runs on the plain base model, before rankwise.adapt(): quantize first, then adapt")
    skip = tuple(skip or ())
    import torchao

    before = _model_bytes(model)
    weight_users: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            weight_users[id(p)] = weight_users.get(id(p), 0) + 1
    layers: list[str] = []
    skipped: dict[str, str] = {}
    w_before = w_after = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            if isinstance(module, QuantizedLinear):
                skipped[name] = "already quantized"
            continue
        if _matches(name, skip):
            skipped[name] = "in skip"
            continue
        if weight_users[id(module.weight)] > 1:
            skipped[name] = "weight is shared (tied) with another module"
            continue
        if scheme == "int4" and module.in_features % group_size:
            skipped[name] = f"in_features={module.in_features} is not a multiple of group_size={group_size}"
            continue
        if compute_dtype is not None:
            module.to(compute_dtype)
        w_before += tensor_bytes(module.weight)
        tq.quantize_(module, config)  # replaces module.weight by the quantized tensor subclass
        quantized = QuantizedLinear.from_linear(module, module.weight.detach(), scheme, group_size)
        w_after += tensor_bytes(quantized.weight)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, quantized)
        layers.append(name)
    _return_freed_memory()
    if not layers:
        raise ConfigError(f"quantize_base() found no nn.Linear layer to quantize (skip={list(skip)}); skipped: {skipped}")
    return QuantReport(
        scheme=scheme,
        backend=f"torchao {torchao.__version__}",
        group_size=group_size if scheme == "int4" else None,
        layers=layers,
        skipped=skipped,
        weight_bytes_before=w_before,
        weight_bytes_after=w_after,
        model_bytes_before=before,
        model_bytes_after=_model_bytes(model),
    )


def _return_freed_memory() -> None:
    """Hand the freed fp32 weights back to the OS (glibc keeps freed heap pages otherwise).

    Without this the freed weights stay in the process as heap holes that the training step's large (mmap'd)
    allocations never reuse: measured on SmolLM2-135M, RSS after quantization 985 MiB instead of 608 MiB, and a
    higher training peak than the fp32 base. Best effort: a no-op where libc has no `malloc_trim`.
    """
    import gc
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# ---- merge ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class MergeReport:
    """Per-layer error of a merge into a quantized base, on a random probe of the layer input.

    `merge_error`: max |y_merged - y_adapted| (the merged layer against the adapted one it replaces);
    `update_size`: max |y_adapted - y_base| (how much the adapter changes the layer), for scale.
    """

    requantized: bool
    merge_error: dict[str, float]
    update_size: dict[str, float]

    @property
    def max_merge_error(self) -> float:
        return max(self.merge_error.values(), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "max_merge_error": self.max_merge_error}


def merge_and_requantize(model, requantize: bool = False, probe_rows: int = 16, seed: int = 0):
    """`merge_and_unload()` for a model adapted over a quantized base, with the merge error reported.

    Returns `(merged_model, MergeReport)`. `requantize=False` (default): merged layers hold dense weights in the
    base's compute dtype (exact merge). `requantize=True`: each merged weight is quantized again with its layer's
    scheme; a layer whose re-quantized weight equals its old quantized weight although the adapter changes the
    layer raises `MergeError` (the update would be silently lost, PEFT #2586) before any weight changes.
    """
    from rankwise.core.layer import AdaptedLayer

    generator = torch.Generator().manual_seed(seed)
    merge_error: dict[str, float] = {}
    update_size: dict[str, float] = {}
    plans: list[tuple[str, torch.Tensor | None, QuantizedLinear]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for name, layer in model.adapted_layers():
                base = layer.base_layer
                if not isinstance(base, QuantizedLinear):
                    continue
                names = [n for n in model.active_adapters if n in layer.adapters]
                if not names:
                    continue
                weight = dense(base.weight).float()
                merged = weight
                for n in names:
                    merged = layer.adapters[n].merged_weight(merged)
                probe = torch.randn(probe_rows, base.in_features, generator=generator).to(weight.device, base.weight.dtype)
                y_adapted = layer(probe).float()
                with model.disable_adapter():
                    y_base = layer(probe).float()
                requantized = None
                if requantize:
                    requantized = quantize_weight(merged.to(base.weight.dtype), base.scheme, base.group_size)
                    effective = requantized.dequantize().float()
                    # Re-quantizing is not idempotent (the scales are recomputed), so compare with the base
                    # re-quantized the same way: equal means the update did not survive the rounding.
                    without_update = quantize_weight(weight.to(base.weight.dtype), base.scheme, base.group_size)
                    # (the scales move by an ulp when the row maximum moves by a hair: compare them to 1e-5)
                    lost = torch.equal(without_update.qdata, requantized.qdata) and torch.allclose(
                        without_update.scale.float(), requantized.scale.float(), rtol=1e-5, atol=0
                    )
                    if lost and bool((y_adapted != y_base).any()):
                        raise MergeError(
                            f"re-quantizing {name} after the merge gives back its old {base.scheme} weight: the update is "
                            "below the quantization step and would be lost; merge with requantize=False (dense weights)"
                        )
                else:
                    effective = merged.to(base.weight.dtype).float()
                bias = base.bias.float() if base.bias is not None else None
                y_merged = F.linear(probe.float(), effective, bias)
                merge_error[name] = float((y_merged - y_adapted).abs().max())
                update_size[name] = float((y_adapted - y_base).abs().max())
                plans.append((name, requantized, base))
    finally:
        model.train(was_training)
    merged_model = model.merge_and_unload()
    for name, requantized, old in plans:
        if requantized is not None:
            # the merge left a dense nn.Linear at `name`; put its re-quantized form there
            merged_linear = merged_model.get_submodule(name)
            parent_name, _, child = name.rpartition(".")
            parent = merged_model.get_submodule(parent_name) if parent_name else merged_model
            setattr(parent, child, QuantizedLinear.from_linear(merged_linear, requantized, old.scheme, old.group_size))
    return merged_model, MergeReport(requantized=requantize, merge_error=merge_error, update_size=update_size)
