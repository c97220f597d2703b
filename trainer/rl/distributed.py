"""Data parallelism for the PPO trainer: one process per GPU (or CPU slot) under `torchrun`, each rank rolling out
its own prompts and calling the reward server itself, gradients averaged by DDP.

Every decision that changes the sequence of collective operations (skip an update, stop an epoch early) is taken
on values agreed across ranks, or the ranks would wait on each other forever. With one process, every method here
is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rewardserve.server.modeling import resolve_device


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Averages each metric over the ranks (NaN-free metrics only)."""
        if not self.active or not values:
            return values
        stacked = torch.tensor(list(values.values()), dtype=torch.float64)
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world_size).tolist()))

    def total(self, value: float) -> float:
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def any_on_device(self, flag: torch.Tensor) -> torch.Tensor:
        """A 0-d bool tensor, true on every rank when it is true on any, without a host synchronisation."""
        if not self.active:
            return flag
        reduced = flag.float()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced > 0

    def sum_on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the ranks, on the device, without a host synchronisation."""
        if not self.active:
            return tensor
        summed = tensor.clone()
        dist.all_reduce(summed)
        return summed

    def smallest(self, value: int) -> int:
        """The smallest of every rank's value (the same answer on every rank)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def gather_objects(self, value) -> list:
        """Every rank's picklable value, in rank order, on every rank."""
        if not self.active:
            return [value]
        parts = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def all_true(self, flag: bool) -> bool:
        return self.total(0.0 if flag else 1.0) == 0.0

    def any_true(self, flag: bool) -> bool:
        return self.total(1.0 if flag else 0.0) > 0.0

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's 1-D tensor (their lengths may differ)."""
        if not self.active:
            return values
        parts = [None] * self.world_size
        dist.all_gather_object(parts, values.tolist())
        return torch.tensor([v for part in parts for v in part], dtype=values.dtype)


def group_backend(cuda: bool) -> str:
    """The process group's backend for each device type. On GPUs both: NCCL for CUDA tensors (gradients, the
    on-device flags), gloo for the host values the loop agrees on (metrics, counts); NCCL alone has no CPU
    backend, and the first host all-reduce would raise."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def setup_ranks(device_spec: str, group_of_one: bool = False) -> tuple[Ranks, torch.device]:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1): NCCL and gloo on GPUs, gloo on the
    CPU. With `group_of_one` (FSDP needs a process group), a lone process makes a group of its own."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        device = resolve_device(device_spec)
        if group_of_one and not dist.is_initialized():
            dist.init_process_group(group_backend(device.type == "cuda"), store=dist.HashStore(), rank=0,
                                    world_size=1)
        return Ranks(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(group_backend(use_cuda))
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return Ranks(dist.get_rank(), world_size), device


def teardown(ranks: Ranks) -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
