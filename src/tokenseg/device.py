"""Devices, the process group and mixed precision: the one place every stage asks for them."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .io import TokensegError


@dataclass
class DistInfo:
    """This process's place in a ``torchrun`` job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (no-op otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_distributed() -> None:
    """Leave the process group before the interpreter exits: gloo's threads torn down at exit abort
    the process now and then ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available (this rank's GPU under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TokensegError(f"device {name!r} requested but no CUDA device is available")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup(device_name: str) -> tuple[DistInfo, torch.device]:
    """The process group (under torchrun) and this rank's device."""
    dinfo = init_distributed(resolve_device(device_name).type)
    return dinfo, resolve_device(device_name, dinfo.local_rank)


def barrier(dinfo: DistInfo) -> None:
    if dinfo.world > 1:
        dist.barrier()


def all_reduce_sum(array, dinfo: DistInfo):
    """Sum a numpy array over the ranks (in place of a gather of per-image results)."""
    if dinfo.world <= 1:
        return array
    import numpy as np

    t = torch.from_numpy(np.ascontiguousarray(array))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.numpy()


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on CUDA (fp16 where bf16 is unsupported), none on the CPU; ``bf16`` | ``fp16`` |
    ``none`` as asked."""
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int) -> None:
    """CPU threads for torch's intra-op pool (``--threads`` / ``TOKENSEG_THREADS``); 0 keeps the default."""
    if threads > 0:
        torch.set_num_threads(threads)


__all__ = ["DistInfo", "init_distributed", "resolve_device", "setup", "barrier", "all_reduce_sum", "amp_dtype",
           "autocast", "set_threads"]
