"""Run a federated-LoRA experiment as a Flower simulation (ServerApp + ClientApp on Flower's Ray runtime).

    server (this process, Flower ServerApp)                       clients (Ray actors, Flower ClientApp)
    for round t:  strategy.configure_train ── grid.send_and_receive ──>  load global (A, B, head), train locally
                  strategy.aggregate_train <── replies (timeout) ────────  upload (A, B, head), num-examples
                  evaluate on the test set, checkpoint (safetensors + JSON, atomic)

A client that raises or misses the round timeout sends no valid reply: it is dropped for that round (the
p_k are renormalised over the others) and training continues. `resume=True` continues from the last
checkpoint to the same result as an uninterrupted run (client seeds depend only on (seed, round, client)).

Before its first round the server waits (up to STARTUP_TIMEOUT) until every client has answered a "query"
message: starting Ray, the actors' imports and reading the feature file are thus never charged to a
round's timeout. Otherwise a loaded machine could drop a healthy client from the first round, and an
uninterrupted and a resumed run would silently take different paths.
"""
from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rankwise.core.errors import CheckpointError, ConfigError, short_repr
from rankwise.core.io import atomic_write, atomic_write_text, remove_stale_temps
from rankwise.federated.baselines import strategy_class
from rankwise.federated.encoder_task import (EncoderSpec, build_encoder_model, evaluate_encoder, load_tokens, split, token_batches,
                                             train_local_encoder)
from rankwise.federated.partition import partition
from rankwise.federated.task import HeadSpec, build_model, evaluate_features, load_features, load_model_state, model_state, train_local

STATE_FILE = "server_state.json"
STARTUP_TIMEOUT = 900.0  # seconds for the simulation runtime to start and every client to answer once


@dataclass
class FaultSpec:
    """Inject a failure: `client` (partition id) fails in `round`, by raising ("crash") or sleeping ("hang")."""

    client: int
    round: int
    mode: str = "crash"
    hang_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.mode not in ("crash", "hang"):
            raise ConfigError(f"fault mode {self.mode!r} is invalid: expected 'crash' or 'hang'")


@dataclass
class FederatedRun:
    """One federated experiment. `alpha=None` is an IID split, otherwise Dirichlet(alpha) label skew.

    Two tasks: `encoder=EncoderSpec(...)` (mode "encoder": LoRA inside the pretrained encoder; `features` is then a
    token file from `encoder_task.cached_tokens`), or, when `encoder` is None, `head` (mode "head": a LoRA MLP head on
    a cached feature file from `task.cached_features`).
    """

    features: str  # the data file every client reads: features (mode head) or token ids (mode encoder)
    strategy: str = "lora-fair"
    clients: int = 8
    rounds: int = 20
    alpha: float | None = 0.5
    head: HeadSpec = field(default_factory=HeadSpec)
    lam: float = 0.01            # LoRA-FAIR: the paper's lambda (weight of ||dB||_F in the similarity objective)
    solver: str = "sgd"          # LoRA-FAIR server solver: "sgd" (the paper's objective) | "ridge" (closed form)
    ridge_lam: float = 0.01      # LoRA-FAIR solver="ridge": weight of ||dB||_F^2
    server_steps: int = 200      # LoRA-FAIR solver="sgd": optimiser steps per layer and round
    server_lr: float = 0.05      # ...relative learning rate (see lora_fair.similarity_correction)
    round_timeout: float = 300.0
    workers: int = 2
    seed: int = 0
    fault: FaultSpec | None = None
    device: str = "cpu"  # where each client trains: cpu | cuda ("auto" is resolved here, in the driver)
    client_ranks: list[int] | None = None  # heterogeneous ranks, cycled over clients; max must be the model's rank
    encoder: EncoderSpec | None = None     # set: LoRA inside the pretrained encoder (mode "encoder")

    @property
    def mode(self) -> str:
        return "head" if self.encoder is None else "encoder"

    @property
    def spec(self):
        """The model spec of this mode (rank, lora_alpha, scaling, local training): `encoder` or `head`."""
        return self.head if self.encoder is None else self.encoder

    def __post_init__(self) -> None:
        from rankwise.data.models import resolve_device

        self.device = resolve_device(self.device).type  # ConfigError when CUDA is asked for and absent
        strategy_class(self.strategy)  # raises ConfigError naming the choices
        if self.client_ranks is not None:
            ranks = list(self.client_ranks)
            if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
                raise ConfigError(f"FederatedRun.client_ranks={self.client_ranks!r} is invalid: expected positive integers, e.g. [4, 8, 16]")
            if max(ranks) != self.spec.rank:
                raise ConfigError(f"FederatedRun.client_ranks={ranks}: the largest client rank {max(ranks)} must be the global "
                                  f"LoRA rank ({self.mode}.rank={self.spec.rank}); set the rank to {max(ranks)}")
            self.client_ranks = ranks
        if self.strategy == "lora-fair":
            self.make_strategy()  # a bad solver or lambda fails here, in the driver, not in the ServerApp
        for name in ("clients", "rounds", "workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"FederatedRun.{name}={getattr(self, name)!r} is invalid: expected an integer >= 1")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"FederatedRun.alpha={self.alpha!r} is invalid: expected a number > 0, or None for IID")
        if not self.round_timeout > 0:
            raise ConfigError(f"FederatedRun.round_timeout={self.round_timeout!r} is invalid: expected seconds > 0")

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed (everything but the number of rounds and the fault)."""
        d = asdict(self)
        for key in ("rounds", "fault", "round_timeout", "workers", "device"):
            d.pop(key)
        if self.encoder is not None:
            d.pop("head")  # unused in mode encoder
        return d

    def client_rank(self, client: int) -> int:
        """This client's LoRA rank: `client_ranks` cycled over the clients, else the global rank."""
        return self.spec.rank if self.client_ranks is None else self.client_ranks[client % len(self.client_ranks)]

    @property
    def heterogeneous(self) -> bool:
        return len({self.client_rank(k) for k in range(self.clients)}) > 1

    def make_strategy(self):
        cls = strategy_class(self.strategy)
        kwargs: dict[str, Any] = {"scaling": self.spec.scaling, "min_train_nodes": 1, "min_available_nodes": self.clients,
                                  "truncation_basis": self.heterogeneous}
        if self.strategy == "lora-fair":
            kwargs.update(lam=self.lam, solver=self.solver, ridge_lam=self.ridge_lam, server_steps=self.server_steps,
                          server_lr=self.server_lr)
        if self.strategy == "stacking":
            kwargs["seed"] = self.seed
        return cls(**kwargs)


# ---- client side ------------------------------------------------------------------------------------
_FEATURES: dict[str, dict[str, torch.Tensor]] = {}  # per Ray actor: the feature file is read once


def run_data(run: FederatedRun) -> dict[str, torch.Tensor]:
    """The run's data file (features or token ids), read once per process."""
    if run.features not in _FEATURES:
        _FEATURES[run.features] = load_features(run.features) if run.encoder is None else load_tokens(run.features)
    return _FEATURES[run.features]


def client_data(run: FederatedRun, client: int):
    """(inputs, labels) of one client: inputs are features (mode head) or {ids, len, y} token rows (mode encoder)."""
    data = run_data(run)
    idx = partition(data["train_y"].tolist(), run.clients, run.alpha, run.seed)[client]
    if run.encoder is not None:
        return split(data, "train", idx), data["train_y"][idx]
    return data["train_x"][idx], data["train_y"][idx]


def holdout_data(run: FederatedRun, data: dict | None = None):
    data = run_data(run) if data is None else data
    return split(data, "test") if run.encoder is not None else (data["test_x"], data["test_y"])


def build_client_model(run: FederatedRun, frozen_A: bool = False, rank: int | None = None):
    """The model of the run's mode (the same, seeded, in every process)."""
    if run.encoder is not None:
        return build_encoder_model(run.encoder, frozen_A=frozen_A, rank=rank)
    return build_model(run.head, frozen_A=frozen_A, rank=rank)


def evaluate_model(run: FederatedRun, model, test) -> dict[str, float]:
    return evaluate_encoder(model, test) if run.encoder is not None else evaluate_features(model, *test)


def client_warm_up(run: FederatedRun, client: int) -> None:
    """Read the features and pay the first-call costs (model build, first forward/backward) outside any round.

    Touches no state a round uses: the model is thrown away and `build_model` restores the RNG it seeds.
    """
    torch.set_num_threads(1)
    x, y = client_data(run, client)
    model = build_client_model(run)
    if run.encoder is not None:
        model(**token_batches({k: v[:4] for k, v in x.items()}, 4)[0]).loss.backward()
    else:
        model(features=x[:8], labels=y[:8]).loss.backward()


def client_round(run: FederatedRun, client: int, server_round: int, global_state: dict, train_A: bool) -> tuple[dict, dict]:
    """One client's work in one round: the pure function the ClientApp wraps (also used by tests)."""
    if run.fault and run.fault.client == client and run.fault.round == server_round:
        if run.fault.mode == "crash":
            raise RuntimeError(f"injected crash of client {client} in round {server_round}")
        time.sleep(run.fault.hang_seconds)
    torch.set_num_threads(1)
    x, y = client_data(run, client)
    model = build_client_model(run, frozen_A=not train_A, rank=run.client_rank(client))
    load_model_state(model, global_state, truncate=run.client_rank(client) < run.spec.rank)
    model.to(run.device)  # after the CPU-side state copy; batches follow x and y
    seed = run.seed * 1_000_003 + server_round * 1009 + client
    if run.encoder is not None:
        loss = train_local_encoder(model, x, run.encoder, seed=seed)  # batches are moved to the model's device
    else:
        loss = train_local(model, x.to(run.device), y.to(run.device), run.head, seed=seed)
    upload = {key: tensor.cpu() for key, tensor in model_state(model, with_A=train_A).items()}
    return upload, {"num-examples": len(y), "train-loss": loss, "partition-id": client}


def make_client_app(run: FederatedRun):
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.query()
    def ready(msg, context):
        # the start-up handshake: import and read everything a training round needs, outside any round's timeout
        client = int(context.node_config["partition-id"])
        client_warm_up(run, client)
        return Message(content=RecordDict({"metrics": MetricRecord({"partition-id": client})}), reply_to=msg)

    @app.train()
    def train(msg, context):
        config = msg.content["config"]
        client = int(context.node_config["partition-id"])
        state = msg.content["arrays"].to_torch_state_dict()
        upload, metrics = client_round(run, client, int(config["server-round"]), state, bool(config["train-A"]))
        content = RecordDict({"arrays": ArrayRecord(upload), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


# ---- server side ------------------------------------------------------------------------------------
def initial_state(run: FederatedRun) -> dict[str, torch.Tensor]:
    return model_state(build_client_model(run), with_delta=run.strategy == "stacking")


def global_accuracy(run: FederatedRun, state: dict, test) -> dict[str, float]:
    """Accuracy of the global model on `test` (`holdout_data(run)`: features and labels, or token rows)."""
    model = build_client_model(run)
    load_model_state(model, state)
    model.to(run.device)
    return evaluate_model(run, model, test)


def save_checkpoint(directory: Path, run: FederatedRun, server_round: int, state: dict, history: list) -> None:
    """Tensors first, then the JSON that points at them: a crash in between leaves the previous checkpoint valid."""
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(directory)  # temp files of rounds a killed run was writing
    name = f"round-{server_round:04d}.safetensors"
    atomic_write(directory / name, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))
    record = {"round": server_round, "tensors": name, "run": run.fingerprint(), "history": history}
    atomic_write_text(directory / STATE_FILE, json.dumps(record, indent=2, default=str))
    for old in directory.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()


_ROUND_FILE = re.compile(r"round-\d{4,}\.safetensors")


def _check_record(record, path: Path) -> dict:
    """The checkpoint JSON must be what `save_checkpoint` writes. The tensor file name is confined to the
    checkpoint's directory (a bare `round-NNNN.safetensors`), so a damaged or hostile file cannot point elsewhere."""
    if not isinstance(record, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(record).__name__}")
    expected = {"round": int, "tensors": str, "run": dict, "history": list}
    for key, kind in expected.items():
        if key not in record:
            raise CheckpointError(f"{path} lacks {key!r}; delete the directory to start over")
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise CheckpointError(f"{path}: {key}={short_repr(record[key])} has the wrong type; the file is damaged")
    if record["round"] < 0:
        raise CheckpointError(f"{path}: round={record['round']} is negative; the file is damaged")
    if not _ROUND_FILE.fullmatch(record["tensors"]):
        raise CheckpointError(f"{path}: tensors={short_repr(record['tensors'])} is not a round-NNNN.safetensors file of "
                              "this directory; refusing to read outside the checkpoint directory")
    return record


def load_checkpoint(directory: Path, run: FederatedRun) -> tuple[int, dict, list]:
    """(last round, global state, history) of a checkpoint written by the same experiment, or CheckpointError."""
    path = directory / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"no federated checkpoint in {directory} ({STATE_FILE} missing): run without --resume first")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply: the file is damaged; delete the directory to start over") from None
    except (ValueError, UnicodeDecodeError, OSError) as err:
        raise CheckpointError(f"{path} is corrupted ({short_repr(str(err))}); delete the directory to start over") from None
    record = _check_record(record, path)
    saved_run, tensors = record["run"], directory / record["tensors"]
    current = json.loads(json.dumps(run.fingerprint(), default=str))
    changed = sorted(k for k in set(current) | set(saved_run) if current.get(k) != saved_run.get(k))
    if changed:
        raise CheckpointError(f"checkpoint in {directory} was written with different settings {changed}: use a new --output or the same options")
    try:
        state = load_file(str(tensors))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {tensors}: {err}") from None
    expected = initial_state(run)
    bad = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    if bad:
        raise CheckpointError(f"checkpoint {tensors} has missing or mis-shaped tensors {bad[:5]}")
    return int(record["round"]), state, list(record["history"])


def wait_for_clients(grid, clients: int, timeout: float = STARTUP_TIMEOUT) -> dict[int, int]:
    """Round-trip a query to every client; return {node id: partition id} of those that answered (all, unless the
    timeout hit). The map lets a round name the clients whose reply is missing."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < clients and time.monotonic() < deadline:
        time.sleep(0.2)
    messages = [Message(content=RecordDict({"config": ConfigRecord({})}), message_type=MessageType.QUERY, dst_node_id=n) for n in node_ids]
    replies = grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic()))
    nodes = {m.metadata.src_node_id: int(next(iter(m.content.metric_records.values()))["partition-id"]) for m in replies if not m.has_error()}
    ready = sorted(nodes.values())
    if len(ready) < clients:
        logging.getLogger("rankwise.federated").warning(
            "only clients %s of %d answered the start-up handshake within %.0f s; the others may be dropped in round 1",
            ready, clients, timeout)
    return nodes


def make_server_app(run: FederatedRun, output: Path, resume: bool, result: dict, on_round: Callable[[dict], None] | None = None):
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        strategy = run.make_strategy()
        test = holdout_data(run)
        checkpoints = output / "checkpoints"
        if resume:
            start, state, history = load_checkpoint(checkpoints, run)
        else:
            start, state = 0, initial_state(run)
            history = [{"round": 0, **global_accuracy(run, state, test), "answered": 0, "failed": [], "failed_clients": [], "seconds": 0.0}]
        arrays = ArrayRecord(state)
        nodes = wait_for_clients(grid, run.clients) if start < run.rounds else {}
        for server_round in range(start + 1, run.rounds + 1):
            started = time.perf_counter()
            messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
            replies = list(grid.send_and_receive(messages, timeout=run.round_timeout))
            # aggregate in client order, so that a resumed run reproduces an uninterrupted one bit for bit
            replies.sort(key=lambda m: -1 if m.has_error() else int(next(iter(m.content.metric_records.values()))["partition-id"]))
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            arrays = new_arrays if new_arrays is not None else arrays
            state = arrays.to_torch_state_dict()
            log = strategy.round_log[server_round]
            log["failed"] += ["timeout"] * (len(messages) - len(replies))
            # which clients sent no valid reply: partition ids (a node that skipped the handshake: "node <id>")
            answered = {int(next(iter(m.content.metric_records.values()))["partition-id"]) for m in replies if not m.has_error()}
            sent = [nodes.get(m.metadata.dst_node_id, f"node {m.metadata.dst_node_id}") for m in messages]
            log["failed_clients"] = sorted((c for c in sent if c not in answered), key=str)
            row = {"round": server_round, **global_accuracy(run, state, test), **log, "seconds": time.perf_counter() - started}
            history.append(row)
            save_checkpoint(checkpoints, run, server_round, state, history)
            if on_round:
                on_round(row)
        result.update(history=history, state=state)

    return app


def run_federated(run: FederatedRun, output: str | Path, resume: bool = False, on_round: Callable[[dict], None] | None = None, quiet: bool = True) -> dict:
    """Run the experiment; returns {"history": [per-round accuracy, loss, failures...], "state": global tensors}."""
    from flwr.simulation import run_simulation

    output = Path(output)
    result: dict = {}
    if quiet:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    started = time.perf_counter()
    run_simulation(
        server_app=make_server_app(run, output, resume, result, on_round),
        client_app=make_client_app(run),
        num_supernodes=run.clients,
        backend_config={
            # On CUDA the workers share the GPU (Ray hides it from actors that reserve none of it).
            "client_resources": {"num_cpus": 1, "num_gpus": 1.0 / run.workers if run.device == "cuda" else 0.0},
            "init_args": {"num_cpus": run.workers, "object_store_memory": 150 * 1024**2, "logging_level": "ERROR"},
        },
    )
    if "history" not in result:
        raise RuntimeError("the Flower simulation ended without a result: see the log above for the ServerApp's error")
    result["seconds"] = time.perf_counter() - started
    return result
