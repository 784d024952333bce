"""Numeric checks of the federated-LoRA aggregations (docs/specs/lora_fair.md, 'Checks')."""
from __future__ import annotations

import pytest
import torch

from rankwise.core.errors import CheckpointError, ConfigError
from rankwise.federated.baselines import FedItStrategy, FfaLoraStrategy, StackingStrategy, strategy_class
from rankwise.federated.lora_fair import LoraFairStrategy, residual_correction, similarity_correction
from rankwise.federated.partition import dirichlet_partition
from rankwise.federated.task import HeadSpec, build_model, load_model_state, model_state, train_local
from rankwise.linalg import mean_of_products, ridge_right_solve, stack_low_rank

OUT, IN, R = 24, 20, 4


def random_clients(k, seed=0, ranks=None):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [R] * k
    As = [torch.randn(r, IN, generator=g) for r in ranks]
    Bs = [torch.randn(OUT, r, generator=g) for r in ranks]
    w = torch.rand(k, generator=g) + 0.1
    return As, Bs, (w / w.sum()).tolist()


def global_state(A, B, delta=False):
    state = {"fc.lora_A": A, "fc.lora_B": B, "head.weight": torch.zeros(3, 5)}
    if delta:
        state["fc.base_delta"] = torch.zeros(OUT, IN)
    return state


def client_states(As, Bs, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"fc.lora_A": A, "fc.lora_B": B, "head.weight": torch.randn(3, 5, generator=g)} for A, B in zip(As, Bs)]


def frob(x):
    return float(torch.linalg.matrix_norm(x))


def test_stacked_factors_reproduce_mean_product_exactly_even_with_mixed_ranks():
    As, Bs, w = random_clients(4, ranks=[2, 4, 3, 4])
    B_st, A_st = stack_low_rank(Bs, As, w)
    assert B_st.shape == (OUT, 13) and A_st.shape == (13, IN)
    exact = sum(wk * (B.double() @ A.double()) for A, B, wk in zip(As, Bs, w))
    assert frob(B_st.double() @ A_st.double() - exact) < 1e-5 * frob(exact)
    assert torch.allclose(mean_of_products(Bs, As, w), exact.float(), atol=1e-5)


def test_stacking_strategy_folds_the_exact_mean_product_into_the_weight_and_restarts_lora():
    As, Bs, w = random_clients(3)
    strategy = StackingStrategy(scaling=2.0, seed=0)
    start = global_state(torch.randn(R, IN), torch.zeros(OUT, R), delta=True)
    start["fc.base_delta"] = torch.randn(OUT, IN)
    new = strategy.aggregate_states(start, client_states(As, Bs), w, server_round=1)
    added = new["fc.base_delta"] - start["fc.base_delta"]
    assert torch.allclose(added, 2.0 * mean_of_products(Bs, As, w), atol=1e-5)
    assert torch.count_nonzero(new["fc.lora_B"]) == 0 and new["fc.lora_A"].shape == (R, IN)
    assert not torch.equal(new["fc.lora_A"], start["fc.lora_A"])  # a fresh LoRA each round
    again = strategy.aggregate_states(start, client_states(As, Bs), w, server_round=1)
    assert torch.equal(again["fc.lora_A"], new["fc.lora_A"])  # ...the same one for every client


def test_lora_fair_identical_clients_zero_correction_equals_fedit():
    As, Bs, _ = random_clients(1)
    A_bar, B_bar, correction = residual_correction(As * 3, Bs * 3, [0.2, 0.3, 0.5])
    assert frob(correction) < 1e-6
    start = global_state(As[0], Bs[0])
    states = client_states(As * 3, Bs * 3)
    fair = LoraFairStrategy().aggregate_states(start, states, [1, 2, 3])
    fedit = FedItStrategy().aggregate_states(start, states, [1, 2, 3])
    for key in fedit:
        assert torch.allclose(fair[key], fedit[key], atol=1e-6), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_fair_closer_to_mean_product_than_fedit_on_random_clients(seed):
    As, Bs, w = random_clients(5, seed=seed)
    target = mean_of_products(Bs, As, w)
    A_bar, B_bar, correction = residual_correction(As, Bs, w, ridge_lam=0.01)
    err_fedit = frob(target - B_bar @ A_bar)
    err_fair = frob(target - (B_bar + correction) @ A_bar)
    assert err_fair < err_fedit
    # only the part of the residual in A_bar's row space is fixable (spec check 6)
    residual = target - B_bar @ A_bar
    floor = frob(residual - residual @ torch.linalg.pinv(A_bar) @ A_bar)
    assert err_fair >= floor - 1e-4


def test_lora_fair_correction_is_the_ridge_minimiser_and_vanishes_for_large_lambda():
    As, Bs, w = random_clients(4, seed=3)
    A_bar, B_bar, correction = residual_correction(As, Bs, w, ridge_lam=0.5)
    residual = mean_of_products(Bs, As, w) - B_bar @ A_bar
    objective = lambda dB: frob(residual - dB @ A_bar) ** 2 + 0.5 * frob(dB) ** 2  # noqa: E731
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        assert objective(correction) <= objective(correction + 1e-2 * torch.randn(correction.shape, generator=g)) + 1e-6
    closed = residual @ A_bar.T @ torch.linalg.inv(A_bar @ A_bar.T + 0.5 * torch.eye(R))
    assert torch.allclose(correction, closed, atol=1e-4)
    _, _, tiny = residual_correction(As, Bs, w, ridge_lam=1e6)
    assert frob(tiny) < 1e-3 * frob(correction)
    assert torch.allclose(ridge_right_solve(residual @ A_bar.T, A_bar, 0.0), residual @ torch.linalg.pinv(A_bar), atol=1e-3)


def test_ffa_lora_keeps_A_and_is_exact():
    As, Bs, w = random_clients(3)
    A = As[0]
    start = global_state(A, torch.zeros(OUT, R))
    uploads = [{"fc.lora_B": B, "head.weight": torch.ones(3, 5) * k} for k, B in enumerate(Bs)]
    new = FfaLoraStrategy().aggregate_states(start, uploads, w)
    assert torch.equal(new["fc.lora_A"], A)
    assert torch.allclose(new["fc.lora_B"] @ A, mean_of_products(Bs, [A] * 3, w), atol=1e-5)
    assert torch.allclose(new["head.weight"], torch.full((3, 5), sum(k * wk for k, wk in enumerate(w))))


def test_non_factor_tensors_are_fedavged_and_bad_inputs_raise():
    As, Bs, w = random_clients(2)
    states = client_states(As, Bs)
    new = FedItStrategy().aggregate_states(global_state(As[0], Bs[0]), states, [1, 3])
    assert torch.allclose(new["head.weight"], 0.25 * states[0]["head.weight"] + 0.75 * states[1]["head.weight"])
    with pytest.raises(ConfigError, match="num-examples"):
        FedItStrategy().aggregate_states(global_state(As[0], Bs[0]), states, [0, 0])
    with pytest.raises(ConfigError, match="lam"):
        LoraFairStrategy(lam=-1)
    with pytest.raises(ConfigError, match="unknown federated strategy"):
        strategy_class("fedprox")


def test_lora_fair_beats_fedit_on_clients_trained_on_dirichlet_splits():
    """Real local training from one broadcast on label-skewed synthetic data: the spec's non-IID check."""
    spec = HeadSpec(in_features=16, hidden=16, num_classes=4, rank=4, lr=2e-2, local_epochs=2, batch_size=16)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 2
    y = torch.randint(0, 4, (240,), generator=g)
    x = centres[y] + torch.randn(240, 16, generator=g)
    parts = dirichlet_partition(y.tolist(), 3, alpha=0.3, seed=0)
    start = model_state(build_model(spec))
    start["fc1.lora_B"] = 0.1 * torch.randn(start["fc1.lora_B"].shape, generator=g)  # a mid-training broadcast
    uploads, sizes = [], []
    for k, idx in enumerate(parts):
        model = build_model(spec)
        load_model_state(model, start)
        train_local(model, x[idx], y[idx], spec, seed=k)
        uploads.append(model_state(model))
        sizes.append(len(idx))
    fair = LoraFairStrategy(solver="ridge").aggregate_states(start, uploads, sizes)
    fedit = FedItStrategy().aggregate_states(start, uploads, sizes)
    paper = LoraFairStrategy().aggregate_states(start, uploads, sizes)  # the default: the paper's similarity solver
    p = [s / sum(sizes) for s in sizes]
    for layer in ("fc1", "fc2"):
        target = mean_of_products([u[f"{layer}.lora_B"] for u in uploads], [u[f"{layer}.lora_A"] for u in uploads], p)
        err_fair = frob(target - fair[f"{layer}.lora_B"] @ fair[f"{layer}.lora_A"])
        err_fedit = frob(target - fedit[f"{layer}.lora_B"] @ fedit[f"{layer}.lora_A"])
        assert err_fair < err_fedit, (layer, err_fair, err_fedit)
        cos = lambda X: float((X * target).sum() / X.norm() / target.norm())  # noqa: E731
        cos_paper = cos(paper[f"{layer}.lora_B"] @ paper[f"{layer}.lora_A"])
        assert cos_paper > cos(fedit[f"{layer}.lora_B"] @ fedit[f"{layer}.lora_A"]) + 1e-4, layer


def test_logged_product_error_is_zero_for_exact_strategies_and_smaller_for_lora_fair():
    As, Bs, w = random_clients(4, seed=3)
    start = global_state(torch.randn(R, IN), torch.randn(OUT, R), delta=True)
    states = client_states(As, Bs)
    errors = {}
    for cls in (FedItStrategy, LoraFairStrategy, StackingStrategy):
        strategy = cls(scaling=2.0, solver="ridge") if cls is LoraFairStrategy else cls(scaling=2.0)
        strategy.aggregate_states(start, states, w)
        errors[cls.name] = strategy.last_product_error
        if cls is LoraFairStrategy:
            fedit_same = strategy.extra_log()["fedit_product_error"]
    ffa = FfaLoraStrategy(scaling=2.0)
    ffa.aggregate_states(start, [{k: v for k, v in s.items() if k != "fc.lora_A"} for s in states], w)
    # the logged number is the definition, computed independently here
    target = mean_of_products(Bs, As, w).double()
    A_bar = sum(wk * A for A, wk in zip(As, w)).double()
    B_bar = sum(wk * B for B, wk in zip(Bs, w)).double()
    assert errors["fedit"] == pytest.approx(frob(B_bar @ A_bar - target) / frob(target), rel=1e-5)
    assert fedit_same == pytest.approx(errors["fedit"], rel=1e-6)  # its averages are summed in float64
    assert errors["lora-fair"] < 0.99 * errors["fedit"]
    assert errors["stacking"] < 1e-5 and ffa.last_product_error < 1e-5


# ---- the paper's server solver (solver="sgd") ---------------------------------------------------------------
def cosine(X, Y):
    return float((X.double() * Y.double()).sum() / X.double().norm() / Y.double().norm())


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("b_scale", [1.0, 1e-3])
def test_sgd_solver_lowers_the_papers_objective_computed_from_the_dense_update(optimizer, b_scale):
    As, Bs, w = random_clients(5, seed=4)
    Bs = [b_scale * B for B in Bs]
    A_bar, B_bar, dB, info = similarity_correction(As, Bs, w, lam=0.01, steps=200, optimizer=optimizer)
    ideal = mean_of_products(Bs, As, w)
    # the objective, from the dense out x in matrices (the solver itself uses r x r products only)
    dense = lambda d: 1 - cosine(ideal, (B_bar + d) @ A_bar) + 0.01 * frob(d)  # noqa: E731
    assert info["objective"] == pytest.approx(dense(dB), rel=1e-4, abs=1e-6)
    assert info["objective_at_zero"] == pytest.approx(dense(torch.zeros_like(dB)), rel=1e-5)
    assert dense(dB) < dense(torch.zeros_like(dB)) - 0.01  # a real decrease, not the start point
    assert info["cosine"] == pytest.approx(cosine(ideal, (B_bar + dB) @ A_bar), abs=1e-5)
    g = torch.Generator().manual_seed(1)  # a local minimum: random nudges do not improve it
    for _ in range(5):
        nudge = 1e-3 * frob(dB) * torch.randn(dB.shape, generator=g) / dB.numel() ** 0.5
        assert dense(dB) <= dense(dB + nudge) + 1e-6


def test_sgd_solver_identical_clients_zero_correction():
    As, Bs, _ = random_clients(1, seed=5)
    _, _, dB, info = similarity_correction(As * 3, Bs * 3, [0.2, 0.3, 0.5])
    assert torch.count_nonzero(dB) == 0 and info["cosine"] == pytest.approx(1.0, abs=1e-9)


def test_sgd_and_ridge_products_point_the_same_way_as_both_lambdas_vanish():
    """max cos is reached at X = C G^-1 (up to scale), which is the ridge's B_bar + dB as ridge_lam -> 0."""
    As, Bs, w = random_clients(4, seed=6)
    A_bar, B_bar, dB_sgd, info = similarity_correction(As, Bs, w, lam=1e-6, steps=1000)
    _, _, dB_ridge = residual_correction(As, Bs, w, ridge_lam=1e-9)
    ideal = mean_of_products(Bs, As, w)
    P_sgd, P_ridge = (B_bar + dB_sgd) @ A_bar, (B_bar + dB_ridge) @ A_bar
    assert cosine(P_sgd, P_ridge) > 0.9999
    assert cosine(ideal, P_sgd) == pytest.approx(cosine(ideal, P_ridge), abs=1e-5)
    assert cosine(ideal, P_sgd) > cosine(ideal, B_bar @ A_bar) + 0.01
    # with the paper's lambda = 0.01 the two differ: lam ||dB|| (plain norm) is not ridge_lam ||dB||^2
    _, _, dB_paper, _ = similarity_correction(As, Bs, w, lam=0.01)
    assert frob(dB_paper - dB_ridge) > 1e-3 * frob(dB_ridge)


def test_lora_fair_solver_options_and_the_old_lam_name():
    As, Bs, w = random_clients(3, seed=7)
    start, states = global_state(As[0], Bs[0]), client_states(As, Bs)
    with pytest.warns(FutureWarning, match="ridge_lam"):
        old = LoraFairStrategy(solver="ridge", lam=0.5)
    assert old.ridge_lam == 0.5
    new = LoraFairStrategy(solver="ridge", ridge_lam=0.5).aggregate_states(start, states, w)
    assert torch.equal(old.aggregate_states(start, states, w)["fc.lora_B"], new["fc.lora_B"])
    with pytest.warns(FutureWarning, match="ridge_lam"):
        _, _, legacy = residual_correction(As, Bs, w, lam=0.5)
    assert torch.allclose(legacy, residual_correction(As, Bs, w, ridge_lam=0.5)[2])
    for bad, match in (({"solver": "newton"}, "solver"), ({"lam": float("nan")}, "lam"), ({"server_steps": -1}, "server_steps"),
                       ({"server_optimizer": "lbfgs"}, "server_optimizer"), ({"ridge_lam": -1.0}, "ridge_lam")):
        with pytest.raises(ConfigError, match=match):
            LoraFairStrategy(**bad)
    strategy = LoraFairStrategy()
    assert strategy.solver == "sgd" and strategy.lam == 0.01  # the paper's solver and lambda are the default
    strategy.aggregate_states(start, states, w)
    log = strategy.extra_log()
    assert log["server_cosine"] > log["server_cosine_at_zero"]


# ---- heterogeneous client ranks ---------------------------------------------------------------------------
def test_svd_ordered_factors_keep_the_product_and_put_the_best_truncation_first():
    from rankwise.linalg import svd_ordered_factors

    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(6, IN, generator=g), torch.randn(OUT, 6, generator=g)
    B2, A2 = svd_ordered_factors(B, A)
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-4)
    singular = torch.linalg.svdvals((B @ A).double())
    for k in (1, 3, 5):
        best = float(torch.sqrt((singular[k:] ** 2).sum()))  # Eckart-Young: the optimal rank-k error
        assert frob((B @ A).double() - B2[:, :k].double() @ A2[:k].double()) == pytest.approx(best, rel=1e-4)
        assert frob((B @ A) - B[:, :k] @ A[:k]) > 1.05 * best  # plain slicing of the pair is worse
    Bz, Az = svd_ordered_factors(torch.zeros(OUT, 6), A)  # B = 0: every row of A' stays alive
    assert torch.count_nonzero(Bz) == 0 and float(torch.linalg.matrix_norm(Az @ Az.T - Az.norm() ** 2 / 6 * torch.eye(6))) < 1e-3


@pytest.mark.parametrize("cls", [FedItStrategy, LoraFairStrategy, FfaLoraStrategy, StackingStrategy])
def test_mixed_ranks_are_padded_so_the_ideal_update_is_exact(cls):
    ranks = [2, 4, 3, 4]
    As, Bs, w = random_clients(4, seed=9, ranks=ranks)
    g = torch.Generator().manual_seed(10)
    A_global = torch.randn(R, IN, generator=g)
    if cls is FfaLoraStrategy:  # A frozen and shared: each client holds the first r_k rows of the global A
        As = [A_global[:r] for r in ranks]
    start = global_state(A_global, torch.randn(OUT, R, generator=g), delta=cls is StackingStrategy)
    states = client_states(As, Bs)
    if cls is FfaLoraStrategy:
        states = [{k: v for k, v in s.items() if k != "fc.lora_A"} for s in states]
    strategy = cls(scaling=2.0, truncation_basis=True)
    captured = {}
    original = strategy.aggregate_layer

    def spy(layer, As_pad, Bs_pad, weights, *rest):
        captured["As"], captured["Bs"] = As_pad, Bs_pad
        return original(layer, As_pad, Bs_pad, weights, *rest)

    strategy.aggregate_layer = spy
    new = strategy.aggregate_states(start, states, w)
    exact = mean_of_products(Bs, As, w)  # from the clients' own, unpadded factors
    As_pad = captured["As"] or [A_global] * 4
    assert all(B.shape == (OUT, R) for B in captured["Bs"]) and all(A.shape == (R, IN) for A in As_pad)
    assert torch.allclose(mean_of_products(captured["Bs"], As_pad, w), exact, atol=1e-5)
    if cls is not FfaLoraStrategy:  # the rows a small client lacked are the global ones, not zeros
        assert torch.equal(captured["As"][0][2:], A_global[2:])
    assert new["fc.lora_A"].shape == (R, IN) and new["fc.lora_B"].shape == (OUT, R)
    if cls is StackingStrategy:
        assert torch.allclose(new["fc.base_delta"] - start["fc.base_delta"], 2.0 * exact, atol=1e-4)
        assert strategy.last_product_error < 1e-5
    if cls is FedItStrategy:  # re-factored in SVD order, product unchanged
        B_bar = sum(wk * B for B, wk in zip(captured["Bs"], w))
        A_bar = sum(wk * A for A, wk in zip(captured["As"], w))
        assert torch.allclose(new["fc.lora_B"] @ new["fc.lora_A"], B_bar @ A_bar, atol=1e-4)
        norms = new["fc.lora_B"].norm(dim=0)
        assert torch.all(norms[:-1] >= norms[1:] - 1e-5)


def test_a_small_rank_client_receives_the_leading_components():
    spec = HeadSpec(in_features=12, hidden=12, num_classes=3, rank=8)
    big = build_model(spec)
    state = model_state(big)
    g = torch.Generator().manual_seed(11)
    state = {k: torch.randn(v.shape, generator=g) for k, v in state.items()}
    small = build_model(spec, rank=4)
    with pytest.raises(CheckpointError, match="shape"):  # only on request: a wrong-rank state is otherwise refused
        load_model_state(small, state)
    load_model_state(small, state, truncate=True)
    layer = dict(small.adapted_layers())["fc1"].adapters["default"]
    assert torch.equal(layer.lora_A.detach(), state["fc1.lora_A"][:4]) and torch.equal(layer.lora_B.detach(), state["fc1.lora_B"][:, :4])
    assert layer.scaling == pytest.approx(spec.scaling)  # the global scale alpha / R, not alpha / r_k
    with pytest.raises(ConfigError, match="client rank"):
        build_model(spec, rank=9)


@pytest.mark.parametrize("strategy", ["fedit", "lora-fair", "ffa-lora", "stacking"])
def test_mixed_rank_rounds_run_through_the_client_and_server_round_logic(strategy, tmp_path):
    """The simulation's own round functions (what the Flower apps wrap), without the Ray runtime."""
    from rankwise.federated.simulation import FederatedRun, client_round, global_accuracy, initial_state
    from rankwise.federated.task import save_features

    g = torch.Generator().manual_seed(12)
    centres = torch.randn(3, 12, generator=g) * 2
    y = torch.randint(0, 3, (300,), generator=g)
    x = centres[y] + torch.randn(300, 12, generator=g)
    path = save_features(tmp_path / "f.safetensors", {"train_x": x[:240], "train_y": y[:240], "test_x": x[240:], "test_y": y[240:]})
    head = HeadSpec(in_features=12, hidden=12, num_classes=3, rank=4, lr=0.02)
    run = FederatedRun(features=str(path), strategy=strategy, clients=3, rounds=3, head=head, client_ranks=[1, 2, 4], alpha=1.0)
    assert [run.client_rank(k) for k in range(3)] == [1, 2, 4] and run.heterogeneous
    strategy_obj = run.make_strategy()
    state = initial_state(run)
    test = (x[240:], y[240:])
    accuracy = [global_accuracy(run, state, test)["accuracy"]]
    for server_round in (1, 2, 3):
        replies = [client_round(run, k, server_round, state, strategy_obj.trains_A) for k in range(3)]
        assert [u[1]["num-examples"] > 0 for u in replies] == [True] * 3
        assert replies[0][0]["fc1.lora_B"].shape[1] == 1  # the rank-1 client uploads rank 1
        state = strategy_obj.aggregate_states(state, [u for u, _ in replies], [m["num-examples"] for _, m in replies], server_round)
        if strategy in ("ffa-lora", "stacking"):
            assert strategy_obj.last_product_error < 1e-4
        accuracy.append(global_accuracy(run, state, test)["accuracy"])
    assert state["fc1.lora_A"].shape == (4, 12)
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy


def test_client_ranks_are_validated():
    from rankwise.federated.simulation import FederatedRun

    with pytest.raises(ConfigError, match="largest client rank"):
        FederatedRun(features="f", head=HeadSpec(rank=8), client_ranks=[4, 16])
    with pytest.raises(ConfigError, match="client_ranks"):
        FederatedRun(features="f", head=HeadSpec(rank=8), client_ranks=[0, 8])
