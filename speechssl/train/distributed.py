"""torch.distributed set-up: torchrun (one or many nodes), local spawning, device choice, small collectives.

* Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) every process joins
  the group torchrun's rendezvous set up; multi-node works the same way (see the README).
* ``distributed_training.nproc=N`` without torchrun spawns N local processes (torch.multiprocessing)
  on a free localhost port.
* Backend ``auto``: NCCL on CUDA, gloo on CPU. On CUDA, process ``local_rank`` uses GPU ``local_rank``.

Restarts under torchrun (``--max-restarts``): torchrun's agents keep one key-value store for the whole
job (``TORCHELASTIC_USE_AGENT_STORE``), and the keys a process group writes there at start-up (peer
addresses, barrier counters) outlive the workers that wrote them. Restarted workers would read the dead
workers' addresses and fail or hang in ``init_process_group`` (torch's per-restart key prefix is not
the same on every node: pytorch/pytorch#135712). :func:`fresh_namespace` lets the restarted workers
agree on a new random key prefix first, so every restart starts from an empty namespace; the workers
then resume from ``checkpoint_last.pt``. Peers that do not show up within :data:`JOIN_TIMEOUT_S` end the
run with a :class:`DistributedError` naming the missing ranks instead of a silent hang.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as dist

from speechssl.config import CommonConfig, ConfigError, DistributedTrainingConfig


JOIN_TIMEOUT_S = 600.0  # seconds the processes of a run wait for each other at start-up


class DistributedError(RuntimeError):
    """The processes of a run could not form their group, or lost a member; the message says what to do."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def select_device(common: CommonConfig, local_rank: int = 0) -> torch.device:
    """``common.device``: auto (CUDA when available) | cpu | cuda | cuda:N."""
    name = common.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"common.device={common.device}: CUDA is not available here; use common.device=cpu")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name != "cpu":
        raise ConfigError(f"common.device: '{common.device}' is not auto, cpu, cuda or cuda:N")
    return torch.device("cpu")


def init_distributed(common: CommonConfig, dcfg: DistributedTrainingConfig, rank: int = 0, world_size: int = 1,
                     local_rank: int = 0) -> DistEnv:
    """Join the process group (when world_size > 1) and pick this process's device."""
    if launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
    device = select_device(common, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = dcfg.distributed_backend
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"distributed_training.distributed_backend: '{backend}' is not auto, nccl or gloo")
        store = None
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                        is_master=False, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
            namespace = fresh_namespace(agent_store, rank, world_size, JOIN_TIMEOUT_S)
            store = dist.PrefixStore(f"speechssl/{namespace}/", agent_store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
        global _JOINED
        _JOINED = True
    if device.type == "cpu" and world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def _get(store: dist.Store, key: str) -> Optional[str]:
    return store.get(key).decode() if store.check([key]) else None


def fresh_namespace(store: dist.Store, rank: int, world_size: int, timeout: float, poll: float = 0.05) -> str:
    """A key prefix that all ``world_size`` processes now starting agree on, unused by any earlier process.

    Keys of earlier (dead) workers may be anywhere in ``store``: each process announces a random id; rank 0
    publishes a roster (a new random name + the ids it sees) until every rank has acknowledged a roster
    that holds its own id, then says go. Stale ids, rosters and acknowledgements never match fresh ones.
    """
    me = uuid.uuid4().hex
    store.set(f"speechssl/join/{rank}", me)
    deadline = time.monotonic() + timeout
    others = range(1, world_size)
    roster, listed = "", None
    while True:
        if rank == 0:
            ids = [me] + [_get(store, f"speechssl/join/{r}") for r in others]
            if all(ids) and ids != listed:
                roster, listed = uuid.uuid4().hex, ids
                store.set("speechssl/roster", " ".join([roster] + ids))
            if roster and all(_get(store, f"speechssl/ack/{r}") == roster for r in others):
                store.set("speechssl/go", roster)
                return roster
            waiting = [r for r in others if _get(store, f"speechssl/ack/{r}") != roster]
        else:
            go = _get(store, "speechssl/go")
            if roster and go == roster:
                return roster
            published = (_get(store, "speechssl/roster") or "").split()
            if len(published) == world_size + 1 and published[1 + rank] == me and published[0] != roster:
                roster = published[0]
                store.set(f"speechssl/ack/{rank}", roster)
            waiting = [0]
        if time.monotonic() > deadline:
            raise DistributedError(
                f"rank {rank}: rank(s) {', '.join(map(str, waiting))} of {world_size} did not join within "
                f"{timeout:g} s; start the same command on every node (a lost node: let the scheduler requeue "
                "the job, it resumes from checkpoint_last.pt)")
        time.sleep(poll)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process of the group went away."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("gloo/transport", "Connection reset by peer", "Connection closed by peer", "NCCL error"))


_JOINED = False  # whether this process joined a process group (init_distributed)


def joined_group() -> bool:
    """Whether this process was one rank of a multi-process run (then leave through :func:`exit_worker`)."""
    return _JOINED


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a finished worker process without interpreter finalization (``os._exit``), after flushing.

    A gloo group that DDP wrapped outlives ``destroy_process_group`` (measured with torch 2.11: its worker
    threads are still running after it, while they are gone without DDP). A worker thread that drops the last
    reference to a tensor created in Python takes the GIL to free it; during interpreter finalization that
    ends the thread with a forced unwind through C++ and the process aborts with "terminate called without an
    active exception" (pytorch/pytorch#65237). The window is the moment after the run's last collective, so
    the rank with the least left to do (not rank 0, which writes the checkpoint) hits it now and then on a
    loaded machine. Every file of the run is closed by then; cyclic garbage (data loaders and their worker
    processes) is collected first, standard streams flushed, then the process leaves with ``code``.
    """
    import gc
    import sys

    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(local_rank: int, fn: Callable[..., Any], nproc: int, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc))
    fn(*args)
    exit_worker(0)  # finished: leave without interpreter finalization (see exit_worker)


def spawn(fn: Callable[..., Any], nproc: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``nproc`` local processes set up as torchrun would (env rendezvous)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    mp.spawn(_spawned, args=(fn, nproc, args), nprocs=nproc, join=True)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op when not distributed)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
