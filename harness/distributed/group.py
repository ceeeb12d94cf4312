"""The process group torchrun describes in the environment: one rank per GPU (NCCL) or CPU share (gloo),
with NVLink multicast kept off."""
from __future__ import annotations

import datetime as _dt
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["MULTICAST_OFF", "TIMEOUT", "launched", "is_leader", "Group", "init_group", "barrier"]

#: NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM: set where unset before
#: a process group starts (a program that uses it can take a shared host's GPUs out of service).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: How long a rank waits for the others in a collective (the slowest rank's last case, at the end).
TIMEOUT = _dt.timedelta(hours=1)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name}={os.environ[name]!r} is not a whole number; start the ranks with torchrun") from None


def launched() -> bool:
    """Whether this process is one of several ranks started by torchrun (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def is_leader() -> bool:
    """Rank 0, or a process that is no rank at all: the one that prints and writes the run."""
    return _env_int("RANK", 0) == 0


@dataclass
class Group:
    """This rank's place in the process group started by :func:`init_group`."""

    rank: int
    world: int
    device: torch.device
    backend: str
    store: dist.Store
    host: str


def init_group(device: torch.device, cuda_collectives: bool = False) -> Group:
    """Join the process group torchrun describes in the environment, NVLink multicast off.

    On CUDA each rank takes ``cuda:LOCAL_RANK`` (without initialising CUDA in the rank, unless
    ``cuda_collectives``). The group is gloo: Python objects and the store's
    counters are all a sharded run exchanges. ``cuda_collectives`` (the check of the real collectives)
    makes it ``cpu:gloo,cuda:nccl``: CUDA tensors through NCCL, Python objects through gloo."""
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    rank, world, local = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0)
    backend = "gloo"
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local >= count:
            raise ValueError(f"LOCAL_RANK {local} has no GPU: this host has {count}; start at most {count} "
                             f"processes per host (torchrun --nproc-per-node {count})")
        device = torch.device("cuda", local)
        if cuda_collectives:  # NCCL needs the rank's GPU current here; a sharded run's workers set it themselves
            torch.cuda.set_device(local)  # (this would initialise CUDA, and no worker could be forked after it)
            backend = "cpu:gloo,cuda:nccl"
    store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=TIMEOUT))
    dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                            timeout=TIMEOUT)
    return Group(rank, world, device, backend, store, socket.gethostname())


def barrier(store: dist.Store, world: int, name: str, poll: float = 0.05) -> None:
    """Wait until every rank got here, through the store and in Python: no device, no backend, and a
    stopped rank (SIGTERM, Ctrl-C) leaves it at once instead of inside a collective that waits for a
    dead peer until the timeout."""
    deadline = time.monotonic() + TIMEOUT.total_seconds()
    store.add(name, 1)
    while store.add(name, 0) < world:
        if time.monotonic() > deadline:
            raise RuntimeError(f"ranks did not all reach {name!r} within {TIMEOUT}; see the other ranks' logs")
        time.sleep(poll)

