"""Several training processes: ``torchrun --nproc_per_node N -m ore train …``.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR/PORT`` for every
process; :func:`init_from_env` joins the group they describe (NCCL when the process
trains on a GPU, gloo on the CPU). Each process then builds the same model, wraps it in
:class:`~torch.nn.parallel.DistributedDataParallel` here in the engine (model modules
never know about processes), reads its own share of every batch, and the gradients are
averaged across processes in ``backward``. Only rank 0 writes files.

Everything degrades to one process when ``WORLD_SIZE`` is unset or 1. The collectives
the loops use (reductions, gathers, broadcasts) are :mod:`ore.contrastive.distributed`.
"""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ore.errors import OreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``, GPU ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise OreError(f"environment variable {name}={raw!r} is not an integer") from None


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes, or use one that already exists.

    Args:
        device: the device this process trains on (``cuda`` selects NCCL and the GPU
            ``LOCAL_RANK``; anything else gloo).
    Returns:
        :class:`DistInfo`; ``world_size`` 1 when not distributed.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        _env_int("LOCAL_RANK", dist.get_rank()))
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistInfo()
    if not dist.is_available():
        raise OreError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    # The group lives as long as the process: several trainings in one process (``ore
    # run-tasks``) reuse it.
    atexit.register(_destroy)
    log.info("process %d of %d joined (%s)", rank, world_size, backend)
    return DistInfo(rank, world_size, local_rank)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed."""
    if info.distributed and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def per_process_batch(
    ims_per_batch: int, world_size: int, name: str = "SOLVER.IMS_PER_BATCH"
) -> int:
    """The global batch (the setting ``name``); each process takes an equal share."""
    if ims_per_batch < world_size or ims_per_batch % world_size:
        raise OreError(
            f"{name}={ims_per_batch} must be a multiple of the number of "
            f"processes ({world_size}): it is the batch over all processes"
        )
    return ims_per_batch // world_size


def wrap_model(model: nn.Module, device: torch.device, info: DistInfo) -> nn.Module:
    """``model`` itself in one process; DistributedDataParallel over the group otherwise.

    DDP broadcasts rank 0's parameters and buffers at construction, so every process
    starts from the same weights even if their random generators differ.
    """
    if not info.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
