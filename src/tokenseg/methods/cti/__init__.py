"""CTI — Class Tokens Infusion (CVPR 2024): :mod:`.model` (the C+1-token ViT and its memory),
:mod:`.method` (config section, losses, views, map recipe; registers ``cti``), :mod:`.convert` (the
authors' checkpoints both ways), ``presets/`` (``cti``, ``cti-coco``, ``demo-cti``)."""
from .method import CTIConfig, compute_losses, plan_for

__all__ = ["CTIConfig", "compute_losses", "plan_for"]
