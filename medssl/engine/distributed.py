"""torch.distributed helpers for DDP training started by ``torchrun`` (NCCL on GPUs, gloo on CPU).

Only the main process (rank 0) logs and writes files; every rank trains, and helpers here let the other ranks wait
for shared one-time work (e.g. generating a synthetic cohort) instead of racing it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "get_rank",
    "get_world_size",
    "is_main_process",
    "init_distributed",
    "local_device",
    "cleanup_distributed",
    "wrap_ddp",
    "unwrap_model",
    "main_process_first",
    "quiet_non_main_processes",
]

_T = TypeVar("_T")
logger = logging.getLogger(__name__)


def get_rank() -> int:
    """Rank of this process in the default process group, 0 when not distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of processes in the default process group, 1 when not distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Whether this process is rank 0 (always true when not distributed)."""
    return get_rank() == 0


def init_distributed(backend: str | None = None) -> None:
    """Join the process group described by the ``torchrun`` environment (no-op when already joined).

    Args:
        backend: ``"nccl"``, ``"gloo"``, or None for NCCL when CUDA is available and gloo otherwise.

    Raises:
        RuntimeError: when the ``torchrun`` variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``) are not set.
    """
    if dist.is_initialized():
        return
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR") if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed training needs the torchrun environment; {', '.join(missing)} not set. "
            "Start it with `torchrun --nproc_per_node=N ...`."
        )
    use_cuda = torch.cuda.is_available()
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    if use_cuda:
        torch.cuda.set_device(local_device())


def local_device() -> torch.device:
    """This process's device: ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")


def cleanup_distributed() -> None:
    """Leave the process group if one was joined, once every rank has reached this point.

    The barrier matters: a rank that tears down its gloo connections while a peer is still finishing its own work
    (rank 0 writing the MLflow run) can abort the peer's communication threads.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(network: nn.Module, device: torch.device | str) -> DistributedDataParallel:
    """Move a network to ``device`` and wrap it in ``DistributedDataParallel``.

    Args:
        network: the module to train.
        device: this rank's device; CUDA devices are passed as ``device_ids``, CPU uses none.

    Returns:
        the DDP-wrapped network (the original is ``.module``).

    Raises:
        RuntimeError: when no process group is initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("wrap_ddp needs an initialised process group; call init_distributed() first.")
    device = torch.device(device)
    wrapped = DistributedDataParallel(network.to(device), device_ids=[device] if device.type == "cuda" else None)
    logger.info(
        f"wrapped {type(network).__name__} in DistributedDataParallel ({get_world_size()} processes, "
        f"{dist.get_backend()})"
    )
    return wrapped


def unwrap_model(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, or the network itself."""
    return network.module if isinstance(network, (DistributedDataParallel, nn.DataParallel)) else network


def main_process_first(function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """Call ``function`` on rank 0 first, then on the other ranks once rank 0 has finished.

    For idempotent, cached one-time work (writing a dataset, a download): rank 0 does it, the others find it done.

    Args:
        function: the callable; args and kwargs are passed through.

    Returns:
        the callable's result on this rank.
    """
    if get_world_size() == 1:
        return function(*args, **kwargs)
    if is_main_process():
        result = function(*args, **kwargs)
        dist.barrier()
        return result
    dist.barrier()
    return function(*args, **kwargs)


def quiet_non_main_processes(level: int = logging.WARNING) -> None:
    """Raise the root log level on ranks other than 0 so that only the main process reports progress."""
    if not is_main_process():
        logging.getLogger().setLevel(level)
