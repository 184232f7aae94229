"""Downloads that fail fast offline: before timm or open_clip start their retry loops (a minute of
retries on a machine without network), one short connection attempt decides, and the error names the
exact file to fetch elsewhere and the key to point at it. ``HF_HUB_OFFLINE=1`` (or ``TOKENSEG_OFFLINE=1``)
skips the attempt. Weights already in the local cache are used without any network."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import TokensegError

HF_HOST = "huggingface.co"
PROBE_TIMEOUT_S = 3.0


def offline_reason(host: str = HF_HOST) -> str:
    """Why a download from ``host`` cannot happen ("" when it can): an offline switch in the environment,
    or no connection within :data:`PROBE_TIMEOUT_S` seconds."""
    for var in ("TOKENSEG_OFFLINE", "HF_HUB_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    try:
        with socket.create_connection((host, 443), timeout=PROBE_TIMEOUT_S):
            return ""
    except OSError as exc:
        return f"{host} cannot be reached ({type(exc).__name__})"


def timm_sources(name: str) -> tuple[str, str]:
    """(Hugging Face repo id, direct URL) timm downloads ``name``'s default weights from (either may be "")."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return "", ""
    return getattr(cfg, "hf_hub_id", "") or "", getattr(cfg, "url", "") or ""


def cached_timm_weights(name: str) -> Path | None:
    """A local copy of ``name``'s timm weights (Hugging Face cache or torch hub's checkpoints), if any."""
    repo, url = timm_sources(name)
    if repo:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin"):
                hit = try_to_load_from_cache(repo, fname)
                if isinstance(hit, str) and Path(hit).is_file():
                    return Path(hit)
        except ImportError:
            pass
    if url:
        import torch

        hit = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if hit.is_file():
            return hit
    return None


def require_timm_download(name: str, key: str, file_key: str) -> Path | None:
    """Before ``timm.create_model(name, pretrained=True)``: the cached weights file if there is one (load it
    instead), None when the download can go ahead, else a :class:`TokensegError` naming the file to fetch
    and ``file_key`` to set."""
    cached = cached_timm_weights(name)
    if cached is not None:
        return cached
    reason = offline_reason()
    if not reason:
        return None
    repo, url = timm_sources(name)
    files = " or ".join(filter(None, [
        f"{Path(urlparse(url).path).name} ({url})" if url else "",
        f"model.safetensors of https://huggingface.co/{repo}" if repo else ""])) or f"the {name} weights"
    target = Path(urlparse(url).path).name if url else "model.safetensors" if repo else f"{name}.pth"
    raise TokensegError(f"{key}=true needs a download, and {reason}: fetch {files} on a machine with "
                        f"network and set {file_key}=/path/to/{target}")


def require_url_download(url: str, cached: Path, key: str) -> None:
    """Before downloading ``url`` into ``cached``: fail at once when offline, naming the file."""
    if cached.is_file():
        return
    reason = offline_reason(urlparse(url).hostname or HF_HOST)
    if reason:
        raise TokensegError(f"{key}=true needs a download, and {reason}: fetch {Path(urlparse(url).path).name} "
                            f"({url}) on a machine with network and set {key}=/path/to/{Path(urlparse(url).path).name}")
