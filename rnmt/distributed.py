"""Data-parallel training across processes and machines: torch.distributed under torchrun.

    torchrun --standalone --nproc_per_node 4 -m rnmt_cli.main train bin --save-dir runs/x

torchrun starts one process (rank) per device and hands each its place in the environment:
RANK (0 … WORLD_SIZE − 1 over all machines), WORLD_SIZE, LOCAL_RANK (its index on its own
machine, hence its GPU) and MASTER_ADDR / MASTER_PORT (where the ranks meet). `setup` reads
them, picks the rank's device (cuda:LOCAL_RANK, or the CPU) and joins the process group:
NCCL between GPUs, gloo between CPU processes. Without WORLD_SIZE > 1 it joins nothing and
every helper here is the identity, so the training loop has one code path.

The helpers are the few collective operations the loop needs, each called by every rank at
the same point of the program: summing counts (`all_reduce_sum`), rank 0's decision made
everyone's (`broadcast_floats`), and every rank's RNG state collected for the checkpoint
(`all_gather`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch import Tensor

from rnmt.device import resolve_device
from rnmt.errors import ConfigError

# Rank 0 validates (and may decode) the whole validation set while the other ranks wait in
# a broadcast: the collectives' timeout must outlast the longest validation.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a data-parallel run (a single process by default)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and logs."""
        return self.rank == 0

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` (on this rank's device) over all ranks, in place; returns it."""
        if self.enabled:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def broadcast_floats(self, values: list[float]) -> list[float]:
        """Rank 0's `values` on every rank (what the other ranks pass is ignored)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.broadcast(tensor, src=0)
        return tensor.tolist()

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's copy of a CPU tensor of the same shape on all ranks, in rank order,
        on the CPU (NCCL moves only device tensors, so it travels through the device)."""
        if not self.enabled:
            return [tensor]
        local = tensor.to(self.device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(gathered, local)
        return [t.cpu() for t in gathered]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not a whole number") from None


def setup(device: str = "auto") -> Distributed:
    """Join the process group that torchrun describes in the environment, or stay a single
    process.

    `device` is the `--device` option: auto or cuda takes cuda:LOCAL_RANK when CUDA is
    present (backend NCCL), cpu runs every rank on the CPU (backend gloo).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Distributed(device=resolve_device(device))
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} lies outside WORLD_SIZE={world_size}")
    kind = resolve_device(device).type
    if kind == "cuda":  # resolve_device has already refused cuda without CUDA
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} "
                "GPU(s): start at most one process per GPU (torchrun --nproc_per_node)"
            )
        torch.cuda.set_device(local_rank)
        here, backend = torch.device("cuda", local_rank), "nccl"
    elif kind == "cpu":
        here, backend = torch.device("cpu"), "gloo"
    else:
        raise ConfigError(f"--device {device}: data-parallel training runs on cuda or cpu")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world_size} but {' and '.join(missing)} not set: "
                          "start data-parallel training with torchrun")
    torch.distributed.init_process_group(backend, init_method="env://", rank=rank,
                                         world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return Distributed(rank=rank, world_size=world_size, local_rank=local_rank, device=here)


def teardown(dist: Distributed) -> None:
    """Leave the process group (a no-op for a single process)."""
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
