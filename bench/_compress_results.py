"""Shared by the compression benchmarks: merge JSON results across runs and plot quality vs kept parameters."""
from __future__ import annotations

import json
import os
from pathlib import Path


def merge_results(path: Path, rows: list[dict], meta: dict) -> dict:
    """Add/replace rows keyed by (method, variant, ratio); a lock file lets parallel benchmark processes share one JSON."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _merge_locked(path, rows, meta)


def _merge_locked(path: Path, rows: list[dict], meta: dict) -> dict:
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
    markers = "osD^vP*X"
    for i, (label, points) in enumerate(sorted(series.items())):
        points.sort()
        # distinct markers and a thick dashed SVD line: LoRD's uniform split sits exactly on SVD's curve
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=markers[i % len(markers)], label=label,
                linestyle="--" if label.startswith("svd") else "-", linewidth=3 if label.startswith("svd") else 1.5,
                markersize=9 if label.startswith("svd") else 6, zorder=1 if label.startswith("svd") else 2)
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


def markdown_table(data: dict, metrics: list[str], title: str) -> str:
    """Method x ratio table of the given metrics plus parameters and latency, with plain SVD's row first.

    The last column says, per metric, whether the row beats plain SVD at the same target ratio (lower
    perplexity, higher cosine/accuracy/AUC), so the issue's target can be read off directly.
    """
    lower_better = {"perplexity"}
    runs = data["runs"]
    svd = {r["ratio"]: r for r in runs if r["method"] == "svd" and not r["variant"]}
    meta = data["meta"]
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)) and k != "test_labels"]
    labels = meta.get("test_labels")
    # accuracy metrics whose per-tweet predictions were kept: compared with SVD's on the same tweets
    paired = [m for m in metrics if labels is not None and m.endswith("accuracy")
              and any(m.replace("accuracy", "predictions") in r for r in runs)]
    lines += ["", "| method | target ratio | measured ratio | " + " | ".join(metrics)
              + "".join(f" | {m} − SVD's (paired 95% CI)" for m in paired)
              + " | params after | latency ms | compress s | beats SVD |",
              "|---|---|---|" + "---|" * (len(metrics) + len(paired)) + "---|---|---|---|"]
    order = {"svd": 0, "lord": 1, "modegpt": 2, "afm": 3, "pela": 4}
    for r in sorted(runs, key=lambda r: (order.get(r["method"], 9), r["variant"], -r["ratio"])):
        label = r["method"] + (f" ({r['variant']})" if r["variant"] else "")
        cells = []
        for m in metrics:
            v = r.get(m)  # rows from an older run may lack a newer metric
            cells.append("-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)))
        base = svd.get(r["ratio"])
        for m in paired:
            cells.append(_paired_difference(r, base, labels, m) if base is not None and base is not r else "-")
        if r["method"] == "svd" and not r["variant"]:
            verdict = "(baseline)"
        elif base is None:
            verdict = "no SVD row"
        else:
            verdict = " / ".join(_paired_verdict(r, base, labels, m) if m in paired
                                 else _verdict(r[m], base[m], m in lower_better) if m in r and m in base else "-"
                                 for m in metrics)
        lines.append(f"| {label} | {r['ratio']} | {r['measured_ratio']:.3f} | " + " | ".join(cells)
                     + f" | {r['params_after']:,} | {r['latency_ms']:.0f} | {r.get('compress_seconds', 0):.0f} | {verdict} |")
    return "\n".join(lines) + "\n"


def _verdict(value: float, baseline: float, lower_better: bool) -> str:
    # LoRD's uniform split is SVD up to float rounding: call a 0.1% difference a tie, not a win
    if abs(value - baseline) <= 1e-3 * max(abs(baseline), 1e-12):
        return "tie"
    return "yes" if (value < baseline if lower_better else value > baseline) else "**no**"


def _paired_verdict(run: dict, baseline: dict, labels: str, metric: str) -> str:
    """yes/no only when the paired 95% interval of the accuracy difference excludes 0, else "n.s."."""
    text = _paired_difference(run, baseline, labels, metric)
    if text == "-":
        return _verdict(run[metric], baseline[metric], False) if metric in run and metric in baseline else "-"
    low, high = (float(v) for v in text.split("[")[1].rstrip("]").split(","))
    return "yes" if low > 0 else "**no**" if high < 0 else "n.s."


def _paired_difference(run: dict, baseline: dict, labels: str, metric: str = "probe_accuracy") -> str:
    """Accuracy difference on the same test items with a normal-approximation 95% interval of the paired mean."""
    key = metric.replace("accuracy", "predictions")
    a, b = run.get(key), baseline.get(key)
    if not a or not b or len(a) != len(labels) or len(b) != len(labels):
        return "-"
    d = [(x == y) - (z == y) for x, z, y in zip(a, b, labels)]
    n = len(d)
    mean = sum(d) / n
    sd = (sum((v - mean) ** 2 for v in d) / (n - 1)) ** 0.5
    half = 1.96 * sd / n ** 0.5
    return f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"


if __name__ == "__main__":
    import sys

    # python bench/_compress_results.py NAME TITLE METRIC... : write NAME.md and re-plot NAME.png (first metric)
    name, title, metrics = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = Path(__file__).parent / "results"
    data = json.loads((results / f"{name}.json").read_text())
    text = markdown_table(data, metrics, title)
    plot(data, results / f"{name}.png", metric=metrics[0], title=title)
    tmp = results / f"{name}.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, results / f"{name}.md")
    print(text)
