"""Dataset readers behind one interface (:class:`WSSSDataset`)."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import DataConfig
from ..io import TokensegError
from .base import WSSSDataset, load_rgb

__all__ = ["WSSSDataset", "load_rgb", "build_dataset", "cache_root"]


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("TOKENSEG_CACHE", Path.home() / ".cache" / "tokenseg"))


def build_dataset(cfg: DataConfig, split: str) -> WSSSDataset:
    """The dataset named by ``cfg`` (format + root), restricted to ``split``."""
    if cfg.format == "synthetic":
        from .synthetic import ensure_synthetic
        from .voc import load_voc

        root = Path(cfg.root) if cfg.root else ensure_synthetic(cfg.synthetic, cache_root(cfg))
        if cfg.root:
            ensure_synthetic(cfg.synthetic, root, exact=True)
        return load_voc(root, split)
    if cfg.format == "voc":
        from .voc import load_voc

        if not cfg.root:
            raise TokensegError("data.root is empty: point it at VOCdevkit/VOC2012 (or set data.format)")
        return load_voc(cfg.root, split, labels_file=cfg.labels_file or None, mask_dir=cfg.mask_dir)
    raise TokensegError(f"data.format {cfg.format!r} is not supported; use one of: synthetic, voc")
