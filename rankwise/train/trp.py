"""TRP: Trained Rank Pruning (Xu, Li, Zhang, Wen, Wang, Qi, Chen, Lin & Xiong; arXiv 1812.02402, extended as
arXiv 2004.14566, IJCAI 2020). Spec: methods-adapters-b.md part B3 §3 (official code yuhuixu1993/Trained-Rank-Pruning).

Full training of a dense model that ends low-rank, so it splits into two thin layers without fine-tuning:

    every `period` iterations (the paper's m: SGD iterations = optimizer steps, counted over the whole run),
    before the forward:   M = U S V^T (matrix view of each target weight, below)
        k   = smallest rank holding `energy` of sum sigma^2          (training criterion, e = 0.9)
        W  <- U_k S_k V_k^T                                           (if project; the step trains the projected W)
        after backward: W.grad += nuclear_weight * U_k V_k^T          (nuclear-norm subgradient, same steps only)
    at the end: `decompose(model, scheme=...)` splits each target into factors of the kept rank and
        `save_low_rank` / `load_low_rank` store them (safetensors + JSON).

Decomposition schemes of a Conv2d kernel W (N out, C in, kh x kw), `scheme=`:

    "nc" channel-wise   M = W.reshape(N, C kh kw)             -> Conv2d(C -> k, kh x kw) then Conv2d(k -> N, 1 x 1)
    "vh" spatial-wise   M = W.permute(1,2,0,3).reshape(C kh, N kw)
                                                              -> Conv2d(C -> k, kh x 1) then Conv2d(k -> N, 1 x kw)
    "nd" decoupling     M_n = W[n].reshape(C, kh kw), one SVD per output filter n, k_n each
                                                              -> sum over j < max k_n of
                                                                 Conv2d(C -> N, 1 x 1) then depthwise Conv2d(N, kh x kw)

nn.Linear layers always use M = W (out x in) -> Linear(in -> k) then Linear(k -> out): for a 1 x 1 kernel "vh"'s
matrix is W^T (the same singular values and factors) and "nd"'s per-output matrices are C x 1, of rank 1, so
there is nothing else to choose. Targets by default: every nn.Linear and every non-1x1 nn.Conv2d except the
first conv (the code's `get_look_up_table`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rankwise.core.errors import CheckpointError, ConfigError, TargetError
from rankwise.core.io import atomic_directory, atomic_write, atomic_write_text
from rankwise.linalg import energy_rank

RANKS_FILE = "low_rank.json"
WEIGHTS_FILE = "model.safetensors"
SCHEMES = ("nc", "vh", "nd")
ND_ENERGY = 0.85  # the code's rank criterion when splitting a TRP-trained model with "nd" (NC/VH: value 0.05)


def _check_scheme(scheme) -> str:
    if scheme not in SCHEMES:
        raise ConfigError(f"TRP scheme={scheme!r} is invalid: expected 'nc' (channel-wise), 'vh' (spatial-wise) "
                          "or 'nd' (network decoupling)")
    return scheme


def _layer_scheme(layer: nn.Module, scheme: str) -> str:
    return scheme if isinstance(layer, nn.Conv2d) else "nc"  # Linear: the one matrix view W


def matrix_view(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The matrix (a batch of matrices for "nd") whose SVD the scheme truncates."""
    if weight.dim() == 2 or scheme == "nc":
        return weight.flatten(1)
    N, C, kh, kw = weight.shape
    if scheme == "vh":
        return weight.permute(1, 2, 0, 3).reshape(C * kh, N * kw)
    return weight.reshape(N, C, kh * kw)


def from_matrix_view(matrix: torch.Tensor, like: torch.Tensor, scheme: str) -> torch.Tensor:
    """Inverse of `matrix_view`."""
    if like.dim() == 2 or scheme != "vh":
        return matrix.reshape(like.shape)
    N, C, kh, kw = like.shape
    return matrix.reshape(C, kh, N, kw).permute(2, 0, 1, 3)


def _svd(matrix: torch.Tensor):
    work = matrix if matrix.dtype == torch.float64 else matrix.float()
    return torch.linalg.svd(work, full_matrices=False)


def default_targets(model: nn.Module) -> list[str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n, m in model.named_modules() if n in linears or (n in convs and n != convs[0])]


class TRP:
    """Train `model` (a plain nn.Module, every target weight trainable) with TRP; pass it as a loop callback.

    energy in (0, 1): the training rank criterion; period >= 1: iterations between projections (the paper's m;
    one iteration = one optimizer step, so with gradient accumulation one accumulated batch; counted over the
    whole run, where the code's batch index restarts every epoch); nuclear_weight >= 0 (3e-4 in the code's
    README); project=False keeps only the regulariser (the "Nu" baseline); scheme "nc" | "vh" | "nd" (the matrix
    view of conv kernels, module docstring; pass the same to `decompose`).
    """

    def __init__(self, model: nn.Module, target_modules: list[str] | None = None, energy: float = 0.9, period: int = 1,
                 nuclear_weight: float = 3e-4, project: bool = True, scheme: str = "nc"):
        if not (isinstance(energy, (int, float)) and 0 < energy < 1):
            raise ConfigError(f"TRP energy={energy!r} is invalid: expected a number in (0, 1), e.g. 0.9")
        if not (isinstance(period, int) and period >= 1):
            raise ConfigError(f"TRP period={period!r} is invalid: expected an integer >= 1 (iterations = optimizer steps)")
        if not (isinstance(nuclear_weight, (int, float)) and nuclear_weight >= 0):
            raise ConfigError(f"TRP nuclear_weight={nuclear_weight!r} is invalid: expected a number >= 0, e.g. 3e-4")
        modules = dict(model.named_modules())
        names = default_targets(model) if target_modules is None else list(target_modules)
        for name in names:
            if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
                raise TargetError(f"TRP target {name!r} is not an nn.Linear or nn.Conv2d of this model")
            if not modules[name].weight.requires_grad:
                raise ConfigError(f"TRP trains the dense weights, but {name}.weight is frozen: make it trainable")
        if not names:
            raise TargetError("TRP found no nn.Linear / non-1x1 nn.Conv2d to train low-rank: pass target_modules")
        self.layers = {n: modules[n] for n in names}
        self.scheme = _check_scheme(scheme)
        self.energy, self.period, self.nuclear_weight, self.project = energy, period, nuclear_weight, project
        self.subgradients: dict[str, torch.Tensor] = {}
        self.rank_history: list[dict] = []

    @torch.no_grad()
    def on_step_start(self, state) -> None:
        self.subgradients = {}
        if state.step % self.period:
            return
        ranks = {}
        for name, layer in self.layers.items():
            weight = layer.weight
            scheme = _layer_scheme(layer, self.scheme)
            U, S, Vh = _svd(matrix_view(weight, scheme))
            if S.dim() == 1:
                ks = torch.tensor([energy_rank(S, self.energy)])
                U, S, Vh = U[None], S[None], Vh[None]
            else:  # "nd": one rank per output filter
                ks = torch.tensor([energy_rank(s_n, self.energy) for s_n in S])
            keep = (torch.arange(S.shape[-1])[None, :] < ks[:, None]).to(S)  # the first k_n values of each matrix
            ranks[name] = int(ks.max())
            projected = (U * (S * keep)[:, None, :]) @ Vh
            sub = (U * keep[:, None, :]) @ Vh
            if self.project:
                weight.copy_(from_matrix_view(projected.squeeze(0), weight, scheme).to(weight.dtype))
            self.subgradients[name] = from_matrix_view(sub.squeeze(0), weight, scheme).to(weight.dtype)
        self.rank_history.append({"step": state.step, **ranks})

    @torch.no_grad()
    def after_backward(self, state) -> None:
        if not self.nuclear_weight:
            return
        for name, sub in self.subgradients.items():
            weight = self.layers[name].weight
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.add_(sub, alpha=self.nuclear_weight)

    def state_dict(self) -> dict:
        return {}  # projections are recomputed from the weights; nothing else to carry over

    def settings(self) -> dict:
        return {"scheme": self.scheme, "energy": self.energy, "period": self.period, "period_unit": "iterations (optimizer steps)"}

    def report(self, png: str | Path | None = None):
        from rankwise.train.lora_tools import plot_ranks, rank_table

        if png is not None and self.rank_history:
            plot_ranks(self.rank_history, png, "TRP: energy rank over training")
        last = {k: v for k, v in self.rank_history[-1].items() if k != "step"} if self.rank_history else {}
        return rank_table(last, f"TRP: rank holding {self.energy:.0%} energy")


class DecoupledConv(nn.Module):
    """Network decoupling ("nd", Guo et al. 2018) of a conv: the sum of `paths` parallel branches, each a 1x1
    conv (C -> N) then a depthwise kh x kw conv (N -> N) with the original stride, padding and dilation.

        x --+-- 1x1 conv -- depthwise kxk --+
            +-- 1x1 conv -- depthwise kxk --+-- sum --> y       (bias on path 0 only)
    """

    def __init__(self, layer: nn.Conv2d, paths: int):
        super().__init__()
        N, C = layer.out_channels, layer.in_channels
        self.paths = nn.ModuleList(nn.Sequential(
            nn.Conv2d(C, N, 1, bias=False),
            nn.Conv2d(N, N, layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups=N,
                      bias=j == 0 and layer.bias is not None, padding_mode=layer.padding_mode))
            for j in range(paths))

    def forward(self, x):
        out = self.paths[0](x)
        for path in self.paths[1:]:
            out = out + path(x)
        return out


def _factor_layers(layer: nn.Module, rank: int, scheme: str = "nc") -> nn.Module:
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
    bias, mode = layer.bias is not None, layer.padding_mode
    if scheme == "nd":
        return DecoupledConv(layer, rank)
    if scheme == "vh":
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        first = nn.Conv2d(layer.in_channels, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, padding_mode=mode)
        return nn.Sequential(first, nn.Conv2d(rank, layer.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias,
                                              padding_mode=mode))
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False,
                      padding_mode=mode)
    return nn.Sequential(first, nn.Conv2d(rank, layer.out_channels, 1, bias=bias))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _factor_count(layer: nn.Module, k: int, scheme: str) -> int:
    """Weights of the split layer (biases aside), for `only_if_smaller`."""
    if isinstance(layer, nn.Linear):
        return k * (layer.in_features + layer.out_features)
    N, C, kh, kw = layer.weight.shape
    return {"nc": k * (C * kh * kw + N), "vh": k * (C * kh + N * kw), "nd": k * (N * C + N * kh * kw)}[scheme]


@torch.no_grad()
def decompose(model: nn.Module, target_modules: list[str] | None = None, value_threshold: float = 0.05,
              energy: float | None = None, only_if_smaller: bool = False, scheme: str = "nc",
              schemes: dict[str, str] | None = None) -> dict[str, int]:
    """Replace each target layer by its low-rank factors (in place); returns `{module: rank}` ("nd": paths).

    scheme: "nc" | "vh" | "nd" for conv layers (module docstring; Linear layers always split W); `schemes`
    receives `{module: scheme used}` when given (`save_low_rank` needs it for "vh"/"nd").
    Rank: singular values >= value_threshold (the code's choice for TRP-trained models with NC/VH), or, with
    `energy`, the energy criterion. "nd": per output filter by `energy` (None: 0.85, the code's choice; the value
    threshold is not used), and the layer gets max_n k_n paths (at most min(C, kh kw)). `only_if_smaller` keeps a layer dense when the factors would not be smaller.
    """
    _check_scheme(scheme)
    modules = dict(model.named_modules())
    names = default_targets(model) if target_modules is None else list(target_modules)
    ranks = {}
    for name in names:
        layer = modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise TargetError(f"cannot decompose grouped convolution {name!r}: exclude it")
        if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, str):
            raise TargetError(f"cannot decompose {name!r} with padding={layer.padding!r}: give the conv numeric padding")
        used = _layer_scheme(layer, scheme)
        U, S, Vh = _svd(matrix_view(layer.weight, used))
        if used == "nd":
            per_filter = [energy_rank(s_n, energy if energy is not None else ND_ENERGY) for s_n in S]
            k = max(per_filter)
        else:
            k = energy_rank(S, energy) if energy is not None else max(1, int((S >= value_threshold).sum()))
        if only_if_smaller and _factor_count(layer, k, used) >= layer.weight.numel():
            continue
        factors = _factor_layers(layer, k, used).to(layer.weight.dtype)
        if used == "nd":  # path j: pointwise U_n[:, j] sqrt(s_nj), depthwise sqrt(s_nj) V_n[j]
            root = S[:, :k].sqrt()  # N x k
            for j, path in enumerate(factors.paths):
                path[0].weight.copy_((U[:, :, j] * root[:, j:j + 1]).view_as(path[0].weight))
                path[1].weight.copy_((root[:, j:j + 1] * Vh[:, j, :]).view_as(path[1].weight))
            if layer.bias is not None:
                factors.paths[0][1].bias.copy_(layer.bias)
        elif used == "vh":  # vertical: U_k (C kh -> k), horizontal: S_k V_k^T (k -> N kw), sigma in the second
            N, C, kh, kw = layer.weight.shape
            factors[0].weight.copy_(U[:, :k].T.reshape(k, C, kh, 1))
            factors[1].weight.copy_((S[:k, None] * Vh[:k]).reshape(k, N, 1, kw).permute(1, 0, 2, 3))
            if layer.bias is not None:
                factors[1].bias.copy_(layer.bias)
        else:
            root = S[:k].sqrt()
            factors[0].weight.copy_((root[:, None] * Vh[:k]).view_as(factors[0].weight))
            factors[1].weight.copy_((U[:, :k] * root).view_as(factors[1].weight))
            if layer.bias is not None:
                factors[1].bias.copy_(layer.bias)
        _set(model, name, factors)
        ranks[name] = k
        if schemes is not None:
            schemes[name] = used
    return ranks


def save_low_rank(model: nn.Module, ranks: dict[str, int], directory: str | Path,
                  schemes: dict[str, str] | None = None) -> None:
    """Write a decomposed model: `model.safetensors` (all tensors) + `low_rank.json` (`{module: rank}` and
    `{module: scheme}`; a file without schemes is all "nc", as written before the schemes existed)."""
    directory = Path(directory)
    state, tied, seen = {}, {}, {}
    for key, value in model.state_dict().items():
        ptr = (value.data_ptr(), value.shape)
        if ptr in seen:  # tied tensors (an LM head tied to the embeddings) are written once; safetensors refuses aliases
            tied[key] = seen[ptr]
            continue
        seen[ptr] = key
        state[key] = value.detach().contiguous().cpu()
    with atomic_directory(directory) as stage:  # weights and ranks swap in together
        atomic_write(stage / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_text(stage / RANKS_FILE, json.dumps({"method": "trp", "paper": "2004.14566", "ranks": ranks,
                                                          "schemes": {n: (schemes or {}).get(n, "nc") for n in ranks},
                                                          "tied": tied}, indent=2))


def load_low_rank(base: nn.Module, directory: str | Path) -> nn.Module:
    """A copy of `base` (same architecture) with the factor layers saved by `save_low_rank`; `base` is unchanged."""
    directory = Path(directory)
    try:
        info = json.loads((directory / RANKS_FILE).read_text())
        ranks, tied = info["ranks"], info.get("tied", {})
        schemes = info.get("schemes", {})  # absent in files written before "vh"/"nd": those are "nc"
        if not isinstance(schemes, dict) or any(v not in SCHEMES for v in schemes.values()):
            raise ValueError(f"bad 'schemes' {schemes!r}")
        weights = load_file(str(directory / WEIGHTS_FILE))
        weights.update({alias: weights[source] for alias, source in tied.items()})
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory} is not a TRP low-rank model ({err}); write one with save_low_rank") from None
    base = copy.deepcopy(base)
    modules = dict(base.named_modules())
    for name, rank in ranks.items():
        if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"{directory}: module {name!r} is not a Linear/Conv2d of this model (another architecture?)")
        _set(base, name, _factor_layers(modules[name], int(rank), _layer_scheme(modules[name], schemes.get(name, "nc"))))
    expected = base.state_dict()
    bad = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape]
    if bad or set(weights) - set(expected):
        raise CheckpointError(f"{directory}: tensors do not fit the model: {sorted(bad or set(weights) - set(expected))[:5]}")
    base.load_state_dict(weights)
    return base
