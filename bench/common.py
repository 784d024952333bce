"""Shared benchmark helpers: timing medians, peak RSS in a fresh process, JSON output, a rich table."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}


def interleaved_medians(steps: dict[str, Callable[[], None]], warmup: int = 3, rounds: int = 12) -> dict[str, dict]:
    """Median seconds per call of each step, run round-robin so machine noise hits every contender alike."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            samples[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    # CPU seconds (all threads) are reported beside wall time: on a shared, loaded machine they measure the work
    # done, while wall time also counts waiting for a core.
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "cpu_median_s": statistics.median(cpu[name]),
                   "samples": len(v)} for name, v in samples.items()}


def peak_rss_in_subprocess(script: str, *args: str) -> float:
    """Run `python script args...` (which prints its peak RSS in MB on the last line) and return that number."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return float(out.stdout.strip().splitlines()[-1])


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    return path


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so the next reading covers only what follows (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_mib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def peak_rss_mib() -> float:
    """Peak RSS since the last `reset_peak_rss()` (or process start), MiB."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def run_methods(script: str, methods: tuple[str, ...], extra_args: list[str]) -> dict[str, dict]:
    """Run `script --method M` once per method, each in a fresh process (peak memory does not mix).

    The script prints one JSON row last; a failing method gets an `error` row instead of stopping the run.
    Rows gain `time_x_floor` against the "floor" method's median step time.
    """
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
