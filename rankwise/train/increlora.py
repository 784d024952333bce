"""IncreLoRA: ranks grow module by module, by importance, under a total budget
(Zhang, Li, Chen, Jiang, Wang & Qian, 2023, arXiv 2308.12043). Spec: methods-adapters-b.md part B2 §1
(from the official code, FeiyuZhang98/IncreLoRA); what this file does differently: docs/specs/increlora.md.

Every LoRA layer starts at a tiny rank (LoraConfig(r=1)) and holds its update in the paper's SVD-like form

    dW = B diag(E) A * alpha / ranknum          A: (active + reserve) x in, B: out x (active + reserve)
                                                E: one importance value per component (trainable; 0 at init,
                                                with A, B ~ N(0, 0.02^2), so dW = 0 but every factor has a gradient)
    reserve ("advance learning"): each layer keeps `incre_rank_num` extra components whose A, B train while
        their E is frozen at 1e-5, so a component is already trained when it is switched on
    ranknum = active components (the paper's alpha / ranknum; `scaling="fixed"` keeps the initial scale)

Every `incre_interval` optimizer steps after `init_warmup`, the `top_h` most important layers switch on
`incre_rank_num` reserve components each (their E becomes trainable) and receive fresh reserves, until the
active total reaches the budget (never beyond it); then the reserves are dropped (the code zeroes their E).

    score   = sum |dW * dL/d(dW)| / sqrt(out * in)        dW formed explicitly while allocating
    I <- b1 I + (1 - b1) score;  U <- b2 U + (1 - b2) |score - I|;   importance = I * U
    restart warm-up: a component added at step t trains with its own schedule (warm-up from t, decay to the
        end: the code's Multi_LambdaLR), applied row by row after each optimizer step (AdamW's update is
        proportional to the learning rate, so scaling a row's step by lr_row / lr_group is that row's AdamW step)
    loss  += reg_orth_coef * mean over layers and factors of ||A A^T - I||_F, ||B^T B - I||_F

Shapes change between optimizer steps; the optimizer keeps each tensor's Adam moments for the old
components. `finalize()` (run by `finish_procedure`) folds E into B and drops the reserves, so
`model.save_adapter()` then writes a plain LoRA file whose `rank_pattern`/`alpha_pattern` reload exactly.
`importance_vector=False, advance_learning=False, restart_warmup=False` is the plain-LoRA variant rankwise
shipped before (B zero columns, Kaiming A rows, new rows on the running schedule).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.linalg import seeded_generator
from rankwise.train.lora_tools import (RankAllocator, plot_ranks, rank_table, record_ranks, resize_lora, restore_forward,
                                       set_forward, take_and_pad)

E_MODULE = "increlora_E"  # where the E vectors live on the model while training (a ParameterDict)
RESERVE_E = 1e-5  # the code's fixed E of a reserve component
INIT_STD = 0.02   # the code's N(0, 0.02^2) for A, B of its components


class IncreLoRA(RankAllocator):
    procedure = "IncreLoRA"

    def __init__(self, model, target_rank: float = 2, target_total_rank: int | None = None, init_warmup: int = 100,
                 incre_interval: int = 100, top_h: int = 3, incre_rank_num: int = 1, beta1: float = 0.85,
                 beta2: float = 0.85, reg_orth_coef: float = 0.1, scaling: str = "current_rank", seed: int | None = None,
                 importance_vector: bool = True, advance_learning: bool = True, restart_warmup: bool = True,
                 adapter_name: str | None = None):
        checks = [
            (isinstance(top_h, int) and top_h >= 1, "top_h", "an integer >= 1"),
            (isinstance(incre_rank_num, int) and incre_rank_num >= 1, "incre_rank_num", "an integer >= 1"),
            (0 <= beta1 < 1, "beta1", "a number in [0, 1)"),
            (0 <= beta2 < 1, "beta2", "a number in [0, 1)"),
            (scaling in ("current_rank", "fixed"), "scaling", "'current_rank' (alpha / r) or 'fixed'"),
            (isinstance(importance_vector, bool), "importance_vector", "true or false"),
            (isinstance(advance_learning, bool), "advance_learning", "true or false"),
            (isinstance(restart_warmup, bool), "restart_warmup", "true or false"),
            (importance_vector or not advance_learning, "advance_learning",
             "false when importance_vector is false (a reserve component is switched off by its E)"),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise ConfigError(f"IncreLoRA {name}={locals()[name]!r} is invalid: expected {allowed}")
        super().__init__(model, target_rank, target_total_rank, init_warmup, incre_interval, reg_orth_coef, adapter_name)
        self.top_h, self.incre_rank_num, self.beta1, self.beta2, self.scaling = top_h, incre_rank_num, beta1, beta2, scaling
        self.importance_vector, self.advance_learning, self.restart_warmup = importance_vector, advance_learning, restart_warmup
        # New components come from a private generator when seeded: then growth does not depend on (or disturb)
        # the loop's RNG stream, and runs in our loop and in transformers.Trainer grow the same components.
        self.generator = None if seed is None else seeded_generator(seed)
        self.active = {m: int(a.r) for m, a in self.adapters.items()}   # ranknum: components switched on
        self.alpha = {m: a.scaling * a.r for m, a in self.adapters.items()}  # alpha such that scaling = alpha / r
        self.birth = {m: [0] * int(a.r) for m, a in self.adapters.items()}     # step each A row / B column arrived
        self.e_birth = {m: [0] * int(a.r) for m, a in self.adapters.items()}   # step each E entry began to train
        self.E: dict[str, torch.nn.Parameter] = {}  # each layer's importance vector, one entry per component
        self.started = False  # reserves and E joined the optimizer (first step, or a resumed checkpoint)
        self.finalized = False
        self._snapshot: dict = {}
        self.score = {m: 0.0 for m in self.adapters}
        self.ipt = {m: 0.0 for m in self.adapters}
        self.unc = {m: 0.0 for m in self.adapters}
        if importance_vector:
            with torch.no_grad():
                for m, adapter in self.adapters.items():
                    untrained = not bool(adapter.lora_B.detach().abs().sum())
                    if untrained:  # the code's init: E = 0, A, B ~ N(0, 0.02^2): dW = 0, yet E gets a gradient at once
                        adapter.lora_A.copy_(self._normal(adapter.lora_A.shape).to(adapter.lora_A))
                        adapter.lora_B.copy_(self._normal(adapter.lora_B.shape).to(adapter.lora_B))
                    # a trained or SVD-initialised B (PiSSA) keeps its update: E = 1 leaves the model unchanged
                    values = torch.zeros(adapter.r) if untrained else torch.ones(adapter.r)
                    self._set_E(m, self._new_E(m, values))
        for module, adapter in self.adapters.items():
            set_forward(adapter, self._scoring_forward(module))

    # ---- the SVD-like form ------------------------------------------------------------------------
    def _normal(self, shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * INIT_STD

    def _set_E(self, module: str, E: torch.nn.Parameter) -> torch.nn.Parameter:
        # E is a parameter of the model (not of the adapter, whose file stays plain LoRA): then every front end sees
        # it where it sees the other trainable tensors (transformers.Trainer clips model.parameters()), and
        # checkpoints carry it as model.increlora_E.<i>.
        if E_MODULE not in self.model._modules:
            self.model.add_module(E_MODULE, torch.nn.ParameterDict())
        self.model._modules[E_MODULE][str(list(self.adapters).index(module))] = E
        self.E[module] = E
        return E

    def _new_E(self, module: str, values: torch.Tensor) -> torch.nn.Parameter:
        E = torch.nn.Parameter(values.float().clone())
        E.register_hook(lambda grad, m=module: grad * self._trainable_e(m).to(grad))  # reserve E stays frozen
        return E

    def _trainable_e(self, module: str) -> torch.Tensor:
        mask = torch.zeros(self.adapters[module].r)
        mask[: self.active[module]] = 1.0
        return mask

    def _e(self, module: str) -> torch.Tensor | None:
        return self.E.get(module)

    @torch.no_grad()
    def delta_weight(self, module: str) -> torch.Tensor:
        """The layer's current update B diag(E) A * scaling (out x in), reserves included."""
        adapter, E = self.adapters[module], self._e(module)
        B = adapter.lora_B if E is None else adapter.lora_B * E.to(adapter.lora_B)
        return B @ adapter.lora_A * adapter.scaling

    def reserve(self, module: str) -> int:
        return int(self.adapters[module].r) - self.active[module]

    def _scoring_forward(self, module: str):
        procedure = self

        def forward(self, x, base_out, layer):
            E = procedure._e(module)
            B = self.lora_B if E is None else self.lora_B * E.to(self.lora_B.dtype)
            delta = (B @ self.lora_A) * self.scaling
            if delta.requires_grad:
                weight = delta.detach()
                delta.register_hook(lambda grad: procedure._store_score(module, weight, grad))
            return base_out + F.linear(self.dropout(x), delta)

        return forward

    def _factored_forward(self, module: str):
        procedure = self

        def forward(self, x, base_out, layer):  # allocation over: no dW, x A^T E B^T as LoRA does
            hidden = F.linear(self.dropout(x), self.lora_A) * procedure._e(module).to(x.dtype)
            return base_out + F.linear(hidden, self.lora_B) * self.scaling

        return forward

    # ---- importance -----------------------------------------------------------------------------
    def _store_score(self, module: str, delta: torch.Tensor, grad: torch.Tensor) -> None:
        # The hook fires once per micro-batch; like the reference code, the last micro-batch's score counts.
        if getattr(self, "_data_parallel", None) is not None:
            # this rank's gradient only: keep the signed product, averaged over the ranks in after_backward
            self._pending[module] = delta * grad
            return
        self.score[module] = float((delta * grad).abs().sum() / math.sqrt(delta.numel()))

    def ranks(self) -> dict[str, int]:
        if not hasattr(self, "active"):  # inside RankAllocator.__init__: no reserves yet
            return super().ranks()
        return dict(self.active)

    def total_rank(self) -> int:
        return sum(self.ranks().values())

    def on_step_start(self, state) -> None:
        self._data_parallel = getattr(state, "data_parallel", None)
        self._pending: dict[str, torch.Tensor] = {}
        if not self.started:
            self._check_schedule(state.scheduler)
            self._start(state.optimizer)
        super().on_step_start(state)

    def _check_schedule(self, scheduler) -> None:
        from rankwise.train.loop import LRFactor

        if self.restart_warmup and self.budget_left() > 0 and not isinstance(getattr(scheduler, "lr_lambdas", [None])[0], LRFactor):
            raise ConfigError("IncreLoRA's restart warm-up needs a rankwise LR schedule: with transformers.Trainer pass "
                              "optimizers=(opt, rankwise.train.hf.bridge_scheduler(opt, 'linear', max_steps, warmup_steps)), "
                              "or set restart_warmup=False")

    def _start(self, optimizer) -> None:
        """Step 0 (the code's first `update_and_increase`): reserves for every layer; E into the optimizer."""
        self.started = True
        for m, adapter in self.adapters.items():
            if self.advance_learning and self.budget_left() > 0:
                self._add_components(m, self.incre_rank_num, optimizer, step=0)
            if m in self.E:
                self._register_E(m, optimizer)

    def _register_E(self, module: str, optimizer) -> None:
        if optimizer is None:
            return
        E = self.E[module]
        if any(p is E for g in optimizer.param_groups for p in g["params"]):
            return
        lora_A = self.adapters[module].lora_A
        group = next((g for g in optimizer.param_groups if any(p is lora_A for p in g["params"])), None)
        if group is None:
            raise ConfigError(f"IncreLoRA: {module}.lora_A is not in the optimizer; build the optimizer from "
                              "model.parameter_groups(lr) after the procedure is created")
        group["params"].append(E)  # trains with its layer's group (learning rate, schedule, weight decay)

    def importance(self) -> dict[str, float]:
        return {m: self.ipt[m] * self.unc[m] for m in self.adapters}

    def after_backward(self, state) -> None:
        pending = getattr(self, "_pending", {})
        if pending:  # data-parallel: the score of the global gradient, the same on every rank
            state.data_parallel.average_([pending[m] for m in sorted(pending)])
            for m, product in pending.items():
                self.score[m] = float(product.abs().sum() / math.sqrt(product.numel()))
            pending.clear()
        self._take_snapshot(state)
        if self.budget_left() <= 0:
            return
        for m, score in self.score.items():
            self.ipt[m] = self.beta1 * self.ipt[m] + (1 - self.beta1) * score
            self.unc[m] = self.beta2 * self.unc[m] + (1 - self.beta2) * abs(score - self.ipt[m])

    # ---- restart warm-up, row by row --------------------------------------------------------------
    def _factors(self, state, births: list[int]) -> torch.Tensor | None:
        """lr(row born at b) / lr(its tensor's group) at this optimizer step, or None when all are 1."""
        if not self.restart_warmup or not any(births):
            return None
        from rankwise.train.loop import LRFactor

        scheduler = state.scheduler
        self._check_schedule(scheduler)
        template = scheduler.lr_lambdas[0]
        step = scheduler.last_epoch  # the LR of the coming optimizer.step is base_lr * factor(last_epoch)
        main = LRFactor(template.schedule, template.total_steps, template.warmup_steps, template.start)(step)
        if main <= 0:
            return None
        own = [LRFactor(template.schedule, template.total_steps, template.warmup_steps, b)(step) if b else main for b in births]
        factors = torch.tensor(own, dtype=torch.float64) / main
        return None if bool((factors == 1).all()) else factors

    def _take_snapshot(self, state) -> None:
        self._snapshot = {}
        for m, adapter in self.adapters.items():
            rows = self._factors(state, self.birth[m])
            e = self._factors(state, self.e_birth[m]) if m in self.E else None
            if rows is not None or e is not None or (m in self.E and self.reserve(m)):
                self._snapshot[m] = (rows, e, adapter.lora_A.detach().clone(), adapter.lora_B.detach().clone(),
                                     self.E[m].detach().clone() if m in self.E else None)

    @torch.no_grad()
    def _apply_row_learning_rates(self) -> None:
        for m, (rows, e, A0, B0, E0) in self._snapshot.items():
            adapter = self.adapters[m]
            if rows is not None:
                adapter.lora_A.copy_(A0 + (adapter.lora_A - A0) * rows[:, None].to(A0))
                adapter.lora_B.copy_(B0 + (adapter.lora_B - B0) * rows[None, :].to(B0))
            if E0 is not None:
                E = self.E[m]
                if e is not None:
                    E.copy_(E0 + (E - E0) * e.to(E0))
                E[self.active[m]:] = E0[self.active[m]:]  # reserve E is frozen (weight decay must not move it either)
        self._snapshot = {}

    # ---- growth ---------------------------------------------------------------------------------
    def on_step_end(self, state) -> None:
        self._apply_row_learning_rates()
        super().on_step_end(state)

    def choose(self) -> dict[str, int]:
        """Layers to grow now and by how much: every layer whose importance reaches the top_h-th largest
        (ties included), most important first, each by incre_rank_num, clipped to the budget and to min(out, in)."""
        importance = self.importance()
        candidates = [m for m in self.adapters if self.active[m] < self.max_rank[m]]
        if not candidates:
            return {}
        ranked = sorted(candidates, key=lambda m: -importance[m])
        threshold = importance[ranked[min(self.top_h, len(ranked)) - 1]]
        left, plan = self.budget_left(), {}
        for m in ranked:
            if importance[m] < threshold or left <= 0:
                break
            add = min(self.incre_rank_num, left, self.max_rank[m] - self.active[m])
            plan[m], left = add, left - add
        return plan

    def _add_components(self, module: str, count: int, optimizer, step: int) -> None:
        """Append `count` components: reserves (advance learning: A, B ~ N(0, 0.02^2), E = 1e-5 frozen) or,
        without advance learning, directly active ones (E on: A, B ~ N(0, 0.02^2), E = 0; E off: Kaiming A, zero B)."""
        if count <= 0:
            return
        adapter = self.adapters[module]
        out_features, in_features = adapter.lora_B.shape[0], adapter.lora_A.shape[1]
        if self.importance_vector:
            new_A, new_B = self._normal((count, in_features)), self._normal((out_features, count))
        else:
            new_A = new_B = None  # resize_lora's defaults: Kaiming-uniform A rows, zero B columns
        resize_lora(adapter, grow=count, optimizer=optimizer, new_A=new_A, new_B=new_B, generator=self.generator)
        self.birth[module] += [step] * count
        if module in self.E:
            fill = RESERVE_E if self.advance_learning else 0.0
            self._resize_E(module, None, count, fill, optimizer)
            self.e_birth[module] += [step] * count

    def _resize_E(self, module: str, keep: torch.Tensor | None, extra: int, fill: float, optimizer) -> None:
        self._replace_E(module, take_and_pad(self.E[module].detach(), 0, keep, extra, fill), optimizer,
                        lambda k, v: take_and_pad(v, 0, keep, extra, float(v.mean()) if k == "exp_avg_sq" and v.numel() else 0.0))

    def _replace_E(self, module: str, values: torch.Tensor, optimizer, reshape_state=None) -> None:
        old = self.E[module]
        new = self._set_E(module, self._new_E(module, values))
        if optimizer is None:
            return
        for group in optimizer.param_groups:  # the new Parameter takes the old one's place and (resized) Adam state
            for i, p in enumerate(group["params"]):
                if p is old:
                    group["params"][i] = new
                    state = optimizer.state.pop(old, None)
                    if state and reshape_state is not None:
                        optimizer.state[new] = {k: reshape_state(k, v) if torch.is_tensor(v) and v.shape == old.shape else v
                                                for k, v in state.items()}

    def grow_layer(self, module: str, add: int, optimizer=None, step: int = 0) -> None:
        adapter = self.adapters[module]
        new_active = self.active[module] + add
        if self.advance_learning:  # switch on `add` reserves (their E starts to train from 1e-5), then refill
            have = self.reserve(module)
            if have < add:
                self._add_components(module, add - have, optimizer, step)
            self.active[module] = new_active
            self.e_birth[module][new_active - add:new_active] = [step] * add
            self._add_components(module, self.incre_rank_num - self.reserve(module), optimizer, step)
        else:
            self._add_components(module, add, optimizer, step)
            self.active[module] = new_active
        if self.scaling == "current_rank":
            adapter.scaling = self.alpha[module] / new_active

    def grow(self, plan: dict[str, int], optimizer=None, step: int = 0) -> None:
        for m, add in plan.items():
            self.grow_layer(m, add, optimizer, step)

    def allocate(self, state) -> None:
        self.grow(self.choose(), state.optimizer, state.step)
        self._fast_forward_when_done(state.optimizer)

    def _drop_reserves(self, optimizer=None) -> None:
        for m, adapter in self.adapters.items():
            if self.reserve(m):
                keep = torch.arange(self.active[m])
                resize_lora(adapter, keep=keep, optimizer=optimizer)
                self.birth[m] = self.birth[m][: self.active[m]]
                if m in self.E:
                    self._resize_E(m, keep, 0, 0.0, optimizer)
                    self.e_birth[m] = self.e_birth[m][: self.active[m]]

    def _fast_forward_when_done(self, optimizer=None) -> None:
        if self.budget_left() <= 0:  # allocation is over: the reserves go (the code zeroes their E), no more dW
            self._drop_reserves(optimizer)
            for m, adapter in self.adapters.items():
                if m in self.E:
                    set_forward(adapter, self._factored_forward(m))
                else:
                    restore_forward(adapter)

    # ---- the end: a plain LoRA file ----------------------------------------------------------------
    @torch.no_grad()
    def finalize(self) -> None:
        """Fold E into B (B <- B diag(E)) and drop the reserves: the adapter is then plain LoRA of the active
        ranks, and `save_adapter` writes a file PEFT and rankwise reload exactly. Training ends here."""
        if self.finalized:
            return
        self._drop_reserves()
        for m, adapter in self.adapters.items():
            if m in self.E:
                adapter.lora_B.mul_(self.E[m].to(adapter.lora_B))
            restore_forward(adapter)
        self.E = {}
        self.model._modules.pop(E_MODULE, None)
        self.finalized = True
        record_ranks(self.model, self.adapters, self.adapter_name)

    def settings(self) -> dict:
        return {"importance_vector": self.importance_vector, "advance_learning": self.advance_learning,
                "restart_warmup": self.restart_warmup, "scaling": self.scaling}

    # ---- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"version": 2, "ranks": self.ranks(), "rows": {m: int(a.r) for m, a in self.adapters.items()},
                 "scaling": {m: a.scaling for m, a in self.adapters.items()}, "rank_history": self.rank_history,
                 "birth": self.birth, "e_birth": self.e_birth, "started": self.started, "settings": self.settings(),
                 "ipt": self.ipt, "unc": self.unc, "score": self.score}
        for m, E in self.E.items():
            state[f"E.{m}"] = E.detach().cpu().clone()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, saved: dict, train_state) -> None:
        legacy = saved.get("version") is None  # written before E, reserves and restart warm-up existed
        saved_settings = saved.get("settings", {"importance_vector": False, "advance_learning": False,
                                                "restart_warmup": False, "scaling": self.scaling})
        if saved_settings != self.settings():
            what = "predates the paper's E / reserve / restart warm-up, so it trained with" if legacy else "records"
            fix = " ".join(f"-p {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in saved_settings.items())
            raise CheckpointError(f"this IncreLoRA checkpoint {what} {saved_settings}, this run has {self.settings()}: "
                                  f"resume with {fix}, or start a new run")
        optimizer = train_state.optimizer
        for m, r in saved["ranks"].items():
            if r < self.active[m]:
                raise CheckpointError(f"{self.procedure}: checkpoint rank {r} of {m!r} is below the model's {self.active[m]}")
        if legacy:
            for m, r in saved["ranks"].items():
                if r > self.active[m]:
                    self.grow_layer(m, r - self.active[m], optimizer)
            self.started = True
        else:
            for m, rows in saved["rows"].items():  # rebuild the tensors to the checkpoint's shapes; values follow
                extra = rows - int(self.adapters[m].r)
                if extra > 0:
                    resize_lora(self.adapters[m], grow=extra, optimizer=optimizer, new_A=self._normal((extra, self.adapters[m].lora_A.shape[1])),
                                new_B=self._normal((self.adapters[m].lora_B.shape[0], extra)))
                self.active[m] = saved["ranks"][m]
                self.birth[m], self.e_birth[m] = list(saved["birth"][m]), list(saved["e_birth"][m])
                if m in self.E:
                    self._replace_E(m, saved[f"E.{m}"], optimizer)
            self.started = saved["started"]
            if self.started:
                for m in self.E:
                    self._register_E(m, optimizer)
        for m in saved["ranks"]:
            self.adapters[m].scaling = saved["scaling"][m]
        self.rank_history = saved["rank_history"]
        self.ipt, self.unc, self.score = dict(saved["ipt"]), dict(saved["unc"]), dict(saved["score"])
        if self.generator is not None and "generator_state" in saved:
            self.generator.set_state(saved["generator_state"])
        record_ranks(self.model, self.adapters, self.adapter_name)
        self._fast_forward_when_done(optimizer)

    def report(self, png=None):
        if png is not None:
            plot_ranks(self.rank_history, png, f"{self.procedure}: rank over training")
        return rank_table(self.ranks(), f"{self.procedure}: final ranks (budget {self.budget})")
