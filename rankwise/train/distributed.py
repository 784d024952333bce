"""Data-parallel training over torch.distributed, all-reducing only the trainable (adapter) gradients.

    every rank builds the same global batch list (same seed), then takes its contiguous shard of rows:

        global batch (2b rows) ──┬── rank 0: rows [0, b)   forward/backward ── grads of the adapter ──┐
                                 └── rank 1: rows [b, 2b)  forward/backward ── grads of the adapter ──┤
                                                                                                       │
        one flat all_reduce(SUM) per optimizer step of [grads..., has-grad flags, loss] / world  <─────┘
        every rank: clip -> optimizer.step on the same averaged gradient -> the same adapter weights

Why a hand-written bucketed all_reduce and not `DistributedDataParallel`:
- the frozen base never needs communication; DDP would skip it too, but it fixes the parameter set when the
  module is wrapped, while training procedures here (IncreLoRA, DiffoRA, TriAdapt...) add or re-shape adapter
  tensors between steps. Reading the optimizer's parameter groups at every step follows those changes.
- gradient accumulation needs exactly one reduction per optimizer step (DDP needs `no_sync()` around the
  other micro-batches); the loop already knows where the step boundary is.
- DDP's overlap of communication with backward buys nothing for adapter-sized gradients (kilobytes to a
  few MB), and DDP wraps the model (`module.` prefixes in state dicts, a changed forward call path).

Exactness: each rank's loss is scaled by `n_rank * world / n_global`, so the average of the ranks'
gradients is the gradient of the mean loss over the whole global batch, even for a short last batch.
The loss must therefore be a mean over the batch's rows (what transformers models and `F.cross_entropy` return).
With dropout, every rank draws the same random stream (one seed), so the masks differ from a 1-process run:
training is then equivalent in distribution, not bit for bit.

Backend: "nccl" when CUDA is available, otherwise "gloo" (CPU). Several machines: launch with
`torchrun` or `accelerate launch`, which set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (docs/distributed.md).
"""
from __future__ import annotations

import os
import socket
import zlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from rankwise.core.errors import ConfigError, RankwiseError

BUCKET_ELEMENTS = 16 * 1024 * 1024  # a flat buffer per 16M gradient elements (64 MB in fp32) bounds the extra memory
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RankwiseError, RuntimeError):
    """A worker process of a multi-process run failed, or the process group could not be set up."""


def check_nproc(nproc: int) -> int:
    """Validate `--nproc`: at least 1, and no more processes than CUDA devices (GPU) or CPU cores (CPU)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ConfigError(f"--nproc={nproc!r} is invalid: expected an integer >= 1 (the number of training processes)")
    if torch.cuda.is_available():
        devices = torch.cuda.device_count()
        if nproc > devices:
            raise ConfigError(f"--nproc={nproc} exceeds the {devices} visible CUDA device(s): use --nproc <= {devices}")
        return nproc
    cores = os.cpu_count() or 1
    if nproc > cores:
        raise ConfigError(f"--nproc={nproc} exceeds the {cores} CPU core(s) of this machine: use --nproc <= {cores} "
                          "(more processes than cores only slows data-parallel training down); for several machines see docs/distributed.md")
    return nproc


def launched_externally() -> bool:
    """True inside a process started by torchrun / accelerate launch with more than one process."""
    return all(k in os.environ for k in LAUNCH_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_from_env(backend: str | None = None, timeout_seconds: float = 1800.0) -> "DataParallel":
    """Join the process group described by the launcher's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    missing = [k for k in LAUNCH_ENV if k not in os.environ]
    if missing:
        raise DistributedError(f"cannot join a process group: environment variables {missing} are not set "
                               "(start with `rankwise finetune --nproc N`, torchrun or accelerate launch)")
    if not dist.is_initialized():
        backend = backend or default_backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_seconds))
    return DataParallel(dist.get_rank(), dist.get_world_size())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(local_rank: int, fn: Callable, nproc: int, port: int, args: tuple, threads: int) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)})
    torch.set_num_threads(threads)
    init_from_env()
    try:
        fn(*args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, nproc: int, args: tuple = (), threads: int = 0) -> None:
    """Run `fn(*args)` in `nproc` fresh processes joined by a process group on this machine.

    `fn` must be importable (a module-level function): the processes are spawned, not forked, so none
    inherits CUDA or thread-pool state. `threads`: torch threads per process (0: cores // nproc, at least 1).
    A worker's exception stops the others (torch's spawn terminates them, so none waits in a collective)
    and is re-raised here as `DistributedError`, the full traceback in its `.traceback`.
    """
    import torch.multiprocessing as mp

    check_nproc(nproc)
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    try:
        mp.spawn(_worker, args=(fn, nproc, free_port(), args, threads), nprocs=nproc, join=True)
    except mp.ProcessRaisedException as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        failure = DistributedError(f"training process {err.error_index} of {nproc} failed: {lines[-1].strip() if lines else err}")
        failure.traceback = str(err)
        raise failure from None
    except mp.ProcessExitedException as err:
        raise DistributedError(f"training process {err.error_index} of {nproc} died ({err}); see its output above") from None


def shard_rows(batch: Any, rank: int, world: int) -> tuple[Any, int, int]:
    """`(this rank's rows of batch, rows here, rows in the whole batch)`: contiguous, near-equal chunks.

    `batch` is a tensor or a dict/tuple/list of them sharing the leading (row) dimension; other leaves are kept.
    A rank left without rows gets the first row with weight 0 (see `DataParallel.shard`).
    """
    sizes = set()

    def rows(x):
        if isinstance(x, torch.Tensor):
            if x.dim() == 0:
                raise ConfigError("cannot shard a batch holding a 0-dim tensor: give DataParallel(shard=...) a function")
            sizes.add(x.shape[0])
        elif isinstance(x, dict):
            for v in x.values():
                rows(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                rows(v)

    rows(batch)
    if len(sizes) != 1:
        raise ConfigError(f"cannot shard a batch whose tensors have different leading sizes {sorted(sizes)}: "
                          "give DataParallel(shard=...) a function that splits it by rows")
    total = sizes.pop()
    start = rank * total // world
    stop = (rank + 1) * total // world
    take = slice(start, stop) if stop > start else slice(0, 1)

    def cut(x):
        if isinstance(x, torch.Tensor):
            return x[take]
        if isinstance(x, dict):
            return type(x)({k: cut(v) for k, v in x.items()})
        if isinstance(x, tuple):
            return type(x)(*[cut(v) for v in x]) if hasattr(x, "_fields") else tuple(cut(v) for v in x)
        if isinstance(x, list):
            return [cut(v) for v in x]
        return x

    return cut(batch), stop - start, total


@dataclass
class DataParallel:
    """This process's place in a data-parallel run, and the collectives the training loop needs."""

    rank: int
    world_size: int
    shard_fn: Callable[[Any, int, int], tuple[Any, int, int]] = shard_rows

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where collective buffers live: NCCL reduces CUDA tensors only, gloo CPU ones."""
        if dist.is_initialized() and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's part of a global batch and the factor its (row-mean) loss must be multiplied by."""
        local, n_local, n_global = self.shard_fn(batch, self.rank, self.world_size)
        return local, n_local * self.world_size / n_global

    @torch.no_grad()
    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Rank 0's values everywhere (the ranks build identical seeded models; this makes it a guarantee)."""
        for p in params:
            dist.broadcast(p.data, src=0)

    @torch.no_grad()
    def sync_gradients(self, params: Sequence[torch.Tensor], loss: float) -> float:
        """Average `.grad` of `params` over the ranks in place; return the global mean of `loss`.

        A gradient missing on some ranks counts as zero there; missing on all ranks it stays None (so the
        optimizer skips that tensor, exactly as in one process).
        """
        params = list(dict.fromkeys(params))  # a tensor in two groups is reduced once
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for p in params:
            key = (p.dtype, p.device)
            groups = buckets.setdefault(key, [[]])
            if sum(q.numel() for q in groups[-1]) + p.numel() > BUCKET_ELEMENTS and groups[-1]:
                groups.append([])
            groups[-1].append(p)
        # the flat buffers only line up if every rank holds the same tensors: compare a signature of the shapes
        signature = zlib.crc32(repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode())
        if len(set(self._all_gather_int(signature))) != 1:
            raise DistributedError("the ranks' trainable tensors differ: a callback (e.g. a rank-growing procedure) decided "
                                   "differently on different ranks, from rank-local statistics")
        flags = torch.tensor([float(p.grad is not None) for p in params] + [float(loss)], dtype=torch.float64, device=self.device)
        dist.all_reduce(flags)
        flags = flags.cpu()
        present = {id(p): bool(flags[i] > 0) for i, p in enumerate(params)}
        for groups in buckets.values():
            for group in groups:
                flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
                dist.all_reduce(flat)
                flat.div_(self.world_size)
                offset = 0
                for p in group:
                    n = p.numel()
                    if present[id(p)]:
                        if p.grad is None:
                            p.grad = torch.empty_like(p)
                        p.grad.copy_(flat[offset : offset + n].view_as(p))
                    offset += n
        return float(flags[-1]) / self.world_size

    @torch.no_grad()
    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Average tensors over the ranks in place (for callbacks' statistics of this rank's rows)."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()

    def all_reduce_sums(self, values: Sequence[float]) -> list[float]:
        """Sum numbers over the ranks (float64): evaluation counts and loss sums."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def _all_gather_int(self, value: int) -> list[int]:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [int(x) for x in out]

    def barrier(self) -> None:
        dist.barrier()
