"""Training losses of the MCTformer family."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multilabel_soft_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-(1/C) Σ_c [y log σ(s) + (1-y) log(1-σ(s))], averaged over the batch (Eq. 5)."""
    return F.multilabel_soft_margin_loss(logits.float(), targets.float())


def contrastive_class_token_loss(layer_tokens: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """CCT (MCTformer+ Eq. 10-11): per layer, cosine similarity between the C class tokens (no
    temperature), cross-entropy of row c against target c; rows of absent classes masked out; mean over
    layers, divided by the number of present classes, mean over the batch."""
    if not layer_tokens:
        return targets.new_zeros(())
    B, C, _ = layer_tokens[0].shape
    target_idx = torch.arange(C, device=targets.device).repeat(B)
    per_row = 0.0
    for tokens in layer_tokens:
        t = F.normalize(tokens.float(), dim=-1)
        sim = t @ t.transpose(1, 2)  # (B, C, C)
        per_row = per_row + F.cross_entropy(sim.reshape(B * C, C), target_idx, reduction="none").view(B, C)
    per_row = per_row / len(layer_tokens)
    y = targets.float()
    return ((per_row * y).sum(1) / (y.sum(1) + 1e-8)).mean()
