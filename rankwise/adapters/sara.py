"""SaRA: re-train the smallest-|w| entries of the pretrained weight as a sparse update, with a nuclear-norm
penalty and progressive re-selection (Hu et al., ICLR 2025, arXiv 2409.06633).

    W (frozen, out x in)      M = {|w| < tau}  (flat indices, a buffer)      values = W[M]  (trainable, |M| numbers)

    x ──┬── W ─────────────────────────────────────────────┐
        └── scatter(values - W[M] at M) (dense only inside the op) ──┴─(+)── y     = x (W with W[M] <- values)^T

Memory ("unstructured backprop"): a custom autograd Function keeps the delta sparse (CSR products forward and
backward) and hands back only `grad_W[M]` for `values`, computed by a sampled matmul at the support. No `.grad`
of weight size is kept, no dense gradient is formed even transiently, and the optimizer holds state for |M|
numbers only.

Progressive re-selection (`reselect`): recompute M = {|w_current| < tau} on the current effective weight; entries
that leave keep their trained value as a frozen sparse delta; the optimizer state is reset. The new support sizes
go into `config.selected_counts`, so the saved adapter reloads exactly.
Nuclear norm (`nuclear_norm_penalty`): lambda * ||P' (.) M||_* for one randomly drawn eligible 2-D layer per step.

Both are part of training SaRA: `SaraTraining`, the callback `SaraConfig.training_callbacks` brings, so every
run through `rankwise.train.loop.train` (and `rankwise finetune`) has them. At the start of each optimizer step
it back-propagates the nuclear-norm term of one drawn layer into that layer's `values.grad` (a gradient, not a
loss term: it works the same behind `transformers.Trainer`, where rankwise does not compute the loss, and it
is clipped with the loss's gradient as in the reference); at the progressive step (half the run, as the
reference's 2500 of 5005) it re-selects before the update: the new values have no gradient, so that step leaves
them unchanged and the Adam state starts afresh, as in the reference.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rankwise.core.adapter import Adapter
from rankwise.core.config import AdapterConfig
from rankwise.core.errors import AdapterStateError
from rankwise.core.registry import register
from rankwise.linalg import autocast_off, to_dtype

# torch flags its (stable for our use) CSR kernels as beta on every construction; say it once, not per step.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _scatter_delta(numel, indices, values, origin, fixed_indices, fixed_delta):
    delta = torch.zeros(numel, dtype=values.dtype, device=values.device)
    delta.index_put_((indices,), values - origin)
    if fixed_indices.numel():
        delta.index_put_((fixed_indices,), fixed_delta.to(values.dtype), accumulate=True)
    return delta


class SparsePattern:
    """CSR structure of a sparse (rows x cols) matrix given by sorted flat indices, and of its transpose."""

    def __init__(self, indices: torch.Tensor, rows: int, cols: int):
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError("SaRA indices must be sorted and unique")
        self.shape = (rows, cols)
        row, col = indices // cols, indices % cols
        self.crow = _crow(row, rows)
        self.col = col
        order = torch.argsort(col * rows + row)  # the same entries in the transpose's row-major order
        self.t_order = order
        self.t_crow = _crow(col[order], cols)
        self.t_col = row[order]

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape, check_invariants=False)

    def transposed(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_order], self.shape[::-1],
                                       check_invariants=False)


def _crow(row: torch.Tensor, n_rows: int) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=row.device)
    crow[1:] = torch.cumsum(torch.bincount(row, minlength=n_rows), 0)
    return crow


def _sparse_linear(x2d: torch.Tensor, pattern: SparsePattern, values: torch.Tensor) -> torch.Tensor:
    """x @ S^T for the CSR matrix S (out x in) with these values: (S @ x^T)^T, never dense."""
    return (pattern.matrix(values) @ x2d.T).T


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ dW^T with dW sparse on `indices` (CSR products, no dense out x in tensor anywhere).

    Backward: grad_x = g @ dW via the transposed CSR; grad_values = (g^T x) sampled at the support only
    (`torch.sparse.sampled_addmm`), so not even a transient dense weight gradient is formed.
    """

    @staticmethod
    def forward(ctx, x, values, origin, pattern, fixed_pattern, fixed_delta):
        # Sparse products stay in the values' dtype even under autocast (cheap, and CSR kernels lack bf16 on CPU);
        # x arrives in it (SaraAdapter.compute_dtype), so the output and its gradient are in it too.
        ctx.x_dtype = x.dtype
        with autocast_off(x):
            return _SparseDeltaLinear._forward(ctx, x.to(values.dtype), values, origin, pattern, fixed_pattern, fixed_delta)

    @staticmethod
    def _forward(ctx, x, values, origin, pattern, fixed_pattern, fixed_delta):
        x2d = x.reshape(-1, x.shape[-1])
        delta_values = values - origin
        out = _sparse_linear(x2d, pattern, delta_values)
        if fixed_pattern is not None:
            out = out + _sparse_linear(x2d, fixed_pattern, fixed_delta.to(x.dtype))
        ctx.save_for_backward(x, delta_values, fixed_delta)
        ctx.patterns = (pattern, fixed_pattern)
        return out.reshape(*x.shape[:-1], pattern.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        with autocast_off(grad_out):
            grad_x, grad_values = _SparseDeltaLinear._backward(ctx, grad_out.to(ctx.saved_tensors[1].dtype))
        return to_dtype(grad_x, ctx.x_dtype), grad_values, None, None, None, None

    @staticmethod
    def _backward(ctx, grad_out):
        x, delta_values, fixed_delta = ctx.saved_tensors
        pattern, fixed_pattern = ctx.patterns
        g2d = grad_out.reshape(-1, pattern.shape[0])
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (pattern.transposed(delta_values) @ g2d.T).T
            if fixed_pattern is not None:
                grad_x = grad_x + (fixed_pattern.transposed(fixed_delta.to(g2d.dtype)) @ g2d.T).T
            grad_x = grad_x.reshape(x.shape)
        if ctx.needs_input_grad[1]:
            x2d = x.reshape(-1, x.shape[-1])
            grad_values = torch.sparse.sampled_addmm(pattern.matrix(delta_values), g2d.T.contiguous(), x2d,
                                                     beta=0.0).values()
        return grad_x, grad_values


class SaraAdapter(Adapter):
    def __init__(self, config: "SaraConfig", layer, module_name: str, shared=None):
        super().__init__(config, layer, module_name, shared)
        self.kind = layer.kind
        weight = layer.weight_matrix().detach().float()
        self.weight_shape = tuple(weight.shape)
        flat = weight.reshape(-1)
        tau = config.layer_threshold(flat)
        if module_name in config.selected_counts:  # a re-selected adapter being loaded: sizes from the config
            n_values, n_fixed = config.selected_counts[module_name]
            indices, fixed_indices = torch.zeros(n_values, dtype=torch.long), torch.zeros(n_fixed, dtype=torch.long)
        else:
            indices = torch.nonzero(flat.abs() < tau).flatten()
            fixed_indices = torch.zeros(0, dtype=torch.long)
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("indices", indices)
        self.register_buffer("origin", flat[indices].clone())  # W[M] at selection time: makes unmerge exact
        self.register_buffer("fixed_indices", fixed_indices)
        self.register_buffer("fixed_delta", torch.zeros(fixed_indices.numel()))
        self.values = nn.Parameter(flat[indices].clone())

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.values.dtype

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        numel = math.prod(self.weight_shape)
        delta = _scatter_delta(numel, self.indices, self.values, self.origin, self.fixed_indices, self.fixed_delta)
        return delta.view(self.weight_shape)

    def patterns(self) -> tuple[SparsePattern, SparsePattern | None]:
        """CSR structures of the trainable and the frozen support, cached until the indices change."""
        key = tuple((t.data_ptr(), t._version, t.numel()) for t in (self.indices, self.fixed_indices))
        if getattr(self, "_pattern_key", None) != key:
            out_f, in_f = self.weight_shape
            fixed = SparsePattern(self.fixed_indices, out_f, in_f) if self.fixed_indices.numel() else None
            self._patterns = (SparsePattern(self.indices, out_f, in_f), fixed)
            self._pattern_key = key
        return self._patterns

    def forward(self, x: torch.Tensor, base_out: torch.Tensor, layer) -> torch.Tensor:
        if self.kind == "linear" and self.indices.numel():
            pattern, fixed = self.patterns()
            return base_out + _SparseDeltaLinear.apply(x, self.values, self.origin, pattern, fixed, self.fixed_delta)
        return base_out + layer.apply_weight(x, self.delta_weight(None))

    def masked_values(self) -> torch.Tensor:
        """P' (.) M as a dense matrix: the trainable entries in place, zeros elsewhere (for the nuclear norm)."""
        dense = torch.zeros(math.prod(self.weight_shape), dtype=self.values.dtype, device=self.values.device)
        return dense.index_put((self.indices,), self.values).view(self.weight_shape[0], -1)

    @torch.no_grad()
    def reselect(self, layer) -> None:
        """Progressive step: M <- {|w_current| < tau}; leaving entries keep their trained value, frozen."""
        if layer.merged_adapters:
            raise AdapterStateError(f"unmerge adapters on {self.module_name!r} before SaRA re-selection")
        base = layer.weight_matrix().detach().float().reshape(-1)
        delta = self.delta_weight(None).reshape(-1)
        current = base + delta
        keep = current.abs() < self.tau
        indices = torch.nonzero(keep).flatten()
        fixed = torch.nonzero((delta != 0) & ~keep).flatten()
        self.indices, self.fixed_indices = indices, fixed
        self.origin, self.fixed_delta = base[indices].clone(), delta[fixed].clone()
        self.values = nn.Parameter(current[indices].clone(), requires_grad=self.values.requires_grad)
        self.config.selected_counts[self.module_name] = [int(indices.numel()), int(fixed.numel())]


def reference_learning_rate(threshold: float) -> float:
    """The reference's default learning rate when none is given: 1e-3 * exp(-350 * threshold)."""
    return 1e-3 * math.exp(-350.0 * threshold)


def _sara_adapters(model, adapter_name: str) -> list[SaraAdapter]:
    return [layer.adapters[adapter_name] for _, layer in model.adapted_layers()
            if isinstance(layer.adapters[adapter_name] if adapter_name in layer.adapters else None, SaraAdapter)]


def reselect(model, optimizer: torch.optim.Optimizer | None = None, adapter_name: str = "default") -> dict[str, int]:
    """SaRA's progressive re-selection on every SaRA layer of `model`; returns the new trainable count per layer.

    If `optimizer` is given, its parameters are swapped for the new ones and its state is reset (as the
    reference does); call this between optimizer steps, and skip the update on that step.
    """
    swapped, counts = {}, {}
    layers = dict(model.adapted_layers())
    for adapter in _sara_adapters(model, adapter_name):
        old = adapter.values
        adapter.reselect(layers[adapter.module_name])
        swapped[id(old)] = adapter.values
        counts[adapter.module_name] = adapter.values.numel()
    if optimizer is not None:
        for group in optimizer.param_groups:
            group["params"] = [swapped.get(id(p), p) for p in group["params"]]
        optimizer.state.clear()
    return counts


def _draw_nuclear_layer(model, adapter_name: str, generator: torch.Generator | None) -> SaraAdapter | None:
    config = model.configs[adapter_name]
    eligible = [a for a in _sara_adapters(model, adapter_name)
                if min(a.weight_shape[0], math.prod(a.weight_shape[1:])) > config.nuclear_min_size]
    if not eligible or config.lambda_rank == 0:
        return None
    return eligible[int(torch.randint(len(eligible), (1,), generator=generator))]


def nuclear_norm_penalty(model, adapter_name: str = "default", generator: torch.Generator | None = None) -> torch.Tensor:
    """lambda_rank * ||P' (.) M||_* for one randomly chosen eligible layer (min side > nuclear_min_size)."""
    adapter = _draw_nuclear_layer(model, adapter_name, generator)
    if adapter is None:
        return torch.zeros(())
    return model.configs[adapter_name].lambda_rank * torch.linalg.matrix_norm(adapter.masked_values(), ord="nuc")


class SaraTraining:
    """The parts of SaRA's training beyond the loss, as a `rankwise.train.loop.Callback`:

        on_step_start            values.grad += d/d values [lambda_rank * ||P' (.) M||_*]   (one drawn layer)
        after_backward, once     reselect(model, optimizer): new support, fresh Adam state, no update that step

    The drawn layer comes from a generator seeded once, saved in checkpoints with the re-selected supports, so a
    resumed run continues identically. (The reference draws a layer per micro-batch; here one per optimizer step.)
    """

    def __init__(self, model, adapter_name: str = "default"):
        from rankwise.linalg import seeded_generator, derive_seed

        self.model, self.adapter_name = model, adapter_name
        self.config = model.configs[adapter_name]
        self.method_key = ("sara", adapter_name)
        self.generator = seeded_generator(derive_seed(0, "sara-nuclear", adapter_name))
        self.reselected = False
        self.reselected_at: int | None = None
        self.last_penalty = 0.0

    def progressive_step(self, total_steps: int) -> int | None:
        """Optimizer steps taken before the re-selection (None: no re-selection in a run of `total_steps`)."""
        step = self.config.progressive_step
        if step is None:
            step = round(self.config.progressive_ratio * total_steps) if self.config.progressive_ratio > 0 else None
        return step if step is not None and 0 < step < total_steps else None

    def on_step_start(self, state) -> None:
        """The nuclear-norm term of one drawn layer, back-propagated before the step's micro-batches: it joins the
        step's gradient before clipping, as the reference's loss term does (the rankwise convention for regularisers)."""
        adapter = _draw_nuclear_layer(self.model, self.adapter_name, self.generator)
        if adapter is None or not adapter.values.requires_grad:
            return
        with torch.enable_grad():
            penalty = self.config.lambda_rank * torch.linalg.matrix_norm(adapter.masked_values(), ord="nuc")
            penalty.backward()
        self.last_penalty = float(penalty.detach())

    def after_backward(self, state) -> None:
        """At the progressive step, re-select just before the optimizer step: the new values have no gradient, so
        this step leaves them as selected and their Adam state starts afresh (the reference's no-update step)."""
        target = self.progressive_step(state.total_steps)
        if not self.reselected and target is not None and state.step >= target:
            reselect(self.model, state.optimizer, self.adapter_name)
            self.reselected, self.reselected_at = True, state.step

    def state_dict(self) -> dict:
        out = {"reselected": self.reselected, "reselected_at": self.reselected_at, "generator": self.generator.get_state()}
        if self.reselected:  # the supports changed: a fresh model has the initial ones
            for adapter in _sara_adapters(self.model, self.adapter_name):
                for key in ("indices", "fixed_indices", "origin", "fixed_delta"):
                    out[f"layer.{adapter.module_name}.{key}"] = getattr(adapter, key)
        return out

    def load_state_dict(self, data: dict, state) -> None:
        self.generator.set_state(data["generator"].to(torch.uint8))
        self.reselected, self.reselected_at = bool(data["reselected"]), data.get("reselected_at")
        if not self.reselected:
            return
        swapped = {}
        for adapter in _sara_adapters(self.model, self.adapter_name):
            prefix = f"layer.{adapter.module_name}."
            device = adapter.values.device
            for key in ("indices", "fixed_indices", "origin", "fixed_delta"):
                setattr(adapter, key, data[prefix + key].to(device))
            old = adapter.values
            # values themselves come from the checkpoint's model tensors, loaded after the callbacks
            adapter.values = nn.Parameter(torch.zeros(adapter.indices.numel(), dtype=old.dtype, device=device),
                                          requires_grad=old.requires_grad)
            swapped[id(old)] = adapter.values
            self.config.selected_counts[adapter.module_name] = [int(adapter.indices.numel()), int(adapter.fixed_indices.numel())]
        for group in state.optimizer.param_groups:
            group["params"] = [swapped.get(id(p), p) for p in group["params"]]
        state.optimizer.state.clear()


@register("sara", adapter=SaraAdapter, family="sparse", paper="2409.06633")
@dataclasses.dataclass
class SaraConfig(AdapterConfig):
    """SaRA. Not in PEFT: files are `RANKWISE_SARA` (flat indices, values and the original values W[M]).

    threshold: entries with |w| < threshold are trainable (reference default 2e-3, tuned for Stable Diffusion).
    fraction: if set, overrides `threshold` per layer: the `fraction` smallest-|w| entries are trainable
        (the paper's "10-20 % least effective parameters"), in (0, 1].
    lambda_rank: weight of the nuclear-norm penalty (`nuclear_norm_penalty`), >= 0 (reference 5e-4; 0 turns it off).
    nuclear_min_size: only layers whose smaller side exceeds this are penalised (reference 64).
    progressive_ratio: the progressive re-selection happens after this share of the run's optimizer steps, in
        [0, 1) (reference 2500 of 5005 steps: 0.5; 0 turns it off).
    progressive_step: if set, the re-selection happens after exactly this many optimizer steps (the reference's
        `progressive_iter`), overriding `progressive_ratio`; an integer >= 1.
    selected_counts: written by `reselect` ({module: [trainable, frozen-delta]}); leave empty.

    Training through `rankwise.train.loop.train` / `rankwise finetune` runs both the penalty and the
    re-selection (`SaraTraining`); they change how SaRA trains, not what a saved file computes.
    """

    threshold: float = 2e-3
    fraction: float | None = None
    lambda_rank: float = 5e-4
    nuclear_min_size: int = 64
    progressive_ratio: float = 0.5
    progressive_step: int | None = None
    selected_counts: dict = dataclasses.field(default_factory=dict)

    supported_layers: ClassVar[tuple[str, ...]] = ("linear", "conv")
    rank_field: ClassVar[str | None] = None

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.threshold, (int, float)) and self.threshold > 0, "threshold", "a number > 0")
        self._check(self.fraction is None or (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1),
                    "fraction", "None or a number in (0, 1]")
        self._check(isinstance(self.lambda_rank, (int, float)) and self.lambda_rank >= 0, "lambda_rank", "a number >= 0")
        self._check(isinstance(self.nuclear_min_size, int) and self.nuclear_min_size >= 0, "nuclear_min_size", "an integer >= 0")
        self._check(isinstance(self.progressive_ratio, (int, float)) and 0 <= self.progressive_ratio < 1,
                    "progressive_ratio", "a number in [0, 1) (0: no re-selection)")
        self._check_int("progressive_step", minimum=1, allow_none=True)
        self._check(isinstance(self.selected_counts, dict) and all(
            isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(n, int) and n >= 0 for n in v)
            for v in self.selected_counts.values()), "selected_counts", "a dict {module: [n_trainable, n_frozen]}")

    def training_callbacks(self, model, adapter_name: str) -> list:
        trainable = any(a.values.requires_grad for a in _sara_adapters(model, adapter_name))
        return [SaraTraining(model, adapter_name)] if trainable else []

    def layer_threshold(self, flat_weight: torch.Tensor) -> float:
        if self.fraction is None:
            return float(self.threshold)
        magnitudes = flat_weight.abs().sort().values
        k = max(1, math.ceil(self.fraction * magnitudes.numel()))
        if k >= magnitudes.numel():
            return float(magnitudes[-1]) * 2 + 1e-12
        return float(magnitudes[k - 1] + magnitudes[k]) / 2  # between the k-th and (k+1)-th: exactly k selected
