"""Devices, the process group and mixed precision: the one place every stage asks for them."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import TokensegError


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


def close_distributed(synchronise: bool = True) -> None:
    """Leave the process group before the interpreter exits: gloo's threads torn down at exit abort
    the process now and then ("terminate called without an active exception"). After a clean run
    (``synchronise``) the ranks first meet at a barrier, so that none tears its group down while a peer
    still talks to it (a rank aborted so after ``predict`` had written its share); after an error no
    barrier (torchrun stops the other ranks)."""
    if dist.is_available() and dist.is_initialized():
        if synchronise:
            try:
                dist.barrier()
            except RuntimeError:  # a peer already gone: leave all the same
                pass
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


def grad_scaler(dtype: torch.dtype | None):
    """A ``GradScaler`` for fp16 autocast (its small range underflows gradients); None otherwise."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


class AmpStep:
    """The optimiser step of every training loop: the forward under ``autocast()`` (``amp`` = auto | bf16 |
    fp16 | none, as :func:`amp_dtype`), then :meth:`step`: backward (fp16: scaled), optional gradient
    clipping (after unscaling), the update. Nothing here waits for the device: no host sync per step
    (a ``GradScaler``'s own inf check aside, fp16 only)."""

    def __init__(self, amp: str, device: torch.device, optimizer, grad_clip: float = 0.0, params=None) -> None:
        self.device, self.optimizer, self.grad_clip = device, optimizer, grad_clip
        self.dtype = amp_dtype(amp, device)
        self.scaler = grad_scaler(self.dtype)
        self.params = list(params) if params is not None else None
        if grad_clip > 0 and self.params is None:
            raise ValueError("grad_clip needs the parameters to clip")

    def autocast(self):
        return autocast(self.device, self.dtype)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()


class FiniteWatch:
    """Whether any loss since the last :meth:`seen` was NaN or infinite, kept on the device: the check
    costs one host sync at a logging interval instead of one per step."""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.flag = bad if self.flag is None else self.flag | bad

    def seen(self) -> bool:
        flag, self.flag = self.flag, None
        return bool(flag) if flag is not None else False


def is_alloc_error(exc: BaseException) -> bool:
    """An out-of-memory error of torch (CUDA or CPU allocator) or Python."""
    msg = str(exc).lower()
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in msg or "can't allocate" in msg


@contextlib.contextmanager
def oom_hint(what: str, lower: str):
    """Turn an out-of-memory error inside the block into one clear line: where it happened (``what``, e.g.
    the step and its batch) and which setting to lower (``lower``)."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_alloc_error(exc):
            raise
        raise TokensegError(f"out of memory in {what}: lower {lower}") from exc


def fixed_shapes(device: torch.device) -> None:
    """Inputs of one shape every step (training crops): let cuDNN pick its fastest kernels once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def set_threads(threads: int) -> None:
    """CPU threads for torch's intra-op pool (``--threads`` / ``TOKENSEG_THREADS``); 0 keeps the default."""
    if threads > 0:
        torch.set_num_threads(threads)


__all__ = ["DistInfo", "init_distributed", "resolve_device", "setup", "barrier", "all_reduce_sum", "amp_dtype",
           "autocast", "grad_scaler", "AmpStep", "FiniteWatch", "is_alloc_error", "oom_hint", "fixed_shapes",
           "set_threads"]
