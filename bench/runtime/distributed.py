"""torch.distributed helpers: torchrun initialisation and no-op-when-single-process collectives.

``init()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts
NCCL on CUDA or gloo on CPU; without torchrun everything below is a no-op, so
the same code runs single-process.
"""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from bench.core.reducer import ConfigError


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | None = None) -> bool:
    """Initialise the process group when launched by torchrun; returns whether distributed."""
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def check_device(device: str | None) -> None:
    """A device this machine has, or a ConfigError naming the ones it has."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device '{device}'; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA GPU is visible to torch {torch.__version__} on this "
                              "machine; use --device cpu (or leave it out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise ConfigError(f"--device {device} is not supported; use cpu or cuda")


def device_for_rank(device: str | None = None) -> str:
    """``cuda:<local_rank>`` under torchrun with CUDA, else the given/auto device."""
    check_device(device)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and is_distributed():
        return f"cuda:{local_rank()}"
    return dev


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (and returned); a no-op when not distributed.
    CPU tensors work under NCCL too (reduced through the rank's GPU)."""
    if is_distributed():
        if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
            t = tensor.to(f"cuda:{local_rank()}")
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            tensor.copy_(t.cpu())
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (a list of them, in rank order) on every rank; ``[obj]`` single-process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
