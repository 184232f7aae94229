"""Reading weights files safely, and the one state-dict unwrapper.

Every weights file tokenseg reads — its own checkpoints (classifier, AffinityNet, IRN, segmentation),
the authors' ``.pth`` files, ImageNet and CLIP backbones — goes through :func:`read_weights`:
``torch.load`` with ``weights_only=True`` and an allow-list of harmless globals (the authors'
``argparse.Namespace``, numpy arrays for RNG state), or safetensors, which holds no code at all.
Anything else needs an explicit ``allow_pickle`` (``--allow-pickle``), since unpickling can run code.
:func:`unwrap_state_dict` finds the tensors inside any of the wrappers these files use.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import TokensegError
from .files import write_bytes_atomic

FORMAT = "tokenseg-checkpoint/1"  # our checkpoints (tokenseg.checkpoint)
WRAPPER_KEYS = ("model", "state_dict", "teacher", "module")


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


def is_tokenseg_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and "model" in obj and "config" in obj


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / compile wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def unwrap_state_dict(obj: Any, source: str = "checkpoint", strip: tuple[str, ...] = ("module.",)
                      ) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: ``model`` / ``state_dict`` / ``teacher`` / ``module``
    wrappers opened (a dict that itself holds ``cls_token`` is the state dict, whatever else it holds),
    non-tensor entries dropped, the prefixes ``strip`` (DDP's ``module.``) removed from the keys."""
    sd = obj
    for _ in range(3):
        if not isinstance(sd, dict) or any(isinstance(sd.get(k), torch.Tensor) for k in ("cls_token", "cls_tokens")):
            break
        inner = next((sd[k] for k in WRAPPER_KEYS if isinstance(sd.get(k), dict)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, dict) or not sd:
        raise TokensegError(f"{source}: no state dict found (expected a dict of tensors, maybe under 'model')")
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            k = str(k)
            for prefix in strip:
                k = k.removeprefix(prefix)
            out[k] = v
    if not out:
        raise TokensegError(f"{source}: the state dict holds no tensors")
    return out
