"""OTPL — Optimal-Transport-assisted Proxy Learning (ICCV 2025): :mod:`.proxies` (OT assignment, top-K
proxies, the contrastive loss, proxy CAMs), :mod:`.model` (the proxies on a class-token base; the
encoder of the CLIP-ES variant), :mod:`.method` (``otpl``: config section, losses, maps on the base),
:mod:`.clip_variant` (``otpl-clip-es``), ``presets/`` (``otpl``, ``otpl-clip-es``, ``demo-otpl``)."""
from .clip_variant import SeedCropView  # registers otpl-clip-es
from .method import OTPLConfig, base_config, fuse, otpl_terms

__all__ = ["OTPLConfig", "SeedCropView", "base_config", "fuse", "otpl_terms"]
