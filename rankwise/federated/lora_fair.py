"""LoRA-FAIR: server-side residual correction for federated LoRA (Bian, Wang, Zhang, Xu; arXiv 2411.14961, ICCV 2025).

One round, per adapted layer, over the clients k that answered (p_k = n_k / sum n_j):

    A_bar = sum p_k A_k        B_bar = sum p_k B_k        dW = sum p_k B_k A_k   (the ideal average update)

and a correction dB of B_bar, broadcast as (A_bar, B_bar + dB) (the paper's "initialisation refinement"). Two solvers:

    solver="sgd"   (default, the paper's objective)
        dB* = argmin_dB  [1 - cos(dW, (B_bar + dB) A_bar)]  +  lam ||dB||_F          lam = 0.01 (the paper's lambda)
        cos is the cosine similarity of the two out x in matrices (Frobenius inner product); minimised from dB = 0
        with Adam (or SGD) for `steps` steps; the best iterate is returned, so the objective never rises.
    solver="ridge" (a closed form, a public third-party reading)
        dB* = argmin_dB  ||dW - (B_bar + dB) A_bar||_F^2  +  ridge_lam ||dB||_F^2
            = R A_bar^T (A_bar A_bar^T + ridge_lam I)^-1,  R = dW - B_bar A_bar

The two lambdas are NOT interchangeable: the paper's `lam` weighs a plain norm against a dimensionless cosine loss
(so it is in units of 1 / ||B||), the ridge's `ridge_lam` weighs a squared norm against a squared error (units of
||A||^2). Both objectives need only r x r products: dW (out x in) is never formed, since

    <dW, X A_bar>_F = <X, C>_F with C = dW A_bar^T = sum p_k B_k (A_k A_bar^T),   ||X A_bar||_F^2 = tr(X G X^T), G = A_bar A_bar^T
    ||dW||_F^2 = sum_jk p_j p_k <B_j^T B_k, A_j A_k^T>_F

With identical clients R = 0, so dB* = 0 under both solvers and LoRA-FAIR is FedIT. Where the solvers meet: the
cosine is maximised exactly by X = C G^-1 up to a positive factor (Cauchy-Schwarz in the G inner product), and the
ridge's corrected B_bar + dB* tends to C G^-1 as ridge_lam -> 0; so as both lambdas -> 0 the two corrected products
point the same way (the paper's small lam only picks the factor, preferring B close to B_bar).
"""
from __future__ import annotations

import math
import warnings

import torch

from rankwise.core.errors import ConfigError
from rankwise.federated.base import A_SUFFIX, B_SUFFIX, LoraStrategy
from rankwise.linalg import ridge_right_solve

SOLVERS = ("sgd", "ridge")
OPTIMIZERS = ("adam", "sgd")
PAPER_LAMBDA = 0.01


def _averages(As, Bs, weights):
    A_bar = sum(w * A.double() for A, w in zip(As, weights))
    B_bar = sum(w * B.double() for B, w in zip(Bs, weights))
    return A_bar, B_bar


def residual_correction(As, Bs, weights, ridge_lam: float = 0.01, lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(A_bar, B_bar, dB)` of the ridge solver for one layer; the corrected up-projection is `B_bar + dB`.

    `lam=` is the old name of `ridge_lam` (before the paper's solver existed); it still works, with a FutureWarning.
    """
    if lam is not None:
        warnings.warn("residual_correction(lam=...) is deprecated: the ridge weight is now `ridge_lam` (`lam` means the "
                      "paper's lambda of solver='sgd', see similarity_correction)", FutureWarning, stacklevel=2)
        ridge_lam = lam
    A_bar, B_bar = _averages(As, Bs, weights)
    residual_At = sum(w * (B.double() @ (A.double() @ A_bar.T)) for A, B, w in zip(As, Bs, weights)) - B_bar @ (A_bar @ A_bar.T)
    return A_bar.float(), B_bar.float(), ridge_right_solve(residual_At, A_bar, ridge_lam)


class SimilarityObjective:
    """The paper's server objective for one layer as a function of dB, from r x r products only:

        f(dB) = 1 - <dW, (B_bar + dB) A_bar>_F / (||dW||_F ||(B_bar + dB) A_bar||_F)  +  lam ||dB||_F
    """

    def __init__(self, As, Bs, weights, lam: float = PAPER_LAMBDA):
        self.A_bar, self.B_bar = _averages(As, Bs, weights)
        self.lam = float(lam)
        self.gram = self.A_bar @ self.A_bar.T                                                   # r x r
        self.cross = sum(w * (B.double() @ (A.double() @ self.A_bar.T)) for A, B, w in zip(As, Bs, weights))  # dW A_bar^T
        sq = sum(wj * wk * torch.sum((Bj.double().T @ Bk.double()) * (Aj.double() @ Ak.double().T))
                 for Aj, Bj, wj in zip(As, Bs, weights) for Ak, Bk, wk in zip(As, Bs, weights))
        self.target_norm = math.sqrt(max(float(sq), 0.0))

    def cosine(self, dB: torch.Tensor) -> torch.Tensor:
        X = self.B_bar + dB
        product_norm = torch.sqrt(torch.sum((X @ self.gram) * X).clamp_min(1e-300))
        return torch.sum(X * self.cross) / (self.target_norm * product_norm)

    def __call__(self, dB: torch.Tensor) -> torch.Tensor:
        return 1 - self.cosine(dB) + self.lam * torch.linalg.matrix_norm(dB)

    def residual_norm(self) -> float:
        """||dW - B_bar A_bar||_F (clamped: cancellation leaves ~1e-8 ||dW|| where it is truly 0)."""
        X = self.B_bar
        sq = self.target_norm ** 2 - 2 * float(torch.sum(X * self.cross)) + float(torch.sum((X @ self.gram) * X))
        return max(sq, 0.0) ** 0.5


def similarity_correction(As, Bs, weights, lam: float = PAPER_LAMBDA, steps: int = 200, lr: float = 0.05,
                          optimizer: str = "adam") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """`(A_bar, B_bar, dB, info)` of the paper's solver for one layer (arXiv 2411.14961, Sec. server-side refinement).

    Minimises `1 - cos(dW, (B_bar + dB) A_bar) + lam ||dB||_F` from dB = 0 by `steps` steps of Adam (or SGD with
    momentum) under a cosine-decayed learning rate. `lr` is relative: the step is scaled by the natural size of B,
    s = ||dW||_F / ||A_bar||_F (Adam: per-coordinate step lr * s / sqrt(numel); SGD: lr * s^2, since the cosine's
    gradient is ~ 1/s), so one `lr` fits every layer and every stage of training. The best iterate is returned:
    `info["objective"] <= info["objective_at_zero"]` always. `info` also holds both cosines.
    """
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"LoRA-FAIR server optimizer {optimizer!r} is unknown: choose one of {OPTIMIZERS}")
    objective = SimilarityObjective(As, Bs, weights, lam)
    zero = torch.zeros_like(objective.B_bar)
    start = float(objective(zero))
    info = {"objective_at_zero": start, "objective": start, "cosine_at_zero": float(objective.cosine(zero))}
    info["cosine"] = info["cosine_at_zero"]
    a_norm = float(torch.linalg.matrix_norm(objective.A_bar))
    # nothing to correct: identical clients (R = 0), or no update at all
    if objective.target_norm == 0 or a_norm == 0 or objective.residual_norm() <= 1e-6 * objective.target_norm or steps == 0:
        return objective.A_bar.float(), objective.B_bar.float(), zero.float(), info
    scale = objective.target_norm / a_norm
    dB = zero.clone().requires_grad_(True)
    if optimizer == "adam":
        opt = torch.optim.Adam([dB], lr=lr * scale / math.sqrt(dB.numel()))
    else:
        opt = torch.optim.SGD([dB], lr=lr * scale ** 2, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    best, best_value = zero, start
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            value = objective(dB)
            if value.item() < best_value:
                best, best_value = dB.detach().clone(), value.item()
            value.backward()
            opt.step()
            sched.step()
        final = float(objective(dB.detach()))
    if final < best_value:
        best, best_value = dB.detach().clone(), final
    info.update(objective=best_value, cosine=float(objective.cosine(best)))
    return objective.A_bar.float(), objective.B_bar.float(), best.float(), info


class LoraFairStrategy(LoraStrategy):
    """LoRA-FAIR (arXiv 2411.14961): FedIT's averages plus a server-side correction of B.

    solver:     "sgd" (default): the paper's similarity objective `1 - cos + lam ||dB||_F`, minimised by `server_steps`
                steps of `server_optimizer` ("adam" | "sgd") at relative rate `server_lr`;
                "ridge": the closed form `argmin ||R - dB A_bar||^2 + ridge_lam ||dB||^2`.
    lam:        the paper's lambda (weight of ||dB||_F), default 0.01, used by solver="sgd".
    ridge_lam:  the ridge weight (of ||dB||_F^2), default 0.01, used by solver="ridge". For backward compatibility,
                `solver="ridge"` with only `lam=` given takes it as the ridge weight and warns (FutureWarning).
    """

    name = "lora-fair"

    def __init__(self, solver: str = "sgd", lam: float | None = None, ridge_lam: float | None = None,
                 server_steps: int = 200, server_lr: float = 0.05, server_optimizer: str = "adam", **kwargs):
        if solver not in SOLVERS:
            raise ConfigError(f"lora-fair solver={solver!r} is unknown: choose 'sgd' (the paper's similarity objective) or 'ridge'")
        if solver == "ridge" and ridge_lam is None and lam is not None:
            warnings.warn("LoraFairStrategy(solver='ridge', lam=...) is deprecated: `lam` is now the paper's lambda of the "
                          "similarity objective; pass the ridge weight as ridge_lam=", FutureWarning, stacklevel=2)
            ridge_lam = lam
        lam = PAPER_LAMBDA if lam is None else lam
        ridge_lam = 0.01 if ridge_lam is None else ridge_lam
        for field, value in (("lam", lam), ("ridge_lam", ridge_lam), ("server_lr", server_lr)):
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"lora-fair {field}={value!r} is invalid: expected a finite number >= 0 (the paper's lambda is 0.01)")
        if not (isinstance(server_steps, int) and server_steps >= 0):
            raise ConfigError(f"lora-fair server_steps={server_steps!r} is invalid: expected an integer >= 0")
        if server_optimizer not in OPTIMIZERS:
            raise ConfigError(f"lora-fair server_optimizer={server_optimizer!r} is unknown: choose one of {OPTIMIZERS}")
        super().__init__(**kwargs)
        self.solver, self.lam, self.ridge_lam = solver, float(lam), float(ridge_lam)
        self.server_steps, self.server_lr, self.server_optimizer = server_steps, float(server_lr), server_optimizer

    def correction(self, As, Bs, weights):
        """(A_bar, B_bar, dB, info) for one layer with the configured solver."""
        if self.solver == "ridge":
            return (*residual_correction(As, Bs, weights, self.ridge_lam), {})
        return similarity_correction(As, Bs, weights, self.lam, self.server_steps, self.server_lr, self.server_optimizer)

    def aggregate_states(self, global_state, client_states, weights, server_round: int = 1):
        self._fedit_errors: list[float] = []
        self._infos: list[dict] = []
        return super().aggregate_states(global_state, client_states, weights, server_round)

    def aggregate_layer(self, layer, As, Bs, weights, global_state, server_round):
        A_bar, B_bar, correction, info = self.correction(As, Bs, weights)
        self.last_correction_norm = float(correction.norm())
        self._infos.append(info)
        # FedIT's error on the very same uploads: the paper's claim is that the correction shrinks it
        self._fedit_errors.append(self.product_error(layer, As, Bs, weights, global_state, {layer + A_SUFFIX: A_bar, layer + B_SUFFIX: B_bar}))
        return {layer + A_SUFFIX: A_bar, layer + B_SUFFIX: B_bar + correction}

    def extra_log(self) -> dict[str, float]:
        errors = getattr(self, "_fedit_errors", [])
        log = {"fedit_product_error": sum(errors) / len(errors)} if errors else {}
        infos = [i for i in getattr(self, "_infos", []) if i]
        for key in ("cosine_at_zero", "cosine"):  # mean over layers: how much closer to dW the product points
            if infos:
                log[f"server_{key}"] = sum(i[key] for i in infos) / len(infos)
        return log

# The catalog (`rankwise methods`) reads this: what this file implements, its paper, and what runs it.
CATALOG = (
    {"name": "lora-fair", "paper": "2411.14961", "runs": "rankwise federate --strategy lora-fair",
     "summary": "server-side residual correction of averaged LoRA factors"},
)
