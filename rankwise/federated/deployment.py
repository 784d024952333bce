"""Run a federated-LoRA experiment on Flower's deployment runtime: a real SuperLink and N SuperNodes, as processes.

    this process (driver)                 flower-superlink  127.0.0.1:P  (Fleet + Control + Runtime API, one port)
      writes a Flower App (pyproject) ──>   flwr run ──> flwr-serverapp: rankwise ServerApp (simulation.make_server_app)
      tails rounds.jsonl, reads result          ^  Fleet API (HTTP, TLS optional)
                                                |
    flower-supernode i  --node-config "partition-id=i num-partitions=N"  ──> flwr-clientapp: rankwise ClientApp

The ServerApp and ClientApp are the simulation's own (`make_server_app`, `make_client_app`): the same strategies,
round loop, checkpoints and history. What differs is only where they run. The experiment (`FederatedRun`) travels
as JSON in the app's run config (`rankwise-run`); each SuperNode learns its partition from its node config. The
ServerApp process writes every round's history row to `deployment/rounds.jsonl` and the final global state to
`deployment/result.safetensors`; the driver reads them back, so the result has the simulation's form.

Every process this module starts is stopped (SIGTERM, then SIGKILL, with all its descendants) on success, error
and Ctrl-C; on Linux each child also gets SIGTERM if the driver itself dies (PR_SET_PDEATHSIG).

Fault injection: `FaultSpec(mode="crash")` kills the client's SuperNode process for real (SIGKILL, with its
ClientApp) while it holds that round's message; "hang" sleeps past the round timeout as in the simulation. The
killed node's reply never comes: the round aggregates the others, and later rounds go on with the nodes left.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rankwise.core.errors import ConfigError, RankwiseError, TrainingError
from rankwise.core.io import atomic_write, atomic_write_text
from rankwise.federated.simulation import FederatedRun, make_client_app, make_server_app

RUN_CONFIG_KEY = "rankwise-run"
WORK_DIR = "deployment"  # under the run's output directory: app, logs, progress, result
STARTUP_TIMEOUT = 180.0  # seconds for the SuperLink's port to open
KILL_MARKER = "kill-me"  # the victim ClientApp writes <work>/kill-me-<partition> when it holds the fatal round


class DeploymentError(RankwiseError, RuntimeError):
    """A Flower process failed to start or the run failed; the message names the log file to read."""


# ---- the experiment as JSON (run config values are strings, ints, floats or bools) -----------------------
def encode(value: Any) -> Any:
    """Dataclasses (of rankwise modules) to tagged dicts, recursively, so `decode` can rebuild the same objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict) and "__dataclass__" in value:
        module, _, name = value["__dataclass__"].partition(":")
        if not module.startswith("rankwise."):  # the run config is data: it may only name rankwise's own classes
            raise ConfigError(f"run config {RUN_CONFIG_KEY!r} names class {value['__dataclass__']!r}: only rankwise classes are allowed")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: decode(v) for k, v in value["fields"].items()})
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    return value


@dataclasses.dataclass
class DeployedRun(FederatedRun):
    """A `FederatedRun` whose strategy samples whichever nodes are connected: a SuperNode that died does not
    block the next round (the simulation's `min_available_nodes=clients` would wait for it forever)."""

    def make_strategy(self):
        strategy = super().make_strategy()
        strategy.min_available_nodes = 1
        return strategy


@dataclasses.dataclass
class AppSettings:
    """What the ServerApp/ClientApp processes need besides the experiment: where to write, what to inject."""

    run: FederatedRun
    output: str       # the run's output directory, on the SuperLink machine
    resume: bool = False
    kill_client: int | None = None  # partition whose SuperNode the driver kills in `kill_round`
    kill_round: int = 0


def _settings(context) -> AppSettings:
    raw = context.run_config.get(RUN_CONFIG_KEY)
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"the Flower run config lacks {RUN_CONFIG_KEY!r}: start the app with rankwise federate --deployment "
                          "or pass it with flwr run -c")
    return decode(json.loads(raw))


# ---- the Flower App: module-level objects `flwr-serverapp` / `flwr-clientapp` load by name ------------------
def _make_apps():
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def serve(grid, context) -> None:
        settings = _settings(context)
        work = Path(settings.output) / WORK_DIR
        progress = work / "rounds.jsonl"
        error_file = work / "server-error.txt"

        def on_round(row: dict) -> None:
            with progress.open("a", encoding="utf-8") as fh:  # one line per round; the driver tails it
                fh.write(json.dumps(row, default=str) + "\n")

        result: dict = {}
        try:
            make_server_app(settings.run, Path(settings.output), settings.resume, result, on_round)(grid, context)
            from safetensors.torch import save_file

            atomic_write(work / "result.safetensors", lambda tmp: save_file({k: v.contiguous() for k, v in result["state"].items()}, tmp))
            atomic_write_text(work / "result.json", json.dumps({"history": result["history"]}, indent=2, default=str))
        except BaseException as err:  # noqa: BLE001 -- reported to the driver, then re-raised for Flower's log
            import traceback

            atomic_write_text(error_file, f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
            raise

    def delegate(msg, context):
        settings = _settings(context)
        client = int(context.node_config["partition-id"])
        if settings.kill_client == client and msg.metadata.message_type.startswith("train"):
            server_round = int(msg.content["config"]["server-round"])
            if server_round == settings.kill_round:
                # hold the round's message and ask the driver to kill this SuperNode now, mid-round
                atomic_write_text(Path(settings.output) / WORK_DIR / f"{KILL_MARKER}-{client}", str(os.getpid()))
                time.sleep(300)
                raise TrainingError(f"client {client} was to be killed in round {server_round} but is still alive")
        return make_client_app(settings.run)(msg, context)

    client_app.query()(delegate)
    client_app.train()(delegate)
    return server_app, client_app


try:
    server_app, client_app = _make_apps()
except ImportError:  # flwr is an optional extra; `rankwise federate --deployment` says so when it is missing
    server_app = client_app = None


# ---- the driver -------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (bound and released: another process could still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class TlsFiles:
    """The certificates `--tls-dir` must hold: ca.crt (the CA), server.pem + server.key (SuperLink, SAN 127.0.0.1)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: str | Path) -> "TlsFiles":
        directory = Path(directory)
        files = cls(directory / "ca.crt", directory / "server.pem", directory / "server.key")
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise ConfigError(f"--tls-dir {directory} lacks {missing}: it must hold ca.crt, server.pem and server.key "
                              "(see docs/guides/federate.md, 'Deployment runtime', for the openssl commands)")
        return files


def _flower_executable(name: str) -> str:
    """The Flower console script next to this interpreter (the venv rankwise runs in), else on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise ConfigError(f"{name} not found next to {sys.executable} nor on PATH: install the extra, pip install 'rankwise[federated]'")
    return found


def _die_with_parent() -> None:
    """preexec_fn: on Linux the child gets SIGTERM when the driver dies, even by SIGKILL (no orphans)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ProcessGroup:
    """The Flower processes of one run; `stop` ends each one and every descendant it spawned."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.seen: set[int] = set()  # every pid of the run ever observed (the no-orphans check reads it)

    def record(self, path: Path) -> None:
        """Add the live process tree to `seen` and write it to `path` (JSON), for tests and post-mortems."""
        self.seen.update(self.pids())
        atomic_write_text(path, json.dumps(sorted(self.seen)))

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen:
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                cwd=cwd, preexec_fn=_die_with_parent if os.name == "posix" else None)
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        self.seen.add(proc.pid)
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def kill_tree(self, name: str, sig: int = signal.SIGKILL) -> list[int]:
        """Signal `name` and all its descendants (Flower's SuperExec runs in its own session: killpg misses it)."""
        import psutil

        proc = self.procs[name]
        try:
            root = psutil.Process(proc.pid)
            tree = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for p in reversed(tree):  # children first, so a parent cannot respawn them
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        return [p.pid for p in tree]

    def stop(self, grace: float = 5.0) -> None:
        import psutil

        tree: list = []
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                tree += [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in tree:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace)
        for proc in self.procs.values():  # reap our direct children
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass

    def pids(self) -> list[int]:
        """Every live process of the run (ours and their descendants): what `stop` must leave at zero."""
        import psutil

        found = []
        for proc in self.procs.values():
            try:
                root = psutil.Process(proc.pid)
                tree = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for p in tree:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p.pid)
                except psutil.NoSuchProcess:
                    pass
        return found


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {proc.returncode} before listening on {host}:{port}; "
                                  f"see {log}:\n{tail(log)}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"flower-superlink did not listen on {host}:{port} within {timeout:.0f} s; see {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def write_flower_app(directory: Path, settings: AppSettings) -> Path:
    """A minimal Flower App: a pyproject naming rankwise's ServerApp/ClientApp, with the experiment in its config.

    The FAB `flwr run` builds from it holds only this file; the code itself comes from the rankwise installed
    where the SuperLink and SuperNodes run (runtime dependency installation is switched off).
    """
    directory.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(encode(settings))
    toml = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rankwise-federate"
version = "1.0.0"
description = "rankwise federated LoRA on Flower's deployment runtime (generated by rankwise federate --deployment)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "rankwise"

[tool.flwr.app.components]
serverapp = "rankwise.federated.deployment:server_app"
clientapp = "rankwise.federated.deployment:client_app"

[tool.flwr.app.config]
{RUN_CONFIG_KEY} = {json.dumps(payload)}
"""
    atomic_write_text(directory / "pyproject.toml", toml)
    return directory


def _flower_env(home: Path) -> dict[str, str]:
    import rankwise

    env = dict(os.environ)
    source_root = str(Path(rankwise.__file__).resolve().parent.parent)  # the children import the same rankwise
    env["PYTHONPATH"] = os.pathsep.join([source_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # SuperExec is found on PATH
    env["FLWR_HOME"] = str(home)  # the flwr CLI's connection config lives here, not in the user's ~/.flwr
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_federated_deployment(run: FederatedRun, output: str | Path, resume: bool = False,
                             on_round: Callable[[dict], None] | None = None, tls_dir: str | Path | None = None,
                             host: str = "127.0.0.1", timeout: float | None = None) -> dict:
    """Run the experiment on a SuperLink + `run.clients` SuperNodes on `host`; same result as `run_federated`,
    plus `"killed"`: [{"client", "round", "pids"}] for SuperNodes killed by a crash fault."""
    import psutil  # noqa: F401 -- needed to stop process trees; fail before anything starts
    from safetensors.torch import load_file

    if server_app is None:
        raise ConfigError("rankwise federate --deployment needs Flower: pip install 'rankwise[federated]'")
    output = Path(output).resolve()
    work = output / WORK_DIR
    for stale in ("pids.json", "rounds.jsonl", "result.json", "result.safetensors", "server-error.txt"):
        (work / stale).unlink(missing_ok=True)
    for stale in work.glob(f"{KILL_MARKER}-*"):
        stale.unlink()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tls = TlsFiles.from_dir(tls_dir) if tls_dir is not None else None

    kill = run.fault if run.fault is not None and run.fault.mode == "crash" else None
    app_run = DeployedRun(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run) if f.init})
    if kill:
        app_run.fault = None  # the driver kills the process instead of the ClientApp raising
    settings = AppSettings(run=app_run, output=str(output), resume=resume,
                           kill_client=kill.client if kill else None, kill_round=kill.round if kill else 0)
    app_dir = write_flower_app(work / "app", settings)
    home = work / "flwr-home"
    env = _flower_env(home)
    port = free_port(host)
    address = f"{host}:{port}"
    security = ["--insecure"] if tls is None else []
    connection = {"address": address, "insecure": True} if tls is None else {"address": address, "root-certificates": str(tls.ca)}
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "rankwise"', "", "[superlink.rankwise]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in connection.items()]
    atomic_write_text(home / "config.toml", "\n".join(lines) + "\n")

    group = ProcessGroup(logs, env)
    previous_sigterm = None
    if threading_is_main():
        previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill <driver>` cleans up like Ctrl-C
    started = time.perf_counter()
    try:
        link_argv = [_flower_executable("flower-superlink"), "--host", host, "--port", str(port),
                     "--disable-runtime-dependency-installation"]
        link_argv += security if tls is None else ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        link = group.start("superlink", link_argv, cwd=work)
        _wait_for_port(host, port, link, STARTUP_TIMEOUT, group.log_path("superlink"))
        for client in range(run.clients):
            node_argv = [_flower_executable("flower-supernode"), "--superlink", address, "--host", host, "--port", str(free_port(host)),
                         "--node-config", f"partition-id={client} num-partitions={run.clients}"]
            node_argv += security if tls is None else ["--root-certificates", str(tls.ca)]
            group.start(f"supernode-{client}", node_argv, cwd=work)
        group.record(work / "pids.json")
        submit = subprocess.run([_flower_executable("flwr"), "run", str(app_dir), "rankwise", "--format", "json"], env=env,
                                cwd=work, capture_output=True, text=True, timeout=STARTUP_TIMEOUT)
        (logs / "flwr-run.log").write_text(submit.stdout + submit.stderr, encoding="utf-8")
        if submit.returncode != 0:
            raise DeploymentError(f"flwr run failed (exit {submit.returncode}); see {logs / 'flwr-run.log'}:\n{tail(logs / 'flwr-run.log')}")
        history, killed = _follow(run, work, group, on_round, timeout)
    finally:
        try:
            group.record(work / "pids.json")
        finally:
            group.stop()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    state = load_file(str(work / "result.safetensors"))
    return {"history": history, "state": state, "seconds": time.perf_counter() - started, "killed": killed,
            "logs": str(logs), "address": address, "tls": tls is not None, "pids": sorted(group.seen)}


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt(f"signal {signum}")


def _follow(run: FederatedRun, work: Path, group: ProcessGroup, on_round, timeout: float | None) -> tuple[list, list]:
    """Wait for the ServerApp's result, passing each finished round to `on_round` and carrying out kill requests."""
    timeout = timeout if timeout is not None else STARTUP_TIMEOUT + run.rounds * (run.round_timeout + 120.0)
    deadline = time.monotonic() + timeout
    progress, result, error = work / "rounds.jsonl", work / "result.json", work / "server-error.txt"
    seen, killed, recorded = 0, [], 0.0
    while True:
        if time.monotonic() - recorded > 2.0:
            group.record(work / "pids.json")
            recorded = time.monotonic()
        if progress.is_file():
            rows = [json.loads(line) for line in progress.read_text(encoding="utf-8").splitlines() if line.strip()]
            for row in rows[seen:]:
                if on_round:
                    on_round(row)
            seen = len(rows)
        for marker in work.glob(f"{KILL_MARKER}-*"):
            client = int(marker.name.rsplit("-", 1)[1])
            pids = group.kill_tree(f"supernode-{client}")
            marker.unlink()
            killed.append({"client": client, "round": run.fault.round if run.fault else None, "pids": pids})
        if result.is_file():
            return json.loads(result.read_text(encoding="utf-8"))["history"], killed
        if error.is_file():
            raise DeploymentError(f"the ServerApp failed: {error.read_text(encoding='utf-8').splitlines()[0]}\n"
                                  f"(traceback in {error}; Flower logs in {group.log_dir})")
        link = group.procs["superlink"]
        if link.poll() is not None:
            raise DeploymentError(f"flower-superlink exited with code {link.returncode} mid-run; see {group.log_path('superlink')}:\n"
                                  f"{tail(group.log_path('superlink'))}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"no result after {timeout:.0f} s; Flower logs in {group.log_dir}:\n{tail(group.log_path('superlink'))}")
        time.sleep(0.2)
