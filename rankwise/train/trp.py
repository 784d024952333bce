"""TRP: Trained Rank Pruning (Xu, Li, Zhang, Wen, Wang, Qi, Chen, Lin & Xiong; arXiv 1812.02402, extended as
arXiv 2004.14566, IJCAI 2020). Spec: methods-adapters-b.md part B3 §3 (official code yuhuixu1993/Trained-Rank-Pruning).

Full training of a dense model that ends low-rank, so it splits into two thin layers without fine-tuning:

    every `period` optimizer steps, before the forward:   M = U S V^T (matrix view of each target weight)
        k   = smallest rank holding `energy` of sum sigma^2          (training criterion, e = 0.9)
        W  <- U_k S_k V_k^T                                           (if project; the step trains the projected W)
        after backward: W.grad += nuclear_weight * U_k V_k^T          (nuclear-norm subgradient, same steps only)
    at the end: `decompose(model, value_threshold=0.05)` splits each target into factors of the kept rank,
        Linear(in -> k) then Linear(k -> out, bias);  Conv2d: kernel conv to k channels, then 1x1 conv (the "NC"
        channel-wise scheme), and `save_low_rank` / `load_low_rank` store the factors (safetensors + JSON).

Matrix view: Linear W (out x in); Conv2d W.reshape(out, in * kh * kw). Targets by default: every nn.Linear
and every non-1x1 nn.Conv2d except the first conv (the code's `get_look_up_table`).
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
from rankwise.linalg import energy_rank, truncated_svd

RANKS_FILE = "low_rank.json"
WEIGHTS_FILE = "model.safetensors"


def default_targets(model: nn.Module) -> list[str]:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [n for n, m in model.named_modules() if n in linears or (n in convs and n != convs[0])]


class TRP:
    """Train `model` (a plain nn.Module, every target weight trainable) with TRP; pass it as a loop callback.

    energy in (0, 1): the training rank criterion; period >= 1: optimizer steps between projections;
    nuclear_weight >= 0 (3e-4 in the code's README); project=False keeps only the regulariser (the "Nu" baseline).
    """

    def __init__(self, model: nn.Module, target_modules: list[str] | None = None, energy: float = 0.9, period: int = 1,
                 nuclear_weight: float = 3e-4, project: bool = True):
        if not (isinstance(energy, (int, float)) and 0 < energy < 1):
            raise ConfigError(f"TRP energy={energy!r} is invalid: expected a number in (0, 1), e.g. 0.9")
        if not (isinstance(period, int) and period >= 1):
            raise ConfigError(f"TRP period={period!r} is invalid: expected an integer >= 1 (optimizer steps)")
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
            U, S, Vh = truncated_svd(weight.flatten(1), min(weight.flatten(1).shape))
            k = energy_rank(S, self.energy)
            ranks[name] = k
            if self.project:
                weight.copy_(((U[:, :k] * S[:k]) @ Vh[:k]).view_as(weight).to(weight.dtype))
            self.subgradients[name] = (U[:, :k] @ Vh[:k]).view_as(weight).to(weight.dtype)
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

    def report(self, png: str | Path | None = None):
        from rankwise.train.lora_tools import plot_ranks, rank_table

        if png is not None and self.rank_history:
            plot_ranks(self.rank_history, png, "TRP: energy rank over training")
        last = {k: v for k, v in self.rank_history[-1].items() if k != "step"} if self.rank_history else {}
        return rank_table(last, f"TRP: rank holding {self.energy:.0%} energy")


def _factor_layers(layer: nn.Module, rank: int) -> nn.Sequential:
    if isinstance(layer, nn.Linear):
        return nn.Sequential(nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, layer.out_features, bias=layer.bias is not None))
    first = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False)
    return nn.Sequential(first, nn.Conv2d(rank, layer.out_channels, 1, bias=layer.bias is not None))


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def decompose(model: nn.Module, target_modules: list[str] | None = None, value_threshold: float = 0.05,
              energy: float | None = None, only_if_smaller: bool = False) -> dict[str, int]:
    """Replace each target layer by its two low-rank factors (in place); returns `{module: rank}`.

    Rank: singular values >= value_threshold (the code's choice for TRP-trained models), or, with `energy`,
    the energy criterion. `only_if_smaller` keeps a layer dense when the factors would not be smaller.
    """
    modules = dict(model.named_modules())
    names = default_targets(model) if target_modules is None else list(target_modules)
    ranks = {}
    for name in names:
        layer = modules[name]
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise TargetError(f"cannot decompose grouped convolution {name!r}: exclude it")
        matrix = layer.weight.flatten(1)
        U, S, Vh = truncated_svd(matrix, min(matrix.shape))
        k = energy_rank(S, energy) if energy is not None else max(1, int((S >= value_threshold).sum()))
        if only_if_smaller and k * sum(matrix.shape) >= matrix.numel():
            continue
        root = S[:k].sqrt()
        factors = _factor_layers(layer, k).to(layer.weight.dtype)
        factors[0].weight.copy_((root[:, None] * Vh[:k]).view_as(factors[0].weight))
        factors[1].weight.copy_((U[:, :k] * root).view_as(factors[1].weight))
        if layer.bias is not None:
            factors[1].bias.copy_(layer.bias)
        _set(model, name, factors)
        ranks[name] = k
    return ranks


def save_low_rank(model: nn.Module, ranks: dict[str, int], directory: str | Path) -> None:
    """Write a decomposed model: `model.safetensors` (all tensors) + `low_rank.json` (`{module: rank}`)."""
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
                                                          "tied": tied}, indent=2))


def load_low_rank(base: nn.Module, directory: str | Path) -> nn.Module:
    """A copy of `base` (same architecture) with the factor layers saved by `save_low_rank`; `base` is unchanged."""
    directory = Path(directory)
    try:
        info = json.loads((directory / RANKS_FILE).read_text())
        ranks, tied = info["ranks"], info.get("tied", {})
        weights = load_file(str(directory / WEIGHTS_FILE))
        weights.update({alias: weights[source] for alias, source in tied.items()})
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{directory} is not a TRP low-rank model ({err}); write one with save_low_rank") from None
    base = copy.deepcopy(base)
    modules = dict(base.named_modules())
    for name, rank in ranks.items():
        if not isinstance(modules.get(name), (nn.Linear, nn.Conv2d)):
            raise CheckpointError(f"{directory}: module {name!r} is not a Linear/Conv2d of this model (another architecture?)")
        _set(base, name, _factor_layers(modules[name], int(rank)))
    expected = base.state_dict()
    bad = [k for k in expected if k not in weights or weights[k].shape != expected[k].shape]
    if bad or set(weights) - set(expected):
        raise CheckpointError(f"{directory}: tensors do not fit the model: {sorted(bad or set(weights) - set(expected))[:5]}")
    base.load_state_dict(weights)
    return base
