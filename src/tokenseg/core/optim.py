"""The optimizers every training loop builds (engine, segmentation, AffinityNet, IRN), fused where torch can.

torch's default AdamW/SGD on a CPU loops over the parameter tensors in Python (a DeiT-S AdamW step:
~125 ms on 2 cores); ``fused=True`` runs one kernel per step (~19 ms; the same numbers up to float
rounding — SGD bit for bit). Older torch or unusual parameters (not floating point, devices without a
fused kernel) fall back to torch's default implementation, so the choice never changes what trains.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


def _build(cls, params: Iterable, fused: bool, **kwargs) -> torch.optim.Optimizer:
    params = list(params)
    if fused:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel for these parameters / this torch
            pass
    return cls(params, **kwargs)


def adamw(params: Iterable, fused: bool = True, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused when possible (``fused=False``: torch's default)."""
    return _build(torch.optim.AdamW, params, fused, **kwargs)


def sgd(params: Iterable, fused: bool = True, **kwargs) -> torch.optim.SGD:
    """``torch.optim.SGD(params, **kwargs)``, fused when possible (``fused=False``: torch's default)."""
    return _build(torch.optim.SGD, params, fused, **kwargs)


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.defaults.get("fused"))


__all__ = ["adamw", "sgd", "is_fused"]
