"""timm backbones with clear errors and offline weights: any model by name, ImageNet weights online
(``pretrained``) or from a local file (``weights``), CNN feature extractors at a chosen output stride.
Used by the CNN methods (CAM, POT), the mask steps (AffinityNet, IRN) and the segmentation networks."""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..core.weights import read_weights, unwrap_state_dict
from ..core.errors import TokensegError


def read_state_dict(path: str | Path, key: str = "segment") -> dict:
    """A state dict from a local file (safetensors or a torch file, read tensors-only), possibly nested
    under ``state_dict`` / ``model``, with ``module.`` prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise TokensegError(f"{key}.weights: file {path} not found")
    try:
        sd = read_weights(path)
    except TokensegError as exc:
        raise TokensegError(f"{key}.weights: {exc}") from exc
    return unwrap_state_dict(sd, f"{key}.weights: {path}")


def load_local_weights(model: nn.Module, path: str | Path, key: str = "segment") -> None:
    """Load backbone weights from a file; every parameter of ``model`` must be found with the right
    shape (classifier heads in the file are ignored), else a TokensegError names what is off."""
    sd = read_state_dict(path, key)
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = "; ".join(filter(None, [
            f"missing {', '.join(missing[:4])}{'...' if len(missing) > 4 else ''}" if missing else "",
            f"shape mismatch {', '.join(wrong[:3])}" if wrong else ""]))
        raise TokensegError(f"{key}.weights: {path} does not fit this backbone ({detail})")
    model.load_state_dict({k: sd[k] for k in own if k in sd}, strict=False)


def create_timm(name: str, pretrained: bool = False, weights: str | Path = "", key: str = "segment", **kwargs):
    """``timm.create_model`` with clear errors: unknown name, no network, missing or unfit file.
    ``weights`` (a local file) takes precedence over ``pretrained`` (a download)."""
    import timm

    if weights:
        read_state_dict(weights, key)  # fail early on a missing/unreadable file
        pretrained = False
    elif pretrained:  # offline: fail at once naming the file, or use the cached copy
        from ..core.hub import require_timm_download

        cached = require_timm_download(name, f"{key}.pretrained", f"{key}.weights")
        if cached is not None:
            weights, pretrained = cached, False
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise TokensegError(f"{key}.backbone: unknown timm model {name!r}") from exc
        raise
    except Exception as exc:
        if pretrained:
            raise TokensegError(
                f"{key}.pretrained=true: could not download ImageNet weights for {name!r} "
                f"({type(exc).__name__}). Offline, download the weights elsewhere and set "
                f"{key}.weights=/path/to/{name}.pth (or {key}.pretrained=false to start from scratch)") from exc
        raise
    if weights:
        load_local_weights(model, weights, key)
    return model


def create_feature_backbone(name: str, pretrained: bool = False, weights: str | Path = "",
                            output_stride: int = 8, out_indices=(-1,), key: str = "segment", **kwargs) -> nn.Module:
    """A timm ``features_only`` CNN at ``output_stride`` returning the stages ``out_indices``."""
    idx = tuple(int(i) for i in out_indices)
    try:
        return create_timm(name, pretrained, weights, key=key, features_only=True, output_stride=output_stride,
                           out_indices=idx, **kwargs)
    except (AssertionError, TypeError, ValueError) as exc:
        raise TokensegError(f"{key}.backbone {name!r} does not support output_stride={output_stride} "
                            f"features ({exc}); use a ResNet") from exc
