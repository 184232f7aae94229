"""From seeds to pseudo masks: DenseCRF, affinity random walks (attention / AffinityNet / IRN), confidence masks.

Python API: :func:`make_pseudo_masks` (``tokenseg pseudo``), :func:`evaluate_masks`, :func:`dense_crf`,
:func:`random_walk` / :func:`transition_matrix`, :func:`train_affinitynet`, IRN (:mod:`.irn`):
:func:`ir_label`, :func:`train_irn`, :func:`load_irn`, :func:`irn_masks`.
"""
from ..core.crf import CRF_PRESETS, CRFParams, crf_params, dense_crf, pydensecrf_available
from .pseudo import evaluate_masks, format_scores, label_from_probs, make_pseudo_masks, pseudo_mask, seed_scores
from .randomwalk import random_walk, transition_matrix, walk_maps
from .irn import ir_label, irn_masks, load_irn, train_irn, validate_irn


def train_affinitynet(*args, **kwargs):
    from .affinitynet import train_affinitynet as _train

    return _train(*args, **kwargs)


__all__ = ["CRF_PRESETS", "CRFParams", "crf_params", "dense_crf", "pydensecrf_available", "evaluate_masks",
           "format_scores", "label_from_probs", "make_pseudo_masks", "pseudo_mask", "seed_scores", "random_walk",
           "transition_matrix", "walk_maps", "train_affinitynet", "ir_label", "irn_masks", "load_irn", "train_irn",
           "validate_irn"]
