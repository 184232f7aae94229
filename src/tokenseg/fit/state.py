"""The one checkpoint format of every training task, and resuming from it.

A checkpoint is a dict written atomically with ``torch.save`` and read back only through
:func:`tokenseg.core.weights.read_weights` (tensors and a few harmless types, no pickle):

- ``kind``: ``classifier`` | ``segmenter`` | ``affinitynet`` | ``irn``, and ``format`` (the kind's
  format name, unchanged from the files earlier versions wrote, so those are still read);
- ``step``, ``epoch`` (epochs done, fractional mid-epoch), ``total_steps``, ``done``;
- the named state objects: ``model``, ``optimizer``, ``scaler`` (each its ``state_dict()``, or None)
  and ``rng`` (torch, CUDA, numpy and Python generators);
- what the task adds (its config, class names, the settings that shaped the weights ...).
"""
from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import TokensegError
from ..core.files import write_bytes_atomic
from ..core.weights import FORMAT, load_state_checked, read_weights, unwrap

FORMATS = {"classifier": FORMAT, "segmenter": "tokenseg-segmentation/1", "affinitynet": "tokenseg-affinitynet/1",
           "irn": "tokenseg-irn/1"}
TITLES = {"classifier": "a classifier", "segmenter": "a segmentation", "affinitynet": "an AffinityNet",
          "irn": "an IRN"}  # "... checkpoint" in messages
OLD_KINDS = {"segmentation": "segmenter"}  # the kind names earlier versions wrote


def rng_state() -> dict:
    """The global generators' states, as tensors and plain numbers (numpy's key array as a tensor), so
    that even a bare ``torch.load(weights_only=True)`` reads the file."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss), "python": random.getstate()}


def restore_rng(state: dict) -> None:
    """Put the global generators back where a checkpoint's ``rng`` recorded them."""
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    name, keys, *rest = rng["numpy"]  # keys: a tensor, or (files of earlier versions) a numpy array
    np.random.set_state((name, keys.numpy() if torch.is_tensor(keys) else keys, *rest))
    random.setstate(rng["python"])


def _state_dict(obj: Any) -> dict | None:
    if obj is None:
        return None
    return unwrap(obj).state_dict() if isinstance(obj, torch.nn.Module) else obj.state_dict()


def save_state(path: str | Path, kind: str, step: int, objects: dict[str, Any], total_steps: int | None = None,
               epoch: float | None = None, done: bool | None = None, **meta: Any) -> None:
    """Atomically write a ``kind`` checkpoint at ``step``: each of ``objects`` (model, optimizer,
    scaler; None allowed) by its ``state_dict()``, the RNG states, and ``meta``."""
    state = {"format": FORMATS[kind], "kind": kind, "step": step,
             **({"total_steps": total_steps} if total_steps is not None else {}),
             **({"epoch": epoch} if epoch is not None else {}), **({"done": done} if done is not None else {}),
             **{name: _state_dict(obj) for name, obj in objects.items()}, "rng": rng_state(), **meta}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue(), f"{kind} checkpoint")


def kind_of(state: Any) -> str | None:
    """The kind of a checkpoint dict (files of earlier versions included), None if it is none of ours."""
    if not isinstance(state, dict):
        return None
    kind = state.get("kind")
    if kind is None and "model" in state and state.get("format") in (None, FORMAT) and "config" in state:
        return "classifier"
    return OLD_KINDS.get(kind, kind) if kind in (*FORMATS, *OLD_KINDS) else None


def read_state(path: str | Path, kind: str) -> dict:
    """A ``kind`` checkpoint, read tensors-only (a planted pickle cannot run code)."""
    state = read_weights(path)
    if kind_of(state) != kind:
        found = kind_of(state)
        raise TokensegError(f"{path}: not {TITLES[kind]} checkpoint" +
                            (f" (it holds {TITLES[found]} checkpoint)" if found else ""))
    return state


def restore(state: dict, model: torch.nn.Module, optimizer=None, scaler=None, source: str = "checkpoint") -> int:
    """Load a checkpoint's named state objects and RNG states into a task's; returns its step."""
    load_state_checked(unwrap(model), state["model"], source)
    if optimizer is not None and state.get("optimizer"):
        optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if state.get("rng"):
        restore_rng(state)
    return int(state["step"])


def finished_step(state: dict | None) -> int | None:
    """The step of a checkpoint that needs no rewrite at the end of a run (finished, or of a version that
    did not mark it), None for none or an unfinished one."""
    return None if state is None or not state.get("done", True) else int(state["step"])


__all__ = ["FORMATS", "TITLES", "save_state", "read_state", "restore", "restore_rng", "rng_state", "kind_of", "finished_step"]
