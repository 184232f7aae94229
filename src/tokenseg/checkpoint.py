"""Our checkpoint format, and rebuilding any method's model from a checkpoint.

Every file is read through :func:`tokenseg.core.weights.read_weights` (tensors only unless the user
allows pickle).

Our checkpoint (``format: tokenseg-checkpoint/1``) records the method (``config.model.method``), the
resolved config, the class names, the optimizer, scaler and RNG states. :func:`load_model_from_checkpoint`
rebuilds any method's model from it, or from a layout a method knows (``Method.load_foreign``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config, apply_overrides, validate
from .core.errors import TokensegError
from .core.weights import is_tokenseg_checkpoint, load_state_checked, read_weights
from .fit.state import restore_rng, save_state

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "checkpoint_best.pt"  # train.keep_best: the epoch with the best val mAP


def run_checkpoint(cfg: Config) -> Path:
    """The checkpoint a run's later stages read when none is named: ``checkpoint_best.pt`` when
    ``train.keep_best`` wrote one (MMCST's model selection: the best val mAP), else the last one."""
    out = Path(cfg.output_dir)
    if cfg.train.keep_best and (out / BEST_NAME).is_file():
        return out / BEST_NAME
    return out / CHECKPOINT_NAME


# ----------------------------------------------------------------------------- our format
def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scaler, step: int, cfg: Config,
                    class_names: list[str], class_names_source: str = "checkpoint", extra: dict | None = None) -> None:
    """Atomically write a classifier checkpoint (:mod:`tokenseg.fit.state`'s format, kind ``classifier``).
    ``class_names_source="default"`` marks names made up for a file that had none (converted authors'
    weights): a dataset with the same class count may supply its own."""
    save_state(path, "classifier", step, {"model": model, "optimizer": optimizer, "scaler": scaler},
               config=cfg.to_dict(), class_names=list(class_names), class_names_source=class_names_source,
               **(extra or {}))


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


def load_model_from_checkpoint(path: str | Path, overrides=(), num_heads: int | None = None
                               ) -> tuple[torch.nn.Module, Config, list[str]]:
    """Rebuild the model a checkpoint was trained with, any method, and load its weights (on the CPU).

    Layouts of the authors' code are converted on the fly by the method that knows them (MCTformer,
    CTI); ``num_heads`` is needed for them when the embedding width is not a multiple of 64. Their files
    hold no class names: the model's ``class_names_source`` is then ``default`` and a dataset with the same
    class count may supply its own names."""
    from .core.registry import available_methods, get_method

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
    from .core.registry import get_method

    pretrained, cfg.model.pretrained = cfg.model.pretrained, False
    try:
        return get_method(cfg.model.method).build(cfg, num_classes)
    finally:
        cfg.model.pretrained = pretrained


__all__ = ["CHECKPOINT_NAME", "BEST_NAME", "run_checkpoint", "save_checkpoint", "read_checkpoint",
           "config_from_checkpoint", "load_model_from_checkpoint", "build_for_weights", "restore_rng"]
