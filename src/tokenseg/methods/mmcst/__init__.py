"""MMCST — multi-modal class-specific tokens (CVPR 2023): :mod:`.model` (the ViT with visual and CLIP
textual class tokens, the CLIP text side), :mod:`.method` (config section, losses, map recipe; registers
``mmcst``), ``presets/`` (``mmcst``, ``demo-mmcst``)."""
from .method import MMCSTConfig

__all__ = ["MMCSTConfig"]
