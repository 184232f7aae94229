"""The learning-rate schedules and the data-order rule of every training loop (one copy each).

A schedule is a function ``(step, epoch) -> value`` that :func:`tokenseg.fit.fit` applies before every
step with :func:`apply_lr`. Two kinds of parameter groups exist: a group with a ``base_lr`` (the poly
recipes of DeepLab, AffinityNet and IRN: the schedule gives the poly factor and the group its peak lr),
and a group with an ``lr_mult`` (the classifier methods: the schedule gives the lr itself).
"""
from __future__ import annotations

import math

import torch

ORDER_STRIDE = 100003  # the classifier's loader and the segmenter; AffinityNet and IRN have used 7919


def lr_at(step: int, total: int, warmup: int, base: float, warmup_lr: float, min_lr: float) -> float:
    """Linear warm-up from ``warmup_lr`` then cosine decay to ``min_lr`` (per optimiser step)."""
    if step < warmup:
        return warmup_lr + (base - warmup_lr) * step / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def lr_at_epoch(epoch: int, epochs: int, warmup_epochs: float, base: float, warmup_lr: float, min_lr: float,
                ahead: bool = False) -> float:
    """The authors' schedule: timm's ``CosineLRScheduler`` stepped once per epoch *after* it
    (``lr_scheduler.step(epoch)``), so epoch ``e`` runs at the scheduler's value for ``t = max(e - 1, 0)``:
    epochs 0 and 1 both at ``warmup_lr`` (METHODS.md §16.4). CTI steps ``step(epo + 1)`` instead
    (``ahead``): epoch ``e`` runs at ``t = e``. The cosine runs over ``t / epochs`` (timm's default, no
    warm-up prefix), its floor ``min_lr`` from ``epochs`` on."""
    t = epoch if ahead else max(epoch - 1, 0)
    if t < warmup_epochs:
        return warmup_lr + t * (base - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


def poly_lr(step: int, total: int, base: float, power: float) -> float:
    """``base · (1 − step/total)^power`` (the PolyOptimizer of PSA/IRN/SIPE/POT), per step; ``base=1``
    gives the factor that :func:`apply_lr` multiplies a group's ``base_lr`` by."""
    return base * (1.0 - min(step, total) / max(total, 1)) ** power


def apply_lr(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set every group's lr for this step: ``base_lr × value`` where a group has a ``base_lr`` (value =
    a poly factor), else ``value × lr_mult`` (value = the lr; ``lr_mult`` 1 when absent)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * value if "base_lr" in g else value * g.get("lr_mult", 1.0)


def epoch_generator(seed: int, epoch: int, stride: int = ORDER_STRIDE) -> torch.Generator:
    """The data-order rule: epoch ``e`` of a task seeded ``seed`` draws from a private generator seeded
    ``seed · stride + e`` (private: building a loader must not draw from the global RNG, or a run resumed
    mid-epoch would diverge from an uninterrupted one)."""
    return torch.Generator().manual_seed(seed * stride + epoch)


def epoch_order(count: int, batch: int, steps_per_epoch: int, seed: int, epoch: int, offset: int = 0,
                stride: int = ORDER_STRIDE) -> list[int]:
    """The sample order of ``epoch`` (a permutation of ``range(count)`` cut to whole batches) from its
    ``offset``-th batch on: a resumed epoch visits the batches it had left, in the same order."""
    order = torch.randperm(count, generator=epoch_generator(seed, epoch, stride))[: steps_per_epoch * batch]
    return order.tolist()[offset * batch:]


__all__ = ["lr_at", "lr_at_epoch", "poly_lr", "apply_lr", "epoch_generator", "epoch_order", "ORDER_STRIDE"]
