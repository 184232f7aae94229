"""OTPL's models: :class:`OTPLModel` — any class-token base model + the proxies (the class-token variant);
:class:`PatchEncoder` / :class:`OTPLEncoderModel` — a plain ViT encoder whose prototypes are masked
averages of its features under CLIP-ES pseudo labels (the supplement's CLIP-ES variant). The proxy
machinery they share is :mod:`.proxies`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import TokensegError
from .proxies import (ProxyConv, cam_argmax, classifier_cam, cosine, make_proxies, masked_average, pool_to_grid,
                      split_class_tokens)

__all__ = ["OTPLModel", "PatchEncoder", "OTPLEncoderModel", "memory_cam"]


# ------------------------------------------------------------------------------------------ class-token variant
class OTPLModel(nn.Module):
    """A class-token base model plus OTPL's proxies.

    ``forward(batch, ctx)`` (training) runs the base method's own forward on the base model — one call,
    inside this module, so that DDP sees one forward — and adds the proxies; ``forward(x)`` is the base
    model's forward (class scores, ``predict``). Everything the maps need is in the state dict (the
    base's weights and the proxy conv) or in ``settings`` (rebuilt from the checkpoint's config)."""

    _DELEGATED = ("head", "forward_maps", "num_prefix", "embed_dim")  # what other tools read off a model

    def __init__(self, base: nn.Module, base_name: str, base_forward: Callable, num_classes: int, settings) -> None:
        super().__init__()
        self.base = base
        self.proxy = ProxyConv(settings.top_k, settings.proxy_kernel, settings.proxy_bias)
        self.otpl_base = base_name
        self.num_classes = num_classes
        self.patch_size = base.patch_size
        self.settings = settings
        self._base_forward = base_forward

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in OTPLModel._DELEGATED and "base" in self._modules:
                return getattr(self._modules["base"], name)
            raise

    def forward(self, inputs, ctx=None) -> dict:
        if torch.is_tensor(inputs):
            return self.base(inputs)
        out = self._base_forward(self.base, inputs, ctx)
        if not isinstance(out, dict) or "tokens" not in out or "grid" not in out:
            raise TokensegError(f"otpl: the training forward of base {self.otpl_base!r} must return a dict with "
                                f"'tokens' (B, prefix + M, D) and 'grid' (h, w); it returned "
                                f"{sorted(out) if isinstance(out, dict) else type(out).__name__}")
        out = dict(out)
        out.update(self.proxy_outputs(out, inputs["labels"]))
        return out

    def base_cam(self, out: dict) -> torch.Tensor:
        """The base's CAM as foreground scores (B, C, M): ``cam`` if the base returns one, else its
        PatchCAM logits ``patch_map`` (MCTformer-V2/+, CTI); a (C + 1)-channel map's channel 0 is the
        base's background and is dropped (OTPL's background is ``(1 − max)^p``) [I]."""
        key = self.settings.cam
        if key == "auto":
            key = "cam" if "cam" in out else "patch_map"
        if key not in out:
            raise TokensegError(f"otpl.cam={self.settings.cam}: the base {self.otpl_base!r} returns no "
                                f"{key!r} map (it returns {', '.join(sorted(out))})")
        cam = out[key].flatten(2)
        C = self.num_classes
        if cam.shape[1] == C + 1:
            cam = cam[:, 1:]
        elif cam.shape[1] != C:
            raise TokensegError(f"otpl: the base's {key!r} has {cam.shape[1]} channels, expected {C} or {C + 1}")
        return cam

    def proxy_outputs(self, out: dict, labels: torch.Tensor) -> dict:
        """The proxies of a batch from the base's outputs: OT plan, top-K features, P = Conv(Concat[Q, H])."""
        s = self.settings
        C = self.num_classes
        prefix = getattr(self.base, "num_prefix", C)
        q_fg, q_bg_token, feats = split_class_tokens(out["tokens"], prefix, C)
        cam = classifier_cam(self.base_cam(out), labels, s.cam_bg_power, s.cam_norm)  # (B, C+1, M)
        present = labels > 0
        ones = present.new_ones(present.shape[0], 1)
        cam_mask = torch.cat([ones, present], 1)
        cam_arg = cam_argmax(cam, cam_mask)
        if s.prototypes == "pooled":  # [I] Eq. 13 on the class-token base: Q_c = MAP(Mask(M^cls) ⊙ F)
            pooled, counts = masked_average(feats.detach() if s.detach_prototypes else feats, cam_arg, C + 1)
            q_fg = torch.where(counts[:, 1:, None] > 0, pooled[:, 1:].to(q_fg.dtype), q_fg)
        bg = s.background
        if bg == "auto":  # the spec's Q: C class tokens, or C + 1 with the base's background token
            bg = "token" if q_bg_token is not None else "pooled" if s.prototypes == "pooled" else "none"
        if bg == "token":
            if q_bg_token is None:
                raise TokensegError(f"otpl.background=token: the base {self.otpl_base!r} has no background token "
                                    f"(use pooled or none)")
            q_bg, bg_ok = q_bg_token, ones
        elif bg == "pooled":  # [I] Eq. 13's masked average pooling, for the background only
            pooled, counts = masked_average(feats.detach(), cam_arg, C + 1)
            q_bg, bg_ok = pooled[:, 0], counts[:, :1] > 0
        else:
            q_bg, bg_ok = torch.zeros_like(q_fg[:, 0]), ~ones
        protos = torch.cat([q_bg[:, None].to(q_fg.dtype), q_fg], 1)  # (B, C+1, D)
        loss_cols = torch.cat([bg_ok, present], 1)
        if s.columns == "all":
            # [I] label-free OT: every class is a column, its mass from the CAM *without* the labels
            # (ReLU, one max per image, so an absent class with small logits gets little mass); the
            # proxies then cannot read the labels from which columns exist, and L_p.cls stays a
            # classification. Positives (L_ppc) still come from the labelled classes.
            free = F.relu(self.base_cam(out).detach().float())
            free = free / (free.flatten(1).amax(-1)[:, None, None] + 1e-5)
            bg_free = (1 - free.amax(1, keepdim=True)).clamp_min(0) ** s.cam_bg_power
            ot_cam, ot_cols = torch.cat([bg_free, free], 1), torch.cat([bg_ok, torch.ones_like(present)], 1)
        else:  # the spec's reading: columns of the image's classes only, masses from the labelled CAM
            ot_cam, ot_cols = cam, loss_cols
        return make_proxies(self.proxy, s, feats, protos, ot_cam, ot_cols, cam_arg, loss_cols)


# ------------------------------------------------------------------------------------------ CLIP-ES variant
class PatchEncoder(nn.Module):
    """A timm ViT as a patch-feature encoder: ``forward(x) -> (features (B, M, D), grid)``, the output tokens
    after the backbone's final norm without its prefix tokens. Any size that is a multiple of the patch
    (``dynamic_img_size``). ``model.backbone`` names it (``vit_base_patch16_clip_224.openai`` for CLIP's
    image tower, with ``model.pretrained=true`` online or a timm-layout file); ``model.stem=conv`` as for
    the class-token models. ``trainable_blocks``: -1 all, 0 a frozen encoder, n the last n blocks (+ norm)."""

    def __init__(self, model_cfg, trainable_blocks: int = -1) -> None:
        super().__init__()
        import timm

        from ...models import load_backbone_weights
        from ...models.classtoken import _patch_size

        kwargs = dict(model_cfg.backbone_kwargs)
        kwargs.setdefault("drop_path_rate", model_cfg.drop_path)
        kwargs.setdefault("dynamic_img_size", True)
        pretrained = model_cfg.pretrained
        try:
            backbone = timm.create_model(model_cfg.backbone, pretrained=pretrained is True, num_classes=0, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise TokensegError(f"model.backbone: unknown timm model {model_cfg.backbone!r}") from exc
            raise
        if isinstance(pretrained, str) and pretrained:
            load_backbone_weights(backbone, pretrained)
        if not hasattr(backbone, "forward_features") or not hasattr(backbone, "blocks"):
            raise TokensegError(f"model.backbone: {model_cfg.backbone!r} is not a timm ViT")
        self.patch_size = _patch_size(backbone)
        if model_cfg.stem == "conv":
            from ...models.stem import ConvStem

            backbone.patch_embed.proj = ConvStem(self.patch_size, backbone.embed_dim)
        self.backbone = backbone
        self.embed_dim = backbone.embed_dim
        self.num_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        if trainable_blocks >= 0:
            backbone.requires_grad_(False)
            for blk in list(backbone.blocks)[len(backbone.blocks) - trainable_blocks:] if trainable_blocks else []:
                blk.requires_grad_(True)
            if trainable_blocks:
                backbone.norm.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        p = self.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = self.backbone.forward_features(x)
        return tokens[:, self.num_prefix:], grid

    def no_weight_decay(self) -> set[str]:
        names = self.backbone.no_weight_decay() if hasattr(self.backbone, "no_weight_decay") else set()
        return {f"backbone.{n}" for n in names}


def memory_cam(feats: torch.Tensor, memory: torch.Tensor, labels: torch.Tensor, bg_power: float,
               norm: str = "max") -> torch.Tensor:
    """A CAM from the global class prototypes (C+1, D) for images without CLIP-ES seeds (maps, val):
    ``cos(F_i, memory_c)`` for the foreground, then as :func:`classifier_cam`."""
    fg = cosine(feats, memory[1:].expand(feats.shape[0], -1, -1)).transpose(1, 2)  # (B, C, M)
    return classifier_cam(fg, labels, bg_power, norm)


class OTPLEncoderModel(nn.Module):
    """The supplement's CLIP-ES variant: prototypes ``Q = MAP(Mask(M^cls) ⊙ F)`` (Eq. 13) of the encoder's
    features under the CLIP-ES pseudo label (argmax of the co-augmented seeds, background included:
    N = C + 1 prototypes), then the same OT, top-K proxies and losses.

    Images without seeds (map generation, val mAP) take ``M^cls`` from ``memory`` (buffers, in the state
    dict): an EMA of each class's batch-mean prototype during training [I: the seeds of the map split
    are not an input of the map pipeline]. Classes outside an image's pseudo label use the memory
    prototype too (0 before it is filled), so L_p.cls still sees an absent class [I]."""

    def __init__(self, encoder: PatchEncoder, num_classes: int, settings) -> None:
        super().__init__()
        self.encoder = encoder
        self.proxy = ProxyConv(settings.top_k, settings.proxy_kernel, settings.proxy_bias)
        self.num_classes = num_classes
        self.patch_size = encoder.patch_size
        self.num_prefix = 0
        self.settings = settings
        D = encoder.embed_dim
        self.register_buffer("memory", torch.zeros(num_classes + 1, D))
        self.register_buffer("memory_filled", torch.zeros(num_classes + 1, dtype=torch.bool))

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def forward(self, inputs, ctx=None) -> dict:
        if torch.is_tensor(inputs):
            feats, grid = self.encoder(inputs)
            return {"cls_logits": self.class_scores(feats), "tokens": feats, "grid": grid}
        feats, grid = self.encoder(inputs["image"])
        cam = pool_to_grid(inputs["clip_cam"], grid)  # (B, C+1, M): [background, classes]
        out = {"tokens": feats, "grid": grid}
        out.update(self.proxy_outputs(feats, cam, inputs["labels"], update_memory=self.training))
        return out

    def class_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Image-level scores for val mAP: the best patch's cosine to each class's memory prototype [I]."""
        return cosine(feats, self.memory[1:].expand(feats.shape[0], -1, -1)).amax(1)

    def proxy_outputs(self, feats: torch.Tensor, cam: torch.Tensor, labels: torch.Tensor,
                      update_memory: bool = False) -> dict:
        s = self.settings
        C = self.num_classes
        present = labels > 0
        ones = present.new_ones(present.shape[0], 1)
        cam_mask = torch.cat([ones, present], 1)
        cam = cam.float() * cam_mask[..., None]
        with torch.no_grad():
            cam_arg = cam_argmax(cam, cam_mask)
        src = feats.detach() if s.detach_prototypes else feats
        pooled, counts = masked_average(src, cam_arg, C + 1)
        valid = (counts > 0) & cam_mask
        mem = torch.where(self.memory_filled[:, None], self.memory, 0.0).to(pooled.dtype)
        protos = torch.where(valid[..., None], pooled, mem[None])
        if update_memory:
            self._update_memory(pooled.detach(), valid)
        if s.background == "none":
            valid = valid & torch.cat([~ones, present], 1)
        return make_proxies(self.proxy, s, feats, protos, cam, valid, cam_arg)

    @torch.no_grad()
    def _update_memory(self, pooled: torch.Tensor, valid: torch.Tensor) -> None:
        """memory_c ← m·memory_c + (1 − m)·(batch mean of the image prototypes of class c), in place."""
        w = valid.float()
        n = w.sum(0)  # (C+1,)
        mean = (pooled.float() * w[..., None]).sum(0) / n.clamp_min(1)[:, None]
        m = self.settings.memory_momentum
        seen = n > 0
        new = torch.where(self.memory_filled[:, None], m * self.memory + (1 - m) * mean, mean)
        self.memory.copy_(torch.where(seen[:, None], new, self.memory))
        self.memory_filled.logical_or_(seen)
