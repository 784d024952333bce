"""Per-round accuracy of several federated strategies: one JSON that accumulates runs, and a comparison plot."""
from __future__ import annotations

import json
from pathlib import Path

from rankwise.core.io import atomic_write, atomic_write_text

RESULTS_NAME = "results.json"
PLOT_NAME = "accuracy.png"


def record_result(output: Path, strategy: str, fingerprint: dict, result: dict) -> dict:
    """Add (or replace) one strategy's history in `output/results.json`; returns the whole file's content."""
    path = Path(output) / RESULTS_NAME
    results = json.loads(path.read_text()) if path.is_file() else {"strategies": {}}
    history = result["history"]
    results["strategies"][strategy] = {
        "settings": fingerprint,
        "final_accuracy": history[-1]["accuracy"],
        "best_accuracy": max(h["accuracy"] for h in history),
        "seconds": result.get("seconds"),
        "dropped_client_rounds": sum(len(h["failed"]) for h in history),
        # which client failed in which round (partition ids; rows written before this field existed have none)
        "failures": [{"round": h["round"], "clients": h.get("failed_clients", []), "reasons": h["failed"]} for h in history if h["failed"]],
        "history": history,
    }
    atomic_write_text(path, json.dumps(results, indent=2, default=str))
    return results


def settings_differ(results: dict) -> list[str]:
    """Settings (other than the strategy) that differ between the runs in one results file."""
    runs = [dict(r["settings"], strategy=None) for r in results["strategies"].values()]
    keys = sorted({k for r in runs for k in r})
    return [k for k in keys if len({json.dumps(r.get(k), sort_keys=True, default=str) for r in runs}) > 1]


def plot_comparison(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in sorted(results["strategies"].items()):
        rounds = [h["round"] for h in run["history"]]
        ax.plot(rounds, [h["accuracy"] for h in run["history"]], marker="o", markersize=3, label=f"{name} ({run['final_accuracy']:.3f})")
        failed = [h for h in run["history"] if h["failed"]]
        ax.scatter([h["round"] for h in failed], [h["accuracy"] for h in failed], marker="x", color="black", zorder=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (global model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(title="strategy (final)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
