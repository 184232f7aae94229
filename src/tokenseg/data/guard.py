"""One rule for every command that writes: nothing goes into a dataset folder.

``refuse_inside_dataset(path, cfg)`` is called for every output a user can point somewhere (``--out``,
``output_dir``, ``--json``, ``--save-masks``, ...): an output inside ``data.root`` or inside any image or
mask folder of the dataset is an error naming both paths.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..core.errors import TokensegError
from ..core.files import display_name


def dataset_folders(cfg_or_roots: Any) -> list[tuple[str, Path]]:
    """``(what, folder)`` pairs that belong to a dataset: ``data.root`` and any image/mask folder
    outside it, from a ``Config``, a ``DataConfig``, a ``WSSSDataset`` or a list of paths."""
    out: list[tuple[str, Path]] = []
    if cfg_or_roots is None:
        return out
    if isinstance(cfg_or_roots, (str, os.PathLike)):
        return [("dataset folder", Path(cfg_or_roots))] if os.fspath(cfg_or_roots) else []
    data = getattr(cfg_or_roots, "data", cfg_or_roots)
    if hasattr(data, "root") and hasattr(data, "format") and not hasattr(data, "image_paths"):
        root = Path(data.root) if data.root else None
        if root is None and data.format == "synthetic":
            from .build import cache_root
            from .synthetic import default_root
            root = default_root(data.synthetic, cache_root(data))
        if root is not None:
            out.append(("data.root", root))
            for key in ("image_dir", "mask_dir", "aug_mask_dir"):
                v = getattr(data, key, "")
                if v and Path(v).is_absolute():  # relative ones are under the root
                    out.append((f"data.{key}", Path(v)))
        return out
    if hasattr(data, "image_paths") and hasattr(data, "meta"):  # a WSSSDataset
        meta = data.meta or {}
        for key in ("root", "image_dir", "mask_dir", "mask_cache"):
            if meta.get(key):
                out.append((f"the dataset's {key.replace('_', ' ')}", Path(meta[key])))
        if data.mask_paths:
            for d in sorted({str(Path(p).parent) for p in data.mask_paths if p is not None})[:64]:
                out.append(("the dataset's mask folder", Path(d)))
        return out
    for p in cfg_or_roots:
        out.extend(dataset_folders(p))
    return out


def refuse_inside_dataset(path: str | os.PathLike, cfg_or_roots: Any, what: str = "output") -> None:
    """Raise when ``path`` is (inside) a dataset folder: tokenseg never writes into a dataset. One rule
    for every command that writes (``--out``, ``output_dir``, ``--json``, ``--save-masks`` ...)."""
    if not os.fspath(path):
        return
    target = Path(os.path.realpath(os.path.abspath(path)))
    for label, folder in dataset_folders(cfg_or_roots):
        f = Path(os.path.realpath(os.path.abspath(folder)))
        if target == f or f in target.parents:
            raise TokensegError(
                f"{what} {display_name(path)} is inside the dataset ({label} {display_name(folder)}); "
                f"tokenseg never writes into a dataset folder: choose an output outside it")
