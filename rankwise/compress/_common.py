"""What every compressor shares: layer selection, the factored layer, calibration plumbing, the report.

A compressor is a function `compress(model, config, calibration) -> (model, report)` (DESIGN.md). It
replaces selected `nn.Linear` layers in place by smaller modules that are ordinary `nn.Module`s
built from `nn.Linear`/`nn.Embedding` children, so the compressed model saves as plain safetensors
and LoRA can target the factors afterwards. `serialize.py` writes/reads them.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from rankwise.core.errors import ShapeError, TargetError, check_field
from rankwise.linalg import SecondMoments

# Layers no compressor touches unless asked by name: they tie to the vocabulary or are tiny.
NEVER_BY_DEFAULT = re.compile(r"(^|\.)(lm_head|embed_tokens|wte|wpe|word_embeddings|position_embeddings|classifier)$")


@dataclass
class CompressConfig:
    """Fields every compressor has.

    ratio: parameters kept in the compressed layers, in (0, 1] (0.5 keeps half of them).
    target_modules: regexes (`re.search`) over module names; `None` = every `nn.Linear` inside the
        repeated blocks (decoder/encoder layers), or every `nn.Linear` if the model has no blocks.
    exclude_modules: regexes of names to leave alone.
    """

    ratio: float = 0.5
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from rankwise.core.config import check_numeric_fields

        check_numeric_fields(self, max_size=None)  # inf/nan and bools-for-numbers, shared with the adapter configs
        name = type(self).__name__
        check_field(isinstance(self.ratio, (int, float)) and 0 < self.ratio <= 1, name, "ratio", self.ratio,
                    "a fraction of parameters to keep in (0, 1], e.g. 0.5")
        for fld in ("target_modules", "exclude_modules"):
            value = getattr(self, fld)
            if value is None:
                continue
            check_field(isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), name, fld,
                        value, "a list of regular expressions over module names")
            for pattern in value:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    check_field(False, name, fld, pattern, f"a valid regular expression ({exc})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- layers
class LowRankLinear(nn.Module):
    """`y = up(act(down(x)))`: a linear layer stored as two factors, `down: in -> r`, `up: r -> out`.

        x [.., in] --down (r x in, bias b1)--> [.., r] --act--> --up (out x r, bias b2)--> y [.., out]

    `act` is the identity except for AFM's "+Act" variant. Both factors are trainable `nn.Linear`s,
    so LoRA or distillation can target them by name (`...down`, `...up`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, down_bias: bool = False,
                 up_bias: bool = True, activation: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.down = nn.Linear(self.in_features, self.rank, bias=down_bias)
        self.up = nn.Linear(self.rank, self.out_features, bias=up_bias)
        self.activation = activation
        self.act = ACTIVATIONS[activation]() if activation else nn.Identity()

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, up_bias: torch.Tensor | None = None,
                     down_bias: torch.Tensor | None = None, activation: str | None = None) -> "LowRankLinear":
        """Build from `up` (out x r) and `down` (r x in) so that `weight == up @ down`."""
        if up.shape[1] != down.shape[0]:
            raise ShapeError(f"factor shapes do not chain: up {tuple(up.shape)} @ down {tuple(down.shape)}")
        layer = cls(down.shape[1], up.shape[0], down.shape[0], down_bias is not None, up_bias is not None,
                    activation).to(down.dtype)
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
            if down_bias is not None:
                layer.down.bias.copy_(down_bias)
            if up_bias is not None:
                layer.up.bias.copy_(up_bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))

    @property
    def weight(self) -> torch.Tensor:
        """The dense `out x in` product (only meaningful without an activation)."""
        return self.up.weight @ self.down.weight

    def spec(self) -> dict[str, Any]:
        return {"kind": "low_rank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "down_bias": self.down.bias is not None, "up_bias": self.up.bias is not None,
                "activation": self.activation}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "LowRankLinear":
        return cls(spec["in"], spec["out"], spec["rank"], spec["down_bias"], spec["up_bias"], spec["activation"])


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def rank_for_ratio(in_features: int, out_features: int, ratio: float) -> int:
    """Largest rank whose two factors hold at most `ratio` of the dense `in*out` parameters (at least 1)."""
    return max(1, math.floor(ratio * in_features * out_features / (in_features + out_features)))


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Factorising only shrinks a layer while `r (in + out) < in * out`."""
    return rank * (in_features + out_features) < in_features * out_features


def max_saving_rank(in_features: int, out_features: int) -> int:
    """The largest rank at which two factors are still smaller than the dense weight."""
    return (in_features * out_features - 1) // (in_features + out_features)


def low_rank_from_weight(linear: nn.Linear, up: torch.Tensor, down: torch.Tensor) -> LowRankLinear:
    """A `LowRankLinear` with the factors given and `linear`'s bias on the up factor, in `linear`'s dtype."""
    dtype = linear.weight.dtype
    bias = linear.bias.detach() if linear.bias is not None else None
    # on `linear`'s device: a freshly built module lives on the CPU even when the model runs on CUDA
    return LowRankLinear.from_factors(up.to(dtype), down.to(dtype), bias).to(device=linear.weight.device, dtype=dtype)


# --------------------------------------------------------------------------------------- selection
def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, module)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's repeated blocks: the longest `nn.ModuleList` whose children all share one type."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


def select_linears(model: nn.Module, config: CompressConfig, types: tuple[type, ...] = (nn.Linear,)) -> list[str]:
    """Names of the layers `config` targets; raises `TargetError` when nothing matches."""
    blocks = find_blocks(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, types):
            continue
        if config.target_modules is None:
            if NEVER_BY_DEFAULT.search(name):
                continue
            if blocks is not None and not name.startswith(blocks[0] + "."):
                continue
        elif not any(re.search(p, name) for p in config.target_modules):
            continue
        if any(re.search(p, name) for p in config.exclude_modules):
            continue
        names.append(name)
    if not names:
        kinds = "/".join(t.__name__ for t in types)
        raise TargetError(
            f"no compressible {kinds} layer in {type(model).__name__} matches target_modules="
            f"{config.target_modules!r} exclude_modules={config.exclude_modules!r}: pass regexes matching "
            f"layer names (see `model.named_modules()`)")
    return names


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


# ------------------------------------------------------------------------------------- calibration
Batch = Any  # a LongTensor of input ids, any tensor the model takes, or a dict of keyword tensors


def check_calibration(model: nn.Module, calibration: Iterable[Batch] | None, required: bool = True) -> list[Batch]:
    """Validate calibration batches before anything is changed; raise `ShapeError` naming the batch."""
    if calibration is None:
        if required:
            raise ShapeError("this method needs calibration data: pass a list of input batches (e.g. token ids [B, T])")
        return []
    batches = [calibration] if isinstance(calibration, (torch.Tensor, dict)) else list(calibration)
    if required and not batches:
        raise ShapeError("calibration is empty: pass at least one input batch")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    for i, batch in enumerate(batches):
        ids = batch.get("input_ids") if isinstance(batch, dict) else batch
        if not isinstance(ids, torch.Tensor):
            raise ShapeError(f"calibration batch {i} is a {type(ids).__name__}: expected a tensor or a dict of tensors")
        if vocab is not None:
            if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
                raise ShapeError(f"calibration batch {i} has shape {tuple(ids.shape)} and dtype {ids.dtype}: "
                                 "expected integer token ids of shape [batch, seq_len]")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ShapeError(f"calibration batch {i} has token ids outside [0, {vocab}): wrong tokenizer?")
    return batches


def run_model(model: nn.Module, batch: Batch) -> Any:
    """One forward pass on a batch, without a KV cache (cached keys would leak between batches)."""
    extra = {"use_cache": False} if getattr(getattr(model, "config", None), "use_cache", None) is not None else {}
    if isinstance(batch, dict):
        return model(**batch, **extra)
    return model(batch, **extra) if extra else model(batch)


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Batch]) -> list[tuple[tuple, dict]]:
    """The `(args, kwargs)` each batch feeds the first block (embeddings, masks, rotary tables)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    run_model(model, batch)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def block_hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_block(block: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    with torch.no_grad():
        outs = [block(*args, **kwargs) for args, kwargs in inputs]
    return [o[0] if isinstance(o, (tuple, list)) else o for o in outs]


def blockwise(model: nn.Module, batches: list[Batch], progress: str = "") -> Iterator[tuple[int, nn.Module, list]]:
    """Walk the blocks in order with their calibration inputs, sequentially.

    Yields `(index, block, inputs)`; after the caller has compressed `block`, the block is re-run so the
    next block sees the outputs of the already-compressed model (as MoDeGPT and AFM intend).
    """
    found = find_blocks(model)
    if found is None:
        raise TargetError(f"{type(model).__name__} has no repeated blocks (nn.ModuleList) to calibrate block by block")
    blocks = found[1]
    inputs = capture_block_inputs(model, blocks[0], batches)
    for index, block in enumerate(track(list(blocks), progress or "compressing blocks")):
        yield index, block, inputs
        outs = run_block(block, inputs)
        inputs = [with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]


def token_masks(batches: list[Batch]) -> list[torch.Tensor] | None:
    """The `attention_mask` of each dict batch as a bool `[B, T]` tensor, or None when no batch has one.

    Padded positions still flow through the model, but no output ever uses them; their rows would
    bias calibration statistics (a batch of short tweets padded to 64 tokens is mostly padding).
    """
    masks = [b.get("attention_mask") if isinstance(b, dict) else None for b in batches]
    if all(m is None for m in masks):
        return None
    return [m.bool() if m is not None else None for m in masks]


def real_rows(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The `[n, d]` rows of a `[B, T, d]` activation at unpadded positions (all rows without a usable mask)."""
    if mask is not None and tensor.dim() == 3 and tuple(tensor.shape[:2]) == tuple(mask.shape):
        return tensor[mask]
    return tensor.reshape(-1, tensor.shape[-1])


def moment_hooks(modules: dict[str, nn.Module], side: str = "input",
                 masks: list[torch.Tensor | None] | None = None, outer: bool = True) -> tuple[dict[str, SecondMoments], Callable[[], None]]:
    """Forward hooks accumulating float64 second moments of each module's input or output rows.

    Returns `(stats, remove)`; `stats[name]` is a `linalg.SecondMoments` filled on every forward.
    `masks` (one per calibration batch, in the order the batches are run; see `token_masks`) drops
    padded positions: the n-th call of a module is taken to be batch n.
    """
    stats: dict[str, SecondMoments] = {}
    calls: dict[str, int] = {}
    handles = []
    for name, module in modules.items():
        def hook(_m, args, output, name=name):
            tensor = args[0] if side == "input" else output
            index = calls.get(name, 0)
            calls[name] = index + 1
            mask = masks[index % len(masks)] if masks else None
            if name not in stats:
                stats[name] = SecondMoments(tensor.shape[-1], outer=outer)
            stats[name].update(real_rows(tensor, mask))
        handles.append(module.register_forward_hook(hook))
    return stats, lambda: [h.remove() for h in handles]


def collect_moments(model: nn.Module, modules: dict[str, nn.Module], batches: list[Batch],
                    side: str = "input", outer: bool = True) -> dict[str, SecondMoments]:
    """Run the whole model over `batches` once and return the second moments `moment_hooks` gathered
    (padded positions of dict batches with an `attention_mask` left out)."""
    stats, remove = moment_hooks(modules, side, token_masks(batches), outer)
    try:
        with torch.no_grad():
            for batch in batches:
                run_model(model, batch)
    finally:
        remove()
    return stats


def track(items: list, description: str) -> Iterator:
    """A rich progress bar when stderr is a terminal, plain iteration otherwise."""
    import sys

    if not sys.stderr.isatty():
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, transient=True)


# ------------------------------------------------------------------------------------------ report
@dataclass
class CompressionReport:
    """What a compressor did. Quality/latency/file size are filled by `measure`/the CLI."""

    method: str
    ratio: float
    params_before: int = 0
    params_after: int = 0
    compressed_params_before: int = 0
    compressed_params_after: int = 0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    quality: dict[str, Any] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    file_size_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def compressed_ratio(self) -> float:
        return self.compressed_params_after / max(self.compressed_params_before, 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["compressed_ratio"] = self.compressed_ratio
        return data


class ReportBuilder:
    """Counts parameters of the targeted layers before and after, and times the compressor."""

    def __init__(self, method: str, model: nn.Module, config: CompressConfig, names: list[str]):
        self.model, self.names = model, names
        self.report = CompressionReport(method=method, ratio=float(config.ratio),
                                        params_before=count_parameters(model),
                                        compressed_params_before=sum(count_parameters(get_module(model, n))
                                                                     for n in names))
        self.start = time.perf_counter()

    def finish(self) -> CompressionReport:
        self.report.params_after = count_parameters(self.model)
        self.report.compressed_params_after = sum(
            count_parameters(get_module(self.model, n)) for n in self.names)
        self.report.seconds = time.perf_counter() - self.start
        return self.report


def replace_linear_layers(model: nn.Module, config: CompressConfig, method: str,
                          factorise: Callable[[str, nn.Linear, int], LowRankLinear | None]) -> tuple[nn.Module, CompressionReport]:
    """Shared driver of the per-layer factorising compressors (SVD, LoRD, PELA's init).

    `factorise(name, linear, rank)` returns the replacement; layers where factors would not save
    parameters stay dense and are noted in the report.
    """
    names = select_linears(model, config)
    builder = ReportBuilder(method, model, config, names)
    for name in track(names, f"{method}: factorising"):
        linear = get_module(model, name)
        rank = rank_for_ratio(linear.in_features, linear.out_features, config.ratio)
        if not saves_parameters(linear.in_features, linear.out_features, rank):
            builder.report.layers[name] = {"kept_dense": True, "shape": [linear.out_features, linear.in_features]}
            continue
        set_module(model, name, factorise(name, linear, rank))
        builder.report.layers[name] = {"rank": rank, "shape": [linear.out_features, linear.in_features]}
    dense = [n for n, info in builder.report.layers.items() if info.get("kept_dense")]
    if dense:
        builder.report.notes.append(f"{len(dense)} layer(s) kept dense: at ratio {config.ratio} two factors would "
                                    "hold as many parameters as the dense weight")
    return model, builder.finish()


# ------------------------------------------------------------------- calibrated, scaled truncated SVD
def calibrate_in_order(model: nn.Module, names: list[str], batches: list[Batch], progress: str,
                       replace: Callable[[list[str], dict[str, SecondMoments]], None], side: str = "input",
                       outer: bool = True) -> str:
    """Collect float64 moments of each targeted layer's inputs (or outputs), then let `replace` swap the layers.

    When every target sits strictly inside the repeated blocks, the blocks are walked in order
    (`blockwise`): a block's statistics are taken on the outputs of the *already-compressed* earlier
    blocks, so later layers are fitted to the inputs they will really see; all layers of one block
    are fitted from one pass of that block as it was. Otherwise one pass of the whole model.
    Returns `"sequential"` or `"one pass"` (for the report). Padded positions are left out.
    """
    found = find_blocks(model)
    # block-by-block only when every target sits strictly inside a block (a ModuleList of tables is not "blocks")
    depth = found[0].count(".") + 2 if found is not None and found[0] else 1
    in_blocks = found is not None and all(n.startswith(found[0] + ".") and n.count(".") >= depth for n in names)
    if not in_blocks:
        replace(names, collect_moments(model, {n: get_module(model, n) for n in names}, batches, side=side,
                                       outer=outer))
        return "one pass"
    masks = token_masks(batches)
    for index, block, inputs in blockwise(model, batches, progress):
        block_names = [n for n in names if n.startswith(f"{found[0]}.{index}.")]
        if not block_names:
            continue
        stats, remove = moment_hooks({n: get_module(model, n) for n in block_names}, side=side, masks=masks,
                                     outer=outer)
        try:
            run_block(block, inputs)
        finally:
            remove()
        replace(block_names, stats)
    return "sequential"


def scaled_svd_compress(model: nn.Module, config: CompressConfig, calibration, method: str,
                        right_scale: Callable[[SecondMoments], tuple[torch.Tensor, dict[str, Any]]],
                        outer: bool = True) -> tuple[nn.Module, CompressionReport]:
    """Driver of the data-aware SVD compressors (SVD-LLM, ASVD): `W ~= up @ down`, optimal for `||(W - W') S||_F`.

    `right_scale(stats)` turns a layer's input moments into `S` (a 1-D diagonal or a lower-triangular
    matrix; see `linalg.scaled_low_rank`) and extra per-layer report fields (`outer=False`: it reads only
    the means, so no `E[x xᵀ]` is accumulated). Ranks, targets and the
    dense fallback are exactly `svd`'s (`rank_for_ratio`, `saves_parameters`), so `ratio` means the same.
    """
    from rankwise.linalg import scaled_low_rank

    batches = check_calibration(model, calibration)
    names = select_linears(model, config)
    builder = ReportBuilder(method, model, config, names)
    report = builder.report

    def replace(layer_names: list[str], stats: dict[str, SecondMoments]) -> None:
        for name in layer_names:
            linear = get_module(model, name)
            shape = [linear.out_features, linear.in_features]
            rank = rank_for_ratio(linear.in_features, linear.out_features, config.ratio)
            if not saves_parameters(linear.in_features, linear.out_features, rank):
                report.layers[name] = {"kept_dense": True, "shape": shape}
                continue
            if name not in stats or stats[name].count == 0:
                report.notes.append(f"{name} saw no calibration data and was left unchanged")
                continue
            scale, info = right_scale(stats[name])
            up, down, sigma = scaled_low_rank(linear.weight, rank, scale)
            energy = sigma.pow(2)
            kept = float(energy[:rank].sum() / energy.sum().clamp_min(torch.finfo(energy.dtype).tiny))
            set_module(model, name, low_rank_from_weight(linear, up, down))
            report.layers[name] = {"rank": rank, "shape": shape, "scaled_energy_kept": kept, **info}

    report.extra["calibration_order"] = calibrate_in_order(model, names, batches, f"{method}: blocks", replace,
                                                           outer=outer)
    dense = [n for n, info in report.layers.items() if info.get("kept_dense")]
    if dense:
        report.notes.append(f"{len(dense)} layer(s) kept dense: at ratio {config.ratio} two factors would "
                            "hold as many parameters as the dense weight")
    return model, builder.finish()


# ------------------------------------------------------------------------------------ training losses
def is_causal_lm(model: nn.Module) -> bool:
    """A transformers causal LM (its class or config architecture ends in `ForCausalLM` / `LMHeadModel`)."""
    names = [type(model).__name__] + list(getattr(getattr(model, "config", None), "architectures", None) or [])
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on a token-id batch (or a dict with `input_ids`).

    Positions whose target is padding (`attention_mask == 0`) do not count.
    """
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    logits = run_model(model, batch).logits
    targets = ids[:, 1:]
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None:
        targets = targets.masked_fill(mask[:, 1:] == 0, -100)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                       ignore_index=-100)


def mean_causal_lm_loss(model: nn.Module, batches: list[Batch]) -> float:
    """`causal_lm_loss` averaged over `batches` in eval mode, without gradients (mode restored after)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            losses = [float(causal_lm_loss(model, b)) for b in batches]
    finally:
        model.train(was_training)
    return sum(losses) / max(len(losses), 1)


def train_in_place(model: nn.Module, trainable: list[nn.Parameter], batches: list, loss_of: Callable[[Any], torch.Tensor],
                   steps: int, optimizer: torch.optim.Optimizer, seed: int, progress: str) -> list[float]:
    """`steps` optimizer steps of `loss_of(item)` cycling over `batches`, only `trainable` requiring grad.

    The compressors' short post-compression training stages (AFM fine-tuning, LoRAM alignment) share this:
    a private RNG stream (`seed`) so a run does not shift the caller's random state, and every parameter's
    `requires_grad` and train/eval mode put back afterwards, even on error. Returns the per-step losses.
    """
    from itertools import cycle

    flags = {id(p): p.requires_grad for p in model.parameters()}
    chosen = {id(p) for p in trainable}
    was_training = model.training
    history: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in chosen)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.train()
            for _step, item in zip(track(range(steps), progress), cycle(batches)):
                loss = loss_of(item)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                history.append(float(loss.detach()))
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
    return history
