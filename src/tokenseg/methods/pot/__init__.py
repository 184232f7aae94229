"""POT — Prototypical Optimal Transport (CVPR 2025; METHODS.md §11, errata §16.16, §16.20–16.23).

A SIPE-style ResNet (:class:`tokenseg.models.pot.POTNet`) trained with the multilabel soft-margin loss
and a consistency loss between prototype CAMs and a reference CAM. Two pipelines:

``pot.mode=paper`` (default, §11.2; the main paper's equations are not public, every reconstruction is
    an [I] option of ``cfg.pot``): per present class, confident pixels of the baseline CAM (the
    classifier's, or precomputed CLIP-ES seeds with ``pot.clip_seeds``) → cosine k-means (K = 3) →
    similarity-aware OT of all pixels to the clusters → prototypes from the plan, cosine activation
    re-weighted by the plan → M_pot with a ``1 − max`` background; L1 consistency with the classifier CAM.
``pot.mode=code`` (§11.4, §16.20–16.23): the released code: argmax seeds of the classifier CAM, K = 2,
    the mean of the cluster cosine maps, OT not used, their CLIP-ES fusion as the target, 512×512
    training resize without flip, and IS_CAM + IS_CAM1 seeds.

Seeds carry an explicit background channel (``eval.background=channel``). The k-means and the OT run
batched over every (image, class) pair of a batch (:mod:`tokenseg.core.ot`).

Maps that need the CLIP-ES seeds or the code's IS_CAM + IS_CAM1 (IS_CAM from the first scale only,
combined after normalisation) run POT's own inference as hooks of the one seed loop, one scale at a time
as their ``make_cam.py`` (PIL bicubic rescale of the uint8 image, maps upsampled from the grid to the
image) (``maps.mode=authors``, set automatically). ``tests/test_pot_authors.py`` checks code mode against
the released code.

The package: ``config`` (the ``pot.*`` section and its checks), ``model`` (the network and the prototype
stages), ``views`` (training augmentation), ``clip_seeds`` (precomputed CLIP-ES inputs), ``train`` (build,
forward, losses), ``seeds`` (map recipe and the code's inference), ``convert`` (the released checkpoints).
"""
from __future__ import annotations

from .. import Method, register
from .clip_seeds import ClipSeeds, extras
from .config import POTConfig, validate
from .convert import load_foreign, to_released_state
from .seeds import RECIPE, code_hooks, combine
from .train import build, class_scores, forward, loss, param_groups
from .views import POTView, crop_box, views

register(Method(
    name="pot", summary="Prototypical Optimal Transport on a SIPE-style ResNet (CVPR 2025)",
    build=build, recipe=RECIPE, loss=loss, forward=forward, class_scores=class_scores, views=views,
    extras=extras, param_groups=param_groups, optimizer="sgd-poly", section="pot", section_config=POTConfig,
    validate=validate, load_foreign=load_foreign))

__all__ = ["POTConfig", "POTView", "ClipSeeds", "RECIPE", "build", "class_scores", "code_hooks", "combine", "crop_box",
           "extras", "forward", "load_foreign", "loss", "param_groups", "to_released_state", "validate", "views"]
