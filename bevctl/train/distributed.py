"""Process groups for DDP: the same entry point runs as one process, under ``torchrun``
(env ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``, one node or many,
e.g. from SLURM), or spawns ``--gpus N`` local processes itself. CUDA uses NCCL; CPU uses gloo
(``--device cpu --gpus 2`` runs two CPU processes, which is how the tests check equivalence)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bevctl.errors import BevctlError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BevctlError("--device cuda: no CUDA device is available")
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if device == "cpu":
        return torch.device("cpu")
    raise BevctlError(f"--device must be auto, cpu or cuda, got '{device}'")


def setup(device: str) -> DistInfo:
    """Join the process group described by the environment (a no-op for a single process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_true(flag: bool, info: DistInfo) -> bool:
    """True on every rank iff ``flag`` is true on every rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([0 if flag else 1], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(local_rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update({"RANK": str(local_rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    fn(*args)


def launch(fn: Callable[..., Any], nprocs: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes forming one group (or inline for 1, or
    when already inside a group started by torchrun)."""
    if nprocs <= 1 or "WORLD_SIZE" in os.environ:
        fn(*args)
        return
    mp.spawn(_spawn_entry, args=(nprocs, _free_port(), fn, args), nprocs=nprocs, join=True)
