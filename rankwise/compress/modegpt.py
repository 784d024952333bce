"""MoDeGPT: modular decomposition of transformer blocks (Lin et al., ICLR 2025, arXiv 2408.09632).

Each block is three *modules*, each a pair of matrices sharing an inner dimension that is shrunk by
reconstructing the module's output on calibration data (no gradients, no factor pairs):

    MLP  (type I, nonlinear)  x -> act(x Wg) * (x Wu) -> Wd : Nystrom: keep the D_int columns with the
                                                               largest ridge leverage of C_s = E[h hᵀ],
                                                               refit Wd by least squares
    Q-K  (type II, bilinear)  per head, keep head dims by CR scores sqrt(Cq_ii Ck_ii) (RoPE pairs
                              (i, i+hd/2) together, scores summed over the query heads of a KV head)
    V-O  (type III, linear)   per KV head, SVD of C^{1/2} Wv [Wo_h ...]: Wv' = C^{-1/2} U_k,
                              Wo_h' = U_kᵀ C^{1/2} Wv Wo_h (optimal for the module output)

Layer sparsity phi_l = L * phi_mean * softmax(-s_l / eps) from the Block-Influence score
s_l = 1 - E[cos(x_in, x_out)] (less important blocks are cut more), clamped and redistributed so
mean(phi) = phi_mean = 1 - ratio. Calibration statistics are accumulated in float64 and the blocks are
processed in order on the outputs of the already-compressed earlier blocks.

The compressed model is physically smaller: each block's attention is replaced by a
`pruned_attention.PrunedRopeAttention` (Llama-style) or `PrunedSelfAttention` (BERT-style) whose q/k heads
have the kept `qk_dim` dims (RoPE pairs at their original frequencies), v/o heads `v_dim`, so attention
FLOPs and the KV cache shrink with the parameters; the MLP projections become smaller `nn.Linear`s.
Inside a block the statistics are sequential too: the MLP's are taken after the attention is compressed.
Supports Llama-style blocks (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, RoPE) and BERT-style
encoder blocks (`attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`,
`output.dense`; absolute positions, so single Q-K dims are kept, and biases are carried through).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from rankwise.compress._common import (CompressConfig, CompressionReport, ReportBuilder, block_hidden, blockwise,
                                       capture_block_inputs, check_calibration, find_blocks, moment_hooks,
                                       real_rows, token_masks,
                                       run_block, with_hidden)
from rankwise.compress.pruned_attention import PrunedRopeAttention, PrunedSelfAttention
from rankwise.compress.serialize import register_module_kind
from rankwise.core.errors import ConfigError, TargetError, check_field
from rankwise.linalg import psd_sqrt_and_inverse_sqrt

MODULES = ("mlp", "qk", "vo")


@dataclass
class ModeGPTConfig(CompressConfig):
    """ratio = 1 - mean layer sparsity. eps: allocation temperature (code3's 0.15; the paper's value was not
    retrieved). max_sparsity: per-layer cap (0.8). nystrom_ridge / vo_ridge: ridges relative to mean(diag C)."""

    modules: tuple[str, ...] = MODULES
    allocation: str = "global"
    eps: float = 0.15
    max_sparsity: float = 0.8
    nystrom_ridge: float = 1e-2
    vo_ridge: float = 1e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "ModeGPTConfig"
        self.modules = tuple(self.modules)
        check_field(bool(self.modules) and set(self.modules) <= set(MODULES), name, "modules", self.modules,
                    f"a non-empty subset of {MODULES}")
        check_field(self.allocation in ("global", "uniform"), name, "allocation", self.allocation, "'global' or 'uniform'")
        check_field(self.eps > 0, name, "eps", self.eps, "a positive temperature")
        check_field(0 < self.max_sparsity < 1, name, "max_sparsity", self.max_sparsity, "a value in (0, 1)")
        check_field(self.nystrom_ridge >= 0 and self.vo_ridge >= 0, name, "ridge", (self.nystrom_ridge, self.vo_ridge),
                    "non-negative ridges")
        if self.target_modules is not None or self.exclude_modules:
            raise ConfigError("ModeGPTConfig.target_modules/exclude_modules are not used: MoDeGPT compresses whole "
                              "modules of every block; choose them with `modules=('mlp', 'qk', 'vo')`")


# ----------------------------------------------------------------------------------------- layers
# Legacy: compressed directories written before the attention became physically smaller hold these two kinds;
# they stay registered so such directories still load. New compressions never build them.
class ScatterOutputLinear(nn.Module):
    """Computes only the kept output rows of a linear and puts them at `index` in a zero vector of `out_full`."""

    def __init__(self, in_features: int, index: torch.Tensor, out_full: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_full = int(in_features), int(out_full)
        self.register_buffer("index", index.long().clone())
        self.weight = nn.Parameter(torch.zeros(len(index), self.in_features))
        self.bias = nn.Parameter(torch.zeros(len(index))) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = F.linear(x, self.weight, self.bias)
        return kept.new_zeros(*kept.shape[:-1], self.out_full).index_copy(-1, self.index, kept)

    def spec(self) -> dict:
        return {"in": self.in_features, "kept": int(self.index.numel()), "out_full": self.out_full,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "ScatterOutputLinear":
        return cls(spec["in"], torch.zeros(spec["kept"], dtype=torch.long), spec["out_full"], spec["bias"])


class GatherInputLinear(nn.Module):
    """A linear that reads only the input features at `index` (the others are known to be zero)."""

    def __init__(self, in_full: int, index: torch.Tensor, out_features: int, bias: bool = False):
        super().__init__()
        self.in_full, self.out_features = int(in_full), int(out_features)
        self.register_buffer("index", index.long().clone())
        self.weight = nn.Parameter(torch.zeros(self.out_features, len(index)))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight, self.bias)

    def spec(self) -> dict:
        return {"in_full": self.in_full, "kept": int(self.index.numel()), "out": self.out_features,
                "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict) -> "GatherInputLinear":
        return cls(spec["in_full"], torch.zeros(spec["kept"], dtype=torch.long), spec["out"], spec["bias"])


register_module_kind("scatter_out", ScatterOutputLinear, ScatterOutputLinear.spec, ScatterOutputLinear.from_spec)
register_module_kind("gather_in", GatherInputLinear, GatherInputLinear.spec, GatherInputLinear.from_spec)


# -------------------------------------------------------------------------------------- the maths
def nystrom_columns(corr: torch.Tensor, k: int, ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Type I: the `k` intermediate channels with the largest ridge leverage, and the least-squares refit.

    `corr` = E[h hᵀ] (D x D) of the MLP's intermediate activations. Returns `(kept, refit)` with
    `refit = C[S,S]^{-1} C[S,:]` (k x D), so the new down weight (math layout, k x d) is `refit @ Wd`.
    Leverage `[C (C + lam I)^{-1}]_ii = 1 - lam [(C + lam I)^{-1}]_ii`, with lam = ridge * mean(diag C).
    """
    C = corr.to(torch.float64)
    D = C.shape[0]
    scale = C.diagonal().mean().clamp_min(1e-300)
    inverse_diag = torch.linalg.inv(C + ridge * scale * torch.eye(D, dtype=C.dtype)).diagonal()
    kept = torch.sort(torch.argsort(inverse_diag)[:k]).values  # smallest inverse diagonal = largest leverage
    C_ss = C[kept][:, kept] + 1e-6 * scale * torch.eye(len(kept), dtype=C.dtype)
    return kept, torch.linalg.solve(C_ss, C[kept])


def cr_head_dims(q_diag: torch.Tensor, k_diag: torch.Tensor, group: int, k: int, rope: bool = True) -> list[torch.Tensor]:
    """Type II: kept dims per KV head from CR scores `sqrt(Cq_ii * Ck_ii)`, summed over its query heads.

    `q_diag`: [n_heads, hd] diagonals of the per-head query correlations, `k_diag`: [n_kv, hd].
    With RoPE, dims i and i + hd/2 rotate together, so they are scored and kept as a pair.
    """
    n_kv, hd = k_diag.shape
    q_grouped = q_diag.view(n_kv, group, hd).clamp_min(0)
    kd = k_diag.clamp_min(0)[:, None, :]
    kept = []
    for j in range(n_kv):
        if rope:
            half = hd // 2
            prod = q_grouped[j] * kd[j]
            score = (prod[:, :half] + prod[:, half:]).sqrt().sum(0)
            pairs = torch.sort(torch.argsort(score, descending=True)[: k // 2]).values
            kept.append(torch.cat([pairs, pairs + half]))
        else:
            score = (q_grouped[j] * kd[j]).sqrt().sum(0)
            kept.append(torch.sort(torch.argsort(score, descending=True)[:k]).values)
    return kept


def value_output_svd(corr: torch.Tensor, w_v: torch.Tensor, w_os: list[torch.Tensor], k: int,
                     ridge: float = 1e-4) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Type III for one KV head: the rank-k module that best reproduces `x Wv Wo_h` for every query head h.

    Math layout: `w_v` is d x hd (x @ w_v = values), each `w_os[h]` is hd x d. Returns
    `(w_v' d x k, [w_o_h' k x d], singular values)`; the squared output error on the calibration rows
    is the sum of the discarded squared singular values of `C^{1/2} Wv [Wo_h ...]`.
    """
    root, inverse_root = psd_sqrt_and_inverse_sqrt(corr, ridge)
    projected = root @ w_v.to(torch.float64)  # d x hd
    stacked = torch.cat([projected @ w_o.to(torch.float64) for w_o in w_os], dim=1)  # d x (g d)
    U, S, _ = torch.linalg.svd(stacked, full_matrices=False)
    U_k = U[:, :k]
    new_v = inverse_root @ U_k
    new_os = [U_k.T @ projected @ w_o.to(torch.float64) for w_o in w_os]
    return new_v, new_os, S


def allocate_sparsity(scores: torch.Tensor, mean_sparsity: float, eps: float, max_sparsity: float = 0.8) -> torch.Tensor:
    """phi = L * mean * softmax(-s / eps), clamped at `max_sparsity` with the excess redistributed.

    Keeps `mean(phi) == mean_sparsity`; higher importance `s` gets lower sparsity.
    """
    cap = max(max_sparsity, mean_sparsity)
    s = scores.to(torch.float64)
    phi = len(s) * mean_sparsity * torch.softmax(-s / eps, dim=0)
    for _ in range(len(s)):
        over = phi > cap
        if not over.any():
            break
        excess = float((phi[over] - cap).sum())
        phi[over] = cap
        free = phi < cap
        if not free.any():
            break
        phi[free] += excess * phi[free] / phi[free].sum()
    return phi


# ------------------------------------------------------------------------------------ the driver
@dataclass
class _Parts:
    """Where one block keeps the matrices MoDeGPT pairs up, as `(owner module, attribute)` per role.

    Roles: attention (the module MoDeGPT replaces), q, k, v, o (its projections), up, gate (None when the MLP is not gated), down. `rope` says whether
    rotary pairs (i, i + hd/2) must be kept together in the Q-K step.
    """

    slots: dict
    head_dim: int
    rope: bool

    def get(self, role: str) -> nn.Module | None:
        slot = self.slots.get(role)
        return getattr(*slot) if slot is not None else None

    def set(self, role: str, module: nn.Module) -> None:
        setattr(*self.slots[role], module)


def _block_parts(block: nn.Module) -> _Parts:
    """Llama-style (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, RoPE) or BERT-style
    (`attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`, `output.dense`)."""
    attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    if attn is not None and mlp is not None:
        slots = {"attention": (block, "self_attn"),
                 "q": (attn, "q_proj"), "k": (attn, "k_proj"), "v": (attn, "v_proj"), "o": (attn, "o_proj"),
                 "up": (mlp, "up_proj"), "down": (mlp, "down_proj"),
                 "gate": (mlp, "gate_proj") if getattr(mlp, "gate_proj", None) is not None else None}
        head_dim, rope = getattr(attn, "head_dim", None), True
    else:
        attention, intermediate, output = (getattr(block, n, None) for n in ("attention", "intermediate", "output"))
        inner = getattr(attention, "self", None)
        out_proj = getattr(attention, "output", None)
        if None in (inner, out_proj, intermediate, output):
            slots, head_dim, rope = {}, None, False
        else:
            slots = {"attention": (attention, "self"), "q": (inner, "query"), "k": (inner, "key"), "v": (inner, "value"), "o": (out_proj, "dense"),
                     "up": (intermediate, "dense"), "down": (output, "dense"), "gate": None}
            head_dim = getattr(inner, "attention_head_size", None)
            # relative-position BERT variants score keys against positions; only absolute embeddings are safe
            rope = False
            if getattr(inner, "position_embedding_type", "absolute") not in (None, "absolute"):
                slots = {}
    attention = getattr(*slots["attention"]) if slots else None
    if isinstance(attention, (PrunedRopeAttention, PrunedSelfAttention)):
        raise TargetError(f"{type(block).__name__} is already compressed by MoDeGPT (its attention is a "
                          f"{type(attention).__name__}): compress the original model once")
    if getattr(attention, "q_norm", None) is not None or getattr(attention, "k_norm", None) is not None:
        raise TargetError(f"{type(attention).__name__} normalises each query/key head (q_norm/k_norm): pruning head "
                          "dims would change those norms, so MoDeGPT does not support it")
    parts = _Parts(slots, head_dim, rope)
    needed = ("q", "k", "v", "o", "up", "down") + (("gate",) if slots.get("gate") else ())
    if not slots or not isinstance(head_dim, int) or not all(isinstance(parts.get(r), nn.Linear) for r in needed):
        raise TargetError(f"MoDeGPT supports Llama-style blocks (self_attn.q/k/v/o_proj, mlp.up/down_proj) and "
                          f"BERT-style blocks (attention.self.query/key/value, attention.output.dense, "
                          f"intermediate.dense, output.dense) made of nn.Linear; {type(block).__name__} is neither "
                          "(or is already compressed)")
    return parts


def block_influence(model: nn.Module, batches: list) -> torch.Tensor:
    """s_l = 1 - mean over (unpadded) tokens of cos(block input, block output), one pass over the original model."""
    blocks = find_blocks(model)[1]
    inputs = capture_block_inputs(model, blocks[0], batches)
    masks = token_masks(batches) or [None] * len(inputs)
    scores = []
    for block in blocks:
        outs = run_block(block, inputs)
        cos = [F.cosine_similarity(real_rows(block_hidden(a, k), m).double(), real_rows(o, m).double(), dim=-1)
               for (a, k), o, m in zip(inputs, outs, masks)]
        scores.append(1 - float(torch.cat(cos).mean()))
        inputs = [with_hidden(a, k, o) for (a, k), o in zip(inputs, outs)]
    return torch.tensor(scores, dtype=torch.float64)


def _compress_mlp(parts: _Parts, corr: torch.Tensor, keep: float, ridge: float) -> None:
    down = parts.get("down")
    k = max(1, math.floor(keep * down.in_features))
    kept, refit = nystrom_columns(corr, k, ridge)
    dtype = down.weight.dtype
    for name in ("gate", "up"):
        old = parts.get(name)
        if old is None:
            continue
        new = nn.Linear(old.in_features, k, bias=old.bias is not None).to(dtype)
        with torch.no_grad():
            new.weight.copy_(old.weight[kept])
            if old.bias is not None:
                new.bias.copy_(old.bias[kept])
        parts.set(name, new)
    new_down = nn.Linear(k, down.out_features, bias=down.bias is not None).to(dtype)
    with torch.no_grad():
        new_down.weight.copy_((down.weight.double() @ refit.T).to(dtype))
        if down.bias is not None:
            new_down.bias.copy_(down.bias)
    parts.set("down", new_down)


def _head_diag(weight: torch.Tensor, bias: torch.Tensor | None, corr: torch.Tensor, mean: torch.Tensor,
               hd: int) -> torch.Tensor:
    """diag E[(W x + b)(W x + b)ᵀ] per head: [n_heads, hd]."""
    W = weight.double()
    diag = ((W @ corr) * W).sum(1)
    if bias is not None:
        b = bias.double()
        diag = diag + 2 * b * (W @ mean) + b * b
    return diag.view(-1, hd)


def _qk_dims(parts: _Parts, corr: torch.Tensor, mean: torch.Tensor, keep: float) -> list[torch.Tensor]:
    """Type II: the head dims each KV head (and its query heads) keeps, RoPE pairs as `[i.., i + hd/2 ..]`."""
    hd = parts.head_dim
    q, key = parts.get("q"), parts.get("k")
    group = q.out_features // key.out_features
    # RoPE keeps whole rotary pairs, so an even number of dims
    k = max(2, 2 * math.floor(keep * hd / 2)) if parts.rope else max(1, math.floor(keep * hd))
    q_diag = _head_diag(q.weight, q.bias, corr, mean, hd)
    k_diag = _head_diag(key.weight, key.bias, corr, mean, hd)
    return cr_head_dims(q_diag, k_diag, group, k, rope=parts.rope)


@dataclass
class _ValueOutput:
    """The rebuilt value/output pair of one block: `value` [KV*v_dim, d], `output` [d, H*v_dim] (nn.Linear layout)."""

    v_dim: int
    value: torch.Tensor
    value_bias: torch.Tensor | None
    output: torch.Tensor
    output_bias: torch.Tensor | None


def _vo_factors(parts: _Parts, corr: torch.Tensor, keep: float, ridge: float) -> _ValueOutput:
    """Type III per KV head; a value bias is folded into the output bias (attention rows sum to 1)."""
    hd = parts.head_dim
    v, o = parts.get("v"), parts.get("o")
    n_kv, n_heads = v.out_features // hd, o.in_features // hd
    group = n_heads // n_kv
    k = max(1, math.floor(keep * hd))
    new_v_rows, new_o_cols = [], []
    o_bias = o.bias.detach().double().clone() if o.bias is not None else torch.zeros(o.out_features, dtype=torch.float64)
    for j in range(n_kv):
        w_v = v.weight[j * hd:(j + 1) * hd].T.detach()
        heads = range(j * group, (j + 1) * group)
        w_os = [o.weight[:, h * hd:(h + 1) * hd].T.detach() for h in heads]
        if v.bias is not None:
            for w_o in w_os:
                o_bias += v.bias[j * hd:(j + 1) * hd].double() @ w_o.double()
        new_v, new_os, _ = value_output_svd(corr, w_v, w_os, k, ridge)
        new_v_rows.append(new_v.T)
        new_o_cols.extend(w.T for w in new_os)
    has_bias = o.bias is not None or v.bias is not None
    return _ValueOutput(k, torch.cat(new_v_rows), None, torch.cat(new_o_cols, dim=1), o_bias if has_bias else None)


def _unchanged_vo(parts: _Parts) -> _ValueOutput:
    v, o = parts.get("v"), parts.get("o")
    bias = lambda m: m.bias.detach() if m.bias is not None else None  # noqa: E731
    return _ValueOutput(parts.head_dim, v.weight.detach(), bias(v), o.weight.detach(), bias(o))


def _copy(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_(bias.to(linear.bias.dtype))


def _install_attention(parts: _Parts, kept: list[torch.Tensor] | None, vo: _ValueOutput) -> None:
    """Replace the block's attention by one that computes in the kept sizes (`pruned_attention.py`).

    `kept`: type II's dims per KV head (None keeps all); `vo`: type III's rebuilt value/output pair.
    """
    hd = parts.head_dim
    q, key, o = parts.get("q"), parts.get("k"), parts.get("o")
    old = getattr(*parts.slots["attention"])
    n_heads, n_kv = q.out_features // hd, key.out_features // hd
    group = n_heads // n_kv
    if kept is None:
        kept = [torch.arange(hd)] * n_kv
    qk_dim = len(kept[0])
    k_rows = torch.cat([j * hd + dims for j, dims in enumerate(kept)])
    q_rows = torch.cat([h * hd + kept[h // group] for h in range(n_heads)])
    sizes = dict(hidden_size=q.in_features, num_heads=n_heads, num_kv_heads=n_kv, qk_dim=qk_dim, v_dim=vo.v_dim,
                 head_dim=hd, scaling=float(getattr(old, "scaling", hd ** -0.5)),
                 layer_idx=getattr(old, "layer_idx", None))
    bias = lambda m, rows: m.bias.detach()[rows] if m.bias is not None else None  # noqa: E731
    dtype, device = q.weight.dtype, q.weight.device
    if parts.rope:
        new = PrunedRopeAttention(**sizes, attention_dropout=float(getattr(old, "attention_dropout", 0.0)),
                                  is_causal=bool(getattr(old, "is_causal", True)), q_bias=q.bias is not None,
                                  k_bias=key.bias is not None, v_bias=vo.value_bias is not None,
                                  o_bias=vo.output_bias is not None).to(device=device, dtype=dtype)
        new.rope_dims.copy_(torch.stack(kept))
        projections = (new.q_proj, new.k_proj, new.v_proj)
        _copy(new.o_proj, vo.output, vo.output_bias)
    else:
        dropout = getattr(old, "dropout", None)
        new = PrunedSelfAttention(**sizes, attention_dropout=float(getattr(dropout, "p", 0.0)),
                                  is_causal=bool(getattr(old, "is_causal", False)), q_bias=q.bias is not None,
                                  k_bias=key.bias is not None,
                                  v_bias=vo.value_bias is not None).to(device=device, dtype=dtype)
        projections = (new.query, new.key, new.value)
        out = nn.Linear(n_heads * vo.v_dim, o.out_features, bias=vo.output_bias is not None).to(device=device, dtype=dtype)
        _copy(out, vo.output, vo.output_bias)
        parts.set("o", out)
    _copy(projections[0], q.weight.detach()[q_rows], bias(q, q_rows))
    _copy(projections[1], key.weight.detach()[k_rows], bias(key, k_rows))
    _copy(projections[2], vo.value, vo.value_bias)
    setattr(*parts.slots["attention"], new.train(old.training))


def _input_moments(block: nn.Module, inputs: list, modules: dict[str, nn.Module], masks) -> dict:
    """Run `block` as it is now over the calibration inputs and return the input moments of `modules`."""
    stats, remove = moment_hooks(modules, side="input", masks=masks)
    try:
        run_block(block, inputs)
    finally:
        remove()
    return stats


def compress(model: nn.Module, config: ModeGPTConfig, calibration) -> tuple[nn.Module, CompressionReport]:
    """Compress every block of a Llama- or BERT-style model in place with MoDeGPT (needs calibration batches).

    Sequential, as the paper: blocks in order on the outputs of the already-compressed earlier blocks, and
    inside a block the attention (Q-K, V-O) first, then the MLP from statistics of the block re-run with its
    compressed attention. The attention becomes a `PrunedRopeAttention` / `PrunedSelfAttention` computing in
    the kept head sizes; the MLP projections become smaller `nn.Linear`s.
    """
    batches = check_calibration(model, calibration)
    found = find_blocks(model)
    if found is None:
        raise TargetError(f"{type(model).__name__} has no transformer blocks: MoDeGPT needs Llama- or BERT-style blocks")
    prefix, blocks = found
    names = []
    for i, block in enumerate(blocks):
        parts = _block_parts(block)
        by_module = {id(m): n for n, m in block.named_modules()}
        names += [f"{prefix}.{i}.{by_module[id(parts.get(role))]}" for role in ("q", "k", "v", "o", "gate", "up", "down")
                  if parts.get(role) is not None]
    builder = ReportBuilder("modegpt", model, config, names)
    mean_sparsity = 1.0 - config.ratio
    if config.allocation == "global" and mean_sparsity > 0:
        scores = block_influence(model, batches)
        phis = allocate_sparsity(scores, mean_sparsity, config.eps, config.max_sparsity)
        builder.report.extra["block_influence"] = scores.tolist()
    else:
        phis = torch.full((len(blocks),), mean_sparsity, dtype=torch.float64)
    builder.report.extra["layer_sparsity"] = phis.tolist()
    masks = token_masks(batches)
    for index, block, inputs in blockwise(model, batches, "modegpt: blocks"):
        keep = 1.0 - float(phis[index])
        parts = _block_parts(block)
        info = {"sparsity": float(phis[index])}
        if "qk" in config.modules or "vo" in config.modules:
            attn = _input_moments(block, inputs, {"attn": parts.get("q")}, masks)["attn"]
            kept = _qk_dims(parts, attn.correlation(), attn.mean(), keep) if "qk" in config.modules else None
            vo = _vo_factors(parts, attn.correlation(), keep, config.vo_ridge) if "vo" in config.modules else _unchanged_vo(parts)
            _install_attention(parts, kept, vo)
            info.update(qk_dim=len(kept[0]) if kept is not None else parts.head_dim, v_dim=vo.v_dim)
        if "mlp" in config.modules:
            # after the attention: the MLP sees what the compressed attention feeds it
            mlp = _input_moments(block, inputs, {"mlp": parts.get("down")}, masks)["mlp"]
            _compress_mlp(parts, mlp.correlation(), keep, config.nystrom_ridge)
            info["intermediate"] = parts.get("down").in_features
        builder.report.layers[f"{prefix}.{index}"] = info
    return model, builder.finish()

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "modegpt", "paper": "2408.09632", "runs": "rankwise compress --method modegpt; rankwise.compress.compress(model, 'modegpt', calibration)",
     "summary": "modular decomposition of transformer blocks"},
)
