"""MMCST's multi-modal class-token ViT (METHODS.md §9; the architecture is §9.2's inferred design [I]).

Only the supplement of the paper is known (DINO ViT-B/16, GWRP 0.996, best-val model selection,
last-6-layer class-to-patch attention, 12-layer patch affinity). What it gives MCTformer+'s wrapper:

* C **visual** class tokens (learnable, as MCTformer) plus a *visual context*: the mean of the input
  patch embeddings, broadcast to every visual token;
* C **textual** class tokens: the frozen CLIP text embeddings of the class prompts (a buffer, so a
  checkpoint rebuilds without the CLIP file), projected to D, plus an *image–language context*: a
  projected image embedding (CLIP's image tower, frozen, by default; the ViT's own mean patch
  embedding with ``image_context=patches``);
* the sequence ``[T_vis; T_txt; patches]`` through the ViT; class scores = mean over D of each group's
  output tokens and GWRP of the 3×3 PatchCAM.

Alternative readings (config switches, §9.2): ``text_tokens=classifier`` — the textual embeddings are
only classifier weights on the output patch tokens (no textual tokens in the sequence);
``context_mode=concat`` — each context is concatenated to its tokens and a linear layer maps the pair
back to D (initialised as [I | I], i.e. equal to the sum at the start) [I].
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...core.errors import TokensegError
from ...models.attention import run_blocks
from ...models.classtoken import ClassTokenViT, MapOutputs, pool_patch_scores

_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


@dataclass
class TextSide:
    """What MMCST takes from CLIP: the prompt embeddings and (image_context=clip) the image tower."""

    embeddings: torch.Tensor  # (C, E) float32, L2-normalised; zeros while ``pending``
    visual: nn.Module | None  # open_clip VisionTransformer, frozen (image_context=clip)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pending: bool  # True: placeholders, to be filled from a checkpoint's state dict
    prompts: list[str]


class MMCSTViT(ClassTokenViT):
    """ClassTokenViT with textual class tokens and sample-specific contexts (see the module docstring)."""

    def __init__(self, backbone: nn.Module, num_classes: int, train_grid: tuple[int, int], text: TextSide, *,
                 text_tokens: str = "tokens", visual_context: bool = True, image_context: str = "clip",
                 context_mode: str = "add", map_groups: str = "both", input_mean=(0.485, 0.456, 0.406),
                 input_std=(0.229, 0.224, 0.225), **vit_kwargs) -> None:
        super().__init__(backbone, num_classes, train_grid, patch_head=True, **vit_kwargs)
        D, C = self.embed_dim, num_classes
        emb = text.embeddings.detach().float()
        if emb.ndim != 2 or emb.shape[0] != C:
            raise ValueError(f"text embeddings must be ({C}, E), got {tuple(emb.shape)}")
        self.text_tokens = text_tokens
        self.visual_context = visual_context
        self.image_context = image_context
        self.context_mode = context_mode
        self.map_groups = map_groups
        self.prompts = list(text.prompts)
        self._text_pending = text.pending
        self.register_buffer("text_embeddings", emb.clone())  # frozen, cached, in the state dict
        self.text_proj = nn.Linear(emb.shape[1], D)
        self.clip_visual = None
        if image_context == "clip":
            if text.visual is None:
                raise ValueError("image_context=clip needs a CLIP image tower")
            self.clip_visual = text.visual.float().eval().requires_grad_(False)
            size = getattr(self.clip_visual, "image_size", (224, 224))
            self.clip_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
            self.register_buffer("clip_mean", torch.tensor(text.mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("clip_std", torch.tensor(text.std, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("input_mean", torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.context_proj = nn.Linear(emb.shape[1], D)
        elif image_context == "patches":
            self.context_proj = nn.Linear(D, D)
        else:
            self.context_proj = None
        # reading (b): concatenate, then map 2D -> D; starts as the sum [I]
        self.vis_fuse = _sum_init_linear(D) if context_mode == "concat" and visual_context else None
        self.txt_fuse = _sum_init_linear(D) if context_mode == "concat" and self.context_proj is not None else None

    # ------------------------------------------------------------------ tokens
    @property
    def num_prefix(self) -> int:
        """Visual tokens, then (``text_tokens=tokens``) the textual ones."""
        return self.num_classes * (2 if self.text_tokens == "tokens" else 1)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.clip_visual is not None:
            self.clip_visual.eval()  # frozen tower: always inference behaviour
        return self

    @torch.no_grad()
    def fill_text_side(self, text: TextSide) -> None:
        """Put CLIP's outputs into a model built with placeholders (in place: optimizer and DDP keep
        their references). The image tower's weights are copied into the same architecture."""
        if text.pending:
            raise ValueError("fill_text_side needs computed CLIP outputs")
        self.text_embeddings.copy_(text.embeddings.to(self.text_embeddings))
        if self.clip_visual is not None:
            own, new = self.clip_visual.state_dict(), text.visual.state_dict()
            bad = sorted(k for k in set(own) | set(new) if k not in own or k not in new or own[k].shape != new[k].shape)
            if bad:
                raise TokensegError(f"mmcst.clip_arch: the CLIP file's image tower differs from the configured "
                                    f"architecture (e.g. {bad[0]}); set mmcst.clip_arch / mmcst.clip_quick_gelu")
            self.clip_visual.load_state_dict(new)
            self.clip_mean.copy_(torch.tensor(text.mean).view(1, 3, 1, 1))
            self.clip_std.copy_(torch.tensor(text.std).view(1, 3, 1, 1))
        self.prompts = list(text.prompts)
        self._text_pending = False

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if "text_embeddings" in state_dict:
            self._text_pending = False  # the cached embeddings (and CLIP tower) came with the checkpoint
        return result

    @torch.no_grad()
    def image_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP's L2-normalised image embedding (B, E) of the normalised input, no gradient: the input
        is re-normalised to CLIP's mean/std and resized (bicubic, antialias) to the tower's size."""
        img = x.float() * self.input_std + self.input_mean
        img = (img - self.clip_mean) / self.clip_std
        if tuple(img.shape[-2:]) != self.clip_size:
            img = F.interpolate(img, size=self.clip_size, mode="bicubic", align_corners=False, antialias=True)
        e = self.clip_visual(img).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    def language_context(self, x: torch.Tensor, patches: torch.Tensor) -> torch.Tensor | None:
        if self.image_context == "clip":
            return self.context_proj(self.image_embedding(x).to(patches.dtype))[:, None]
        if self.image_context == "patches":
            return self.context_proj(patches.mean(1, keepdim=True))
        return None

    @staticmethod
    def _with_context(tokens: torch.Tensor, ctx: torch.Tensor | None, fuse: nn.Module | None) -> torch.Tensor:
        if ctx is None:
            return tokens
        ctx = ctx.to(tokens.dtype).expand(-1, tokens.shape[1], -1)
        return tokens + ctx if fuse is None else fuse(torch.cat([tokens, ctx], dim=-1))

    def embed_all(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor]:
        """Tokens (B, prefix + M, D), the grid, and the textual class vectors (B, C, D)."""
        patches, grid = self.embed_patches(x)
        B, dt = x.shape[0], patches.dtype
        vis = (self.cls_tokens + self.pos_embed_cls).to(dt).expand(B, -1, -1)
        if self.visual_context:
            vis = self._with_context(vis, patches.mean(1, keepdim=True), self.vis_fuse)
        txt = self.text_proj(self.text_embeddings.to(dt))[None].expand(B, -1, -1)
        txt = self._with_context(txt, self.language_context(x, patches), self.txt_fuse)
        prefix = torch.cat([vis, txt], 1) if self.text_tokens == "tokens" else vis
        return self.norm_pre(torch.cat([prefix, patches], 1)), grid, txt

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        tokens, grid, _ = self.embed_all(x)
        return tokens, grid

    def text_patch_logits(self, tokens: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """Reading (a): (B, C, M) scores of the output patch tokens against the textual class vectors,
        scaled by 1/sqrt(D) [I]."""
        pat = tokens[:, self.num_prefix:]
        return (txt.float() @ pat.float().transpose(1, 2)) * self.embed_dim ** -0.5

    # ------------------------------------------------------------------ training
    def forward(self, x: torch.Tensor, return_layer_tokens: bool = False) -> dict:
        """Visual-token, textual and PatchCAM logits (B, C) each, the output tokens and the grid."""
        tokens, grid, txt = self.embed_all(x)
        res = run_blocks(self.blocks, tokens, self.num_prefix, keep_layer_tokens=return_layer_tokens)
        tokens = self.output_norm(res.tokens)
        C = self.num_classes
        out = self.head_outputs(tokens, grid, res.layer_tokens if return_layer_tokens else None)
        if self.text_tokens == "tokens":
            out["text_logits"] = tokens[:, C:2 * C].float().mean(-1)
        else:
            tmap = self.text_patch_logits(tokens, txt).view(x.shape[0], C, *grid)
            out["text_map"] = tmap
            out["text_logits"] = pool_patch_scores(tmap, self.pooling, self.gwrp_decay)
        return out

    # ------------------------------------------------------------------ maps
    @torch.no_grad()
    def forward_maps(self, x: torch.Tensor, last_k: int, affinity: bool, layer_reduce: str = "mean",
                     affinity_layers: int = 0) -> MapOutputs:
        """As :meth:`ClassTokenViT.forward_maps`, with the class-to-patch attention of the visual and the
        textual tokens over the last ``last_k`` layers averaged (``map_groups``). With
        ``text_tokens=classifier`` the textual map is the softmax over patches of the final patch
        tokens' textual scores (an attention row of each class vector) [I]."""
        tokens, grid, txt = self.embed_all(x)
        C = self.num_classes
        tokens, rows, affinity_map = self.map_pass(tokens, self.num_prefix, last_k, affinity, layer_reduce,
                                                   affinity_layers)
        vis = rows[:, :C]
        if self.text_tokens == "tokens":
            text = rows[:, C:2 * C]
        else:
            text = self.text_patch_logits(tokens, txt).softmax(-1)
        att = {"both": lambda: (vis + text) / 2, "visual": lambda: vis, "textual": lambda: text}[self.map_groups]()
        B = x.shape[0]
        fmap = self.patch_logits_map(tokens, grid)
        scores = tokens[:, :C].float().mean(-1)
        return MapOutputs(attention=att.reshape(B, C, *grid), patchcam=F.relu(fmap.float()), affinity=affinity_map,
                          cls_logits=scores, grid=grid)


def _sum_init_linear(d: int) -> nn.Linear:
    lin = nn.Linear(2 * d, d)
    with torch.no_grad():
        eye = torch.eye(d)
        lin.weight.copy_(torch.cat([eye, eye], 1))
        lin.bias.zero_()
    return lin


# ---------------------------------------------------------------------------------------- the CLIP side
def random_clip_tower(spec: dict, embed_dim: int, seed: int = 0):
    """A small random open_clip CLIP (text and image towers) as a :class:`tokenseg.models.clip.ClipModel`,
    built from a config dict without files or network (tests, the demo). Deterministic from ``seed``
    without touching the global RNG, so a checkpoint rebuild makes the same tower."""
    from ...models.clip import ClipModel, require_open_clip

    oc = require_open_clip()
    s = {**RANDOM_TOWER, **spec}
    vision = dict(image_size=s["image_size"], patch_size=s["image_patch"], width=s["image_width"],
                  layers=s["image_layers"], head_width=max(s["image_width"] // 2, 8))
    text = dict(context_length=s["context_length"], width=s["width"], heads=s["heads"], layers=s["layers"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = oc.model.CLIP(embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    visual, m.visual = m.visual, nn.Identity()
    model = ClipModel(visual, m, float(m.logit_scale.detach()), source=f"random:{s}:{seed}")
    model.float().eval().requires_grad_(False)
    return model


RANDOM_TOWER = {"context_length": 32, "width": 64, "heads": 2, "layers": 2, "image_size": 64, "image_patch": 16,
                "image_width": 64, "image_layers": 1}


def _looks_like_file(text: str) -> bool:
    return os.sep in text or text.lower().endswith(_WEIGHT_SUFFIXES)


def _empty_visual(arch: str, quick_gelu: bool) -> nn.Module:
    """The architecture of ``arch``'s image tower with random weights (to be filled from a checkpoint)."""
    from ...models.clip import require_open_clip

    oc = require_open_clip()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs "No pretrained weights loaded"
    try:
        m = oc.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu)
    except Exception as exc:
        raise TokensegError(f"mmcst.clip_arch={arch!r}: not an open_clip model config ({exc})") from exc
    finally:
        root.setLevel(level)
    return m.visual.float().eval().requires_grad_(False)


def center_embeddings(emb: torch.Tensor) -> torch.Tensor:
    """``mmcst.text_center``: the (C, E) embeddings minus their class mean, L2-normalised, so that what the
    prompts share (all but the class word) no longer makes the textual tokens one token. One class: as is."""
    if emb.shape[0] < 2:
        return emb
    emb = emb.float() - emb.float().mean(0, keepdim=True)
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def load_text_side(mc, prompts_for, num_classes: int, cache_dir, rebuilding: bool) -> TextSide:
    """The CLIP inputs of MMCST from the ``mmcst`` section ``mc``.

    ``prompts_for()`` -> the C prompts (called only when CLIP runs). ``rebuilding`` (a checkpoint, or the
    first training step, fills them in): no CLIP file is read; the embeddings are zeros and the image
    tower is built empty from ``mmcst.clip_arch``."""
    from ...models.clip import OPENAI_MEAN, OPENAI_STD, load_clip
    from ...models.clip_ops import text_features

    need_visual = mc.image_context == "clip"
    source = str(mc.clip)
    if source == "random":
        clip = random_clip_tower(mc.random_tower, mc.text_dim, int(mc.random_tower.get("seed", 0)))
    elif rebuilding:
        visual = _empty_visual(mc.clip_arch, mc.clip_quick_gelu) if need_visual else None
        return TextSide(torch.zeros(num_classes, mc.text_dim), visual, OPENAI_MEAN, OPENAI_STD, True, [])
    else:
        if _looks_like_file(source) and not Path(source).expanduser().is_file():
            raise TokensegError(f"mmcst.clip: CLIP weights file {source} not found (OpenAI's ViT-B-16.pt, an "
                                f"open_clip checkpoint, or `random` for a small random tower)")
        clip = load_clip(source, mc.clip_arch or None, quick_gelu=mc.clip_quick_gelu, cache_dir=cache_dir)
    prompts = list(prompts_for())
    if len(prompts) != num_classes:
        raise TokensegError(f"mmcst.class_names: {len(prompts)} names for {num_classes} classes")
    emb = text_features(clip, prompts, mc.prompt, cache_dir)
    if mc.text_center:
        emb = center_embeddings(emb)
    if emb.shape[1] != mc.text_dim:
        raise TokensegError(f"mmcst.text_dim={mc.text_dim}, but {source}'s text embeddings have {emb.shape[1]} "
                            f"dimensions: set mmcst.text_dim={emb.shape[1]}")
    visual = clip.visual if need_visual else None
    return TextSide(emb.float(), visual, clip.image_mean, clip.image_std, False,
                    [mc.prompt.format(p) for p in prompts])


__all__ = ["MMCSTViT", "TextSide", "center_embeddings", "load_text_side", "random_clip_tower", "RANDOM_TOWER"]
