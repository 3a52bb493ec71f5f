"""Devices and data-parallel training under ``torchrun``: gloo on CPU, nccl on GPU.

``torchrun --nproc_per_node N -m graftnet train SPEC`` starts N processes with ``RANK``/``WORLD_SIZE`` set;
:func:`setup` joins them into a process group. Each process takes every N-th sample of each global batch
(``data.batch_size`` stays the global batch), the student, mixers and adapters are wrapped in
DistributedDataParallel (frozen teachers are left out: they have no gradients to sync and their buffers
never change), and rank 0 alone writes logs, checkpoints and the exported student. A step is then the step
one process would take on the global batch — up to BatchNorm, whose statistics are per process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from graftnet.errors import SpecError, TrainingError

__all__ = ["World", "resolve_device", "setup", "wrap"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module started the process group, so it ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def any(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the processes, so every process takes the same branch."""
        if self.size == 1:
            return list(flags)
        t = torch.tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def sum(self, values: dict[str, float], keys: tuple[str, ...]) -> dict[str, float]:
        """``values`` summed over the processes. Every process passes the same ``keys`` (the collective must match
        everywhere); a key is in the result if any process had it."""
        if self.size == 1:
            return values
        t = torch.tensor([float(values.get(k, 0.0)) for k in keys] + [float(k in values) for k in keys],
                         dtype=torch.float64)  # fmt: skip
        dist.all_reduce(t)
        return {k: float(t[i]) for i, k in enumerate(keys) if t[len(keys) + i] > 0}

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def setup(device_type: str) -> World:
    """Join the process group torchrun describes in the environment, or return the one-process world."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        owns = True
    return World(rank, size, local_rank, owns)


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel, its frozen teachers excluded; ``model`` itself for one process."""
    if world.size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, _ in model.named_parameters() if n.startswith("teachers.")]
    frozen += [n for n, _ in model.named_buffers() if n.startswith("teachers.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a torch device: ``auto`` is CUDA when available; CUDA asked for without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SpecError(f"train.device: {e}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"train.device: {name!r} asked for, but this machine has no CUDA device (use cpu or auto)")
    return device
