"""The segmentation stage: DeepLab-V2 / ViT networks trained on pseudo masks, evaluation, prediction.

Python API: :func:`train_segmentation` (``tokenseg segment train``), :func:`evaluate_segmentation`
(``tokenseg segment evaluate``), :func:`predict` (``tokenseg predict``).
"""
from .deeplab import DeepLabV2, ViTSegmenter, build_segmenter
from .evaluate import evaluate_segmentation, infer_probs, load_segmenter, predict_mask
from .predict import predict
from .train import train_segmentation

__all__ = ["DeepLabV2", "ViTSegmenter", "build_segmenter",
           "evaluate_segmentation", "infer_probs", "load_segmenter", "predict_mask", "predict", "train_segmentation"]
