"""The one training loop: :func:`fit` runs a :class:`Task` from a step to its end.

Read top to bottom: for each epoch, the task's batches from where the run stands; for each batch, the
schedule's lr, the forward under autocast, the loss, the AMP step (:class:`~tokenseg.core.device.AmpStep`);
then the bookkeeping of a step boundary — a non-finite loss check when the losses are read, a log record,
a checkpoint every ``checkpoint_every`` steps, the task's ``on_step``, a checkpoint on SIGINT / SIGTERM
and at each epoch's end (and the run's); then the task's ``after_epoch`` (validation, an epoch
log line). What differs between the classifier methods, DeepLab, AffinityNet and IRN is the task:
its model and optimizer, its batches, its forward and loss, what it saves beside the weights.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from ..core.device import AmpStep, FiniteWatch, oom_hint
from ..core.errors import TokensegError
from ..core.files import append_jsonl, keep_log_until
from ..core.progress import progress_bar
from ..core.resume import interrupt_at_step_boundary
from .schedule import apply_lr
from .state import save_state

LOG_EVERY = 10  # steps between loss readings (the only steps that wait for the device) and log records


@dataclass
class At:
    """Where a step stands (0-based ``step`` and ``epoch``), given to the task's forward and loss."""

    step: int
    epoch: int


@dataclass
class EpochEnd:
    """What :func:`fit` tells a task's ``after_epoch``: the 0-based epoch just ended (or cut by the end of
    the run), the step reached, the mean loss of this call's steps in it, seconds since the loop began."""

    epoch: int
    step: int
    mean_loss: float
    seconds: float


@dataclass
class Task:
    """One training job for :func:`fit`. ``batches(epoch, offset)`` yields the epoch's batches from its
    ``offset``-th on (a resumed epoch goes on where it stopped); ``forward(batch, at)`` runs under
    autocast; ``loss(out, batch, at)`` returns the total loss and the terms to log (tensors or floats);
    ``save_meta()`` what the checkpoint holds besides the state objects."""

    kind: str
    name: str  # the progress bar's and messages' name: "train", "segment train" ...
    model: torch.nn.Module  # the network that trains (DDP / compiled wrappers allowed; saved unwrapped)
    optimizer: torch.optim.Optimizer
    amp: AmpStep
    schedule: Callable[[int, int], float]  # (step, epoch) -> value for schedule.apply_lr
    steps_per_epoch: int
    total_steps: int
    batches: Callable[[int, int], Iterable]
    forward: Callable[[Any, At], Any]
    loss: Callable[[Any, Any, At], tuple[torch.Tensor, dict]]
    checkpoint: Path
    save_meta: Callable[[], dict] = dict
    checkpoint_every: int = 0
    oom: tuple[str, str] = ("training step {step}", "the batch size")  # (where, which setting to lower)
    nonfinite_hint: str = "lower the learning rate"
    log_path: Path | None = None  # the run's JSONL log (cut back on resume, removed on a fresh start)
    log_steps: bool = False  # a {step, epoch, lr, losses, time} record in it every LOG_EVERY steps and at the end
    on_log: Callable[[int, float, dict], None] | None = None  # (step, lr, losses) at each record
    after_epoch: Callable[[EpochEnd], None] | None = None
    on_step: Callable[[int, dict | None], None] | None = None  # (step, losses read at it, or None)
    is_main: bool = True  # rank 0 writes checkpoints, logs and the progress bar
    progress: bool = True


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch's tensors (itself, or the values of a dict / items of a tuple) on ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(v.to(device, non_blocking=True) if torch.is_tensor(v) else v for v in batch)
    return batch


def start_log(task: Task, step: int) -> None:
    """A resumed run's log keeps the records up to its checkpoint (the steps after it are logged again);
    a fresh run's log starts anew."""
    if task.log_path is None or not task.is_main:
        return
    if step:
        keep_log_until(task.log_path, step)
    elif task.log_path.exists():
        task.log_path.unlink()


def save(task: Task, step: int) -> None:
    """The task's checkpoint at ``step`` (rank 0 only)."""
    if task.is_main:
        objects = {"model": task.model, "optimizer": task.optimizer, "scaler": task.amp.scaler}
        save_state(task.checkpoint, task.kind, step, objects, total_steps=task.total_steps,
                   epoch=step / task.steps_per_epoch, done=step >= task.total_steps, **task.save_meta())


def fit(task: Task, step: int = 0, finished: int | None = None) -> int:
    """Train ``task`` from ``step`` (0, or the step :func:`~tokenseg.fit.state.restore` returned) to its
    ``total_steps``; returns the step reached. ``finished`` is the step of a checkpoint already on disk
    that needs no rewrite (:func:`~tokenseg.fit.state.finished_step`). SIGINT / SIGTERM stop at the next
    step boundary with a checkpoint there, then raise ``KeyboardInterrupt``."""
    total, per_epoch = task.total_steps, task.steps_per_epoch
    device = task.amp.device
    bar = progress_bar(total=total, initial=step, desc=task.name, unit="step",
                       disable=not (task.progress and task.is_main))
    t0, watch, saved = time.time(), FiniteWatch(), finished
    with interrupt_at_step_boundary() as stop:
        while step < total:
            epoch, offset = divmod(step, per_epoch)
            loss_sum, loss_n = 0.0, 0
            task.model.train()
            for batch in task.batches(epoch, offset):
                lr = task.schedule(step, epoch)
                apply_lr(task.optimizer, lr)
                batch = to_device(batch, device)
                at = At(step, epoch)
                with oom_hint(task.oom[0].format(step=step + 1), task.oom[1]):
                    with task.amp.autocast():
                        out = task.forward(batch, at)
                    loss, terms = task.loss(out, batch, at)
                    task.amp.step(loss)
                step += 1
                watch.add(loss)
                loss_sum, loss_n = loss_sum + loss.detach(), loss_n + 1
                epoch_end = step % per_epoch == 0 or step >= total
                due = bool(task.checkpoint_every and step % task.checkpoint_every == 0)
                values = None  # read from the device only where something needs them
                if step % LOG_EVERY == 0 or epoch_end or due or task.on_step is not None or stop.requested:
                    values = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in terms.items()}
                    values["total"] = float(loss.detach())
                    if watch.seen():
                        raise TokensegError(f"{task.name}: the loss became non-finite by step {step} (now "
                                            f"{values['total']}); {task.nonfinite_hint}")
                if task.is_main:
                    bar.update()
                    if values is not None:
                        bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}")
                    if task.log_steps and (step % LOG_EVERY == 0 or step == total):
                        append_jsonl(task.log_path, {"step": step, "epoch": epoch + 1, "lr": lr, **values,
                                                     "time": round(time.time() - t0, 2)})
                        if task.on_log is not None:
                            task.on_log(step, lr, values)
                if due:
                    save(task, step)
                    saved = step
                if task.on_step is not None:  # after a due checkpoint, before the epoch's
                    task.on_step(step, values)
                if stop.requested:  # SIGINT / SIGTERM during this step: a resumable state first
                    if saved != step:
                        save(task, step)
                    bar.close()
                    if task.is_main:
                        print(f"\n{task.name}: interrupted; checkpoint saved at step {step}/{total} in "
                              f"{task.checkpoint}; the same command continues from it")
                    raise KeyboardInterrupt
                if epoch_end and saved != step:
                    save(task, step)
                    saved = step
                if step >= total:
                    break
            if task.after_epoch is not None and loss_n:
                task.after_epoch(EpochEnd(epoch, step, float(loss_sum) / loss_n, round(time.time() - t0, 2)))
    bar.close()
    if saved != step:  # resumed from a checkpoint at the end that was not marked finished
        save(task, step)
    return step


__all__ = ["Task", "At", "EpochEnd", "fit", "to_device", "start_log", "save", "LOG_EVERY"]
