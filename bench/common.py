"""Helpers shared by the benchmarks: peak-memory windows, timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"machine": {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                           "python": platform.python_version(), "cores": os.cpu_count()}, **payload}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def run_methods(script: str, methods: tuple[str, ...], extra_args: list[str]) -> dict[str, dict]:
    """Run `script --method M` once per method, each in a fresh process (peak memory does not mix).

    The script prints one JSON row last; a failing method gets an `error` row instead of stopping the run.
    Rows gain `time_x_floor` against the "floor" method's median step time.
    """
    import subprocess
    import sys

    rows: dict[str, dict] = {}
    for method in methods:
        out = subprocess.run([sys.executable, script, "--method", method, *extra_args], capture_output=True, text=True)
        lines = (out.stdout if out.returncode == 0 else out.stderr).strip().splitlines() or ["no output"]
        rows[method] = json.loads(lines[-1]) if out.returncode == 0 else {"method": method, "error": lines[-1]}
        print(rows[method], flush=True)
    floor = rows.get("floor", {}).get("step_seconds_median")
    for row in rows.values():
        if floor and "step_seconds_median" in row:
            row["time_x_floor"] = row["step_seconds_median"] / floor
    return rows
