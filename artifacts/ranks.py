"""Ranks: where this process sits in a ``torchrun`` job, and the device it computes on.

Every multi-process stage (extraction, SAE training) splits its work by rank and lets rank 0 write the
artifact; this is their one view of ``torch.distributed``. One process is rank 0 of 1 and needs no group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Rank, world size and local rank (the GPU index on this host) of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """Whether this process created the process group (and so destroys it in ``close``)."""

    @classmethod
    def from_env(cls, device: str) -> "Ranks":
        """Join the group that torchrun describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, if any:
        NCCL when computing on CUDA, gloo on CPU. A group someone else created is joined as is."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        owns = False
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if resolve_device_type(device) == "cuda" else "gloo")
            owns = True
        local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_int(self, value: int, device: torch.device) -> int:
        """Rank 0's ``value`` on every rank (``device``: where the backend communicates, CUDA for NCCL)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def resolve_device_type(device: str) -> str:
    """``"cuda"`` or ``"cpu"`` (etc.) for a device string; ``"auto"`` is CUDA when present."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def resolve_device(device: str, ranks: Ranks) -> torch.device:
    """The device of this process: ``"auto"`` picks CUDA when present, plain ``"cuda"`` is this rank's GPU."""
    if device == "auto":
        device = resolve_device_type(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")
    if device == "cuda":
        device = f"cuda:{ranks.local_rank}"
    return torch.device(device)
