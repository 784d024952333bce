"""Shared by the compression benchmarks: merge JSON results across runs and plot quality vs kept parameters."""
from __future__ import annotations

import json
import os
from pathlib import Path


def merge_results(path: Path, rows: list[dict], meta: dict) -> dict:
    data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "runs": []}
    keyed = {(r["method"], r["variant"], r["ratio"]): r for r in data["runs"]}
    for row in rows:
        keyed[(row["method"], row["variant"], row["ratio"])] = row
    data["runs"] = sorted(keyed.values(), key=lambda r: (r["method"], r["variant"], -r["ratio"]))
    data["meta"].update(meta)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)
    return data


def plot(data: dict, png: Path, metric: str = "perplexity", title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list] = {}
    for run in data["runs"]:
        label = run["method"] + (f" ({run['variant']})" if run["variant"] else "")
        series.setdefault(label, []).append((run["measured_ratio"], run[metric]))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label,
                linestyle="--" if label.startswith("svd") else "-")
    if "base" in data["meta"]:
        ax.axhline(data["meta"]["base"], color="gray", linewidth=0.8, label="uncompressed")
    ax.set_xlabel("parameters kept in the compressed layers")
    ax.set_ylabel(metric)
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def combine(target: Path, sources: list[Path], title: str, metric: str = "perplexity") -> dict:
    """Merge the runs of several result files (benchmarks run in parallel processes) into one, and re-plot."""
    data = json.loads(target.read_text()) if target.exists() else None
    for source in sources:
        extra = json.loads(source.read_text())
        data = merge_results(target, extra["runs"], extra["meta"]) if data is not None else extra
        if not target.exists():
            target.write_text(json.dumps(data, indent=2))
    plot(data, target.with_suffix(".png"), metric=metric, title=title)
    return data


def existing_rows(path: Path) -> set[tuple]:
    """(method, variant, ratio) keys already in a results file, so an interrupted benchmark can resume."""
    if not path.exists():
        return set()
    return {(r["method"], r["variant"], r["ratio"]) for r in json.loads(path.read_text())["runs"]}
