"""The tensor-parallel group of one replica: rank, size, and the process group behind them.

A worker calls ``init_tp_group(rank, world_size, address)``; the address is a
``host:port`` that rank 0 listens on (the Ray actors of a replica pass it
around). NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """Where this process sits in its replica's tensor-parallel group."""

    rank: int = 0
    size: int = 1

    def shard(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's equal share of ``total`` (callers check divisibility)."""
        length = total // self.size
        return self.rank * length, length


SINGLE = TPGroup(0, 1)


def init_tp_group(
    rank: int,
    world_size: int,
    address: str,
    device: torch.device | str = "cpu",
    timeout_s: float = 300.0,
) -> TPGroup:
    """Join (or, for world_size 1, skip) the torch.distributed group of one replica."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a group of size {world_size}")
    if world_size == 1:
        return SINGLE
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return TPGroup(rank, world_size)


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that is free on this host now (for rank 0 to listen on)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]
