"""Checkpoints: one tensors-only reader for every weights file, our format, and model rebuilding.

Every weights file tokenseg reads — its own checkpoints (classifier, AffinityNet, IRN, segmentation),
the authors' ``.pth`` files, ImageNet backbones — goes through :func:`read_weights`: ``torch.load`` with
``weights_only=True`` and an allow-list of harmless globals (the authors' ``argparse.Namespace``, numpy
arrays for RNG state), or safetensors, which holds no code at all. Anything else needs an explicit
``allow_pickle`` (``--allow-pickle``), since unpickling a file can run code.

Our checkpoint (``format: tokenseg-checkpoint/1``) records the method (``config.model.method``), the
resolved config, the class names, the optimizer, scaler and RNG states. :func:`load_model_from_checkpoint`
rebuilds any method's model from it, or from a layout a method knows (``Method.load_foreign``).
"""
from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import Config, apply_overrides, validate
from .io import TokensegError, write_bytes_atomic

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "checkpoint_best.pt"  # train.keep_best: the epoch with the best val mAP
FORMAT = "tokenseg-checkpoint/1"


def run_checkpoint(cfg: Config) -> Path:
    """The checkpoint a run's later stages read when none is named: ``checkpoint_best.pt`` when
    ``train.keep_best`` wrote one (MMCST's model selection: the best val mAP), else the last one."""
    out = Path(cfg.output_dir)
    if cfg.train.keep_best and (out / BEST_NAME).is_file():
        return out / BEST_NAME
    return out / CHECKPOINT_NAME


# ----------------------------------------------------------------------------- reading files
def _safe_globals() -> list:
    """Besides tensors: the authors' ``argparse.Namespace`` and plain numpy arrays (our checkpoints'
    RNG state). None of these can run code when unpickled."""
    core = getattr(np, "_core", None) or np.core
    out = [argparse.Namespace, np.ndarray, np.dtype, core.multiarray._reconstruct]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        out += [getattr(dtypes, n) for n in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType")
                if hasattr(dtypes, n)]
    return out


_MAGIC = [(b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"RIFF", "a RIFF (WebP/WAV) file"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip archive"),
          (b"BM", "a BMP image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image")]


def describe_file(path: Path) -> str | None:
    """What a file that is not a weights file looks like ("a JPEG image", "a text file"...), or None
    when it could be one (a zip archive or a pickle: torch's two formats, or safetensors)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80" or _is_safetensors(head):
        return None
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return what
    if not head:
        return "an empty file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown format"
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        return "a JSON file"
    if ":" in text.split("\n", 1)[0] or stripped.startswith(("#", "---")):
        return "a text (YAML?) file"
    return "a text file"


def _is_safetensors(head: bytes) -> bool:
    if len(head) < 10:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 30) and head[8:9] == b"{"


def read_weights(path: str | Path, allow_pickle: bool = False) -> Any:
    """Load a weights file on the CPU: torch's formats tensors-only (unless ``allow_pickle``), or
    safetensors (``{"model": tensors, **metadata}`` for ours). Files that are not weights say what they are."""
    path = Path(path)
    if not path.is_file():
        raise TokensegError(f"{path}: checkpoint not found")
    what = describe_file(path)
    if what is not None:
        raise TokensegError(f"{path}: not a checkpoint: {what}")
    with open(path, "rb") as f:
        head = f.read(16)
    if _is_safetensors(head):
        return _read_safetensors(path)
    try:
        if allow_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc).lower()
        if not allow_pickle and ("weights only" in msg or "weights_only" in msg):
            raise TokensegError(
                f"{path}: the file holds Python objects besides tensors; if you trust it, convert it once with "
                f"`tokenseg convert {path} OUT.pth --allow-pickle` (Python: allow_pickle=True): unpickling can "
                f"run arbitrary code") from exc
        raise TokensegError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_safetensors(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except Exception as exc:
        raise TokensegError(f"{path}: cannot read safetensors ({exc})") from exc
    if meta.get("format") == FORMAT:
        return {"format": FORMAT, "model": tensors, "config": json.loads(meta["config"]),
                "class_names": json.loads(meta["class_names"]),
                "class_names_source": meta.get("class_names_source", "checkpoint"), "step": 0}
    return tensors


def save_safetensors(path: str | Path, state: dict) -> None:
    """Our checkpoint's weights, config and class names as safetensors (no pickle at all)."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "config": json.dumps(state["config"]), "class_names": json.dumps(state["class_names"]),
            "class_names_source": state.get("class_names_source", "checkpoint")}
    tensors = {k: v.detach().cpu().contiguous() for k, v in state["model"].items()}
    write_bytes_atomic(path, save(tensors, metadata=meta))


def export_safetensors(src: str | Path, dst: str | Path, allow_pickle: bool = False) -> int:
    """``tokenseg convert CKPT OUT.safetensors --to safetensors``: one of our checkpoints (any method) as
    safetensors; returns the number of tensors."""
    state = read_weights(src, allow_pickle)
    if not is_tokenseg_checkpoint(state):
        raise TokensegError(f"{src}: not a tokenseg checkpoint (convert the authors' weights to ours first)")
    save_safetensors(dst, state)
    return len(state["model"])


# ----------------------------------------------------------------------------- our format
def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scaler, step: int, cfg: Config,
                    class_names: list[str], class_names_source: str = "checkpoint", extra: dict | None = None) -> None:
    """Atomically write our checkpoint. ``class_names_source="default"`` marks names made up for a file
    that had none (converted authors' weights): a dataset with the same class count may supply its own."""
    state = {
        "format": FORMAT,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "config": cfg.to_dict(),
        "class_names": list(class_names),
        "class_names_source": class_names_source,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
        **(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue(), "checkpoint")


def restore_rng(state: dict) -> None:
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def is_tokenseg_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


def read_checkpoint(path: str | Path, allow_foreign: bool = False, allow_pickle: bool = False) -> dict:
    """Our checkpoint dict; with ``allow_foreign`` any dict is returned (the authors' layouts, which
    :func:`load_model_from_checkpoint` converts)."""
    path = Path(path)
    state = read_weights(path, allow_pickle)
    if allow_foreign and isinstance(state, dict):
        return state
    if not is_tokenseg_checkpoint(state):
        raise TokensegError(f"{path}: not a tokenseg checkpoint (use `tokenseg convert` for authors' weights)")
    return state


def config_from_checkpoint(state: dict, overrides=()) -> Config:
    from .config import _merge

    cfg = Config()
    _merge(cfg, state["config"], "")
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def load_state_checked(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Load a state dict, turning shape/key mismatches into a clear error naming the source."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch: {', '.join(wrong[:4])}")
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:4])}")
        raise TokensegError(f"{source}: checkpoint does not fit this model ({'; '.join(parts)})")
    model.load_state_dict(sd)


def load_model_from_checkpoint(path: str | Path, overrides=(), num_heads: int | None = None
                               ) -> tuple[torch.nn.Module, Config, list[str]]:
    """Rebuild the model a checkpoint was trained with, any method, and load its weights (on the CPU).

    Layouts of the authors' code are converted on the fly by the method that knows them (MCTformer,
    CTI); ``num_heads`` is needed for them when the embedding width is not a multiple of 64. Their files
    hold no class names: the model's ``class_names_source`` is then ``default`` and a dataset with the same
    class count may supply its own names."""
    from .methods import available_methods, get_method

    state = read_checkpoint(path, allow_foreign=True)
    if not is_tokenseg_checkpoint(state):
        tried = []
        for name in available_methods():
            loader = get_method(name).load_foreign
            if loader is None or loader in tried:
                continue
            tried.append(loader)
            loaded = loader(state, str(path), overrides=overrides, num_heads=num_heads, path=path)
            if loaded is not None:
                return loaded
        raise TokensegError(f"{path}: neither a tokenseg checkpoint nor a layout of the authors' code that a "
                            f"method reads (methods: {', '.join(available_methods())})")
    cfg = config_from_checkpoint(state, overrides)
    names = list(state.get("class_names") or [])
    model = build_for_weights(cfg, len(names))
    load_state_checked(model, state["model"], str(path))
    model.class_names_source = state.get("class_names_source", "checkpoint")
    model.eval()
    return model, cfg, names


def build_for_weights(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The method's model with random weights, to be filled from a checkpoint (no download)."""
    from .methods import get_method

    pretrained, cfg.model.pretrained = cfg.model.pretrained, False
    try:
        return get_method(cfg.model.method).build(cfg, num_classes)
    finally:
        cfg.model.pretrained = pretrained


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


__all__ = ["CHECKPOINT_NAME", "read_weights", "describe_file", "save_checkpoint", "save_safetensors", "read_checkpoint",
           "config_from_checkpoint", "load_state_checked", "load_model_from_checkpoint", "build_for_weights",
           "restore_rng", "is_tokenseg_checkpoint", "unwrap"]
