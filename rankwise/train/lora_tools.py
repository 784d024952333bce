"""What the training procedures share about the LoRA adapters they act on.

- `lora_adapters`: find a model's LoRA adapters, or raise a clear error when the procedure has none to act on;
- `set_forward` / `restore_forward`: a procedure's layer part (ALLoRA's backward, GGPO's perturbation, ...)
  replaces one adapter's forward on the instance; the saved file stays a plain LoRA file;
- `replace_parameter`: swap a tensor for a resized one *between optimizer steps*, carrying its optimizer
  state over (sliced for kept entries, filled for new ones), as DESIGN.md asks of rank-changing procedures;
- `record_ranks`: write the final per-layer ranks into the config's `rank_pattern` (and `alpha_pattern`,
  so the scaling each layer trained with survives, and PiSSA's split rank), so the saved adapter reloads exactly;
- `rank_table` / `plot_ranks`: the per-layer rank report and the PNG of rank over training.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rankwise.core.errors import CheckpointError, ConfigError


def lora_adapters(model, procedure: str, adapter_name: str | None = None, kinds: tuple[str, ...] = ("linear",)) -> dict:
    """`{module name: LoraAdapter}` of `adapter_name` (default: the first active adapter)."""
    from rankwise.adapters.lora import LoraAdapter, LoraConfig
    from rankwise.core.model import AdaptedModel

    hint = "adapt it first: model = rankwise.adapt(model, rankwise.LoraConfig(r=..., target_modules=[...]))"
    if not isinstance(model, AdaptedModel):
        raise ConfigError(f"{procedure} acts on LoRA adapters, but got a plain {type(model).__name__}: {hint}")
    name = adapter_name or model.active_adapters[0]
    config = model.configs.get(name)
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"{procedure} acts on LoRA adapters; adapter {name!r} is {type(config).__name__}: {hint}")
    adapters = {m: layer.adapters[name] for m, layer in model.adapted_layers() if name in layer.adapters}
    for module, adapter in adapters.items():
        if not isinstance(adapter, LoraAdapter) or adapter.kind not in kinds:
            raise ConfigError(f"{procedure} supports LoRA on {', '.join(kinds)} layers; {module!r} is a {adapter.kind} layer: "
                              "exclude it from target_modules")
    return adapters


def _no_fused_forward(x, layer):
    return None


def set_forward(adapter: nn.Module, forward: Callable) -> None:
    adapter.forward = types.MethodType(forward, adapter)
    # The fused base+adapter node would bypass the procedure's forward: decline it while one is set.
    adapter.fused_forward = _no_fused_forward


def restore_forward(adapter: nn.Module) -> None:
    adapter.__dict__.pop("forward", None)
    adapter.__dict__.pop("fused_forward", None)


def take_and_pad(t: torch.Tensor, dim: int, keep: torch.Tensor | None, extra: int, fill: float = 0.0) -> torch.Tensor:
    """Entries `keep` along `dim` (all if None), then `extra` new entries equal to `fill`."""
    if keep is not None:
        t = t.index_select(dim, keep.to(t.device))
    if extra:
        shape = list(t.shape)
        shape[dim] = extra
        t = torch.cat([t, t.new_full(shape, fill)], dim)
    return t


def replace_parameter(module: nn.Module, attr: str, value: torch.Tensor, optimizer=None,
                      reshape_state: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> nn.Parameter:
    """Set `module.<attr>` to a new Parameter holding `value`; in `optimizer`, the new Parameter takes the
    old one's place in its group and its state, each state tensor of the old shape passed through `reshape_state`."""
    old = getattr(module, attr)
    new = nn.Parameter(value.detach().to(old.dtype).clone(), requires_grad=old.requires_grad)
    for flag in ("_rankwise_trainable",):
        if hasattr(old, flag):
            setattr(new, flag, getattr(old, flag))
    setattr(module, attr, new)
    if optimizer is not None:
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    state = optimizer.state.pop(old, None)
                    if state:
                        optimizer.state[new] = {
                            k: reshape_state(k, v) if reshape_state and torch.is_tensor(v) and v.shape == old.shape else v
                            for k, v in state.items()
                        }
    return new


def resize_lora(adapter, keep: torch.Tensor | None = None, grow: int = 0, optimizer=None,
                new_A: torch.Tensor | None = None, new_B: torch.Tensor | None = None, scaling: float | None = None,
                generator: torch.Generator | None = None) -> None:
    """Keep LoRA components `keep` (all if None), then append `grow` new ones (A rows `new_A`, default
    Kaiming-uniform like LoRA's A, drawn from `generator` or torch's global RNG; B columns `new_B`, default 0,
    so the update is unchanged but for `scaling`).

    Adam moments of kept components are kept; new ones start at 0 for `exp_avg` and at the tensor's mean
    `exp_avg_sq` (a zero second moment would make their first Adam step ~3x the LR) [inferred].
    """
    A, B = adapter.lora_A.detach(), adapter.lora_B.detach()
    if grow:
        if new_A is None:  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in))
            new_A = (torch.rand(grow, A.shape[1], generator=generator) * 2 - 1) / math.sqrt(A.shape[1])
        if new_B is None:
            new_B = torch.zeros(B.shape[0], grow, dtype=B.dtype)
    kept_A = A if keep is None else A.index_select(0, keep)
    kept_B = B if keep is None else B.index_select(1, keep)
    A2 = torch.cat([kept_A, new_A.to(A)], 0) if grow else kept_A
    B2 = torch.cat([kept_B, new_B.to(B)], 1) if grow else kept_B

    def moments(dim):
        def reshape(key, t):
            fill = float(t.mean()) if key == "exp_avg_sq" and t.numel() else 0.0
            return take_and_pad(t, dim, keep, grow, fill)
        return reshape

    replace_parameter(adapter, "lora_A", A2, optimizer, moments(0))
    replace_parameter(adapter, "lora_B", B2, optimizer, moments(1))
    adapter.r = A2.shape[0]
    if scaling is not None:
        adapter.scaling = scaling


def record_ranks(model, adapters: dict, adapter_name: str | None = None) -> None:
    """Write each layer's current rank (and the alpha giving its current scaling) into the saved config."""
    name = adapter_name or model.active_adapters[0]
    config = model.configs[name]
    ranks, alphas = {}, {}
    for module, adapter in adapters.items():
        key = re.escape(module)
        ranks[key] = int(adapter.r)
        alphas[key] = float(adapter.scaling * (math.sqrt(adapter.r) if config.use_rslora else adapter.r))
    rank_pattern = {**ranks, **{k: v for k, v in config.rank_pattern.items() if k not in ranks}}
    alpha_pattern = {**alphas, **{k: v for k, v in config.alpha_pattern.items() if k not in alphas}}
    changes = {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if config.init_lora_weights == "pissa":  # the base residual keeps the components split off at init
        split = {re.escape(m): int(a.pissa_rank) for m, a in adapters.items() if a.pissa_rank is not None and a.pissa_rank != a.r}
        own = {re.escape(m) for m in adapters}
        changes["pissa_rank_pattern"] = {**split, **{k: v for k, v in config.pissa_rank_pattern.items() if k not in own}}
    model.configs[name] = dataclasses.replace(config, **changes)


def rank_table(ranks: dict[str, int], title: str = "per-layer ranks"):
    """A rich Table of the final rank of each layer (print it with `rich.print`)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("module")
    table.add_column("rank", justify="right")
    for module, r in ranks.items():
        table.add_row(module, str(r))
    table.add_row("[bold]total", f"[bold]{sum(ranks.values())}")
    return table


def plot_ranks(history: list[dict], path: str | Path, title: str = "rank over training") -> Path:
    """PNG of each layer's rank against the optimizer step; `history` is `[{"step": s, module: rank, ...}, ...]`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    modules = [k for k in history[0] if k != "step"] if history else []
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    for module in modules:
        ax.step(steps, [h[module] for h in history], where="post", label=module)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("rank")
    ax.set_title(title)
    if len(modules) <= 12:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class RankAllocator:
    """What IncreLoRA and TriAdaptLoRA share: a total-rank budget over a model's LoRA layers, growth every
    `incre_interval` optimizer steps after `init_warmup` (in `on_step_end`, between optimizer steps) until the
    budget is spent, the orthogonality regulariser, the rank history and the saved per-layer ranks.
    Subclasses set `procedure` and implement `allocate(state)`."""

    procedure = "rank allocation"
    field_names: dict[str, str] = {}  # a subclass's spelling of the shared settings (TriAdaptLoRA: reference_rank, ...)

    def __init__(self, model, target_rank, target_total_rank, init_warmup, incre_interval, reg_orth_coef, adapter_name):
        checks = [
            (isinstance(target_rank, (int, float)) and target_rank > 0, "target_rank", "a number > 0 (average rank per layer)"),
            (target_total_rank is None or (isinstance(target_total_rank, int) and target_total_rank > 0),
             "target_total_rank", "None or an integer > 0"),
            (isinstance(init_warmup, int) and init_warmup >= 0, "init_warmup", "an integer >= 0"),
            (isinstance(incre_interval, int) and incre_interval >= 1, "incre_interval", "an integer >= 1"),
            (isinstance(reg_orth_coef, (int, float)) and reg_orth_coef >= 0, "reg_orth_coef", "a number >= 0"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"{self.procedure} {self.field_names.get(name, name)}={locals()[name]!r} is invalid: expected {allowed}")
        self.model, self.adapter_name = model, adapter_name
        self.adapters = lora_adapters(model, self.procedure, adapter_name)
        self.max_rank = {m: min(a.lora_B.shape[0], a.lora_A.shape[1]) for m, a in self.adapters.items()}
        budget = target_total_rank if target_total_rank is not None else int(round(target_rank * len(self.adapters)))
        if budget < self.total_rank():
            raise ConfigError(f"{self.procedure} budget {budget} is below the adapters' initial total rank {self.total_rank()}: "
                              "raise target_rank, or start from a smaller LoraConfig(r=1)")
        if budget > sum(self.max_rank.values()):
            raise ConfigError(f"{self.procedure} budget {budget} exceeds the largest possible total rank "
                              f"{sum(self.max_rank.values())} (sum of min(out, in)): lower target_rank")
        self.budget, self.init_warmup, self.incre_interval, self.reg_orth_coef = budget, init_warmup, incre_interval, reg_orth_coef
        self.rank_history = [{"step": 0, **self.ranks()}]

    def ranks(self) -> dict[str, int]:
        return {m: int(a.r) for m, a in self.adapters.items()}

    def total_rank(self) -> int:
        return sum(int(a.r) for a in self.adapters.values())

    def budget_left(self) -> int:
        return self.budget - self.total_rank()

    def regulariser(self) -> torch.Tensor:
        from rankwise.linalg import orthogonality_residual

        terms = [orthogonality_residual(a.lora_A, a.lora_B) for a in self.adapters.values()]
        return self.reg_orth_coef * torch.stack(terms).sum() / (2 * len(terms))

    def on_step_start(self, state) -> None:
        # Backward of the penalty before the micro-batches: it joins the step's gradient as a loss term would.
        if self.reg_orth_coef > 0:
            self.regulariser().backward()

    def on_step_end(self, state) -> None:
        if state.step > self.init_warmup and state.step % self.incre_interval == 0 and self.budget_left() > 0:
            self.allocate(state)
            self.rank_history.append({"step": state.step, **self.ranks()})
            record_ranks(self.model, self.adapters, self.adapter_name)

    def allocate(self, state) -> None:
        raise NotImplementedError

    def grow_layer(self, module: str, add: int, optimizer=None) -> None:
        raise NotImplementedError

    # ---- checkpoints: ranks and allocator state; on resume the layers are regrown to the saved ranks ----
    def state_dict(self) -> dict:
        return {"ranks": self.ranks(), "scaling": {m: a.scaling for m, a in self.adapters.items()},
                "rank_history": self.rank_history, **self.extra_state()}

    def load_state_dict(self, saved: dict, train_state) -> None:
        for m, r in saved["ranks"].items():
            if r < self.adapters[m].r:
                raise CheckpointError(f"{self.procedure}: checkpoint rank {r} of {m!r} is below the model's {self.adapters[m].r}")
            if r > self.adapters[m].r:
                self.grow_layer(m, r - self.adapters[m].r, train_state.optimizer)
            self.adapters[m].scaling = saved["scaling"][m]
        self.rank_history = saved["rank_history"]
        record_ranks(self.model, self.adapters, self.adapter_name)
        self.load_extra_state(saved)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, saved: dict) -> None:
        pass

    def report(self, png: str | Path | None = None):
        """The final per-layer rank table (a rich Table); with `png`, also the plot of rank over training."""
        if png is not None:
            plot_ranks(self.rank_history, png, f"{self.procedure}: rank over training")
        return rank_table(self.ranks(), f"{self.procedure}: final ranks (budget {self.budget})")
