"""LoRD: one-shot Low-Rank Decomposition of LLM linears (Kaushal, Vaidhya, Rish; arXiv 2309.14021).

Each targeted `W ~= U_r S_r Vh_r` becomes two linears, `down = Vh_r` (in -> r) and `up = U_r S_r`
(r -> out, keeps the bias): "a single line of code change" to the model, no retraining. Both factors
stay trainable `nn.Linear`s, so LoRA can be put on top of the compressed model
(`target_modules=["down", "up"]`), which is how the paper pairs LoRD with QLoRA.

Rank choice (`allocation`):
- `"uniform"` (the paper's recipe): every layer keeps `ratio` of its parameters,
  `r = floor(ratio * in * out / (in + out))`.
- `"global"`: one parameter budget (`ratio` of all targeted parameters) shared by all layers, spent
  greedily on the singular directions with the most relative energy per parameter
  (`sigma_j^2 / ||W||_F^2 / (in + out)`), so easy layers give rank to hard ones.
A layer whose rank would not save parameters (`r (in+out) >= in*out`) stays dense.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rankwise.compress._common import (CompressConfig, CompressionReport, ReportBuilder, get_module,
                                       low_rank_from_weight, max_saving_rank, replace_linear_layers,
                                       select_linears, set_module, track)
from rankwise.core.errors import check_field
from rankwise.linalg import truncated_svd


@dataclass
class LordConfig(CompressConfig):
    allocation: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(self.allocation in ("uniform", "global"), "LordConfig", "allocation", self.allocation,
                    "'uniform' (same parameter ratio per layer, the paper) or 'global' (one shared budget)")


def lord_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(up, down) = (U_r S_r, Vh_r)`: LoRD's split, `up @ down` is the rank-r truncation of `weight`."""
    U, S, Vh = truncated_svd(weight, rank)
    return U * S, Vh


def global_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], ratio: float) -> dict[str, int]:
    """Ranks spending `ratio * sum(in*out)` parameters on the directions with most relative energy per parameter.

    A layer's rank is capped where factors would stop saving parameters; a layer given no rank gets 1.
    """
    budget = ratio * sum(o * i for o, i in shapes.values())
    candidates = []
    for name, S in spectra.items():
        out_f, in_f = shapes[name]
        energy = (S.double() ** 2) / (S.double() ** 2).sum().clamp_min(1e-300)
        for j in range(min(max_saving_rank(in_f, out_f), S.numel())):
            candidates.append((float(energy[j]) / (in_f + out_f), name, in_f + out_f))
    candidates.sort(key=lambda c: -c[0])
    ranks = {name: 0 for name in spectra}
    spent = 0.0
    for _score, name, cost in candidates:
        if spent + cost > budget:
            continue
        ranks[name] += 1
        spent += cost
    return {name: max(1, r) for name, r in ranks.items()}


def compress(model: nn.Module, config: LordConfig, calibration=None) -> tuple[nn.Module, CompressionReport]:
    """Factorise the targeted linears in place (data-free; `calibration` is unused)."""

    def factorise(_name: str, linear: nn.Linear, rank: int):
        up, down = lord_factors(linear.weight.detach(), rank)
        return low_rank_from_weight(linear, up, down)

    if config.allocation == "uniform":
        model, report = replace_linear_layers(model, config, "lord", factorise)
        return model, report

    names = select_linears(model, config)
    builder = ReportBuilder("lord", model, config, names)
    spectra, shapes = {}, {}
    for name in track(names, "lord: spectra"):
        weight = get_module(model, name).weight.detach()
        spectra[name] = torch.linalg.svdvals(weight.float())
        shapes[name] = tuple(weight.shape)
    for name, rank in global_ranks(spectra, shapes, config.ratio).items():
        linear = get_module(model, name)
        set_module(model, name, factorise(name, linear, rank))
        builder.report.layers[name] = {"rank": rank, "shape": list(shapes[name])}
    return model, builder.finish()

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "lord", "paper": "2309.14021", "runs": "rankwise compress --method lord; rankwise.compress.compress(model, 'lord')",
     "summary": "one-shot low-rank decomposition of LLM linears"},
)
