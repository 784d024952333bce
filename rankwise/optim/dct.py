"""SVD-free low-rank AdamW with DCT bases (Modoranu et al., arXiv 2505.17967).

GaLore's SVD projector is replaced by a fixed orthonormal DCT-II basis Q (n x n, n = min(m, n_cols),
one shared matrix per size) and a *column selection*: every `update_proj_gap` steps the gradient
is rotated into the basis and the r columns of largest l1 (or l2) norm are kept::

    A (rows x n), rows >= n:  S = A Q (rows x n);  idx = topk_j ||S[:, j]||_1 (r int32 indices)
                              a = S[:, idx] (rows x r)  --Adam-->  u  -->  dW = u Q[:, idx]ᵀ
    rows < n:                 S = Qᵀ A, rows ranked instead, dW = Q[:, idx] u

The only per-layer projection state is the r int32 indices (no n x r float projector). Between
refreshes `a = A Q[:, idx]`. `sim_type='makhoul'` uses Q = Cᵀ and computes the refresh rotation
`A Cᵀ` with one FFT (`linalg.dct_ortho`) instead of an n x n matmul. Adam follows DCT-AdamW: decoupled
decay first, `u = m / (sqrt(v) + eps sqrt(1 - beta2^t))`, eps 1e-8, no scale factor; parameters with
a dimension >= `max_shape` (embeddings, LM heads) get full AdamW. `rotate_subspace=True` carries
the moments of indices kept across a refresh and zeroes the new ones (the 0/1 matrix
`Q[:, prev]ᵀ Q[:, new]`).

Deviations from the reference code, both measured (docs/pretrain.md): (1) the reference stores the top-k
indices in score order, so a refresh that merely re-ranks the kept columns hands each Adam moment slot to a
different column; `stable_slots=True` (default) keeps every surviving column in its slot and puts newcomers
in the freed ones (`stable_slot_order`); `stable_slots=False` is the reference behaviour. (2) The default
`update_proj_gap` is 200 (GaLore's) instead of the reference's 1: on the 400-step KJV pretraining bench,
stable slots + gap 200 reach 1.01x full-rank perplexity, gap 1 1.04x-1.10x. Not implemented:
the code's hard-coded right-projection shapes and its 4/8-bit quantised error buffer (`q_ef`).

Presets (`DCTAdamW(..., preset=...)`, explicit group keys win): `"tuned"` (default: gap 200, stable slots) and
`"paper"`, the paper's and reference code's settings (gap 1, moments kept in score order rather than per column,
no subspace rotation, no error feedback). docs/pretrain.md's DCT numbers use "tuned" unless a row says otherwise.

Error feedback (`use_ef=True`, the reference's `use_ef`; MicroAdam-style, as the paper's algorithm box writes it)::

    G_t = grad_t + Xi_{t-1};   a_t = project(G_t) (columns chosen on G_t);   Xi_t = G_t - a_t Q[:, idx]^T

so what the projection discards is added to the next gradient instead of being lost. It costs one full m x n
float buffer per projected weight (`state["error_feedback"]`), which the docs' state-bytes numbers do not include.
"""
from __future__ import annotations

import torch

from rankwise.core.errors import check_field
from rankwise.linalg import dct_ortho, orthonormal_dct
from rankwise.optim.galore import LowRankAdamW

SIM_TYPES = ("matmul", "makhoul")

# Named settings; a param group's own keys override them.
PRESETS = {
    # measured best on the KJV pretraining bench (docs/pretrain.md): refresh every 200 steps, moments stay per column
    "tuned": {"update_proj_gap": 200, "stable_slots": True, "rotate_subspace": False, "use_ef": False},
    # the paper / reference code (ISTA-DASLab-Optimizers DCTAdamW defaults): refresh every step, moment slots in
    # score order (a re-ranking hands a column's moments to another column), no rotation, no error feedback
    "paper": {"update_proj_gap": 1, "stable_slots": False, "rotate_subspace": False, "use_ef": False},
}


def stable_slot_order(previous: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """`selected` reordered so that every column also in `previous` keeps its slot (and so its Adam moments);
    the newly selected columns take the freed slots in score order."""
    kept = torch.isin(previous, selected)
    order = previous.clone()
    order[~kept] = selected[~torch.isin(selected, previous)]
    return order


class DCTAdamW(LowRankAdamW):
    """AdamW in a DCT column subspace (see the module docstring). Per group: `rank`, `update_proj_gap`
    (default 200), `sim_type` ('matmul' or 'makhoul'), `ell_norm` (1 or 2), `rotate_subspace`,
    `stable_slots` (default True), `use_ef` (error feedback, default False), `max_shape`.
    `preset`: "tuned" (default) or "paper" (gap 1, reference slots), see `PRESETS`; explicit group keys win."""

    group_defaults = {"sim_type": "matmul", "ell_norm": 1, "max_shape": 32000, **PRESETS["tuned"]}
    decay_after_update = False
    eps_bias_corrected = True
    name = "DCTAdamW"

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, correct_bias: bool = True, preset: str = "tuned"):
        check_field(preset in PRESETS, self.name, "preset", preset, f"one of {tuple(PRESETS)}")
        self.preset = preset
        self.group_defaults = {**type(self).group_defaults, **PRESETS[preset]}  # read by add_param_group
        self.shared_state: dict = {}  # one basis per (size, dtype, sim_type), shared by every layer
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias)

    def _check_group(self, group: dict) -> None:
        gap = group["update_proj_gap"]
        check_field(isinstance(gap, int) and gap >= 1, self.name, "update_proj_gap", gap, "an int >= 1")
        check_field(group["sim_type"] in SIM_TYPES, self.name, "sim_type", group["sim_type"], f"one of {SIM_TYPES}")
        check_field(isinstance(group["stable_slots"], bool), self.name, "stable_slots", group["stable_slots"],
                    "True or False")
        check_field(isinstance(group["use_ef"], bool), self.name, "use_ef", group["use_ef"], "True or False")
        check_field(group["ell_norm"] in (1, 2), self.name, "ell_norm", group["ell_norm"], "1 or 2")
        check_field(isinstance(group["max_shape"], int) and group["max_shape"] > 0, self.name, "max_shape",
                    group["max_shape"], "an int > 0")

    def _is_projected(self, p: torch.Tensor, group: dict) -> bool:
        return "rank" in group and max(p.shape) < group["max_shape"]

    def basis(self, n: int, dtype: torch.dtype, sim_type: str) -> torch.Tensor:
        """Q for size n: the DCT-II matrix C ('matmul') or Cᵀ ('makhoul'), built once and shared."""
        key = (n, dtype, sim_type)
        if key not in self.shared_state:
            C = orthonormal_dct(n, torch.float64).to(dtype)
            self.shared_state[key] = C if sim_type == "matmul" else C.T.contiguous()
        return self.shared_state[key]

    def _rotate(self, grad: torch.Tensor, Q: torch.Tensor, right: bool, sim_type: str) -> torch.Tensor:
        if sim_type == "makhoul":  # A Cᵀ (right) or (Cᵀ)ᵀ A = C A (left), by FFT
            return dct_ortho(grad, dim=1 if right else 0)
        return grad @ Q if right else Q.T @ grad

    def _projection_is_scale_free(self, group: dict) -> bool:
        return not group.get("use_ef", False)  # the carried error does not scale with the new gradient

    def _project(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        if not group.get("use_ef", False):
            return self._select_and_project(state, grad, group)
        error = state.get("error_feedback")
        accumulator = grad + error if error is not None else grad.clone()  # G_t = grad_t + Xi_{t-1}
        projected = self._select_and_project(state, accumulator, group)
        selected = self.basis(state["basis_size"], accumulator.dtype, state["sim_type"])[:, state["columns"].long()]
        if state["right"]:  # Xi_t = G_t - reconstruct(a_t), in place on the accumulator
            accumulator.addmm_(projected, selected.T, alpha=-1.0)
        else:
            accumulator.addmm_(selected, projected, alpha=-1.0)
        state["error_feedback"] = accumulator
        return projected

    def _select_and_project(self, state: dict, grad: torch.Tensor, group: dict) -> torch.Tensor:
        right = grad.shape[0] >= grad.shape[1]
        Q = self.basis(min(grad.shape), grad.dtype, group["sim_type"])
        rank = min(group["rank"], Q.shape[0])
        state["right"], state["basis_size"], state["sim_type"] = right, Q.shape[0], group["sim_type"]
        previous = state.get("columns")
        if previous is None or state["step"] % group["update_proj_gap"] == 0:
            rotated = self._rotate(grad, Q, right, group["sim_type"])
            scores = rotated.norm(p=group["ell_norm"], dim=0 if right else 1)
            columns = torch.topk(scores, rank).indices.to(torch.int32)
            if previous is not None and group["stable_slots"]:
                columns = stable_slot_order(previous, columns)
            if previous is not None and group["rotate_subspace"]:
                self._carry_moments(state, columns, right)
            state["columns"] = columns
            return rotated[:, columns.long()] if right else rotated[columns.long(), :]
        selected = Q[:, state["columns"].long()]
        return grad @ selected if right else selected.T @ grad

    @staticmethod
    def _carry_moments(state: dict, columns: torch.Tensor, right: bool) -> None:
        if "exp_avg" not in state:
            return
        # R = Q[:, prev]ᵀ Q[:, new] is exactly the 0/1 matching of shared indices for orthonormal Q
        matching = (state["columns"][:, None] == columns[None, :]).to(state["exp_avg"].dtype)
        for key in ("exp_avg", "exp_avg_sq"):
            moved = state[key] @ matching if right else matching.T @ state[key]
            state[key] = moved.abs() if key == "exp_avg_sq" else moved

    def _add_projected_back(self, p: torch.Tensor, state: dict, update: torch.Tensor, alpha: float) -> None:
        selected = self.basis(state["basis_size"], update.dtype, state["sim_type"])[:, state["columns"].long()]
        if state["right"]:
            p.addmm_(update, selected.T, alpha=alpha)
        else:
            p.addmm_(selected, update, alpha=alpha)

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "dct-adamw", "paper": "2505.17967", "runs": "rankwise pretrain --method dct; rankwise.optim.DCTAdamW",
     "summary": "SVD-free low-rank AdamW with DCT bases"},
)
